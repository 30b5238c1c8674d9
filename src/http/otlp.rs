//! OTLP/HTTP: `POST /v1/traces`, `/v1/logs`, `/v1/metrics`.
//!
//! As the OTLP specification defines it:
//! - `Content-Type: application/x-protobuf` or `application/json` (the OTLP
//!   JSON encoding: lowerCamelCase keys, hex trace/span ids, 64-bit integers
//!   as strings or numbers; snake_case keys are accepted too); the response
//!   uses the request's encoding; anything else is `415`;
//! - `Content-Encoding: gzip` or `deflate` (or none); the body limit
//!   (`--max-request-size`) applies before *and* after decompression (`413`);
//! - success is `200` with an `Export*ServiceResponse` (with
//!   `partial_success` when items were rejected); failures carry a
//!   `google.rpc.Status` body (`code`, `message`): `400` for malformed or
//!   invalid data, `401`/`403` for credentials, `429`/`503` with
//!   `Retry-After` when the server is out of capacity for now.
//!
//! The ingest path after decoding is the same as for OTLP/gRPC.

use std::io::Read;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::AppState;
use crate::auth::Principal;
use crate::error::{rpc_status, ApiError, RETRY_DELAY_SECS, RETRY_INFO_TYPE_URL};
use crate::ingest::{budget, otlp_logs, otlp_trace, Ingestor};
use crate::metrics::METRICS;

const PROTOBUF: &str = "application/x-protobuf";
const JSON: &str = "application/json";

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/traces", post(traces))
        .route("/v1/logs", post(logs))
        .route("/v1/metrics", post(metrics))
}

#[derive(Clone, Copy, PartialEq)]
enum Encoding {
    Protobuf,
    Json,
}

impl Encoding {
    fn content_type(self) -> &'static str {
        match self {
            Self::Protobuf => PROTOBUF,
            Self::Json => JSON,
        }
    }
}

/// A failed export, answered in the request's encoding.
struct Failure {
    status: StatusCode,
    grpc: tonic::Code,
    message: String,
    retryable: bool,
    encoding: Encoding,
}

impl Failure {
    fn new(status: StatusCode, grpc: tonic::Code, message: String, encoding: Encoding) -> Self {
        Self {
            status,
            grpc,
            message,
            retryable: false,
            encoding,
        }
    }

    fn api(e: ApiError, encoding: Encoding) -> Self {
        Self {
            status: e.kind.http_status(),
            grpc: e.kind.grpc_code(),
            retryable: e.kind.retryable(),
            message: e.message,
            encoding,
        }
    }

    fn invalid(message: String, encoding: Encoding) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            tonic::Code::InvalidArgument,
            message,
            encoding,
        )
    }

    fn too_large(limit: usize, encoding: Encoding) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            tonic::Code::ResourceExhausted,
            format!("request body exceeds {limit} bytes (see --max-request-size)"),
            encoding,
        )
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        // `google.rpc.Status`, the error body of OTLP/HTTP (with a
        // `RetryInfo` detail when retryable, as on gRPC).
        let status = rpc_status(self.grpc, self.message, self.retryable);
        let body = match self.encoding {
            Encoding::Protobuf => prost::Message::encode_to_vec(&status),
            Encoding::Json => {
                // The proto3 JSON mapping: `Any` as `@type` plus the
                // message's fields, a `Duration` as a string of seconds.
                let mut json = serde_json::json!({"code": status.code, "message": status.message});
                if self.retryable {
                    json["details"] = serde_json::json!([{
                        "@type": RETRY_INFO_TYPE_URL,
                        "retryDelay": format!("{RETRY_DELAY_SECS}s"),
                    }]);
                }
                serde_json::to_vec(&json).unwrap_or_default()
            }
        };
        let mut resp = (
            self.status,
            [(header::CONTENT_TYPE, self.encoding.content_type())],
            body,
        )
            .into_response();
        if self.retryable {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_DELAY_SECS));
        }
        resp
    }
}

