//! Where a backend's CPU goes: `perf record` on the backend's threads over a measured window,
//! each sample put in one bucket by its call chain, so a cell's CPU per frame splits into the tap
//! path that the raw loop pays too and what only a backend pays (its own code, wake-ups, eventfd
//! kicks and calls, io_uring's bookkeeping).

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One sample per this much CPU time of the recorded threads (`cpu-clock`, counting mode), so
/// samples × period is CPU time and needs no frequency guesswork.
pub const PERIOD_NS: u64 = 100_000;

/// What a sample was doing, judged by its call chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Bucket {
    /// Copying frame bytes between user memory and the skb, inside a tap read or write.
    TapCopy,
    /// The rest of a tap read or write: skb allocation, the host stack's receive run in the
    /// writer's context (AF_PACKET delivery, IP input), freeing.
    TapPath,
    /// Entering and leaving system calls and the VFS layer around the tap's read/write (fd
    /// lookup, importing the iovec array), for any system call.
    SyscallEntry,
    /// The seccomp filter run on each system call.
    Seccomp,
    /// The backend's own user-space code (vutap, testpmd, the raw loop).
    BackendCode,
    /// libc in user space (syscall stubs, memcpy).
    Libc,
    /// epoll_wait / poll: going to sleep and waking up.
    Waits,
    /// eventfd reads and writes: kicks and interrupts.
    Eventfd,
    /// io_uring_enter and task work that is not itself a tap read or write.
    IoUring,
    /// Kernel time outside a system call: interrupts, softirqs, page faults, the scheduler.
    OtherKernel,
}

impl Bucket {
    pub const ALL: [Bucket; 10] = [
        Bucket::TapCopy,
        Bucket::TapPath,
        Bucket::SyscallEntry,
        Bucket::Seccomp,
        Bucket::BackendCode,
        Bucket::Libc,
        Bucket::Waits,
        Bucket::Eventfd,
        Bucket::IoUring,
        Bucket::OtherKernel,
    ];

    /// Time a backend adds on top of moving the frame through the kernel: its code, its filter,
    /// its sleeps and its eventfd kicks and calls. The raw loop pays next to none of it.
    pub fn is_backends_own(self) -> bool {
        matches!(self, Bucket::Seccomp | Bucket::BackendCode | Bucket::Libc | Bucket::Waits | Bucket::Eventfd)
    }

    /// Time any program that moves this frame through the tap pays: the tap's read/write, the
    /// system call (or io_uring submission) that carries it.
    pub fn is_kernel_io(self) -> bool {
        matches!(self, Bucket::TapCopy | Bucket::TapPath | Bucket::SyscallEntry | Bucket::IoUring)
    }

    pub fn label(self) -> &'static str {
        match self {
            Bucket::TapCopy => "tap copy",
            Bucket::TapPath => "tap path",
            Bucket::SyscallEntry => "syscall entry + VFS",
            Bucket::Seccomp => "seccomp",
            Bucket::BackendCode => "own code",
            Bucket::Libc => "libc",
            Bucket::Waits => "epoll/poll",
            Bucket::Eventfd => "eventfd",
            Bucket::IoUring => "io_uring",
            Bucket::OtherKernel => "other kernel",
        }
    }
}

/// One frame of a call chain as `perf script` prints it.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub sym: &'a str,
    pub kernel: bool,
    pub dso: &'a str,
}

/// Entry points of tap reads and writes: tun (plain tap) and tap (macvtap).
const TAP_FNS: [&str; 8] = [
    "tun_get_user",
    "tun_chr_write_iter",
    "tun_do_read",
    "tun_chr_read_iter",
    "tap_get_user",
    "tap_write_iter",
    "tap_do_read",
    "tap_read_iter",
];
/// Where the bytes of a frame are copied (with the size checks the copy runs).
const COPY_FNS: [&str; 6] =
    ["_copy_from_iter", "_copy_to_iter", "copy_page_from_iter", "copy_page_to_iter", "rep_movs_alternative", "__check_object_size"];

