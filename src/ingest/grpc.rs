//! gRPC services of the public port and the status rewrite they share.
//!
//! tonic reports an undecodable message (bad protobuf, a corrupt compressed
//! body, an invalid compression flag) as INTERNAL and an oversized one as
//! OUT_OF_RANGE; [`fix_status`] rewrites those (trailers-only) responses to
//! INVALID_ARGUMENT and RESOURCE_EXHAUSTED with a clear message, as OTLP and
//! our clients expect. It is applied as a layer to the whole gRPC server.

use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures::{Stream, StreamExt};

use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::LogsService;
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::MetricsService;
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use tonic::{Request, Response, Status, Streaming};

use super::{names, otlp_logs, otlp_trace, Ingestor};
use crate::auth::{Auth, Credential, Principal};
use crate::error::{ApiError, ErrorKind};
use crate::memtable::schema::is_reserved_endpoint;
use crate::proto::ingestion::auth_service_server::AuthService;
use crate::proto::ingestion::ingestion_service_server::IngestionService;
use crate::proto::ingestion::internal_auth_service_server::InternalAuthService;
use crate::proto::ingestion::{
    GetTokenRequest, GetTokenResponse, ValidateApiKeyRequest, ValidateApiKeyResponse,
};
use crate::proto::ingestion::{WriteBatchRequest, WriteBatchResponse};

/// The principal behind a gRPC request: the one [`Authenticated`] found
/// before the body was decoded, else from the request's metadata.
pub async fn principal<T>(auth: &Auth, request: &Request<T>) -> Result<Principal, ApiError> {
    match request.extensions().get::<Principal>() {
        Some(p) => Ok(p.clone()),
        None => {
            auth.authenticate(Credential::from_grpc(request.metadata()))
                .await
        }
    }
}

/// Authenticates a gRPC call from its headers before the wrapped service
/// reads and decodes its body, and hands the [`Principal`] on in the
/// request's extensions.
///
/// tonic decodes a unary request's whole message before the handler runs,
/// and prost builds a struct of ~100–200 bytes for every 2-byte empty
/// repeated message: a 16 MiB body (or a few KB of gzip) decodes into
/// gigabytes. Without a valid credential that now costs nothing.
#[derive(Clone)]
pub struct Authenticated<S> {
    inner: S,
    auth: Arc<Auth>,
    /// See [`Authenticated::admitting`].
    admit: Option<Arc<Ingestor>>,
}

impl<S> Authenticated<S> {
    pub fn new(inner: S, auth: Arc<Auth>) -> Self {
        Self {
            inner,
            auth,
            admit: None,
        }
    }

    /// For a write service: also refuses credentials without the `write`
    /// scope, and authenticated calls while memtables are over budget
    /// ([`Ingestor::admit`]), before their body is decoded: under overload a
    /// retrying OTLP exporter then costs a header check, not a decode. The
    /// credential comes first, so a bad one is UNAUTHENTICATED, never a
    /// RESOURCE_EXHAUSTED its client would retry forever. (DataRecord
    /// writes are admitted after their idempotency lookup instead, so a
    /// retried durable batch still gets its ack.)
    pub fn admitting(mut self, ingestor: Arc<Ingestor>) -> Self {
        self.admit = Some(ingestor);
        self
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for Authenticated<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tower::Service<http::Request<B>> for Authenticated<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        // The clone is not ready; the instance polled ready serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let (auth, admit) = (self.auth.clone(), self.admit.clone());
        Box::pin(async move {
            let checked = auth
                .authenticate(Credential::from_http(req.headers()))
                .await
                .and_then(|p| match admit {
                    // A write service: a credential that may not write is
                    // refused before the body is decoded too.
                    Some(i) => p.require("write").and_then(|()| i.admit()).map(|()| p),
                    None => Ok(p),
                });
            match checked {
                Ok(p) => {
                    req.extensions_mut().insert(p);
                    inner.call(req).await
                }
                Err(e) => Ok(Status::from(e).into_http()),
            }
        })
    }
}

/// The OTLP collector services (traces, logs, metrics) of the public port.
#[derive(Clone)]
pub struct OtlpService {
    ingestor: Arc<Ingestor>,
    auth: Arc<Auth>,
}

impl OtlpService {
    pub fn new(ingestor: Arc<Ingestor>, auth: Arc<Auth>) -> Self {
        Self { ingestor, auth }
    }
}

#[tonic::async_trait]
impl LogsService for OtlpService {
    async fn export(
        &self,
        request: Request<ExportLogsServiceRequest>,
    ) -> Result<Response<ExportLogsServiceResponse>, Status> {
        let p = principal(&self.auth, &request).await?;
        p.require_endpoint("write", otlp_logs::LOGS)?;
        let resp = self
            .ingestor
            .write_logs(&p.tenant, request.into_inner())
            .await?;
        Ok(Response::new(resp))
    }
}

