//! Link state: follows the tap's (or macvtap's, i.e. its lower's) carrier and tells the frontend.
//!
//! A monitor thread polls `/sys/class/net/<if>/carrier` (which reads as an error while the
//! interface is administratively down). The state feeds the STATUS field of the config space
//! (VIRTIO_NET_S_LINK_UP in GET_CONFIG) and, on every change, vutap sends
//! VHOST_USER_BACKEND_CONFIG_CHANGE_MSG over the backend request channel, if the frontend set one
//! up (BACKEND_REQ) and negotiated CONFIG. QEMU's virtio-net negotiates neither CONFIG for
//! vhost-user-net nor reads status from the backend (see README, "Operations"); frontends that do
//! (and the test frontend) see the link follow the carrier.
//!
//! The frontend is never waited for: a message goes out with a non-blocking send, and one the
//! channel has no room for is dropped and counted (the frontend still reads the current STATUS
//! with GET_CONFIG). The device's channel lock is only held to take or replace the channel, so
//! a frontend that never reads cannot hold up its own disconnect or the next connection.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use thiserror::Error;

use crate::control::wire;
use crate::metrics::DeviceMetrics;
use crate::operations::sandbox::{Seccomp, ThreadKind};

/// How long the rest of a message that went out in part may take: after that the channel is
/// out of step and dropped.
const PARTIAL_SEND_WAIT: Duration = Duration::from_millis(50);

#[derive(Debug, Error)]
pub enum LinkError {
    #[error("cannot send CONFIG_CHANGE_MSG to the frontend: {0}")]
    Send(#[source] io::Error),
    #[error(
        "CONFIG_CHANGE_MSG went out in part ({sent} of {len} bytes) and the frontend did not take the rest within {PARTIAL_SEND_WAIT:?}"
    )]
    PartialSend { sent: usize, len: usize },
    #[error("cannot spawn the link monitor thread: {0}")]
    Spawn(#[source] io::Error),
}

/// The frontend's backend request channel (SET_BACKEND_REQ_FD) for the current connection.
pub struct BackendChannel {
    pub stream: UnixStream,
    /// Whether the frontend negotiated VHOST_USER_PROTOCOL_F_CONFIG (needed for config changes).
    pub config_acked: bool,
}

/// A channel as the link state shares it: senders take a clone and send without the device's
/// lock; `sending` keeps two senders' bytes from interleaving (held for a bounded time only).
struct SharedChannel {
    channel: BackendChannel,
    sending: Mutex<()>,
}

/// What became of one config-change message.
enum Sent {
    Whole,
    /// The channel had no room: nothing went out.
    NoRoom,
}

/// A device's link: up or down, and whom to tell.
pub struct LinkState {
    up: AtomicBool,
    channel: Mutex<Option<Arc<SharedChannel>>>,
}

impl Default for LinkState {
    fn default() -> Self {
        LinkState { up: AtomicBool::new(true), channel: Mutex::new(None) }
    }
}

/// Sends `buf` without ever blocking: `NoRoom` if the socket takes none of it, and if it takes
/// only part, waits at most [`PARTIAL_SEND_WAIT`] for room for the rest.
fn send_nonblocking(stream: &UnixStream, buf: &[u8]) -> Result<Sent, LinkError> {
    let mut sent = 0;
    let mut deadline = None;
    while sent < buf.len() {
        // SAFETY: the remaining part of `buf` is valid for reads of its length; MSG_NOSIGNAL
        // turns a closed peer into EPIPE instead of SIGPIPE.
        let n = unsafe {
            libc::send(
                stream.as_raw_fd(),
                buf[sent..].as_ptr() as *const libc::c_void,
                buf.len() - sent,
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            sent += n as usize;
            continue;
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => {}
            io::ErrorKind::WouldBlock if sent == 0 => return Ok(Sent::NoRoom),
            io::ErrorKind::WouldBlock => {
                let deadline = *deadline.get_or_insert_with(|| Instant::now() + PARTIAL_SEND_WAIT);
                let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                    return Err(LinkError::PartialSend { sent, len: buf.len() });
                };
                wait_writable(stream, left);
            }
            _ => return Err(LinkError::Send(e)),
        }
    }
    Ok(Sent::Whole)
}

