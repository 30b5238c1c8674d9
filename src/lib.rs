//! lakewriter: OTLP and DataRecord ingestion into a Parquet lakehouse.
//!
//! Stages (each module's doc states its contract):
//! [`ingest`] → [`wal`] (fsync'd, group commit) → [`memtable`] →
//! [`flush`] (Parquet, manifest, watermark). [`server`] wires them;
//! [`config`] holds every setting; [`error`] classifies failures for both
//! transports; [`metrics`] exports Prometheus text; [`http`] is the axum API.

pub mod auth;
pub mod cli;
pub mod config;
pub mod error;
pub mod flush;
pub mod http;
pub mod ingest;
pub mod loadgen;
pub mod memtable;
pub mod metrics;
pub mod query;
pub mod server;
pub mod wal;

#[cfg(test)]
mod test_alloc;

/// Generated code of `proto/storage/*.proto`.
pub mod proto {
    pub mod storage {
        tonic::include_proto!("storage");
    }
    pub mod ingestion {
        tonic::include_proto!("ingestion");
    }
}
