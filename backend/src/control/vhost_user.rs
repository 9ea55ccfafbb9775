//! The vhost-user front door: listen on (or connect to) the socket, and serve each frontend
//! connection with a fresh [`Session`], one after another, for the life of the process.
//!
//! Messages are parsed by vhost's `BackendReqHandler`, with one exception handled here first:
//! QEMU's virtio-net sends SET_VRING_ENABLE *before* SET_FEATURES (and QEMU 10 waits for its
//! ack). vhost rejects it without a reply, which would hang QEMU 10 and leave the first queue
//! pair disabled. So each header is peeked; an early enable is consumed, recorded and acked here
//! (framed by [`crate::control::wire`]), as are SEND_RARP and SET_BACKEND_REQ_FD.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use log::{debug, error, info, warn};
use thiserror::Error;
use vhost::vhost_user::message::{FrontendReq, VhostUserProtocolFeatures, VhostUserVringState};
use vhost::vhost_user::{BackendReqHandler, Error as VhostError};

use crate::control::device::Device;
use crate::control::link_state::BackendChannel;
use crate::control::session::Session;
use crate::control::wire::{self, WireError};

#[derive(Debug, Error)]
pub enum SocketError {
    #[error("socket path {0} is in use by a running process (another vutap or VMM is listening there)")]
    InUse(PathBuf),
    #[error("cannot bind {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove stale socket {path}: {source}")]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Binds the server socket, replacing a stale socket file but never a live one.
pub fn bind_socket(path: &Path) -> Result<UnixListener, SocketError> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(SocketError::InUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(|source| SocketError::RemoveStale { path: path.to_path_buf(), source })?;
    }
    UnixListener::bind(path).map_err(|source| SocketError::Bind { path: path.to_path_buf(), source })
}

/// Why a connection ended.
#[derive(Debug)]
pub enum ConnectionEnd {
    /// The frontend closed the socket (VM shut down, rebooted, or restarted).
    Disconnected,
    /// The frontend broke the protocol; we closed the socket.
    ProtocolError(String),
    /// The frontend handed us an fd shorter than the memory (or log) it declared; we closed.
    MemoryRefused(String),
    /// Mapped guest memory (or the log) was lost under us (its fd shrank); the fault was
    /// contained and we closed.
    MemoryLost(String),
}

/// What woke the serving thread.
enum Wake {
    /// A message (or the close) is waiting on the socket.
    Socket,
    /// The SIGBUS guard replaced some of this device's memory.
    MemoryLost,
    /// A live upgrade asks this thread to park.
    Upgrade,
}

/// Waits for the next message (or connection), the device's fault eventfd, or its upgrade port.
fn wait_for_message(socket: RawFd, fault: RawFd, upgrade: RawFd) -> io::Result<Wake> {
    let mut fds = [
        libc::pollfd { fd: fault, events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: upgrade, events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: socket, events: libc::POLLIN, revents: 0 },
    ];
    loop {
        // SAFETY: `fds` is a valid array of two pollfds for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        return Ok(if fds[0].revents & libc::POLLIN != 0 {
            Wake::MemoryLost
        } else if fds[1].revents & libc::POLLIN != 0 {
            Wake::Upgrade
        } else {
            Wake::Socket
        });
    }
}

/// Consumes SEND_RARP (the guest's MAC) and announces the guest.
fn handle_send_rarp(stream: &UnixStream, session: &Mutex<Session>) -> Result<(), WireError> {
    let msg = wire::recv_message(stream)?;
    let mac = wire::rarp_mac(&msg)?;
    let result = session.lock().unwrap_or_else(|p| p.into_inner()).send_rarp(mac);
    match &result {
        Ok(()) => info!("announced {} with a RARP (SEND_RARP after migration)", crate::tap::format_mac(&mac)),
        Err(e) => warn!("SEND_RARP for {}: {e}", crate::tap::format_mac(&mac)),
    }
    wire::ack_if_asked(stream, &msg.header, result.is_err())
}

/// Why an early SET_VRING_ENABLE was refused (acked with a failure, the connection goes on).
#[derive(Debug, Error)]
enum EarlyEnableError {
    #[error("enable value {0} is not 0 or 1")]
    BadValue(u32),
    #[error(transparent)]
    Session(crate::control::session::SessionError),
}

