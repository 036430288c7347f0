//! An opt-in per-layer profile of the forward passes (and of the custom ops' backward passes):
//! wall time, calls and FLOPs of each kind of layer at each shape (e.g. `conv3x3 winograd
//! 320->320 64x64`), summed over a run.
//! `diffuse bench --profile` prints it, to show where a UNet step's time goes. On a GPU, whose
//! work runs behind the host's, [`sync_with`] makes each timed layer wait for the device before
//! and after it (the waits add a little to every layer).
//!
//! Off by default, and then each instrumented layer pays one relaxed atomic load. Layers are
//! timed around the whole call, so time spent in candle ops between them (residual adds,
//! reshapes, copies) is the run's total minus the table's sum.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The process-wide profiler the instrumented layers report to.
static GLOBAL: Profiler = Profiler::new();

thread_local! {
    /// Whether this thread is inside a timed call (whose time then covers any nested one).
    static INSIDE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// What one kind of layer at one shape cost over the profiled run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Entry {
    pub calls: u64,
    pub time: Duration,
    /// Floating-point operations (a multiply-add counts two).
    pub flops: f64,
}

/// A switch and a table of entries. The layers use the global one; tests make their own, so
/// that layers run by other tests in the same process cannot land in a test's table.
pub struct Profiler {
    enabled: AtomicBool,
    table: Mutex<Option<HashMap<String, Entry>>>,
    /// The device to wait for around each timed layer.
    sync: Mutex<Option<candle_core::Device>>,
}

impl Profiler {
    pub const fn new() -> Self {
        Self {
            enabled: AtomicBool::new(false),
            table: Mutex::new(None),
            sync: Mutex::new(None),
        }
    }

    /// Waits for `device`'s queued work around each timed layer (`None`: time the host only).
    pub fn sync_with(&self, device: Option<candle_core::Device>) {
        *self.sync.lock().unwrap_or_else(|e| e.into_inner()) = device;
    }

    fn wait(&self) {
        if let Some(d) = self.sync.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            // A failed wait shows up in the next op; the profile only loses precision.
            let _ = d.synchronize();
        }
    }

    /// Starts (clearing what was recorded) or stops recording.
    pub fn enable(&self, on: bool) {
        if on {
            *self.table.lock().unwrap_or_else(|e| e.into_inner()) = Some(HashMap::new());
        }
        self.enabled.store(on, Ordering::Relaxed);
    }

    /// What was recorded since `enable(true)`, most time first.
    pub fn take(&self) -> Vec<(String, Entry)> {
        let table = self.table.lock().unwrap_or_else(|e| e.into_inner()).take();
        let mut rows: Vec<_> = table.unwrap_or_default().into_iter().collect();
        rows.sort_by(|a, b| b.1.time.cmp(&a.1.time).then_with(|| a.0.cmp(&b.0)));
        rows
    }

    /// Runs `f`, and when recording adds its wall time under the name `name()` returns. The
    /// name is only built when recording, so it may format shapes. A timed call inside another
    /// one on the same thread (a backward pass that runs a timed layer) is not recorded: the
    /// outer row holds its time, and no time is counted twice.
    pub fn timed<T>(&self, name: impl FnOnce() -> String, flops: f64, f: impl FnOnce() -> T) -> T {
        if !self.enabled.load(Ordering::Relaxed) || INSIDE.get() {
            return f();
        }
        self.wait();
        let start = Instant::now();
        INSIDE.set(true);
        // Reset even if `f` panics: a test's panic must not silence this thread's later calls.
        struct Leave;
        impl Drop for Leave {
            fn drop(&mut self) {
                INSIDE.set(false);
            }
        }
        let leave = Leave;
        let out = f();
        drop(leave);
        self.wait();
        let time = start.elapsed();
        if let Some(table) = self
            .table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            let e = table.entry(name()).or_default();
            e.calls += 1;
            e.time += time;
            e.flops += flops;
        }
        out
    }
}

impl Default for Profiler {
    fn default() -> Self {
        Self::new()
    }
}

/// Starts (clearing what was recorded) or stops the global profile.
pub fn enable(on: bool) {
    GLOBAL.enable(on)
}

/// [`Profiler::sync_with`] on the global profiler.
pub fn sync_with(device: Option<candle_core::Device>) {
    GLOBAL.sync_with(device)
}

/// What the global profile recorded since [`enable`]`(true)`, most time first.
pub fn take() -> Vec<(String, Entry)> {
    GLOBAL.take()
}

/// [`Profiler::timed`] on the global profiler (what the layers call; other crates time their
/// phases with it, e.g. a training step's optimizer update).
pub fn timed<T>(name: impl FnOnce() -> String, flops: f64, f: impl FnOnce() -> T) -> T {
    GLOBAL.timed(name, flops, f)
}

/// [`timed`] for a custom op's backward pass (`bwd`), named by the op and the shape of the
/// output gradient it takes (its forward output's), e.g. `group-norm backward [64, 32, 32, 32]`.
pub(crate) fn timed_backward<T>(op: &str, grad: &candle_core::Tensor, f: impl FnOnce() -> T) -> T {
    timed(|| format!("{op} backward {:?}", grad.dims()), 0.0, f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_only_while_enabled() {
        // A profiler of its own: layers other tests run meanwhile report to the global one.
        let p = Profiler::new();
        assert_eq!(p.timed(|| unreachable!(), 1.0, || 7), 7);
        p.enable(true);
        for _ in 0..3 {
            p.timed(
                || "a".into(),
                2.0,
                || std::thread::sleep(Duration::from_millis(2)),
            );
        }
        p.timed(|| "b".into(), 1.0, || ());
        p.enable(false);
        p.timed(|| unreachable!(), 1.0, || ());
        let rows = p.take();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].0, "a");
        assert_eq!((rows[0].1.calls, rows[0].1.flops), (3, 6.0));
        assert!(rows[0].1.time >= Duration::from_millis(6));
        assert_eq!((rows[1].0.as_str(), rows[1].1.calls), ("b", 1));
        assert!(p.take().is_empty());
    }

    #[test]
    fn a_timed_call_inside_another_is_not_counted_twice() {
        let p = Profiler::new();
        p.enable(true);
        let inner = || p.timed(|| "inner".into(), 1.0, || 5);
        assert_eq!(p.timed(|| "outer".into(), 2.0, || inner() + 1), 6);
        // On its own again (the outer call has ended), the inner one is recorded.
        assert_eq!(inner(), 5);
        let rows: HashMap<String, Entry> = p.take().into_iter().collect();
        assert_eq!(rows.len(), 2);
        assert_eq!((rows["outer"].calls, rows["outer"].flops), (1, 2.0));
        assert_eq!((rows["inner"].calls, rows["inner"].flops), (1, 1.0));
    }
}
