//! Link state: follows the tap's (or macvtap's, i.e. its lower's) carrier and tells the frontend.
//!
//! A monitor thread polls `/sys/class/net/<if>/carrier` (which reads as an error while the
//! interface is administratively down). The state feeds the STATUS field of the config space
//! (VIRTIO_NET_S_LINK_UP in GET_CONFIG) and, on every change, vutap sends
//! VHOST_USER_BACKEND_CONFIG_CHANGE_MSG over the backend request channel, if the frontend set one
//! up (BACKEND_REQ) and negotiated CONFIG. QEMU's virtio-net negotiates neither CONFIG for
//! vhost-user-net nor reads status from the backend (see README, "Operations"); frontends that do
//! (and the test frontend) see the link follow the carrier.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use log::{debug, info, warn};
use thiserror::Error;
use vhost::vhost_user::message::BackendReq;

use crate::metrics::DeviceMetrics;
use crate::sandbox::{self, ThreadKind};

#[derive(Debug, Error)]
pub enum LinkError {
    #[error("cannot send CONFIG_CHANGE_MSG to the frontend: {0}")]
    Send(#[source] io::Error),
    #[error("cannot spawn the link monitor thread: {0}")]
    Spawn(#[source] io::Error),
}

/// The frontend's backend request channel (SET_BACKEND_REQ_FD) for the current connection.
pub struct BackendChannel {
    pub stream: UnixStream,
    /// Whether the frontend negotiated VHOST_USER_PROTOCOL_F_CONFIG (needed for config changes).
    pub config_acked: bool,
}

/// A device's link: up or down, and whom to tell.
pub struct LinkState {
    up: AtomicBool,
    channel: Mutex<Option<BackendChannel>>,
}

impl Default for LinkState {
    fn default() -> Self {
        LinkState { up: AtomicBool::new(true), channel: Mutex::new(None) }
    }
}

/// VHOST_USER_BACKEND_CONFIG_CHANGE_MSG: a bare header, version 1, no reply requested (a
/// frontend that cannot handle it then only logs, and we never block on it).
pub fn config_change_msg() -> [u8; 12] {
    let mut m = [0u8; 12];
    m[0..4].copy_from_slice(&(BackendReq::CONFIG_CHANGE_MSG as u32).to_le_bytes());
    m[4..8].copy_from_slice(&1u32.to_le_bytes());
    m
}

fn send_all(stream: &UnixStream, buf: &[u8]) -> io::Result<()> {
    let mut sent = 0;
    while sent < buf.len() {
        // SAFETY: the remaining part of `buf` is valid for reads of its length; MSG_NOSIGNAL
        // turns a closed peer into EPIPE instead of SIGPIPE.
        let n = unsafe {
            libc::send(stream.as_raw_fd(), buf[sent..].as_ptr() as *const libc::c_void, buf.len() - sent, libc::MSG_NOSIGNAL)
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        sent += n as usize;
    }
    Ok(())
}

impl LinkState {
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Installs (or with `None`, forgets) the current connection's backend request channel.
    pub fn set_channel(&self, channel: Option<BackendChannel>) {
        *self.channel.lock().unwrap_or_else(|p| p.into_inner()) = channel;
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
        let mut guard = self.channel.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ch) = guard.as_ref() {
            if !ch.config_acked {
                debug!("link change not sent: the frontend did not negotiate the CONFIG protocol feature");
            } else {
                match send_all(&ch.stream, &config_change_msg()).map_err(LinkError::Send) {
                    Ok(()) => {
                        metrics.config_change_msgs.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        warn!("{e}; dropping the backend request channel");
                        *guard = None;
                    }
                }
            }
        }
        true
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
    ) -> Result<LinkMonitor, LinkError> {
        let stop = Arc::new(AtomicBool::new(false));
        let stop_t = stop.clone();
        let sys: PathBuf = Path::new("/sys/class/net").join(&ifname);
        let thread = std::thread::Builder::new()
            .name(format!("vutap-link-{label}"))
            .spawn(move || {
                sandbox::enter(ThreadKind::LinkMonitor);
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
    fn test_config_change_msg_layout() {
        assert_eq!(config_change_msg(), [2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn test_link_change_notifies_only_with_config() {
        let m = DeviceMetrics::default();
        let link = LinkState::default();
        assert!(link.is_up());
        assert!(!link.set(true, &m));
        let (a, mut b) = UnixStream::pair().unwrap();
        link.set_channel(Some(BackendChannel { stream: a.try_clone().unwrap(), config_acked: false }));
        assert!(link.set(false, &m));
        assert_eq!(m.config_change_msgs.load(Ordering::Relaxed), 0);
        link.set_channel(Some(BackendChannel { stream: a, config_acked: true }));
        assert!(link.set(true, &m));
        let mut got = [0u8; 12];
        b.read_exact(&mut got).unwrap();
        assert_eq!(got, config_change_msg());
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
}
