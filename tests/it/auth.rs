//! Authentication and tenancy over real gRPC and HTTP.

use std::time::{Duration, Instant};

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use lakewriter::proto::ingestion::auth_service_client::AuthServiceClient;
use lakewriter::proto::ingestion::internal_auth_service_client::InternalAuthServiceClient;
use lakewriter::proto::ingestion::{GetTokenRequest, ValidateApiKeyRequest};
use rsa::pkcs1::{EncodeRsaPrivateKey, EncodeRsaPublicKey};
use rsa::traits::PublicKeyParts;
use serde_json::json;
use tonic::Code;

use crate::harness::*;

async fn create_key(
    server: &Server,
    admin: &str,
    body: serde_json::Value,
) -> (reqwest::StatusCode, serde_json::Value) {
    let r = server.post("/api/v1/apikeys", Some(admin), body).await;
    let status = r.status();
    (status, r.json().await.unwrap_or(json!(null)))
}

async fn export_ok(client: &mut TraceClient, n: u64) -> Result<(), tonic::Status> {
    client
        .export(request("auth", vec![span(n, n, None)]))
        .await
        .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_lifecycle_tenancy_and_every_header_form() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]).await;
    let (status, created) = create_key(
        &server,
        ADMIN_KEY,
        json!({"tenant": "acme", "name": "ci", "scopes": ["write", "read"]}),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let key = created["key"].as_str().unwrap().to_string();
    let id = created["id"].as_str().unwrap().to_string();
    assert!(key.starts_with("lw_") && key.len() >= 46);
    assert!(created.get("hash").is_none());

    for (n, header) in [(1, "x-junjo-api-key"), (2, "x-api-key")] {
        let mut c = server.trace_client_with(header, Some(key.clone())).await;
        export_ok(&mut c, n).await.unwrap();
    }
    let mut c = server
        .trace_client_with("authorization", Some(format!("Bearer {key}")))
        .await;
    export_ok(&mut c, 5).await.unwrap();

    // API key → JWT over HTTP and gRPC, both usable as Bearer.
    let r = reqwest::Client::new()
        .post(format!("{}/api/v1/otel/token", server.http()))
        .header("X-API-Key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let tok: serde_json::Value = r.json().await.unwrap();
    let jwt = tok["token"].as_str().unwrap().to_string();
    assert!(tok["expires_at"].as_u64().unwrap() > 1_700_000_000);
    let mut c = server
        .trace_client_with("authorization", Some(format!("Bearer {jwt}")))
        .await;
    export_ok(&mut c, 3).await.unwrap();
    let mut auth = AuthServiceClient::new(server.channel().await);
    let grpc_tok = auth
        .get_token(GetTokenRequest {
            api_key: key.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut c = server
        .trace_client_with("authorization", Some(format!("Bearer {}", grpc_tok.jwt)))
        .await;
    export_ok(&mut c, 4).await.unwrap();
    let err = auth
        .get_token(GetTokenRequest {
            api_key: "lw_nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    // Claims are what the issue promised.
    let payload = jwt.split('.').nth(1).unwrap();
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["tenant"], "acme");
    assert_eq!(claims["sub"], id.as_str());
    for c in ["iss", "aud", "iat", "exp", "scopes"] {
        assert!(claims.get(c).is_some(), "claim {c} missing: {claims}");
    }

    // OTLP/HTTP takes Junjo's header too.
    let r = reqwest::Client::new()
        .post(format!("{}/v1/traces", server.http()))
        .header("x-junjo-api-key", &key)
        .header("content-type", "application/x-protobuf")
        .body(prost::Message::encode_to_vec(&request(
            "auth",
            vec![span(6, 6, None)],
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // The data landed under tenant=acme only.
    server.flush().await;
    assert_eq!(
        strings(&read_table(&server.lake(), "acme", "spans"), "span_id").len(),
        6
    );
    assert!(read_table(&server.lake(), "default", "spans").is_empty());

    // Listing never shows key material; the log never contains it either.
    let list: serde_json::Value = reqwest::Client::new()
        .get(format!("{}/api/v1/apikeys", server.http()))
        .header("x-api-key", ADMIN_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let text = list.to_string();
    assert!(text.contains(&id) && !text.contains(&key) && !text.contains(ADMIN_KEY));
    assert!(!server.log().contains(&key));

    // Revocation takes effect within seconds (API key and tokens issued for it).
    assert_eq!(server.delete_key(&id).await, 204);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut c = server
        .trace_client_with("x-api-key", Some(key.clone()))
        .await;
    loop {
        match export_ok(&mut c, 9).await {
            Err(e) if e.code() == Code::Unauthenticated => break,
            _ => assert!(Instant::now() < deadline, "deleted key still works"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut c = server
        .trace_client_with("authorization", Some(format!("Bearer {jwt}")))
        .await;
    assert_eq!(
        export_ok(&mut c, 9).await.unwrap_err().code(),
        Code::Unauthenticated
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scopes_endpoints_bad_credentials_and_bad_names() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]).await;
    let (_, reader) = create_key(
        &server,
        ADMIN_KEY,
        json!({"tenant": "acme", "scopes": ["read"]}),
    )
    .await;
    let (_, other_ep) = create_key(
        &server,
        ADMIN_KEY,
        json!({"tenant": "acme", "scopes": ["write"], "endpoints": ["orders"]}),
    )
    .await;
    for k in [&reader, &other_ep] {
        let mut c = server
            .trace_client_with("x-api-key", Some(k["key"].as_str().unwrap().into()))
            .await;
        let err = export_ok(&mut c, 1).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    }
    let cases: Vec<(&'static str, Option<String>)> = vec![
        ("x-api-key", None),
        ("x-api-key", Some("lw_not_a_real_key".into())),
        ("authorization", Some("Bearer garbage".into())),
        ("authorization", Some("Bearer a.b.c".into())),
        ("authorization", Some("Basic Zm9vOmJhcg==".into())),
    ];
    for (h, v) in cases {
        let mut c = server.trace_client_with(h, v.clone()).await;
        assert_eq!(
            export_ok(&mut c, 1).await.unwrap_err().code(),
            Code::Unauthenticated,
            "{h}: {v:?}"
        );
    }
    // Names that try path traversal or odd characters are refused.
    for tenant in ["../etc", "Acme", "a/b", "", "é", "x".repeat(64).as_str()] {
        let (status, body) = create_key(
            &server,
            ADMIN_KEY,
            json!({"tenant": tenant, "scopes": ["write"]}),
        )
        .await;
        assert_eq!(status, 400, "{tenant}: {body}");
    }
    let (status, _) = create_key(
        &server,
        ADMIN_KEY,
        json!({"tenant": "ok", "scopes": ["root"]}),
    )
    .await;
    assert_eq!(status, 400);
    // An allow-list limits a key; an admin key would reach past it (minting
    // an unlimited key), so the two do not go together.
    let (status, body) = create_key(
        &server,
        ADMIN_KEY,
        json!({"tenant": "acme", "scopes": ["admin"], "endpoints": ["orders"]}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("allow-list"),
        "{body}"
    );
    // Non-admin keys cannot manage keys; a tenant admin cannot touch other tenants.
    let (status, _) = create_key(
        &server,
        reader["key"].as_str().unwrap(),
        json!({"tenant": "acme", "scopes": ["read"]}),
    )
    .await;
    assert_eq!(status, 403);
    let (_, acme_admin) = create_key(
        &server,
        ADMIN_KEY,
        json!({"tenant": "acme", "scopes": ["admin"]}),
    )
    .await;
    let acme_admin = acme_admin["key"].as_str().unwrap();
    let (status, _) = create_key(
        &server,
        acme_admin,
        json!({"tenant": "beta", "scopes": ["write"]}),
    )
    .await;
    assert_eq!(status, 403);
    let (status, acme_writer) = create_key(
        &server,
        acme_admin,
        json!({"tenant": "acme", "scopes": ["write"]}),
    )
    .await;
    assert_eq!(status, 201);
    let r = server.post("/api/v1/admin/flush", None, json!({})).await;
    assert_eq!(r.status(), 401);
    let r = server
        .post(
            "/api/v1/admin/flush",
            Some(reader["key"].as_str().unwrap()),
            json!({}),
        )
        .await;
    assert_eq!(r.status(), 403);

    // A tenant's admin key flushes its own tenant's tables and hears of their
    // files only; the operator's key flushes the rest.
    export_ok(&mut server.trace_client().await, 40)
        .await
        .unwrap();
    let mut c = server
        .trace_client_with("x-api-key", acme_writer["key"].as_str().map(String::from))
        .await;
    export_ok(&mut c, 41).await.unwrap();
    let flushed = |r: serde_json::Value| -> Vec<String> {
        r["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["tenant"].as_str().unwrap().to_string())
            .collect()
    };
    let r = server
        .post("/api/v1/admin/flush", Some(acme_admin), json!({}))
        .await;
    assert_eq!(r.status(), 200);
    let tenants = flushed(r.json().await.unwrap());
    assert!(
        !tenants.is_empty() && tenants.iter().all(|t| t == "acme"),
        "{tenants:?}"
    );
    let r = server
        .post("/api/v1/admin/flush", Some(ADMIN_KEY), json!({}))
        .await;
    assert_eq!(r.status(), 200);
    assert!(flushed(r.json().await.unwrap()).contains(&"default".to_string()));

    // Internal ValidateApiKey, as the Go service calls it.
    let ch = tonic::transport::Channel::from_shared(server.internal_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut internal = InternalAuthServiceClient::new(ch);
    let ok = internal
        .validate_api_key(ValidateApiKeyRequest {
            api_key: ADMIN_KEY.into(),
        })
        .await
        .unwrap();
    assert!(ok.into_inner().is_valid);
    let bad = internal
        .validate_api_key(ValidateApiKeyRequest {
            api_key: "lw_x".into(),
        })
        .await
        .unwrap();
    assert!(!bad.into_inner().is_valid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_admin_key_is_written_once_with_mode_0600() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_unbootstrapped(dir.path(), &[]).await;
    let path = dir.path().join("admin-api-key");
    let key = std::fs::read_to_string(&path).unwrap().trim().to_string();
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(server.log().contains(&key), "printed once at creation");
    server.restart().await;
    assert_eq!(std::fs::read_to_string(&path).unwrap().trim(), key);
    assert_eq!(server.log().matches(&key).count(), 1, "printed only once");
    let r = server
        .post("/api/v1/admin/flush", Some(&key), json!({}))
        .await;
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_keeps_old_tokens_valid_across_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &[]).await;
    let old = server.token(ADMIN_KEY).await;
    let r = server
        .post("/api/v1/admin/keys/rotate", Some(ADMIN_KEY), json!({}))
        .await;
    assert_eq!(r.status(), 200);
    let jwks: serde_json::Value = reqwest::get(format!("{}/.well-known/jwks.json", server.http()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 2);
    let new = server.token(ADMIN_KEY).await;
    let kid = |t: &str| jsonwebtoken::decode_header(t).unwrap().kid.unwrap();
    assert_ne!(kid(&old), kid(&new));
    server.restart().await;
    for t in [&old, &new] {
        let mut c = server
            .trace_client_with("authorization", Some(format!("Bearer {t}")))
            .await;
        export_ok(&mut c, 1).await.unwrap();
    }
}

/// A JWKS endpoint of our own, for the remote-provider path.
async fn serve_jwks(
    jwks: serde_json::Value,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let h = hits.clone();
    let app = axum::Router::new().route(
        "/jwks",
        axum::routing::get(move || {
            let (jwks, h) = (jwks.clone(), h.clone());
            async move {
                h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                axum::Json(jwks)
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/jwks"), hits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_jwks_tokens_and_every_forgery_case() {
    let private = rsa::RsaPrivateKey::new(&mut rand08::rngs::OsRng, 2048).unwrap();
    let b64 = |b: Vec<u8>| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let (n, e) = (
        b64(private.n().to_bytes_be()),
        b64(private.e().to_bytes_be()),
    );
    let (url, hits) = serve_jwks(json!({"keys": [{"kty": "RSA", "kid": "idp-1", "alg": "RS256", "use": "sig", "n": n, "e": e}]})).await;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--jwks-url", &url]).await;
    let pem = private.to_pkcs1_pem(rsa::pkcs8::LineEnding::LF).unwrap();
    let enc = EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = |over: serde_json::Value| {
        let mut c = json!({"iss": "lakewriter", "aud": "lakewriter", "sub": "idp-user", "tenant": "beta",
                           "scopes": ["write"], "iat": now, "exp": now + 600});
        for (k, v) in over.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c
    };
    let sign = |kid: &str, c: serde_json::Value| {
        let mut h = Header::new(Algorithm::RS256);
        h.kid = Some(kid.into());
        jsonwebtoken::encode(&h, &c, &enc).unwrap()
    };
    let good = sign("idp-1", claims(json!({})));
    let mut c = server
        .trace_client_with("authorization", Some(format!("Bearer {good}")))
        .await;
    export_ok(&mut c, 1).await.unwrap();
    server.flush().await;
    assert_eq!(
        strings(&read_table(&server.lake(), "beta", "spans"), "span_id").len(),
        1
    );

    let hdr = |v: serde_json::Value| b64(v.to_string().into_bytes());
    let body = b64(claims(json!({})).to_string().into_bytes());
    let alg_none = format!("{}.{}.", hdr(json!({"alg": "none", "kid": "idp-1"})), body);
    let public_pem = rsa::RsaPublicKey::from(&private)
        .to_pkcs1_pem(rsa::pkcs8::LineEnding::LF)
        .unwrap();
    let hs256 = {
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("idp-1".into());
        jsonwebtoken::encode(
            &h,
            &claims(json!({})),
            &EncodingKey::from_secret(public_pem.as_bytes()),
        )
        .unwrap()
    };
    let forged = vec![
        ("alg none", alg_none),
        ("HS256 keyed with the public key", hs256),
        ("expired", sign("idp-1", claims(json!({"exp": now - 120})))),
        (
            "not yet valid",
            sign("idp-1", claims(json!({"nbf": now + 600}))),
        ),
        ("wrong iss", sign("idp-1", claims(json!({"iss": "evil"})))),
        ("wrong aud", sign("idp-1", claims(json!({"aud": "other"})))),
        ("no exp", sign("idp-1", claims(json!({"exp": null})))),
        ("unknown kid", sign("nope", claims(json!({})))),
        (
            "bad tenant",
            sign("idp-1", claims(json!({"tenant": "../x"}))),
        ),
        ("truncated", good[..good.len() - 10].to_string()),
        ("garbage", "eyJhbGciOi.zzz.yyy".into()),
    ];
    for (what, token) in forged {
        let mut c = server
            .trace_client_with("authorization", Some(format!("Bearer {token}")))
            .await;
        let err = export_ok(&mut c, 2).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{what}: {err:?}");
    }
    // A flood of random kids refetches the JWKS at most once per interval.
    let before = hits.load(std::sync::atomic::Ordering::SeqCst);
    for i in 0..20 {
        let t = sign(&format!("random-{i}"), claims(json!({})));
        let mut c = server
            .trace_client_with("authorization", Some(format!("Bearer {t}")))
            .await;
        let _ = export_ok(&mut c, 3).await;
    }
    assert!(
        hits.load(std::sync::atomic::Ordering::SeqCst) - before <= 2,
        "JWKS refetched per unknown kid"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_creates_lists_and_deletes_keys() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]).await;
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_lakewriter"))
            .args(args)
            .args(["--server", &server.http()])
            .env("LAKEWRITER_ADMIN_KEY", ADMIN_KEY)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, out, err) = cli(&[
        "apikey",
        "create",
        "--tenant",
        "clitenant",
        "--name",
        "from-cli",
        "--scopes",
        "write",
    ]);
    assert!(ok, "{err}");
    let created: serde_json::Value = serde_json::from_str(&out).unwrap();
    let (id, key) = (
        created["id"].as_str().unwrap().to_string(),
        created["key"].as_str().unwrap().to_string(),
    );
    let mut c = server
        .trace_client_with("x-junjo-api-key", Some(key.clone()))
        .await;
    export_ok(&mut c, 1).await.unwrap();
    let (ok, out, _) = cli(&["apikey", "list"]);
    assert!(
        ok && out.contains(&id) && out.contains("clitenant") && !out.contains(&key),
        "{out}"
    );
    let (ok, _, err) = cli(&[
        "apikey", "create", "--tenant", "../bad", "--scopes", "write",
    ]);
    assert!(!ok && err.contains("400"), "{err}");
    let (ok, out, err) = cli(&["keys", "rotate"]);
    assert!(ok && out.contains("new signing key"), "{err}");
    let (ok, _, err) = cli(&["apikey", "delete", &id]);
    assert!(ok, "{err}");
    let (ok, out, _) = cli(&["apikey", "list"]);
    assert!(ok && !out.contains(&id));
    // Without an admin key the CLI reports the server's refusal.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lakewriter"))
        .args([
            "apikey",
            "list",
            "--server",
            &server.http(),
            "--admin-key",
            "lw_wrong",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
}

/// `--no-auth`: no credential needed, every request is tenant `default`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_auth_mode_takes_requests_without_credentials_as_tenant_default() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--no-auth"]).await;
    let mut c = server.trace_client_with("x-api-key", None).await;
    export_ok(&mut c, 1).await.unwrap();
    let health: serde_json::Value = reqwest::get(format!("{}/health", server.http()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(health["memtable_rows"], 1, "{health}");
    assert!(health["memtable_bytes"].as_u64().unwrap() > 0, "{health}");
    let r = reqwest::Client::new()
        .post(format!("{}/api/v1/query", server.http()))
        .json(&json!({"sql": "SELECT service_name FROM spans"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["rows"], json!([["auth"]]));
    let r = server.post("/api/v1/admin/flush", None, json!({})).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        read_table(&server.lake(), "default", "spans")[0].num_rows(),
        1
    );
}

/// Peak resident memory of a process, from `/proc/<pid>/status`.
fn peak_rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status");
    kb * 1024
}

/// A request without a valid credential is refused before its body is
/// decoded, and one with a valid credential before it decodes into too
/// much, over OTLP/gRPC and OTLP/HTTP. This one is 14 MB of empty log
/// records (a 2-byte message each), ~14 KB gzip'd; decoded, prost makes a
/// ~200-byte struct of each: 1.4 GB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_refused_before_they_decode_into_gigabytes() {
    use tonic::codec::CompressionEncoding;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]).await;
    let ld = |field: u8, inner: &[u8]| {
        let mut out = vec![field << 3 | 2];
        let mut n = inner.len() as u64;
        while n >= 0x80 {
            out.push(n as u8 | 0x80);
            n >>= 7;
        }
        out.push(n as u8);
        out.extend_from_slice(inner);
        out
    };
    // ExportLogsServiceRequest.resource_logs[0].scope_logs[0].log_records × 7 M.
    let records = [0x12u8, 0x00].repeat(7_000_000);
    let body = ld(1, &ld(2, &records));
    let before = peak_rss_bytes(server.pid());
    for key in ["lw_not_a_key_of_this_server_000000", "", ADMIN_KEY] {
        let mut grpc = tonic::client::Grpc::new(server.channel().await)
            .send_compressed(CompressionEncoding::Gzip)
            .max_encoding_message_size(usize::MAX);
        grpc.ready().await.unwrap();
        let mut req = tonic::Request::new(body.clone());
        if !key.is_empty() {
            req.metadata_mut().insert("x-api-key", key.parse().unwrap());
        }
        let path = http::uri::PathAndQuery::from_static(
            "/opentelemetry.proto.collector.logs.v1.LogsService/Export",
        );
        let err = grpc.unary(req, path, RawCodec).await.unwrap_err();
        if key == ADMIN_KEY {
            assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
            assert!(
                err.message().contains("would decode into more than"),
                "{err}"
            );
        } else {
            assert_eq!(err.code(), Code::Unauthenticated, "{key:?}: {err}");
        }
    }
    // The same over OTLP/HTTP, as protobuf and as JSON (5.5 M empty
    // records in 16.5 MB, ~16 KB gzip'd: ~1.2 GB as structs).
    let json = format!(
        r#"{{"resourceLogs":[{{"scopeLogs":[{{"logRecords":[{}]}}]}}]}}"#,
        vec!["{}"; 5_500_000].join(",")
    );
    for (ct, body) in [
        ("application/x-protobuf", body),
        ("application/json", json.into_bytes()),
    ] {
        let body = crate::otlp::gzip(&body);
        let post =
            |key| crate::otlp::otlp_post(&server, "/v1/logs", ct, Some("gzip"), key, body.clone());
        let (st, _, _) = post(Some("lw_not_a_key_of_this_server_000000")).await;
        assert_eq!(st, 401, "{ct}");
        let (st, _, reply) = post(Some(ADMIN_KEY)).await;
        let reply = String::from_utf8_lossy(&reply);
        assert_eq!(st, 413, "{ct}: {reply}");
        assert!(
            reply.contains("would decode into more than"),
            "{ct}: {reply}"
        );
    }
    let after = peak_rss_bytes(server.pid());
    assert!(
        after < before + (512 << 20),
        "peak RSS went from {before} to {after} bytes"
    );
}
