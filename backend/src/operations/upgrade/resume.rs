//! The new process's side of a live upgrade: take the state and fds, rebuild each device and
//! its connection, start the pairs, and tell the old process.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use log::info;
use thiserror::Error;
use vhost::vhost_user::message::{FrontendReq, VhostUserU64};
use vhost::vhost_user::BackendReqHandler;
use vm_memory::ByteValued;

use super::state::{DeviceState, ProcessState, StateError, Version};
use super::wire::{Channel, Hello, WireError};
use crate::control::device::Device;
use crate::control::memory_guard::GuardError;
use crate::control::session::Session;
use crate::control::vhost_user::ResumedConnection;
use crate::metrics::PairCounts;
use crate::tap::{Tap, TapKind, TapQueue};

/// Why the new process cannot take over (it tells the old one, which resumes).
#[derive(Debug, Error)]
pub enum ResumeError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(
        "the previous vutap serves sockets {got:?}, this one is configured for {want:?} (start the new binary with the same configuration)"
    )]
    OtherDevices { got: Vec<String>, want: Vec<String> },
    #[error("hand-over fd #{0} is missing or named twice")]
    Fd(usize),
    #[error("device {label}: {source}")]
    Device {
        label: String,
        #[source]
        source: GuardError,
    },
    #[error("device {label}: cannot restore its connection: {source}")]
    Session {
        label: String,
        #[source]
        source: crate::control::session::SessionError,
    },
    #[error("device {label}: cannot resume the request parser: {source}")]
    Parser {
        label: String,
        #[source]
        source: std::io::Error,
    },
}

/// How long the new process waits for the state once it said hello.
const STATE_TIMEOUT: Duration = Duration::from_secs(30);

/// What the old process handed over, rebuilt: everything the daemon needs to serve.
pub struct TakenOver {
    /// Per device (configuration order): the device, its listener, and its connection.
    pub devices: Vec<(Device, Option<UnixListener>, Option<OwnedConnection>)>,
    pub metrics_tcp: Option<std::net::TcpListener>,
    pub metrics_unix: Option<UnixListener>,
    pub control: Option<UnixListener>,
}

/// A connection's parts before its device is shared (`Arc`): turned into a
/// [`ResumedConnection`] by [`OwnedConnection::start`].
pub struct OwnedConnection {
    stream: UnixStream,
    state: super::state::ConnectionState,
    fds: Vec<Option<OwnedFd>>,
}

impl OwnedConnection {
    /// Restores the session on `dev`, teaches the request parser what was negotiated, and
    /// starts the pairs that ran.
    pub fn start(mut self, dev: Arc<Device>) -> Result<ResumedConnection, ResumeError> {
        let label = dev.label.clone();
        let session =
            Session::restore(dev, &self.state, &mut self.fds).map_err(|source| ResumeError::Session { label: label.clone(), source })?;
        let session = Arc::new(Mutex::new(session));
        let handler = primed_handler(&self.stream, session.clone()).map_err(|source| ResumeError::Parser { label, source })?;
        session.lock().unwrap_or_else(|p| p.into_inner()).resume_all();
        Ok(ResumedConnection { stream: self.stream, session, handler, owned: self.state.owned })
    }
}

/// Says hello and receives the state: the first steps of a process started by an upgrade.
pub fn receive(channel: &Channel) -> Result<(ProcessState, Vec<OwnedFd>), ResumeError> {
    channel.send_json(&Hello { pid: std::process::id(), version: Version::current() })?;
    let (json, fds) = channel.recv_state(STATE_TIMEOUT)?;
    let state = ProcessState::from_json(&json, fds.len())?;
    Ok((state, fds))
}

/// Rebuilds the devices from the state; `sockets` are the configured devices' socket paths,
/// which must match the state's (the same configuration).
pub fn rebuild(state: ProcessState, fds: Vec<OwnedFd>, sockets: &[String]) -> Result<TakenOver, ResumeError> {
    let mut fds: Vec<Option<OwnedFd>> = fds.into_iter().map(Some).collect();
    let mut take = |i: usize| fds.get_mut(i).and_then(Option::take).ok_or(ResumeError::Fd(i));
    let got: Vec<String> = state.devices.iter().map(|d| d.socket.clone()).collect();
    if got != sockets {
        return Err(ResumeError::OtherDevices { got, want: sockets.to_vec() });
    }
    let mut devices = Vec::new();
    for d in state.devices {
        let dev = rebuild_device(&d, &mut take)?;
        let listener = d.listener.map(&mut take).transpose()?.map(UnixListener::from);
        let connection = match d.connection {
            Some(c) => {
                let stream = UnixStream::from(take(c.stream)?);
                let mut own: Vec<Option<OwnedFd>> = Vec::new();
                // The connection's fds move to its own table, indices kept.
                let mut indices: Vec<usize> = c.memory.iter().map(|r| r.fd).collect();
                indices.extend(c.log.as_ref().map(|l| l.fd));
                indices.extend(c.backend_channel.as_ref().map(|b| b.fd));
                for v in &c.vrings {
                    indices.extend(v.kick);
                    indices.extend(v.call);
                }
                for i in indices {
                    if own.len() <= i {
                        own.resize_with(i + 1, || None);
                    }
                    own[i] = Some(take(i)?);
                }
                Some(OwnedConnection { stream, state: c, fds: own })
            }
            None => None,
        };
        devices.push((dev, listener, connection));
    }
    Ok(TakenOver {
        devices,
        metrics_tcp: state.metrics_tcp.map(&mut take).transpose()?.map(std::net::TcpListener::from),
        metrics_unix: state.metrics_unix.map(&mut take).transpose()?.map(UnixListener::from),
        control: state.control.map(&mut take).transpose()?.map(UnixListener::from),
    })
}

