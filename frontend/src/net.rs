//! [`NetFrontend`]: a virtio-net driver plus vhost-user frontend in one, the way a VMM and its
//! guest look to a backend. Queue `2i` is RX of pair `i`, `2i + 1` is its TX.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::{Frontend, VhostUserProtocolFeatures};
use vhost::VhostBackend;

use super::error::{FrontendError, Result};
use super::features::{self, DEFAULT_REQUESTED, NET_F_MRG_RXBUF, RING_F_EVENT_IDX, RING_F_INDIRECT_DESC};
use super::handshake::{self, HandshakeOrder, NegotiateParams, Negotiated};
use super::hdr::VirtioNetHdr;
use super::memory::GuestMemory;
use super::virtqueue::{DriverQueue, QueueLayout, Segment};

/// Queue index of pair `pair`'s RX queue.
pub fn rx_queue(pair: u16) -> u16 {
    2 * pair
}
/// Queue index of pair `pair`'s TX queue.
pub fn tx_queue(pair: u16) -> u16 {
    2 * pair + 1
}

/// How a TX frame (header + payload) is cut into descriptors.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TxSplit {
    /// One descriptor for header and payload (ANY_LAYOUT / VERSION_1 style).
    #[default]
    Single,
    /// Header in its own descriptor, payload in a second (legacy Linux style).
    HeaderApart,
    /// A descriptor every `n` bytes (n > 0), ignoring the header boundary.
    Every(u32),
}

/// Descriptor shape of TX chains.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TxShape {
    pub split: TxSplit,
    /// Put the chain in an indirect table (needs INDIRECT_DESC).
    pub indirect: bool,
}

/// Knobs of a [`NetFrontend`]. `Default` gives one pair of 256-entry queues with the
/// [`DEFAULT_REQUESTED`] features and the Cloud Hypervisor order.
#[derive(Clone, Debug)]
pub struct FrontendOptions {
    pub queue_pairs: u16,
    pub queue_size: u16,
    /// Minimum guest memory size; 0 = just what the queues need.
    pub mem_size: usize,
    /// Virtio features to ask for; SET_FEATURES sends offered ∩ requested.
    pub requested_features: u64,
    /// Protocol features to ask for; SET_PROTOCOL_FEATURES sends offered ∩ requested.
    pub requested_protocol: VhostUserProtocolFeatures,
    pub order: HandshakeOrder,
    /// Bytes per RX buffer, header included (1526 suffices with MRG_RXBUF and MTU 1500; use
    /// 65562 without MRG_RXBUF when GUEST_TSO is on).
    pub rx_buf_len: u32,
    /// Descriptors per RX buffer chain (the buffer is cut into this many equal pieces).
    pub rx_segments: u16,
    /// Fill every RX queue after the handshake.
    pub rx_prefill: bool,
    /// Re-post each RX buffer as soon as its frame has been read.
    pub rx_refill: bool,
    /// Largest TX frame, header included.
    pub tx_buf_len: u32,
    pub tx_shape: TxShape,
    /// Entries per indirect table.
    pub indirect_max: u16,
    /// How long `connect` retries while the socket does not exist / refuses.
    pub connect_timeout: Duration,
}

impl Default for FrontendOptions {
    fn default() -> Self {
        Self {
            queue_pairs: 1,
            queue_size: 256,
            mem_size: 0,
            requested_features: DEFAULT_REQUESTED,
            requested_protocol: VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::MTU,
            order: HandshakeOrder::CloudHypervisor,
            rx_buf_len: 2048,
            rx_segments: 1,
            rx_prefill: true,
            rx_refill: true,
            tx_buf_len: 65562 + 12,
            tx_shape: TxShape::default(),
            indirect_max: 32,
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// The virtio-net config space fields the frontend reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetConfig {
    pub mac: [u8; 6],
    pub status: u16,
    pub max_virtqueue_pairs: u16,
    pub mtu: u16,
}

impl NetConfig {
    /// Bytes of config space covered (mac, status, max_virtqueue_pairs, mtu).
    pub const LEN: u32 = 12;

    fn parse(b: &[u8]) -> Option<Self> {
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        (b.len() >= Self::LEN as usize).then(|| Self {
            mac: [b[0], b[1], b[2], b[3], b[4], b[5]],
            status: u16_at(6),
            max_virtqueue_pairs: u16_at(8),
            mtu: u16_at(10),
        })
    }
}

/// A received frame (allocating form; see [`NetFrontend::recv_batch`] for the copy-once form).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RxFrame {
    pub hdr: VirtioNetHdr,
    pub payload: Vec<u8>,
    /// Used entries the frame took (1 without MRG_RXBUF).
    pub num_buffers: u16,
}

/// Counters for the benchmark.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub tx_kicks: u64,
    pub tx_completed: u64,
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub rx_buffers_used: u64,
    pub rx_kicks: u64,
}

