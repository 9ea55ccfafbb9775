//! The vhost-user wire: headers, message framing, REPLY_ACK acks and fd passing, for the
//! messages vutap frames itself.
//!
//! vhost's `BackendReqHandler` parses most requests, but its header and socket types are private
//! to the crate, and vutap must handle a few messages before (or instead of) it: an early
//! SET_VRING_ENABLE, SEND_RARP, SET_BACKEND_REQ_FD (see [`crate::control::vhost_user`]), the
//! CONFIG_CHANGE_MSG it sends on the backend channel ([`crate::control::link_state`]), and the negotiation
//! a live upgrade replays into a fresh parser ([`crate::operations::upgrade`]). Tests and fuzz
//! targets that speak raw vhost-user to the daemon use this module too, so there is one copy of
//! the format. Request codes and flag bits are vhost's public [`FrontendReq`], [`BackendReq`]
//! and [`VhostUserHeaderFlag`]; bodies with a layout of their own are vhost's message structs
//! (`VhostUserU64`, `VhostUserVringState`) read through [`ByteValued`].
//!
//! A message is a 12-byte header (request code, flags, body size, in the machine's byte order as
//! the spec says) and `size` bytes of body; fds travel as SCM_RIGHTS with the header's bytes.
//! Sending uses vmm-sys-util's [`ScmSocket`]. Receiving is a `recvmsg` of our own because the
//! fds must arrive close-on-exec (`MSG_CMSG_CLOEXEC`, which `ScmSocket` cannot ask for): a live
//! upgrade starts a new process, which must not inherit a frontend's channel by accident.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use thiserror::Error;
use vhost::vhost_user::message::{BackendReq, FrontendReq, VhostUserHeaderFlag, VhostUserU64, MAX_ATTACHED_FD_ENTRIES, MAX_MSG_SIZE};
use vm_memory::ByteValued;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Bytes in a message header.
pub const HEADER_SIZE: usize = 12;
/// The largest body vhost-user allows (vhost's limit; the spec's u32 is never needed).
pub const MAX_BODY_SIZE: u32 = MAX_MSG_SIZE as u32;
/// The only protocol version there is, in the flags' version bits.
pub const VERSION_1: u32 = 0x1;
/// Most fds one message may carry (vhost's limit); the kernel closes any beyond.
pub const MAX_FDS: usize = MAX_ATTACHED_FD_ENTRIES;

#[derive(Debug, Error)]
pub enum WireError {
    #[error("the peer closed the connection")]
    Closed,
    #[error("header cut short: {0} of {HEADER_SIZE} bytes")]
    ShortHeader(usize),
    #[error("message cut short: {got} of {want} body bytes")]
    ShortBody { got: usize, want: usize },
    #[error("request {code}: protocol version {version}, not 1")]
    BadVersion { code: u32, version: u32 },
    #[error("request {code} carries the REPLY flag")]
    UnexpectedReply { code: u32 },
    #[error("request {code}: body of {size} bytes exceeds the limit of {MAX_BODY_SIZE}")]
    Oversize { code: u32, size: u32 },
    #[error("request {code}: body of {got} bytes where {want} are expected")]
    BodySize { code: u32, got: usize, want: usize },
    #[error("expected a reply to request {want}, got request {got} with flags {flags:#x}")]
    NotReplyTo { want: u32, got: u32, flags: u32 },
    #[error("socket: {0}")]
    Io(#[from] io::Error),
}

/// A message header as it is on the wire, checked only where asked ([`Header::check_request`]):
/// the hostile tests and the fuzzer build wrong ones on purpose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// A [`FrontendReq`] (frontend to backend) or a [`BackendReq`] (on the backend channel).
    pub code: u32,
    /// Version bits and [`VhostUserHeaderFlag`]s.
    pub flags: u32,
    /// Bytes of body that follow.
    pub size: u32,
}

impl Header {
    /// A version-1 request without flags.
    pub fn request(code: impl Into<u32>, size: u32) -> Header {
        Header { code: code.into(), flags: VERSION_1, size }
    }

