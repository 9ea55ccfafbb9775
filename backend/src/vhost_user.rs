//! The vhost-user front door: listen on (or connect to) the socket, and serve each frontend
//! connection with a fresh [`Session`], one after another, for the life of the process.
//!
//! Messages are parsed by vhost's `BackendReqHandler`, with one exception handled here first:
//! QEMU's virtio-net sends SET_VRING_ENABLE *before* SET_FEATURES (and QEMU 10 waits for its
//! ack). vhost rejects it without a reply, which would hang QEMU 10 and leave the first queue
//! pair disabled. So each header is peeked; an early enable is consumed, recorded and acked here.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use log::{debug, error, info, warn};
use thiserror::Error;
use vhost::vhost_user::message::{FrontendReq, VhostUserProtocolFeatures};
use vhost::vhost_user::{BackendReqHandler, Error as VhostError};

use crate::device::Device;
use crate::link_state::BackendChannel;
use crate::session::Session;

const HDR_SIZE: usize = 12;
const VERSION_MASK: u32 = 0x3;
const REPLY_FLAG: u32 = 0x4;
const NEED_REPLY_FLAG: u32 = 0x8;
/// vhost-user's limit on a message body.
const MAX_MSG_SIZE: u32 = 0x1000;

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

/// Peeks the next message header; None at end of stream.
fn peek(fd: RawFd, buf: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        // SAFETY: `buf` is valid for writes of its length for the duration of the call.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), libc::MSG_PEEK | libc::MSG_WAITALL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        return Ok(if n == 0 { None } else { Some(n as usize) });
    }
}

fn recv_exact(fd: RawFd, buf: &mut [u8]) -> io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: the remaining part of `buf` is valid for writes.
        let n = unsafe { libc::recv(fd, buf[got..].as_mut_ptr() as *mut libc::c_void, buf.len() - got, 0) };
        match n {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n if n < 0 => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            n => got += n as usize,
        }
    }
    Ok(())
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

/// Sends the REPLY_ACK answer to request `code` if the frontend asked for one (NEED_REPLY).
fn ack_if_asked(stream: &UnixStream, code: FrontendReq, flags: u32, failed: bool) -> io::Result<()> {
    if flags & NEED_REPLY_FLAG == 0 {
        return Ok(());
    }
    let mut reply = [0u8; HDR_SIZE + 8];
    reply[0..4].copy_from_slice(&(code as u32).to_le_bytes());
    reply[4..8].copy_from_slice(&(0x1 | REPLY_FLAG).to_le_bytes());
    reply[8..12].copy_from_slice(&8u32.to_le_bytes());
    reply[12..20].copy_from_slice(&u64::from(failed).to_le_bytes());
    let mut w: &UnixStream = stream;
    io::Write::write_all(&mut w, &reply)
}

/// Consumes SEND_RARP (u64 body: the guest's MAC in its first 6 bytes) and announces the guest.
fn handle_send_rarp(stream: &UnixStream, session: &Mutex<Session>, flags: u32) -> io::Result<()> {
    let mut msg = [0u8; HDR_SIZE + 8];
    recv_exact(stream.as_raw_fd(), &mut msg)?;
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&msg[12..18]);
    let result = session.lock().unwrap_or_else(|p| p.into_inner()).send_rarp(mac);
    match &result {
        Ok(()) => info!("announced {} with a RARP (SEND_RARP after migration)", crate::tap::format_mac(&mac)),
        Err(e) => warn!("SEND_RARP for {}: {e}", crate::tap::format_mac(&mac)),
    }
    ack_if_asked(stream, FrontendReq::SEND_RARP, flags, result.is_err())
}

/// Consumes an early SET_VRING_ENABLE, records it, and acks it if asked.
fn handle_early_enable(stream: &UnixStream, session: &Mutex<Session>, flags: u32) -> io::Result<()> {
    let mut msg = [0u8; HDR_SIZE + 8];
    recv_exact(stream.as_raw_fd(), &mut msg)?;
    let (index, num) = (u32_at(&msg, 12), u32_at(&msg, 16));
    let result = match num {
        0 | 1 => session.lock().unwrap_or_else(|p| p.into_inner()).set_enable(index, num == 1).map_err(|e| e.to_string()),
        _ => Err(format!("enable value {num} is not 0 or 1")),
    };
    match &result {
        Ok(()) => debug!("early SET_VRING_ENABLE index={index} enable={num} recorded until SET_FEATURES"),
        Err(e) => warn!("early SET_VRING_ENABLE index={index}: {e}"),
    }
    ack_if_asked(stream, FrontendReq::SET_VRING_ENABLE, flags, result.is_err())
}

