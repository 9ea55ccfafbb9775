//! The running process's side of a live upgrade, on its own thread (`vutap-upgrade`): it waits
//! on the control socket for `vutap upgrade`, starts the new binary with one end of a socketpair,
//! parks every device's serving thread once the new process said hello, hands the state and fds
//! over, and exits when the new process runs every device, or resumes every device if anything
//! failed (the new binary did not start, refused the state, or could not rebuild a device).

use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};
use log::{error, info, warn};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::port::{ParkRequest, Parked, Verdict};
use super::state::{DeviceState, ProcessState, Version, STATE_MAJOR, STATE_MINOR};
use super::wire::{self, Channel, Hello, WireError, UPGRADE_FD_ENV};
use crate::control::device::Device;
use crate::operations::sandbox::{Seccomp, ThreadKind};

/// How long the new binary may take to start and say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a serving thread may take to park (it finishes the message it is handling).
const PARK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the new process may take to rebuild every device and start its pairs.
const VERDICT_TIMEOUT: Duration = Duration::from_secs(20);

/// Why an upgrade did not happen (every device was resumed, or never stopped).
#[derive(Debug, Error)]
pub enum UpgradeError {
    #[error("cannot create the hand-over socketpair: {0}")]
    Socketpair(#[source] io::Error),
    #[error("cannot start {binary}: {source}")]
    Start {
        binary: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the new binary did not get ready: {source}{status}")]
    NotReady {
        #[source]
        source: WireError,
        status: String,
    },
    #[error("the new binary reads hand-over state version {major}.{minor}, this vutap writes {STATE_MAJOR}.{STATE_MINOR}: a different major version cannot take over live (restart instead)")]
    Version { major: u32, minor: u32 },
    #[error("device {label}: cannot wake its serving thread: {source}")]
    Wake {
        label: String,
        #[source]
        source: io::Error,
    },
    #[error("device {label}: its serving thread did not park within {PARK_TIMEOUT:?}")]
    NotParked { label: String },
    #[error("device {label}: cannot export its connection: {why}")]
    Export { label: String, why: String },
    #[error("cannot dup an fd to hand over: {0}")]
    Dup(#[source] io::Error),
    #[error("cannot send the state: {0}")]
    SendState(#[source] WireError),
    #[error("the new process did not take over: {source}{status}")]
    NoVerdict {
        #[source]
        source: WireError,
        status: String,
    },
    #[error("the new process refused: {0}")]
    Refused(String),
}

/// What `vutap upgrade` sends on the control socket (one JSON line).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct UpgradeRequest {
    /// The new binary; default: the binary this process was started from.
    #[serde(default)]
    pub binary: Option<PathBuf>,
}

/// The answer (one JSON line).
#[derive(Debug, Serialize, Deserialize)]
pub struct UpgradeReply {
    pub ok: bool,
    #[serde(default)]
    pub error: Option<String>,
    /// The new process.
    #[serde(default)]
    pub pid: Option<u32>,
    /// How long the queue pairs were halted: from parking the first device to the new process
    /// running every device.
    #[serde(default)]
    pub pause_ms: Option<f64>,
}

/// One device as the upgrade thread sees it.
pub struct DeviceHandle {
    pub dev: Arc<Device>,
    /// A dup of its vhost-user listener (server mode).
    pub listener: Option<OwnedFd>,
    /// Its vhost-user socket path.
    pub socket: String,
}

/// Everything the upgrade thread hands over besides what the serving threads give it.
pub struct Handover {
    pub devices: Vec<DeviceHandle>,
    pub metrics_tcp: Option<OwnedFd>,
    pub metrics_unix: Option<OwnedFd>,
    pub control: OwnedFd,
    /// This process's arguments: the new binary gets the same.
    pub args: Vec<OsString>,
    /// `/proc/self/exe` as resolved at start (the path, so an updated file there is picked up).
    pub default_binary: PathBuf,
}

/// Serves the control socket on the `vutap-upgrade` thread.
pub fn spawn(listener: UnixListener, handover: Handover, seccomp: Seccomp) -> std::io::Result<()> {
    std::thread::Builder::new().name("vutap-upgrade".into()).spawn(move || {
        seccomp.enter(ThreadKind::Upgrade);
        for conn in listener.incoming() {
            match conn {
                Ok(s) => serve_request(s, &handover),
                Err(e) => warn!("control socket accept: {e}"),
            }
        }
    })?;
    Ok(())
}

fn serve_request(stream: UnixStream, handover: &Handover) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut line = String::new();
    if let Err(e) = BufReader::new(&stream).read_line(&mut line) {
        warn!("control socket: cannot read the request: {e}");
        return;
    }
    let reply = match serde_json::from_str::<UpgradeRequest>(&line) {
        Err(e) => UpgradeReply { ok: false, error: Some(format!("bad request: {e}")), pid: None, pause_ms: None },
        Ok(req) => {
            let binary = req.binary.unwrap_or_else(|| handover.default_binary.clone());
            info!("upgrade to {} requested", binary.display());
            match upgrade(handover, &binary) {
                Ok(done) => {
                    tell_supervisor_main_pid(done.pid);
                    info!("upgrade done: pid {} runs every device (pause {:.1} ms); exiting", done.pid, done.pause.as_secs_f64() * 1e3);
                    let reply = UpgradeReply { ok: true, error: None, pid: Some(done.pid), pause_ms: Some(done.pause.as_secs_f64() * 1e3) };
                    write_reply(&stream, &reply);
                    log::logger().flush();
                    // No destructor runs: the sessions' would detach the tap queues the new
                    // process now reads.
                    std::process::exit(0);
                }
                Err(e) => {
                    error!("upgrade to {} failed, every device resumed: {e}", binary.display());
                    UpgradeReply { ok: false, error: Some(e.to_string()), pid: None, pause_ms: None }
                }
            }
        }
    };
    write_reply(&stream, &reply);
}

/// Under systemd (`NotifyAccess=main`), names the new process as the service's main process
/// before this one exits, so that systemd does not take the exit for the service's end.
fn tell_supervisor_main_pid(pid: u32) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let msg = format!("MAINPID={pid}\n");
    let sent = UnixDatagram::unbound().and_then(|s| {
        let bytes = path.as_encoded_bytes();
        let addr = match bytes.strip_prefix(b"@") {
            Some(name) => <std::os::unix::net::SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(name)?,
            None => std::os::unix::net::SocketAddr::from_pathname(&path)?,
        };
        s.send_to_addr(msg.as_bytes(), &addr)
    });
    match sent {
        Ok(_) => info!("told the supervisor that pid {pid} is the main process now"),
        Err(e) => warn!("cannot tell the supervisor (NOTIFY_SOCKET) the new main pid {pid}: {e}"),
    }
}

fn write_reply(mut stream: &UnixStream, reply: &UpgradeReply) {
    let mut text = serde_json::to_string(reply).unwrap_or_default();
    text.push('\n');
    if let Err(e) = stream.write_all(text.as_bytes()) {
        warn!("control socket: cannot answer: {e}");
    }
}

struct Done {
    pid: u32,
    pause: Duration,
}

/// A started new binary; killed and reaped unless the hand-over completed.
struct NewProcess {
    child: Child,
    done: bool,
}

impl NewProcess {
    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn describe_end(&mut self) -> String {
        match self.child.try_wait() {
            Ok(Some(status)) => format!(" ({status})"),
            _ => String::new(),
        }
    }
}

impl Drop for NewProcess {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Parked serving threads, resumed unless told that the new process took over.
struct ParkedDevices {
    verdicts: Vec<Sender<Verdict>>,
    handed_over: bool,
}

impl Drop for ParkedDevices {
    fn drop(&mut self) {
        let verdict = if self.handed_over { Verdict::HandedOver } else { Verdict::Resume };
        for v in &self.verdicts {
            let _ = v.send(verdict);
        }
    }
}

fn upgrade(h: &Handover, binary: &PathBuf) -> Result<Done, UpgradeError> {
    // Declared before the child: on failure the child is killed and reaped first (dropped
    // first), and only then are the devices resumed, so no ring is ever served twice.
    let mut parked = ParkedDevices { verdicts: Vec::new(), handed_over: false };
    let (ours, theirs) = UnixDatagram::pair().map_err(UpgradeError::Socketpair)?;
    let theirs_fd = theirs.as_raw_fd();
    clear_cloexec(theirs_fd).map_err(UpgradeError::Socketpair)?;
    let child = Command::new(binary)
        .args(h.args.iter().skip(1))
        .env(UPGRADE_FD_ENV, theirs_fd.to_string())
        .spawn()
        .map_err(|source| UpgradeError::Start { binary: binary.clone(), source })?;
    drop(theirs);
    let mut new = NewProcess { child, done: false };
    let channel = Channel::new(ours);
    let hello: Hello = channel
        .recv_json(HELLO_TIMEOUT, &mut || new.alive())
        .map_err(|source| UpgradeError::NotReady { source, status: new.describe_end() })?;
    if hello.version.major != STATE_MAJOR {
        // Refused before anything is halted: the new binary could not read what we would send.
        return Err(UpgradeError::Version { major: hello.version.major, minor: hello.version.minor });
    }
    info!("new vutap pid {} (state version {}.{}) is ready; parking the devices", hello.pid, hello.version.major, hello.version.minor);

    let started = Instant::now();
    let mut answers: Vec<Receiver<Result<Parked, String>>> = Vec::new();
    for d in &h.devices {
        let (parked_tx, parked_rx) = bounded(1);
        let (verdict_tx, verdict_rx) = bounded(1);
        d.dev
            .upgrade
            .request(ParkRequest { parked: parked_tx, verdict: verdict_rx })
            .map_err(|source| UpgradeError::Wake { label: d.dev.label.clone(), source })?;
        parked.verdicts.push(verdict_tx);
        answers.push(parked_rx);
    }
    let mut fds: Vec<OwnedFd> = Vec::new();
    let mut devices = Vec::new();
    for (d, answer) in h.devices.iter().zip(answers) {
        let p = answer
            .recv_timeout(PARK_TIMEOUT)
            .map_err(|_| UpgradeError::NotParked { label: d.dev.label.clone() })?
            .map_err(|why| UpgradeError::Export { label: d.dev.label.clone(), why })?;
        devices.push(device_state(d, p, &mut fds)?);
    }
    let mut dup = |fd: Option<&OwnedFd>| -> Result<Option<usize>, UpgradeError> {
        let Some(fd) = fd else { return Ok(None) };
        fds.push(fd.as_fd().try_clone_to_owned().map_err(UpgradeError::Dup)?);
        Ok(Some(fds.len() - 1))
    };
    let state = ProcessState {
        version: Version::current(),
        devices,
        metrics_tcp: dup(h.metrics_tcp.as_ref())?,
        metrics_unix: dup(h.metrics_unix.as_ref())?,
        control: dup(Some(&h.control))?,
    };
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    channel.send_state(&state.to_json(), &raw).map_err(UpgradeError::SendState)?;
    let verdict: wire::Verdict = channel
        .recv_json(VERDICT_TIMEOUT, &mut || new.alive())
        .map_err(|source| UpgradeError::NoVerdict { source, status: new.describe_end() })?;
    if !verdict.ok {
        return Err(UpgradeError::Refused(verdict.error.unwrap_or_default()));
    }
    let pause = started.elapsed();
    new.done = true;
    parked.handed_over = true;
    Ok(Done { pid: hello.pid, pause })
}

/// One device's state; its fds are appended to `fds`.
fn device_state(d: &DeviceHandle, parked: Parked, fds: &mut Vec<OwnedFd>) -> Result<DeviceState, UpgradeError> {
    let dev = &d.dev;
    let mut add = |fd: std::os::fd::BorrowedFd<'_>| -> Result<usize, UpgradeError> {
        fds.push(fd.try_clone_to_owned().map_err(UpgradeError::Dup)?);
        Ok(fds.len() - 1)
    };
    let tap_queues = dev.queues.iter().map(|q| add(q.as_fd())).collect::<Result<Vec<_>, _>>()?;
    let listener = match &d.listener {
        Some(l) => Some(add(l.as_fd())?),
        None => None,
    };
    let connection = match parked.connection {
        Some((mut c, conn_fds)) => {
            // The connection's indices are into its own list: shift them into the process's.
            let base = fds.len();
            fds.extend(conn_fds);
            c.stream += base;
            for r in &mut c.memory {
                r.fd += base;
            }
            if let Some(l) = &mut c.log {
                l.fd += base;
            }
            if let Some(b) = &mut c.backend_channel {
                b.fd += base;
            }
            for v in &mut c.vrings {
                v.kick = v.kick.map(|i| i + base);
                v.call = v.call.map(|i| i + base);
            }
            Some(c)
        }
        None => None,
    };
    Ok(DeviceState {
        socket: d.socket.clone(),
        label: dev.label.clone(),
        name: dev.name.clone(),
        macvtap: dev.kind == crate::tap::TapKind::Macvtap,
        mac: dev.mac,
        mtu: dev.mtu,
        link_up: dev.link.is_up(),
        tap_queues,
        listener,
        connection,
        pair_counters: dev.metrics.iter().map(|m| m.snapshot().fields().into_iter().map(|(k, v)| (k.to_string(), v)).collect()).collect(),
        device_counters: dev.device_metrics.fields().iter().map(|(k, _, v)| (k.to_string(), *v)).collect(),
    })
}

fn clear_cloexec(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: F_SETFD on an fd we own; no memory is passed.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `vutap upgrade CONTROL [--binary PATH]`: asks the running vutap to upgrade and waits for
/// its answer.
pub fn request_upgrade(control: &std::path::Path, binary: Option<PathBuf>, timeout: Duration) -> Result<UpgradeReply, String> {
    let mut s = UnixStream::connect(control).map_err(|e| format!("cannot connect to {}: {e}", control.display()))?;
    let mut line = serde_json::to_string(&UpgradeRequest { binary }).unwrap_or_default();
    line.push('\n');
    s.write_all(line.as_bytes()).map_err(|e| format!("cannot send the request: {e}"))?;
    s.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    let mut answer = String::new();
    BufReader::new(&s).read_line(&mut answer).map_err(|e| format!("no answer: {e}"))?;
    serde_json::from_str(&answer).map_err(|e| format!("bad answer {answer:?}: {e}"))
}