/// The bucket of one sample, its chain leaf first.
pub fn classify(chain: &[Frame]) -> Bucket {
    let Some(leaf) = chain.first() else { return Bucket::OtherKernel };
    if !leaf.kernel {
        return if leaf.dso.contains("libc") { Bucket::Libc } else { Bucket::BackendCode };
    }
    let has = |names: &[&str]| chain.iter().any(|f| f.kernel && names.contains(&f.sym));
    if has(&["__seccomp_filter", "seccomp_run_filters"]) {
        return Bucket::Seccomp;
    }
    if let Some(tap) = chain.iter().position(|f| f.kernel && TAP_FNS.contains(&f.sym)) {
        return if chain[..tap].iter().any(|f| COPY_FNS.contains(&f.sym)) { Bucket::TapCopy } else { Bucket::TapPath };
    }
    if has(&["eventfd_read", "eventfd_write", "eventfd_signal_mask"]) {
        return Bucket::Eventfd;
    }
    if has(&["do_epoll_wait", "ep_poll", "do_sys_poll", "__x64_sys_poll", "__x64_sys_ppoll"]) {
        return Bucket::Waits;
    }
    if chain.iter().any(|f| f.kernel && (f.sym.starts_with("io_") || f.sym.starts_with("tctx_task_work"))) {
        return Bucket::IoUring;
    }
    if has(&["entry_SYSCALL_64_after_hwframe", "do_syscall_64"]) {
        return Bucket::SyscallEntry;
    }
    Bucket::OtherKernel
}

/// Samples per bucket in `perf script -F ip,sym,dso` output (call chains, blank-line separated).
pub fn tally(script: &str) -> BTreeMap<Bucket, u64> {
    let mut out = BTreeMap::new();
    let mut chain: Vec<Frame> = Vec::new();
    let mut flush = |chain: &mut Vec<Frame>| {
        if !chain.is_empty() {
            *out.entry(classify(chain)).or_insert(0) += 1;
            chain.clear();
        }
    };
    for line in script.lines() {
        if line.trim().is_empty() {
            flush(&mut chain);
        } else if let Some(f) = parse_frame(line) {
            chain.push(f);
        }
    }
    flush(&mut chain);
    out
}

/// `\t ffffffff8226e979 _raw_spin_unlock_irqrestore+0x19 ([kernel.kallsyms])`.
fn parse_frame(line: &str) -> Option<Frame<'_>> {
    if !line.starts_with(['\t', ' ']) {
        return None; // a sample's header line
    }
    let rest = line.trim_start();
    let (_ip, rest) = rest.split_once(' ')?;
    let open = rest.rfind(" (")?;
    let (sym, dso) = (&rest[..open], rest[open + 2..].trim_end_matches(')'));
    let sym = sym.split_once('+').map_or(sym, |(s, _)| s);
    Some(Frame { sym, kernel: dso == "[kernel.kallsyms]", dso })
}

/// Threads to record: a whole process, or some of this process's threads (the raw loop).
pub enum Target {
    Pid(u32),
    Tids(Vec<i32>),
}

/// A running `perf record`.
pub struct Recording {
    child: Child,
    data: PathBuf,
}

/// Starts recording `target` for `window`, into a file in `dir`.
pub fn start(target: &Target, window: Duration, dir: &Path) -> io::Result<Recording> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let data = dir.join(format!("vutap-bench-{}-{n}.perf", std::process::id()));
    let (flag, who) = match target {
        Target::Pid(p) => ("-p", p.to_string()),
        Target::Tids(t) => ("-t", t.iter().map(i32::to_string).collect::<Vec<_>>().join(",")),
    };
    let child = Command::new("perf")
        .args(["record", "-q", "-e", "cpu-clock", "-c", &PERIOD_NS.to_string(), "-g", "-o"])
        .arg(&data)
        .args([flag, &who, "--", "sleep", &format!("{:.3}", window.as_secs_f64())])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    Ok(Recording { child, data })
}

impl Recording {
    /// Waits for the window to end and returns the samples per bucket.
    pub fn finish(self) -> io::Result<BTreeMap<Bucket, u64>> {
        let out = self.child.wait_with_output()?;
        if !out.status.success() {
            let _ = std::fs::remove_file(&self.data);
            return Err(io::Error::other(format!("perf record: {}", String::from_utf8_lossy(&out.stderr).trim())));
        }
        let script = Command::new("perf").args(["script", "-F", "ip,sym,dso", "-i"]).arg(&self.data).stderr(Stdio::null()).output();
        let _ = std::fs::remove_file(&self.data);
        let script = script?;
        if !script.status.success() {
            return Err(io::Error::other("perf script failed"));
        }
        Ok(tally(&String::from_utf8_lossy(&script.stdout)))
    }
}

