//! Integration tests: the real server binary, real clients. One test binary
//! (each links DataFusion), modules by capability.

mod auth;
mod crash;
mod harness;
mod otlp;
mod query;
mod records;
mod write_path;
