//! The process: open every device and socket, drop privileges, then serve each device on its
//! own thread (its queue pairs on their own worker threads), with signals, metrics and link
//! monitors alongside. A device that fails to start is logged and skipped (unless it is the only
//! one); a device whose serving thread dies does not disturb the others.
//!
//! Started by a live upgrade (see [`crate::operations::upgrade`]), the process opens nothing: it takes every
//! device, connection and listener over from the previous process, then serves the same way.

use std::ffi::OsString;
use std::os::fd::{AsFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use log::{error, info, warn};
use thiserror::Error;

use crate::cli::DaemonConfig;
use crate::control::device::Device;
use crate::control::link_state::{LinkError, LinkMonitor};
use crate::control::vhost_user::{bind_socket, open_endpoint, serve_from, ResumedConnection, SocketError, SocketMode};
use crate::operations::metrics_server::{MetricsError, MetricsServer};
use crate::operations::privilege::{drop_to_user, PrivilegeError};
use crate::operations::sandbox::ThreadKind;
use crate::operations::signals::{self, SignalError};
use crate::operations::upgrade::coordinator::{self, DeviceHandle, Handover};
use crate::operations::upgrade::resume;
use crate::operations::upgrade::wire::{Channel, Verdict, UPGRADE_FD_ENV};
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
    #[error("--control-socket: {0}")]
    Control(#[source] SocketError),
    #[error("{UPGRADE_FD_ENV}={0:?} is not an fd number")]
    UpgradeFd(String),
}

/// A device, opened with its socket bound, not yet served.
struct Ready {
    dev: Arc<Device>,
    mode: SocketMode,
    listener: Option<UnixListener>,
    once: bool,
    /// A connection taken over from the previous process (live upgrade).
    resumed: Option<ResumedConnection>,
}

fn open_one(cfg: &crate::cli::NamedDevice) -> Result<Ready, StartError> {
    let mut dev = open_device(&cfg.config)?;
    let mode = cfg.config.socket.to_mode();
    if let Some(name) = &cfg.name {
        dev.label = name.clone();
    }
    let listener = open_endpoint(&mode)?;
    Ok(Ready { dev: Arc::new(dev), mode, listener, once: cfg.config.once, resumed: None })
}

/// The process's own binary and arguments, for a live upgrade (read before any filter is on).
struct SelfExec {
    args: Vec<OsString>,
    binary: PathBuf,
}

impl SelfExec {
    fn read() -> SelfExec {
        // A binary replaced on disk reads as "PATH (deleted)": the new file at PATH is meant.
        let binary = std::env::current_exe()
            .map(|p| {
                let s = p.to_string_lossy();
                PathBuf::from(s.strip_suffix(" (deleted)").unwrap_or(&s).to_string())
            })
            .unwrap_or_else(|_| PathBuf::from("/proc/self/exe"));
        SelfExec { args: std::env::args_os().collect(), binary }
    }
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
    if let Ok(fd) = std::env::var(UPGRADE_FD_ENV) {
        std::env::remove_var(UPGRADE_FD_ENV);
        let fd: RawFd = fd.parse().map_err(|_| DaemonError::UpgradeFd(fd.clone()))?;
        return run_taken_over(config, fd);
    }
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
    let control = config.control_socket.as_deref().map(bind_socket).transpose().map_err(DaemonError::Control)?;

    // Everything privileged is done: taps open, sockets bound. No thread exists yet.
    if let Some(user) = &config.user {
        let (uid, gid) = drop_to_user(user)?;
        info!("running as {user} (uid {uid}, gid {gid}) with no capabilities");
    }
    serve_all(&config, ready, metrics, control, None)
}

/// The process a live upgrade started: takes everything over from the previous one through
/// the socket `fd`, and serves. Any failure before every device runs is reported to the
/// previous process (which then resumes) and ends this one at once: no destructor runs, so
/// nothing shared (a tap queue's attachment) is touched.
fn run_taken_over(mut config: DaemonConfig, fd: RawFd) -> Result<(), DaemonError> {
    config.policy.seccomp = config.policy.seccomp.noting_inherited_upgrade_list();
    // SAFETY: the previous vutap passed us this end of its socketpair; nothing else owns it.
    let channel = Channel::new(unsafe { UnixDatagram::from_raw_fd(fd) });
    let fail = |why: String| -> ! {
        error!("taking over from the previous vutap failed: {why}");
        let _ = channel.send_json(&Verdict { ok: false, error: Some(why) });
        log::logger().flush();
        std::process::exit(1)
    };
    let (state, fds) = resume::receive(&channel).unwrap_or_else(|e| fail(e.to_string()));
    let sockets: Vec<String> = config.devices.iter().map(|d| d.config.socket.path().display().to_string()).collect();
    let taken = resume::rebuild(state, fds, &sockets).unwrap_or_else(|e| fail(e.to_string()));
    let mut ready = Vec::new();
    for ((mut dev, listener, connection), cfg) in taken.devices.into_iter().zip(&config.devices) {
        dev.policy = config.policy;
        if config.policy.io_uring {
            // The tap queues carried over; a ring that cannot be built only costs speed.
            match dev.use_io_uring() {
                Ok(()) => info!("device {}: TX and RX through io_uring", dev.label),
                Err(e) => warn!("device {}: --io-uring: {e}; TX and RX by writev/readv", dev.label),
            }
        }
        let dev = Arc::new(dev);
        let resumed = connection.map(|c| c.start(dev.clone()).unwrap_or_else(|e| fail(e.to_string())));
        ready.push(Ready { dev, mode: cfg.config.socket.to_mode(), listener, once: cfg.config.once, resumed });
    }
    let metrics_unix = match (taken.metrics_unix, &config.metrics_unix) {
        (Some(l), Some(path)) => Some((l, path.clone())),
        _ => None,
    };
    let metrics = MetricsServer::from_listeners(taken.metrics_tcp, metrics_unix);
    if let Some(user) = &config.user {
        info!("running as {user}: privileges and capabilities as the previous vutap left them");
    }
    serve_all(&config, ready, metrics, taken.control, Some(channel))
}

/// Serves opened (or taken-over) devices: signals, metrics, link monitors, the upgrade thread,
/// one serving thread per device. With `handover`, tells the previous process that every device
/// runs here now.
fn serve_all(
    config: &DaemonConfig,
    ready: Vec<Ready>,
    metrics: MetricsServer,
    control: Option<UnixListener>,
    handover: Option<Channel>,
) -> Result<(), DaemonError> {
    let self_exec = SelfExec::read();

    let mut cleanup: Vec<PathBuf> = ready
        .iter()
        .filter_map(|r| match (&r.mode, &r.listener) {
            (SocketMode::Server(p), Some(_)) => Some(p.clone()),
            _ => None,
        })
        .collect();
    cleanup.extend(config.metrics_unix.iter().cloned());
    cleanup.extend(config.control_socket.iter().filter(|_| control.is_some()).cloned());
    signals::install(cleanup, config.policy.seccomp)?;

    let devices: Vec<Arc<Device>> = ready.iter().map(|r| r.dev.clone()).collect();
    if let Some(control) = control {
        let (metrics_tcp, metrics_unix) = metrics.dup_fds().map_err(DaemonError::Spawn)?;
        let dup = |fd: std::os::fd::BorrowedFd<'_>| fd.try_clone_to_owned().map_err(DaemonError::Spawn);
        let mut handles = Vec::new();
        for r in &ready {
            let listener = r.listener.as_ref().map(|l| dup(l.as_fd())).transpose()?;
            let socket = match &r.mode {
                SocketMode::Server(p) | SocketMode::Client(p) => p.display().to_string(),
            };
            handles.push(DeviceHandle { dev: r.dev.clone(), listener, socket });
        }
        let handover = Handover {
            devices: handles,
            metrics_tcp,
            metrics_unix,
            control: dup(control.as_fd())?,
            args: self_exec.args,
            default_binary: self_exec.binary,
        };
        coordinator::spawn(control, handover, config.policy.seccomp).map_err(DaemonError::Spawn)?;
    }
    metrics.spawn(devices.clone(), config.policy.seccomp)?;
    if let Some(secs) = config.stats_interval {
        crate::operations::stats::spawn_summary(devices.clone(), Duration::from_secs(secs), config.policy.seccomp)
            .map_err(DaemonError::Spawn)?;
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
                    config.policy.seccomp,
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
                let Ready { dev, mode, listener, once, resumed } = r;
                serve_from(listener, &mode, dev, once, resumed);
            })
            .map_err(DaemonError::Spawn)?;
        threads.push((label, t));
    }
    if let Some(channel) = handover {
        if let Err(e) = channel.send_json(&Verdict { ok: true, error: None }) {
            warn!("cannot tell the previous vutap that every device runs here: {e}");
        }
        info!("took over every device from the previous vutap");
    }
    // Every other thread exists and has installed its own filter; the main thread's comes last so
    // that none of them inherits it (see `sandbox`).
    config.policy.seccomp.enter(ThreadKind::Main);
    for (label, t) in threads {
        if t.join().is_err() {
            warn!("device {label}: its serving thread panicked; the other devices go on");
        }
    }
    drop(monitors);
    Ok(())
}
