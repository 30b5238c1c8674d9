//! The threads Parquet encoding runs on, all off the request path.
//!
//! A scheduled flush encodes on the *background* thread, which runs at idle
//! CPU priority (Linux `SCHED_IDLE`; nice 19 where that is refused): it only
//! gets the CPU that request handling leaves unused, so at moderate load a
//! flush costs acknowledgements nothing. An encode that starts, or comes to be,
//! while `hurry` holds (flushing has fallen behind, or an explicit flush is
//! waiting) runs on the *foreground* thread at normal priority instead, so
//! under full load flushes keep pace as they would without the background
//! thread.
//!
//! A background encode that has to hurry is not moved: a starved idle-priority
//! thread may sit in the middle of a step for as long as the CPU stays busy.
//! It is cancelled (it stops at its next step) and the foreground thread
//! encodes the same frozen rows from the start. A thread's priority can be
//! lowered without privileges but not raised again, hence two threads.
//!
//! Compaction encodes on a third thread, at idle priority too and never
//! hurried: a merge of many minutes' rows must not hold up a flush queued
//! behind it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::parquet::{Encoded, Encoder, Error, Result};

/// Builds the encoder (schema unification, hour split and sort keys are
/// O(rows), so this runs on the encode thread too). Called again when a
/// background encode is redone in the foreground.
pub type Start = Arc<dyn Fn() -> Result<Encoder> + Send + Sync>;

struct Job {
    ticket: Arc<Ticket>,
    reply: oneshot::Sender<Result<Vec<Encoded>>>,
}

/// What a job and the flush waiting for it share.
struct Ticket {
    /// Taken when the job starts, or emptied when it is cancelled while still
    /// queued (so a queue of cancelled jobs holds no memtable rows).
    start: Mutex<Option<Start>>,
    cancelled: AtomicBool,
}

impl Ticket {
    /// Stops the job: at once if it is queued, at its next step if it runs.
    fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
        self.start.lock().take();
    }
}

pub struct EncodeThreads {
    background: mpsc::Sender<Job>,
    foreground: mpsc::Sender<Job>,
    compaction: mpsc::Sender<Job>,
    hurry: Box<dyn Fn() -> bool + Send + Sync>,
}

type Reply = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<Encoded>>> + Send>>;

/// How often a waiting flush asks whether its background encode must hurry.
const HURRY_CHECK: Duration = Duration::from_millis(50);

impl EncodeThreads {
    /// Starts the threads; `hurry` says whether a flush should encode at
    /// normal priority.
    pub fn start(hurry: impl Fn() -> bool + Send + Sync + 'static) -> std::io::Result<Self> {
        let thread = |name: &str, idle: bool| -> std::io::Result<mpsc::Sender<Job>> {
            let (tx, rx) = mpsc::channel::<Job>();
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || {
                    if idle {
                        lower_priority();
                    }
                    rx.into_iter().for_each(run)
                })?;
            Ok(tx)
        };
        Ok(Self {
            foreground: thread("flush-encode", false)?,
            background: thread("flush-encode-bg", true)?,
            compaction: thread("compact-encode", true)?,
            hurry: Box::new(hurry),
        })
    }

    /// Encodes to the end: in the foreground when `urgent` or hurried,
    /// otherwise in the background unless it has to hurry before it is done.
    pub async fn encode(&self, start: Start, urgent: bool) -> Result<Vec<Encoded>> {
        if urgent || (self.hurry)() {
            return self.submit(&self.foreground, start).1.await;
        }
        let (ticket, mut done) = self.submit(&self.background, start.clone());
        loop {
            tokio::select! {
                result = &mut done => return result,
                _ = tokio::time::sleep(HURRY_CHECK) => {
                    if (self.hurry)() {
                        ticket.cancel();
                        return self.submit(&self.foreground, start).1.await;
                    }
                }
            }
        }
    }

    /// Encodes on the compaction thread (idle priority) to the end, never
    /// hurried: for work nothing waits on, which must take neither the
    /// normal-priority thread from flushes that fell behind nor the
    /// background one from flushes queued after it.
    pub async fn encode_idle(&self, start: Start) -> Result<Vec<Encoded>> {
        self.submit(&self.compaction, start).1.await
    }

    fn submit(&self, queue: &mpsc::Sender<Job>, start: Start) -> (Arc<Ticket>, Reply) {
        let (reply, rx) = oneshot::channel();
        let ticket = Arc::new(Ticket {
            start: Mutex::new(Some(start)),
            cancelled: AtomicBool::new(false),
        });
        let job = Job {
            ticket: ticket.clone(),
            reply,
        };
        let sent = queue.send(job).is_ok();
        let done = async move {
            if !sent {
                return Err(Error::Stopped);
            }
            rx.await.map_err(|_| Error::Stopped)?
        };
        (ticket, Box::pin(done))
    }
}

