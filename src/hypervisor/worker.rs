//! A thread that runs blocking calls one at a time, with a timeout on each
//! call as seen from the async side.
//!
//! Protocol of a call, step by step:
//! 1. [`Worker::call`] checks whether the thread is stuck: busy with one job
//!    for longer than this call's timeout. A stuck thread is abandoned (it
//!    finishes its job whenever the blocking call returns, then exits) and a
//!    new thread takes over, at most [`MAX_ABANDONED`] at a time; beyond
//!    that the call fails at once with [`CallError::Stuck`].
//! 2. The job goes into the thread's queue with a oneshot for its answer.
//!    A job whose caller gave up before it started is skipped.
//! 3. The caller waits for the answer up to the timeout
//!    ([`CallError::Timeout`]); the job itself cannot be cancelled.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// Abandoned threads (stuck in a call) allowed at once: each holds a thread
/// and whatever its call holds, until that call returns.
pub const MAX_ABANDONED: usize = 2;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    #[error("no answer within {timeout:?}")]
    Timeout { timeout: Duration },
    #[error("{MAX_ABANDONED} earlier calls are still stuck (the oldest for {stuck_for:?})")]
    Stuck { stuck_for: Duration },
    #[error("the worker thread cannot be started: {0}")]
    Spawn(String),
}

/// A call and how long its caller waits for it.
struct Job<C> {
    timeout: Duration,
    run: Box<dyn FnOnce(&C) + Send>,
}

struct Thread<C> {
    jobs: mpsc::Sender<Job<C>>,
    /// Since when the thread runs its current job, and that job's timeout.
    busy: Arc<Mutex<Option<(Instant, Duration)>>>,
    /// Set when replaced; the thread counts itself out of `abandoned` when
    /// its stuck job returns.
    abandoned: Arc<AtomicBool>,
}

