//! The OTLP `TraceService` of the public port, served with a codec that keeps
//! the request's protobuf bytes next to the decoded message.
//!
//! The WAL entry of an export is its protobuf payload. tonic's generated
//! server hands over only the decoded message, which would have to be encoded
//! again (sizing and writing every span, ~7 % of a worker's CPU at 100 k
//! spans/s); this service decodes from the received bytes and keeps them.
//! Replay decodes the same bytes, so it sees exactly what was validated.

use std::convert::Infallible;
use std::marker::PhantomData;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message;
use tonic::body::Body;
use tonic::codec::{Codec, CompressionEncoding, DecodeBuf, Decoder};
use tonic::codegen::{Body as HttpBody, BoxFuture, Service, StdError};
use tonic::server::{NamedService, UnaryService};
use tonic::Status;
use tonic_prost::ProstEncoder;

use super::grpc::OtlpService;

const EXPORT: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// A decoded request and the protobuf bytes it was decoded from.
pub struct Received<M> {
    pub message: M,
    pub protobuf: Bytes,
}

/// Decodes `M` and keeps its bytes; encodes responses `R` with prost.
struct ReceivedCodec<M, R>(PhantomData<fn() -> (M, R)>);

impl<M, R> Codec for ReceivedCodec<M, R>
where
    M: Message + Default + Send + 'static,
    R: Message + Send + 'static,
{
    type Encode = R;
    type Decode = Received<M>;
    type Encoder = ProstEncoder<R>;
    type Decoder = ReceivedDecoder<M>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        ReceivedDecoder(PhantomData)
    }
}

struct ReceivedDecoder<M>(PhantomData<fn() -> M>);

impl<M: Message + Default> Decoder for ReceivedDecoder<M> {
    type Item = Received<M>;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Received<M>>, Status> {
        let protobuf = buf.copy_to_bytes(buf.remaining());
        // The same status tonic's prost decoder gives, so `fix_status` turns
        // it into INVALID_ARGUMENT with the decoder's detail.
        let message = M::decode(protobuf.clone()).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Some(Received { message, protobuf }))
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

impl UnaryService<Received<ExportTraceServiceRequest>> for Export {
    type Response = ExportTraceServiceResponse;
    type Future = BoxFuture<tonic::Response<ExportTraceServiceResponse>, Status>;

    fn call(
        &mut self,
        request: tonic::Request<Received<ExportTraceServiceRequest>>,
    ) -> Self::Future {
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
            let mut grpc = tonic::server::Grpc::new(ReceivedCodec(PhantomData))
                .accept_compressed(CompressionEncoding::Gzip)
                .accept_compressed(CompressionEncoding::Zstd)
                .max_decoding_message_size(max);
            Ok(grpc.unary(Export(otlp), req).await)
        })
    }
}