    /// Exactly these fields, valid or not.
    pub fn raw(code: u32, flags: u32, size: u32) -> Header {
        Header { code, flags, size }
    }

    /// The reply to `request`, with a body of `size` bytes.
    pub fn reply_to(request: &Header, size: u32) -> Header {
        Header { code: request.code, flags: VERSION_1 | VhostUserHeaderFlag::REPLY.bits(), size }
    }

    /// This header, asking for a REPLY_ACK.
    pub fn need_reply(self) -> Header {
        Header { flags: self.flags | VhostUserHeaderFlag::NEED_REPLY.bits(), ..self }
    }

    pub fn version(&self) -> u32 {
        self.flags & VhostUserHeaderFlag::VERSION.bits()
    }

    pub fn is_reply(&self) -> bool {
        self.flags & VhostUserHeaderFlag::REPLY.bits() != 0
    }

    pub fn needs_reply(&self) -> bool {
        self.flags & VhostUserHeaderFlag::NEED_REPLY.bits() != 0
    }

    /// Whether this is request `req`.
    pub fn is(&self, req: FrontendReq) -> bool {
        self.code == u32::from(req)
    }

    /// The request, if the code is one vhost knows.
    pub fn frontend_request(&self) -> Option<FrontendReq> {
        FrontendReq::try_from(self.code).ok()
    }

    /// What a backend must see to trust the header enough to find the next message: version 1,
    /// not a reply, and a body within the limit. The code is not checked (vhost refuses unknown
    /// ones after consuming the header).
    pub fn check_request(&self) -> Result<(), WireError> {
        if self.version() != VERSION_1 {
            return Err(WireError::BadVersion { code: self.code, version: self.version() });
        }
        if self.is_reply() {
            return Err(WireError::UnexpectedReply { code: self.code });
        }
        if self.size > MAX_BODY_SIZE {
            return Err(WireError::Oversize { code: self.code, size: self.size });
        }
        Ok(())
    }

    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..4].copy_from_slice(&self.code.to_ne_bytes());
        b[4..8].copy_from_slice(&self.flags.to_ne_bytes());
        b[8..12].copy_from_slice(&self.size.to_ne_bytes());
        b
    }

    /// The header at the start of `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<Header, WireError> {
        let b: &[u8; HEADER_SIZE] = bytes.get(..HEADER_SIZE).and_then(|b| b.try_into().ok()).ok_or(WireError::ShortHeader(bytes.len()))?;
        let word = |o: usize| u32::from_ne_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        Ok(Header { code: word(0), flags: word(4), size: word(8) })
    }
}

/// One message as received: header, body, and the fds that came with it (owned, close-on-exec).
#[derive(Debug)]
pub struct Message {
    pub header: Header,
    pub body: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

impl Message {
    /// The body as a vhost message struct, if it has exactly that struct's size.
    pub fn body_as<T: ByteValued + Default>(&self) -> Result<T, WireError> {
        decode_body(self.header.code, &self.body)
    }
}

/// `body` as a vhost message struct (`VhostUserU64`, `VhostUserVringState`, ...) of request
/// `code`, if it has exactly that struct's size.
pub fn decode_body<T: ByteValued + Default>(code: u32, body: &[u8]) -> Result<T, WireError> {
    let mut value = T::default();
    let dst = value.as_mut_slice();
    if dst.len() != body.len() {
        return Err(WireError::BodySize { code, got: body.len(), want: dst.len() });
    }
    // A copy, not a cast: the body need not be aligned for T.
    dst.copy_from_slice(body);
    Ok(value)
}

// ------------------------------------------------------------------------------- messages vutap frames

/// The status in an ack to request `code` (0 = success).
pub fn parse_ack(msg: &Message, code: u32) -> Result<u64, WireError> {
    let h = &msg.header;
    if !h.is_reply() || h.code != code {
        return Err(WireError::NotReplyTo { want: code, got: h.code, flags: h.flags });
    }
    Ok(msg.body_as::<VhostUserU64>()?.value)
}

/// VHOST_USER_BACKEND_CONFIG_CHANGE_MSG: a bare header, version 1, no reply requested (a
/// frontend that cannot handle it then only logs, and the backend never blocks on it).
pub fn config_change_msg() -> [u8; HEADER_SIZE] {
    Header::request(BackendReq::CONFIG_CHANGE_MSG, 0).encode()
}

/// SEND_RARP's body: a u64 whose first 6 bytes are the guest's MAC.
pub fn rarp_body(mac: [u8; 6]) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[..6].copy_from_slice(&mac);
    b
}