fn encoding_of(headers: &HeaderMap) -> Result<Encoding, Failure> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match mime.as_str() {
        PROTOBUF => Ok(Encoding::Protobuf),
        JSON => Ok(Encoding::Json),
        _ => Err(Failure::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            tonic::Code::InvalidArgument,
            format!("unsupported Content-Type {ct:?}: use {PROTOBUF} or {JSON}"),
            Encoding::Json,
        )),
    }
}

/// The request body, decompressed, within `limit` bytes both ways.
async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    enc: Encoding,
) -> Result<Bytes, Failure> {
    let raw = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| Failure::too_large(limit, enc))?;
    let ce = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("identity")
        .trim()
        .to_ascii_lowercase();
    match ce.as_str() {
        "" | "identity" => Ok(raw),
        // Every member of the stream: a gzip file may hold several, and
        // reading only the first would ack a request with items cut off.
        "gzip" => inflate(
            flate2::read::MultiGzDecoder::new(&raw[..]),
            "gzip",
            limit,
            enc,
        ),
        "deflate" => inflate(
            flate2::read::ZlibDecoder::new(&raw[..]),
            "deflate",
            limit,
            enc,
        ),
        other => Err(Failure::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            tonic::Code::InvalidArgument,
            format!("unsupported Content-Encoding {other:?}: use gzip, deflate or none"),
            enc,
        )),
    }
}

/// Decompresses at most `limit` bytes; more is `413`.
fn inflate(dec: impl Read, name: &str, limit: usize, enc: Encoding) -> Result<Bytes, Failure> {
    let mut out = Vec::new();
    dec.take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| Failure::invalid(format!("{name} body does not decompress: {e}"), enc))?;
    if out.len() > limit {
        return Err(Failure::too_large(limit, enc));
    }
    Ok(Bytes::from(out))
}

/// Decodes a request body after [`budget`] has bounded what decoding it
/// would allocate (too much is `413`).
fn decode<R>(bytes: &Bytes, enc: Encoding) -> Result<R, Failure>
where
    R: prost::Message + Default + DeserializeOwned + budget::Shaped,
{
    let refused = |e: budget::Error| match e {
        budget::Error::TooLarge => Failure::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            tonic::Code::ResourceExhausted,
            e.to_string(),
            enc,
        ),
        budget::Error::Malformed(m) => Failure::invalid(
            match enc {
                Encoding::Protobuf => format!("malformed protobuf request: {m}"),
                Encoding::Json => format!("malformed JSON request: {m}"),
            },
            enc,
        ),
    };
    match enc {
        Encoding::Protobuf => {
            budget::check::<R>(bytes).map_err(refused)?;
            R::decode(bytes.clone())
                .map_err(|e| Failure::invalid(format!("malformed protobuf request: {e}"), enc))
        }
        Encoding::Json => {
            let body = budget::json::check::<R>(bytes).map_err(refused)?;
            serde_json::from_slice(&body).map_err(|e| {
                let what = match e.classify() {
                    serde_json::error::Category::Data => "invalid OTLP/JSON request",
                    _ => "malformed JSON request",
                };
                Failure::invalid(format!("{what}: {e}"), enc)
            })
        }
    }
}

fn encode<T: prost::Message + Serialize>(resp: &T, enc: Encoding) -> Response {
    let body = match enc {
        Encoding::Protobuf => resp.encode_to_vec(),
        Encoding::Json => serde_json::to_vec(resp).unwrap_or_default(),
    };
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, enc.content_type())],
        body,
    )
        .into_response()
}

/// A request body as the ingest path takes it.
trait Payload: Sized {
    fn decode(bytes: Bytes, enc: Encoding) -> Result<Self, Failure>;
}

impl Payload for ExportLogsServiceRequest {
    fn decode(bytes: Bytes, enc: Encoding) -> Result<Self, Failure> {
        decode(&bytes, enc)
    }
}

