//! SIGTERM/SIGINT: remove the sockets vutap created and exit 0.
//!
//! Exiting is the clean stop for a packet pump: the kernel closes the tap fds and unmaps guest
//! memory, the frontend sees the socket close (as after a crash, which it must survive anyway:
//! ring positions live in guest memory and are resumed by the next vutap). What a signal adds
//! over a crash is an exit code of 0, a log line, and no stale socket files left behind.

use std::path::PathBuf;
use std::thread::JoinHandle;

use log::{info, warn};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum SignalError {
    #[error("cannot install the SIGTERM/SIGINT handler: {0}")]
    Install(#[source] std::io::Error),
    #[error("cannot spawn the signal thread: {0}")]
    Spawn(#[source] std::io::Error),
}

/// Installs the handler: on SIGTERM or SIGINT, removes `cleanup` paths and exits with 0.
pub fn install(cleanup: Vec<PathBuf>) -> Result<JoinHandle<()>, SignalError> {
    let mut signals = Signals::new([SIGTERM, SIGINT]).map_err(SignalError::Install)?;
    std::thread::Builder::new()
        .name("vutap-signals".into())
        .spawn(move || {
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