/// Consumes an early SET_VRING_ENABLE, records it, and acks it if asked.
fn handle_early_enable(stream: &UnixStream, session: &Mutex<Session>) -> Result<(), WireError> {
    let msg = wire::recv_message(stream)?;
    let state: VhostUserVringState = msg.body_as()?;
    let (index, num) = (state.index, state.num);
    let result = match num {
        0 | 1 => session.lock().unwrap_or_else(|p| p.into_inner()).set_enable(index, num == 1).map_err(EarlyEnableError::Session),
        _ => Err(EarlyEnableError::BadValue(num)),
    };
    match &result {
        Ok(()) => debug!("early SET_VRING_ENABLE index={index} enable={num} recorded until SET_FEATURES"),
        Err(e) => warn!("early SET_VRING_ENABLE index={index}: {e}"),
    }
    wire::ack_if_asked(stream, &msg.header, result.is_err())
}

/// Takes SET_BACKEND_REQ_FD here (vhost's parser would hand us a `Backend` that cannot send
/// CONFIG_CHANGE_MSG): the channel goes to the device's link state for this connection.
fn handle_backend_req_fd(stream: &UnixStream, session: &Mutex<Session>, dev: &Device) -> Result<(), WireError> {
    let msg = wire::recv_message(stream)?;
    // The first fd is the channel; any others are closed with `msg`.
    let fd = msg.fds.into_iter().next();
    let acked = session.lock().unwrap_or_else(|p| p.into_inner()).acked_protocol();
    let ok = match fd {
        Some(fd) if acked & VhostUserProtocolFeatures::BACKEND_REQ.bits() != 0 => {
            let config_acked = acked & VhostUserProtocolFeatures::CONFIG.bits() != 0;
            dev.link.set_channel(Some(BackendChannel { stream: UnixStream::from(fd), config_acked }));
            info!("backend request channel set up (CONFIG {})", if config_acked { "negotiated" } else { "not negotiated" });
            true
        }
        Some(_) => {
            warn!("SET_BACKEND_REQ_FD without the BACKEND_REQ protocol feature; refused");
            false
        }
        None => {
            warn!("SET_BACKEND_REQ_FD without an fd; refused");
            false
        }
    };
    wire::ack_if_asked(stream, &msg.header, !ok)
}

/// Errors after which the message was fully consumed and the stream is still in step, so the
/// connection can go on (the frontend got a failure ack if it asked for one).
///
/// Not `InvalidMessage`: vhost also returns it right after reading the *header* (unknown request
/// code, reserved flag bits, unexpected fds), with the body still unread; going on would parse
/// that body as the next header.
fn is_recoverable(e: &VhostError) -> bool {
    matches!(
        e,
        VhostError::ReqHandlerError(_)
            | VhostError::InvalidParam
            | VhostError::InvalidOperation(_)
            | VhostError::InactiveFeature(_)
            | VhostError::InactiveOperation(_)
            | VhostError::IncorrectFds
            | VhostError::FeatureMismatch
    )
}

/// Requests that set up features, memory or rings: refused (connection closed) before SET_OWNER.
/// The discovery requests (GET_FEATURES, protocol features, GET_QUEUE_NUM, GET_CONFIG,
/// SET_BACKEND_REQ_FD, GET_MAX_MEM_SLOTS) come before it in QEMU's order and stay allowed.
fn needs_owner(req: FrontendReq) -> bool {
    use FrontendReq as R;
    matches!(
        req,
        R::SET_FEATURES
            | R::SET_MEM_TABLE
            | R::SET_LOG_BASE
            | R::SET_LOG_FD
            | R::SET_VRING_NUM
            | R::SET_VRING_ADDR
            | R::SET_VRING_BASE
            | R::GET_VRING_BASE
            | R::SET_VRING_KICK
            | R::SET_VRING_CALL
            | R::SET_VRING_ERR
            | R::SET_VRING_ENABLE
            | R::ADD_MEM_REG
            | R::REM_MEM_REG
    )
}

/// A connection taken over from the previous process by a live upgrade.
pub struct ResumedConnection {
    pub stream: UnixStream,
    pub session: Arc<Mutex<Session>>,
    /// The request parser, taught what was negotiated, its pairs already started.
    pub handler: BackendReqHandler<Mutex<Session>>,
    pub owned: bool,
}

/// Serves one frontend connection until it closes or breaks the protocol.
pub fn serve_connection(stream: UnixStream, dev: Arc<Device>) -> ConnectionEnd {
    let session = Session::new(dev.clone());
    // A fault of the previous connection's memory was handled with it.
    dev.faults.reset();
    match stream.try_clone() {
        Ok(control) => {
            let session = Arc::new(Mutex::new(session));
            let handler = BackendReqHandler::from_stream(stream, session.clone());
            serve_messages(control, handler, session, dev, false)
        }
        Err(e) => ConnectionEnd::ProtocolError(format!("cannot dup connection: {e}")),
    }
}