impl Payload for ExportMetricsServiceRequest {
    fn decode(bytes: Bytes, enc: Encoding) -> Result<Self, Failure> {
        decode(&bytes, enc)
    }
}

/// Trace exports reach the ingest path as protobuf bytes, converted without
/// decoding them into messages; an OTLP/JSON body is decoded and encoded.
struct TraceBytes(Bytes);

impl Payload for TraceBytes {
    fn decode(bytes: Bytes, enc: Encoding) -> Result<Self, Failure> {
        match enc {
            Encoding::Protobuf => Ok(TraceBytes(bytes)),
            Encoding::Json => {
                let req: ExportTraceServiceRequest = decode(&bytes, enc)?;
                Ok(TraceBytes(Bytes::from(prost::Message::encode_to_vec(&req))))
            }
        }
    }
}

/// Authenticates, decodes and hands the request to `write`.
async fn export<R, T, F, Fut>(s: AppState, headers: HeaderMap, body: Body, write: F) -> Response
where
    R: Payload,
    T: prost::Message + Serialize,
    F: FnOnce(Arc<Ingestor>, Principal, R) -> Fut,
    Fut: std::future::Future<Output = Result<T, ApiError>>,
{
    let result = async {
        let enc = encoding_of(&headers)?;
        let p = super::principal(&s.auth, &headers)
            .await
            .map_err(|e| Failure::api(e, enc))?;
        // A credential that may not write, or a server over budget, is
        // refused before the body is read and decoded.
        p.require("write").map_err(|e| Failure::api(e, enc))?;
        s.ingestor.admit().map_err(|e| Failure::api(e, enc))?;
        let bytes = read_body(&headers, body, s.max_request_size, enc).await?;
        let req = R::decode(bytes, enc).inspect_err(|_| METRICS.ingest_rejected.inc())?;
        let resp = write(s.ingestor.clone(), p, req)
            .await
            .map_err(|e| Failure::api(e, enc))?;
        Ok::<_, Failure>(encode(&resp, enc))
    };
    result.await.unwrap_or_else(IntoResponse::into_response)
}

async fn traces(State(s): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    export(
        s,
        headers,
        body,
        |ing, p, TraceBytes(protobuf)| async move {
            p.require_endpoint("write", otlp_trace::SPANS)?;
            ing.write_traces(&p.tenant, protobuf).await
        },
    )
    .await
}

async fn logs(State(s): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    export(
        s,
        headers,
        body,
        |ing, p, req: ExportLogsServiceRequest| async move {
            p.require_endpoint("write", otlp_logs::LOGS)?;
            ing.write_logs(&p.tenant, req).await
        },
    )
    .await
}

async fn metrics(State(s): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    export(
        s,
        headers,
        body,
        |ing, p, req: ExportMetricsServiceRequest| async move {
            p.require("write")?;
            ing.write_metrics(&p.tenant, req, |t| p.require_endpoint("write", t))
                .await
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn otlp_json_decodes_hex_ids_and_string_integers() {
        let body = Bytes::from_static(
            br#"{"resourceSpans":[{"scopeSpans":[{"spans":[{
                "traceId":"5b8efff798038103d269b633813fc60c","spanId":"eee19b7ec3c1b174",
                "name":"x","kind":2,"startTimeUnixNano":"1544712660000000000",
                "endTimeUnixNano":1544712661000000000,
                "attributes":[{"key":"n","value":{"intValue":"7"}}]}]}]}]}"#,
        );
        let req: ExportTraceServiceRequest = decode(&body, Encoding::Json).ok().unwrap();
        let span = &req.resource_spans[0].scope_spans[0].spans[0];
        assert_eq!(
            hex::encode(&span.trace_id),
            "5b8efff798038103d269b633813fc60c"
        );
        assert_eq!(span.span_id.len(), 8);
        assert_eq!(span.start_time_unix_nano, 1_544_712_660_000_000_000);
        assert_eq!(span.end_time_unix_nano, 1_544_712_661_000_000_000);
        assert_eq!(span.kind, 2);
    }
}
