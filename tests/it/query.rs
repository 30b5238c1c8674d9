//! Reads: span endpoints, SQL endpoint (formats, safety, limits, tenancy), ReadSpans.

use arrow::ipc::reader::StreamReader;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::{json, Value};

use lakewriter::proto::ingestion::internal_ingestion_service_client::InternalIngestionServiceClient;
use lakewriter::proto::ingestion::ReadSpansRequest;

use crate::harness::*;

fn trace_hex(trace: u64) -> String {
    format!("{:016x}{:016x}", 0, trace + 1)
}

/// A root span `n` of `trace` at `start + n µs`, with optional attributes.
fn root(trace: u64, n: u64, attrs: Vec<(&str, &str)>) -> Span {
    let mut s = span(trace, n, None);
    s.attributes
        .extend(attrs.into_iter().map(|(k, v)| kv(k, sv(v))));
    s
}

fn ids(rows: &Value, field: &str) -> Vec<String> {
    rows.as_array()
        .unwrap_or_else(|| panic!("not an array: {rows}"))
        .iter()
        .map(|r| r[field].as_str().unwrap().to_string())
        .collect()
}

/// Traces: 1 (svc-a, root 10 + LLM child 11, flushed), 2 (svc-a, root 20,
/// in memory), 3 (svc-b workflow root 30, in memory).
async fn load(server: &Server) {
    let mut c = server.trace_client().await;
    let mut child = span(1, 11, Some(10));
    child
        .attributes
        .push(kv("openinference.span.kind", sv("LLM")));
    c.export(request("svc-a", vec![root(1, 10, vec![]), child]))
        .await
        .unwrap();
    server.flush().await;
    c.export(request("svc-a", vec![root(2, 20, vec![])]))
        .await
        .unwrap();
    c.export(request(
        "svc-b",
        vec![root(3, 30, vec![("junjo.span_type", "workflow")])],
    ))
    .await
    .unwrap();
}

