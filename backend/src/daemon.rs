//! The process: open every device and socket, drop privileges, then serve each device on its
//! own thread (its queue pairs on their own worker threads), with signals, metrics and link
//! monitors alongside. A device that fails to start is logged and skipped (unless it is the only
//! one); a device whose serving thread dies does not disturb the others.

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use log::{error, info, warn};
use thiserror::Error;

use crate::cli::DaemonConfig;
use crate::device::Device;
use crate::link_state::{LinkError, LinkMonitor};
use crate::metrics_server::{MetricsError, MetricsServer};
use crate::privilege::{drop_to_user, PrivilegeError};
use crate::sandbox::{self, ThreadKind};
use crate::signals::{self, SignalError};
use crate::vhost_user::{open_endpoint, serve_on, SocketMode};
use crate::{open_device, StartError};

#[derive(Debug, Error)]
pub enum DaemonError {
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("no device could be started ({0} configured; see the errors above)")]
    NoDevice(usize),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error(transparent)]
    Privilege(#[from] PrivilegeError),
    #[error(transparent)]
    Signals(#[from] SignalError),
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("cannot spawn a thread: {0}")]
    Spawn(#[source] std::io::Error),
}

/// A device, opened with its socket bound, not yet served.
struct Ready {
    dev: Arc<Device>,
    mode: SocketMode,
    listener: Option<UnixListener>,
    once: bool,
}

fn open_one(cfg: &crate::cli::NamedDevice) -> Result<Ready, StartError> {
    let mut dev = open_device(&cfg.config)?;
    let mode = cfg.config.socket.to_mode();
    if let Some(name) = &cfg.name {
        dev.label = name.clone();
    }
    let listener = open_endpoint(&mode)?;
    Ok(Ready { dev: Arc::new(dev), mode, listener, once: cfg.config.once })
}

/// `--sndbuf`: replaces the unlimited send buffer `Tap::open` sets on every queue.
fn apply_sndbuf(ready: &[Ready], bytes: i32) {
    for r in ready {
        for (pair, q) in r.dev.queues.iter().enumerate() {
            match q.set_sndbuf(bytes) {
                Ok(()) => {}
                Err(e) => warn!("device {} queue pair {pair}: TUNSETSNDBUF {bytes}: {e}; the send buffer stays unlimited", r.dev.label),
            }
        }
        info!("device {}: tap send buffer {bytes} bytes per queue", r.dev.label);
    }
}

/// Runs until every device is done (only with `--once`), or until SIGTERM/SIGINT exits the process.
pub fn run(config: DaemonConfig) -> Result<(), DaemonError> {
    let total = config.devices.len();
    let mut ready = Vec::new();
    for d in &config.devices {
        match open_one(d) {
            Ok(r) => ready.push(r),
            Err(e) if total == 1 => return Err(e.into()),
            Err(e) => error!("device {}: {e}; serving the others", d.name.clone().unwrap_or_else(|| format!("{:?}", d.config.socket))),
        }
    }
    if ready.is_empty() {
        return Err(DaemonError::NoDevice(total));
    }
    if let Some(bytes) = config.sndbuf {
        apply_sndbuf(&ready, bytes);
    }
    let metrics = MetricsServer::bind(config.metrics_addr, config.metrics_unix.as_deref())?;

    // Everything privileged is done: taps open, sockets bound. No thread exists yet.
    if let Some(user) = &config.user {
        let (uid, gid) = drop_to_user(user)?;
        info!("running as {user} (uid {uid}, gid {gid}) with no capabilities");
    }

    let mut cleanup: Vec<PathBuf> = ready
        .iter()
        .filter_map(|r| match (&r.mode, &r.listener) {
            (SocketMode::Server(p), Some(_)) => Some(p.clone()),
            _ => None,
        })
        .collect();
    cleanup.extend(config.metrics_unix.iter().cloned());
    signals::install(cleanup)?;

    let devices: Vec<Arc<Device>> = ready.iter().map(|r| r.dev.clone()).collect();
    metrics.spawn(devices.clone())?;
    if let Some(secs) = config.stats_interval {
        crate::stats::spawn_summary(devices.clone(), Duration::from_secs(secs)).map_err(DaemonError::Spawn)?;
    }
    let mut monitors = Vec::new();
    if config.link_poll_ms > 0 {
        for d in &devices {
            if std::path::Path::new("/sys/class/net").join(&d.name).is_dir() {
                monitors.push(LinkMonitor::spawn(
                    d.label.clone(),
                    d.name.clone(),
                    d.link.clone(),
                    d.device_metrics.clone(),
                    Duration::from_millis(config.link_poll_ms),
                )?);
            } else {
                info!("device {}: no interface to watch; link stays up", d.label);
            }
        }
    }

    let mut threads = Vec::new();
    for r in ready {
        let label = r.dev.label.clone();
        let t = std::thread::Builder::new()
            .name(format!("vutap-dev-{label}"))
            .spawn(move || {
                let Ready { dev, mode, listener, once } = r;
                serve_on(listener, &mode, dev, once);
            })
            .map_err(DaemonError::Spawn)?;
        threads.push((label, t));
    }
    // Every other thread exists and has installed its own filter; the main thread's comes last so
    // that none of them inherits it (see `sandbox`).
    sandbox::enter(ThreadKind::Main);
    for (label, t) in threads {
        if t.join().is_err() {
            warn!("device {label}: its serving thread panicked; the other devices go on");
        }
    }
    drop(monitors);
    Ok(())
}
