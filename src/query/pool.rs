//! One query's view of the shared query memory pool.
//!
//! All running queries draw from one pool of `--query-memory` bytes. When a
//! reservation fails, DataFusion says only "resources exhausted", which
//! means one of two things to the caller:
//! - the query needs more than the whole pool: retrying fails again (`422`);
//! - the query would fit, but other queries (perhaps another tenant's) hold
//!   the memory now: the same query may pass in a moment (`429`, retryable).
//!
//! [`QueryPool`] reserves on the shared [`SharedPool`] and counts what its
//! own query holds, under the shared pool's lock, so a refusal and its
//! verdict see one state of the pool. The verdict is taken then, not after
//! the query has failed: by then the failed query is releasing its
//! reservations on other tasks. Once one refusal finds the query too big,
//! later ones (another partition of the same query, refused while the first
//! released its memory) do not make it retryable.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use datafusion::common::{resources_datafusion_err, Result};
use datafusion::execution::memory_pool::{MemoryLimit, MemoryPool, MemoryReservation};

/// The `--query-memory` bytes all running queries share. Queries reserve
/// through their own [`QueryPool`]; the lock makes each refusal and its
/// verdict one decision on one state of the pool.
#[derive(Debug)]
pub struct SharedPool {
    limit: usize,
    used: Mutex<usize>,
}

impl SharedPool {
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            used: Mutex::new(0),
        }
    }

    fn used(&self) -> MutexGuard<'_, usize> {
        // A panic while holding the lock leaves a consistent count (every
        // update is one assignment).
        self.used.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl std::fmt::Display for SharedPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "query memory ({} of {} bytes held)",
            self.reserved(),
            self.limit
        )
    }
}

/// Reservations made on the shared pool directly (none of the query paths
/// do) belong to no query: to every query they are other queries' memory.
impl MemoryPool for SharedPool {
    fn name(&self) -> &str {
        "query memory"
    }

    fn grow(&self, _: &MemoryReservation, additional: usize) {
        *self.used() += additional;
    }

    fn shrink(&self, _: &MemoryReservation, shrink: usize) {
        let mut used = self.used();
        *used = used.saturating_sub(shrink);
    }

    fn try_grow(&self, reservation: &MemoryReservation, additional: usize) -> Result<()> {
        let mut used = self.used();
        if used.saturating_add(additional) > self.limit {
            return Err(refusal(reservation, additional, *used, self.limit));
        }
        *used += additional;
        Ok(())
    }

    fn reserved(&self) -> usize {
        *self.used()
    }

    fn memory_limit(&self) -> MemoryLimit {
        MemoryLimit::Finite(self.limit)
    }
}

fn refusal(
    reservation: &MemoryReservation,
    additional: usize,
    used: usize,
    limit: usize,
) -> datafusion::error::DataFusionError {
    resources_datafusion_err!(
        "{} needs {additional} more bytes (it holds {}); running queries hold {used} of the {limit}-byte query memory (--query-memory)",
        reservation.consumer().name(),
        reservation.size()
    )
}

#[derive(Debug)]
pub struct QueryPool {
    shared: Arc<SharedPool>,
    /// Bytes this query's reservations hold (changed under the shared lock).
    own: AtomicUsize,
    /// Whether a reservation of this query was refused.
    refused: AtomicBool,
    /// Whether a refused reservation would not have fit even had this query
    /// been alone: the query is too big, whatever else failed later.
    too_big: AtomicBool,
}

impl QueryPool {
    pub fn new(shared: Arc<SharedPool>) -> Self {
        Self {
            shared,
            own: AtomicUsize::new(0),
            refused: AtomicBool::new(false),
            too_big: AtomicBool::new(false),
        }
    }

    /// Whether the query's reservations were refused only because other
    /// queries held the pool (and none because the query is too big).
    pub fn crowded_out(&self) -> bool {
        self.refused.load(Ordering::Acquire) && !self.too_big.load(Ordering::Acquire)
    }

