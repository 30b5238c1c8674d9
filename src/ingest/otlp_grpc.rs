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
//! [`super::budget`] has bounded what the decode may allocate; the
//! generated servers would decode first. One service, [`OtlpGrpc`], serves
//! each [`Signal`] with its codec.

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

use super::budget::CheckedCodec;
use super::grpc::OtlpService;

/// Receives raw (decompressed) message bytes; encodes responses `R` with prost.
pub struct BytesCodec<R>(PhantomData<fn() -> R>);

impl<R> Default for BytesCodec<R> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

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

pub struct BytesDecoder;

impl Decoder for BytesDecoder {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(buf.copy_to_bytes(buf.remaining())))
    }
}

/// An OTLP signal: its service, its `Export` method and how its requests
/// are read (see [`OtlpGrpc`]).
pub trait Signal: Send + Sync + 'static {
    const NAME: &'static str;
    const EXPORT: &'static str;
    type Request: Send + 'static;
    type Response: Send + 'static;
    type Codec: Codec<Encode = Self::Response, Decode = Self::Request> + Default + Send + 'static;
    fn export(
        otlp: OtlpService,
        req: tonic::Request<Self::Request>,
    ) -> BoxFuture<tonic::Response<Self::Response>, Status>;
}

/// Traces are read as their protobuf bytes (see the module docs).
pub struct Traces;

impl Signal for Traces {
    const NAME: &'static str = "opentelemetry.proto.collector.trace.v1.TraceService";
    const EXPORT: &'static str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
    type Request = Bytes;
    type Response = ExportTraceServiceResponse;
    type Codec = BytesCodec<Self::Response>;
    fn export(
        otlp: OtlpService,
        req: tonic::Request<Bytes>,
    ) -> BoxFuture<tonic::Response<Self::Response>, Status> {
        Box::pin(async move { otlp.export_traces(req).await })
    }
}

/// Logs and metrics decode with prost once [`super::budget`] has bounded
/// what the decode may allocate.
pub struct Logs;

impl Signal for Logs {
    const NAME: &'static str = "opentelemetry.proto.collector.logs.v1.LogsService";
    const EXPORT: &'static str = "/opentelemetry.proto.collector.logs.v1.LogsService/Export";
    type Request = ExportLogsServiceRequest;
    type Response = ExportLogsServiceResponse;
    type Codec = CheckedCodec<Self::Response, Self::Request>;
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
    type Codec = CheckedCodec<Self::Response, Self::Request>;
    fn export(
        otlp: OtlpService,
        req: tonic::Request<Self::Request>,
    ) -> BoxFuture<tonic::Response<Self::Response>, Status> {
        Box::pin(async move { MetricsService::export(&otlp, req).await })
    }
}

/// The service of an OTLP signal: its `Export` method, gzip and zstd
/// accepted, requests up to `max_request_size` decompressed.
pub struct OtlpGrpc<S> {
    otlp: OtlpService,
    max_request_size: usize,
    signal: PhantomData<fn() -> S>,
}

impl<S> Clone for OtlpGrpc<S> {
    fn clone(&self) -> Self {
        Self::new(self.otlp.clone(), self.max_request_size)
    }
}

impl<S> OtlpGrpc<S> {
    pub fn new(otlp: OtlpService, max_request_size: usize) -> Self {
        Self {
            otlp,
            max_request_size,
            signal: PhantomData,
        }
    }
}

impl<S: Signal> NamedService for OtlpGrpc<S> {
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

impl<S: Signal, B> Service<http::Request<B>> for OtlpGrpc<S>
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
        if req.uri().path() != S::EXPORT {
            let path = req.uri().path().to_string();
            return Box::pin(async move {
                Ok(Status::unimplemented(format!("no method {path}")).into_http())
            });
        }
        let method = SignalExport::<S>(self.otlp.clone(), PhantomData);
        let max = self.max_request_size;
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(S::Codec::default())
                .accept_compressed(CompressionEncoding::Gzip)
                .accept_compressed(CompressionEncoding::Zstd)
                .max_decoding_message_size(max);
            Ok(grpc.unary(method, req).await)
        })
    }
}