async fn check_span_endpoints(server: &Server) {
    let k = Some(ADMIN_KEY);
    let (st, names) = server.get_json("/otel/span-service-names", k).await;
    assert_eq!((st, names), (200, json!(["svc-a", "svc-b"])));

    let (st, roots) = server.get_json("/otel/service/svc-a/root-spans", k).await;
    assert_eq!(st, 200, "{roots}");
    assert_eq!(ids(&roots, "span_id"), [span_id_hex(20), span_id_hex(10)]);
    let r = &roots[1];
    assert_eq!(r["trace_id"], trace_hex(1));
    assert!(r["parent_span_id"].is_null());
    assert_eq!(r["attributes_json"], json!({"n": 10}));
    assert_eq!(r["start_time"], "2025-11-13T02:13:20.000010000Z");
    assert_eq!(r["duration_ns"], 500);
    assert_eq!(r["kind"], "INTERNAL");

    let (_, page) = server
        .get_json("/otel/service/svc-a/root-spans?limit=1&offset=1", k)
        .await;
    assert_eq!(ids(&page, "span_id"), [span_id_hex(10)]);
    // start is inclusive, end exclusive; both RFC 3339 or ns.
    let (_, bounded) = server
        .get_json(
            "/otel/service/svc-a/root-spans?start=2025-11-13T02:13:20.000015Z&end=1763000000000021000",
            k,
        )
        .await;
    assert_eq!(ids(&bounded, "span_id"), [span_id_hex(20)]);

    let (_, llm) = server
        .get_json("/otel/service/svc-a/root-spans-filtered", k)
        .await;
    assert_eq!(ids(&llm, "span_id"), [span_id_hex(10)]);

    let (_, trace) = server
        .get_json(&format!("/otel/trace/{}/nested-spans", trace_hex(1)), k)
        .await;
    assert_eq!(ids(&trace, "span_id"), [span_id_hex(10), span_id_hex(11)]);
    assert_eq!(trace[1]["parent_span_id"], span_id_hex(10));
    assert_eq!(
        trace[1]["attributes_json"]["openinference.span.kind"],
        "LLM"
    );

    let (st, one) = server
        .get_json(
            &format!(
                "/otel/trace/{}/span/{}",
                trace_hex(2).to_uppercase(),
                span_id_hex(20)
            ),
            k,
        )
        .await;
    assert_eq!(st, 200, "{one}");
    assert_eq!(one["service_name"], "svc-a");
    let (st, missing) = server
        .get_json(
            &format!("/otel/trace/{}/span/{}", trace_hex(2), span_id_hex(99)),
            k,
        )
        .await;
    assert_eq!(st, 404);
    assert!(missing["error"].as_str().unwrap().contains("not found"));

    let (_, wf) = server.get_json("/otel/spans/type/workflow/svc-b", k).await;
    assert_eq!(ids(&wf, "span_id"), [span_id_hex(30)]);
    let (_, none) = server.get_json("/otel/spans/type/workflow/svc-a", k).await;
    assert_eq!(none, json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn span_endpoints_read_files_and_memtables_and_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &[]).await;
    load(&server).await;
    check_span_endpoints(&server).await;
    // Unflushed rows come back from the WAL after kill -9; flushed ones from files.
    server.restart().await;
    check_span_endpoints(&server).await;
    server.flush().await;
    check_span_endpoints(&server).await;

    // Bad parameters: precise 400s, never SQL text.
    let k = Some(ADMIN_KEY);
    for (path, needle) in [
        ("/otel/trace/xyz/nested-spans", "trace_id must be 32 hex"),
        (
            "/otel/trace/' OR 1=1 --/nested-spans",
            "trace_id must be 32 hex",
        ),
        (
            "/otel/trace/00000000000000000000000000000002/span/12",
            "span_id must be 16 hex",
        ),
        (
            "/otel/service/svc-a/root-spans?limit=0",
            "limit must be within",
        ),
        (
            "/otel/service/svc-a/root-spans?limit=10001",
            "limit must be within",
        ),
        ("/otel/service/svc-a/root-spans?limit=abc", "query string"),
        ("/otel/service/svc-a/root-spans?start=yesterday", "start="),
        (
            "/otel/service/svc-a/root-spans?offset=9223372036854775000",
            "offset must be at most",
        ),
    ] {
        let (st, body) = server.get_json(path, k).await;
        assert_eq!(st, 400, "{path}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains(needle),
            "{path}: {body}"
        );
    }
    // A service name with quotes is a literal, not SQL.
    let (st, body) = server
        .get_json("/otel/service/x'%20OR%20'1'='1/root-spans", k)
        .await;
    assert_eq!((st, body), (200, json!([])));

    // A root inside [start, end) whose LLM child starts after `end`, in a
    // file of its own: the file pruning of `end` must not hide the child.
    let mut c = server.trace_client().await;
    c.export(request("svc-c", vec![root(5, 50, vec![])]))
        .await
        .unwrap();
    server.flush().await;
    let mut child = span(5, 51, Some(50));
    child
        .attributes
        .push(kv("openinference.span.kind", sv("LLM")));
    c.export(request("svc-c", vec![child])).await.unwrap();
    server.flush().await;
    let (st, llm) = server
        .get_json(
            "/otel/service/svc-c/root-spans-filtered?end=1763000000000050500",
            k,
        )
        .await;
    assert_eq!(st, 200, "{llm}");
    assert_eq!(ids(&llm, "span_id"), [span_id_hex(50)]);

    // A `gen_ai.*` attribute makes an LLM span only when it is not empty.
    let llm_child = |trace, n, key, value| {
        let mut s = span(trace, n, Some(n - 1));
        s.attributes.push(kv(key, sv(value)));
        s
    };
    c.export(request(
        "svc-d",
        vec![
            root(6, 60, vec![]),
            llm_child(6, 61, "gen_ai.operation.name", ""),
            root(7, 70, vec![]),
            llm_child(7, 71, "gen_ai.provider.name", "openai"),
        ],
    ))
    .await
    .unwrap();
    let (st, llm) = server
        .get_json("/otel/service/svc-d/root-spans-filtered", k)
        .await;
    assert_eq!(st, 200, "{llm}");
    assert_eq!(ids(&llm, "span_id"), [span_id_hex(70)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_formats_safety_and_tenant_isolation() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]).await;
    load(&server).await;
    let acme = server.new_key("acme", &["write", "read"], None).await;
    let mut ac = server
        .trace_client_with("x-api-key", Some(acme.clone()))
        .await;
    ac.export(request("acme-svc", vec![root(9, 90, vec![])]))
        .await
        .unwrap();

    // JSON (default): columns + rows, read-your-writes across file + memtable.
    let (st, v) = server
        .sql(
            ADMIN_KEY,
            "SELECT service_name, count(*) AS n FROM spans GROUP BY service_name ORDER BY service_name",
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["columns"][1], json!({"name": "n", "type": "Int64"}));
    assert_eq!(v["rows"], json!([["svc-a", 3], ["svc-b", 1]]));
    let (_, v) = server.sql(&acme, "SELECT service_name FROM spans").await;
    assert_eq!(v["rows"], json!([["acme-svc"]]));
    // The body is read as JSON whatever its Content-Type (`curl -d` sends a
    // form type); a body that is not the JSON object is a 400 that says so.
    for (body, status) in [
        (r#"{"sql": "SELECT 1 AS one, NULL AS nothing"}"#, 200),
        ("sql=SELECT 1", 400),
    ] {
        let r = reqwest::Client::new()
            .post(format!("{}/api/v1/query", server.http()))
            .header("x-api-key", ADMIN_KEY)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{body}");
        let v: Value = r.json().await.unwrap();
        if status == 200 {
            assert_eq!(v["rows"], json!([[1, null]]), "{v}");
        } else {
            assert!(
                v["error"]
                    .as_str()
                    .unwrap()
                    .contains("expected a JSON object"),
                "{v}"
            );
        }
    }
    let (st, v) = server
        .get_json("/api/v1/no-such-route", Some(ADMIN_KEY))
        .await;
    assert_eq!(st, 404);
    assert_eq!(v["error"], "no route /api/v1/no-such-route", "{v}");
    let (_, v) = server
        .sql(
            &acme,
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1",
        )
        .await;
    // The built-in telemetry tables only: no other tenant's record tables.
    assert_eq!(
        v["rows"],
        json!([
            ["logs"],
            ["metrics_exponential_histogram"],
            ["metrics_gauge"],
            ["metrics_histogram"],
            ["metrics_sum"],
            ["metrics_summary"],
            ["spans"],
            ["state_patches"]
        ])
    );

    // Arrow IPC stream and CSV.
    let http = reqwest::Client::new();
    let q = json!({"sql": "SELECT span_id, start_time FROM spans ORDER BY span_id"});
    let r = http
        .post(format!("{}/api/v1/query", server.http()))
        .header("x-api-key", ADMIN_KEY)
        .header("accept", "application/vnd.apache.arrow.stream")
        .json(&q)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let bytes = r.bytes().await.unwrap();
    let batches: Vec<_> = StreamReader::try_new(std::io::Cursor::new(bytes), None)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 4);
    assert_eq!(
        batches[0].schema().field(1).data_type().to_string(),
        "Timestamp(ns, \"UTC\")"
    );
    let csv_of = |sql: &str| {
        http.post(format!("{}/api/v1/query", server.http()))
            .header("x-api-key", ADMIN_KEY)
            .header("accept", "text/csv")
            .json(&json!({ "sql": sql }))
            .send()
    };
    let r = csv_of("SELECT name FROM spans WHERE span_id = '000000000000000b'")
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "name\nop-10\n");
    // CSV has no nested values: a precise 400, not an encoder failure.
    let r = csv_of("SELECT make_array(1, 2) AS pair").await.unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"].as_str().unwrap().contains("\"pair\" is List"),
        "{v}"
    );

    // Everything that is not a read is refused with a precise message.
    for (sql, needle) in [
        ("CREATE TABLE t AS SELECT 1", "DDL not supported"),
        (
            "CREATE EXTERNAL TABLE x STORED AS PARQUET LOCATION '/etc'",
            "DDL not supported",
        ),
        ("DROP TABLE spans", "DDL not supported"),
        ("INSERT INTO spans SELECT * FROM spans", "DML not supported"),
        ("COPY spans TO '/tmp/x.parquet'", "DML not supported"),
        (
            "SET datafusion.execution.batch_size = 1",
            "Statement not supported",
        ),
        ("SELECT * FROM '/etc/passwd'", "not found"),
        ("SELECT * FROM read_parquet('/tmp/x.parquet')", "not found"),
        ("SELECT * FROM acme.public.spans", "not found"),
        ("SELECT * FROM spans; SELECT 1", "single SQL statement"),
        ("SELEC 1", "Expected"),
    ] {
        let (st, v) = server.sql(ADMIN_KEY, sql).await;
        assert_eq!(st, 400, "{sql}: {v}");
        assert!(v["error"].as_str().unwrap().contains(needle), "{sql}: {v}");
    }

    // Credentials: none, wrong scope, endpoint allow-list.
    let (st, _) = server.get_json("/otel/span-service-names", None).await;
    assert_eq!(st, 401);
    let writer = server.new_key("default", &["write"], None).await;
    let (st, v) = server.sql(&writer, "SELECT 1").await;
    assert_eq!(st, 403, "{v}");
    let (st, _) = server
        .get_json("/otel/span-service-names", Some(&writer))
        .await;
    assert_eq!(st, 403);
    let patches_only = server
        .new_key("default", &["read"], Some(&["state_patches"]))
        .await;
    let (st, v) = server
        .sql(&patches_only, "SELECT count(*) FROM spans")
        .await;
    assert_eq!(st, 400);
    assert!(v["error"].as_str().unwrap().contains("not found"), "{v}");
    let (st, _) = server
        .get_json("/otel/span-service-names", Some(&patches_only))
        .await;
    assert_eq!(st, 403);
    // The CLI prints a table, and the server's message on errors.
    let cli = |sql: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_lakewriter"))
            .args([
                "query",
                sql,
                "--server",
                &server.http(),
                "--api-key",
                ADMIN_KEY,
            ])
            .output()
            .unwrap()
    };
    let out = cli("SELECT service_name, count(*) AS n FROM spans GROUP BY 1 ORDER BY 1");
    assert!(out.status.success());
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.contains("| svc-a        | 3 |"), "{table}");
    let out = cli("DROP TABLE spans");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("DDL not supported"));
    // Tenant acme never sees default's spans through the span endpoints.
    let (_, names) = server
        .get_json("/otel/span-service-names", Some(&acme))
        .await;
    assert_eq!(names, json!(["acme-svc"]));
    let (_, trace) = server
        .get_json(
            &format!("/otel/trace/{}/nested-spans", trace_hex(1)),
            Some(&acme),
        )
        .await;
    assert_eq!(trace, json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_limits_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &[
            "--query-max-rows",
            "10",
            "--query-memory",
            "2MiB",
            "--query-timeout",
            "10s",
        ],
    )
    .await;
    let (st, v) = server.sql(ADMIN_KEY, "SELECT * FROM range(11)").await;
    assert_eq!(st, 422, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("more than 10 rows"),
        "{v}"
    );
    let (st, v) = server.sql(ADMIN_KEY, "SELECT * FROM range(10)").await;
    assert_eq!((st, v["rows"].as_array().unwrap().len()), (200, 10));
    // Ten rows, but 5 MB of them: results count against --query-memory too.
    let (st, v) = server
        .sql(ADMIN_KEY, "SELECT repeat('x', 500000) AS s FROM range(10)")
        .await;
    assert_eq!(st, 422, "{v}");
    assert!(v["error"].as_str().unwrap().contains("query result"), "{v}");
    // Half a megabyte of rows fits, as text too; as JSON a control
    // character takes six bytes (`\u0001`): that answer would be 3 MB, and
    // the encoded answer counts against --query-memory as well.
    let (st, v) = server
        .sql(ADMIN_KEY, "SELECT repeat('x', 50000) AS s FROM range(10)")
        .await;
    assert_eq!((st, v["rows"].as_array().unwrap().len()), (200, 10));
    let controls = "SELECT repeat(chr(1), 50000) AS s FROM range(10)";
    let (st, v) = server.sql(ADMIN_KEY, controls).await;
    assert_eq!(st, 422, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("encoded as JSON"),
        "{v}"
    );
    let arrow = reqwest::Client::new()
        .post(format!("{}/api/v1/query", server.http()))
        .bearer_auth(ADMIN_KEY)
        .header("accept", "application/vnd.apache.arrow.stream")
        .json(&serde_json::json!({ "sql": controls }))
        .send()
        .await
        .unwrap();
    assert_eq!(arrow.status(), 200);
    // A call that would build more than the whole budget is refused before
    // it allocates (DataFusion folds constant calls while planning).
    for sql in [
        "SELECT repeat('ab', 1073741823)",
        "SELECT cardinality(range(0, 1500000000))",
        "SELECT array_resize(make_array(1), 2147483647, 7)",
        "SELECT range(TIMESTAMP '2000-01-01', TIMESTAMP '2100-01-01', INTERVAL '1 nanosecond')",
        "SELECT replace(repeat('a', 100000), 'a', repeat('b', 100000))",
    ] {
        let (st, v) = server.sql(ADMIN_KEY, sql).await;
        assert_eq!(st, 422, "{sql}: {v}");
        assert!(
            v["error"].as_str().unwrap().contains("--query-memory"),
            "{sql}: {v}"
        );
    }
    // Planning-time work the timeout cannot interrupt is refused by size.
    let (st, v) = server
        .sql(
            ADMIN_KEY,
            "SELECT levenshtein(repeat('a', 100000), repeat('b', 100000))",
        )
        .await;
    assert_eq!(st, 422, "{v}");
    assert!(v["error"].as_str().unwrap().contains("steps"), "{v}");
    let (st, v) = server
        .sql(ADMIN_KEY, "SELECT count(*) FROM range(1000000000000)")
        .await;
    assert_eq!(st, 504, "{v}");
    assert!(v["error"].as_str().unwrap().contains("time limit"), "{v}");
    // The server is still fine.
    let (st, _) = server.sql(ADMIN_KEY, "SELECT 1").await;
    assert_eq!(st, 200);
}