#[tonic::async_trait]
impl MetricsService for OtlpService {
    async fn export(
        &self,
        request: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        let p = principal(&self.auth, &request).await?;
        p.require("write")?;
        let resp = self
            .ingestor
            .write_metrics(&p.tenant, request.into_inner(), |t| {
                p.require_endpoint("write", t)
            })
            .await?;
        Ok(Response::new(resp))
    }
}

impl OtlpService {
    /// `TraceService/Export`, served by [`super::otlp_grpc::Traces`] (the
    /// WAL keeps the received protobuf bytes).
    pub async fn export_traces(
        &self,
        request: Request<Bytes>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let p = principal(&self.auth, &request).await?;
        p.require_endpoint("write", otlp_trace::SPANS)?;
        let resp = self
            .ingestor
            .write_traces(&p.tenant, request.into_inner())
            .await?;
        Ok(Response::new(resp))
    }
}

/// `ingestion.IngestionService` (public port): DataRecord batches.
pub struct IngestionGrpc {
    ingestor: Arc<Ingestor>,
    auth: Arc<Auth>,
}

impl IngestionGrpc {
    pub fn new(ingestor: Arc<Ingestor>, auth: Arc<Auth>) -> Self {
        Self { ingestor, auth }
    }
}

/// Batches of one `WriteStream` processed concurrently (acks stay in order).
const STREAM_PIPELINE: usize = 8;

async fn write_batch(
    ingestor: &Arc<Ingestor>,
    p: &Principal,
    req: WriteBatchRequest,
) -> Result<WriteBatchResponse, Status> {
    names::validate("endpoint_id", &req.endpoint_id)?;
    if is_reserved_endpoint(&req.endpoint_id) {
        return Err(ApiError::invalid(format!(
            "endpoint_id {:?} is reserved for telemetry tables; choose another name",
            req.endpoint_id
        ))
        .into());
    }
    if !req.tenant_id.is_empty() && req.tenant_id != p.tenant {
        return Err(ApiError::new(
            ErrorKind::Forbidden,
            format!(
                "tenant_id {:?} does not match the credential's tenant {:?}",
                req.tenant_id.chars().take(80).collect::<String>(),
                p.tenant
            ),
        )
        .into());
    }
    p.require_endpoint("write", &req.endpoint_id)?;
    Ok(ingestor.write_records(&p.tenant, req).await?)
}

type AckStream = Pin<Box<dyn Stream<Item = Result<WriteBatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl IngestionService for IngestionGrpc {
    async fn write_batch(
        &self,
        request: Request<WriteBatchRequest>,
    ) -> Result<Response<WriteBatchResponse>, Status> {
        let p = principal(&self.auth, &request).await?;
        let ack = write_batch(&self.ingestor, &p, request.into_inner()).await?;
        Ok(Response::new(ack))
    }

    type WriteStreamStream = AckStream;

    /// One ack per request, in order. The first failure ends the stream with
    /// its status; up to [`STREAM_PIPELINE`] - 1 later batches may have been
    /// written already, so resend them with their `batch_id`s.
    ///
    /// The credential is checked again for every batch (through the short
    /// auth cache, as a unary call is): a key deleted, or a token expired,
    /// while the stream is open stops it as it would stop the next call.
    async fn write_stream(
        &self,
        request: Request<Streaming<WriteBatchRequest>>,
    ) -> Result<Response<AckStream>, Status> {
        principal(&self.auth, &request).await?;
        let credential = Credential::from_grpc(request.metadata());
        let (auth, ingestor) = (self.auth.clone(), self.ingestor.clone());
        let acks = request
            .into_inner()
            .map(move |item| {
                let (auth, ingestor) = (auth.clone(), ingestor.clone());
                let credential = credential.clone();
                async move {
                    let p = auth.authenticate(credential).await?;
                    write_batch(&ingestor, &p, item?).await
                }
            })
            .buffered(STREAM_PIPELINE)
            .scan(false, |failed, r| {
                let out = (!*failed).then(|| {
                    *failed = r.is_err();
                    r
                });
                futures::future::ready(out)
            });
        Ok(Response::new(Box::pin(acks)))
    }
}

/// `ingestion.AuthService` (public port): API key → JWT.
pub struct AuthGrpc(pub Arc<Auth>);

