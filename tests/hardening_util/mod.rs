//! Helpers of the hardening tests (hostile, faults, soak): a log capture, raw vhost-user
//! messages on a live connection (framed by `vutap::control::wire`), and per-thread CPU / fd / thread
//! counts of this process.

#![allow(dead_code)] // each test binary uses a different subset

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::{Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserU64};
use vutap::control::wire::{self, Header, WireError};
use vutap_testbed::host_cpu::{threads, Thread};

// ------------------------------------------------------------------------------- log capture

/// Lines kept for `logged_since` and `log_since`: far more than any test's window needs, and
/// bounded, so that a long soak's log does not grow the very process whose RSS it checks.
pub const KEPT_LINES: usize = 10_000;

struct Captured {
    /// Lines logged so far, those no longer kept included: a mark is a position in this count.
    total: usize,
    /// The last `KEPT_LINES` lines.
    recent: VecDeque<String>,
    /// The position of every line that reports a panic, kept whatever the bound.
    panics: Vec<usize>,
}

impl Captured {
    /// The kept lines from position `mark` on. A mark older than the kept lines would hide what
    /// was logged in between, so it fails the test instead.
    fn since(&self, mark: usize) -> impl Iterator<Item = &String> {
        let first_kept = self.total - self.recent.len();
        assert!(mark >= first_kept, "log mark {mark} is older than the {KEPT_LINES} lines kept (from {first_kept})");
        self.recent.iter().skip(mark - first_kept)
    }
}

static LINES: Mutex<Captured> = Mutex::new(Captured { total: 0, recent: VecDeque::new(), panics: Vec::new() });
static INIT: Once = Once::new();

fn captured() -> MutexGuard<'static, Captured> {
    LINES.lock().unwrap_or_else(|p| p.into_inner())
}

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::Level::Info
    }
    fn log(&self, r: &log::Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let line = format!("{} {}: {}", r.level(), r.target(), r.args());
        eprintln!("{line}");
        let mut c = captured();
        if line.contains("panicked") {
            let at = c.total;
            c.panics.push(at);
        }
        if c.recent.len() == KEPT_LINES {
            c.recent.pop_front();
        }
        c.recent.push_back(line);
        c.total += 1;
    }
    fn flush(&self) {}
}

/// Installs the capturing logger (before `common::serial`, whose env_logger init then fails
/// quietly). Info and above are kept and echoed to stderr.
pub fn capture_logs() {
    INIT.call_once(|| {
        captured().recent.reserve_exact(KEPT_LINES);
        if log::set_logger(&Capture).is_ok() {
            log::set_max_level(log::LevelFilter::Info);
        }
    });
}

/// A position in the captured log.
pub fn log_mark() -> usize {
    captured().total
}

/// Whether a line containing `needle` was logged after `mark`, waiting up to `timeout`.
pub fn logged_since(mark: usize, needle: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if captured().since(mark).any(|l| l.contains(needle)) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The lines logged after `mark` (for failure messages).
pub fn log_since(mark: usize) -> String {
    captured().since(mark).map(String::as_str).collect::<Vec<_>>().join("\n")
}

/// Whether any captured line since `mark` reports a panic.
pub fn panicked_since(mark: usize) -> bool {
    captured().panics.iter().any(|&at| at >= mark)
}

// ------------------------------------------------------------------------------- raw messages

/// Header flags: protocol version 1, with or without `NEED_REPLY`.
pub const NO_REPLY: u32 = wire::VERSION_1;
pub const NEED_REPLY: u32 = wire::VERSION_1 | VhostUserHeaderFlag::NEED_REPLY.bits();

/// Sends one vhost-user message on `fd`: a header of `code`, `flags` and `size` (which may
/// disagree with the body, on purpose), `body`, and `fds`.
pub fn raw_send(fd: RawFd, code: impl Into<u32>, flags: u32, size: u32, body: &[u8], fds: &[RawFd]) -> Result<(), WireError> {
    // SAFETY: `fd` is a socket the caller holds open for the duration of this call.
    let sock = unsafe { BorrowedFd::borrow_raw(fd) };
    wire::send(sock, &Header::raw(code.into(), flags, size), body, fds)
}

/// What came back for a raw message.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// A reply with this u64 body (0 = success for acks).
    U64(u64),
    /// A reply with another body size.
    Other(u32, Vec<u8>),
    /// The daemon closed the connection.
    Closed,
    /// Nothing within the timeout.
    Nothing,
}

/// Reads one reply (header + body) within `timeout`, or sees the close.
pub fn raw_reply(fd: RawFd, timeout: Duration) -> Reply {
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd.
    if unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) } <= 0 {
        return Reply::Nothing;
    }
    // SAFETY: `fd` is a socket the caller holds open for the duration of this call.
    let sock = unsafe { BorrowedFd::borrow_raw(fd) };
    let Ok(msg) = wire::recv_message(sock) else { return Reply::Closed };
    match msg.body_as::<VhostUserU64>() {
        Ok(v) => Reply::U64(v.value),
        Err(_) => Reply::Other(msg.header.size, msg.body),
    }
}

