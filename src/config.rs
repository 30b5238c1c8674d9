//! Every setting of the server.
//!
//! Flags are clap derive with a `LAKEWRITER_*` environment twin on every flag,
//! grouped by stage with `#[command(flatten)]`, then converted into the plain
//! [`Config`] structs the library uses. [`Config::validate`] fails loudly at
//! start. [`Config::for_test`] builds a config for tests (ports 0 are allowed).
//! When you add a setting: add the flag here, the field in the plain struct,
//! the README configuration table, and a default that runs locally.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::Args;

pub use crate::auth::AuthConfig;

/// A byte size parsed from `512MiB`, `64MB`, `1048576`, `4k` …
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split = s
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let num: f64 = num
            .parse()
            .map_err(|_| format!("invalid byte size {s:?}"))?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1_000,
            "kib" => 1 << 10,
            "m" | "mb" => 1_000_000,
            "mib" => 1 << 20,
            "g" | "gb" => 1_000_000_000,
            "gib" => 1 << 30,
            other => return Err(format!("unknown byte unit {other:?} in {s:?}")),
        };
        Ok(ByteSize((num * mult as f64) as u64))
    }
}

impl std::fmt::Display for ByteSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}B", self.0)
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

/// Listening addresses and locations.
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// Data directory: `wal/` (RocksDB), `lake/` (Parquet, unless --lake-url), keys.
    #[arg(long, env = "LAKEWRITER_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// Public gRPC: OTLP collector services, DataRecord ingestion, AuthService.
    #[arg(long, env = "LAKEWRITER_GRPC_ADDR", default_value = "0.0.0.0:50051")]
    pub grpc_addr: SocketAddr,
    /// Internal gRPC: ReadSpans, ValidateApiKey, health.
    #[arg(
        long,
        env = "LAKEWRITER_INTERNAL_GRPC_ADDR",
        default_value = "127.0.0.1:50052"
    )]
    pub internal_grpc_addr: SocketAddr,
    /// HTTP: health, metrics, admin, queries, OTLP/HTTP.
    #[arg(long, env = "LAKEWRITER_HTTP_ADDR", default_value = "0.0.0.0:1323")]
    pub http_addr: SocketAddr,
    /// Where Parquet goes: `file:///abs/path` or `s3://bucket/prefix` (S3 settings
    /// from `AWS_*` variables). Default `file://<data-dir>/lake`.
    #[arg(long, env = "LAKEWRITER_LAKE_URL")]
    pub lake_url: Option<String>,
    /// Log filter, `RUST_LOG` syntax (e.g. `info,lakewriter=debug`).
    #[arg(long, env = "LAKEWRITER_LOG", default_value = "info")]
    pub log: String,
    /// Lock the server's machine code in memory (Linux `mlock`), so that no
    /// request waits for the kernel to read evicted code back from a busy
    /// disk. Costs resident memory the size of the code (~110 MB).
    #[arg(long, env = "LAKEWRITER_LOCK_CODE", default_value_t = true, action = clap::ArgAction::Set)]
    pub lock_code: bool,
    /// Heap memory to fault in at start, before the server takes requests
    /// (`0` turns it off). The first touch of a page costs a page fault and
    /// zeroing (in a VM that returns freed memory to its host, also a fault in
    /// the host); without this, requests in the first seconds under load pay
    /// for it. The allocator keeps the memory for reuse, so resident memory
    /// starts at this size.
    #[arg(long, env = "LAKEWRITER_PRETOUCH_MEMORY", default_value = "512MiB")]
    pub pretouch_memory: ByteSize,
}

