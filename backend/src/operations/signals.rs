//! SIGTERM/SIGINT: remove the sockets vutap created and exit 0.
//!
//! Exiting is the clean stop for a packet pump: the kernel closes the tap fds and unmaps guest
//! memory, the frontend sees the socket close (as after a crash, which it must survive anyway:
//! ring positions live in guest memory and are resumed by the next vutap). What a signal adds
//! over a crash is an exit code of 0, a log line, and no stale socket files left behind.
//!
//! Both signals are blocked in the thread that installs the handler, and so in every thread it
//! spawns afterwards, and unblocked only in the signal thread: the handler then always runs there,
//! under the signal thread's seccomp list, never on a worker or the main thread, whose lists
//! cannot wake the signal thread.

use std::path::PathBuf;
use std::thread::JoinHandle;

use log::{info, warn};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use thiserror::Error;
use vmm_sys_util::signal::{block_signal, unblock_signal};

use crate::operations::sandbox::{Seccomp, ThreadKind};

#[derive(Debug, Error)]
pub enum SignalError {
    #[error("cannot install the SIGTERM/SIGINT handler: {0}")]
    Install(#[source] std::io::Error),
    #[error("cannot spawn the signal thread: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("cannot route SIGTERM/SIGINT to the signal thread: {0}")]
    Mask(vmm_sys_util::signal::Error),
}

const HANDLED: [libc::c_int; 2] = [SIGTERM, SIGINT];

/// Installs the handler: on SIGTERM or SIGINT, removes `cleanup` paths and exits with 0. Call
/// it before spawning any other thread (see the module doc); it blocks both signals in the caller.
pub fn install(cleanup: Vec<PathBuf>, seccomp: Seccomp) -> Result<JoinHandle<()>, SignalError> {
    let mut signals = Signals::new(HANDLED).map_err(SignalError::Install)?;
    for sig in HANDLED {
        match block_signal(sig) {
            Ok(()) | Err(vmm_sys_util::signal::Error::SignalAlreadyBlocked(_)) => {}
            Err(e) => return Err(SignalError::Mask(e)),
        }
    }
    std::thread::Builder::new()
        .name("vutap-signals".into())
        .spawn(move || {
            for sig in HANDLED {
                if let Err(e) = unblock_signal(sig) {
                    warn!("cannot unblock signal {sig} in the signal thread: {e}");
                }
            }
            seccomp.enter(ThreadKind::Signals);
            if let Some(sig) = signals.forever().next() {
                let name = if sig == SIGTERM { "SIGTERM" } else { "SIGINT" };
                info!("{name} received: removing sockets and exiting");
                for p in &cleanup {
                    match std::fs::remove_file(p) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => warn!("cannot remove {}: {e}", p.display()),
                    }
                }
                log::logger().flush();
                std::process::exit(0);
            }
        })
        .map_err(SignalError::Spawn)
}
