//! seccomp allow-lists, one per kind of thread ([`ThreadKind`]). The `vutap` binary turns them
//! on (`--no-seccomp` keeps them off); the library leaves them off ([`Seccomp::default`]), so
//! in-process users (the tests) get filters only if their configuration asks for them. The
//! choice is a value ([`Seccomp`]) carried in the daemon's and each device's configuration down
//! to every thread that installs a filter.
//!
//! - **Worker threads** (one per queue pair, the only code that touches guest-controlled data
//!   at line rate) get a strict list: epoll, read/write/readv/writev on the tap and eventfds,
//!   futex, memory management for the allocator, and what thread exit and a panic need.
//!   No socket, open, ioctl, exec, clone or mmap of new files... `mmap` stays (the allocator).
//! - **Device serving threads** (the "control thread" of each device: vhost-user messages,
//!   SET_MEM_TABLE mmaps, TUNSETQUEUE ioctls, spawning workers) get a broader list: the worker
//!   list plus sockets (accept4/connect/recvmsg/sendmsg for server and client mode), ioctl,
//!   openat, fcntl/dup, clone/clone3 and the thread set-up syscalls. exec, ptrace, mount,
//!   kexec, bpf, setuid & co are refused.
//! - **The main, signal, metrics, link-monitor and stats-summary threads** get lists of their
//!   own, each only what that thread does ([`ops_threads`]).
//! - **The upgrade thread** (`--control-socket`) starts the new binary of a live upgrade, which
//!   inherits its filter: its list is the union of all the others plus starting a process.
//!
//! Install order: a filter binds the thread that installs it and every thread that thread
//! creates afterwards, and filters stack (the kernel applies the strictest verdict). So each
//! thread installs its own filter as the first thing it does, and the main thread installs its
//! filter last, once it has spawned every other thread (`daemon::run`); until then nothing is
//! inherited. Workers are spawned later by a filtered serving thread and add the worker filter on
//! top (the intersection is the worker list). `--user` drops privileges before any of this.
//!
//! A refused syscall fails with EPERM (not a kill), so the daemon logs the failure and goes on,
//! and tests can observe it.

mod ops_threads;

use std::collections::BTreeMap;

use log::{debug, warn};
use seccompiler::{
    BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};
use thiserror::Error;

pub use ops_threads::{LINK_MONITOR, MAIN, METRICS, SIGNALS, STATS_SUMMARY, UPGRADE};

/// Whether the threads started from here on install their allow-lists, and whether this
/// process already runs under the upgrade list it inherited from the vutap that started it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Seccomp {
    enabled: bool,
    upgrade_list_inherited: bool,
}

impl Seccomp {
    /// Filters on (the binary, unless `--no-seccomp`; tests that want the binary's threads).
    pub const ON: Seccomp = Seccomp { enabled: true, upgrade_list_inherited: false };
    /// Filters off (the library's default).
    pub const OFF: Seccomp = Seccomp { enabled: false, upgrade_list_inherited: false };

    pub fn new(enabled: bool) -> Seccomp {
        Seccomp { enabled, upgrade_list_inherited: false }
    }

    pub fn enabled(self) -> bool {
        self.enabled
    }

    /// Notes whether the calling process runs under an inherited filter (`Seccomp: 2` in
    /// `/proc/self/status` before it installed any): a process started by a live upgrade inherits
    /// the previous one's upgrade list. Its own upgrade thread then adds nothing (the list is the
    /// same union), so filters do not pile up from one upgrade to the next (the kernel caps a
    /// thread's filters at 32 768 BPF instructions in all).
    pub fn noting_inherited_upgrade_list(self) -> Seccomp {
        let inherited = std::fs::read_to_string("/proc/self/status")
            .is_ok_and(|s| s.lines().any(|l| l.starts_with("Seccomp:") && l.trim_end().ends_with('2')));
        Seccomp { upgrade_list_inherited: inherited, ..self }
    }

    /// Installs the filter of `kind` on the calling thread, if enabled. A filter that cannot be
    /// installed is logged and the thread runs unfiltered.
    pub fn enter(self, kind: ThreadKind) {
        if !self.enabled {
            return;
        }
        if kind == ThreadKind::Upgrade && self.upgrade_list_inherited {
            debug!("seccomp: the upgrade list is inherited from the previous vutap");
            return;
        }
        let list = kind.allow_list();
        match list.apply() {
            Ok(()) => debug!("seccomp: {} filter installed", list.name),
            Err(e) => warn!("{e}; running unfiltered"),
        }
    }
}

