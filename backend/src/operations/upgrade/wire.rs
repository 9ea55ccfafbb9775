//! The hand-over channel between the old and the new process: a unix datagram socketpair (one
//! message per datagram, no framing to get wrong), fds passed with SCM_RIGHTS in batches.
//!
//! Sequence: new -> old `Hello`; old -> new `State` then the fds; new -> old `Verdict`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::state::Version;

/// The environment variable that tells a starting vutap to take over instead of opening devices.
pub const UPGRADE_FD_ENV: &str = "VUTAP_UPGRADE_FD";

/// The kernel's limit of fds in one SCM_RIGHTS message is 253.
const FDS_PER_MESSAGE: usize = 200;
/// Largest datagram we accept (the state is a few KiB per device).
const MAX_MESSAGE: usize = 1 << 20;
const STATE_TAG: u8 = b'S';
const FDS_TAG: u8 = b'F';

#[derive(Debug, Error)]
pub enum WireError {
    #[error("hand-over socket: {0}")]
    Io(#[from] io::Error),
    #[error("hand-over socket: {0}")]
    Scm(#[from] vmm_sys_util::errno::Error),
    #[error("hand-over socket: the other process closed it")]
    Closed,
    #[error("hand-over socket: no answer within {0:?}")]
    Timeout(Duration),
    #[error("hand-over socket: unexpected message: {0}")]
    Unexpected(String),
}

/// The new process is up and can take the state.
#[derive(Debug, Serialize, Deserialize)]
pub struct Hello {
    pub pid: u32,
    pub version: Version,
}

/// The new process's answer to the state: running every device, or why not.
#[derive(Debug, Serialize, Deserialize)]
pub struct Verdict {
    pub ok: bool,
    #[serde(default)]
    pub error: Option<String>,
}

pub struct Channel {
    sock: UnixDatagram,
}

impl Channel {
    pub fn new(sock: UnixDatagram) -> Self {
        Channel { sock }
    }

    /// Sends one JSON message.
    pub fn send_json<T: Serialize>(&self, msg: &T) -> Result<(), WireError> {
        let bytes = serde_json::to_vec(msg).map_err(|e| WireError::Unexpected(e.to_string()))?;
        self.sock.send(&bytes)?;
        Ok(())
    }

    /// Receives one JSON message, waiting at most `timeout`; `alive` is asked every 100 ms
    /// whether the other side can still answer (a child that exited cannot).
    pub fn recv_json<T: for<'de> Deserialize<'de>>(&self, timeout: Duration, alive: &mut dyn FnMut() -> bool) -> Result<T, WireError> {
        let bytes = self.recv_waiting(timeout, alive)?;
        serde_json::from_slice(&bytes).map_err(|e| WireError::Unexpected(format!("{e}: {}", String::from_utf8_lossy(&bytes))))
    }

    fn recv_waiting(&self, timeout: Duration, alive: &mut dyn FnMut() -> bool) -> Result<Vec<u8>, WireError> {
        let deadline = Instant::now() + timeout;
        self.sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        let mut buf = vec![0u8; MAX_MESSAGE];
        loop {
            match self.sock.recv(&mut buf) {
                Ok(0) => return Err(WireError::Closed),
                Ok(n) => {
                    buf.truncate(n);
                    return Ok(buf);
                }
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted) => {
                    if !alive() {
                        return Err(WireError::Closed);
                    }
                    if Instant::now() >= deadline {
                        return Err(WireError::Timeout(timeout));
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Sends the state and its fds (which stay open here: the sender may still resume).
    pub fn send_state(&self, json: &[u8], fds: &[RawFd]) -> Result<(), WireError> {
        let mut head = vec![STATE_TAG];
        head.extend_from_slice(&(fds.len() as u32).to_le_bytes());
        head.extend_from_slice(json);
        self.sock.send(&head)?;
        for batch in fds.chunks(FDS_PER_MESSAGE) {
            self.sock.send_with_fds(&[&[FDS_TAG][..]], batch)?;
        }
        Ok(())
    }

    /// Receives the state and its fds (close-on-exec, owned).
    pub fn recv_state(&self, timeout: Duration) -> Result<(Vec<u8>, Vec<OwnedFd>), WireError> {
        let msg = self.recv_waiting(timeout, &mut || true)?;
        if msg.len() < 5 || msg[0] != STATE_TAG {
            return Err(WireError::Unexpected("expected the state".into()));
        }
        let count = u32::from_le_bytes([msg[1], msg[2], msg[3], msg[4]]) as usize;
        let mut fds: Vec<OwnedFd> = Vec::with_capacity(count);
        self.sock.set_read_timeout(Some(timeout))?;
        while fds.len() < count {
            let mut tag = [0u8; 1];
            let mut raw = vec![-1 as RawFd; FDS_PER_MESSAGE];
            let mut iov = [libc::iovec { iov_base: tag.as_mut_ptr() as *mut libc::c_void, iov_len: 1 }];
            // SAFETY: `iov` points at `tag`, which we own and may be overwritten with anything.
            let (n, got) = unsafe { self.sock.recv_with_fds(&mut iov, &mut raw)? };
            for &fd in &raw[..got] {
                // SAFETY: the kernel just installed `fd` for us with this message; nobody else owns it.
                let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                set_cloexec(&owned)?;
                fds.push(owned);
            }
            if n == 0 || tag[0] != FDS_TAG || got == 0 {
                return Err(WireError::Unexpected(format!("fd batch: {n} bytes, {got} fds")));
            }
        }
        Ok((msg[5..].to_vec(), fds))
    }
}

/// Received fds must not leak into the next upgrade's child.
fn set_cloexec(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: F_SETFD on an fd we own; no memory is passed.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
