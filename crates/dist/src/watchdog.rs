//! A thread that ends the job when a collective waits too long.
//!
//! MPI collectives have no timeout: a rank that hangs (stopped, stuck on a file system, cut
//! off) stalls the others forever, and a launcher does not always notice a rank that died.
//! The watchdog is told when a collective starts and ends, and when one has waited longer than
//! the timeout it prints what was waited for and runs the given `expire` (which ends the job).
#![cfg_attr(not(feature = "mpi"), allow(dead_code))]

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[derive(Default)]
struct State {
    /// The collective under way and when it started.
    current: Option<(String, Instant)>,
    stop: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent whatever panicked while holding it.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

pub(crate) struct Watchdog {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// Starts the thread; `label` prefixes its message (`rank R/N`).
    pub(crate) fn start(
        timeout: Duration,
        label: String,
        expire: impl FnOnce() + Send + 'static,
    ) -> Self {
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("collective-watchdog".into())
            .spawn(move || {
                let mut st = s.lock();
                loop {
                    if st.stop {
                        return;
                    }
                    let left = match &st.current {
                        None => None,
                        Some((what, since)) => {
                            let waited = since.elapsed();
                            if waited >= timeout {
                                crate::eprint_line(format_args!(
                                    "{label}: error: {what} has waited {:.0} s for the other ranks \
                                     (the collective timeout is {} s): a rank has died or hangs; \
                                     ending the job",
                                    waited.as_secs_f64(),
                                    timeout.as_secs_f64()
                                ));
                                drop(st);
                                expire();
                                return;
                            }
                            Some(timeout - waited)
                        }
                    };
                    st = match left {
                        None => s.wake.wait(st).unwrap_or_else(PoisonError::into_inner),
                        Some(d) => {
                            s.wake
                                .wait_timeout(st, d)
                                .unwrap_or_else(PoisonError::into_inner)
                                .0
                        }
                    };
                }
            })
            .expect("spawning the collective watchdog thread");
        Self {
            shared,
            thread: Some(thread),
        }
    }

    /// Runs the collective `f` under watch.
    pub(crate) fn guard<T>(&self, what: &str, f: impl FnOnce() -> T) -> T {
        self.shared.lock().current = Some((what.to_string(), Instant::now()));
        self.shared.wake.notify_one();
        let out = f();
        self.shared.lock().current = None;
        out
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn expires_only_on_a_collective_past_the_timeout() {
        let fired = Arc::new(AtomicBool::new(false));
        let f = fired.clone();
        let dog = Watchdog::start(Duration::from_millis(200), "rank 0/2".into(), move || {
            f.store(true, Ordering::SeqCst)
        });
        dog.guard("a quick sum", || {
            std::thread::sleep(Duration::from_millis(20))
        });
        // Idle time between collectives does not count.
        std::thread::sleep(Duration::from_millis(300));
        assert!(!fired.load(Ordering::SeqCst));
        dog.guard("a stalled sum", || {
            std::thread::sleep(Duration::from_millis(600))
        });
        assert!(fired.load(Ordering::SeqCst));
    }
}