#[tonic::async_trait]
impl AuthService for AuthGrpc {
    async fn get_token(
        &self,
        request: Request<GetTokenRequest>,
    ) -> Result<Response<GetTokenResponse>, Status> {
        let (jwt, expires_at) = self.0.issue_token(&request.into_inner().api_key)?;
        Ok(Response::new(GetTokenResponse {
            jwt,
            expires_at: expires_at as i64,
        }))
    }
}

/// `ingestion.InternalAuthService` (internal port), as the Go ingestion service expects.
#[tonic::async_trait]
impl InternalAuthService for AuthGrpc {
    async fn validate_api_key(
        &self,
        request: Request<ValidateApiKeyRequest>,
    ) -> Result<Response<ValidateApiKeyResponse>, Status> {
        let is_valid = self.0.is_valid_key(&request.into_inner().api_key);
        Ok(Response::new(ValidateApiKeyResponse { is_valid }))
    }
}

const GRPC_STATUS: &str = "grpc-status";
const GRPC_MESSAGE: &str = "grpc-message";

/// The code and message one of tonic's request codec failures should have
/// had: the client sent bytes that are not a message (undecodable protobuf,
/// a corrupt gzip/zstd body, an unknown compression flag), or too many. None
/// for every other status.
fn precise_status(code: i32, msg: &str) -> Option<(tonic::Code, String)> {
    use tonic::Code;
    // tonic's request-side messages end with this.
    let msg = msg.strip_suffix(", while sending request").unwrap_or(msg);
    let invalid = |m: String| Some((Code::InvalidArgument, m));
    if code == Code::Internal as i32 {
        if msg.contains("decode Protobuf message") {
            let detail = msg
                .split_once(": ")
                .map(|x| x.1)
                .unwrap_or("invalid wire format");
            return invalid(format!("malformed protobuf request: {detail}"));
        }
        if let Some(detail) = msg.strip_prefix("Error decompressing: ") {
            return invalid(format!(
                "the request message could not be decompressed (corrupt, or not in its grpc-encoding): {detail}"
            ));
        }
        // A set flag without grpc-encoding stays INTERNAL, as the gRPC
        // compression spec requires.
        if let Some((_, detail)) = msg.split_once("invalid compression flag: ") {
            return invalid(format!(
                "malformed gRPC message frame: invalid compression flag {detail}"
            ));
        }
    }
    if code == Code::OutOfRange as i32 && msg.contains("message length too large") {
        return Some((
            Code::ResourceExhausted,
            format!("request too large: {msg} (see --max-request-size)"),
        ));
    }
    None
}