/// Fails early, with the reason, when `perf` cannot record here.
pub fn check_available() -> io::Result<()> {
    let out = Command::new("perf").args(["record", "-q", "-e", "cpu-clock", "-o", "/dev/null", "--", "true"]).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!("perf record does not work here: {}", String::from_utf8_lossy(&out.stderr).trim())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chain of kernel frames, leaf first.
    fn k(syms: &[&'static str]) -> Vec<Frame<'static>> {
        syms.iter().map(|s| Frame { sym: s, kernel: true, dso: "[kernel.kallsyms]" }).collect()
    }

    const WRITEV_COPY: &str = "\
\tffffffff81a0 _copy_from_iter+0x12 ([kernel.kallsyms])
\tffffffff81a1 copy_page_from_iter+0x1 ([kernel.kallsyms])
\tffffffff81a2 skb_copy_datagram_from_iter+0x1 ([kernel.kallsyms])
\tffffffff81a3 tun_get_user+0x1 ([kernel.kallsyms])
\tffffffff81a4 tun_chr_write_iter+0x1 ([kernel.kallsyms])
\tffffffff81a5 do_syscall_64+0x1 ([kernel.kallsyms])
\t           f82ad __GI___writev (/usr/lib/x86_64-linux-gnu/libc.so.6)

";

    #[test]
    fn test_parse_frame_splits_symbol_offset_and_dso() {
        let f = parse_frame("\tffffffff8226e979 _raw_spin_unlock_irqrestore+0x19 ([kernel.kallsyms])").unwrap();
        assert_eq!(f, Frame { sym: "_raw_spin_unlock_irqrestore", kernel: true, dso: "[kernel.kallsyms]" });
        let u = parse_frame("\t           9e0a8 [unknown] (/usr/bin/perf)").unwrap();
        assert_eq!(u, Frame { sym: "[unknown]", kernel: false, dso: "/usr/bin/perf" });
        assert_eq!(parse_frame("vutap-q0 12304 "), None, "a header line is not a frame");
    }

    #[test]
    fn test_copy_under_a_tap_write_is_tap_copy_and_the_rest_of_it_tap_path() {
        let alloc = "\tffff1 kmem_cache_alloc_node_noprof ([kernel.kallsyms])\n\tffff2 tun_get_user ([kernel.kallsyms])\n\n";
        let packet = "\tffff1 packet_rcv ([kernel.kallsyms])\n\tffff2 netif_receive_skb ([kernel.kallsyms])\n\tffff3 tap_get_user ([kernel.kallsyms])\n";
        let t = tally(&format!("{WRITEV_COPY}{alloc}{packet}"));
        assert_eq!(t.get(&Bucket::TapCopy), Some(&1));
        assert_eq!(t.get(&Bucket::TapPath), Some(&2));
        assert_eq!(t.values().sum::<u64>(), 3);
    }

    #[test]
    fn test_user_space_leaves_split_into_own_code_and_libc() {
        let s =
            "\t 1234 vutap::datapath::tx::TxLoop::run (/usr/bin/vutap)\n\n\t 99 __GI___writev (/usr/lib/x86_64-linux-gnu/libc.so.6)\n\n";
        let t = tally(s);
        assert_eq!(t.get(&Bucket::BackendCode), Some(&1));
        assert_eq!(t.get(&Bucket::Libc), Some(&1));
    }

    #[test]
    fn test_wakeups_eventfd_io_uring_syscalls_and_interrupts_each_have_a_bucket() {
        assert_eq!(classify(&k(&["schedule", "ep_poll", "do_epoll_wait", "do_syscall_64"])), Bucket::Waits);
        assert_eq!(classify(&k(&["_raw_spin_lock", "eventfd_write", "vfs_write", "do_syscall_64"])), Bucket::Eventfd);
        assert_eq!(classify(&k(&["io_submit_sqes", "__do_sys_io_uring_enter", "do_syscall_64"])), Bucket::IoUring);
        assert_eq!(classify(&k(&["_copy_from_iter", "tun_get_user", "io_write", "io_issue_sqe"])), Bucket::TapCopy);
        assert_eq!(classify(&k(&["tctx_task_work_run", "tctx_task_work", "task_work_run"])), Bucket::IoUring);
        assert_eq!(classify(&k(&["copy_iovec_from_user", "__import_iovec", "vfs_writev", "do_syscall_64"])), Bucket::SyscallEntry);
        assert_eq!(classify(&k(&["bpf_prog_1234", "__seccomp_filter", "syscall_trace_enter", "do_syscall_64"])), Bucket::Seccomp);
        assert_eq!(classify(&k(&["handle_softirqs", "irq_exit_rcu", "sysvec_apic_timer_interrupt"])), Bucket::OtherKernel);
        assert_eq!(classify(&[]), Bucket::OtherKernel);
    }

    #[test]
    fn test_every_bucket_but_other_kernel_is_either_kernel_io_or_the_backends_own() {
        for b in Bucket::ALL {
            let groups = usize::from(b.is_kernel_io()) + usize::from(b.is_backends_own());
            assert_eq!(groups, usize::from(b != Bucket::OtherKernel), "{b:?}");
        }
    }

    #[test]
    fn test_a_copy_above_the_tap_function_does_not_count_as_the_frame_copy() {
        // A copy that is the caller of the tap function (never in practice) is not under it.
        assert_eq!(classify(&k(&["kfree", "tun_do_read", "_copy_to_iter"])), Bucket::TapPath);
    }
}