/// The MAC in a SEND_RARP body.
pub fn rarp_mac(msg: &Message) -> Result<[u8; 6], WireError> {
    let value = msg.body_as::<VhostUserU64>()?.value.to_ne_bytes();
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&value[..6]);
    Ok(mac)
}

// ------------------------------------------------------------------------------- socket I/O

/// A socket borrowed for one call, so callers can pass any fd-holding type.
struct Socket<'a>(BorrowedFd<'a>);

impl ScmSocket for Socket<'_> {
    fn socket_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// Sends one message: `header` and `body` in one `sendmsg`, `fds` with them. The header's size is
/// sent as given, so a test can announce more (or less) body than it sends.
pub fn send(sock: impl AsFd, header: &Header, body: &[u8], fds: &[RawFd]) -> Result<(), WireError> {
    let sock = Socket(sock.as_fd());
    let head = header.encode();
    let sent = send_part(&sock, &[&head[..], body], fds)?;
    // A stream socket may take part of it (a signal, a full non-blocking buffer): the fds went
    // with the first byte, the rest follows plain.
    if sent < HEADER_SIZE + body.len() {
        let rest: Vec<u8> = head.iter().chain(body).copied().skip(sent).collect();
        let mut at = 0;
        while at < rest.len() {
            at += send_part(&sock, &[&rest[at..]], &[])?;
        }
    }
    Ok(())
}

/// One `sendmsg` (MSG_NOSIGNAL: a closed peer is EPIPE, not SIGPIPE), retried on EINTR; the
/// bytes it took.
fn send_part(sock: &Socket, bufs: &[&[u8]], fds: &[RawFd]) -> Result<usize, WireError> {
    loop {
        match sock.send_with_fds(bufs, fds) {
            Ok(n) => return Ok(n),
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(WireError::Io(io::Error::from_raw_os_error(e.errno()))),
        }
    }
}

/// Sends the ack to `request` if it asked for one (NEED_REPLY); `failed` is the outcome.
pub fn ack_if_asked(sock: impl AsFd, request: &Header, failed: bool) -> Result<(), WireError> {
    if !request.needs_reply() {
        return Ok(());
    }
    // REPLY_ACK's status: 0 for success, anything else for failure.
    let status = VhostUserU64::new(u64::from(failed));
    send(sock, &Header::reply_to(request, 8), status.as_slice(), &[])
}

/// The next header, left on the socket (waits until all 12 bytes are there). `Closed` at end of
/// stream, `ShortHeader` if the peer closed in the middle of one.
pub fn peek_header(sock: impl AsFd) -> Result<Header, WireError> {
    let mut buf = [0u8; HEADER_SIZE];
    let n = loop {
        // SAFETY: `buf` is valid for writes of its length for the duration of the call.
        let n = unsafe { libc::recv(sock.as_fd().as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_PEEK | libc::MSG_WAITALL) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(WireError::Io(e));
        }
    };
    match n {
        0 => Err(WireError::Closed),
        n if n < HEADER_SIZE => Err(WireError::ShortHeader(n)),
        _ => Header::decode(&buf),
    }
}

