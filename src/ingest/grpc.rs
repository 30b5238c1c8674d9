//! gRPC services of the public port and the status rewrite they share.
//!
//! tonic reports an undecodable message as INTERNAL and an oversized one as
//! OUT_OF_RANGE; [`fix_status`] rewrites those (trailers-only) responses to
//! INVALID_ARGUMENT and RESOURCE_EXHAUSTED with a clear message, as OTLP and
//! our clients expect. It is applied as a layer to the whole gRPC server.

use std::sync::Arc;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tonic::{Request, Response, Status};

use super::{otlp_trace, Ingestor};
use crate::auth::{Auth, Credential, Principal};
use crate::error::ApiError;
use crate::proto::ingestion::auth_service_server::AuthService;
use crate::proto::ingestion::internal_auth_service_server::InternalAuthService;
use crate::proto::ingestion::{
    GetTokenRequest, GetTokenResponse, ValidateApiKeyRequest, ValidateApiKeyResponse,
};

/// The principal behind a gRPC request's metadata.
pub async fn principal(
    auth: &Auth,
    md: &tonic::metadata::MetadataMap,
) -> Result<Principal, ApiError> {
    auth.authenticate(Credential::from_grpc(md)).await
}

pub struct OtlpTraceService {
    ingestor: Arc<Ingestor>,
    auth: Arc<Auth>,
}

impl OtlpTraceService {
    pub fn new(ingestor: Arc<Ingestor>, auth: Arc<Auth>) -> Self {
        Self { ingestor, auth }
    }
}

#[tonic::async_trait]
impl TraceService for OtlpTraceService {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let p = principal(&self.auth, request.metadata()).await?;
        p.require_endpoint("write", otlp_trace::SPANS)?;
        let resp = self
            .ingestor
            .write_traces(&p.tenant, request.into_inner())
            .await?;
        Ok(Response::new(resp))
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