/// When memtables become Parquet.
#[derive(Debug, Clone, Args)]
pub struct FlushArgs {
    /// Flush a table's memtable when it holds this many rows.
    #[arg(long, env = "LAKEWRITER_FLUSH_ROWS", default_value_t = 1_000_000)]
    pub flush_rows: usize,
    /// Flush a table's memtable when its Arrow data reaches this size.
    #[arg(long, env = "LAKEWRITER_FLUSH_BYTES", default_value = "128MiB")]
    pub flush_bytes: ByteSize,
    /// Flush a table's memtable when its oldest row is this old.
    #[arg(long, env = "LAKEWRITER_FLUSH_AGE", default_value = "60s", value_parser = parse_duration)]
    pub flush_age: Duration,
    /// Memory for all memtables. Above half of it the largest tables flush early;
    /// above all of it writes get RESOURCE_EXHAUSTED (retry after a flush).
    #[arg(long, env = "LAKEWRITER_MEMTABLE_BUDGET", default_value = "1GiB")]
    pub memtable_budget: ByteSize,
    /// Rows per Parquet row group.
    #[arg(long, env = "LAKEWRITER_ROW_GROUP_ROWS", default_value_t = 65_536)]
    pub row_group_rows: usize,
    /// ZSTD level of Parquet pages (1 = fastest).
    #[arg(long, env = "LAKEWRITER_ZSTD_LEVEL", default_value_t = 1)]
    pub zstd_level: i32,
    /// How often small Parquet files of one partition (tenant, endpoint,
    /// hour) are merged into one, up to --flush-rows rows and --flush-bytes
    /// decoded per merge, once the hour has been over for --flush-age plus
    /// this; 0 turns compaction off.
    #[arg(long, env = "LAKEWRITER_COMPACT_INTERVAL", default_value = "5m", value_parser = parse_duration)]
    pub compact_interval: Duration,
    /// Delete the Parquet files of every hour partition that ended this
    /// long ago or longer (by the rows' own times; a flush writes no file
    /// for such an hour); 0 keeps everything.
    #[arg(long, env = "LAKEWRITER_LAKE_RETENTION", default_value = "0", value_parser = parse_duration)]
    pub lake_retention: Duration,
    /// Per-endpoint retention that overrides --lake-retention, as
    /// `ENDPOINT=DURATION` (`0` keeps that endpoint forever); repeat the flag
    /// or separate with commas, e.g. `spans=7d,state_patches=30d`.
    #[arg(long, env = "LAKEWRITER_LAKE_RETENTION_ENDPOINT", value_delimiter = ',', value_parser = parse_endpoint_retention)]
    pub lake_retention_endpoint: Vec<EndpointRetention>,
    /// How often expired files are looked for, when any retention is set.
    #[arg(long, env = "LAKEWRITER_LAKE_RETENTION_INTERVAL", default_value = "1m", value_parser = parse_duration)]
    pub lake_retention_interval: Duration,
}

/// One item of `--lake-retention-endpoint`; empty (an empty variable, a
/// trailing comma) says nothing.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointRetention(Option<(String, Duration)>);

/// `ENDPOINT=DURATION` of `--lake-retention-endpoint`.
fn parse_endpoint_retention(s: &str) -> Result<EndpointRetention, String> {
    if s.trim().is_empty() {
        return Ok(EndpointRetention(None));
    }
    let (endpoint, duration) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected ENDPOINT=DURATION, e.g. spans=7d"))?;
    let endpoint = endpoint.trim();
    if !crate::ingest::names::is_valid(endpoint) {
        return Err(format!("{endpoint:?} is not an endpoint name"));
    }
    let duration = parse_duration(duration.trim())?;
    Ok(EndpointRetention(Some((endpoint.to_string(), duration))))
}

