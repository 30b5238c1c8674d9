//! Crash test: concurrent exporters, `kill -9` mid-stream, restart, and every
//! acknowledged span is present exactly once.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_under_load_loses_no_acked_span_and_duplicates_none() {
    let dir = tempfile::tempdir().unwrap();
    // Small thresholds so flushes (and the memtable/file boundary) happen during the load.
    let args = ["--flush-rows", "3000", "--flush-age", "200ms"];
    let mut server = Server::start(dir.path(), &args).await;
    let acked: Arc<Mutex<Vec<u64>>> = Arc::default();
    let next = Arc::new(AtomicU64::new(0));
    for round in 0..3 {
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (acked, next) = (acked.clone(), next.clone());
            let mut client = server.trace_client().await;
            tasks.push(tokio::spawn(async move {
                loop {
                    let first = next.fetch_add(50, Ordering::SeqCst);
                    let spans = (first..first + 50).map(|n| span(n / 50, n, None)).collect();
                    match client.export(request("crash", spans)).await {
                        Ok(_) => acked.lock().extend(first..first + 50),
                        Err(_) => return, // the server died under us
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(700 + 300 * round)).await;
        server.kill9();
        for t in tasks {
            t.await.unwrap();
        }
        server.restart().await;
    }
    server.flush().await;
    let ids = strings(&read_table(&server.lake(), "default", "spans"), "span_id");
    let unique: HashSet<String> = ids.iter().flatten().cloned().collect();
    assert_eq!(
        unique.len(),
        ids.len(),
        "duplicate spans after crash/replay"
    );
    let acked = acked.lock().clone();
    assert!(
        acked.len() > 1000,
        "load too small to mean anything: {}",
        acked.len()
    );
    let missing: Vec<_> = acked
        .iter()
        .filter(|n| !unique.contains(&span_id_hex(**n)))
        .take(5)
        .collect();
    assert!(
        missing.is_empty(),
        "acked spans lost: {missing:?} (of {})",
        acked.len()
    );
}
