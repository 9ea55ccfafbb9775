//! The vhost-user control-plane conversation a VMM has with a net backend, in two phases so the
//! queues can be built (they need the acked EVENT_IDX bit) between them:
//! [`negotiate`] (features, protocol features, owner, and QEMU's early enable) then
//! [`setup_rings`] (memory table, rings, and Cloud Hypervisor's enables).

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag};
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VringConfigData};

use super::error::{FrontendError, Result};
use super::features::VHOST_USER_F_PROTOCOL_FEATURES;
use super::memory::GuestMemory;
use super::virtqueue::DriverQueue;

/// Which VMM's message order to imitate. Backends have broken on the difference.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HandshakeOrder {
    /// SET_FEATURES, SET_MEM_TABLE and all rings, then SET_VRING_ENABLE(1) for every ring;
    /// NEED_REPLY on every message once REPLY_ACK is negotiated.
    #[default]
    CloudHypervisor,
    /// SET_VRING_ENABLE(1) for pair 0 *before* SET_FEATURES (written raw, NEED_REPLY when
    /// REPLY_ACK is negotiated, ack awaited) and never re-sent; NEED_REPLY only on set-type
    /// messages. Pairs > 0 are enabled after the rings, as the guest's MQ command would.
    Qemu,
}

const REQ_GET_QUEUE_NUM: u32 = 17;
const REQ_SET_VRING_ENABLE: u32 = 18;
const FLAG_VERSION_1: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
const RAW_REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// What the negotiation phase settled.
#[derive(Clone, Copy, Debug)]
pub struct Negotiated {
    /// Virtio features sent in SET_FEATURES (offered ∩ requested).
    pub features: u64,
    /// Virtio features the backend offered.
    pub offered: u64,
    /// Protocol features sent in SET_PROTOCOL_FEATURES (empty if not negotiable).
    pub protocol: VhostUserProtocolFeatures,
    /// GET_QUEUE_NUM's answer, when MQ was negotiated.
    pub backend_queues: Option<u64>,
}

impl Negotiated {
    /// Whether REPLY_ACK is in force.
    pub fn reply_ack(&self) -> bool {
        self.protocol.contains(VhostUserProtocolFeatures::REPLY_ACK)
    }
}

/// Inputs of the negotiation.
#[derive(Clone, Copy, Debug)]
pub struct NegotiateParams {
    pub requested_features: u64,
    pub requested_protocol: VhostUserProtocolFeatures,
    pub queue_pairs: u16,
    pub order: HandshakeOrder,
}

/// Runs a closure with NEED_REPLY set in the frontend's header flags when REPLY_ACK is in
/// force, so set-type messages are acked (the crate then waits for the ack).
fn with_ack<T>(vu: &mut Frontend, reply_ack: bool, f: impl FnOnce(&mut Frontend) -> T) -> T {
    if reply_ack {
        vu.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    }
    let r = f(vu);
    if reply_ack {
        vu.set_hdr_flags(VhostUserHeaderFlag::empty());
    }
    r
}

/// Phase 1: GET_FEATURES, protocol features, GET_QUEUE_NUM, SET_OWNER, (Qemu: early enable of
/// pair 0), SET_FEATURES.
pub fn negotiate(vu: &mut Frontend, p: &NegotiateParams) -> Result<Negotiated> {
    if p.order == HandshakeOrder::CloudHypervisor {
        vu.set_owner().map_err(FrontendError::SetOwner)?;
    }
    let offered = vu.get_features().map_err(FrontendError::GetFeatures)?;
    let features = offered & p.requested_features;
    let mut protocol = VhostUserProtocolFeatures::empty();
    if features & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
        let backend = vu.get_protocol_features().map_err(FrontendError::GetProtocolFeatures)?;
        protocol = backend & p.requested_protocol;
        vu.set_protocol_features(protocol).map_err(FrontendError::SetProtocolFeatures)?;
    }
    let mut n = Negotiated { features, offered, protocol, backend_queues: None };
    if protocol.contains(VhostUserProtocolFeatures::MQ) {
        // Raw, because the crate would shrink its own queue-index limit to the answer, and
        // backends disagree on whether it counts queues or queue pairs.
        let q = raw_request(vu, REQ_GET_QUEUE_NUM, FLAG_VERSION_1, &[]).map_err(FrontendError::GetQueueNum)?;
        if q < u64::from(p.queue_pairs) {
            return Err(FrontendError::TooFewQueues { available: q, pairs: p.queue_pairs });
        }
        n.backend_queues = Some(q);
    } else if p.queue_pairs > 1 {
        return Err(FrontendError::NoMultiQueue { pairs: p.queue_pairs });
    }
    match p.order {
        HandshakeOrder::CloudHypervisor => {
            if n.reply_ack() {
                // Cloud Hypervisor asks for acks on everything from here on, GETs included.
                vu.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        HandshakeOrder::Qemu => {
            vu.set_owner().map_err(FrontendError::SetOwner)?;
            if features & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
                for queue in [0u16, 1] {
                    early_enable(vu, queue, n.reply_ack())?;
                }
            }
        }
    }
    let ack = n.reply_ack() && p.order == HandshakeOrder::Qemu;
    with_ack(vu, ack, |vu| vu.set_features(features)).map_err(FrontendError::SetFeatures)?;
    Ok(n)
}