/// Rewrites tonic's codec failures into precise codes (see module doc).
pub fn fix_status<B>(mut resp: http::Response<B>) -> http::Response<B> {
    let h = resp.headers_mut();
    let code = h
        .get(GRPC_STATUS)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse::<i32>().ok());
    let msg = h
        .get(GRPC_MESSAGE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .replace("%20", " ");
    let Some((new_code, new_msg)) = code.and_then(|c| precise_status(c, &msg)) else {
        return resp;
    };
    h.insert(GRPC_STATUS, (new_code as i32).into());
    let clean: String = new_msg
        .chars()
        .filter(|c| c.is_ascii() && !c.is_ascii_control() && *c != '%')
        .collect();
    if let Ok(v) = http::HeaderValue::from_str(&clean) {
        h.insert(GRPC_MESSAGE, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;
    use tower::ServiceExt;

    const KEY: &str = "lw_test_key_0123456789abcdefghijklmnop";

    /// An auth whose only key is [`KEY`], and an ingestor whose memtables
    /// are over budget.
    fn over_budget(dir: &std::path::Path) -> (Arc<Auth>, Arc<Ingestor>) {
        use crate::memtable::{schema::Registry, Catalog, TableId};
        use arrow::array::{ArrayRef, Int64Array};
        let wal = Arc::new(crate::wal::Wal::open(dir, 8).unwrap());
        let cfg = crate::auth::AuthConfig {
            bootstrap_api_key: Some(KEY.into()),
            ..Default::default()
        };
        let auth = Arc::new(Auth::open(wal.db().clone(), &cfg, dir).unwrap());
        let catalog = Arc::new(Catalog::new(crate::config::FlushConfig {
            memtable_budget: 1,
            ..Default::default()
        }));
        let rows = arrow::record_batch::RecordBatch::try_from_iter([(
            "x",
            Arc::new(Int64Array::from(vec![1, 2])) as ArrayRef,
        )])
        .unwrap();
        catalog.insert(ulid::Ulid(1), vec![(TableId::new("t", "a"), rows)]);
        let schemas = Arc::new(Registry::open(wal.db().clone()).unwrap());
        let ingestor = Ingestor::new(
            wal,
            catalog,
            schemas,
            std::time::Duration::from_secs(60),
            Arc::new(tokio::sync::Notify::new()),
        );
        assert!(ingestor.admit().is_err());
        (auth, Arc::new(ingestor))
    }

    /// The grpc-status of a call through `svc` with `key` (none when the
    /// wrapped service answered), and the tenant that service saw.
    async fn call<S>(svc: Authenticated<S>, key: Option<&str>) -> (Option<String>, String)
    where
        S: tower::Service<
                http::Request<()>,
                Response = http::Response<tonic::body::Body>,
                Error = std::convert::Infallible,
            > + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
    {
        let mut req = http::Request::builder();
        if let Some(k) = key {
            req = req.header("x-api-key", k);
        }
        let resp = svc.oneshot(req.body(()).unwrap()).await.unwrap();
        let header = |name: &str| {
            let value = resp.headers().get(name)?.to_str().ok()?;
            Some(value.to_string())
        };
        (header(GRPC_STATUS), header("x-tenant").unwrap_or_default())
    }

    #[tokio::test]
    async fn credentials_are_checked_before_the_memory_budget() {
        let dir = tempfile::tempdir().unwrap();
        let (auth, ingestor) = over_budget(dir.path());
        // Answers with the tenant of the principal it was handed.
        let inner = tower::service_fn(|req: http::Request<()>| async move {
            let tenant = req.extensions().get::<Principal>().unwrap().tenant.clone();
            let mut resp = http::Response::new(tonic::body::Body::empty());
            resp.headers_mut()
                .insert("x-tenant", http::HeaderValue::from_str(&tenant).unwrap());
            Ok::<_, std::convert::Infallible>(resp)
        });
        let admitting = Authenticated::new(inner, auth.clone()).admitting(ingestor);
        let unauthenticated = Some((Code::Unauthenticated as i32).to_string());
        // A missing or bad key is refused for what it is, not with a
        // RESOURCE_EXHAUSTED its client would retry.
        for key in [None, Some("lw_not_a_key")] {
            assert_eq!(call(admitting.clone(), key).await.0, unauthenticated);
        }
        let exhausted = Some((Code::ResourceExhausted as i32).to_string());
        assert_eq!(call(admitting, Some(KEY)).await.0, exhausted);
        // Without admission, the call reaches the service with its principal.
        let plain = Authenticated::new(inner, auth);
        assert_eq!(call(plain, Some(KEY)).await, (None, "default".into()));
    }

    /// `status` as tonic sends it (trailers-only), after [`fix_status`].
    fn fixed(status: Status) -> (Code, String) {
        let resp = fix_status(status.into_http::<()>());
        let h = resp.headers();
        let code: i32 = h[GRPC_STATUS].to_str().unwrap().parse().unwrap();
        let msg = h.get(GRPC_MESSAGE).map_or("", |v| v.to_str().unwrap());
        (Code::from(code), msg.replace("%20", " "))
    }

    #[test]
    fn codec_failures_get_precise_codes() {
        // The messages tonic's decoder gives a server for a request.
        let (code, msg) = fixed(Status::internal(
            "Error decompressing: corrupt deflate stream, while sending request",
        ));
        assert_eq!(code, Code::InvalidArgument);
        assert_eq!(
            msg,
            "the request message could not be decompressed (corrupt, or not in its grpc-encoding): corrupt deflate stream"
        );
        let (code, msg) = fixed(Status::internal(
            "protocol error: received message with invalid compression flag: 7 (valid flags are 0 and 1), while sending request",
        ));
        assert_eq!(code, Code::InvalidArgument);
        assert_eq!(
            msg,
            "malformed gRPC message frame: invalid compression flag 7 (valid flags are 0 and 1)"
        );
        let (code, msg) = fixed(Status::internal(
            "failed to decode Protobuf message: invalid wire type value: 7",
        ));
        assert_eq!(code, Code::InvalidArgument);
        assert_eq!(
            msg,
            "malformed protobuf request: invalid wire type value: 7"
        );
        let (code, msg) = fixed(Status::out_of_range(
            "Error, decoded message length too large: found 9 bytes, the limit is: 4 bytes",
        ));
        assert_eq!(code, Code::ResourceExhausted);
        assert!(msg.starts_with("request too large: "), "{msg}");
        // Left as they are: a compressed flag without grpc-encoding (INTERNAL
        // by the gRPC spec), other failures, and every other code.
        for status in [
            Status::internal(
                "protocol error: received message with compressed-flag but no grpc-encoding was specified",
            ),
            Status::internal("something else failed"),
            Status::unavailable("Error decompressing: x"),
        ] {
            let code = status.code();
            let message = status.message().to_string();
            assert_eq!(fixed(status), (code, message));
        }
    }
}