/// Serves a connection taken over by a live upgrade from where the previous process stopped,
/// with its pairs started.
pub fn serve_resumed(resumed: ResumedConnection, dev: Arc<Device>) -> ConnectionEnd {
    let ResumedConnection { stream, session, handler, owned } = resumed;
    serve_messages(stream, handler, session, dev, owned)
}

fn serve_messages(
    control: UnixStream,
    mut handler: BackendReqHandler<Mutex<Session>>,
    session: Arc<Mutex<Session>>,
    dev: Arc<Device>,
    mut owned: bool,
) -> ConnectionEnd {
    let fd = control.as_raw_fd();
    loop {
        match wait_for_message(fd, dev.faults.notifier().as_raw_fd(), dev.upgrade.wake_fd()) {
            Ok(Wake::Socket) => {}
            Ok(Wake::Upgrade) => {
                dev.upgrade.park_connection(&dev.label, &session, &control, owned);
                continue;
            }
            Ok(Wake::MemoryLost) => match dev.faults.lost_range() {
                Some(lost) => return ConnectionEnd::MemoryLost(lost.to_string()),
                // A wake-up left over from a fault of the previous connection: wait again.
                None => continue,
            },
            Err(e) => return ConnectionEnd::ProtocolError(format!("poll failed: {e}")),
        }
        let hdr = match wire::peek_header(&control) {
            Ok(hdr) => hdr,
            Err(WireError::Closed | WireError::ShortHeader(_)) => return ConnectionEnd::Disconnected,
            Err(e) => return ConnectionEnd::ProtocolError(format!("socket error: {e}")),
        };
        let code = hdr.code;
        // A header we cannot trust means we cannot find the next message: close.
        if let Err(e) = hdr.check_request() {
            return ConnectionEnd::ProtocolError(format!("malformed header (flags {:#x}, size {}): {e}", hdr.flags, hdr.size));
        }
        let req = hdr.frontend_request();
        // The spec makes SET_OWNER the start of a session: rings, memory and features before it
        // are a frontend bug (QEMU, Cloud Hypervisor and DPDK all send it first).
        if !owned && req.is_some_and(needs_owner) {
            return ConnectionEnd::ProtocolError(format!("request {code} before SET_OWNER"));
        }
        match req {
            Some(FrontendReq::SET_OWNER) => owned = true,
            Some(FrontendReq::RESET_OWNER) => owned = false,
            _ => {}
        }
        let early_enable =
            hdr.is(FrontendReq::SET_VRING_ENABLE) && hdr.size == 8 && !session.lock().unwrap_or_else(|p| p.into_inner()).features_acked();
        if early_enable {
            if let Err(e) = handle_early_enable(&control, &session) {
                return ConnectionEnd::ProtocolError(format!("early SET_VRING_ENABLE: {e}"));
            }
            continue;
        }
        if hdr.is(FrontendReq::SEND_RARP) && hdr.size == 8 {
            if let Err(e) = handle_send_rarp(&control, &session) {
                return ConnectionEnd::ProtocolError(format!("SEND_RARP: {e}"));
            }
            continue;
        }
        if hdr.is(FrontendReq::SET_BACKEND_REQ_FD) {
            if let Err(e) = handle_backend_req_fd(&control, &session, &dev) {
                return ConnectionEnd::ProtocolError(format!("SET_BACKEND_REQ_FD: {e}"));
            }
            continue;
        }
        let result = handler.handle_request();
        if let Some(why) = session.lock().unwrap_or_else(|p| p.into_inner()).take_refusal() {
            return ConnectionEnd::MemoryRefused(why);
        }
        match result {
            Ok(()) => {}
            Err(VhostError::Disconnected) | Err(VhostError::PartialMessage) => return ConnectionEnd::Disconnected,
            Err(e) if is_recoverable(&e) => warn!("request {code} failed: {e}"),
            Err(e) => return ConnectionEnd::ProtocolError(format!("request {code}: {e}")),
        }
    }
}

/// How vutap reaches its frontend.
#[derive(Debug, Clone)]
pub enum SocketMode {
    /// vutap listens; the VMM connects (and may reconnect).
    Server(PathBuf),
    /// vutap connects to a listening VMM, and reconnects when the VMM restarts.
    Client(PathBuf),
}

/// Serves frontends forever (or once, with `once`), one connection after another.
pub fn serve(mode: &SocketMode, dev: Arc<Device>, once: bool) -> Result<(), SocketError> {
    let listener = open_endpoint(mode)?;
    serve_on(listener, mode, dev, once);
    Ok(())
}

