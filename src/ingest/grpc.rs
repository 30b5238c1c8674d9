//! gRPC services of the public port and the status rewrite they share.
//!
//! tonic reports an undecodable message as INTERNAL and an oversized one as
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
}

impl<S> Authenticated<S> {
    pub fn new(inner: S, auth: Arc<Auth>) -> Self {
        Self { inner, auth }
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
        let auth = self.auth.clone();
        Box::pin(async move {
            match auth
                .authenticate(Credential::from_http(req.headers()))
                .await
            {
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
    async fn write_stream(
        &self,
        request: Request<Streaming<WriteBatchRequest>>,
    ) -> Result<Response<AckStream>, Status> {
        let p = Arc::new(principal(&self.auth, &request).await?);
        let ingestor = self.ingestor.clone();
        let acks = request
            .into_inner()
            .map(move |item| {
                let (ingestor, p) = (ingestor.clone(), p.clone());
                async move { write_batch(&ingestor, &p, item?).await }
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
    let (new_code, new_msg) = match code {
        Some(c) if c == tonic::Code::Internal as i32 && msg.contains("decode Protobuf message") => {
            let detail = msg
                .split_once(": ")
                .map(|x| x.1)
                .unwrap_or("invalid wire format");
            (
                tonic::Code::InvalidArgument,
                format!("malformed protobuf request: {detail}"),
            )
        }
        Some(c)
            if c == tonic::Code::OutOfRange as i32 && msg.contains("message length too large") =>
        {
            (
                tonic::Code::ResourceExhausted,
                format!("request too large: {msg} (see --max-request-size)"),
            )
        }
        _ => return resp,
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
