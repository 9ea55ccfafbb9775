//! The allow-lists of the threads around the datapath: main, signals, metrics, link monitor and
//! stats summary. Each starts from [`THREAD_RUNTIME`] (what any Rust thread of vutap needs to
//! allocate, lock, log to stderr and end) and adds only what that thread does. None may open
//! sockets, exec, ptrace, clone (so none can spawn a thread that escapes its list), ioctl or
//! change ids.

use super::{AllowList, ArgMatch, ALLOCATOR_SYSCALLS};

/// What every thread needs besides the allocator ([`ALLOCATOR_SYSCALLS`]): locks, a log line on stderr (timestamps come from the
/// vDSO; clock_gettime is the fallback), the end of a thread (glibc blocks signals and frees the
/// stack; std removes its alternate signal stack), a panic message naming the thread, and
/// restart_syscall, which the kernel uses to resume a sleep interrupted by SIGSTOP/SIGCONT or a
/// debugger (refused, `thread::sleep` would panic).
const THREAD_RUNTIME: &[libc::c_long] = &[
    libc::SYS_restart_syscall,
    libc::SYS_gettid,
    libc::SYS_futex,
    libc::SYS_write,
    libc::SYS_clock_gettime,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_exit,
];

/// The main thread, once it has spawned every other thread: it joins the device threads and the
/// link monitors, logs, and ends the process when the devices are done (`--once`).
const MAIN_SYSCALLS: &[libc::c_long] = &[libc::SYS_exit_group];

/// The signal thread: waits on signal-hook's self-pipe (a socketpair; the handler, which runs on
/// this thread because every other thread blocks SIGTERM/SIGINT, sends a byte to it), removes
/// vutap's socket files and exits the process.
const SIGNALS_SYSCALLS: &[libc::c_long] =
    &[libc::SYS_recvfrom, libc::SYS_sendto, libc::SYS_rt_sigreturn, libc::SYS_unlink, libc::SYS_exit_group];

/// The metrics thread (HTTP on TCP and the unix socket, one loop): waits in ppoll, accepts on
/// the listeners bound before the drop of privileges (non-blocking, close-on-exec), reads a
/// request and writes the answer without blocking, closes.
const METRICS_SYSCALLS: &[libc::c_long] = &[libc::SYS_ppoll, libc::SYS_accept4, libc::SYS_recvfrom, libc::SYS_sendto, libc::SYS_close];

/// A link monitor: reads `/sys/class/net/IF/carrier` (std sizes the read with statx), sleeps, and sends CONFIG_CHANGE_MSG on the
/// frontend's backend request channel (a socket the serving thread received).
const LINK_MONITOR_SYSCALLS: &[libc::c_long] =
    &[libc::SYS_statx, libc::SYS_read, libc::SYS_close, libc::SYS_clock_nanosleep, libc::SYS_sendto];

/// openat(.., flags) read-only, without O_CREAT or O_TRUNC: the carrier file, nothing written.
const LINK_MONITOR_WITH_ARGS: &[(libc::c_long, &[ArgMatch])] = &[(
    libc::SYS_openat,
    &[ArgMatch { arg: 2, mask: (libc::O_ACCMODE | libc::O_CREAT | libc::O_TRUNC) as u64, value: libc::O_RDONLY as u64 }],
)];

/// The `--stats-interval` thread: sleeps and logs.
const STATS_SUMMARY_SYSCALLS: &[libc::c_long] = &[libc::SYS_clock_nanosleep];

/// Starting the new binary of a live upgrade, on top of everything the other threads may do:
/// the parent's side (a close-on-exec pipe for exec errors, exec, kill and reap a failed child)
/// and what the new process does before it installs its own lists (the dynamic loader and
/// Rust's start-up). The new process inherits this list (seccomp filters survive execve), so it
/// can never do more than the old process as a whole could.
const PROCESS_START_SYSCALLS: &[libc::c_long] = &[
    libc::SYS_execve,
    libc::SYS_vfork,
    libc::SYS_pipe2,
    libc::SYS_wait4,
    libc::SYS_kill,
    libc::SYS_arch_prctl,
    libc::SYS_access,
    libc::SYS_set_tid_address,
    libc::SYS_prlimit64,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_getcwd,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_getppid,
    libc::SYS_sysinfo,
];

