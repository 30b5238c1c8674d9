//! Prometheus metrics, one registry for the process.
//!
//! Names are constants here (`lakewriter_<stage>_*`), histograms have explicit
//! buckets. `render()` produces the text exposition served at `GET /metrics`.
//! To add a metric: add a field, list it in `render`, and say what it means in
//! the README's metrics list.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::LazyLock;
use std::time::Duration;

#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
    pub fn add(&self, v: i64) {
        self.0.fetch_add(v, Ordering::Relaxed);
    }
}

/// A histogram with fixed upper bounds (seconds or counts).
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    count: AtomicU64,
    /// Sum in micro-units (µs for seconds histograms) to stay integral.
    sum_micros: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }
    pub fn observe(&self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|b| v <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add((v * 1e6) as u64, Ordering::Relaxed);
    }
    pub fn observe_duration(&self, d: Duration) {
        self.observe(d.as_secs_f64());
    }
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cumulative += c.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let count = self.count();
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    10.0,
];
const GROUP_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

pub struct Metrics {
    pub ingest_requests: Counter,
    pub ingest_rows: Counter,
    pub ingest_rejected: Counter,
    pub ingest_latency: Histogram,
    pub wal_appends: Counter,
    pub wal_fsyncs: Counter,
    pub wal_bytes: Counter,
    pub wal_fsync_seconds: Histogram,
    pub wal_group_size: Histogram,
    pub wal_write_errors: Counter,
    pub wal_failing: Gauge,
    pub memtable_bytes: Gauge,
    pub memtable_rows: Gauge,
    pub flush_files: Counter,
    pub flush_rows: Counter,
    pub flush_bytes: Counter,
    pub flush_seconds: Histogram,
    pub flush_errors: Counter,
    pub compactions: Counter,
    pub compacted_files: Counter,
    pub expired_files: Counter,
    pub expired_rows: Counter,
    pub lake_leases: Gauge,
    pub queries: Counter,
    pub query_errors: Counter,
    pub query_latency: Histogram,
    pub query_memory_bytes: Gauge,
    pub queries_running: Gauge,
    pub queries_busy: Counter,
    pub query_spills: Counter,
    pub query_spilled_bytes: Counter,
    pub duplicate_batches: Counter,
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    ingest_requests: Counter::default(),
    ingest_rows: Counter::default(),
    ingest_rejected: Counter::default(),
    ingest_latency: Histogram::new(LATENCY_BUCKETS),
    wal_appends: Counter::default(),
    wal_fsyncs: Counter::default(),
    wal_bytes: Counter::default(),
    wal_fsync_seconds: Histogram::new(LATENCY_BUCKETS),
    wal_group_size: Histogram::new(GROUP_BUCKETS),
    wal_write_errors: Counter::default(),
    wal_failing: Gauge::default(),
    memtable_bytes: Gauge::default(),
    memtable_rows: Gauge::default(),
    flush_files: Counter::default(),
    flush_rows: Counter::default(),
    flush_bytes: Counter::default(),
    flush_seconds: Histogram::new(LATENCY_BUCKETS),
    flush_errors: Counter::default(),
    compactions: Counter::default(),
    compacted_files: Counter::default(),
    expired_files: Counter::default(),
    expired_rows: Counter::default(),
    lake_leases: Gauge::default(),
    queries: Counter::default(),
    query_errors: Counter::default(),
    query_latency: Histogram::new(LATENCY_BUCKETS),
    query_memory_bytes: Gauge::default(),
    queries_running: Gauge::default(),
    queries_busy: Counter::default(),
    query_spills: Counter::default(),
    query_spilled_bytes: Counter::default(),
    duplicate_batches: Counter::default(),
});

fn counter(out: &mut String, name: &str, help: &str, v: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
    );
}

fn gauge(out: &mut String, name: &str, help: &str, v: i64) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
}

