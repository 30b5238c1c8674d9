//! Startup, wiring and ordered shutdown.
//!
//! Start: open the WAL → load the manifest → reconcile unrecorded files →
//! replay WAL entries above the watermark into memtables → start the flusher →
//! bind the public gRPC, internal gRPC and HTTP listeners (port 0 allowed).
//!
//! Shutdown ([`Running::shutdown`]): stop accepting, and stop compaction
//! and retention (a pass ends after the partition or table it is on) →
//! drain in-flight requests (bounded wait) → flush every memtable → wait
//! for the passes and delete the files they freed (bounded wait: a pass cut
//! short leaves unrecorded files, which the next start deletes) → close the
//! WAL.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::codec::CompressionEncoding;
use tonic::transport::server::TcpIncoming;
use ulid::Ulid;

use crate::auth::Auth;
use crate::config::Config;
use crate::flush::lake::Lake;
use crate::flush::{manifest, Flusher};
use crate::ingest::grpc::{fix_status, AuthGrpc, Authenticated, IngestionGrpc, OtlpService};
use crate::ingest::otlp_grpc::{Logs, Metrics, OtlpGrpc, Traces};
use crate::ingest::read_spans::ReadSpansService;
use crate::ingest::{rows_for_entry, Ingestor};
use crate::memtable::schema::Registry;
use crate::memtable::Catalog;
use crate::proto::ingestion::auth_service_server::AuthServiceServer;
use crate::proto::ingestion::ingestion_service_server::IngestionServiceServer;
use crate::proto::ingestion::internal_auth_service_server::InternalAuthServiceServer;
use crate::proto::ingestion::internal_ingestion_service_server::InternalIngestionServiceServer;
use crate::query::QueryEngine;
use crate::wal::entry::PayloadKind;
use crate::wal::Wal;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("data directory {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Wal(#[from] crate::wal::Error),
    #[error(transparent)]
    Manifest(#[from] manifest::Error),
    #[error(transparent)]
    Lake(#[from] crate::flush::lake::Error),
    #[error(transparent)]
    Flush(#[from] crate::flush::Error),
    #[error(transparent)]
    Auth(#[from] crate::auth::Error),
    #[error(transparent)]
    Schema(#[from] crate::memtable::schema::Error),
    #[error("query engine: {0}")]
    Query(String),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A started server.
pub struct Running {
    pub grpc_addr: SocketAddr,
    pub internal_grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub lake_url: String,
    cancel: CancellationToken,
    servers: Vec<JoinHandle<()>>,
    flusher_task: JoinHandle<()>,
    /// Compaction and retention loops.
    maintenance: Vec<JoinHandle<()>>,
    flusher: Arc<Flusher>,
    wal: Arc<Wal>,
}

/// A random id of this node, kept in `<data>/node-id`; it ends every file name.
///
/// Written durably (temporary file, fsync, rename, fsync of the directory)
/// before any file carries it: startup's reconcile finds this node's
/// unrecorded files by it, so a lost id would leave them behind for good.
/// Any read error other than "not there" is an error, not a new id.
fn node_id(data_dir: &Path) -> std::io::Result<String> {
    let path = data_dir.join("node-id");
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let id = format!("{:08x}", rand::random::<u32>());
    let tmp = data_dir.join("node-id.tmp");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(id.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(data_dir)?.sync_all()?;
    Ok(id)
}

pub async fn start(cfg: Config) -> Result<Running> {
    cfg.validate().map_err(Error::Config)?;
    let dir_err = |source| Error::DataDir {
        path: cfg.data_dir.display().to_string(),
        source,
    };
    std::fs::create_dir_all(&cfg.data_dir).map_err(dir_err)?;
    let node = node_id(&cfg.data_dir).map_err(dir_err)?;
    let mut wal = Wal::open(&cfg.data_dir.join("wal"), cfg.wal.max_group)?;
    wal.set_zstd_level(cfg.wal.zstd_level);
    let wal = Arc::new(wal);
    let lake = Lake::open(&cfg.lake_url)?;
    let auth_cfg = cfg.auth.clone();
    let (auth_db, auth_dir) = (wal.db().clone(), cfg.data_dir.clone());
    let auth = tokio::task::spawn_blocking(move || Auth::open(auth_db, &auth_cfg, &auth_dir))
        .await
        .map_err(|e| Error::Config(format!("auth setup task failed: {e}")))??;
    let auth = Arc::new(auth);
    if cfg.auth.disabled {
        tracing::warn!(
            "authentication is OFF (--no-auth): every request is tenant default with every scope"
        );
    }
    let catalog = Arc::new(Catalog::new(cfg.flush.clone()));
    let schemas = Arc::new(Registry::open(wal.db().clone())?);
    let loaded = manifest::load(wal.db())?;
    let mut recorded = HashSet::new();
    for (table, files) in loaded.files {
        recorded.extend(files.iter().map(|f| f.path.clone()));
        let wm = loaded
            .watermarks
            .get(&table)
            .copied()
            .unwrap_or(Ulid::nil());
        catalog.load_table(table, files.into_iter().map(Arc::new).collect(), wm);
    }
    for (table, wm) in &loaded.watermarks {
        if catalog.tables_of(&table.tenant).iter().all(|t| t != table) {
            catalog.load_table(table.clone(), vec![], *wm);
        }
    }
    let flusher = Arc::new(Flusher::new(
        catalog.clone(),
        wal.clone(),
        lake,
        cfg.flush.clone(),
        cfg.wal.clone(),
        node,
    )?);
    let removed = flusher.reconcile(&recorded).await?;
    let (entries, rows, set_aside) = replay(
        &wal,
        &catalog,
        &schemas,
        &flusher,
        loaded.flushed_through,
        &cfg,
    )
    .await?;
    tracing::info!(
        entries,
        rows,
        set_aside,
        removed_unrecorded_files = removed,
        "WAL replayed"
    );
    for (endpoint, _) in &cfg.flush.retention.endpoints {
        let builtin = crate::memtable::schema::BUILTIN_TABLES.contains(&endpoint.as_str());
        if !builtin && endpoint != "metrics" && !catalog.has_endpoint(endpoint) {
            tracing::warn!(%endpoint, "--lake-retention-endpoint names a table no tenant has yet; it applies once one is written");
        }
    }

    let cancel = CancellationToken::new();
    let flusher_task = tokio::spawn(flusher.clone().run(cancel.clone()));
    let mut maintenance = Vec::new();
    if !cfg.flush.compact_interval.is_zero() {
        maintenance.push(tokio::spawn(flusher.clone().run_compaction()));
    }
    if cfg.flush.retention.any() {
        maintenance.push(tokio::spawn(flusher.clone().run_retention()));
    }
    let ingestor = Arc::new(Ingestor::new(
        wal.clone(),
        catalog.clone(),
        schemas.clone(),
        cfg.wal.idempotency_window,
        flusher.wake.clone(),
    ));
    let pruner = ingestor.clone();
    let prune_cancel = cancel.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(600));
        loop {
            tokio::select! {
                _ = prune_cancel.cancelled() => return,
                _ = every.tick() => {}
            }
            let p = pruner.clone();
            match tokio::task::spawn_blocking(move || p.prune_batches()).await {
                Ok(Ok(n)) if n > 0 => tracing::info!(n, "pruned expired batch ids"),
                Ok(Err(e)) => tracing::warn!(error = %e, "pruning batch ids failed"),
                _ => {}
            }
        }
    });
    let mut servers = Vec::new();

    let (grpc_addr, listener) = bind(cfg.grpc_addr).await?;
    // Every ingest service takes gzip/zstd and the same request size limit
    // (the OTLP services, `OtlpGrpc`, set the same themselves).
    macro_rules! ingest_service {
        ($server:expr) => {
            $server
                .accept_compressed(CompressionEncoding::Gzip)
                .accept_compressed(CompressionEncoding::Zstd)
                .max_decoding_message_size(cfg.max_request_size)
        };
    }
    // Every write service authenticates before its body is read (see
    // `Authenticated`); the handlers take the principal it found. OTLP
    // exports are then refused while memtables are over budget, still
    // before their body is decoded (`Authenticated::admitting`).
    macro_rules! otlp_service {
        ($server:expr) => {
            Authenticated::new($server, auth.clone()).admitting(ingestor.clone())
        };
    }
    let otlp = OtlpService::new(ingestor.clone(), auth.clone());
    let max = cfg.max_request_size;
    let trace = otlp_service!(OtlpGrpc::<Traces>::new(otlp.clone(), max));
    let logs = otlp_service!(OtlpGrpc::<Logs>::new(otlp.clone(), max));
    let metrics = otlp_service!(OtlpGrpc::<Metrics>::new(otlp, max));
    let records = Authenticated::new(
        ingest_service!(IngestionServiceServer::new(IngestionGrpc::new(
            ingestor.clone(),
            auth.clone()
        ))),
        auth.clone(),
    );
    let public = tonic::transport::Server::builder()
        .layer(tower::util::MapResponseLayer::new(
            fix_status::<tonic::body::Body>,
        ))
        .add_service(trace)
        .add_service(logs)
        .add_service(metrics)
        .add_service(records)
        .add_service(AuthServiceServer::new(AuthGrpc(auth.clone())))
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            cancel.clone().cancelled_owned(),
        );
    servers.push(spawn_server("public gRPC", public));

    let (internal_grpc_addr, listener) = bind(cfg.internal_grpc_addr).await?;
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let internal = tonic::transport::Server::builder()
        .add_service(health)
        .add_service(InternalAuthServiceServer::new(AuthGrpc(auth.clone())))
        .add_service(InternalIngestionServiceServer::new(ReadSpansService::new(
            wal.clone(),
            auth.clone(),
        )))
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            cancel.clone().cancelled_owned(),
        );
    servers.push(spawn_server("internal gRPC", internal));

    let query = Arc::new(
        QueryEngine::new(
            catalog.clone(),
            schemas.clone(),
            flusher.lake().clone(),
            cfg.query.clone(),
            &cfg.data_dir.join("query-spill"),
        )
        .map_err(|e| Error::Query(e.to_string()))?,
    );
    let (http_addr, listener) = bind(cfg.http_addr).await?;
    let app = crate::http::router(crate::http::AppState {
        catalog: catalog.clone(),
        flusher: flusher.clone(),
        auth: auth.clone(),
        query,
        ingestor: ingestor.clone(),
        wal: wal.clone(),
        max_request_size: cfg.max_request_size,
    });
    let http = axum::serve(listener, app).with_graceful_shutdown(cancel.clone().cancelled_owned());
    servers.push(spawn_server("HTTP", async move { http.await }));

    let lake_url = flusher.lake().url().to_string();
    tracing::info!(%grpc_addr, %internal_grpc_addr, %http_addr, lake = %lake_url, data_dir = %cfg.data_dir.display(), "lakewriter ready");
    Ok(Running {
        grpc_addr,
        internal_grpc_addr,
        http_addr,
        lake_url,
        cancel,
        servers,
        flusher_task,
        maintenance,
        flusher,
        wal,
    })
}

async fn bind(addr: SocketAddr) -> Result<(SocketAddr, TcpListener)> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| Error::Bind { addr, source })?;
    Ok((local, listener))
}