/// Whether the peer closed `fd` within `timeout` (reads and discards anything before).
pub fn closed_within(fd: RawFd, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 256];
    loop {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else { return false };
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as i32) } <= 0 {
            continue;
        }
        // SAFETY: buf is valid for writes.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n == 0 || (n < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ECONNRESET)) {
            return true;
        }
    }
}

/// A body of `u32` words.
pub fn words(w: &[u32]) -> Vec<u8> {
    w.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A memfd of `len` bytes.
pub fn memfd(len: u64) -> std::fs::File {
    let name = std::ffi::CString::new("vutap-hostile").unwrap();
    // SAFETY: valid name; the fd is owned by the File.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fresh fd we own.
    let f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    f.set_len(len).unwrap();
    f
}

/// A SET_MEM_TABLE body for `(gpa, size, user_addr)` regions (mmap offset 0).
pub fn mem_table(regions: &[(u64, u64, u64)]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(regions.len() as u32).to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    for (gpa, size, ua) in regions {
        for v in [*gpa, *size, *ua, 0u64] {
            b.extend_from_slice(&v.to_le_bytes());
        }
    }
    b
}

// ------------------------------------------------------------------------------- process counts

/// Nanoseconds of CPU time used so far by this process's threads whose name starts with
/// `prefix`, per thread id. Read from each thread's own CPU clock, which counts in ns; the
/// utime/stime of /proc count 10 ms ticks, too coarse for a threshold of a few percent.
pub fn thread_cpu_ns(prefix: &str) -> std::collections::BTreeMap<i32, u64> {
    let mut out = std::collections::BTreeMap::new();
    for t in threads_of_self(prefix) {
        let tid = t.tid;
        // The kernel's clock id of one thread's CPU time (MAKE_THREAD_CPUCLOCK(tid,
        // CPUCLOCK_SCHED) in include/linux/posix-timers.h): readable for threads of this process.
        let clock = ((!tid) << 3) | 6;
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: ts is a valid timespec to write; a thread that has exited gives EINVAL.
        if unsafe { libc::clock_gettime(clock, &mut ts) } == 0 {
            out.insert(tid, ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64);
        }
    }
    out
}

/// Share of one CPU the `prefix` threads used over `window` (1.0 = one core busy), from the
/// threads alive at both ends of the window.
pub fn cpu_share(prefix: &str, window: Duration) -> f64 {
    let a = thread_cpu_ns(prefix);
    assert!(!a.is_empty(), "no thread named {prefix}* to measure");
    let t0 = Instant::now();
    std::thread::sleep(window);
    let b = thread_cpu_ns(prefix);
    let elapsed = t0.elapsed().as_secs_f64();
    let used: u64 = b.iter().filter_map(|(tid, end)| a.get(tid).map(|start| end - start)).sum();
    used as f64 / 1e9 / elapsed
}

/// Open fds of this process.
pub fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

/// Threads of this process.
pub fn thread_count() -> usize {
    threads("self").len()
}

/// This process's threads whose name starts with `prefix`.
fn threads_of_self(prefix: &str) -> impl Iterator<Item = Thread> + '_ {
    threads("self").into_iter().filter(move |t| t.name.starts_with(prefix))
}

/// Threads of this process whose name starts with `prefix`.
pub fn threads_named(prefix: &str) -> usize {
    threads_of_self(prefix).count()
}

/// Resident set size of this process in KiB.
pub fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// A dup of the connection of a frontend, to send raw messages on.
pub fn conn_fd(vu: &impl AsRawFd) -> std::os::fd::OwnedFd {
    // SAFETY: dup of a valid fd; the result is owned below.
    let fd = unsafe { libc::dup(vu.as_raw_fd()) };
    assert!(fd >= 0);
    // SAFETY: fresh fd we own.
    unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }
}

/// The seccomp mode (the `Seccomp:` line of /proc/.../status: 2 = filter) of each thread of this
/// process whose name starts with `prefix`.
pub fn seccomp_modes(prefix: &str) -> Vec<u32> {
    threads_of_self(prefix)
        .filter_map(|t| std::fs::read_to_string(t.dir().join("status")).ok())
        .filter_map(|s| s.lines().find(|l| l.starts_with("Seccomp:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .collect()
}

/// A descriptor for raw tables (`Descriptor::to_bytes` gives its 16 bytes).
pub fn desc(addr: u64, len: u32, flags: u16, next: u16) -> vutap_frontend::Descriptor {
    vutap_frontend::Descriptor { addr, len, flags, next }
}