/// The upgrade thread (`vutap-upgrade`): the union of every other list plus starting a
/// process. Wider than the others, but it only ever reads the control socket, which only root
/// (or `--user`) can reach.
pub const UPGRADE: AllowList = AllowList {
    name: "upgrade",
    any_args: &[
        ALLOCATOR_SYSCALLS,
        THREAD_RUNTIME,
        super::WORKER_SYSCALLS,
        super::CONTROL_EXTRA_SYSCALLS,
        MAIN_SYSCALLS,
        SIGNALS_SYSCALLS,
        METRICS_SYSCALLS,
        LINK_MONITOR_SYSCALLS,
        STATS_SUMMARY_SYSCALLS,
        PROCESS_START_SYSCALLS,
    ],
    with_args: &[],
};

pub const MAIN: AllowList = AllowList { name: "main", any_args: &[ALLOCATOR_SYSCALLS, THREAD_RUNTIME, MAIN_SYSCALLS], with_args: &[] };

pub const SIGNALS: AllowList =
    AllowList { name: "signals", any_args: &[ALLOCATOR_SYSCALLS, THREAD_RUNTIME, SIGNALS_SYSCALLS], with_args: &[] };

pub const METRICS: AllowList =
    AllowList { name: "metrics", any_args: &[ALLOCATOR_SYSCALLS, THREAD_RUNTIME, METRICS_SYSCALLS], with_args: &[] };

pub const LINK_MONITOR: AllowList = AllowList {
    name: "link monitor",
    any_args: &[ALLOCATOR_SYSCALLS, THREAD_RUNTIME, LINK_MONITOR_SYSCALLS],
    with_args: LINK_MONITOR_WITH_ARGS,
};

pub const STATS_SUMMARY: AllowList =
    AllowList { name: "stats summary", any_args: &[ALLOCATOR_SYSCALLS, THREAD_RUNTIME, STATS_SUMMARY_SYSCALLS], with_args: &[] };

#[cfg(test)]
mod tests {
    use crate::operations::sandbox::ThreadKind;

    /// A syscall made with harmless arguments: allowed, it succeeds or fails with some errno
    /// other than EPERM (a bad fd, a missing path); refused, it fails with EPERM.
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Probe {
        Execve,
        Ptrace,
        SetUid,
        Socket,
        Connect,
        Accept,
        Ioctl,
        OpenRead,
        OpenWrite,
        Unlink,
        Send,
        Recv,
        SetRcvTimeout,
        SetReuseAddr,
        Spawn,
        Sleep,
        RestartSyscall,
        Poll,
    }

    const PROBES: [Probe; 18] = [
        Probe::Execve,
        Probe::Ptrace,
        Probe::SetUid,
        Probe::Socket,
        Probe::Connect,
        Probe::Accept,
        Probe::Ioctl,
        Probe::OpenRead,
        Probe::OpenWrite,
        Probe::Unlink,
        Probe::Send,
        Probe::Recv,
        Probe::SetRcvTimeout,
        Probe::SetReuseAddr,
        Probe::Spawn,
        Probe::Sleep,
        Probe::RestartSyscall,
        Probe::Poll,
    ];

