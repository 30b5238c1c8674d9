//! The two threads Parquet encoding runs on, both off the request path.
//!
//! A scheduled flush starts on the *background* thread, which runs at idle CPU
//! priority (Linux `SCHED_IDLE`; nice 19 where that is refused): it only gets
//! the CPU that request handling leaves unused, so at moderate load a flush
//! costs acknowledgements nothing. Between [`Encoder::step`]s (one row group
//! each) it asks `hurry`; once memtables hold too much, the rest of that encode
//! moves to the *foreground* thread, which runs at normal priority, so under
//! full load flushes keep pace as they would without the background thread.
//! Explicit flushes (admin API, shutdown, replay) start on the foreground
//! thread.
//!
//! A thread's priority can be lowered without privileges but not raised again,
//! hence two threads rather than one that changes its priority.

use std::sync::mpsc;

use tokio::sync::oneshot;

use super::parquet::{Encoded, Encoder, Error, Result};

/// Building the encoder (schema unification, hour split, sort keys) is itself
/// O(rows), so it runs on the encode thread too.
type Start = Box<dyn FnOnce() -> Result<Encoder> + Send>;

enum Work {
    Start(Start),
    Steps(Box<Encoder>),
}

struct Job {
    work: Work,
    reply: oneshot::Sender<Result<Vec<Encoded>>>,
}

pub struct EncodeThreads {
    background: mpsc::Sender<Job>,
    foreground: mpsc::Sender<Job>,
}

impl EncodeThreads {
    /// Starts both threads; `hurry` says whether memtables are full enough
    /// that a background encode should finish at normal priority.
    pub fn start(hurry: impl Fn() -> bool + Send + 'static) -> std::io::Result<Self> {
        let (foreground, fg_rx) = mpsc::channel::<Job>();
        let (background, bg_rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("flush-encode".into())
            .spawn(move || {
                for job in fg_rx {
                    run(job, None);
                }
            })?;
        let handoff = foreground.clone();
        std::thread::Builder::new()
            .name("flush-encode-bg".into())
            .spawn(move || {
                lower_priority();
                for job in bg_rx {
                    run(job, Some((&hurry, &handoff)));
                }
            })?;
        Ok(Self {
            background,
            foreground,
        })
    }

    /// Builds the encoder with `start` and runs it to the end, starting in
    /// the background unless `urgent`.
    pub async fn encode(
        &self,
        start: impl FnOnce() -> Result<Encoder> + Send + 'static,
        urgent: bool,
    ) -> Result<Vec<Encoded>> {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            work: Work::Start(Box::new(start)),
            reply,
        };
        let queue = if urgent {
            &self.foreground
        } else {
            &self.background
        };
        queue.send(job).map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)?
    }
}

/// Steps `job` to the end, or (background) until `hurry` says to hand it over.
type Handoff<'a> = (&'a dyn Fn() -> bool, &'a mpsc::Sender<Job>);

fn run(job: Job, background: Option<Handoff<'_>>) {
    let Job { work, reply } = job;
    let mut encoder = match work {
        Work::Start(start) => match start() {
            Ok(encoder) => encoder,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        },
        Work::Steps(encoder) => *encoder,
    };
    loop {
        match encoder.step() {
            Ok(true) => {
                let _ = reply.send(Ok(encoder.finish()));
                return;
            }
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
            Ok(false) => {}
        }
        if let Some((hurry, foreground)) = background {
            if hurry() {
                // The foreground thread outlives this one (we hold a sender).
                let work = Work::Steps(Box::new(encoder));
                let _ = foreground.send(Job { work, reply });
                return;
            }
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
