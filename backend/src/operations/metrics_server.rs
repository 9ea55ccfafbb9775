//! Prometheus text exposition of every device's counters, on an opt-in endpoint:
//! `--metrics-addr HOST:PORT` (HTTP, `GET /metrics`) and/or `--metrics-unix PATH` (a unix
//! socket that writes the same text to whoever connects, then closes; `vutap stats` reads it).
//!
//! Both are served by one thread that never blocks on a client: a `ppoll` loop over the
//! listeners and up to [`MAX_CONNECTIONS`] connections, each read and written with
//! `MSG_DONTWAIT` and closed at its deadline. Idle or byte-at-a-time (slow-loris) clients
//! therefore cost a slot, not the scraper's time. It is hand-written rather than an HTTP crate
//! because it runs under a seccomp list of seven socket and poll calls with no thread creation,
//! and needs one route.

use std::fmt::Write as _;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use thiserror::Error;

use crate::control::device::Device;
use crate::metrics::PairCounts;
use crate::operations::metrics_http::{self, Parsed, MAX_HEAD};
use crate::operations::sandbox::{Seccomp, ThreadKind};

#[derive(Debug, Error)]
pub enum MetricsError {
    #[error("--metrics-addr {addr}: cannot listen: {source}")]
    BindTcp {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("--metrics-unix {path}: cannot listen: {source}")]
    BindUnix {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot spawn the metrics thread: {0}")]
    Spawn(#[source] io::Error),
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The text format (version 0.0.4) for `devices`.
pub fn render(devices: &[Arc<Device>]) -> String {
    let mut out = String::new();
    for (name, help) in PairCounts::HELP {
        let _ = writeln!(out, "# HELP vutap_{name}_total {help}\n# TYPE vutap_{name}_total counter");
        for d in devices {
            for (pair, m) in d.metrics.iter().enumerate() {
                let v = m.snapshot().fields().iter().find(|(k, _)| k == name).map_or(0, |(_, v)| *v);
                let _ = writeln!(out, "vutap_{name}_total{{device=\"{}\",queue_pair=\"{pair}\"}} {v}", escape(&d.label));
            }
        }
    }
    if let Some(d0) = devices.first() {
        for (i, (name, help, _)) in d0.device_metrics.fields().iter().enumerate() {
            let _ = writeln!(out, "# HELP vutap_device_{name}_total {help}\n# TYPE vutap_device_{name}_total counter");
            for d in devices {
                let v = d.device_metrics.fields()[i].2;
                let _ = writeln!(out, "vutap_device_{name}_total{{device=\"{}\"}} {v}", escape(&d.label));
            }
        }
    }
    type Gauge = (&'static str, &'static str, fn(&Device) -> u64);
    let gauges: [Gauge; 2] = [
        ("link_up", "1 when the tap has carrier (announced to the frontend as VIRTIO_NET_S_LINK_UP)", |d| u64::from(d.link.is_up())),
        ("queue_pairs", "queue pairs offered", |d| d.queue_pairs() as u64),
    ];
    for (name, help, f) in gauges {
        let _ = writeln!(out, "# HELP vutap_{name} {help}\n# TYPE vutap_{name} gauge");
        for d in devices {
            let _ = writeln!(out, "vutap_{name}{{device=\"{}\"}} {}", escape(&d.label), f(d));
        }
    }
    out
}

/// Listening endpoints, bound before privileges are dropped and served by [`MetricsServer::spawn`].
pub struct MetricsServer {
    tcp: Option<TcpListener>,
    unix: Option<(UnixListener, PathBuf)>,
}

impl MetricsServer {
    pub fn bind(addr: Option<SocketAddr>, unix: Option<&Path>) -> Result<MetricsServer, MetricsError> {
        let tcp = addr
            .map(|a| {
                let l = TcpListener::bind(a).map_err(|source| MetricsError::BindTcp { addr: a, source })?;
                // Non-blocking, so an accept after a client vanished cannot block the loop.
                l.set_nonblocking(true).map_err(|source| MetricsError::BindTcp { addr: a, source })?;
                Ok(l)
            })
            .transpose()?;
        let unix = match unix {
            Some(p) => {
                if p.exists() && std::os::unix::net::UnixStream::connect(p).is_err() {
                    let _ = std::fs::remove_file(p);
                }
                let bind_err = |source| MetricsError::BindUnix { path: p.to_path_buf(), source };
                let l = UnixListener::bind(p).map_err(bind_err)?;
                l.set_nonblocking(true).map_err(bind_err)?;
                Some((l, p.to_path_buf()))
            }
            None => None,
        };
        Ok(MetricsServer { tcp, unix })
    }

    /// Listeners handed over by a previous vutap (live upgrade).
    pub fn from_listeners(tcp: Option<TcpListener>, unix: Option<(UnixListener, PathBuf)>) -> MetricsServer {
        MetricsServer { tcp, unix }
    }

    /// Dups of the listeners, for a live upgrade.
    pub fn dup_fds(&self) -> io::Result<(Option<std::os::fd::OwnedFd>, Option<std::os::fd::OwnedFd>)> {
        use std::os::fd::AsFd;
        let tcp = self.tcp.as_ref().map(|l| l.as_fd().try_clone_to_owned()).transpose()?;
        let unix = self.unix.as_ref().map(|(l, _)| l.as_fd().try_clone_to_owned()).transpose()?;
        Ok((tcp, unix))
    }

    /// Serves both endpoints from one thread until the process exits.
    pub fn spawn(self, devices: Vec<Arc<Device>>, seccomp: Seccomp) -> Result<(), MetricsError> {
        if self.tcp.is_none() && self.unix.is_none() {
            return Ok(());
        }
        if let Some(a) = self.tcp.as_ref().and_then(|l| l.local_addr().ok()) {
            info!("metrics: http://{a}/metrics");
        }
        if let Some((_, path)) = &self.unix {
            info!("metrics: unix socket {}", path.display());
        }
        std::thread::Builder::new()
            .name("vutap-metrics".into())
            .spawn(move || {
                seccomp.enter(ThreadKind::Metrics);
                let mut endpoint = Endpoint::new(self.tcp, self.unix.map(|(l, _)| l));
                loop {
                    endpoint.turn(|| render(&devices));
                }
            })
            .map_err(MetricsError::Spawn)?;
        Ok(())
    }
}

/// How long one connection may take, from accept to the last byte of the answer. A scraper
/// needs milliseconds; an idle or slow client is closed at this point.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(5);

/// Connections open at once. When full, the oldest is closed to admit a new one, so a client
/// that opens many connections can delay a scrape by at most one turn of the loop.
const MAX_CONNECTIONS: usize = 64;

/// How long a listener rests after accept fails for a reason other than "none pending" (out of
/// fds, out of memory), so the loop does not spin on it.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// What a connection is doing.
enum Phase {
    /// HTTP: collecting the request head.
    Reading(Vec<u8>),
    /// Sending the answer, from `sent` on.
    Writing { out: Vec<u8>, sent: usize },
}

struct Connection {
    fd: OwnedFd,
    phase: Phase,
    deadline: Instant,
}

struct Listener {
    fd: OwnedFd,
    /// Unix: the text is written on accept, no request is read.
    http: bool,
    resting_until: Option<Instant>,
}

/// The single-threaded endpoint: one `ppoll` over both listeners and every open connection;
/// sockets are only ever read and written with `MSG_DONTWAIT`, so no client can block the
/// thread, and each connection has a deadline.
struct Endpoint {
    listeners: Vec<Listener>,
    connections: Vec<Connection>,
}

/// The outcome of a non-blocking recv or send.
enum Io {
    Done(usize),
    WouldBlock,
    Closed,
}

fn recv_nonblocking(fd: &OwnedFd, buf: &mut [u8]) -> Io {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the call; the fd is ours.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    io_outcome(n)
}

fn send_nonblocking(fd: &OwnedFd, buf: &[u8]) -> Io {
    // SAFETY: `buf` is valid for reads of `buf.len()` bytes for the call; the fd is ours.
    // MSG_NOSIGNAL: a peer that hung up gives EPIPE, not SIGPIPE.
    let n = unsafe { libc::send(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    io_outcome(n)
}

fn io_outcome(n: isize) -> Io {
    match n {
        0 => Io::Closed,
        n if n > 0 => Io::Done(n as usize),
        _ => match io::Error::last_os_error().kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Io::WouldBlock,
            _ => Io::Closed,
        },
    }
}

impl Endpoint {
    fn new(tcp: Option<TcpListener>, unix: Option<UnixListener>) -> Endpoint {
        let mut listeners = Vec::new();
        if let Some(l) = tcp {
            listeners.push(Listener { fd: l.into(), http: true, resting_until: None });
        }
        if let Some(l) = unix {
            listeners.push(Listener { fd: l.into(), http: false, resting_until: None });
        }
        Endpoint { listeners, connections: Vec::with_capacity(MAX_CONNECTIONS) }
    }

    /// Waits for something to do (at most until the next deadline), then does it.
    fn turn(&mut self, render: impl Fn() -> String) {
        let now = Instant::now();
        let mut pollfds = Vec::with_capacity(self.listeners.len() + self.connections.len());
        let mut wake = now + CONNECTION_DEADLINE;
        for l in &self.listeners {
            let resting = l.resting_until.is_some_and(|t| t > now);
            if let Some(t) = l.resting_until.filter(|_| resting) {
                wake = wake.min(t);
            }
            pollfds.push(libc::pollfd { fd: if resting { -1 } else { l.fd.as_raw_fd() }, events: libc::POLLIN, revents: 0 });
        }
        for c in &self.connections {
            let events = match c.phase {
                Phase::Reading(_) => libc::POLLIN,
                Phase::Writing { .. } => libc::POLLOUT,
            };
            wake = wake.min(c.deadline);
            pollfds.push(libc::pollfd { fd: c.fd.as_raw_fd(), events, revents: 0 });
        }
        let wait = wake.saturating_duration_since(now);
        let ts = libc::timespec { tv_sec: wait.as_secs() as libc::time_t, tv_nsec: wait.subsec_nanos() as libc::c_long };
        // SAFETY: `pollfds` is a valid array of `pollfds.len()` entries and `ts` a valid timespec,
        // both alive across the call; no signal mask is passed.
        let ready = unsafe { libc::ppoll(pollfds.as_mut_ptr(), pollfds.len() as libc::nfds_t, &ts, std::ptr::null()) };
        if ready < 0 {
            return; // EINTR: go round again.
        }
        let (listener_events, connection_events) = pollfds.split_at(self.listeners.len());
        for (c, p) in self.connections.iter_mut().zip(connection_events) {
            if p.revents != 0 {
                c.progress(&render);
            }
        }
        let now = Instant::now();
        self.connections.retain(|c| !c.finished() && c.deadline > now);
        let ready: Vec<usize> = listener_events.iter().enumerate().filter(|(_, p)| p.revents != 0).map(|(i, _)| i).collect();
        for i in ready {
            self.accept_all(i, &render);
        }
    }

    /// Accepts the pending connections of listener `i` (at most [`MAX_CONNECTIONS`] a turn); a
    /// unix one gets the text at once.
    fn accept_all(&mut self, i: usize, render: &impl Fn() -> String) {
        // Bounded, so a flood of connections cannot keep the loop here while others wait.
        for _ in 0..MAX_CONNECTIONS {
            // SAFETY: accept4 on a listening socket we own; the peer address is not wanted
            // (null pointers are allowed). The new fd is non-blocking and close-on-exec.
            let fd = unsafe {
                libc::accept4(
                    self.listeners[i].fd.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => {}
                    io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted => continue,
                    _ => {
                        warn!("metrics accept: {e}");
                        self.listeners[i].resting_until = Some(Instant::now() + ACCEPT_BACKOFF);
                    }
                }
                return;
            }
            // SAFETY: accept4 just returned this fd; nothing else owns it.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            if self.connections.len() >= MAX_CONNECTIONS {
                debug!("metrics: {MAX_CONNECTIONS} connections open; closing the oldest");
                self.connections.remove(0);
            }
            let phase =
                if self.listeners[i].http { Phase::Reading(Vec::new()) } else { Phase::Writing { out: render().into_bytes(), sent: 0 } };
            let mut c = Connection { fd, phase, deadline: Instant::now() + CONNECTION_DEADLINE };
            // Most requests are already there: answer without another turn.
            c.progress(render);
            if !c.finished() {
                self.connections.push(c);
            }
        }
    }
}

impl Connection {
    fn finished(&self) -> bool {
        matches!(&self.phase, Phase::Writing { out, sent } if *sent >= out.len())
    }

    /// Reads what has arrived or writes what the socket takes, without blocking.
    fn progress(&mut self, render: &impl Fn() -> String) {
        if let Phase::Reading(head) = &mut self.phase {
            let mut buf = [0u8; 1024];
            loop {
                match recv_nonblocking(&self.fd, &mut buf) {
                    Io::Done(n) => head.extend_from_slice(&buf[..n.min(MAX_HEAD.saturating_sub(head.len()))]),
                    Io::WouldBlock => break,
                    // Gone before a whole request: nothing to answer.
                    Io::Closed => {
                        self.deadline = Instant::now();
                        return;
                    }
                }
                if let Parsed::Complete(route) = metrics_http::parse(head) {
                    self.phase = Phase::Writing { out: metrics_http::response(route, render), sent: 0 };
                    break;
                }
            }
        }
        if let Phase::Writing { out, sent } = &mut self.phase {
            while *sent < out.len() {
                match send_nonblocking(&self.fd, &out[*sent..]) {
                    Io::Done(n) => *sent += n,
                    Io::WouldBlock => break,
                    Io::Closed => {
                        *sent = out.len();
                        break;
                    }
                }
            }
            if *sent >= out.len() {
                discard_unread(&self.fd);
            }
        }
    }
}

/// Reads and drops what the client sent beyond its request head (an over-long head, a body),
/// so that closing the socket sends FIN rather than a reset that could destroy the answer
/// before the client reads it. Bounded; never blocks.
fn discard_unread(fd: &OwnedFd) {
    let mut buf = [0u8; 4096];
    for _ in 0..16 {
        if !matches!(recv_nonblocking(fd, &mut buf), Io::Done(_)) {
            break;
        }
    }
}