/// Steps a job to the end, or until it is cancelled (then nobody waits for it).
fn run(job: Job) {
    let Some(start) = job.ticket.start.lock().take() else {
        return; // cancelled while queued
    };
    // A panic (a bug in an encoder or below it) fails this flush, which is
    // retried, instead of taking the thread and every later flush with it.
    // The encoder is dropped with it; the frozen rows it read are immutable.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut encoder = start()?;
        while !encoder.step()? {
            if job.ticket.cancelled.load(Ordering::Relaxed) {
                return Ok(None);
            }
        }
        Ok(Some(encoder.finish()))
    }))
    .unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-string payload".into());
        Err(Error::Panicked(what))
    });
    match result {
        Ok(Some(files)) => {
            let _ = job.reply.send(Ok(files));
        }
        Ok(None) => {}
        Err(e) => {
            let _ = job.reply.send(Err(e));
        }
    }
}

/// Puts the calling thread at idle CPU priority.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: plain syscalls on the calling thread (pid 0) with a valid,
        // initialised `sched_param`; failure is reported through the return
        // value only.
        let idle = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } == 0;
        if !idle {
            // SAFETY: as above; on Linux PRIO_PROCESS with who = 0 is the
            // calling thread.
            let niced = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) } == 0;
            if !niced {
                tracing::warn!("could not lower the background encode thread's priority");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flush::parquet::EncodeOptions;
    use arrow::array::TimestampNanosecondArray;
    use arrow::record_batch::RecordBatch;
    use std::sync::atomic::AtomicUsize;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_background_encode_that_must_hurry_is_redone_in_the_foreground() {
        let hurry = Arc::new(AtomicBool::new(false));
        let h = hurry.clone();
        let threads = EncodeThreads::start(move || h.load(Ordering::Relaxed)).unwrap();
        let ts = TimestampNanosecondArray::from(vec![3, 1, 2]).with_timezone("UTC");
        let batch = RecordBatch::try_from_iter([("timestamp", Arc::new(ts) as _)]).unwrap();
        let opts = EncodeOptions {
            row_group_rows: 1024,
            zstd_level: 1,
        };
        let calls = Arc::new(AtomicUsize::new(0));
        let calls_in = calls.clone();
        let (gate_tx, gate_rx) = mpsc::channel::<()>();
        let gate = Mutex::new(gate_rx);
        let start: Start = Arc::new(move || {
            // The background run blocks here, as a starved thread would.
            if calls_in.fetch_add(1, Ordering::SeqCst) == 0 {
                let _ = gate.lock().recv();
            }
            Encoder::new("things", std::slice::from_ref(&batch), opts.clone())
        });
        let task = tokio::spawn(async move { threads.encode(start, false).await });
        while calls.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            !task.is_finished(),
            "nothing may finish while the background run is stuck"
        );
        hurry.store(true, Ordering::Relaxed);
        let files = task.await.unwrap().unwrap();
        assert_eq!((files.len(), files[0].rows), (1, 3));
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "redone from the start in the foreground"
        );
        // The cancelled background run stops at its first step.
        gate_tx.send(()).unwrap();
    }

    #[tokio::test]
    async fn a_panicking_encode_fails_its_flush_and_the_thread_goes_on() {
        let threads = EncodeThreads::start(|| false).unwrap();
        let boom: Start = Arc::new(|| panic!("encoder bug"));
        for urgent in [true, false] {
            match threads.encode(boom.clone(), urgent).await {
                Err(Error::Panicked(m)) => assert_eq!(m, "encoder bug"),
                other => panic!("{:?}", other.map(|f| f.len())),
            }
        }
        let ts = TimestampNanosecondArray::from(vec![1]).with_timezone("UTC");
        let batch = RecordBatch::try_from_iter([("timestamp", Arc::new(ts) as _)]).unwrap();
        let opts = EncodeOptions {
            row_group_rows: 1024,
            zstd_level: 1,
        };
        let ok: Start =
            Arc::new(move || Encoder::new("things", std::slice::from_ref(&batch), opts.clone()));
        for urgent in [true, false] {
            let files = threads.encode(ok.clone(), urgent).await.unwrap();
            assert_eq!(files[0].rows, 1);
        }
    }
}
