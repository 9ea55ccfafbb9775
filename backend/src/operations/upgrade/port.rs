//! How the upgrade thread stops a device's serving thread at a message boundary: it leaves a
//! [`ParkRequest`] in the device's [`UpgradePort`] and wakes the thread through the port's
//! eventfd (polled next to the vhost-user socket). The serving thread halts its workers (each at
//! a batch boundary, held RX chains given back), hands over what the fds do not carry, and waits
//! for the verdict: resume, or stay parked until the old process exits.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use log::{info, warn};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::state::ConnectionState;
use crate::control::session::Session;

/// What a parked serving thread hands to the upgrade thread.
pub struct Parked {
    /// The current connection, if there is one: its state with fd indices into `fds`, which
    /// start with the connection's socket.
    pub connection: Option<(ConnectionState, Vec<OwnedFd>)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The new process did not take over: start the workers again.
    Resume,
    /// The new process runs the device: never touch it again (the process is about to exit).
    HandedOver,
}

pub struct ParkRequest {
    pub parked: Sender<Result<Parked, String>>,
    pub verdict: Receiver<Verdict>,
}

pub struct UpgradePort {
    wake: EventFd,
    request: Mutex<Option<ParkRequest>>,
}

impl UpgradePort {
    pub fn new() -> std::io::Result<Self> {
        Ok(UpgradePort { wake: EventFd::new(EFD_NONBLOCK)?, request: Mutex::new(None) })
    }

    /// The eventfd the serving thread polls.
    pub fn wake_fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    /// Asks the serving thread to park (called by the upgrade thread).
    pub fn request(&self, req: ParkRequest) -> std::io::Result<()> {
        *self.request.lock().unwrap_or_else(|p| p.into_inner()) = Some(req);
        self.wake.write(1)
    }

    fn take(&self) -> Option<ParkRequest> {
        let _ = self.wake.read();
        self.request.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Parks a serving thread that has no connection (it was waiting in accept).
    pub fn park_idle(&self, label: &str) {
        let Some(req) = self.take() else { return };
        if req.parked.send(Ok(Parked { connection: None })).is_err() {
            return;
        }
        if wait_verdict(label, &req.verdict) == Verdict::HandedOver {
            park_forever();
        }
    }

    /// Parks a serving thread between two messages of `stream`: halts the pairs, hands the
    /// connection over, and resumes them unless the hand-over succeeded.
    pub fn park_connection(&self, label: &str, session: &Mutex<Session>, stream: &UnixStream, owned: bool) {
        let Some(req) = self.take() else { return };
        let mut s = session.lock().unwrap_or_else(|p| p.into_inner());
        s.halt_all();
        let parked = s.export(stream, owned).map(|connection| Parked { connection: Some(connection) }).map_err(|e| e.to_string());
        let sent = req.parked.send(parked).is_ok();
        let verdict = if sent { wait_verdict(label, &req.verdict) } else { Verdict::Resume };
        if verdict == Verdict::Resume {
            s.resume_all();
        } else {
            // The new process serves this connection now; this thread must not read it again.
            drop(s);
            park_forever();
        }
    }
}

/// The new process serves the device now; this thread must not touch its sockets again.
fn park_forever() -> ! {
    loop {
        std::thread::park();
    }
}

fn wait_verdict(label: &str, verdict: &Receiver<Verdict>) -> Verdict {
    // The upgrade thread answers within its own timeouts; this bound only guards against it
    // dying, so that a device is never left halted for good.
    match verdict.recv_timeout(Duration::from_secs(120)) {
        Ok(v) => {
            if v == Verdict::Resume {
                info!("device {label}: upgrade did not complete; resuming");
            }
            v
        }
        Err(e) => {
            warn!("device {label}: no upgrade verdict ({e}); resuming");
            Verdict::Resume
        }
    }
}