/// Phase 2: SET_MEM_TABLE, per ring NUM/ADDR/BASE/CALL/KICK, then the enables the order asks
/// for.
pub fn setup_rings(vu: &mut Frontend, n: &Negotiated, order: HandshakeOrder, mem: &GuestMemory, queues: &[DriverQueue]) -> Result<()> {
    let ack = n.reply_ack() && order == HandshakeOrder::Qemu;
    with_ack(vu, ack, |vu| vu.set_mem_table(&[mem.region_info()])).map_err(FrontendError::SetMemTable)?;
    for q in queues {
        let queue = q.index();
        let i = usize::from(queue);
        let l = q.layout();
        let uaddr = |gpa| mem.user_addr(gpa).unwrap_or(0);
        let cfg = VringConfigData {
            queue_max_size: l.size,
            queue_size: l.size,
            flags: 0,
            desc_table_addr: uaddr(l.desc),
            used_ring_addr: uaddr(l.used),
            avail_ring_addr: uaddr(l.avail),
            log_addr: None,
        };
        with_ack(vu, ack, |vu| vu.set_vring_num(i, l.size)).map_err(|source| FrontendError::SetVringNum { queue, source })?;
        with_ack(vu, ack, |vu| vu.set_vring_addr(i, &cfg)).map_err(|source| FrontendError::SetVringAddr { queue, source })?;
        with_ack(vu, ack, |vu| vu.set_vring_base(i, 0)).map_err(|source| FrontendError::SetVringBase { queue, source })?;
        with_ack(vu, ack, |vu| vu.set_vring_kick(i, q.kick_fd())).map_err(|source| FrontendError::SetVringKick { queue, source })?;
        with_ack(vu, ack, |vu| vu.set_vring_call(i, q.call_fd())).map_err(|source| FrontendError::SetVringCall { queue, source })?;
    }
    if n.features & VHOST_USER_F_PROTOCOL_FEATURES == 0 {
        return Ok(()); // rings start enabled without protocol features
    }
    // Qemu already enabled pair 0 before SET_FEATURES and does not repeat it.
    let skip = if order == HandshakeOrder::Qemu { 2 } else { 0 };
    for q in queues.iter().skip(skip) {
        let queue = q.index();
        with_ack(vu, ack, |vu| vu.set_vring_enable(usize::from(queue), true))
            .map_err(|source| FrontendError::SetVringEnable { queue, source })?;
    }
    Ok(())
}

/// GET_CONFIG of the first `len` bytes of the device config space; `None` without CONFIG.
pub fn get_config(vu: &mut Frontend, n: &Negotiated, len: u32) -> Result<Option<Vec<u8>>> {
    if !n.protocol.contains(VhostUserProtocolFeatures::CONFIG) {
        return Ok(None);
    }
    let buf = vec![0u8; len as usize];
    let (_, payload) = vu.get_config(0, len, VhostUserConfigFlags::empty(), &buf).map_err(FrontendError::GetConfig)?;
    Ok(Some(payload))
}

/// QEMU's SET_VRING_ENABLE(queue, 1) before SET_FEATURES. The crate refuses it at this point
/// (it checks the acked virtio features), so it is written on a dup of the socket while the
/// crate is idle (we hold `&mut Frontend`).
fn early_enable(vu: &mut Frontend, queue: u16, reply_ack: bool) -> Result<()> {
    let flags = FLAG_VERSION_1 | if reply_ack { FLAG_NEED_REPLY } else { 0 };
    let mut body = [0u8; 8];
    body[0..4].copy_from_slice(&u32::from(queue).to_le_bytes());
    body[4..8].copy_from_slice(&1u32.to_le_bytes());
    let status = raw_request_opt(vu, REQ_SET_VRING_ENABLE, flags, &body, reply_ack)
        .map_err(|source| FrontendError::EarlyEnable { queue, source })?;
    match status {
        Some(s) if s != 0 => Err(FrontendError::EarlyEnableNack { queue, status: s }),
        _ => Ok(()),
    }
}

/// Sends one request and reads its u64 reply.
fn raw_request(vu: &Frontend, request: u32, flags: u32, body: &[u8]) -> io::Result<u64> {
    raw_request_opt(vu, request, flags, body, true)?.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no reply"))
}

/// Sends one request on a dup of the connection; if `want_reply`, reads a 20-byte reply
/// (header + u64) and returns the u64.
fn raw_request_opt(vu: &Frontend, request: u32, flags: u32, body: &[u8], want_reply: bool) -> io::Result<Option<u64>> {
    // SAFETY: dup of a valid open fd; the new fd is owned by the OwnedFd below.
    let fd = unsafe { libc::dup(vu.as_raw_fd()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let mut sock = UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let mut msg = Vec::with_capacity(12 + body.len());
    msg.extend_from_slice(&request.to_le_bytes());
    msg.extend_from_slice(&flags.to_le_bytes());
    msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
    msg.extend_from_slice(body);
    sock.write_all(&msg)?;
    if !want_reply {
        return Ok(None);
    }
    // The timeout is a property of the shared socket, so it is cleared again below.
    sock.set_read_timeout(Some(RAW_REPLY_TIMEOUT))?;
    let mut reply = [0u8; 20];
    let r = sock.read_exact(&mut reply);
    sock.set_read_timeout(None)?;
    r?;
    let word = |i: usize| u32::from_le_bytes([reply[i], reply[i + 1], reply[i + 2], reply[i + 3]]);
    if word(0) != request || word(4) & FLAG_REPLY == 0 || word(8) != 8 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad reply header: request {} flags {:#x} size {}", word(0), word(4), word(8)),
        ));
    }
    let mut v = [0u8; 8];
    v.copy_from_slice(&reply[12..20]);
    Ok(Some(u64::from_le_bytes(v)))
}
