//! Starts the real `lakewriter` binary on free loopback ports with a temp data
//! dir, and gives tests real clients (tonic, reqwest) and a Parquet reader.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use arrow::array::{Array, AsArray, RecordBatch};
use bytes::{Buf, BufMut};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{
    any_value::Value, AnyValue, InstrumentationScope, KeyValue,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use tonic::codec::{DecodeBuf, EncodeBuf};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// The bootstrap admin key every test server starts with (tenant `default`).
pub const ADMIN_KEY: &str = "lw_test_admin_key_0123456789abcdefghij";

pub type TraceClient = TraceServiceClient<InterceptedService<Channel, Cred>>;

/// Adds one credential header to every request.
#[derive(Clone)]
pub struct Cred(pub &'static str, pub Option<String>);

impl tonic::service::Interceptor for Cred {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.1 {
            r.metadata_mut().insert(self.0, v.parse().unwrap());
        }
        Ok(r)
    }
}

pub struct Server {
    child: Option<Child>,
    pub dir: PathBuf,
    pub grpc_port: u16,
    pub http_port: u16,
    pub internal_port: u16,
    args: Vec<String>,
    bootstrap: bool,
}

impl Server {
    /// Starts a server without a bootstrap key (it generates its own admin key).
    pub async fn start_unbootstrapped(dir: &Path, args: &[&str]) -> Server {
        let mut s = Server::new(dir, args);
        s.bootstrap = false;
        s.spawn().await;
        s
    }

    fn new(dir: &Path, args: &[&str]) -> Server {
        Server {
            child: None,
            dir: dir.to_path_buf(),
            grpc_port: 0,
            http_port: 0,
            internal_port: 0,
            args: args.iter().map(|s| s.to_string()).collect(),
            bootstrap: true,
        }
    }

    /// Starts a server on `dir` with extra flags and waits for `/health`.
    pub async fn start(dir: &Path, args: &[&str]) -> Server {
        let mut s = Server::new(dir, args);
        s.spawn().await;
        s
    }

    /// Starts the binary with every listener on port 0 (no port can be taken
    /// by a concurrent test between choosing and binding it) and reads the
    /// bound ports from its "lakewriter ready" log line.
    async fn spawn(&mut self) {
        let log_path = self.dir.join("server.log");
        let offset = std::fs::metadata(&log_path).map_or(0, |m| m.len() as usize);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lakewriter"));
        if self.bootstrap {
            cmd.env("LAKEWRITER_BOOTSTRAP_API_KEY", ADMIN_KEY);
        } else {
            cmd.env_remove("LAKEWRITER_BOOTSTRAP_API_KEY");
        }
        // No test measures latency: skip faulting in 512 MiB per server
        // (a flag in `args` still wins over the environment).
        cmd.env("LAKEWRITER_PRETOUCH_MEMORY", "0");
        let child = cmd
            .arg("serve")
            .arg("--data-dir")
            .arg(&self.dir)
            .args(["--grpc-addr", "127.0.0.1:0"])
            .args(["--http-addr", "127.0.0.1:0"])
            .args(["--internal-grpc-addr", "127.0.0.1:0"])
            .args(&self.args)
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn lakewriter");
        self.child = Some(child);
        self.wait_ready(offset).await;
    }

    async fn wait_ready(&mut self, log_offset: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let log = strip_ansi(self.log().get(log_offset..).unwrap_or_default());
            if let Some(line) = log.lines().find(|l| l.contains("lakewriter ready")) {
                self.grpc_port = logged_port(line, "grpc_addr");
                self.internal_port = logged_port(line, "internal_grpc_addr");
                self.http_port = logged_port(line, "http_addr");
                let health = reqwest::get(format!("{}/health", self.http())).await;
                if health.is_ok_and(|r| r.status().is_success()) {
                    return;
                }
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("server exited with {status}: {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "server not healthy in time: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// The server process's id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server is running").id()
    }

    pub fn http(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    pub fn lake(&self) -> PathBuf {
        self.dir.join("lake")
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://127.0.0.1:{}", self.grpc_port))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// A trace client authenticated with the admin key (`x-api-key`).
    pub async fn trace_client(&self) -> TraceClient {
        self.trace_client_with("x-api-key", Some(ADMIN_KEY.to_string()))
            .await
    }

    pub async fn trace_client_with(
        &self,
        header: &'static str,
        value: Option<String>,
    ) -> TraceClient {
        TraceServiceClient::with_interceptor(self.channel().await, Cred(header, value))
            .max_encoding_message_size(usize::MAX)
    }

    pub async fn post(
        &self,
        path: &str,
        key: Option<&str>,
        body: serde_json::Value,
    ) -> reqwest::Response {
        let mut req = reqwest::Client::new()
            .post(format!("{}{path}", self.http()))
            .json(&body);
        if let Some(k) = key {
            req = req.header("x-api-key", k);
        }
        req.send().await.unwrap()
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM and wait (at most two minutes) for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid, which it still is: the
            // child has not been waited for.
            assert_eq!(unsafe { libc::kill(c.id() as i32, libc::SIGTERM) }, 0);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
            let status = loop {
                if let Some(status) = c.try_wait().unwrap() {
                    break status;
                }
                if std::time::Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    panic!("no exit within 2 min of SIGTERM: {}", self.log());
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            };
            assert!(status.success(), "unclean exit {status}: {}", self.log());
        }
    }

    pub fn internal_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.internal_port)
    }

    pub async fn internal_channel(&self) -> Channel {
        Channel::from_shared(self.internal_url())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub async fn restart(&mut self) {
        self.kill9();
        self.spawn().await;
    }

    /// [`Server::restart`] with other extra flags.
    pub async fn restart_with(&mut self, args: &[&str]) {
        self.args = args.iter().map(|s| s.to_string()).collect();
        self.restart().await;
    }

    /// `DELETE /api/v1/apikeys/{id}` with the admin key; the status.
    pub async fn delete_key(&self, id: &str) -> u16 {
        self.delete(&format!("/api/v1/apikeys/{id}"), ADMIN_KEY)
            .await
    }

    /// `DELETE {path}` with `key`; the status.
    pub async fn delete(&self, path: &str, key: &str) -> u16 {
        let r = reqwest::Client::new()
            .delete(format!("{}{path}", self.http()))
            .header("x-api-key", key)
            .send()
            .await
            .unwrap();
        r.status().as_u16()
    }

    /// `POST /api/v1/otel/token` with `key`; the JWT.
    pub async fn token(&self, key: &str) -> String {
        let r = reqwest::Client::new()
            .post(format!("{}/api/v1/otel/token", self.http()))
            .header("X-API-Key", key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let v: serde_json::Value = r.json().await.unwrap();
        v["token"].as_str().unwrap().to_string()
    }

    pub async fn flush(&self) -> serde_json::Value {
        let r = self
            .post(
                "/api/v1/admin/flush",
                Some(ADMIN_KEY),
                serde_json::json!({}),
            )
            .await;
        assert!(
            r.status().is_success(),
            "flush failed: {}",
            r.text().await.unwrap()
        );
        r.json().await.unwrap()
    }

    /// Starts a query that reads every file of `table` and runs until
    /// aborted (or `--query-timeout`); returns once the server runs it.
    pub async fn long_query(
        &self,
        table: &str,
    ) -> tokio::task::JoinHandle<reqwest::Result<reqwest::Response>> {
        let (http, table) = (self.http(), table.to_string());
        let reader = tokio::spawn(async move {
            reqwest::Client::new()
                .post(format!("{http}/api/v1/query"))
                .bearer_auth(ADMIN_KEY)
                .json(&serde_json::json!({
                    "sql": format!("SELECT count(*) FROM {table}, range(1000000000000)")
                }))
                .send()
                .await
        });
        while self.metric("lakewriter_queries_running").await == 0.0 {
            assert!(
                !reader.is_finished(),
                "the long query ended: {:?}",
                reader.await
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        reader
    }

    /// `lakewriter_query_memory_bytes`, waiting (at most 5 s) for it to reach
    /// zero: an answer's part of the query memory is given back once the
    /// server has sent it, which can be just after the client has read it.
    pub async fn query_memory_held_settled(&self) -> f64 {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let held = self.metric("lakewriter_query_memory_bytes").await;
            if held == 0.0 || std::time::Instant::now() > deadline {
                return held;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `POST /api/v1/admin/compact` with the admin key: status and body.
    pub async fn compact(&self) -> (u16, serde_json::Value) {
        self.admin_run("compact").await
    }

    /// `POST /api/v1/admin/{what}` with the admin key: status and body.
    pub async fn admin_run(&self, what: &str) -> (u16, serde_json::Value) {
        let path = format!("/api/v1/admin/{what}");
        let r = self
            .post(&path, Some(ADMIN_KEY), serde_json::json!({}))
            .await;
        (r.status().as_u16(), r.json().await.unwrap())
    }

    pub async fn metric(&self, name: &str) -> f64 {
        let text = reqwest::get(format!("{}/metrics", self.http()))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|r| r.strip_prefix(' '))
                    .map(|v| v.parse().unwrap())
            })
            .unwrap_or_else(|| panic!("metric {name} missing"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Every file under `root` (recursively), sorted.
pub fn all_files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Every Parquet file under `root` (recursively), sorted.
pub fn parquet_files(root: &Path) -> Vec<PathBuf> {
    let mut out = all_files(root);
    out.retain(|p| p.extension().is_some_and(|x| x == "parquet"));
    out
}

/// All rows of one endpoint of one tenant, read back from the Parquet files.
pub fn read_table(lake: &Path, tenant: &str, endpoint: &str) -> Vec<RecordBatch> {
    let root = lake
        .join(format!("tenant={tenant}"))
        .join(format!("endpoint={endpoint}"));
    parquet_files(&root)
        .into_iter()
        .flat_map(|p| {
            let f = std::fs::File::open(&p).unwrap();
            let reader = ParquetRecordBatchReaderBuilder::try_new(f)
                .unwrap()
                .build()
                .unwrap();
            reader.map(|b| b.unwrap()).collect::<Vec<_>>()
        })
        .collect()
}

/// The string values of column `name` across batches (None for nulls).
pub fn strings(batches: &[RecordBatch], name: &str) -> Vec<Option<String>> {
    batches
        .iter()
        .flat_map(|b| {
            let a = b
                .column_by_name(name)
                .unwrap_or_else(|| panic!("no column {name}"))
                .as_string::<i32>();
            (0..a.len())
                .map(|i| a.is_valid(i).then(|| a.value(i).to_string()))
                .collect::<Vec<_>>()
        })
        .collect()
}

pub fn kv(key: &str, v: Value) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(v) }),
        key_strindex: 0,
    }
}

pub fn sv(s: &str) -> Value {
    Value::StringValue(s.into())
}

/// A span with ids derived from `(trace, n)`.
pub fn span(trace: u64, n: u64, parent: Option<u64>) -> Span {
    let mut trace_id = vec![0u8; 8];
    trace_id.extend_from_slice(&(trace + 1).to_be_bytes());
    Span {
        trace_id,
        span_id: (n + 1).to_be_bytes().to_vec(),
        parent_span_id: parent
            .map(|p| (p + 1).to_be_bytes().to_vec())
            .unwrap_or_default(),
        name: format!("op-{n}"),
        kind: 1,
        start_time_unix_nano: 1_763_000_000_000_000_000 + n * 1000,
        end_time_unix_nano: 1_763_000_000_000_000_000 + n * 1000 + 500,
        attributes: vec![kv("n", Value::IntValue(n as i64))],
        ..Default::default()
    }
}

pub fn span_id_hex(n: u64) -> String {
    hex::encode((n + 1).to_be_bytes())
}

pub fn request(service: &str, spans: Vec<Span>) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![kv("service.name", sv(service))],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "test".into(),
                    version: "1.0".into(),
                    ..Default::default()
                }),
                spans,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}

/// A codec that sends and receives raw bytes, for malformed-input tests.
#[derive(Clone, Default)]
pub struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let v = src.copy_to_bytes(src.remaining()).to_vec();
        Ok(Some(v))
    }
}