/// The allocator: every thread of vutap allocates.
const ALLOCATOR_SYSCALLS: &[libc::c_long] =
    &[libc::SYS_mmap, libc::SYS_munmap, libc::SYS_mremap, libc::SYS_madvise, libc::SYS_mprotect, libc::SYS_brk];

/// What every filtered thread may do (with [`ALLOCATOR_SYSCALLS`]).
const WORKER_SYSCALLS: &[libc::c_long] = &[
    // The datapath.
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    // `--io-uring`: TX and RX batches through the queue's ring. The rings are built before any
    // filter and restricted to reads and writes of their own tap queue; a thread cannot make
    // another.
    libc::SYS_io_uring_enter,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_create1,
    libc::SYS_close,
    // Locks, time, randomness (HashMap seeds), yielding.
    libc::SYS_futex,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_sched_yield,
    libc::SYS_getrandom,
    // Thread exit, signals, panics (the panic message, abort).
    libc::SYS_sigaltstack,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigaction,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_sched_getaffinity,
];

/// What a device's serving thread may do on top of [`WORKER_SYSCALLS`].
const CONTROL_EXTRA_SYSCALLS: &[libc::c_long] = &[
    // vhost-user socket: server (accept4) and client (socket + connect) mode, fds over SCM_RIGHTS.
    libc::SYS_accept4,
    libc::SYS_accept,
    libc::SYS_socket,
    libc::SYS_socketpair,
    libc::SYS_connect,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_poll,
    libc::SYS_ppoll,
    // Taps (TUNSETQUEUE, TUNSETOFFLOAD, TUNSETVNETHDRSZ), /dev/tap*, eventfds.
    libc::SYS_ioctl,
    libc::SYS_openat,
    libc::SYS_fcntl,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_eventfd2,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_pread64,
    // Spawning workers.
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_prctl,
    libc::SYS_uname,
    // Resumes a sleep or timed poll interrupted by SIGSTOP/SIGCONT or a debugger (the client
    // mode's reconnect and the accept retry sleep; refused, `thread::sleep` panics).
    libc::SYS_restart_syscall,
    // A new worker stacks its own filter (PR_SET_NO_NEW_PRIVS is a prctl).
    libc::SYS_seccomp,
];

#[derive(Debug, Error)]
pub enum SandboxError {
    #[error("seccomp: unsupported architecture {arch}: {source}")]
    Arch {
        arch: &'static str,
        #[source]
        source: BackendError,
    },
    #[error("seccomp: cannot compile the {list} filter: {source}")]
    Compile {
        list: &'static str,
        #[source]
        source: BackendError,
    },
    #[error("seccomp: cannot install the {list} filter: {source}")]
    Install {
        list: &'static str,
        #[source]
        source: seccompiler::Error,
    },
}

/// `(argument & mask) == value` on one syscall argument.
#[derive(Debug, Clone, Copy)]
pub struct ArgMatch {
    pub arg: u8,
    pub mask: u64,
    pub value: u64,
}

/// What one kind of thread may do: syscalls allowed with any arguments, and syscalls allowed
/// only when every [`ArgMatch`] of their entry holds.
#[derive(Debug, Clone, Copy)]
pub struct AllowList {
    pub name: &'static str,
    pub any_args: &'static [&'static [libc::c_long]],
    pub with_args: &'static [(libc::c_long, &'static [ArgMatch])],
}

impl AllowList {
    /// The BPF program: allow what the list names, EPERM for everything else.
    pub fn compile(&self) -> Result<BpfProgram, SandboxError> {
        let list = self.name;
        let compile = |source| SandboxError::Compile { list, source };
        let mut rules: BTreeMap<i64, Vec<SeccompRule>> = self.any_args.iter().flat_map(|l| l.iter()).map(|s| (*s, vec![])).collect();
        for (nr, checks) in self.with_args {
            let conditions = checks
                .iter()
                .map(|c| SeccompCondition::new(c.arg, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(c.mask), c.value))
                .collect::<Result<Vec<_>, _>>()
                .map_err(compile)?;
            rules.entry(*nr).or_default().push(SeccompRule::new(conditions).map_err(compile)?);
        }
        let arch = std::env::consts::ARCH;
        let target = TargetArch::try_from(arch).map_err(|source| SandboxError::Arch { arch, source })?;
        let filter = SeccompFilter::new(rules, SeccompAction::Errno(libc::EPERM as u32), SeccompAction::Allow, target).map_err(compile)?;
        BpfProgram::try_from(filter).map_err(compile)
    }