/// The span endpoints' JSON counts against --query-memory like the SQL
/// answer: a trace whose JSON would not fit is refused, not built.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn span_answers_count_against_query_memory() {
    let dir = tempfile::tempdir().unwrap();
    // Above the 10 MiB a sort reserves for its merge.
    let server = Server::start(dir.path(), &["--query-memory", "32MiB"]).await;
    let mut c = server.trace_client().await;
    // Names of control characters: one byte each in the rows, six
    // (`\u0001`) in JSON. Trace 1: 0.1 MB of rows, 0.6 MB of JSON;
    // trace 2: 4 MB of rows, 24 MB of JSON (its buffer would reach 32 MiB).
    for (trace, len) in [(1, 50_000), (2, 2_000_000)] {
        let spans = (0..2)
            .map(|n| Span {
                name: "\u{1}".repeat(len),
                ..span(trace, n, None)
            })
            .collect();
        c.export(request("svc", spans)).await.unwrap();
    }
    let path = |trace| format!("/otel/trace/{}/nested-spans", trace_hex(trace));
    let (st, small) = server.get_json(&path(1), Some(ADMIN_KEY)).await;
    assert_eq!(st, 200, "{small}");
    assert_eq!(ids(&small, "span_id"), [span_id_hex(0), span_id_hex(1)]);
    assert_eq!(small[1]["name"].as_str().unwrap().len(), 50_000);
    let (st, big) = server.get_json(&path(2), Some(ADMIN_KEY)).await;
    assert_eq!(st, 422, "{big}");
    assert!(
        big["error"].as_str().unwrap().contains("encoded as JSON"),
        "{big}"
    );
    // Every byte went back to the pool, and a span of that trace alone fits.
    assert_eq!(server.query_memory_held_settled().await, 0.0);
    let (st, one) = server
        .get_json(
            &format!("/otel/trace/{}/span/{}", trace_hex(2), span_id_hex(1)),
            Some(ADMIN_KEY),
        )
        .await;
    assert_eq!(st, 200, "{one}");
    assert_eq!(one["name"].as_str().unwrap().len(), 2_000_000);
    assert_eq!(one["attributes_json"], json!({"n": 1}));
}