/// Waits up to `timeout` for `stream` to take more bytes.
fn wait_writable(stream: &UnixStream, timeout: Duration) {
    let mut pfd = libc::pollfd { fd: stream.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd for the duration of the call; the result only decides whether
    // the caller tries again.
    unsafe { libc::poll(&mut pfd, 1, ms) };
}

impl LinkState {
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Installs (or with `None`, forgets) the current connection's backend request channel.
    pub fn set_channel(&self, channel: Option<BackendChannel>) {
        let shared = channel.map(|channel| Arc::new(SharedChannel { channel, sending: Mutex::new(()) }));
        *self.channel.lock().unwrap_or_else(|p| p.into_inner()) = shared;
    }

    /// Takes over the state a previous vutap announced (live upgrade), without telling anyone:
    /// the frontend already knows it.
    pub fn restore_up(&self, up: bool) {
        self.up.store(up, Ordering::Relaxed);
    }

    /// A dup of the current channel's socket and whether CONFIG was negotiated (live upgrade).
    pub fn channel_fd(&self) -> Option<(std::os::fd::OwnedFd, bool)> {
        let shared = self.channel.lock().unwrap_or_else(|p| p.into_inner()).clone()?;
        let fd = std::os::fd::AsFd::as_fd(&shared.channel.stream).try_clone_to_owned().ok()?;
        Some((fd, shared.channel.config_acked))
    }

    pub fn has_channel(&self) -> bool {
        self.channel.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// Records the link state; on a change, notifies the frontend. Returns whether it changed.
    pub fn set(&self, up: bool, metrics: &DeviceMetrics) -> bool {
        if self.up.swap(up, Ordering::Relaxed) == up {
            return false;
        }
        metrics.link_changes.fetch_add(1, Ordering::Relaxed);
        // A clone, so the send below runs without the device's lock.
        let Some(shared) = self.channel.lock().unwrap_or_else(|p| p.into_inner()).clone() else { return true };
        if !shared.channel.config_acked {
            debug!("link change not sent: the frontend did not negotiate the CONFIG protocol feature");
            return true;
        }
        let result = {
            let _one_sender = shared.sending.lock().unwrap_or_else(|p| p.into_inner());
            send_nonblocking(&shared.channel.stream, &wire::config_change_msg())
        };
        match result {
            Ok(Sent::Whole) => {
                metrics.config_change_msgs.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Sent::NoRoom) => {
                if metrics.config_change_dropped.fetch_add(1, Ordering::Relaxed) == 0 {
                    warn!("the frontend is not reading its backend request channel: CONFIG_CHANGE_MSG dropped (further ones only counted)");
                }
            }
            Err(e) => {
                metrics.config_change_dropped.fetch_add(1, Ordering::Relaxed);
                warn!("{e}; dropping the backend request channel");
                self.forget_channel(&shared);
            }
        }
        true
    }

    /// Forgets `shared` unless the frontend has installed another channel meanwhile.
    fn forget_channel(&self, shared: &Arc<SharedChannel>) {
        let mut guard = self.channel.lock().unwrap_or_else(|p| p.into_inner());
        if guard.as_ref().is_some_and(|cur| Arc::ptr_eq(cur, shared)) {
            *guard = None;
        }
    }
}

/// The carrier of interface `ifname`: false when down, administratively down, or gone.
pub fn read_carrier(ifname: &str) -> bool {
    carrier_at(&Path::new("/sys/class/net").join(ifname))
}

fn carrier_at(sys: &Path) -> bool {
    std::fs::read_to_string(sys.join("carrier")).map(|s| s.trim() == "1").unwrap_or(false)
}

/// A thread polling one interface's carrier into a [`LinkState`]; stops on `Drop`.
pub struct LinkMonitor {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl LinkMonitor {
    /// Polls `/sys/class/net/<ifname>/carrier` every `interval`. `on_change` runs after each
    /// change (used for logging by the caller).
    pub fn spawn(
        label: String,
        ifname: String,
        link: Arc<LinkState>,
        metrics: Arc<DeviceMetrics>,
        interval: Duration,
        seccomp: Seccomp,
    ) -> Result<LinkMonitor, LinkError> {
        let stop = Arc::new(AtomicBool::new(false));
        let stop_t = stop.clone();
        let sys: PathBuf = Path::new("/sys/class/net").join(&ifname);
        let thread = std::thread::Builder::new()
            .name(format!("vutap-link-{label}"))
            .spawn(move || {
                seccomp.enter(ThreadKind::LinkMonitor);
                while !stop_t.load(Ordering::Relaxed) {
                    let up = carrier_at(&sys);
                    if link.set(up, &metrics) {
                        info!(
                            "device {label}: {ifname} link {}{}",
                            if up { "up" } else { "down" },
                            if link.has_channel() { "" } else { " (frontend has no backend request channel)" }
                        );
                    }
                    std::thread::sleep(interval);
                }
            })
            .map_err(LinkError::Spawn)?;
        Ok(LinkMonitor { stop, thread: Some(thread) })
    }
}

impl Drop for LinkMonitor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn test_link_change_notifies_only_with_config() {
        let m = DeviceMetrics::default();
        let link = LinkState::default();
        assert!(link.is_up());
        assert!(!link.set(true, &m));
        let (a, b) = UnixStream::pair().unwrap();
        link.set_channel(Some(BackendChannel { stream: a.try_clone().unwrap(), config_acked: false }));
        assert!(link.set(false, &m));
        assert_eq!(m.config_change_msgs.load(Ordering::Relaxed), 0);
        link.set_channel(Some(BackendChannel { stream: a, config_acked: true }));
        assert!(link.set(true, &m));
        let msg = wire::recv_message(&b).unwrap();
        assert_eq!(msg.header, wire::Header::request(vhost::vhost_user::message::BackendReq::CONFIG_CHANGE_MSG, 0));
        assert_eq!(m.link_changes.load(Ordering::Relaxed), 2);
        assert_eq!(m.config_change_msgs.load(Ordering::Relaxed), 1);
        drop(b);
        // A closed channel is dropped, not fatal.
        assert!(link.set(false, &m));
        assert!(!link.has_channel());
    }

    #[test]
    fn test_missing_interface_reads_down() {
        assert!(!read_carrier("vutap-no-such-if0"));
    }

    #[test]
    fn test_link_flaps_never_wait_for_a_frontend_that_does_not_read() {
        let m = Arc::new(DeviceMetrics::default());
        let link = Arc::new(LinkState::default());
        let (a, mut b) = UnixStream::pair().unwrap();
        // The smallest send buffer: the channel is full after a few messages.
        let small: libc::c_int = 1;
        // SAFETY: setsockopt on a valid socket with a pointer to a c_int of the given size.
        let rc = unsafe { libc::setsockopt(a.as_raw_fd(), libc::SOL_SOCKET, libc::SO_SNDBUF, (&small as *const libc::c_int).cast(), 4) };
        assert_eq!(rc, 0);
        link.set_channel(Some(BackendChannel { stream: a, config_acked: true }));
        const FLAPS: u64 = 2000;
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let (l, m2) = (link.clone(), m.clone());
        std::thread::spawn(move || {
            for i in 0..FLAPS {
                l.set(i % 2 == 1, &m2);
            }
            let _ = done_tx.send(());
        });
        assert!(done_rx.recv_timeout(Duration::from_secs(10)).is_ok(), "the link monitor blocked on the frontend");
        let (sent, dropped) = (m.config_change_msgs.load(Ordering::Relaxed), m.config_change_dropped.load(Ordering::Relaxed));
        assert_eq!(m.link_changes.load(Ordering::Relaxed), FLAPS);
        assert_eq!(sent + dropped, FLAPS, "every change is sent or counted as dropped");
        assert!(sent > 0 && dropped > 0, "sent {sent}, dropped {dropped}");
        assert!(link.has_channel(), "a full channel is kept: the frontend may read it later");
        // The disconnect path takes the channel away at once.
        let t = Instant::now();
        link.set_channel(None);
        assert!(t.elapsed() < Duration::from_millis(100));
        // What went out are whole messages, as many as counted.
        b.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let mut got = Vec::new();
        let _ = b.read_to_end(&mut got);
        assert_eq!(got.len() as u64, sent * wire::HEADER_SIZE as u64);
        assert!(got.chunks(wire::HEADER_SIZE).all(|c| c == wire::config_change_msg()));
    }
}