/// Write-ahead log and request limits.
#[derive(Debug, Clone, Args)]
pub struct WalArgs {
    /// Keep flushed trace entries in the WAL this long, for ReadSpans cursors
    /// (log, metric and DataRecord entries go as soon as they are flushed).
    #[arg(long, env = "LAKEWRITER_WAL_RETENTION", default_value = "1h", value_parser = parse_duration)]
    pub wal_retention: Duration,
    /// Largest accepted request (gRPC message or HTTP body, after decompression).
    #[arg(long, env = "LAKEWRITER_MAX_REQUEST_SIZE", default_value = "16MiB")]
    pub max_request_size: ByteSize,
    /// Most requests that share one fsync.
    #[arg(long, env = "LAKEWRITER_WAL_MAX_GROUP", default_value_t = 1024)]
    pub wal_max_group: usize,
    /// zstd level of WAL entry payloads (negative = faster, 0 = not compressed).
    #[arg(long, env = "LAKEWRITER_WAL_ZSTD_LEVEL", default_value_t = crate::wal::DEFAULT_ZSTD_LEVEL, allow_negative_numbers = true)]
    pub wal_zstd_level: i32,
    /// A DataRecord `batch_id` seen within this window returns the original ack.
    #[arg(long, env = "LAKEWRITER_IDEMPOTENCY_WINDOW", default_value = "24h", value_parser = parse_duration)]
    pub idempotency_window: Duration,
}

/// Credentials.
#[derive(Debug, Clone, Args)]
pub struct AuthArgs {
    /// Admin API key of tenant `default` (stored as a hash). Without it, the
    /// first start creates one and writes it to `<data-dir>/admin-api-key`.
    #[arg(long, env = "LAKEWRITER_BOOTSTRAP_API_KEY", hide_env_values = true)]
    pub bootstrap_api_key: Option<String>,
    /// Verify JWTs against this JWKS (an external identity provider) too.
    #[arg(long, env = "LAKEWRITER_JWKS_URL")]
    pub jwks_url: Option<String>,
    /// Lifetime of tokens issued by `/api/v1/otel/token` and `GetToken`.
    #[arg(long, env = "LAKEWRITER_TOKEN_TTL", default_value = "1h", value_parser = parse_duration)]
    pub token_ttl: Duration,
    /// Turn authentication off: every request is tenant `default` with every
    /// scope. Local experiments and benchmarks only.
    #[arg(long, env = "LAKEWRITER_NO_AUTH")]
    pub no_auth: bool,
}

/// `lakewriter serve` flags.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub auth: AuthArgs,
    #[command(flatten)]
    pub flush: FlushArgs,
    #[command(flatten)]
    pub wal: WalArgs,
    #[command(flatten)]
    pub query: QueryArgs,
}

/// Limits of the SQL and span query endpoints.
#[derive(Debug, Clone, Args)]
pub struct QueryArgs {
    /// A query running longer than this is cancelled (HTTP 504, DEADLINE_EXCEEDED).
    #[arg(long, env = "LAKEWRITER_QUERY_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub query_timeout: Duration,
    /// Memory all running queries may hold together (sorts, joins, aggregates,
    /// the rows they return). Sorts, aggregations and repartitions spill past
    /// their part of it; a query that needs more that cannot spill fails.
    #[arg(long, env = "LAKEWRITER_QUERY_MEMORY", default_value = "512MiB")]
    pub query_memory: ByteSize,
    /// Disk all running queries may spill to together, in
    /// `<data-dir>/query-spill` (emptied at start); 0 turns spilling off.
    #[arg(long, env = "LAKEWRITER_QUERY_SPILL_LIMIT", default_value = "8GiB")]
    pub query_spill_limit: ByteSize,
    /// Most rows a SQL result may have; larger results fail and ask for a LIMIT.
    #[arg(long, env = "LAKEWRITER_QUERY_MAX_ROWS", default_value_t = 100_000)]
    pub query_max_rows: usize,
}

#[derive(Debug, Clone)]
pub struct QueryConfig {
    pub timeout: Duration,
    pub memory: usize,
    /// Bytes of spill files all running queries may hold (0: no spilling).
    pub spill_limit: u64,
    pub max_rows: usize,
}

impl Default for QueryConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(30),
            memory: 512 << 20,
            spill_limit: 8 << 30,
            max_rows: 100_000,
        }
    }
}

