//! Host CPU time of processes and threads, from /proc: what a backend cost while a benchmark or
//! an end-to-end run moved traffic through it.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::guest::Guest;
use crate::vutap::Vutap;

/// One thread of a process, as `/proc/<pid>/task/<tid>` shows it.
#[derive(Debug, Clone)]
pub struct Thread {
    /// The process, as given to [`threads`].
    pub pid: String,
    pub tid: i32,
    /// Its name (`comm`: cut to 15 bytes by the kernel).
    pub name: String,
}

impl Thread {
    /// Its `/proc` path for [`cpu_ns`]: "PID/task/TID".
    pub fn proc_path(&self) -> String {
        format!("{}/task/{}", self.pid, self.tid)
    }

    /// Its `/proc/<pid>/task/<tid>` directory.
    pub fn dir(&self) -> std::path::PathBuf {
        std::path::PathBuf::from(format!("/proc/{}", self.proc_path()))
    }
}

/// The threads of process `pid` (a number, or "self"); one that exits while they are read is
/// left out, and a process that is gone has none.
pub fn threads(pid: &str) -> Vec<Thread> {
    thread_ids(pid)
        .into_iter()
        .filter_map(|tid| {
            let name = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).ok()?.trim_end().to_string();
            Some(Thread { pid: pid.to_string(), tid, name })
        })
        .collect()
}

/// Reads of `/proc/<pid>/task` that [`thread_ids`] merges at most.
const LISTINGS: usize = 8;

/// The thread ids of process `pid` (a number, or "self"). The kernel lists a process's threads
/// oldest first and stops at one that exits while it is being listed, leaving out every younger
/// thread, so the directory is read until two reads in a row agree (at most [`LISTINGS`] times)
/// and the reads are merged.
pub fn thread_ids(pid: &str) -> BTreeSet<i32> {
    let mut all = BTreeSet::new();
    let mut last = None;
    for _ in 0..LISTINGS {
        let ids = list_threads(pid);
        all.extend(ids.iter().copied());
        if last.as_ref() == Some(&ids) {
            break;
        }
        last = Some(ids);
    }
    all
}

/// One read of `/proc/<pid>/task`.
fn list_threads(pid: &str) -> BTreeSet<i32> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return BTreeSet::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect()
}

/// The calling thread's CPU time in ns, from its own clock (exact, unlike `/proc`'s ticks).
pub fn this_thread_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec, which `ts` is.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// utime + stime of `/proc/<path>/stat` in ns (`path` = "PID", "PID/task/TID" or
/// "self/task/TID"), 0 if it cannot be read. Counts in clock ticks (10 ms); a whole process's
/// figure includes its threads that have exited.
pub fn cpu_ns(path: &str) -> u64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{path}/stat")) else { return 0 };
    let Some(rest) = s.rsplit_once(')').map(|(_, r)| r) else { return 0 };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ")": state is field 3, so utime (14) and stime (15) are at 11 and 12.
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0) + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    ticks * 1_000_000_000 / hz
}

/// CPU time the network datapath of some guests has used so far, in ns: every vutap (all its
/// threads) and every QEMU thread but the vCPUs ("CPU n/TCG", named so by
/// `-name ...,debug-threads=on`), which run the guest itself, the same work whatever the
/// backend. QEMU's own tap backend runs in those threads, and so does QEMU's delivery of a
/// vhost-user backend's interrupts (under TCG there is no irqfd).
#[derive(Debug, Clone, Copy, Default)]
pub struct DatapathCpu {
    qemu_ns: u64,
    vutap_ns: u64,
}

/// What the datapath used over a run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CpuUsed {
    /// vutap's processes plus QEMU's threads but the vCPUs, seconds.
    pub total_secs: f64,
    /// vutap's processes alone (0 with QEMU's tap backend), seconds.
    pub vutap_secs: f64,
}

impl CpuUsed {
    /// Seconds of (all of it, vutap's part) per GB, for `gbps` over `secs` (None without traffic).
    pub fn per_gb(&self, gbps: f64, secs: f64) -> Option<(f64, f64)> {
        Some((per_gb(self.total_secs, gbps, secs)?, per_gb(self.vutap_secs, gbps, secs)?))
    }
}

/// `cpu_secs` per GB moved at `gbps` for `secs` (None without traffic).
pub fn per_gb(cpu_secs: f64, gbps: f64, secs: f64) -> Option<f64> {
    let gb = gbps * secs / 8.0;
    (gb > 0.0).then(|| cpu_secs / gb)
}

