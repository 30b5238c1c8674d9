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

/// Locks the machine code of the process (every executable file mapping:
/// the binary and its shared libraries) in memory, on a thread of its own so
/// the server starts at once. A page of code that was never run, or that the
/// kernel evicted while it sat unused, is read from disk on its next run; on a
/// disk busy with WAL and Parquet writes that read waited 10–200 ms, on the WAL
/// writer or a request's thread (BENCHMARKS.md, seventh round).
#[cfg(target_os = "linux")]
fn lock_code() {
    fn lock() -> std::io::Result<usize> {
        let maps = std::fs::read_to_string("/proc/self/maps")?;
        let mut locked = 0;
        for line in maps.lines() {
            // start-end perms offset dev inode [path]
            let fields: Vec<&str> = line.split_whitespace().collect();
            let executable = fields.get(1).is_some_and(|p| p.contains('x'));
            let file = fields.get(5).is_some_and(|p| p.starts_with('/'));
            if !(executable && file) {
                continue;
            }
            let range = fields[0].split_once('-').and_then(|(a, b)| {
                Some((
                    usize::from_str_radix(a, 16).ok()?,
                    usize::from_str_radix(b, 16).ok()?,
                ))
            });
            let Some((start, end)) = range else { continue };
            // SAFETY: locks pages of an existing mapping of this process; no
            // memory is read or written.
            if unsafe { libc::mlock(start as *const std::ffi::c_void, end - start) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            locked += end - start;
        }
        Ok(locked)
    }
    let spawned = std::thread::Builder::new()
        .name("lock-code".into())
        .spawn(|| {
            let started = std::time::Instant::now();
            match lock() {
                Ok(bytes) => tracing::info!(
                    bytes,
                    ms = started.elapsed().as_millis() as u64,
                    "machine code locked in memory"
                ),
                Err(e) => tracing::warn!(
                    error = %e,
                    "could not lock the machine code in memory (raise `ulimit -l` or grant \
                     CAP_IPC_LOCK, or pass --lock-code false): a request may wait for code \
                     to be read back from disk"
                ),
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "could not start the code-locking thread");
    }
}

#[cfg(not(target_os = "linux"))]
fn lock_code() {}

/// Faults in `bytes` of heap through the global allocator and gives it
/// back, before the server takes requests: with purging off
/// ([`tune_allocator`]) mimalloc keeps those pages and hands them out again,
/// so a request does not wait for the kernel to fault in and zero a fresh
/// page. On this project's VM (which reports freed memory to its host),
/// zeroing new pages took 16 % of both cores in a fresh server's first
/// seconds under load, and their p99 was 28–108 ms instead of 11–16 ms
/// (BENCHMARKS.md, eighth round). Pieces of 8 MiB stay below mimalloc's
/// arena chunk size (32 MiB); freed, each chunk is free as a whole again and
/// serves any size class.
///
/// At most a quarter of the memory the process may use ([`memory_room`]) is
/// touched, so a small container is not pushed toward its limit at start;
/// nothing is when `MIMALLOC_PURGE_DELAY` turns purging back on.
fn pretouch_memory(requested: u64) {
    const PIECE: usize = 8 << 20;
    const PAGE: usize = 4096;
    if let Some(delay) = std::env::var_os("MIMALLOC_PURGE_DELAY").filter(|d| d != "-1") {
        // The allocator would hand the pages back to the OS after the delay.
        tracing::info!(
            purge_delay = %delay.to_string_lossy(),
            "heap not pre-touched: MIMALLOC_PURGE_DELAY makes the allocator return freed memory"
        );
        return;
    }
    let room = memory_room();
    let bytes = room.map_or(requested, |room| requested.min(room / 4));
    if bytes < requested {
        tracing::info!(
            requested,
            bytes,
            room = room.unwrap_or_default(),
            "pre-touching less heap: at most a quarter of the memory available to the process"
        );
    }
    let started = std::time::Instant::now();
    let pieces = (bytes as usize).div_ceil(PIECE);
    let mut held: Vec<Vec<u8>> = Vec::with_capacity(pieces);
    for _ in 0..pieces {
        let mut piece = Vec::<u8>::with_capacity(PIECE);
        let ptr = piece.as_mut_ptr();
        for offset in (0..PIECE).step_by(PAGE) {
            // SAFETY: `offset` < capacity; writes a byte into the spare
            // capacity of our own allocation, which is never read.
            unsafe { ptr.add(offset).write_volatile(0) };
        }
        held.push(piece);
    }
    drop(held);
    tracing::info!(
        bytes,
        ms = started.elapsed().as_millis() as u64,
        "heap memory faulted in"
    );
}

/// The memory this process may still use: the smaller of the system's
/// `MemAvailable` and the limit of any memory cgroup it is in (v2
/// `memory.max`, v1 `memory.limit_in_bytes`, under its own cgroup path or at
/// the mount's root, as inside a container). `None` when nothing is known.
fn memory_room() -> Option<u64> {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let mut files = vec![
        "/sys/fs/cgroup/memory.max".to_string(),
        "/sys/fs/cgroup/memory/memory.limit_in_bytes".to_string(),
    ];
    if let Some(cgroups) = read("/proc/self/cgroup") {
        files.extend(cgroup_limit_files(&cgroups));
    }
    let limits = files
        .iter()
        .filter_map(|f| read(f).and_then(|t| cgroup_limit(&t)));
    let available = read("/proc/meminfo").and_then(|t| mem_available(&t));
    limits.chain(available).min()
}

/// The limit files of the memory cgroups named in `/proc/self/cgroup`.
fn cgroup_limit_files(proc_self_cgroup: &str) -> Vec<String> {
    proc_self_cgroup
        .lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            let path = path.trim_end_matches('/');
            if controllers.is_empty() {
                Some(format!("/sys/fs/cgroup{path}/memory.max"))
            } else if controllers.split(',').any(|c| c == "memory") {
                Some(format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes"))
            } else {
                None
            }
        })
        .collect()
}

/// A cgroup memory limit in bytes; `None` for "max" and v1's "unlimited"
/// (a page-rounded `i64::MAX`).
fn cgroup_limit(text: &str) -> Option<u64> {
    let limit: u64 = text.trim().parse().ok()?;
    (limit < 1 << 60).then_some(limit)
}

/// `MemAvailable` of `/proc/meminfo`, in bytes.
fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    init_tracing(&args.server.log);
    if args.server.lock_code {
        lock_code();
    }
    if args.server.pretouch_memory.0 > 0 {
        pretouch_memory(args.server.pretouch_memory.0);
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_files_and_limits_are_read_for_both_versions() {
        let v1 = "9:name=systemd:/\n4:memory:/process_api/d7a1\n1:cpu:/\n0::/\n";
        assert_eq!(
            cgroup_limit_files(v1),
            [
                "/sys/fs/cgroup/memory/process_api/d7a1/memory.limit_in_bytes",
                "/sys/fs/cgroup/memory.max",
            ]
        );
        assert_eq!(
            cgroup_limit_files("0::/system.slice/lw.service\n"),
            ["/sys/fs/cgroup/system.slice/lw.service/memory.max"]
        );
        assert_eq!(cgroup_limit("max\n"), None);
        assert_eq!(cgroup_limit("9223372036854771712\n"), None);
        assert_eq!(cgroup_limit("536870912\n"), Some(512 << 20));
        assert_eq!(cgroup_limit("garbage"), None);
        let meminfo = "MemTotal:       24684544 kB\nMemFree:        22781000 kB\nMemAvailable:   24045832 kB\n";
        assert_eq!(mem_available(meminfo), Some(24045832 * 1024));
        assert_eq!(mem_available("MemTotal: 1 kB\n"), None);
    }
}
