//! CPU time of the load side: this process's threads (frontend driver, far-end sink/source)
//! read from their per-thread CPU clocks, so a cell can say whether the load generator, not the
//! backend, was the limit.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use vutap_testbed::host_cpu::thread_ids;

/// Each thread's CPU time in ns, by thread id.
pub type ThreadTimes = BTreeMap<i32, u64>;

/// CPU time of every thread of this process: the first field of `/proc/self/task/TID/schedstat`
/// (ns on CPU), or utime + stime where schedstat is missing.
pub fn thread_times() -> ThreadTimes {
    thread_ids("self").into_iter().map(|tid| (tid, thread_ns(tid))).collect()
}

fn thread_ns(tid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| vutap_testbed::host_cpu::cpu_ns(&format!("self/task/{tid}")))
}

/// The load side's CPU over a window, busy time only: the far-side thread polls its socket
/// instead of sleeping, and the CPU it spends polling an empty one (`polling`) is not load.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadCpu {
    /// All load threads together, in cores.
    pub cores: f64,
    /// The busiest load thread, as a fraction of one core.
    pub busiest_thread: f64,
    /// Cores the far-side thread spent polling an empty socket (left out of the two above).
    #[serde(default)]
    pub polling: f64,
}

/// A thread's time spent polling for nothing over a window: its id, and ns.
#[derive(Clone, Copy, Debug, Default)]
pub struct Polling {
    pub tid: i32,
    pub ns: u64,
}

impl LoadCpu {
    /// Between two samples over `secs`, leaving out `backend` threads (the raw loop's, which
    /// run in this process) and `polling` from its thread's time. A thread that appeared in
    /// between counts from zero.
    pub fn between(before: &ThreadTimes, after: &ThreadTimes, backend: &[i32], polling: Polling, secs: f64) -> LoadCpu {
        if secs <= 0.0 {
            return LoadCpu::default();
        }
        let mut polled = 0;
        let per_thread = after.iter().filter(|(tid, _)| !backend.contains(tid)).map(|(&tid, &ns)| {
            let mut ran = ns.saturating_sub(before.get(&tid).copied().unwrap_or(0));
            if tid == polling.tid {
                polled = polling.ns.min(ran);
                ran -= polled;
            }
            ran as f64 / 1e9 / secs
        });
        let load = per_thread.fold(LoadCpu::default(), |acc, c| LoadCpu {
            cores: acc.cores + c,
            busiest_thread: acc.busiest_thread.max(c),
            polling: 0.0,
        });
        LoadCpu { polling: polled as f64 / 1e9 / secs, ..load }
    }

    /// The load side was the limit: one of its threads, or all its CPUs, at least 90 % busy,
    /// while the backend stayed below 90 % of what it could use.
    pub fn was_the_limit(&self, load_cpus: usize, backend_cores: f64, backend_capacity: f64) -> bool {
        const BUSY: f64 = 0.9;
        let load_busy = self.busiest_thread >= BUSY || self.cores >= BUSY * load_cpus.max(1) as f64;
        load_busy && backend_cores < BUSY * backend_capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_between_sums_load_threads_and_leaves_out_the_backend() {
        let before = ThreadTimes::from([(1, 0), (2, 1_000_000_000), (3, 0)]);
        let after = ThreadTimes::from([(1, 500_000_000), (2, 2_000_000_000), (3, 2_000_000_000), (4, 100_000_000)]);
        let l = LoadCpu::between(&before, &after, &[3], Polling::default(), 2.0);
        assert!((l.cores - (0.25 + 0.5 + 0.05)).abs() < 1e-9, "{l:?}");
        assert!((l.busiest_thread - 0.5).abs() < 1e-9, "{l:?}");
        assert_eq!(l.polling, 0.0);
    }

    #[test]
    fn test_between_leaves_out_the_far_threads_polling() {
        let before = ThreadTimes::from([(1, 0), (2, 0)]);
        let after = ThreadTimes::from([(1, 600_000_000), (2, 1_800_000_000)]);
        // Thread 2 (the sink) ran 0.9 cores, 0.6 of them polling an empty socket.
        let l = LoadCpu::between(&before, &after, &[], Polling { tid: 2, ns: 1_200_000_000 }, 2.0);
        assert!((l.cores - 0.6).abs() < 1e-9, "{l:?}");
        assert!((l.busiest_thread - 0.3).abs() < 1e-9, "{l:?}");
        assert!((l.polling - 0.6).abs() < 1e-9, "{l:?}");
        assert!(!l.was_the_limit(1, 0.5, 1.0), "a polling sink is not a busy load side");
        // Polling never counts for more than the thread ran.
        let l = LoadCpu::between(&before, &after, &[], Polling { tid: 1, ns: 5_000_000_000 }, 2.0);
        assert!((l.cores - 0.9).abs() < 1e-9 && (l.polling - 0.3).abs() < 1e-9, "{l:?}");
    }

    #[test]
    fn test_was_the_limit_needs_a_busy_load_and_an_idle_backend() {
        let busy_thread = LoadCpu { cores: 0.95, busiest_thread: 0.93, polling: 0.0 };
        assert!(busy_thread.was_the_limit(1, 0.6, 1.0));
        assert!(!busy_thread.was_the_limit(1, 0.95, 1.0), "a saturated backend is the limit itself");
        let spread = LoadCpu { cores: 1.85, busiest_thread: 0.6, polling: 0.0 };
        assert!(spread.was_the_limit(2, 0.5, 1.0));
        assert!(!LoadCpu { cores: 1.0, busiest_thread: 0.6, polling: 0.0 }.was_the_limit(2, 0.5, 1.0));
    }

    #[test]
    fn test_thread_times_sees_this_thread_run() {
        // SAFETY: gettid has no preconditions.
        let me = unsafe { libc::gettid() };
        let t0 = thread_times();
        let end = std::time::Instant::now() + std::time::Duration::from_millis(30);
        while std::time::Instant::now() < end {
            std::hint::spin_loop();
        }
        let t1 = thread_times();
        let (before, after) = (t0.get(&me), t1.get(&me));
        assert!(matches!((before, after), (Some(b), Some(a)) if a > b), "{before:?} -> {after:?}");
    }
}