#[derive(Debug, Clone)]
pub struct FlushConfig {
    pub rows: usize,
    pub bytes: u64,
    pub age: Duration,
    pub memtable_budget: u64,
    pub row_group_rows: usize,
    pub zstd_level: i32,
    /// How often the flusher looks at ages and memory.
    pub check_interval: Duration,
    /// How often small files are merged (zero: never).
    pub compact_interval: Duration,
    /// How long published files are kept after their hour ends, per
    /// endpoint; see [`Retention`].
    pub retention: Retention,
    /// How often expired files are looked for (when any retention is set).
    pub retention_interval: Duration,
}

/// Lake retention: a default and per-endpoint overrides (zero: forever).
/// An override named `metrics` covers every `metrics_*` table.
#[derive(Debug, Clone, Default)]
pub struct Retention {
    pub default: Duration,
    pub endpoints: Vec<(String, Duration)>,
}

impl Retention {
    /// How long `endpoint`'s files are kept; None: forever.
    pub fn of(&self, endpoint: &str) -> Option<Duration> {
        let named = |name: &str| {
            self.endpoints
                .iter()
                .find(|(e, _)| e == name)
                .map(|(_, d)| *d)
        };
        let d = named(endpoint)
            .or_else(|| {
                endpoint
                    .starts_with("metrics_")
                    .then(|| named("metrics"))
                    .flatten()
            })
            .unwrap_or(self.default);
        (!d.is_zero()).then_some(d)
    }

    /// Whether any endpoint's files ever expire.
    pub fn any(&self) -> bool {
        !self.default.is_zero() || self.endpoints.iter().any(|(_, d)| !d.is_zero())
    }
}

impl Default for FlushConfig {
    fn default() -> Self {
        Self {
            rows: 1_000_000,
            bytes: 128 << 20,
            age: Duration::from_secs(60),
            memtable_budget: 1 << 30,
            row_group_rows: 65_536,
            zstd_level: 1,
            check_interval: Duration::from_millis(500),
            compact_interval: Duration::from_secs(300),
            retention: Retention::default(),
            retention_interval: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone)]
pub struct WalConfig {
    pub retention: Duration,
    pub max_group: usize,
    pub zstd_level: i32,
    pub idempotency_window: Duration,
}

impl Default for WalConfig {
    fn default() -> Self {
        Self {
            retention: Duration::from_secs(3600),
            max_group: 1024,
            zstd_level: crate::wal::DEFAULT_ZSTD_LEVEL,
            idempotency_window: Duration::from_secs(24 * 3600),
        }
    }
}

/// The plain configuration the library runs on.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub grpc_addr: SocketAddr,
    pub internal_grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub lake_url: String,
    pub max_request_size: usize,
    pub flush: FlushConfig,
    pub wal: WalConfig,
    pub auth: AuthConfig,
    pub query: QueryConfig,
}