/// Receives one message: the header with its fds, then the body. The header is not checked
/// beyond its size (up to [`MAX_BODY_SIZE`], so a hostile size cannot make us allocate).
pub fn recv_message(sock: impl AsFd) -> Result<Message, WireError> {
    let fd = sock.as_fd();
    let (header, fds) = recv_header(fd)?;
    if header.size > MAX_BODY_SIZE {
        return Err(WireError::Oversize { code: header.code, size: header.size });
    }
    let mut body = vec![0u8; header.size as usize];
    recv_exact(fd, &mut body)?;
    Ok(Message { header, body, fds })
}

/// Receives a reply to request `code` and returns its ack status.
pub fn recv_ack(sock: impl AsFd, code: impl Into<u32>) -> Result<u64, WireError> {
    parse_ack(&recv_message(sock)?, code.into())
}

/// Receives a header and the fds sent with it.
fn recv_header(fd: BorrowedFd) -> Result<(Header, Vec<OwnedFd>), WireError> {
    let mut buf = [0u8; HEADER_SIZE];
    // CMSG_SPACE(MAX_FDS fds), in u64s for the alignment a cmsghdr needs: the kernel drops
    // (and closes) fds beyond it.
    let mut control = [0u64; (std::mem::size_of::<libc::cmsghdr>() + MAX_FDS * std::mem::size_of::<RawFd>()).div_ceil(8)];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: an all-zero msghdr is a valid "empty" value; the pointers are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    let n = loop {
        // SAFETY: `msg` points at `iov` (over `buf`) and `control`, alive and writable for the call.
        let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, libc::MSG_WAITALL | libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(WireError::Io(e));
        }
    };
    // Owned first, so they are closed on every error path below.
    let fds = take_fds(&msg);
    match n {
        0 => Err(WireError::Closed),
        n if n < HEADER_SIZE => Err(WireError::ShortHeader(n)),
        _ => Ok((Header::decode(&buf)?, fds)),
    }
}

/// The fds of the SCM_RIGHTS messages `recvmsg` filled into `msg`'s control buffer.
fn take_fds(msg: &libc::msghdr) -> Vec<OwnedFd> {
    let mut fds = Vec::new();
    // SAFETY: `msg` was filled by recvmsg; the CMSG_* macros walk its control buffer within
    // msg_controllen, and SCM_RIGHTS data is an array of fds the kernel just installed for us,
    // which nothing else owns.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c) as *const RawFd;
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
    fds
}