/// Receives exactly `buf.len()` bytes (one message header) and the fd sent with them.
fn recv_with_fd(fd: RawFd, buf: &mut [u8]) -> io::Result<Option<OwnedFd>> {
    // Room for a few fds; only the first is kept, the others are closed.
    let mut cmsg = [0u64; 8];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr() as *mut libc::c_void, iov_len: buf.len() };
    // SAFETY: an all-zero msghdr is a valid "empty" value; the pointers are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = std::mem::size_of_val(&cmsg) as _;
    let n = loop {
        // SAFETY: `msg` points at `iov` (over `buf`) and `cmsg`, all alive and writable for the call.
        let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_WAITALL | libc::MSG_CMSG_CLOEXEC) };
        if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        break n;
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if (n as usize) < buf.len() {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let mut first = None;
    // SAFETY: `msg` was filled by recvmsg; the CMSG_* macros walk its control buffer within
    // msg_controllen, and SCM_RIGHTS data is an array of ints the kernel just installed for us.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c) as *const RawFd;
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    let owned = OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i)));
                    if first.is_none() {
                        first = Some(owned);
                    }
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok(first)
}

/// Takes SET_BACKEND_REQ_FD here (vhost's parser would hand us a `Backend` that cannot send
/// CONFIG_CHANGE_MSG): the channel goes to the device's link state for this connection.
fn handle_backend_req_fd(stream: &UnixStream, session: &Mutex<Session>, dev: &Device, flags: u32, size: u32) -> io::Result<()> {
    let mut hdr = [0u8; HDR_SIZE];
    let fd = recv_with_fd(stream.as_raw_fd(), &mut hdr)?;
    if size > 0 {
        let mut body = vec![0u8; size as usize];
        recv_exact(stream.as_raw_fd(), &mut body)?;
    }
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
    ack_if_asked(stream, FrontendReq::SET_BACKEND_REQ_FD, flags, !ok)
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
fn needs_owner(code: u32) -> bool {
    use FrontendReq as R;
    [
        R::SET_FEATURES,
        R::SET_MEM_TABLE,
        R::SET_LOG_BASE,
        R::SET_LOG_FD,
        R::SET_VRING_NUM,
        R::SET_VRING_ADDR,
        R::SET_VRING_BASE,
        R::GET_VRING_BASE,
        R::SET_VRING_KICK,
        R::SET_VRING_CALL,
        R::SET_VRING_ERR,
        R::SET_VRING_ENABLE,
        R::ADD_MEM_REG,
        R::REM_MEM_REG,
    ]
    .iter()
    .any(|r| *r as u32 == code)
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
    let mut hdr = [0u8; HDR_SIZE];
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
        match peek(fd, &mut hdr) {
            Ok(None) => return ConnectionEnd::Disconnected,
            Ok(Some(n)) if n < HDR_SIZE => return ConnectionEnd::Disconnected,
            Ok(Some(_)) => {}
            Err(e) => return ConnectionEnd::ProtocolError(format!("socket error: {e}")),
        }
        let (code, flags, size) = (u32_at(&hdr, 0), u32_at(&hdr, 4), u32_at(&hdr, 8));
        // A header we cannot trust means we cannot find the next message: close.
        if flags & VERSION_MASK != 0x1 || flags & REPLY_FLAG != 0 || size > MAX_MSG_SIZE {
            return ConnectionEnd::ProtocolError(format!("malformed header: request {code}, flags {flags:#x}, size {size}"));
        }
        // The spec makes SET_OWNER the start of a session: rings, memory and features before it
        // are a frontend bug (QEMU, Cloud Hypervisor and DPDK all send it first).
        if !owned && needs_owner(code) {
            return ConnectionEnd::ProtocolError(format!("request {code} before SET_OWNER"));
        }
        if code == FrontendReq::SET_OWNER as u32 {
            owned = true;
        } else if code == FrontendReq::RESET_OWNER as u32 {
            owned = false;
        }
        let early_enable = code == FrontendReq::SET_VRING_ENABLE as u32
            && size == 8
            && !session.lock().unwrap_or_else(|p| p.into_inner()).features_acked();
        if early_enable {
            if let Err(e) = handle_early_enable(&control, &session, flags) {
                return ConnectionEnd::ProtocolError(format!("early SET_VRING_ENABLE: {e}"));
            }
            continue;
        }
        if code == FrontendReq::SEND_RARP as u32 && size == 8 {
            if let Err(e) = handle_send_rarp(&control, &session, flags) {
                return ConnectionEnd::ProtocolError(format!("SEND_RARP: {e}"));
            }
            continue;
        }
        if code == FrontendReq::SET_BACKEND_REQ_FD as u32 {
            if let Err(e) = handle_backend_req_fd(&control, &session, &dev, flags, size) {
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
    dev.policy.seccomp.enter(crate::sandbox::ThreadKind::Control);
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