/// 2 M groups of 6 M rows: a hash table far bigger than 64 MiB.
const BIG_GROUP_BY: &str = "SELECT count(*), sum(c), min(k), max(k) FROM \
    (SELECT value % 2000000 AS k, count(*) AS c FROM range(6000000) GROUP BY k)";
/// 2 M 24-byte strings sorted (a window over the whole input), and checked:
/// no row follows a greater one.
const BIG_SORT: &str = "SELECT count(*), count(prev), sum(CASE WHEN prev > h THEN 1 ELSE 0 END) \
    FROM (SELECT h, lag(h) OVER (ORDER BY h) AS prev FROM \
    (SELECT lpad(to_hex((value * 2654435761) % 4294967291), 24, 'x') AS h FROM range(2000000)))";

fn files_under(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| {
        d.map(|e| e.unwrap().path())
            .map(|p| if p.is_dir() { files_under(&p) } else { 1 })
            .sum()
    })
}

/// Sorts and aggregations bigger than the query memory spill to a bounded
/// directory and answer exactly; without spilling, or past its limit, they
/// fail and name the setting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_sorts_and_aggregations_spill_within_their_limits() {
    let dir = tempfile::tempdir().unwrap();
    // What a killed server left in the spill directory goes at start.
    let spill = dir.path().join("query-spill");
    let leftover = spill.join("datafusion-old/spill.arrow");
    std::fs::create_dir_all(leftover.parent().unwrap()).unwrap();
    std::fs::write(&leftover, b"left by a killed server").unwrap();
    let mut server = Server::start(dir.path(), &["--query-memory", "64MiB"]).await;
    assert!(!leftover.exists());

    let (st, v) = server.sql(ADMIN_KEY, BIG_GROUP_BY).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["rows"], json!([[2_000_000, 6_000_000, 0, 1_999_999]]));
    let spills = server.metric("lakewriter_query_spills_total").await;
    assert!(spills > 0.0, "the aggregation fit in memory: no test");
    let (st, v) = server.sql(ADMIN_KEY, BIG_SORT).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["rows"], json!([[2_000_000, 1_999_999, 0]]));
    assert!(server.metric("lakewriter_query_spills_total").await > spills);
    assert!(server.metric("lakewriter_query_spilled_bytes_total").await > 1e6);
    // Memory and spill files are given back.
    assert_eq!(server.query_memory_held_settled().await, 0.0);
    assert_eq!(files_under(&spill), 0);
    server.stop();

    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(
        dir.path(),
        &["--query-memory", "64MiB", "--query-spill-limit", "1MiB"],
    )
    .await;
    for sql in [BIG_GROUP_BY, BIG_SORT] {
        let (st, v) = server.sql(ADMIN_KEY, sql).await;
        assert_eq!(st, 422, "{v}");
        assert!(
            v["error"]
                .as_str()
                .unwrap()
                .contains("(--query-spill-limit, 1048576 bytes"),
            "{v}"
        );
    }
    assert_eq!(files_under(&dir.path().join("query-spill")), 0);
    server.stop();

    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &["--query-memory", "64MiB", "--query-spill-limit", "0"],
    )
    .await;
    // Refused by the pool, or by an operator that would have spilled.
    for sql in [BIG_GROUP_BY, BIG_SORT] {
        let (st, v) = server.sql(ADMIN_KEY, sql).await;
        assert_eq!(st, 422, "{v}");
        assert!(
            v["error"].as_str().unwrap().contains("--query-memory"),
            "{v}"
        );
    }
    assert!(!dir.path().join("query-spill").exists());
    assert_eq!(server.metric("lakewriter_query_spills_total").await, 0.0);
}