impl DatapathCpu {
    /// Reads it now for each guest and the vutap serving it, if any.
    pub fn read<'a>(guests: impl IntoIterator<Item = (&'a Guest, Option<&'a Vutap>)>) -> DatapathCpu {
        let mut cpu = DatapathCpu::default();
        for (guest, vutap) in guests {
            for thread in threads(&guest.pid().to_string()) {
                if !thread.name.starts_with("CPU ") {
                    cpu.qemu_ns += cpu_ns(&thread.proc_path());
                }
            }
            if let Some(v) = vutap {
                cpu.vutap_ns += cpu_ns(&v.pid().to_string());
            }
        }
        cpu
    }

    /// What was used since `before`.
    pub fn since(self, before: DatapathCpu) -> CpuUsed {
        let qemu = self.qemu_ns.saturating_sub(before.qemu_ns) as f64 / 1e9;
        let vutap = self.vutap_ns.saturating_sub(before.vutap_ns) as f64 / 1e9;
        CpuUsed { total_secs: qemu + vutap, vutap_secs: vutap }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_cpu_ns_counts_this_threads_work_and_zero_for_no_such_process() {
        // SAFETY: gettid has no preconditions.
        let me = format!("self/task/{}", unsafe { libc::gettid() });
        let before = cpu_ns(&me);
        let t0 = std::time::Instant::now();
        let mut x = 0u64;
        while t0.elapsed() < std::time::Duration::from_millis(60) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(cpu_ns(&me) > before, "60 ms of spinning must show in 10 ms ticks");
        assert_eq!(cpu_ns("0"), 0, "no /proc/0");
    }

    #[test]
    fn test_threads_lists_each_thread_by_name() {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let helper = std::thread::Builder::new()
            .name("threads-probe".into())
            .spawn(move || {
                // SAFETY: gettid has no preconditions.
                ready_tx.send(unsafe { libc::gettid() }).unwrap();
                let _ = done_rx.recv();
            })
            .unwrap();
        let tid = ready_rx.recv().unwrap();
        let all = threads("self");
        let probe = all.iter().find(|t| t.name == "threads-probe").expect("the named thread is listed");
        assert_eq!(probe.tid, tid);
        assert_eq!(probe.proc_path(), format!("self/task/{tid}"));
        assert!(probe.dir().join("stat").is_file());
        // SAFETY: gettid has no preconditions.
        let me = unsafe { libc::gettid() };
        assert!(all.iter().any(|t| t.tid == me), "this thread too");
        done_tx.send(()).unwrap();
        helper.join().unwrap();
        assert!(threads("0").is_empty(), "no /proc/0");
    }

    #[test]
    fn test_thread_ids_list_every_thread_while_older_ones_exit() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{mpsc, Arc};
        use std::time::Duration;

        // 20000 exits: a single read of the directory is cut short 3-5 times in such a run here,
        // so listing by one read fails this test nearly always.
        let (mut listings, mut missed, mut single_reads_cut_short) = (0, 0, 0);
        for _ in 0..200 {
            // Threads older than the one checked, ending one after another while this thread
            // lists them all, as other tests' threads do alongside a test.
            let go = Arc::new(AtomicBool::new(false));
            let ending: Vec<_> = (0..100u64)
                .map(|i| {
                    let go = go.clone();
                    std::thread::spawn(move || {
                        while !go.load(Ordering::Relaxed) {
                            std::thread::yield_now();
                        }
                        std::thread::sleep(Duration::from_micros(20 * i));
                    })
                })
                .collect();
            // A thread alive throughout, younger than those, like the load side's.
            let stop = Arc::new(AtomicBool::new(false));
            let (tid_tx, tid_rx) = mpsc::channel();
            let steady = {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    // SAFETY: gettid has no preconditions.
                    tid_tx.send(unsafe { libc::gettid() }).unwrap();
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                })
            };
            let alive = tid_rx.recv().unwrap();
            go.store(true, Ordering::Relaxed);
            while ending.iter().any(|t| !t.is_finished()) {
                single_reads_cut_short += usize::from(!list_threads("self").contains(&alive));
                missed += usize::from(!thread_ids("self").contains(&alive));
                listings += 1;
            }
            stop.store(true, Ordering::Relaxed);
            ending.into_iter().chain([steady]).for_each(|t| t.join().unwrap());
        }
        assert_eq!(
            missed, 0,
            "listings (of {listings}) that left out a thread alive throughout; single reads that did: {single_reads_cut_short}"
        );
        eprintln!("{listings} listings; single reads cut short: {single_reads_cut_short}");
    }

    #[test]
    fn test_cpu_used_per_gb() {
        let used = CpuUsed { total_secs: 2.0, vutap_secs: 1.5 };
        // 4 Gbit/s for 8 s = 4 GB.
        assert_eq!(used.per_gb(4.0, 8.0), Some((0.5, 0.375)));
        assert_eq!(used.per_gb(0.0, 8.0), None);
    }
}