/// Binds the listening socket of a server-mode endpoint (None in client mode), so that it can be
/// set up before privileges are dropped.
pub fn open_endpoint(mode: &SocketMode) -> Result<Option<UnixListener>, SocketError> {
    match mode {
        SocketMode::Server(path) => Ok(Some(bind_socket(path)?)),
        SocketMode::Client(_) => Ok(None),
    }
}

/// [`serve`] on an endpoint opened by [`open_endpoint`].
pub fn serve_on(listener: Option<UnixListener>, mode: &SocketMode, dev: Arc<Device>, once: bool) {
    serve_from(listener, mode, dev, once, None)
}

/// [`serve_on`], first going on with a connection a live upgrade took over (if any).
pub fn serve_from(listener: Option<UnixListener>, mode: &SocketMode, dev: Arc<Device>, once: bool, resumed: Option<ResumedConnection>) {
    dev.policy.seccomp.enter(crate::operations::sandbox::ThreadKind::Control);
    if let Some(resumed) = resumed {
        info!("frontend connection taken over from the previous vutap");
        let end = serve_resumed(resumed, dev.clone());
        account_end(&dev, &end);
        if once {
            return;
        }
    }
    loop {
        let stream = match (&listener, mode) {
            (Some(l), SocketMode::Server(path)) => {
                info!("listening on {}", path.display());
                match wait_for_message(l.as_raw_fd(), dev.faults.notifier().as_raw_fd(), dev.upgrade.wake_fd()) {
                    Ok(Wake::Upgrade) => {
                        dev.upgrade.park_idle(&dev.label);
                        continue;
                    }
                    // A fault of a finished connection: nothing to do until the next one.
                    Ok(Wake::MemoryLost) => {
                        dev.faults.reset();
                        continue;
                    }
                    Ok(Wake::Socket) => {}
                    Err(e) => error!("poll on the listening socket failed: {e}"),
                }
                match l.accept() {
                    Ok((s, _)) => s,
                    Err(e) => {
                        error!("accept failed: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                }
            }
            (_, SocketMode::Client(path)) => connect_retrying(path, &dev),
            _ => unreachable!("a server always has a listener"),
        };
        serve_counted(stream, &dev);
        if once {
            return;
        }
    }
}

/// Serves one connection to its end and accounts for it: `connections` when it starts, then
/// `disconnects` or `protocol_errors` once the session is gone (its workers stopped and their
/// counters flushed), so a reader of those counters sees a finished connection.
pub fn serve_counted(stream: UnixStream, dev: &Arc<Device>) -> ConnectionEnd {
    info!("frontend connected");
    let m = &dev.device_metrics;
    m.connections.fetch_add(1, Ordering::Relaxed);
    let end = serve_connection(stream, dev.clone());
    account_end(dev, &end);
    end
}

/// Logs and counts how a connection ended.
fn account_end(dev: &Device, end: &ConnectionEnd) {
    let m = &dev.device_metrics;
    dev.link.set_channel(None);
    match end {
        ConnectionEnd::Disconnected => {
            info!("frontend disconnected; queue state dropped");
            m.disconnects.fetch_add(1, Ordering::Relaxed);
        }
        ConnectionEnd::ProtocolError(e) => {
            error!("closing connection: {e}");
            m.protocol_errors.fetch_add(1, Ordering::Relaxed);
        }
        // A memory table that cannot be mapped as declared breaks the protocol; the refused fd
        // itself is counted (bad_memory_fds) where it was checked.
        ConnectionEnd::MemoryRefused(e) => {
            error!("closing connection: {e}");
            m.protocol_errors.fetch_add(1, Ordering::Relaxed);
        }
        ConnectionEnd::MemoryLost(e) => {
            error!("closing connection: guest memory lost: {e}");
            m.guest_memory_lost.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Connects to the frontend, retrying every 200 ms; parks meanwhile if a live upgrade asks.
fn connect_retrying(path: &Path, dev: &Device) -> UnixStream {
    let mut logged = false;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return s,
            Err(e) => {
                if !logged {
                    info!("waiting for the frontend at {} ({e})", path.display());
                    logged = true;
                }
                if wait_for_upgrade(dev.upgrade.wake_fd(), Duration::from_millis(200)) {
                    dev.upgrade.park_idle(&dev.label);
                }
            }
        }
    }
}

/// Waits up to `timeout` for the upgrade port's eventfd; whether it fired.
fn wait_for_upgrade(fd: RawFd, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int) };
    n > 0 && pfd.revents & libc::POLLIN != 0
}
