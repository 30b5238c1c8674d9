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
//!
//! Consumers that can spill (sorts, aggregations, repartition queues) share
//! fairly: each may hold at most its part of what the unspillable ones
//! (hash-join build sides, results) leave, as in DataFusion's
//! `FairSpillPool`. A refusal makes such a consumer write its state to the
//! spill directory and go on; one big sort therefore does not take the whole
//! pool from every other query. With spilling off (`--query-spill-limit 0`)
//! a refusal fails the query, so there is no part: each takes what is free.
//!
//! A refusal's verdict asks the same of the query's own reservations and
//! spilling consumers alone: had no other query been running, would it have
//! been refused too? With spilling on, refusals of spilling consumers give
//! no verdict (they spill); one that fails the query anyway leaves it "too
//! big".

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use datafusion::common::{resources_datafusion_err, Result};
use datafusion::execution::memory_pool::{
    MemoryConsumer, MemoryLimit, MemoryPool, MemoryReservation,
};

/// What the shared pool's lock guards.
#[derive(Debug, Default)]
struct State {
    /// Bytes every reservation holds.
    used: usize,
    /// Of which held by consumers that cannot spill.
    unspillable: usize,
    /// Registered consumers that can spill.
    spillers: usize,
}

impl State {
    fn add(&mut self, reservation: &MemoryReservation, delta: usize) {
        self.used += delta;
        if !reservation.consumer().can_spill() {
            self.unspillable += delta;
        }
    }

    fn sub(&mut self, reservation: &MemoryReservation, delta: usize) {
        self.used = self.used.saturating_sub(delta);
        if !reservation.consumer().can_spill() {
            self.unspillable = self.unspillable.saturating_sub(delta);
        }
    }

    /// Whether `additional` more bytes may go to `reservation`: they fit
    /// the pool, and (`fair`) a spilling consumer stays within its part.
    fn admits(
        &self,
        reservation: &MemoryReservation,
        additional: usize,
        limit: usize,
        fair: bool,
    ) -> bool {
        if self.used.saturating_add(additional) > limit {
            return false;
        }
        if !fair || !reservation.consumer().can_spill() {
            return true;
        }
        let share = limit.saturating_sub(self.unspillable) / self.spillers.max(1);
        reservation.size().saturating_add(additional) <= share
    }

    fn register(&mut self, consumer: &MemoryConsumer) {
        if consumer.can_spill() {
            self.spillers += 1;
        }
    }

    fn unregister(&mut self, consumer: &MemoryConsumer) {
        if consumer.can_spill() {
            self.spillers = self.spillers.saturating_sub(1);
        }
    }
}

/// The `--query-memory` bytes all running queries share. Queries reserve
/// through their own [`QueryPool`]; the lock makes each refusal and its
/// verdict one decision on one state of the pool.
#[derive(Debug)]
pub struct SharedPool {
    limit: usize,
    /// Whether spilling consumers are held to their part (queries spill);
    /// with spilling off they fail when refused, and take what is free.
    fair: bool,
    state: Mutex<State>,
}