/// A connected, fully set-up vhost-user-net device seen from the VMM/guest side.
pub struct NetFrontend {
    vu: Frontend,
    mem: Arc<GuestMemory>,
    queues: Vec<DriverQueue>,
    negotiated: Negotiated,
    opts: FrontendOptions,
    hdr_len: usize,
    /// Scratch reused by the hot paths so they do not allocate.
    segs: Vec<Segment>,
    rx_scratch: Vec<u8>,
    stats: Stats,
}

impl NetFrontend {
    /// Connects to a backend listening on `socket` (retrying until `opts.connect_timeout`)
    /// and runs the handshake.
    pub fn connect(socket: &Path, opts: FrontendOptions) -> Result<Self> {
        let deadline = Instant::now() + opts.connect_timeout;
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    log::debug!("connect {socket:?}: {e}, retrying");
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(source) => return Err(FrontendError::Connect { path: socket.into(), source }),
            }
        };
        Self::from_stream(stream, opts)
    }

    /// Waits for a backend (`vutap --client`) to connect to `listener`, then runs the handshake.
    pub fn accept(listener: &UnixListener, opts: FrontendOptions) -> Result<Self> {
        let (stream, _) = listener.accept().map_err(FrontendError::Accept)?;
        Self::from_stream(stream, opts)
    }

    /// Runs the handshake on an already connected socket.
    pub fn from_stream(stream: UnixStream, opts: FrontendOptions) -> Result<Self> {
        let nqueues = 2 * opts.queue_pairs;
        let mut vu = Frontend::from_stream(stream, u64::from(nqueues));
        let params = NegotiateParams {
            requested_features: opts.requested_features,
            requested_protocol: opts.requested_protocol,
            queue_pairs: opts.queue_pairs,
            order: opts.order,
        };
        let negotiated = handshake::negotiate(&mut vu, &params)?;
        let acked = negotiated.features;

        let mut layouts = Vec::with_capacity(usize::from(nqueues));
        let mut end = 0u64;
        for q in 0..nqueues {
            let slot = if q % 2 == 0 { opts.rx_buf_len } else { opts.tx_buf_len };
            let l = QueueLayout::new(end, opts.queue_size, opts.indirect_max, slot);
            end = l.end;
            layouts.push(l);
        }
        let mem = Arc::new(GuestMemory::new(opts.mem_size.max(end as usize))?);
        let event_idx = acked & RING_F_EVENT_IDX != 0;
        let queues = layouts
            .into_iter()
            .zip(0..nqueues)
            .map(|(l, queue)| {
                DriverQueue::new(queue, mem.clone(), l, event_idx).map_err(|source| FrontendError::QueueSetup { queue, source })
            })
            .collect::<Result<Vec<_>>>()?;
        handshake::setup_rings(&mut vu, &negotiated, opts.order, &mem, &queues)?;

        let mut fe = Self {
            vu,
            mem,
            queues,
            negotiated,
            hdr_len: features::hdr_len(acked),
            segs: Vec::with_capacity(64),
            rx_scratch: Vec::with_capacity(65536 + 64),
            stats: Stats::default(),
            opts,
        };
        for q in &mut fe.queues {
            q.disable_calls(); // we poll; wait_call/recv_frame turn calls on while sleeping
        }
        if fe.opts.rx_prefill {
            for pair in 0..fe.opts.queue_pairs {
                fe.post_rx_buffers(pair, usize::MAX)?;
            }
        }
        Ok(fe)
    }

    /// Features sent in SET_FEATURES.
    pub fn acked_features(&self) -> u64 {
        self.negotiated.features
    }
    /// Features the backend offered in GET_FEATURES.
    pub fn offered_features(&self) -> u64 {
        self.negotiated.offered
    }
    /// Protocol features sent in SET_PROTOCOL_FEATURES.
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.negotiated.protocol
    }
    /// GET_QUEUE_NUM's answer (when MQ was negotiated).
    pub fn backend_queue_num(&self) -> Option<u64> {
        self.negotiated.backend_queues
    }
    /// Length of the virtio_net_hdr: 12 with VERSION_1 or MRG_RXBUF, else 10.
    pub fn hdr_len(&self) -> usize {
        self.hdr_len
    }
    /// Configured queue pairs.
    pub fn queue_pairs(&self) -> u16 {
        self.opts.queue_pairs
    }
    /// Options in force.
    pub fn options(&self) -> &FrontendOptions {
        &self.opts
    }
    /// Counters so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }
    /// Guest memory (for checks or raw writes in hostile-input tests).
    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }
    /// The vhost-user connection, for messages this type does not wrap. Do not use it
    /// concurrently with this type's methods.
    pub fn vhost(&mut self) -> &mut Frontend {
        &mut self.vu
    }
    /// Queue `index` (2i = RX, 2i+1 = TX of pair i).
    pub fn queue(&self, index: u16) -> Option<&DriverQueue> {
        self.queues.get(usize::from(index))
    }
    /// Queue `index`, mutable: raw descriptor writes for hostile-input tests.
    pub fn queue_mut(&mut self, index: u16) -> Option<&mut DriverQueue> {
        self.queues.get_mut(usize::from(index))
    }

    fn check_pair(&self, pair: u16) -> Result<()> {
        if pair < self.opts.queue_pairs {
            Ok(())
        } else {
            Err(FrontendError::NoSuchPair { pair, pairs: self.opts.queue_pairs })
        }
    }

    /// GET_CONFIG, parsed. `None` when the CONFIG protocol feature was not negotiated.
    pub fn config(&mut self) -> Result<Option<NetConfig>> {
        let bytes = handshake::get_config(&mut self.vu, &self.negotiated, NetConfig::LEN)?;
        Ok(bytes.as_deref().and_then(NetConfig::parse))
    }

    /// GET_VRING_BASE: stops ring `queue` in the backend and returns its next avail index.
    pub fn get_vring_base(&mut self, queue: u16) -> Result<u32> {
        self.vu.get_vring_base(usize::from(queue)).map_err(|source| FrontendError::GetVringBase { queue, source })
    }

    /// Starts dirty logging as QEMU does when a migration begins: a memfd log with one bit per
    /// 4 KiB page of guest memory (whole pages), SET_LOG_BASE, then SET_FEATURES with
    /// VHOST_F_LOG_ALL. Needs the LOG_SHMFD protocol feature. Returns the log, for reading.
    pub fn start_dirty_log(&mut self) -> Result<std::fs::File> {
        use std::os::fd::{AsRawFd, FromRawFd};
        const LOG_ALL: u64 = 1 << 26;
        let len = (self.mem.size() as u64).div_ceil(4096).div_ceil(8).div_ceil(4096) * 4096;
        // SAFETY: memfd_create with a static NUL-terminated name; the result is checked and
        // then owned by the File.
        let fd = unsafe { libc::memfd_create(c"vutap-dirty-log".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(FrontendError::DirtyLogFile(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let log = unsafe { std::fs::File::from_raw_fd(fd) };
        log.set_len(len).map_err(FrontendError::DirtyLogFile)?;
        let region = vhost::VhostUserDirtyLogRegion { mmap_size: len, mmap_offset: 0, mmap_handle: log.as_raw_fd() };
        self.vu.set_log_base(0, Some(region)).map_err(FrontendError::SetLogBase)?;
        let acked = self.acked_features() | LOG_ALL;
        self.vu.set_features(acked).map_err(FrontendError::SetFeatures)?;
        Ok(log)
    }

    /// Closes the connection (same as dropping). Reconnecting means a new `NetFrontend`.
    pub fn disconnect(self) {}

    /// Waits up to `timeout` for a call on `queue` (or used entries already pending). Calls
    /// are requested for the wait and suppressed again afterwards.
    pub fn wait_call(&mut self, queue: u16, timeout: Duration) -> bool {
        let Some(q) = self.queues.get_mut(usize::from(queue)) else {
            return false;
        };
        let fired = q.enable_calls() || q.wait_call(timeout);
        q.disable_calls();
        fired
    }

    // ---------------------------------------------------------------- TX

    /// Sends one frame (`hdr` + `payload`) with the default shape and kicks if the device
    /// wants it.
    pub fn send_frame(&mut self, pair: u16, hdr: &VirtioNetHdr, payload: &[u8]) -> Result<()> {
        let shape = self.opts.tx_shape;
        self.send_frame_shaped(pair, hdr, payload, shape)
    }

    /// As [`send_frame`](Self::send_frame) with an explicit descriptor shape.
    pub fn send_frame_shaped(&mut self, pair: u16, hdr: &VirtioNetHdr, payload: &[u8], shape: TxShape) -> Result<()> {
        let mut h = [0u8; 12];
        hdr.write_to(&mut h[..self.hdr_len]);
        self.check_pair(pair)?;
        let q = usize::from(tx_queue(pair));
        self.enqueue_tx(q, &h[..self.hdr_len], payload, shape)?;
        self.flush_tx(q)
    }

    /// Sends `bytes` as-is (the caller supplies the header bytes, valid or not) with `shape`;
    /// `HeaderApart` cuts after `hdr_len` bytes.
    pub fn send_raw(&mut self, pair: u16, bytes: &[u8], shape: TxShape) -> Result<()> {
        self.check_pair(pair)?;
        let q = usize::from(tx_queue(pair));
        let cut = self.hdr_len.min(bytes.len());
        self.enqueue_tx(q, &bytes[..cut], &bytes[cut..], shape)?;
        self.flush_tx(q)
    }

    /// Queues as many of `frames` (each with `hdr`) as fit, reclaiming completed TX first, and
    /// kicks at most once. Returns how many were queued.
    pub fn send_batch<F: AsRef<[u8]>>(&mut self, pair: u16, hdr: &VirtioNetHdr, frames: &[F]) -> Result<usize> {
        self.check_pair(pair)?;
        let mut h = [0u8; 12];
        hdr.write_to(&mut h[..self.hdr_len]);
        let q = usize::from(tx_queue(pair));
        let shape = self.opts.tx_shape;
        let mut sent = 0;
        for f in frames {
            match self.enqueue_tx(q, &h[..self.hdr_len], f.as_ref(), shape) {
                Ok(()) => sent += 1,
                Err(FrontendError::Queue(super::virtqueue::QueueError::Full { .. })) => break,
                Err(e) => {
                    self.flush_tx(q)?;
                    return Err(e);
                }
            }
        }
        self.flush_tx(q)?;
        Ok(sent)
    }

    /// Collects completed TX chains of `pair`; returns how many.
    pub fn reclaim_tx(&mut self, pair: u16) -> Result<usize> {
        self.check_pair(pair)?;
        self.reclaim_queue(usize::from(tx_queue(pair)))
    }

    fn reclaim_queue(&mut self, q: usize) -> Result<usize> {
        let queue = &mut self.queues[q];
        let mut n = 0;
        while let Some(e) = queue.pop_used() {
            if !e.known {
                return Err(FrontendError::BadUsed { queue: queue.index(), id: e.id, len: e.len });
            }
            n += 1;
        }
        self.stats.tx_completed += n as u64;
        Ok(n)
    }

    /// Descriptors a TX chain of `len` bytes needs in the main table with `shape`.
    fn tx_segments(&mut self, hdr_len: usize, len: usize, shape: TxShape) {
        self.segs.clear();
        let len = len as u32;
        match shape.split {
            TxSplit::Single => self.segs.push(Segment { off: 0, len }),
            TxSplit::HeaderApart => {
                let h = (hdr_len as u32).min(len);
                self.segs.push(Segment { off: 0, len: h });
                if len > h {
                    self.segs.push(Segment { off: h, len: len - h });
                }
            }
            TxSplit::Every(n) => {
                let n = n.max(1);
                let mut off = 0;
                while off < len {
                    let l = n.min(len - off);
                    self.segs.push(Segment { off, len: l });
                    off += l;
                }
            }
        }
    }

    fn enqueue_tx(&mut self, q: usize, hdr: &[u8], payload: &[u8], shape: TxShape) -> Result<()> {
        let total = hdr.len() + payload.len();
        let max = self.queues[q].slot_len() as usize;
        if total > max {
            return Err(FrontendError::FrameTooLarge { len: total, max });
        }
        if shape.indirect && self.negotiated.features & RING_F_INDIRECT_DESC == 0 {
            return Err(FrontendError::IndirectNotNegotiated);
        }
        self.tx_segments(hdr.len(), total, shape);
        if shape.indirect && self.segs.len() > usize::from(self.opts.indirect_max) {
            return Err(FrontendError::TooManySegments { needed: self.segs.len(), max: usize::from(self.opts.indirect_max) });
        }
        let needed = if shape.indirect { 1 } else { self.segs.len() };
        if usize::from(self.queues[q].num_free()) < needed {
            self.reclaim_queue(q)?;
        }
        let queue = &mut self.queues[q];
        let head = queue.next_head().ok_or(super::virtqueue::QueueError::Full { queue: queue.index(), needed: needed as u16, free: 0 })?;
        let slot = queue.slot_gpa(head);
        self.mem.write(slot, hdr);
        self.mem.write(slot + hdr.len() as u64, payload);
        if shape.indirect {
            queue.add_indirect(&self.segs, false)?;
        } else {
            queue.add_chain(&self.segs, false)?;
        }
        self.stats.tx_frames += 1;
        self.stats.tx_bytes += payload.len() as u64;
        Ok(())
    }

    fn flush_tx(&mut self, q: usize) -> Result<()> {
        let queue = &mut self.queues[q];
        if queue.publish() {
            let index = queue.index();
            queue.kick().map_err(|source| FrontendError::Kick { queue: index, source })?;
            self.stats.tx_kicks += 1;
        }
        Ok(())
    }

    // ---------------------------------------------------------------- RX

    /// Posts up to `n` RX buffers (`rx_buf_len` bytes in `rx_segments` descriptors) on
    /// `pair`, kicking once. Returns how many were posted.
    pub fn post_rx_buffers(&mut self, pair: u16, n: usize) -> Result<usize> {
        self.check_pair(pair)?;
        let q = usize::from(rx_queue(pair));
        let posted = self.add_rx_buffers(q, n)?;
        self.flush_rx(q)?;
        Ok(posted)
    }

    fn add_rx_buffers(&mut self, q: usize, n: usize) -> Result<usize> {
        let pieces = u32::from(self.opts.rx_segments.max(1));
        let len = self.opts.rx_buf_len;
        self.segs.clear();
        let step = len.div_ceil(pieces);
        let mut off = 0;
        while off < len {
            let l = step.min(len - off);
            self.segs.push(Segment { off, len: l });
            off += l;
        }
        let queue = &mut self.queues[q];
        let mut posted = 0;
        while posted < n && usize::from(queue.num_free()) >= self.segs.len() {
            queue.add_chain(&self.segs, true)?;
            posted += 1;
        }
        Ok(posted)
    }

    fn flush_rx(&mut self, q: usize) -> Result<()> {
        let queue = &mut self.queues[q];
        if queue.publish() {
            let index = queue.index();
            queue.kick().map_err(|source| FrontendError::Kick { queue: index, source })?;
            self.stats.rx_kicks += 1;
        }
        Ok(())
    }

    /// Reads up to `max` frames already returned on `pair`'s RX queue without blocking,
    /// calling `f(hdr, payload)` for each (payload excludes the header; with MRG_RXBUF it is
    /// the concatenation of the frame's buffers). Buffers are re-posted if `rx_refill`.
    pub fn recv_batch(&mut self, pair: u16, max: usize, mut f: impl FnMut(&VirtioNetHdr, &[u8])) -> Result<usize> {
        self.check_pair(pair)?;
        let q = usize::from(rx_queue(pair));
        let mut scratch = std::mem::take(&mut self.rx_scratch);
        let mut got = 0;
        let mut result = Ok(());
        while got < max {
            match self.take_rx_frame(q, &mut scratch) {
                Ok(Some(hdr)) => {
                    f(&hdr, &scratch);
                    got += 1;
                }
                Ok(None) => break,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        self.rx_scratch = scratch;
        let flushed = self.flush_rx(q);
        result.and(flushed).map(|()| got)
    }

    /// Waits up to `timeout` for one frame on `pair` (sleeping on the call eventfd, polling
    /// every few ms as a fallback in case the backend never calls).
    pub fn recv_frame(&mut self, pair: u16, timeout: Duration) -> Result<Option<RxFrame>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(fr) = self.try_recv_frame(pair)? {
                return Ok(Some(fr));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            self.wait_call(rx_queue(pair), (deadline - now).min(Duration::from_millis(5)));
        }
    }

    /// Waits up to `timeout` for one frame on any queue pair and returns it with its pair. A
    /// macvtap or multi-queue tap picks the queue of a flow by a hash seeded at boot, so a test
    /// that does not steer its flows cannot know which pair a frame lands on.
    pub fn recv_frame_any(&mut self, timeout: Duration) -> Result<Option<(u16, RxFrame)>> {
        let deadline = Instant::now() + timeout;
        loop {
            for pair in 0..self.queue_pairs() {
                if let Some(fr) = self.try_recv_frame(pair)? {
                    return Ok(Some((pair, fr)));
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            // Calls are per queue: sleep briefly on the first one, then look at all again.
            self.wait_call(rx_queue(0), (deadline - now).min(Duration::from_millis(2)));
        }
    }

    /// One frame already returned on `pair`'s RX queue, without waiting.
    fn try_recv_frame(&mut self, pair: u16) -> Result<Option<RxFrame>> {
        let mut frame = None;
        self.recv_batch(pair, 1, |hdr, payload| {
            frame = Some(RxFrame { hdr: *hdr, payload: payload.to_vec(), num_buffers: 1 });
        })?;
        Ok(frame.map(|mut fr| {
            fr.num_buffers = if self.mrg_rxbuf() { fr.hdr.num_buffers } else { 1 };
            fr
        }))
    }

    fn mrg_rxbuf(&self) -> bool {
        self.negotiated.features & NET_F_MRG_RXBUF != 0
    }

    /// Takes one frame's used entries, copying the payload into `out`. `None` if nothing is
    /// pending. Waits briefly for the remaining buffers of a merged frame.
    fn take_rx_frame(&mut self, q: usize, out: &mut Vec<u8>) -> Result<Option<VirtioNetHdr>> {
        let hdr_len = self.hdr_len;
        let buf_len = self.opts.rx_buf_len;
        let mrg = self.mrg_rxbuf();
        let Some(first) = self.queues[q].pop_used() else {
            return Ok(None);
        };
        let index = self.queues[q].index();
        let bad = |e: super::virtqueue::UsedElem| FrontendError::BadUsed { queue: index, id: e.id, len: e.len };
        if !first.known || first.len > buf_len || (first.len as usize) < hdr_len {
            return Err(bad(first));
        }
        let slot = self.queues[q].slot_gpa(first.id as u16);
        let mut hbytes = [0u8; 12];
        self.mem.read(slot, &mut hbytes[..hdr_len]);
        let hdr = VirtioNetHdr::read_from(&hbytes, hdr_len).unwrap_or_default();
        out.clear();
        self.mem.read_append(slot + hdr_len as u64, first.len as usize - hdr_len, out);
        let num_buffers = if mrg { hdr.num_buffers.max(1) } else { 1 };
        let mut used = 1u16;
        let deadline = Instant::now() + Duration::from_secs(1);
        while used < num_buffers {
            let Some(e) = self.queues[q].pop_used() else {
                if Instant::now() > deadline {
                    return Err(FrontendError::MissingMergedBuffers { queue: index, num_buffers, got: used });
                }
                std::hint::spin_loop();
                continue;
            };
            if !e.known || e.len > buf_len {
                return Err(bad(e));
            }
            let slot = self.queues[q].slot_gpa(e.id as u16);
            self.mem.read_append(slot, e.len as usize, out);
            used += 1;
        }
        self.stats.rx_frames += 1;
        self.stats.rx_bytes += out.len() as u64;
        self.stats.rx_buffers_used += u64::from(used);
        if self.opts.rx_refill {
            self.add_rx_buffers(q, usize::from(used))?;
        }
        Ok(Some(hdr))
    }
}