/// One named thread running jobs that borrow a shared context `C`.
pub struct Worker<C: Send + Sync + 'static> {
    name: &'static str,
    context: Arc<C>,
    thread: Mutex<Option<Thread<C>>>,
    abandoned: Arc<AtomicUsize>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<C: Send + Sync + 'static> Worker<C> {
    /// The thread starts with the first call.
    pub fn new(name: &'static str, context: Arc<C>) -> Self {
        Self {
            name,
            context,
            thread: Mutex::new(None),
            abandoned: Arc::default(),
        }
    }

    /// Threads abandoned in a stuck call and not yet returned.
    pub fn abandoned(&self) -> usize {
        self.abandoned.load(Ordering::SeqCst)
    }

    /// Runs `f` on the worker thread; its result, or why there is none.
    pub async fn call<T: Send + 'static>(
        &self,
        timeout: Duration,
        f: impl FnOnce(&C) -> T + Send + 'static,
    ) -> Result<T, CallError> {
        let (tx, rx) = oneshot::channel();
        let job = Job {
            timeout,
            run: Box::new(move |context: &C| {
                if !tx.is_closed() {
                    let _ = tx.send(f(context));
                }
            }),
        };
        self.submit(job)?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(value)) => Ok(value),
            // The thread died with the job (a panic in the call).
            Ok(Err(_)) => Err(CallError::Spawn(format!("{} thread ended", self.name))),
            Err(_) => Err(CallError::Timeout { timeout }),
        }
    }

    fn submit(&self, job: Job<C>) -> Result<(), CallError> {
        let mut slot = lock(&self.thread);
        if let Some(thread) = slot.as_ref() {
            // Stuck: its caller has given up on the job it runs.
            let busy = *lock(&thread.busy);
            if let Some((since, timeout)) = busy
                && since.elapsed() > timeout
            {
                let stuck_for = since.elapsed();
                if self.abandoned.load(Ordering::SeqCst) >= MAX_ABANDONED {
                    return Err(CallError::Stuck { stuck_for });
                }
                tracing::warn!(
                    worker = self.name,
                    stuck_ms = stuck_for.as_millis() as u64,
                    "a libvirt call has not returned; continuing on a new thread"
                );
                thread.abandoned.store(true, Ordering::SeqCst);
                self.abandoned.fetch_add(1, Ordering::SeqCst);
                *slot = None;
            }
        }
        if slot.is_none() {
            *slot = Some(self.spawn()?);
        }
        let thread = slot.as_ref().expect("a thread was just started");
        if let Err(mpsc::SendError(job)) = thread.jobs.send(job) {
            // The thread is gone (it panicked): start another one.
            let thread = self.spawn()?;
            let _ = thread.jobs.send(job);
            *slot = Some(thread);
        }
        Ok(())
    }

    fn spawn(&self) -> Result<Thread<C>, CallError> {
        let (jobs, queue) = mpsc::channel::<Job<C>>();
        let busy_since: Arc<Mutex<Option<(Instant, Duration)>>> = Arc::default();
        let abandoned = Arc::new(AtomicBool::new(false));
        let context = self.context.clone();
        let count = self.abandoned.clone();
        let (busy, gone) = (busy_since.clone(), abandoned.clone());
        std::thread::Builder::new()
            .name(format!("libvirt-{}", self.name))
            .spawn(move || {
                for job in queue {
                    *lock(&busy) = Some((Instant::now(), job.timeout));
                    (job.run)(&context);
                    *lock(&busy) = None;
                    if gone.load(Ordering::SeqCst) {
                        break;
                    }
                }
                if gone.load(Ordering::SeqCst) {
                    count.fetch_sub(1, Ordering::SeqCst);
                }
            })
            .map_err(|e| CallError::Spawn(e.to_string()))?;
        Ok(Thread {
            jobs,
            busy: busy_since,
            abandoned,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A context whose calls block until released.
    #[derive(Default)]
    struct Gate {
        open: Mutex<bool>,
        changed: std::sync::Condvar,
    }

    impl Gate {
        fn wait(&self) {
            let mut open = lock(&self.open);
            while !*open {
                open = self.changed.wait(open).unwrap_or_else(|p| p.into_inner());
            }
        }

        fn release(&self) {
            *lock(&self.open) = true;
            self.changed.notify_all();
        }
    }

    const SHORT: Duration = Duration::from_millis(50);

    #[tokio::test]
    async fn answers_calls_in_order() {
        let worker = Worker::new("test", Arc::new(Gate::default()));
        assert_eq!(worker.call(Duration::from_secs(5), |_| 1).await, Ok(1));
        assert_eq!(worker.call(Duration::from_secs(5), |_| 2).await, Ok(2));
    }

    #[tokio::test]
    async fn a_hung_call_times_out_and_the_next_call_gets_a_new_thread() {
        let gate = Arc::new(Gate::default());
        let worker = Worker::new("test", gate.clone());
        let hung = worker.call(SHORT, |g: &Gate| g.wait()).await;
        assert_eq!(hung, Err(CallError::Timeout { timeout: SHORT }));
        std::thread::sleep(SHORT);
        // The stuck thread is replaced: this call is answered.
        assert_eq!(worker.call(SHORT, |_| 7).await, Ok(7));
        assert_eq!(worker.abandoned(), 1);
        gate.release();
        let counted_out = eventually(|| worker.abandoned() == 0);
        assert!(counted_out, "the released thread counts itself out");
    }

    #[tokio::test]
    async fn too_many_stuck_threads_fail_fast() {
        let gate = Arc::new(Gate::default());
        let worker = Worker::new("test", gate.clone());
        for _ in 0..=MAX_ABANDONED {
            let hung = worker.call(SHORT, |g: &Gate| g.wait()).await;
            assert!(matches!(hung, Err(CallError::Timeout { .. })));
            std::thread::sleep(SHORT * 2);
        }
        // Every thread allowed is stuck: no new one, no wait.
        let started = Instant::now();
        let refused = worker.call(Duration::from_secs(30), |_| ()).await;
        assert!(
            matches!(refused, Err(CallError::Stuck { .. })),
            "{refused:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(30));
        gate.release();
    }

    fn eventually(f: impl Fn() -> bool) -> bool {
        (0..200).any(|_| {
            std::thread::sleep(Duration::from_millis(10));
            f()
        })
    }
}