/// A query that would fit the query memory alone, but finds it held by
/// another running query, is told to retry (429), not that it is too big.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_crowded_out_of_memory_may_retry() {
    // A hash join holds its build side, a stable amount, while it probes.
    // Measured on this build: 1 M build rows need at most 22 MiB, 2 M at
    // most 46 MiB and hold 43.9 MB while they probe.
    const HOG_HOLDS: f64 = 40e6;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &["--query-memory", "56MiB", "--query-timeout", "6s"],
    )
    .await;
    let join = |build: u64, probe: u64| {
        format!(
            "SELECT count(*) FROM (SELECT value AS a FROM range({build})) t1 \
             JOIN (SELECT value AS b FROM range({probe})) t2 ON a = b"
        )
    };
    let probe = join(1_000_000, 3_000_000);
    let (st, v) = server.sql(ADMIN_KEY, &probe).await;
    assert_eq!(st, 200, "alone it fits: {v}");
    assert_eq!(v["rows"], json!([[1_000_000]]), "{v}");
    assert_eq!(server.query_memory_held_settled().await, 0.0);

    // Twice the build rows, probed without end: it holds its memory until
    // the time limit cancels it, and leaves less than the probe needs. The
    // probe side is filtered to almost nothing before it is repartitioned:
    // unfiltered, its batches queue between the two partitions whenever
    // one falls behind (CI's busy cores), up to the whole pool, and the long
    // query fails on its own.
    let hog = {
        let sql = "SELECT count(*) FROM (SELECT value AS a FROM range(2000000)) t1 \
                   JOIN (SELECT value AS b FROM range(1000000000000) \
                   WHERE value % 1000003 = 7) t2 ON a = b";
        let http = server.http();
        tokio::spawn(async move {
            let r = reqwest::Client::new()
                .post(format!("{http}/api/v1/query"))
                .bearer_auth(ADMIN_KEY)
                .json(&json!({ "sql": sql }))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        })
    };
    while server.metric("lakewriter_query_memory_bytes").await < HOG_HOLDS {
        assert!(
            !hog.is_finished(),
            "the long query ended before holding {HOG_HOLDS} bytes"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Let the last build partition finish what it is doing when the total
    // passes the mark: from then on the long query only probes.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(server.metric("lakewriter_query_memory_bytes").await >= HOG_HOLDS);
    let r = server
        .post("/api/v1/query", Some(ADMIN_KEY), json!({ "sql": probe }))
        .await;
    assert_eq!(r.status().as_u16(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["retryable"], json!(true), "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("held by other running queries"),
        "{v}"
    );
    assert_eq!(server.metric("lakewriter_queries_busy_total").await, 1.0);
    let (st, body) = hog.await.unwrap();
    assert_eq!(st, 504, "{body}");
    // Memory is given back, and the same query passes again.
    let (st, v) = server.sql(ADMIN_KEY, &probe).await;
    assert_eq!(st, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_during_flush_see_every_row_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]).await;
    let mut c = server.trace_client().await;
    let mut total = 0;
    // Rounds of write-then-flush until some query ran wholly inside a flush
    // (a fast flush can finish before the first query does).
    let (mut checks, mut during) = (0, 0);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    for round in 0u64.. {
        assert!(
            std::time::Instant::now() < deadline,
            "no query overlapped a flush in {round} rounds"
        );
        for batch in 0..20u64 {
            let spans = (0..500)
                .map(|i| span(round * 100 + batch, i, None))
                .collect();
            c.export(request("svc", spans)).await.unwrap();
            total += 500;
        }
        let flush = {
            let http = server.http();
            tokio::spawn(async move {
                reqwest::Client::new()
                    .post(format!("{http}/api/v1/admin/flush"))
                    .header("x-api-key", ADMIN_KEY)
                    .send()
                    .await
                    .unwrap()
                    .status()
            })
        };
        while !flush.is_finished() {
            let (st, v) = server
                .sql(
                    ADMIN_KEY,
                    "SELECT count(*), count(DISTINCT span_id || trace_id) FROM spans",
                )
                .await;
            assert_eq!(st, 200, "{v}");
            assert_eq!(v["rows"], json!([[total, total]]), "after {checks} checks");
            checks += 1;
            if !flush.is_finished() {
                during += 1; // started and ended while the flush ran
            }
        }
        assert_eq!(flush.await.unwrap(), 200);
        if during > 0 {
            break;
        }
    }
    let (st, v) = server
        .sql(
            ADMIN_KEY,
            "SELECT count(*), count(DISTINCT span_id || trace_id) FROM spans",
        )
        .await;
    assert_eq!((st, &v["rows"]), (200, &json!([[total, total]])), "{v}");
}

async fn read_all(
    client: &mut InternalIngestionServiceClient<
        tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Cred>,
    >,
    mut cursor: Vec<u8>,
    batch: u32,
) -> Result<(Vec<Vec<u8>>, Vec<Span>), tonic::Status> {
    let (mut keys, mut spans) = (Vec::new(), Vec::new());
    loop {
        let mut stream = client
            .read_spans(ReadSpansRequest {
                start_key_ulid: cursor.clone(),
                batch_size: batch,
            })
            .await?
            .into_inner();
        let mut got = 0;
        while let Some(r) = stream.message().await? {
            assert_eq!(r.key_ulid.len(), 16);
            assert!(r.key_ulid > cursor, "keys increase");
            cursor = r.key_ulid.clone();
            keys.push(r.key_ulid);
            spans.push(Span::decode(&r.span_bytes[..]).unwrap());
            got += 1;
            assert!(r.remaining_count < batch as u64);
        }
        if got < batch {
            return Ok((keys, spans));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_spans_pages_resumes_across_restart_and_scopes_tenants() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &[]).await;
    let acme = server.new_key("acme", &["write", "read"], None).await;
    let mut c = server.trace_client().await;
    for t in 0..3u64 {
        let spans = (0..3).map(|i| span(t, i, None)).collect();
        c.export(request("svc", spans)).await.unwrap();
    }
    let mut ac = server
        .trace_client_with("x-api-key", Some(acme.clone()))
        .await;
    ac.export(request("acme", vec![span(50, 1, None)]))
        .await
        .unwrap();

    let channel = server.internal_channel().await;
    let mut all =
        InternalIngestionServiceClient::with_interceptor(channel.clone(), Cred("x", None));
    let (keys, spans) = read_all(&mut all, vec![], 2).await.unwrap();
    assert_eq!(
        spans.len(),
        10,
        "no credential on the internal port: every tenant"
    );
    let mut sorted = keys.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted, keys, "strictly increasing");
    assert_eq!(spans[0].span_id, span(0, 0, None).span_id);

    let mut scoped = InternalIngestionServiceClient::with_interceptor(
        channel.clone(),
        Cred("x-api-key", Some(acme)),
    );
    let (_, acme_spans) = read_all(&mut scoped, vec![], 100).await.unwrap();
    assert_eq!(acme_spans.len(), 1);
    assert_eq!(acme_spans[0].span_id, span(50, 1, None).span_id);
    let mut bad = InternalIngestionServiceClient::with_interceptor(
        channel.clone(),
        Cred("x-api-key", Some("lw_nope".into())),
    );
    let err = read_all(&mut bad, vec![], 10).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    // A credential header that cannot be used is refused, not read as "no
    // credential" (which would hand out every tenant's spans).
    for (header, value) in [("authorization", "Basic YWNtZTpwdw=="), ("x-api-key", " ")] {
        let mut odd = InternalIngestionServiceClient::with_interceptor(
            channel.clone(),
            Cred(header, Some(value.into())),
        );
        let err = read_all(&mut odd, vec![], 10).await.unwrap_err();
        assert_eq!(
            err.code(),
            tonic::Code::Unauthenticated,
            "{header}: {value}"
        );
        assert!(err.message().contains(header), "{}", err.message());
    }

    // A cursor in the middle of a request resumes inside it, across kill -9.
    let mid = keys[4].clone();
    server.restart().await;
    let channel = server.internal_channel().await;
    let mut all = InternalIngestionServiceClient::with_interceptor(channel, Cred("x", None));
    let (rest, _) = read_all(&mut all, mid, 3).await.unwrap();
    assert_eq!(rest, keys[5..].to_vec());
    let err = read_all(&mut all, vec![1, 2, 3], 3).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_spans_cursor_older_than_retention_is_out_of_range() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--wal-retention", "0s"]).await;
    let mut c = server.trace_client().await;
    c.export(request("svc", vec![span(1, 1, None)]))
        .await
        .unwrap();
    let channel = server.internal_channel().await;
    let mut client = InternalIngestionServiceClient::with_interceptor(channel, Cred("x", None));
    let (first, _) = read_all(&mut client, vec![], 10).await.unwrap();
    c.export(request("svc", vec![span(2, 1, None)]))
        .await
        .unwrap();
    c.export(request("svc", vec![span(3, 1, None)]))
        .await
        .unwrap();
    server.flush().await;
    let err = read_all(&mut client, first[0].clone(), 10)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err:?}");
    assert!(err.message().contains("retention"), "{}", err.message());
    // An empty cursor starts at the oldest retained entry (none are left).
    let (keys, _) = read_all(&mut client, vec![], 10).await.unwrap();
    assert!(keys.is_empty());
}