/// Prometheus text exposition of every metric.
pub fn render() -> String {
    let m = &*METRICS;
    let mut o = String::with_capacity(4096);
    counter(
        &mut o,
        "lakewriter_queries_total",
        "Queries answered (SQL and span endpoints).",
        m.queries.get(),
    );
    counter(
        &mut o,
        "lakewriter_query_errors_total",
        "Queries that failed (bad SQL, limits, timeouts).",
        m.query_errors.get(),
    );
    m.query_latency.render(
        &mut o,
        "lakewriter_query_seconds",
        "Query duration, planning to last row.",
    );
    gauge(
        &mut o,
        "lakewriter_lake_leases",
        "Lake snapshot leases held (POST /api/v1/lake/snapshot).",
        m.lake_leases.get(),
    );
    gauge(
        &mut o,
        "lakewriter_query_memory_bytes",
        "Bytes running queries and their results hold of --query-memory.",
        m.query_memory_bytes.get(),
    );
    gauge(
        &mut o,
        "lakewriter_queries_running",
        "Queries planned or running now.",
        m.queries_running.get(),
    );
    counter(
        &mut o,
        "lakewriter_queries_busy_total",
        "Queries refused as retryable because other queries held the query memory.",
        m.queries_busy.get(),
    );
    counter(
        &mut o,
        "lakewriter_query_spills_total",
        "Times query operators spilled (sorts, aggregations, repartitions past their part of --query-memory).",
        m.query_spills.get(),
    );
    counter(
        &mut o,
        "lakewriter_query_spilled_bytes_total",
        "Bytes of the spill files queries wrote (LZ4; within --query-spill-limit at any moment).",
        m.query_spilled_bytes.get(),
    );
    counter(
        &mut o,
        "lakewriter_duplicate_batches_total",
        "DataRecord batches answered from the idempotency index.",
        m.duplicate_batches.get(),
    );
    counter(
        &mut o,
        "lakewriter_ingest_requests_total",
        "Accepted write requests.",
        m.ingest_requests.get(),
    );
    counter(
        &mut o,
        "lakewriter_ingest_rows_total",
        "Rows (spans, records, points) accepted.",
        m.ingest_rows.get(),
    );
    counter(
        &mut o,
        "lakewriter_ingest_rejected_total",
        "Write requests rejected.",
        m.ingest_rejected.get(),
    );
    m.ingest_latency.render(
        &mut o,
        "lakewriter_ingest_ack_seconds",
        "Time from request decoded to ack.",
    );
    counter(
        &mut o,
        "lakewriter_wal_appends_total",
        "WAL entries appended.",
        m.wal_appends.get(),
    );
    counter(
        &mut o,
        "lakewriter_wal_fsyncs_total",
        "WAL fsyncs (group commits).",
        m.wal_fsyncs.get(),
    );
    counter(
        &mut o,
        "lakewriter_wal_bytes_total",
        "WAL bytes appended (entries as stored: payloads compressed).",
        m.wal_bytes.get(),
    );
    m.wal_fsync_seconds.render(
        &mut o,
        "lakewriter_wal_fsync_seconds",
        "Duration of one synced WAL write.",
    );
    m.wal_group_size
        .render(&mut o, "lakewriter_wal_group_size", "Requests per fsync.");
    counter(
        &mut o,
        "lakewriter_wal_write_errors_total",
        "Group commits that failed (their requests were refused with UNAVAILABLE / 503).",
        m.wal_write_errors.get(),
    );
    gauge(
        &mut o,
        "lakewriter_wal_failing",
        "1 while WAL writes fail (disk full, storage error), else 0.",
        m.wal_failing.get(),
    );
    gauge(
        &mut o,
        "lakewriter_memtable_bytes",
        "Arrow bytes held in memtables.",
        m.memtable_bytes.get(),
    );
    gauge(
        &mut o,
        "lakewriter_memtable_rows",
        "Rows held in memtables.",
        m.memtable_rows.get(),
    );
    counter(
        &mut o,
        "lakewriter_flush_files_total",
        "Parquet files published.",
        m.flush_files.get(),
    );
    counter(
        &mut o,
        "lakewriter_flush_rows_total",
        "Rows flushed to Parquet.",
        m.flush_rows.get(),
    );
    counter(
        &mut o,
        "lakewriter_flush_bytes_total",
        "Parquet bytes published.",
        m.flush_bytes.get(),
    );
    m.flush_seconds.render(
        &mut o,
        "lakewriter_flush_seconds",
        "Duration of one table flush.",
    );
    counter(
        &mut o,
        "lakewriter_flush_errors_total",
        "Failed flush, compaction and retention attempts.",
        m.flush_errors.get(),
    );
    counter(
        &mut o,
        "lakewriter_compactions_total",
        "Parquet files written by compaction (each merged from a partition's small files).",
        m.compactions.get(),
    );
    counter(
        &mut o,
        "lakewriter_compacted_files_total",
        "Small Parquet files merged away by compaction.",
        m.compacted_files.get(),
    );
    counter(
        &mut o,
        "lakewriter_retention_expired_files_total",
        "Parquet files deleted by lake retention (--lake-retention).",
        m.expired_files.get(),
    );
    counter(
        &mut o,
        "lakewriter_retention_expired_rows_total",
        "Rows deleted by lake retention: in expired files, or dropped at flush for an hour already expired.",
        m.expired_rows.get(),
    );
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let h = Histogram::new(&[1.0, 2.0]);
        h.observe(0.5);
        h.observe(1.5);
        h.observe(5.0);
        let mut s = String::new();
        h.render(&mut s, "x", "help");
        assert!(s.contains("x_bucket{le=\"1\"} 1"), "{s}");
        assert!(s.contains("x_bucket{le=\"2\"} 2"), "{s}");
        assert!(s.contains("x_bucket{le=\"+Inf\"} 3"), "{s}");
        assert!(s.contains("x_count 3"), "{s}");
    }
}
