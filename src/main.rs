//! The `lakewriter` binary: parses the command line and calls the library.

use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use lakewriter::config::{Config, ServeArgs};

// The write path allocates many small, short-lived strings per span/record
// across threads; mimalloc's thread-local free lists beat glibc's arenas
// there (see BENCHMARKS.md, "Allocator").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

extern "C" {
    /// mimalloc's option setter (in the static library libmimalloc-sys links;
    /// its Rust bindings only declare it behind a feature we do not need).
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// `mi_option_purge_delay` in `mimalloc.h` of the v3 sources libmimalloc-sys
/// 0.1.49 builds (the version Cargo.lock pins).
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

/// Keeps freed memory instead of returning it to the OS (mimalloc v3 returns
/// it after 1 s). Requests and memtables allocate and free large buffers all
/// the time; returned pages were faulted in and zeroed by the kernel again
/// moments later (~15 % of server CPU at full load; 174 k vs 206 k spans/s,
/// see BENCHMARKS.md). Resident memory therefore stays at its peak, which the
/// memtable budget bounds. `MIMALLOC_PURGE_DELAY` in the environment wins.
fn tune_allocator() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets a plain integer option; mimalloc reads it atomically.
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
}

#[derive(Parser)]
#[command(
    name = "lakewriter",
    version,
    about = "Durable OTLP + DataRecord lakehouse writer"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (gRPC ingestion, HTTP API, flusher).
    Serve(Box<ServeArgs>),
    /// Manage API keys of a running server.
    #[command(subcommand)]
    Apikey(lakewriter::cli::ApiKeyCommand),
    /// Manage JWT signing keys of a running server.
    #[command(subcommand)]
    Keys(lakewriter::cli::KeysCommand),
    /// Run read-only SQL on a running server and print the result as a table.
    Query(lakewriter::cli::QueryArgs),
    /// Drive a running server with OTLP trace exports and report throughput/latency.
    Loadgen(lakewriter::loadgen::LoadgenArgs),
}

fn init_tracing(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .init();
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    init_tracing(&args.server.log);
    let config = Config::from_args(&args);
    let running = lakewriter::server::start(config)
        .await
        .context("starting lakewriter")?;
    shutdown_signal().await;
    tracing::info!("shutting down: draining requests, flushing memtables");
    running
        .shutdown(Duration::from_secs(10))
        .await
        .context("shutting down")?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    tune_allocator();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Serve(args) => runtime.block_on(serve(*args)),
        Command::Apikey(cmd) => runtime.block_on(lakewriter::cli::apikey(cmd)),
        Command::Keys(cmd) => runtime.block_on(lakewriter::cli::keys(cmd)),
        Command::Query(args) => runtime.block_on(lakewriter::cli::query(args)),
        Command::Loadgen(args) => runtime.block_on(async {
            let report = lakewriter::loadgen::run(args).await?;
            anyhow::ensure!(
                report.requests > 0,
                "no request succeeded: {:?}",
                report.errors
            );
            Ok(())
        }),
    }
}