    /// Installs the filter on the calling thread, whether or not the sandbox is enabled.
    pub fn apply(&self) -> Result<(), SandboxError> {
        let list = self.name;
        seccompiler::apply_filter(&self.compile()?).map_err(|source| SandboxError::Install { list, source })
    }
}

/// The worker threads' list.
pub const WORKER: AllowList = AllowList { name: "worker", any_args: &[ALLOCATOR_SYSCALLS, WORKER_SYSCALLS], with_args: &[] };

/// The device serving threads' list.
pub const CONTROL: AllowList =
    AllowList { name: "control", any_args: &[ALLOCATOR_SYSCALLS, WORKER_SYSCALLS, CONTROL_EXTRA_SYSCALLS], with_args: &[] };

/// Every kind of thread vutap runs, each with its own list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    Main,
    Signals,
    Metrics,
    LinkMonitor,
    StatsSummary,
    Control,
    Worker,
    Upgrade,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 8] = [
        ThreadKind::Main,
        ThreadKind::Signals,
        ThreadKind::Metrics,
        ThreadKind::LinkMonitor,
        ThreadKind::StatsSummary,
        ThreadKind::Control,
        ThreadKind::Worker,
        ThreadKind::Upgrade,
    ];

    pub fn allow_list(self) -> &'static AllowList {
        match self {
            ThreadKind::Main => &MAIN,
            ThreadKind::Signals => &SIGNALS,
            ThreadKind::Metrics => &METRICS,
            ThreadKind::LinkMonitor => &LINK_MONITOR,
            ThreadKind::StatsSummary => &STATS_SUMMARY,
            ThreadKind::Control => &CONTROL,
            ThreadKind::Worker => &WORKER,
            ThreadKind::Upgrade => &UPGRADE,
        }
    }
}

/// The worker threads' filter.
pub fn worker_filter() -> Result<BpfProgram, SandboxError> {
    WORKER.compile()
}

/// The device serving threads' filter.
pub fn control_filter() -> Result<BpfProgram, SandboxError> {
    CONTROL.compile()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errno() -> i32 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    }

    #[test]
    fn test_worker_filter_refuses_socket_open_and_exec_but_allows_the_datapath() {
        std::thread::spawn(|| {
            seccompiler::apply_filter(&worker_filter().unwrap()).unwrap();
            // SAFETY: plain syscalls with valid (or deliberately bogus but harmless) arguments.
            unsafe {
                assert_eq!(libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0), -1);
                assert_eq!(errno(), libc::EPERM, "socket()");
                assert_eq!(libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY), -1);
                assert_eq!(errno(), libc::EPERM, "open()");
                let argv = [std::ptr::null::<libc::c_char>()];
                assert_eq!(libc::execve(c"/bin/true".as_ptr(), argv.as_ptr(), argv.as_ptr()), -1);
                assert_eq!(errno(), libc::EPERM, "execve()");
                assert_eq!(libc::ioctl(0, libc::FIONREAD, &mut 0i32), -1);
                assert_eq!(errno(), libc::EPERM, "ioctl()");
            }
        })
        .join()
        .unwrap();
        std::thread::spawn(|| {
            let e = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
            let ep = vmm_sys_util::epoll::Epoll::new().unwrap();
            seccompiler::apply_filter(&worker_filter().unwrap()).unwrap();
            e.write(1).unwrap();
            assert_eq!(e.read().unwrap(), 1);
            let mut events = vec![vmm_sys_util::epoll::EpollEvent::default(); 4];
            assert_eq!(ep.wait(0, &mut events).unwrap(), 0);
            let v: Vec<u8> = vec![7; 1 << 20];
            assert_eq!(v.len(), 1 << 20);
            eprintln!("worker filter: datapath syscalls allowed");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn test_control_filter_allows_sockets_and_threads_but_not_exec() {
        std::thread::spawn(|| {
            seccompiler::apply_filter(&control_filter().unwrap()).unwrap();
            let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
            drop((a, b));
            // Spawning a thread (a worker) works, and it can take the worker filter on top.
            std::thread::spawn(|| {
                WORKER.apply().unwrap();
                // SAFETY: plain socket(2).
                assert_eq!(unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) }, -1);
            })
            .join()
            .unwrap();
            let argv = [std::ptr::null::<libc::c_char>()];
            // SAFETY: execve with valid strings; refused before it does anything.
            assert_eq!(unsafe { libc::execve(c"/bin/true".as_ptr(), argv.as_ptr(), argv.as_ptr()) }, -1);
            assert_eq!(errno(), libc::EPERM);
        })
        .join()
        .unwrap();
    }
}