    /// The errno of `probe` on the calling thread (0: it worked).
    fn run(probe: Probe) -> i32 {
        let errno = || std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        let missing = c"/nonexistent-vutap-probe/x";
        let mut buf = [0u8; 8];
        let timeout = libc::timeval { tv_sec: 1, tv_usec: 0 };
        let one: libc::c_int = 1;
        // SAFETY: every call gets valid pointers to live locals (or null where the syscall
        // accepts it) and an fd of -1 or one it owns; none has an effect when it succeeds
        // (setresuid(-1, ..) changes nothing, the path does not exist, the socket is closed).
        let rc: libc::c_long = unsafe {
            match probe {
                Probe::Execve => {
                    let argv = [std::ptr::null::<libc::c_char>()];
                    libc::execve(missing.as_ptr(), argv.as_ptr(), argv.as_ptr()) as libc::c_long
                }
                Probe::Ptrace => libc::ptrace(libc::PTRACE_PEEKDATA, 0, 0, 0),
                Probe::SetUid => libc::syscall(libc::SYS_setresuid, -1, -1, -1),
                Probe::Socket => {
                    let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
                    if fd >= 0 {
                        libc::close(fd);
                    }
                    fd as libc::c_long
                }
                Probe::Connect => libc::connect(-1, std::ptr::null(), 0) as libc::c_long,
                Probe::Accept => libc::accept4(-1, std::ptr::null_mut(), std::ptr::null_mut(), 0) as libc::c_long,
                Probe::Ioctl => libc::ioctl(-1, libc::FIONREAD, buf.as_mut_ptr()) as libc::c_long,
                Probe::OpenRead => libc::openat(libc::AT_FDCWD, missing.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) as libc::c_long,
                Probe::OpenWrite => {
                    libc::openat(libc::AT_FDCWD, missing.as_ptr(), libc::O_WRONLY | libc::O_CREAT | libc::O_CLOEXEC, 0o600) as libc::c_long
                }
                Probe::Unlink => libc::unlink(missing.as_ptr()) as libc::c_long,
                Probe::Send => libc::send(-1, buf.as_ptr().cast(), 1, libc::MSG_DONTWAIT) as libc::c_long,
                Probe::Recv => libc::recv(-1, buf.as_mut_ptr().cast(), 1, libc::MSG_DONTWAIT) as libc::c_long,
                Probe::SetRcvTimeout => libc::setsockopt(
                    -1,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&timeout as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as libc::socklen_t,
                ) as libc::c_long,
                Probe::SetReuseAddr => libc::setsockopt(
                    -1,
                    libc::SOL_SOCKET,
                    libc::SO_REUSEADDR,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                ) as libc::c_long,
                Probe::Spawn => {
                    return match std::thread::Builder::new().spawn(|| ()) {
                        Ok(t) => t.join().map_or(-1, |()| 0),
                        Err(e) => e.raw_os_error().unwrap_or(-1),
                    }
                }
                Probe::Poll => {
                    let ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
                    libc::ppoll(std::ptr::null_mut(), 0, &ts, std::ptr::null()) as libc::c_long
                }
                // Without an interrupted sleep to resume it fails with EINTR.
                Probe::RestartSyscall => libc::syscall(libc::SYS_restart_syscall),
                Probe::Sleep => {
                    let ts = libc::timespec { tv_sec: 0, tv_nsec: 1000 };
                    libc::clock_nanosleep(libc::CLOCK_MONOTONIC, 0, &ts, std::ptr::null_mut()) as libc::c_long
                }
            }
        };
        match (probe, rc) {
            // clock_nanosleep returns the error number instead of setting errno.
            (Probe::Sleep, rc) => rc as i32,
            (_, rc) if rc < 0 => errno(),
            _ => 0,
        }
    }

    /// The probes `kind` may make; every other one must be refused.
    fn allowed(kind: ThreadKind) -> &'static [Probe] {
        use Probe::*;
        match kind {
            ThreadKind::Main => &[RestartSyscall],
            ThreadKind::Signals => &[Unlink, Send, Recv, RestartSyscall],
            ThreadKind::Metrics => &[Accept, Send, Recv, Poll, RestartSyscall],
            ThreadKind::LinkMonitor => &[OpenRead, Send, Sleep, RestartSyscall],
            ThreadKind::StatsSummary => &[Sleep, RestartSyscall],
            ThreadKind::Control => &[
                Socket,
                Connect,
                Accept,
                Ioctl,
                OpenRead,
                OpenWrite,
                Send,
                Recv,
                SetRcvTimeout,
                SetReuseAddr,
                Spawn,
                Sleep,
                RestartSyscall,
                Poll,
            ],
            ThreadKind::Worker => &[Sleep],
            ThreadKind::Upgrade => &[
                Execve,
                Socket,
                Connect,
                Accept,
                Ioctl,
                OpenRead,
                OpenWrite,
                Unlink,
                Send,
                Recv,
                SetRcvTimeout,
                SetReuseAddr,
                Spawn,
                Sleep,
                RestartSyscall,
                Poll,
            ],
        }
    }

    #[test]
    fn test_probes_all_allowed_without_a_filter() {
        std::thread::spawn(|| {
            for p in PROBES {
                assert_ne!(run(p), libc::EPERM, "{p:?} refused without any filter: the probe cannot tell");
            }
        })
        .join()
        .unwrap();
    }

    #[test]
    fn test_each_thread_list_refuses_what_it_does_not_name() {
        for kind in ThreadKind::ALL {
            let got = std::thread::spawn(move || {
                kind.allow_list().apply().unwrap();
                PROBES.map(|p| (p, run(p)))
            })
            .join()
            .unwrap();
            for (p, errno) in got {
                let want_allowed = allowed(kind).contains(&p);
                assert_eq!(errno != libc::EPERM, want_allowed, "{kind:?} filter, {p:?}: errno {errno}");
            }
            eprintln!("{kind:?}: allowed {:?}, refused the other {}", allowed(kind), PROBES.len() - allowed(kind).len());
        }
    }

    #[test]
    fn test_link_monitor_reads_a_carrier_file_under_its_filter() {
        let carrier = std::thread::spawn(|| {
            ThreadKind::LinkMonitor.allow_list().apply().unwrap();
            std::fs::read_to_string("/sys/class/net/lo/carrier")
        })
        .join()
        .unwrap();
        assert_eq!(carrier.unwrap().trim(), "1");
    }
}