    /// Bytes this query holds now.
    pub fn own(&self) -> usize {
        self.own.load(Ordering::Acquire)
    }

    /// Adds `delta` to the shared total and this query's count, under the
    /// shared lock `used`.
    fn add(&self, used: &mut usize, delta: usize) {
        *used += delta;
        self.own.fetch_add(delta, Ordering::AcqRel);
        crate::metrics::METRICS.query_memory_bytes.add(delta as i64);
    }
}

impl std::fmt::Display for QueryPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "query ({} bytes held) of {} bytes",
            self.own(),
            self.shared.limit
        )
    }
}

impl MemoryPool for QueryPool {
    fn name(&self) -> &str {
        "query"
    }

    fn grow(&self, _: &MemoryReservation, additional: usize) {
        self.add(&mut self.shared.used(), additional);
    }

    fn shrink(&self, _: &MemoryReservation, shrink: usize) {
        let mut used = self.shared.used();
        let shrink = shrink.min(self.own());
        *used = used.saturating_sub(shrink);
        self.own.fetch_sub(shrink, Ordering::AcqRel);
        crate::metrics::METRICS
            .query_memory_bytes
            .add(-(shrink as i64));
    }

    fn try_grow(&self, reservation: &MemoryReservation, additional: usize) -> Result<()> {
        let limit = self.shared.limit;
        let mut used = self.shared.used();
        if used.saturating_add(additional) <= limit {
            self.add(&mut used, additional);
            return Ok(());
        }
        if self.own().saturating_add(additional) > limit {
            self.too_big.store(true, Ordering::Release);
        }
        self.refused.store(true, Ordering::Release);
        Err(refusal(reservation, additional, *used, limit))
    }

    fn reserved(&self) -> usize {
        *self.shared.used()
    }

    fn memory_limit(&self) -> MemoryLimit {
        MemoryLimit::Finite(self.shared.limit)
    }
}

#[cfg(test)]
mod tests {
    use datafusion::execution::memory_pool::MemoryConsumer;

    use super::*;

    #[test]
    fn tells_too_big_from_crowded_out() {
        let shared = Arc::new(SharedPool::new(1000));
        let a: Arc<dyn MemoryPool> = Arc::new(QueryPool::new(shared.clone()));
        let query = |pool: &Arc<QueryPool>| -> Arc<dyn MemoryPool> { pool.clone() };

        let ra = MemoryConsumer::new("a").register(&a);
        ra.try_grow(700).unwrap();
        let b = Arc::new(QueryPool::new(shared.clone()));
        let rb = MemoryConsumer::new("b").register(&query(&b));
        rb.try_grow(200).unwrap();
        assert_eq!(b.own(), 200);
        // 400 more would fit in the pool were `a` not there.
        let err = rb.try_grow(400).unwrap_err();
        assert!(b.crowded_out(), "{err}");
        assert!(err.to_string().contains("--query-memory"), "{err}");
        drop(ra);
        rb.try_grow(400).unwrap();
        assert_eq!((b.own(), shared.reserved()), (600, 600));
        rb.shrink(100);
        drop(rb);
        assert_eq!((b.own(), shared.reserved()), (0, 0));

        // 900 more than the 200 it holds would not fit even alone; a later
        // refusal that would have (its own memory released meanwhile) does
        // not make the query retryable.
        let c = Arc::new(QueryPool::new(shared.clone()));
        let rc = MemoryConsumer::new("c").register(&query(&c));
        rc.try_grow(200).unwrap();
        rc.try_grow(900).unwrap_err();
        assert!(!c.crowded_out());
        let other = MemoryConsumer::new("other")
            .register(&query(&Arc::new(QueryPool::new(shared.clone()))));
        other.try_grow(750).unwrap();
        rc.try_grow(100).unwrap_err();
        assert!(!c.crowded_out());
        drop((rc, other));
        assert_eq!(shared.reserved(), 0);
    }
}
