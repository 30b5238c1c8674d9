//! The OTLP `TraceService` of the public port, served with a codec that hands
//! over the request's protobuf bytes instead of a decoded message.
//!
//! Traces are converted straight from those bytes ([`super::wire`]) and the
//! WAL entry is the same bytes: tonic's generated server would decode every
//! span into owned strings (and the WAL would need them encoded again).
//! Replay converts the same bytes, so it sees exactly what was validated.

use std::convert::Infallible;
use std::marker::PhantomData;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use prost::Message;
use tonic::body::Body;
use tonic::codec::{Codec, CompressionEncoding, DecodeBuf, Decoder};
use tonic::codegen::{Body as HttpBody, BoxFuture, Service, StdError};
use tonic::server::{NamedService, UnaryService};
use tonic::Status;
use tonic_prost::ProstEncoder;

use super::grpc::OtlpService;

const EXPORT: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// Receives raw (decompressed) message bytes; encodes responses `R` with prost.
struct BytesCodec<R>(PhantomData<fn() -> R>);

impl<R: Message + Send + 'static> Codec for BytesCodec<R> {
    type Encode = R;
    type Decode = Bytes;
    type Encoder = ProstEncoder<R>;
    type Decoder = BytesDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        BytesDecoder
    }
}

struct BytesDecoder;

impl Decoder for BytesDecoder {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(buf.copy_to_bytes(buf.remaining())))
    }
}

/// `opentelemetry.proto.collector.trace.v1.TraceService` (gzip and zstd
/// accepted, requests up to `max_request_size` decoded).
#[derive(Clone)]
pub struct TraceGrpc {
    otlp: OtlpService,
    max_request_size: usize,
}

impl TraceGrpc {
    pub fn new(otlp: OtlpService, max_request_size: usize) -> Self {
        Self {
            otlp,
            max_request_size,
        }
    }
}

impl NamedService for TraceGrpc {
    const NAME: &'static str = "opentelemetry.proto.collector.trace.v1.TraceService";
}

struct Export(OtlpService);

impl UnaryService<Bytes> for Export {
    type Response = ExportTraceServiceResponse;
    type Future = BoxFuture<tonic::Response<ExportTraceServiceResponse>, Status>;

    fn call(&mut self, request: tonic::Request<Bytes>) -> Self::Future {
        let otlp = self.0.clone();
        Box::pin(async move { otlp.export_traces(request).await })
    }
}

impl<B> Service<http::Request<B>> for TraceGrpc
where
    B: HttpBody + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<http::Response<Body>, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != EXPORT {
            let path = req.uri().path().to_string();
            return Box::pin(async move {
                Ok(Status::unimplemented(format!("no method {path}")).into_http())
            });
        }
        let (otlp, max) = (self.otlp.clone(), self.max_request_size);
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(BytesCodec(PhantomData))
                .accept_compressed(CompressionEncoding::Gzip)
                .accept_compressed(CompressionEncoding::Zstd)
                .max_decoding_message_size(max);
            Ok(grpc.unary(Export(otlp), req).await)
        })
    }
}
