//! The OTLP services of the public port.
//!
//! `TraceService` is served with a codec that hands over the request's
//! protobuf bytes instead of a decoded message. Traces are converted
//! straight from those bytes ([`super::wire`]) and the WAL entry is the same
//! bytes: tonic's generated server would decode every span into owned
//! strings (and the WAL would need them encoded again). Replay converts the
//! same bytes, so it sees exactly what was validated.
//!
//! `LogsService` and `MetricsService` decode with prost, after
//! [`super::budget`] has bounded what the decode may allocate
//! ([`CheckedOtlp`]); the generated servers would decode first.

use std::convert::Infallible;
use std::marker::PhantomData;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::LogsService;
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::MetricsService;
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use prost::Message;
use tonic::body::Body;
use tonic::codec::{Codec, CompressionEncoding, DecodeBuf, Decoder};
use tonic::codegen::{Body as HttpBody, BoxFuture, Service, StdError};
use tonic::server::{NamedService, UnaryService};
use tonic::Status;
use tonic_prost::ProstEncoder;

use super::budget::{CheckedCodec, Shaped};
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
        let (otlp, max) = (self.otlp.clone(), self.max_request_size);
        serve(EXPORT, req, BytesCodec(PhantomData), Export(otlp), max)
    }
}

/// Serves `req` with one unary method at `path` (gzip and zstd accepted,
/// requests up to `max` decoded).
fn serve<B, C, S>(
    path: &'static str,
    req: http::Request<B>,
    codec: C,
    method: S,
    max: usize,
) -> BoxFuture<http::Response<Body>, Infallible>
where
    B: HttpBody + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
    C: Codec + Send + 'static,
    S: UnaryService<C::Decode, Response = C::Encode> + Send + 'static,
    S::Future: Send,
{
    if req.uri().path() != path {
        let path = req.uri().path().to_string();
        return Box::pin(async move {
            Ok(Status::unimplemented(format!("no method {path}")).into_http())
        });
    }
    Box::pin(async move {
        let mut grpc = tonic::server::Grpc::new(codec)
            .accept_compressed(CompressionEncoding::Gzip)
            .accept_compressed(CompressionEncoding::Zstd)
            .max_decoding_message_size(max);
        Ok(grpc.unary(method, req).await)
    })
}

/// An OTLP signal decoded with prost (see [`CheckedOtlp`]).
pub trait Signal: Send + Sync + 'static {
    const NAME: &'static str;
    const EXPORT: &'static str;
    type Request: Message + Default + Shaped + Send + 'static;
    type Response: Message + Send + 'static;
    fn export(
        otlp: OtlpService,
        req: tonic::Request<Self::Request>,
    ) -> BoxFuture<tonic::Response<Self::Response>, Status>;
}

pub struct Logs;

impl Signal for Logs {
    const NAME: &'static str = "opentelemetry.proto.collector.logs.v1.LogsService";
    const EXPORT: &'static str = "/opentelemetry.proto.collector.logs.v1.LogsService/Export";
    type Request = ExportLogsServiceRequest;
    type Response = ExportLogsServiceResponse;
    fn export(
        otlp: OtlpService,
        req: tonic::Request<Self::Request>,
    ) -> BoxFuture<tonic::Response<Self::Response>, Status> {
        Box::pin(async move { LogsService::export(&otlp, req).await })
    }
}

pub struct Metrics;

impl Signal for Metrics {
    const NAME: &'static str = "opentelemetry.proto.collector.metrics.v1.MetricsService";
    const EXPORT: &'static str = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export";
    type Request = ExportMetricsServiceRequest;
    type Response = ExportMetricsServiceResponse;
    fn export(
        otlp: OtlpService,
        req: tonic::Request<Self::Request>,
    ) -> BoxFuture<tonic::Response<Self::Response>, Status> {
        Box::pin(async move { MetricsService::export(&otlp, req).await })
    }
}

/// The `Export` method of an OTLP signal, with the request's decoded size
/// bounded before prost decodes it ([`super::budget`]).
pub struct CheckedOtlp<S> {
    otlp: OtlpService,
    max_request_size: usize,
    signal: PhantomData<fn() -> S>,
}

impl<S> Clone for CheckedOtlp<S> {
    fn clone(&self) -> Self {
        Self::new(self.otlp.clone(), self.max_request_size)
    }
}

impl<S> CheckedOtlp<S> {
    pub fn new(otlp: OtlpService, max_request_size: usize) -> Self {
        Self {
            otlp,
            max_request_size,
            signal: PhantomData,
        }
    }
}

impl<S: Signal> NamedService for CheckedOtlp<S> {
    const NAME: &'static str = S::NAME;
}

struct SignalExport<S>(OtlpService, PhantomData<fn() -> S>);

impl<S: Signal> UnaryService<S::Request> for SignalExport<S> {
    type Response = S::Response;
    type Future = BoxFuture<tonic::Response<S::Response>, Status>;

    fn call(&mut self, request: tonic::Request<S::Request>) -> Self::Future {
        S::export(self.0.clone(), request)
    }
}

impl<S: Signal, B> Service<http::Request<B>> for CheckedOtlp<S>
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
        let method = SignalExport::<S>(self.otlp.clone(), PhantomData);
        let codec = CheckedCodec::<S::Response, S::Request>::default();
        serve(S::EXPORT, req, codec, method, self.max_request_size)
    }
}