impl SharedPool {
    pub fn new(limit: usize, fair: bool) -> Self {
        Self {
            limit,
            fair,
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves a consistent count (no
        // update can panic halfway).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
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

    fn register(&self, consumer: &MemoryConsumer) {
        self.state().register(consumer);
    }

    fn unregister(&self, consumer: &MemoryConsumer) {
        self.state().unregister(consumer);
    }

    fn grow(&self, reservation: &MemoryReservation, additional: usize) {
        self.state().add(reservation, additional);
    }

    fn shrink(&self, reservation: &MemoryReservation, shrink: usize) {
        self.state().sub(reservation, shrink);
    }

    fn try_grow(&self, reservation: &MemoryReservation, additional: usize) -> Result<()> {
        let mut state = self.state();
        if !state.admits(reservation, additional, self.limit, self.fair) {
            return Err(refusal(reservation, additional, state.used, self.limit));
        }
        state.add(reservation, additional);
        Ok(())
    }

    fn reserved(&self) -> usize {
        self.state().used
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
    /// This query's part of the shared state: what its reservations hold
    /// and its spilling consumers (changed under the shared lock, and
    /// locked after it).
    mine: Mutex<State>,
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
            mine: Mutex::new(State::default()),
            refused: AtomicBool::new(false),
            too_big: AtomicBool::new(false),
        }
    }

    /// Whether the query's reservations were refused only because other
    /// queries held the pool (and none because the query is too big).
    pub fn crowded_out(&self) -> bool {
        self.refused.load(Ordering::Acquire) && !self.too_big.load(Ordering::Acquire)
    }

    fn mine(&self) -> MutexGuard<'_, State> {
        self.mine.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes this query holds now.
    pub fn own(&self) -> usize {
        self.mine().used
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

/// Counts `n` more bytes of `reservation` in the shared state and the
/// query's own (both locked by the caller, shared first).
fn add(state: &mut State, mine: &mut State, reservation: &MemoryReservation, n: usize) {
    state.add(reservation, n);
    mine.add(reservation, n);
    crate::metrics::METRICS.query_memory_bytes.add(n as i64);
}

impl MemoryPool for QueryPool {
    fn name(&self) -> &str {
        "query"
    }

    fn register(&self, consumer: &MemoryConsumer) {
        let mut state = self.shared.state();
        state.register(consumer);
        self.mine().register(consumer);
    }

    fn unregister(&self, consumer: &MemoryConsumer) {
        let mut state = self.shared.state();
        state.unregister(consumer);
        self.mine().unregister(consumer);
    }

    fn grow(&self, reservation: &MemoryReservation, additional: usize) {
        let mut state = self.shared.state();
        add(&mut state, &mut self.mine(), reservation, additional);
    }

    fn shrink(&self, reservation: &MemoryReservation, shrink: usize) {
        let mut state = self.shared.state();
        let mut mine = self.mine();
        let shrink = shrink.min(mine.used);
        state.sub(reservation, shrink);
        mine.sub(reservation, shrink);
        crate::metrics::METRICS
            .query_memory_bytes
            .add(-(shrink as i64));
    }

    fn try_grow(&self, reservation: &MemoryReservation, additional: usize) -> Result<()> {
        let (limit, fair) = (self.shared.limit, self.shared.fair);
        let mut state = self.shared.state();
        let mut mine = self.mine();
        if state.admits(reservation, additional, limit, fair) {
            add(&mut state, &mut mine, reservation, additional);
            return Ok(());
        }
        // With spilling on, a spilling consumer's refusal is routine: it
        // spills and goes on. Should it fail anyway (nothing left to
        // spill), the query gets the conservative verdict, too big (422).
        if fair && reservation.consumer().can_spill() {
            return Err(refusal(reservation, additional, state.used, limit));
        }
        // The same rules on this query's part alone: would it have been
        // refused with no other query running?
        if !mine.admits(reservation, additional, limit, fair) {
            self.too_big.store(true, Ordering::Release);
        }
        self.refused.store(true, Ordering::Release);
        Err(refusal(reservation, additional, state.used, limit))
    }

    fn reserved(&self) -> usize {
        self.shared.state().used
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
        let shared = Arc::new(SharedPool::new(1000, true));
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

    #[test]
    fn spilling_consumers_share_what_the_others_leave() {
        let shared = Arc::new(SharedPool::new(1000, true));
        let pool = |p: &Arc<QueryPool>| -> Arc<dyn MemoryPool> { p.clone() };
        let a = Arc::new(QueryPool::new(shared.clone()));
        let b = Arc::new(QueryPool::new(shared.clone()));
        let join = MemoryConsumer::new("build").register(&pool(&a));
        join.try_grow(200).unwrap();
        // Alone, a sort may take everything the join leaves.
        let sort_a = MemoryConsumer::new("sort a")
            .with_can_spill(true)
            .register(&pool(&a));
        sort_a.try_grow(800).unwrap();
        sort_a.shrink(500);
        // A second spiller halves the part: 400 each.
        let sort_b = MemoryConsumer::new("sort b")
            .with_can_spill(true)
            .register(&pool(&b));
        sort_b.try_grow(400).unwrap();
        let err = sort_b.try_grow(1).unwrap_err();
        assert!(err.to_string().contains("--query-memory"), "{err}");
        // A spilling consumer's refusal makes it spill: no verdict.
        assert!(!b.crowded_out());
        sort_a.try_grow(100).unwrap();
        sort_a.try_grow(1).unwrap_err();
        sort_a.shrink(100);
        sort_b.shrink(150);
        // Unspillable consumers are held to the pool only.
        let result = MemoryConsumer::new("result").register(&pool(&b));
        result.try_grow(250).unwrap();
        result.try_grow(1).unwrap_err();
        result.shrink(200);
        // The part shrinks as unspillable memory grows: (1000 - 250) / 2,
        // though the pool has room.
        sort_a.try_grow(75).unwrap();
        sort_a.try_grow(1).unwrap_err();
        assert_eq!(shared.reserved(), 200 + 375 + 250 + 50);
        drop((sort_a, join, result));
        // Alone again, with no unspillable memory: the whole pool.
        sort_b.try_grow(750).unwrap();
        assert_eq!(shared.reserved(), 1000);
        drop(sort_b);
        assert_eq!((shared.reserved(), a.own(), b.own()), (0, 0, 0));
        assert_eq!(shared.state().spillers, 0);
    }

    #[test]
    fn a_spill_is_no_verdict_and_without_spilling_there_are_no_parts() {
        let pool = |p: &Arc<QueryPool>| -> Arc<dyn MemoryPool> { p.clone() };
        let shared = Arc::new(SharedPool::new(1000, true));
        let q = Arc::new(QueryPool::new(shared.clone()));
        let sorts = [0, 1].map(|i| {
            MemoryConsumer::new(format!("sort {i}"))
                .with_can_spill(true)
                .register(&pool(&q))
        });
        sorts[0].try_grow(500).unwrap();
        sorts[0].try_grow(1).unwrap_err();
        assert!(!q.crowded_out(), "a spill, not a verdict");
        // A sort that spilled does not make a later crowded-out refusal of
        // the same query look too big.
        let other = Arc::new(QueryPool::new(shared.clone()));
        let held = MemoryConsumer::new("held").register(&pool(&other));
        held.try_grow(400).unwrap();
        let result = MemoryConsumer::new("result").register(&pool(&q));
        result.try_grow(200).unwrap_err();
        assert!(q.crowded_out(), "alone it would fit");
        drop((sorts, held, result));

        // With spilling off there are no parts: a refusal fails the query,
        // so a spilling consumer takes what is free.
        let shared = Arc::new(SharedPool::new(1000, false));
        let q = Arc::new(QueryPool::new(shared.clone()));
        let sorts = [0, 1].map(|i| {
            MemoryConsumer::new(format!("sort {i}"))
                .with_can_spill(true)
                .register(&pool(&q))
        });
        sorts[0].try_grow(900).unwrap();
        sorts[1].try_grow(100).unwrap();
        sorts[1].try_grow(1).unwrap_err();
        assert!(!q.crowded_out());
    }
}