fn spawn_server<E: std::fmt::Display>(
    name: &'static str,
    fut: impl std::future::Future<Output = Result<(), E>> + Send + 'static,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(e) = fut.await {
            tracing::error!(server = name, error = %e, "server stopped with an error");
        }
    })
}

/// Re-inserts WAL entries above the watermark; flushes when memory runs high.
async fn replay(
    wal: &Wal,
    catalog: &Catalog,
    schemas: &Registry,
    flusher: &Flusher,
    from: Option<Ulid>,
    cfg: &Config,
) -> Result<(u64, u64, u64)> {
    let (mut entries, mut rows, mut set_aside) = (0u64, 0u64, 0u64);
    // Converted entries are inserted in groups, bounded in count and in
    // memory: entries of tables flushed past them are converted and then
    // skipped by the insert, and a slow table holding the global watermark
    // back can leave many such 16 MiB exports above it.
    let mut pending = Vec::new();
    let mut pending_bytes = 0u64;
    let max_pending_bytes = (cfg.flush.memtable_budget / 8).max(1 << 20);
    for item in wal.replay_after(from) {
        let (seq, entry) = match item {
            Ok(found) => found,
            // Acknowledged, so kept (apart) even when it no longer decodes;
            // the rest of the log replays. A newer binary's entry stops the
            // start instead: this binary must not run on it.
            Err(crate::wal::Error::Corrupt { key, source }) if !source.from_newer_binary() => {
                wal.set_aside(key, &format!("corrupt: {source}"), true)?;
                set_aside += 1;
                entries += 1;
                tracing::error!(seq = %key, error = %source, "WAL entry does not decode; kept in the wal_rejected column family");
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        match rows_for_entry(&entry, schemas) {
            Ok(r) => {
                rows += r.iter().map(|(_, b)| b.num_rows() as u64).sum::<u64>();
                pending_bytes += r
                    .iter()
                    .map(|(_, b)| crate::memtable::batch_bytes(b))
                    .sum::<u64>();
                pending.push((seq, r));
            }
            Err(e) => {
                // Acknowledged once, so never dropped: kept apart, where
                // truncation does not reach, and named in the log. Moved
                // out of the log only if ReadSpans cannot decode it either
                // (it would fail every read over its key).
                let unreadable = entry.kind == PayloadKind::OtlpTraces
                    && ExportTraceServiceRequest::decode(entry.payload.clone()).is_err();
                wal.set_aside(seq, &e.to_string(), unreadable)?;
                set_aside += 1;
                tracing::error!(%seq, error = %e, "WAL entry no longer converts; kept in the wal_rejected column family");
            }
        }
        entries += 1;
        if pending.len() >= 256 || pending_bytes >= max_pending_bytes {
            for (seq, r) in pending.drain(..) {
                catalog.insert(seq, r);
            }
            pending_bytes = 0;
            if catalog.usage().1 > cfg.flush.memtable_budget / 2 {
                flusher.flush_all().await?;
            }
        }
    }
    for (seq, r) in pending {
        catalog.insert(seq, r);
    }
    Ok((entries, rows, set_aside))
}

impl Running {
    /// Ordered shutdown; waits at most `drain` for in-flight requests.
    pub async fn shutdown(self, drain: Duration) -> Result<()> {
        self.cancel.cancel();
        self.flusher.stop();
        for s in self.servers {
            if tokio::time::timeout(drain, s).await.is_err() {
                tracing::warn!("in-flight requests did not finish within {drain:?}");
            }
        }
        let _ = self.flusher_task.await;
        let files = self.flusher.flush_all().await?;
        tracing::info!(files = files.len(), "memtables flushed at shutdown");
        let passes = async {
            for task in self.maintenance {
                let _ = task.await;
            }
            self.flusher.settle().await;
        };
        if tokio::time::timeout(drain, passes).await.is_err() {
            tracing::warn!("a compaction or retention pass did not end within {drain:?}; the next start deletes what it left");
        }
        self.wal.close();
        Ok(())
    }
}