/// Sends raw bytes as a gRPC unary request to `path`.
pub async fn raw_unary(
    channel: Channel,
    path: &'static str,
    body: Vec<u8>,
) -> Result<Vec<u8>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static(path);
    let mut req = tonic::Request::new(body);
    req.metadata_mut()
        .insert("x-api-key", ADMIN_KEY.parse().unwrap());
    grpc.unary(req, path, RawCodec)
        .await
        .map(|r| r.into_inner())
}

pub const TRACE_EXPORT: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

impl Server {
    /// Creates an API key with the admin key; returns the key material.
    pub async fn new_key(
        &self,
        tenant: &str,
        scopes: &[&str],
        endpoints: Option<&[&str]>,
    ) -> String {
        let mut body = serde_json::json!({"tenant": tenant, "name": "test", "scopes": scopes});
        if let Some(e) = endpoints {
            body["endpoints"] = serde_json::json!(e);
        }
        let r = self.post("/api/v1/apikeys", Some(ADMIN_KEY), body).await;
        assert_eq!(r.status(), 201);
        let v: serde_json::Value = r.json().await.unwrap();
        v["key"].as_str().unwrap().to_string()
    }

    /// `GET path` with `x-api-key: key`; status and JSON body.
    pub async fn get_json(&self, path: &str, key: Option<&str>) -> (u16, serde_json::Value) {
        let mut req = reqwest::Client::new().get(format!("{}{path}", self.http()));
        if let Some(k) = key {
            req = req.header("x-api-key", k);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(serde_json::Value::Null))
    }

    /// POSTs `body` to `path` with `x-api-key: key`; asserts the answer is
    /// `status` with an error message containing `message`.
    pub async fn assert_refused(
        &self,
        path: &str,
        key: Option<&str>,
        body: serde_json::Value,
        status: u16,
        message: &str,
    ) {
        let r = self.post(path, key, body.clone()).await;
        let got = r.status().as_u16();
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(got, status, "{body}: {v}");
        let error = v["error"].as_str().unwrap_or_default();
        assert!(error.contains(message), "{body}: {v}");
    }

    /// `POST /api/v1/query` (JSON result); status and body.
    pub async fn sql(&self, key: &str, sql: &str) -> (u16, serde_json::Value) {
        let r = self
            .post("/api/v1/query", Some(key), serde_json::json!({"sql": sql}))
            .await;
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(serde_json::Value::Null))
    }
}

/// `text` without ANSI escape sequences (the server colours its log).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The port of ` field=host:port` in a log line.
fn logged_port(line: &str, field: &str) -> u16 {
    let value = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix(field)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {field} in {line:?}"));
    value
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("bad {field} in {line:?}"))
}
