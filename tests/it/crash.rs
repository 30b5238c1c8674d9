//! Crash test: concurrent exporters, `kill -9` mid-stream, restart, and every
//! acknowledged span is present exactly once.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    for round in 0..3u64 {
        let killed = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (acked, next, killed) = (acked.clone(), next.clone(), killed.clone());
            let mut client = server.trace_client().await;
            tasks.push(tokio::spawn(async move {
                loop {
                    let first = next.fetch_add(50, Ordering::SeqCst);
                    let spans = (first..first + 50).map(|n| span(n / 50, n, None)).collect();
                    match client.export(request("crash", spans)).await {
                        Ok(_) => acked.lock().extend(first..first + 50),
                        // The server died under us; before the kill, an error is a failure.
                        Err(_) if killed.load(Ordering::SeqCst) => return Ok(()),
                        Err(e) => return Err(e),
                    }
                }
            }));
        }
        // Kill once this round has had a different amount of acked load (not
        // after a fixed time: a slow machine would ack too little to test).
        let target = acked.lock().len() + 2_000 + 1_500 * round as usize;
        let deadline = Instant::now() + Duration::from_secs(120);
        while acked.lock().len() < target {
            assert!(
                Instant::now() < deadline,
                "exporters stalled: {} acked",
                acked.lock().len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        killed.store(true, Ordering::SeqCst);
        server.kill9();
        for t in tasks {
            t.await.unwrap().expect("export failed before the kill");
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