fn default_lake_url(data_dir: &Path) -> String {
    let abs = std::path::absolute(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    format!("file://{}", abs.join("lake").display())
}

impl Config {
    pub fn from_args(args: &ServeArgs) -> Self {
        let s = &args.server;
        Self {
            data_dir: s.data_dir.clone(),
            grpc_addr: s.grpc_addr,
            internal_grpc_addr: s.internal_grpc_addr,
            http_addr: s.http_addr,
            lake_url: s
                .lake_url
                .clone()
                .unwrap_or_else(|| default_lake_url(&s.data_dir)),
            max_request_size: args.wal.max_request_size.0 as usize,
            flush: FlushConfig {
                rows: args.flush.flush_rows,
                bytes: args.flush.flush_bytes.0,
                age: args.flush.flush_age,
                memtable_budget: args.flush.memtable_budget.0,
                row_group_rows: args.flush.row_group_rows,
                zstd_level: args.flush.zstd_level,
                compact_interval: args.flush.compact_interval,
                retention: Retention {
                    default: args.flush.lake_retention,
                    endpoints: args
                        .flush
                        .lake_retention_endpoint
                        .iter()
                        .filter_map(|e| e.0.clone())
                        .collect(),
                },
                retention_interval: args.flush.lake_retention_interval,
                ..FlushConfig::default()
            },
            wal: WalConfig {
                retention: args.wal.wal_retention,
                max_group: args.wal.wal_max_group,
                zstd_level: args.wal.wal_zstd_level,
                idempotency_window: args.wal.idempotency_window,
            },
            auth: AuthConfig {
                disabled: args.auth.no_auth,
                bootstrap_api_key: args.auth.bootstrap_api_key.clone(),
                jwks_url: args.auth.jwks_url.clone(),
                token_ttl: args.auth.token_ttl,
                ..AuthConfig::default()
            },
            query: QueryConfig {
                timeout: args.query.query_timeout,
                memory: args.query.query_memory.0 as usize,
                spill_limit: args.query.query_spill_limit.0,
                max_rows: args.query.query_max_rows,
            },
        }
    }

    /// A config on loopback port 0 (the OS picks) with everything under `dir`.
    pub fn for_test(dir: &Path) -> Self {
        let any = "127.0.0.1:0".parse().expect("static address");
        Self {
            data_dir: dir.to_path_buf(),
            grpc_addr: any,
            internal_grpc_addr: any,
            http_addr: any,
            lake_url: default_lake_url(dir),
            max_request_size: 16 << 20,
            flush: FlushConfig::default(),
            wal: WalConfig::default(),
            auth: AuthConfig::default(),
            query: QueryConfig::default(),
        }
    }

    /// Rejects settings that cannot work, with the flag named.
    pub fn validate(&self) -> Result<(), String> {
        let f = &self.flush;
        if f.rows == 0 {
            return Err("--flush-rows must be at least 1".into());
        }
        if f.bytes == 0 || f.memtable_budget == 0 {
            return Err("--flush-bytes and --memtable-budget must be above 0".into());
        }
        if f.age.is_zero() {
            return Err("--flush-age must be above 0".into());
        }
        if f.row_group_rows < 1024 {
            return Err("--row-group-rows must be at least 1024".into());
        }
        if !(1..=22).contains(&f.zstd_level) {
            return Err("--zstd-level must be within 1..=22".into());
        }
        // A WAL entry records its payload's length in 32 bits.
        if self.max_request_size < 1024 || self.max_request_size > crate::wal::MAX_PAYLOAD {
            return Err("--max-request-size must be within 1KiB..=1GiB".into());
        }
        if self.wal.max_group == 0 {
            return Err("--wal-max-group must be at least 1".into());
        }
        // zstd's fast levels go far lower, but below -7 the ratio is mostly gone.
        if !(-7..=19).contains(&self.wal.zstd_level) {
            return Err("--wal-zstd-level must be within -7..=19 (0: not compressed)".into());
        }
        if self.query.timeout.is_zero() || self.query.max_rows == 0 || self.query.memory < 1 << 20 {
            return Err(
                "--query-timeout and --query-max-rows must be above 0, --query-memory at least 1MiB"
                    .into(),
            );
        }
        let named = &self.flush.retention.endpoints;
        if let Some(e) = named
            .iter()
            .enumerate()
            .find_map(|(i, (e, _))| named[..i].iter().any(|(p, _)| p == e).then_some(e))
        {
            return Err(format!("--lake-retention-endpoint names {e:?} twice"));
        }
        if self.flush.retention.any() && self.flush.retention_interval.is_zero() {
            return Err("--lake-retention-interval must be above 0".into());
        }
        if self.auth.token_ttl.is_zero() {
            return Err("--token-ttl must be above 0".into());
        }
        if self
            .auth
            .bootstrap_api_key
            .as_ref()
            .is_some_and(|k| k.len() < 16)
        {
            return Err("LAKEWRITER_BOOTSTRAP_API_KEY must be at least 16 characters".into());
        }
        if !["file://", "s3://", "s3a://"]
            .iter()
            .any(|p| self.lake_url.starts_with(p))
        {
            return Err(format!(
                "--lake-url {:?}: use file:///path or s3://bucket/prefix",
                self.lake_url
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes_parse() {
        assert_eq!("512MiB".parse::<ByteSize>().unwrap().0, 512 << 20);
        assert_eq!("64MB".parse::<ByteSize>().unwrap().0, 64_000_000);
        assert_eq!("1048576".parse::<ByteSize>().unwrap().0, 1 << 20);
        assert_eq!("1.5GiB".parse::<ByteSize>().unwrap().0, 3 << 29);
        assert!("12 parsecs".parse::<ByteSize>().is_err());
        assert!("".parse::<ByteSize>().is_err());
    }

    #[test]
    fn endpoint_retentions_parse_and_override_the_default() {
        let item =
            |e: &str, secs| EndpointRetention(Some((e.to_string(), Duration::from_secs(secs))));
        assert_eq!(
            parse_endpoint_retention("spans=7d").unwrap(),
            item("spans", 7 * 86_400)
        );
        assert_eq!(
            parse_endpoint_retention(" logs = 0 ").unwrap(),
            item("logs", 0)
        );
        assert_eq!(
            parse_endpoint_retention(" ").unwrap(),
            EndpointRetention(None)
        );
        for bad in ["spans", "spans=soon", "bad/name=1d", "=1d"] {
            assert!(parse_endpoint_retention(bad).is_err(), "{bad}");
        }
        let r = Retention {
            default: Duration::from_secs(3600),
            endpoints: vec![
                ("logs".to_string(), Duration::ZERO),
                ("spans".to_string(), Duration::from_secs(60)),
                ("metrics".to_string(), Duration::from_secs(120)),
                ("metrics_sum".to_string(), Duration::from_secs(180)),
            ],
        };
        assert_eq!(r.of("spans"), Some(Duration::from_secs(60)));
        assert_eq!(r.of("logs"), None);
        assert_eq!(r.of("orders"), Some(Duration::from_secs(3600)));
        assert_eq!(r.of("metrics_gauge"), Some(Duration::from_secs(120)));
        assert_eq!(r.of("metrics_sum"), Some(Duration::from_secs(180)));
        let mut cfg = Config::for_test(Path::new("/tmp/x"));
        cfg.flush.retention = r.clone();
        cfg.validate().unwrap();
        cfg.flush
            .retention
            .endpoints
            .push(("spans".into(), Duration::ZERO));
        assert!(cfg.validate().unwrap_err().contains("\"spans\" twice"));
        assert!(r.any());
        assert!(!Retention::default().any());
        assert_eq!(Retention::default().of("spans"), None);
    }

    #[test]
    fn test_config_is_valid() {
        let cfg = Config::for_test(Path::new("/tmp/x"));
        cfg.validate().unwrap();
        assert_eq!(cfg.lake_url, "file:///tmp/x/lake");
        let mut bad = cfg.clone();
        bad.flush.rows = 0;
        assert!(bad.validate().unwrap_err().contains("--flush-rows"));
        for (size, ok) in [
            (1023, false),
            (1024, true),
            (1 << 30, true),
            ((1 << 30) + 1, false),
        ] {
            let mut c = cfg.clone();
            c.max_request_size = size;
            assert_eq!(c.validate().is_ok(), ok, "--max-request-size {size}");
        }
        for (level, ok) in [(-8, false), (-7, true), (0, true), (19, true), (20, false)] {
            let mut c = cfg.clone();
            c.wal.zstd_level = level;
            assert_eq!(c.validate().is_ok(), ok, "--wal-zstd-level {level}");
        }
    }
}