/// Receives exactly `buf.len()` bytes.
fn recv_exact(fd: BorrowedFd, buf: &mut [u8]) -> Result<(), WireError> {
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: the remaining part of `buf` is valid for writes of its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf[got..].as_mut_ptr().cast(), buf.len() - got, 0) };
        match n {
            0 => return Err(WireError::ShortBody { got, want: buf.len() }),
            n if n < 0 => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(WireError::Io(e));
                }
            }
            n => got += n as usize,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};
    use std::os::unix::net::UnixStream;

    use vhost::vhost_user::message::VhostUserVringState;

    fn pair() -> (UnixStream, UnixStream) {
        UnixStream::pair().unwrap()
    }

    fn memfd_with(content: &[u8]) -> std::fs::File {
        // SAFETY: memfd_create with a static NUL-terminated name; the fd is checked, then owned.
        let fd = unsafe { libc::memfd_create(c"vutap-wire-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
        f.write_all(content).unwrap();
        f
    }

    fn is_cloexec(fd: &OwnedFd) -> bool {
        // SAFETY: F_GETFD on an fd we own.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
        flags >= 0 && flags & libc::FD_CLOEXEC != 0
    }

    #[test]
    fn test_header_encode_decode_round_trip() {
        let h = Header::request(FrontendReq::SET_VRING_ENABLE, 8).need_reply();
        assert_eq!(h, Header::raw(18, 0x9, 8));
        assert_eq!(Header::decode(&h.encode()).unwrap(), h);
        assert!(h.needs_reply() && !h.is_reply() && h.version() == 1 && h.is(FrontendReq::SET_VRING_ENABLE));
        assert_eq!(h.frontend_request(), Some(FrontendReq::SET_VRING_ENABLE));
        assert_eq!(Header::raw(9999, 1, 0).frontend_request(), None);
        let r = Header::reply_to(&h, 8);
        assert!(r.is_reply() && !r.needs_reply() && r.code == 18 && r.version() == 1);
    }

    #[test]
    fn test_header_checks_refuse_bad_version_reply_and_oversize() {
        assert!(Header::request(FrontendReq::GET_FEATURES, 0).check_request().is_ok());
        assert!(Header::request(FrontendReq::SET_MEM_TABLE, MAX_BODY_SIZE).check_request().is_ok());
        for version in [0, 2, 3] {
            assert!(matches!(
                Header::raw(1, version, 0).check_request(),
                Err(WireError::BadVersion { code: 1, version: v }) if v == version
            ));
        }
        assert!(matches!(Header::raw(5, 0x5, 0).check_request(), Err(WireError::UnexpectedReply { code: 5 })));
        assert!(matches!(
            Header::raw(5, 0x1, MAX_BODY_SIZE + 1).check_request(),
            Err(WireError::Oversize { code: 5, size }) if size == MAX_BODY_SIZE + 1
        ));
        assert!(matches!(Header::decode(&[1, 0, 0, 0, 1]), Err(WireError::ShortHeader(5))));
    }

    #[test]
    fn test_config_change_msg_layout() {
        let want = Header::raw(2, 1, 0);
        assert_eq!(Header::decode(&config_change_msg()).unwrap(), want);
        assert_eq!(config_change_msg(), want.encode());
        // The byte layout on the little-endian machines vutap runs on.
        #[cfg(target_endian = "little")]
        assert_eq!(config_change_msg(), [2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn test_message_with_body_round_trip() {
        let (a, b) = pair();
        let body = VhostUserVringState::new(3, 1);
        send(&a, &Header::request(FrontendReq::SET_VRING_ENABLE, 8), body.as_slice(), &[]).unwrap();
        assert_eq!(peek_header(&b).unwrap(), Header::raw(18, 1, 8), "peek leaves the message in place");
        let msg = recv_message(&b).unwrap();
        assert_eq!(msg.header, Header::raw(18, 1, 8));
        assert!(msg.fds.is_empty());
        let state: VhostUserVringState = msg.body_as().unwrap();
        assert_eq!(({ state.index }, { state.num }), (3, 1));
        assert!(matches!(decode_body::<VhostUserVringState>(18, &[0; 4]), Err(WireError::BodySize { code: 18, got: 4, want: 8 })));
    }

    #[test]
    fn test_fds_are_passed_and_received_close_on_exec() {
        let (a, b) = pair();
        let files: Vec<_> = [b"first".as_slice(), b"second"].iter().map(|c| memfd_with(c)).collect();
        let fds: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
        send(&a, &Header::request(FrontendReq::SET_MEM_TABLE, 4), &[7, 0, 0, 0], &fds).unwrap();
        let msg = recv_message(&b).unwrap();
        assert_eq!(msg.body, [7, 0, 0, 0]);
        assert_eq!(msg.fds.len(), 2);
        for (fd, want) in msg.fds.into_iter().zip(["first", "second"]) {
            assert!(is_cloexec(&fd), "received fds are close-on-exec");
            let mut f = std::fs::File::from(fd);
            f.rewind().unwrap();
            let mut got = String::new();
            f.read_to_string(&mut got).unwrap();
            assert_eq!(got, want, "the fd received is the file sent");
        }
    }

    #[test]
    fn test_fds_beyond_the_limit_are_dropped() {
        let (a, b) = pair();
        let file = memfd_with(b"x");
        let many = vec![file.as_raw_fd(); MAX_FDS + 8];
        send(&a, &Header::request(FrontendReq::SET_MEM_TABLE, 0), &[], &many).unwrap();
        let msg = recv_message(&b).unwrap();
        assert_eq!(msg.fds.len(), MAX_FDS);
    }

    #[test]
    fn test_ack_round_trip_and_only_when_asked() {
        let (a, b) = pair();
        let asked = Header::request(FrontendReq::SEND_RARP, 8).need_reply();
        ack_if_asked(&a, &Header::request(FrontendReq::SEND_RARP, 8), true).unwrap();
        ack_if_asked(&a, &asked, false).unwrap();
        ack_if_asked(&a, &asked, true).unwrap();
        assert_eq!(recv_ack(&b, FrontendReq::SEND_RARP).unwrap(), 0, "the unasked ack was not sent");
        assert_eq!(recv_ack(&b, FrontendReq::SEND_RARP).unwrap(), 1);
        ack_if_asked(&a, &asked, true).unwrap();
        let ack = recv_message(&b).unwrap();
        assert_eq!(ack.header, Header::raw(19, 0x5, 8), "version 1, REPLY, a u64 body");
        // Replies to another request, and requests, are not acks.
        ack_if_asked(&a, &asked, false).unwrap();
        assert!(matches!(recv_ack(&b, FrontendReq::SET_VRING_ENABLE), Err(WireError::NotReplyTo { want: 18, got: 19, .. })));
        send(&a, &Header::request(FrontendReq::SEND_RARP, 8), &[0; 8], &[]).unwrap();
        assert!(matches!(recv_ack(&b, FrontendReq::SEND_RARP), Err(WireError::NotReplyTo { .. })));
    }

    #[test]
    fn test_rarp_body_round_trip() {
        let (a, b) = pair();
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        send(&a, &Header::request(FrontendReq::SEND_RARP, 8), &rarp_body(mac), &[]).unwrap();
        assert_eq!(rarp_mac(&recv_message(&b).unwrap()).unwrap(), mac);
    }

    #[test]
    fn test_short_and_oversize_messages_are_refused() {
        // The peer closes before a header, in one, and in a body.
        let (a, b) = pair();
        drop(a);
        assert!(matches!(peek_header(&b), Err(WireError::Closed)));
        assert!(matches!(recv_message(&b), Err(WireError::Closed)));
        let (mut a, b) = pair();
        a.write_all(&Header::request(FrontendReq::GET_FEATURES, 0).encode()[..7]).unwrap();
        drop(a);
        assert!(matches!(peek_header(&b), Err(WireError::ShortHeader(7))));
        assert!(matches!(recv_message(&b), Err(WireError::ShortHeader(7))));
        let (a, b) = pair();
        send(&a, &Header::request(FrontendReq::SET_VRING_NUM, 8), &[1, 0, 0, 0], &[]).unwrap();
        drop(a);
        assert!(matches!(recv_message(&b), Err(WireError::ShortBody { got: 4, want: 8 })));
        // A size past the limit is refused before anything is allocated for it.
        let (a, b) = pair();
        send(&a, &Header::request(FrontendReq::SET_MEM_TABLE, u32::MAX), &[], &[]).unwrap();
        assert!(matches!(recv_message(&b), Err(WireError::Oversize { code: 5, size: u32::MAX })));
    }

    #[test]
    fn test_largest_message_through_a_small_buffer() {
        let (a, b) = pair();
        let small: libc::c_int = 1;
        // SAFETY: setsockopt on a valid socket with a pointer to a c_int of the given size.
        let rc = unsafe { libc::setsockopt(a.as_raw_fd(), libc::SOL_SOCKET, libc::SO_SNDBUF, (&small as *const libc::c_int).cast(), 4) };
        assert_eq!(rc, 0);
        let body: Vec<u8> = (0..MAX_BODY_SIZE).map(|i| i as u8).collect();
        let reader = std::thread::spawn(move || recv_message(&b).map(|m| m.body));
        send(&a, &Header::request(FrontendReq::SET_MEM_TABLE, MAX_BODY_SIZE), &body, &[]).unwrap();
        assert_eq!(reader.join().unwrap().unwrap(), body);
    }
}