fn rebuild_device(d: &DeviceState, take: &mut impl FnMut(usize) -> Result<OwnedFd, ResumeError>) -> Result<Device, ResumeError> {
    let queues = d.tap_queues.iter().map(|&i| take(i).map(TapQueue::from_fd)).collect::<Result<Vec<_>, _>>()?;
    let tap = Tap {
        queues,
        kind: if d.macvtap { TapKind::Macvtap } else { TapKind::Tap },
        name: Some(d.name.clone()),
        mac: Some(d.mac),
        mtu: Some(d.mtu),
    };
    let mut dev = Device::new(tap, d.mac, d.mtu).map_err(|source| ResumeError::Device { label: d.label.clone(), source })?;
    dev.label = d.label.clone();
    dev.link.restore_up(d.link_up);
    for (metrics, counters) in dev.metrics.iter().zip(&d.pair_counters) {
        let mut c = PairCounts::default();
        for (name, value) in counters {
            c.set(name, *value);
        }
        metrics.add(&c);
    }
    dev.device_metrics.restore(&d.device_counters);
    info!(
        "device {}: taken over ({} queue pair(s), {})",
        d.label,
        d.tap_queues.len(),
        if d.connection.is_some() { "connected" } else { "no frontend" }
    );
    Ok(dev)
}

/// A request parser for a connection in the middle of its life.
///
/// vhost's `BackendReqHandler` learns the negotiated features only from the messages it parses
/// (it needs them to send REPLY_ACK answers and to allow SET_VRING_ENABLE, GET_QUEUE_NUM,
/// SET_LOG_BASE...), and keeps them private. So the parser is built on a socketpair, taught by
/// replaying GET_FEATURES, SET_FEATURES and SET_PROTOCOL_FEATURES with the session replaying
/// (it records, the tap is not touched), and then its socket is replaced by the real
/// connection with dup3: the frontend sees nothing.
pub fn primed_handler(stream: &UnixStream, session: Arc<Mutex<Session>>) -> std::io::Result<BackendReqHandler<Mutex<Session>>> {
    let (features, protocol) = session.lock().unwrap_or_else(|p| p.into_inner()).negotiated();
    let (ours, theirs) = UnixStream::pair()?;
    let ours_fd = ours.as_raw_fd();
    let mut handler = BackendReqHandler::from_stream(ours, session.clone());
    let to_io = |e: vhost::vhost_user::Error| std::io::Error::other(format!("replaying the negotiation: {e}"));
    session.lock().unwrap_or_else(|p| p.into_inner()).set_replaying(true);
    let mut replay = || -> std::io::Result<()> {
        send_request(&theirs, FrontendReq::GET_FEATURES, None)?;
        handler.handle_request().map_err(to_io)?;
        if let Some(f) = features {
            send_request(&theirs, FrontendReq::SET_FEATURES, Some(f))?;
            handler.handle_request().map_err(to_io)?;
        }
        send_request(&theirs, FrontendReq::SET_PROTOCOL_FEATURES, Some(protocol))?;
        handler.handle_request().map_err(to_io)
    };
    let replayed = replay();
    session.lock().unwrap_or_else(|p| p.into_inner()).set_replaying(false);
    replayed?;
    // SAFETY: both fds are open and owned (the connection by `stream`, `ours_fd` by the
    // handler); dup3 atomically makes `ours_fd` another descriptor of the connection.
    if unsafe { libc::dup3(stream.as_raw_fd(), ours_fd, libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(handler)
}

fn send_request(to: &UnixStream, code: FrontendReq, body: Option<u64>) -> std::io::Result<()> {
    let body = body.map(VhostUserU64::new);
    let bytes = body.as_ref().map_or(&[][..], |b| b.as_slice());
    // The vhost-user wire (`crate::control::wire`), not the hand-over channel's (`super::wire`).
    crate::control::wire::send(to, &crate::control::wire::Header::request(code, bytes.len() as u32), bytes, &[])
        .map_err(std::io::Error::other)
}
