//! One error classification for both transports.
//!
//! Every module has its own `thiserror` enum whose variants carry the facts;
//! each implements [`Classify`], which says what kind of failure it is. The
//! transports convert through [`ApiError`]: [`ApiError::grpc_code`] for tonic
//! and [`ApiError::http_status`] for axum, so a failure gets the same meaning
//! on gRPC and HTTP. Clients get `client_message()`; the log gets `Debug`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// What kind of failure an error is, independent of transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    InvalidInput,
    Unauthenticated,
    Forbidden,
    NotFound,
    /// Temporarily out of capacity (memtable budget): retry later.
    ResourceExhausted,
    /// This request is too big for a configured limit (query memory, result
    /// rows): retrying the same request will fail again.
    LimitExceeded,
    Timeout,
    OutOfRange,
    Unavailable,
    Internal,
}

impl ErrorKind {
    pub fn grpc_code(self) -> tonic::Code {
        match self {
            Self::InvalidInput => tonic::Code::InvalidArgument,
            Self::Unauthenticated => tonic::Code::Unauthenticated,
            Self::Forbidden => tonic::Code::PermissionDenied,
            Self::NotFound => tonic::Code::NotFound,
            Self::ResourceExhausted | Self::LimitExceeded => tonic::Code::ResourceExhausted,
            Self::Timeout => tonic::Code::DeadlineExceeded,
            Self::OutOfRange => tonic::Code::OutOfRange,
            Self::Unavailable => tonic::Code::Unavailable,
            Self::Internal => tonic::Code::Internal,
        }
    }

    pub fn http_status(self) -> StatusCode {
        match self {
            Self::InvalidInput | Self::OutOfRange => StatusCode::BAD_REQUEST,
            Self::Unauthenticated => StatusCode::UNAUTHORIZED,
            Self::Forbidden => StatusCode::FORBIDDEN,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Self::LimitExceeded => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Whether the same request may succeed if retried later.
    pub fn retryable(self) -> bool {
        matches!(self, Self::ResourceExhausted | Self::Unavailable)
    }
}

/// Implemented by every module error.
pub trait Classify: std::fmt::Display + std::fmt::Debug {
    fn kind(&self) -> ErrorKind;
    /// The text a client sees. Internal failures hide their detail.
    fn client_message(&self) -> String {
        match self.kind() {
            ErrorKind::Internal => "internal error (see server log)".to_string(),
            _ => self.to_string(),
        }
    }
}

/// A classified error on its way to a client.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidInput, message)
    }

    pub fn from_err<E: Classify>(err: E) -> Self {
        let kind = err.kind();
        if kind == ErrorKind::Internal {
            tracing::error!(error = ?err, "internal error");
        }
        Self {
            kind,
            message: err.client_message(),
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// gRPC metadata key set to `true` on statuses worth retrying with the same
/// request (the code alone is ambiguous: RESOURCE_EXHAUSTED is both "memtables
/// full, retry" and "request too large, don't").
pub const RETRYABLE_METADATA: &str = "lw-retryable";

/// How long a client should wait before retrying a refusal worth retrying
/// (HTTP `Retry-After`, gRPC `RetryInfo.retry_delay`): about the time a
/// flush takes to give memtable memory back.
pub const RETRY_DELAY_SECS: u64 = 1;

/// The `google.rpc` messages of error answers (the subset of
/// `google/rpc/status.proto` and `error_details.proto` used here).
pub(crate) mod rpc {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Status {
        #[prost(int32, tag = "1")]
        pub code: i32,
        #[prost(string, tag = "2")]
        pub message: String,
        #[prost(message, repeated, tag = "3")]
        pub details: Vec<Any>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Any {
        #[prost(string, tag = "1")]
        pub type_url: String,
        #[prost(bytes = "vec", tag = "2")]
        pub value: Vec<u8>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RetryInfo {
        #[prost(message, optional, tag = "1")]
        pub retry_delay: Option<Duration>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Duration {
        #[prost(int64, tag = "1")]
        pub seconds: i64,
        #[prost(int32, tag = "2")]
        pub nanos: i32,
    }
}

/// The `Any.type_url` of a `google.rpc.RetryInfo` detail (protobuf and JSON).
pub(crate) const RETRY_INFO_TYPE_URL: &str = "type.googleapis.com/google.rpc.RetryInfo";

/// `google.rpc.Status` for an error answer; a retryable one carries a
/// `google.rpc.RetryInfo` with [`RETRY_DELAY_SECS`].
pub(crate) fn rpc_status(code: tonic::Code, message: String, retryable: bool) -> rpc::Status {
    let details = retryable.then(|| rpc::Any {
        type_url: RETRY_INFO_TYPE_URL.into(),
        value: RETRY_INFO.clone(),
    });
    rpc::Status {
        code: code as i32,
        message,
        details: details.into_iter().collect(),
    }
}

/// The encoded `google.rpc.RetryInfo` with [`RETRY_DELAY_SECS`].
static RETRY_INFO: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
    prost::Message::encode_to_vec(&rpc::RetryInfo {
        retry_delay: Some(rpc::Duration {
            seconds: RETRY_DELAY_SECS as i64,
            nanos: 0,
        }),
    })
});

/// A retryable refusal says when to retry the way OTLP clients look for it:
/// a `google.rpc.RetryInfo` in the status details (`grpc-status-details-bin`).
/// The OTLP specification has clients treat RESOURCE_EXHAUSTED without one as
/// final (the Go SDK and the Collector's exporter drop the data); the Python
/// SDK reads the same message from `google.rpc.retryinfo-bin` metadata, so it
/// is sent there too.
impl From<ApiError> for tonic::Status {
    fn from(err: ApiError) -> Self {
        use prost::Message;
        use tonic::metadata::{MetadataMap, MetadataValue};
        let code = err.kind.grpc_code();
        if !err.kind.retryable() {
            return tonic::Status::new(code, err.message);
        }
        let details = rpc_status(code, err.message.clone(), true).encode_to_vec();
        let mut metadata = MetadataMap::new();
        metadata.insert(RETRYABLE_METADATA, MetadataValue::from_static("true"));
        metadata.insert_bin(
            "google.rpc.retryinfo-bin",
            MetadataValue::from_bytes(&RETRY_INFO),
        );
        tonic::Status::with_details_and_metadata(code, err.message, details.into(), metadata)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.kind.http_status();
        let body = serde_json::json!({
            "error": self.message,
            "code": format!("{:?}", self.kind.grpc_code()),
            "retryable": self.kind.retryable(),
        });
        let mut resp = (status, axum::Json(body)).into_response();
        if self.kind.retryable() {
            resp.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(RETRY_DELAY_SECS),
            );
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_map_consistently() {
        assert_eq!(
            ErrorKind::InvalidInput.grpc_code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            ErrorKind::InvalidInput.http_status(),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            ErrorKind::ResourceExhausted.http_status(),
            StatusCode::TOO_MANY_REQUESTS
        );
        assert!(ErrorKind::Unavailable.retryable());
        assert!(!ErrorKind::Forbidden.retryable());
    }
}
