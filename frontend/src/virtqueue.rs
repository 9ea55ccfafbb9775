//! Driver side of one split virtqueue living in [`GuestMemory`]: descriptor table, avail ring
//! (with `used_event`), used ring (with `avail_event`), and a fixed buffer slot per descriptor.
//!
//! Buffers: descriptor `d` owns slot `d` (`slot_len` bytes). A chain's data lives in the slot
//! of its *head*; its other descriptors point at sub-ranges of that slot. So in-flight chains
//! never share bytes and no allocator is needed on the hot path.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use super::memory::GuestMemory;

/// Descriptor flag: the chain continues at `next`.
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
/// Descriptor flag: `addr`/`len` is a table of descriptors.
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;
/// avail.flags: driver does not want calls (used without EVENT_IDX).
const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;
/// used.flags: device does not want kicks (used without EVENT_IDX).
const VRING_USED_F_NO_NOTIFY: u16 = 1;

/// One descriptor as it sits in the table (little endian on the wire).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Descriptor {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

impl Descriptor {
    /// The 16 bytes of the descriptor as they sit in a table.
    pub fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..16].copy_from_slice(&self.next.to_le_bytes());
        b
    }
}

/// A piece of a chain: `len` bytes at offset `off` of the head's slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub off: u32,
    pub len: u32,
}

/// One entry taken from the used ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsedElem {
    pub id: u32,
    pub len: u32,
    /// `id` was the head of a chain in flight (false: a device bug, nothing was freed).
    pub known: bool,
}

/// Why a chain could not be added.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QueueError {
    #[error("queue {queue}: {needed} descriptors needed, {free} free")]
    Full { queue: u16, needed: u16, free: u16 },
    #[error("queue {queue}: a chain needs 1..={max} segments, got {got}")]
    BadSegmentCount { queue: u16, got: usize, max: usize },
    #[error("queue {queue}: segment {off}+{len} overflows the {slot_len}-byte slot")]
    SegmentOutsideSlot { queue: u16, off: u32, len: u32, slot_len: u32 },
}

/// Where a queue lives in guest memory; all fields are guest-physical addresses.
#[derive(Clone, Copy, Debug)]
pub struct QueueLayout {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// `size` indirect tables of `indirect_max` descriptors, table `h` for head `h`.
    pub indirect: u64,
    pub indirect_max: u16,
    /// `size` buffer slots of `slot_len` bytes, slot `d` for descriptor `d`.
    pub slots: u64,
    pub slot_len: u32,
    /// First byte after this queue's area.
    pub end: u64,
}

impl QueueLayout {
    /// Lays a queue out from `start` (page aligned): rings first, then tables, then slots.
    pub fn new(start: u64, size: u16, indirect_max: u16, slot_len: u32) -> Self {
        let n = u64::from(size);
        let align = |x: u64, a: u64| x.div_ceil(a) * a;
        let desc = start;
        let avail = desc + 16 * n;
        let used = align(avail + 6 + 2 * n, 4096); // page-aligned like legacy rings
        let indirect = align(used + 6 + 8 * n, 4096);
        let slots = align(indirect + n * 16 * u64::from(indirect_max), 4096);
        let slot_len = slot_len.div_ceil(64) * 64;
        let end = align(slots + n * u64::from(slot_len), 4096);
        Self { size, desc, avail, used, indirect, indirect_max, slots, slot_len, end }
    }
}

/// The driver's view of one split virtqueue.
pub struct DriverQueue {
    index: u16,
    mem: Arc<GuestMemory>,
    layout: QueueLayout,
    event_idx: bool,
    kick: EventFd,
    call: EventFd,
    /// Head of the free descriptor list, linked through `next_free`.
    free_head: u16,
    num_free: u16,
    next_free: Vec<u16>,
    /// Descriptors taken by the chain whose head is the index (0 = not in flight).
    chain_len: Vec<u16>,
    /// Our copy of avail.idx (entries added, maybe not yet published).
    avail_idx: u16,
    /// avail.idx as last published to the device.
    published_idx: u16,
    /// Next used ring entry to read.
    last_used: u16,
}

impl DriverQueue {
    /// Creates the driver state and zeroes the rings. `event_idx`: EVENT_IDX was negotiated.
    pub fn new(index: u16, mem: Arc<GuestMemory>, layout: QueueLayout, event_idx: bool) -> io::Result<Self> {
        let kick = EventFd::new(libc::EFD_NONBLOCK)?;
        let call = EventFd::new(libc::EFD_NONBLOCK)?;
        let n = layout.size;
        if mem.ptr(layout.desc, (layout.end - layout.desc) as usize).is_none() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "queue outside guest memory"));
        }
        let zeros = vec![0u8; (layout.indirect - layout.desc) as usize];
        mem.write(layout.desc, &zeros);
        Ok(Self {
            index,
            mem,
            layout,
            event_idx,
            kick,
            call,
            free_head: 0,
            num_free: n,
            next_free: (1..=n).collect(),
            chain_len: vec![0; usize::from(n)],
            avail_idx: 0,
            published_idx: 0,
            last_used: 0,
        })
    }

    /// vhost-user queue index.
    pub fn index(&self) -> u16 {
        self.index
    }
    /// Where the queue lives.
    pub fn layout(&self) -> &QueueLayout {
        &self.layout
    }
    /// Number of descriptors in the ring.
    pub fn size(&self) -> u16 {
        self.layout.size
    }
    /// Free descriptors.
    pub fn num_free(&self) -> u16 {
        self.num_free
    }
    /// Chains handed to the device and not yet returned (counted in descriptors).
    pub fn descriptors_in_flight(&self) -> u16 {
        self.layout.size - self.num_free
    }
    /// The eventfd the device reads for kicks (SET_VRING_KICK).
    pub fn kick_fd(&self) -> &EventFd {
        &self.kick
    }
    /// The eventfd the device writes for calls (SET_VRING_CALL).
    pub fn call_fd(&self) -> &EventFd {
        &self.call
    }
    /// The head the next `add_*` call will use (its slot is where the data goes).
    pub fn next_head(&self) -> Option<u16> {
        (self.num_free > 0).then_some(self.free_head)
    }
    /// Guest-physical address of descriptor `d`'s buffer slot.
    pub fn slot_gpa(&self, d: u16) -> u64 {
        self.layout.slots + u64::from(d) * u64::from(self.layout.slot_len)
    }
    /// Bytes per slot.
    pub fn slot_len(&self) -> u32 {
        self.layout.slot_len
    }
    /// Guest memory the queue lives in.
    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    fn u16_at(&self, gpa: u64) -> &AtomicU16 {
        ring_u16(&self.mem, gpa)
    }

    fn avail_ring_slot(&self, i: u16) -> &AtomicU16 {
        self.u16_at(self.layout.avail + 4 + 2 * u64::from(i % self.layout.size))
    }
    fn used_event(&self) -> &AtomicU16 {
        self.u16_at(self.layout.avail + 4 + 2 * u64::from(self.layout.size))
    }
    fn avail_event(&self) -> &AtomicU16 {
        self.u16_at(self.layout.used + 4 + 8 * u64::from(self.layout.size))
    }
    fn used_idx(&self) -> u16 {
        self.u16_at(self.layout.used + 2).load(Ordering::Acquire)
    }

    /// Writes descriptor `d` of the main table (no bookkeeping; `d` is taken modulo size).
    pub fn write_descriptor(&self, d: u16, desc: Descriptor) {
        let gpa = self.layout.desc + 16 * u64::from(d % self.layout.size);
        self.mem.write(gpa, &desc.to_bytes());
    }

    fn seg_desc(&self, head: u16, s: Segment, device_writes: bool) -> Result<Descriptor, QueueError> {
        if u64::from(s.off) + u64::from(s.len) > u64::from(self.layout.slot_len) {
            return Err(QueueError::SegmentOutsideSlot { queue: self.index, off: s.off, len: s.len, slot_len: self.layout.slot_len });
        }
        Ok(Descriptor {
            addr: self.slot_gpa(head) + u64::from(s.off),
            len: s.len,
            flags: if device_writes { VIRTQ_DESC_F_WRITE } else { 0 },
            next: 0,
        })
    }

    fn take_descriptors(&mut self, n: u16) -> Result<u16, QueueError> {
        if n > self.num_free {
            return Err(QueueError::Full { queue: self.index, needed: n, free: self.num_free });
        }
        let head = self.free_head;
        let mut last = head;
        for _ in 1..n {
            last = self.next_free[usize::from(last)];
        }
        self.free_head = self.next_free[usize::from(last)];
        self.num_free -= n;
        self.chain_len[usize::from(head)] = n;
        Ok(head)
    }

    fn push_avail(&mut self, head: u16) {
        self.avail_ring_slot(self.avail_idx).store(head, Ordering::Relaxed);
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Adds a chain of direct descriptors over the head's slot and queues it in the avail ring
    /// (unpublished until [`publish`](Self::publish)). Returns the head.
    pub fn add_chain(&mut self, segs: &[Segment], device_writes: bool) -> Result<u16, QueueError> {
        let size = usize::from(self.layout.size);
        if segs.is_empty() || segs.len() > size {
            return Err(QueueError::BadSegmentCount { queue: self.index, got: segs.len(), max: size });
        }
        let head = self.next_head().ok_or(QueueError::Full { queue: self.index, needed: segs.len() as u16, free: 0 })?;
        // Validate before taking descriptors so a bad segment leaks nothing.
        for s in segs {
            self.seg_desc(head, *s, device_writes)?;
        }
        self.take_descriptors(segs.len() as u16)?;
        let mut d = head;
        for (i, s) in segs.iter().enumerate() {
            let mut desc = self.seg_desc(head, *s, device_writes)?;
            let next = self.next_free[usize::from(d)];
            if i + 1 < segs.len() {
                desc.flags |= VIRTQ_DESC_F_NEXT;
                desc.next = next;
            }
            self.write_descriptor(d, desc);
            d = next;
        }
        self.push_avail(head);
        Ok(head)
    }

    /// Adds one descriptor pointing at an indirect table holding `segs` (over the head's slot)
    /// and queues it in the avail ring. Returns the head.
    pub fn add_indirect(&mut self, segs: &[Segment], device_writes: bool) -> Result<u16, QueueError> {
        let max = usize::from(self.layout.indirect_max);
        if segs.is_empty() || segs.len() > max {
            return Err(QueueError::BadSegmentCount { queue: self.index, got: segs.len(), max });
        }
        let head = self.next_head().ok_or(QueueError::Full { queue: self.index, needed: 1, free: 0 })?;
        let table = self.layout.indirect + u64::from(head) * 16 * self.layout.indirect_max as u64;
        for (i, s) in segs.iter().enumerate() {
            let mut desc = self.seg_desc(head, *s, device_writes)?;
            if i + 1 < segs.len() {
                desc.flags |= VIRTQ_DESC_F_NEXT;
                desc.next = (i + 1) as u16;
            }
            self.mem.write(table + 16 * i as u64, &desc.to_bytes());
        }
        self.take_descriptors(1)?;
        let len = (16 * segs.len()) as u32;
        self.write_descriptor(head, Descriptor { addr: table, len, flags: VIRTQ_DESC_F_INDIRECT, next: 0 });
        self.push_avail(head);
        Ok(head)
    }

    /// Makes queued avail entries visible to the device. Returns whether the device asked to be
    /// kicked for them (EVENT_IDX: avail_event crossed; else: NO_NOTIFY clear).
    pub fn publish(&mut self) -> bool {
        let old = self.published_idx;
        let new = self.avail_idx;
        // Release: descriptors and ring entries are visible before the index that covers them.
        self.u16_at(self.layout.avail + 2).store(new, Ordering::Release);
        self.published_idx = new;
        // The device's suppression state must be read *after* our index store is visible
        // (store->load ordering), or both sides may decide not to notify.
        fence(Ordering::SeqCst);
        if self.event_idx {
            let event = self.avail_event().load(Ordering::Relaxed);
            need_event(event, new, old)
        } else {
            let flags = self.u16_at(self.layout.used).load(Ordering::Relaxed);
            new != old && flags & VRING_USED_F_NO_NOTIFY == 0
        }
    }

    /// Notifies the device.
    pub fn kick(&self) -> io::Result<()> {
        self.kick.write(1)
    }

    /// Whether the device has returned entries we have not read yet.
    pub fn has_used(&self) -> bool {
        self.used_idx() != self.last_used
    }

    /// Takes the next used entry, returning its descriptors to the free list. An id that is
    /// not a head in flight is returned with `known: false` without touching the free list (a
    /// broken device must not corrupt our bookkeeping).
    pub fn pop_used(&mut self) -> Option<UsedElem> {
        if self.used_idx() == self.last_used {
            return None;
        }
        // The Acquire load of used.idx orders the element read after it.
        let slot = u64::from(self.last_used % self.layout.size);
        let mut b = [0u8; 8];
        self.mem.read(self.layout.used + 4 + 8 * slot, &mut b);
        self.last_used = self.last_used.wrapping_add(1);
        let mut elem =
            UsedElem { id: u32::from_le_bytes([b[0], b[1], b[2], b[3]]), len: u32::from_le_bytes([b[4], b[5], b[6], b[7]]), known: false };
        if let Some(head) = self.in_flight_head(elem.id) {
            elem.known = true;
            let n = std::mem::take(&mut self.chain_len[usize::from(head)]);
            let mut last = head;
            for _ in 1..n {
                last = self.next_free[usize::from(last)];
            }
            self.next_free[usize::from(last)] = self.free_head;
            self.free_head = head;
            self.num_free += n;
        }
        Some(elem)
    }

    fn in_flight_head(&self, id: u32) -> Option<u16> {
        let head = u16::try_from(id).ok().filter(|h| *h < self.layout.size)?;
        (self.chain_len[usize::from(head)] != 0).then_some(head)
    }

    /// Asks the device for a call on the next used entry. Returns true if entries are already
    /// there (the caller must not sleep then).
    pub fn enable_calls(&mut self) -> bool {
        if self.event_idx {
            self.used_event().store(self.last_used, Ordering::Relaxed);
        } else {
            self.u16_at(self.layout.avail).store(0, Ordering::Relaxed);
        }
        // Our request must be visible before we re-check used.idx, or a used entry added in
        // between could go unsignalled.
        fence(Ordering::SeqCst);
        self.has_used()
    }

    /// Asks the device for a call once `pending` more entries are used (at least one), the way
    /// a Linux guest's TX path waits with `virtqueue_enable_cb_delayed`. Without EVENT_IDX this
    /// is a call on the next entry. Returns true if that many are already there.
    pub fn enable_calls_after(&mut self, pending: u16) -> bool {
        if !self.event_idx {
            return self.enable_calls();
        }
        let pending = pending.max(1);
        self.used_event().store(self.last_used.wrapping_add(pending - 1), Ordering::Relaxed);
        fence(Ordering::SeqCst);
        self.used_idx().wrapping_sub(self.last_used) >= pending
    }

    /// Asks the device not to call (best effort: with EVENT_IDX it is advisory anyway).
    pub fn disable_calls(&mut self) {
        if !self.event_idx {
            self.u16_at(self.layout.avail).store(VRING_AVAIL_F_NO_INTERRUPT, Ordering::Relaxed);
        }
    }

    /// Waits up to `timeout` for the call eventfd; true if it fired (and clears it).
    pub fn wait_call(&self, timeout: Duration) -> bool {
        let mut pfd = libc::pollfd { fd: self.call.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: pfd is a valid pollfd array of length 1 for the duration of the call.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        r > 0 && self.call.read().is_ok()
    }

    // ---- Raw access for hostile-input tests: no bookkeeping, caller owns the consequences.

    /// Writes arbitrary descriptors (`(index, descriptor)`), appends `heads` to the avail ring
    /// and publishes them. Returns whether the device asked for a kick. These descriptors are
    /// not tracked: use a queue you no longer add normal chains to.
    pub fn add_raw_descriptors(&mut self, descs: &[(u16, Descriptor)], heads: &[u16]) -> bool {
        for (i, d) in descs {
            self.write_descriptor(*i, *d);
        }
        for h in heads {
            self.push_avail(*h);
        }
        self.publish()
    }

    /// Publishes an arbitrary avail.idx (e.g. far ahead of the entries really written).
    pub fn set_avail_idx_raw(&mut self, idx: u16) {
        self.avail_idx = idx;
        self.publish();
    }

    /// A handle that posts heads on this queue from another thread, as a guest vCPU racing the
    /// rest of the driver would. Do not add chains through `self` while it is in use.
    pub fn raw_poster(&self) -> io::Result<RawPoster> {
        Ok(RawPoster { mem: self.mem.clone(), layout: self.layout, kick: self.kick.try_clone()?, avail_idx: self.avail_idx })
    }

    /// Writes an arbitrary indirect-table entry `slot` of table `table` (0..size).
    pub fn write_indirect_raw(&self, table: u16, slot: u16, desc: Descriptor) -> u64 {
        let gpa = self.layout.indirect
            + u64::from(table % self.layout.size) * 16 * u64::from(self.layout.indirect_max)
            + 16 * u64::from(slot % self.layout.indirect_max.max(1));
        self.mem.write(gpa, &desc.to_bytes());
        gpa
    }
}

/// A 16-bit ring field at `gpa`, for atomic access shared with the device.
fn ring_u16(mem: &GuestMemory, gpa: u64) -> &AtomicU16 {
    let p = mem.ptr(gpa, 2).expect("ring inside guest memory (checked in DriverQueue::new)");
    // SAFETY: p is 2-byte aligned (rings are 4-aligned, fields at even offsets) and inside the
    // mapping, which outlives the borrow of `mem`; the device accesses it concurrently, hence
    // atomic access.
    unsafe { &*(p as *const AtomicU16) }
}

/// Posts heads on one queue from a thread of its own, with no bookkeeping (hostile-input tests:
/// a guest that re-posts heads it has not got back). Made by [`DriverQueue::raw_poster`].
pub struct RawPoster {
    mem: Arc<GuestMemory>,
    layout: QueueLayout,
    kick: EventFd,
    avail_idx: u16,
}

impl RawPoster {
    /// Appends `heads` to the avail ring and publishes the new index.
    pub fn post(&mut self, heads: &[u16]) {
        for h in heads {
            let slot = self.layout.avail + 4 + 2 * u64::from(self.avail_idx % self.layout.size);
            ring_u16(&self.mem, slot).store(*h, Ordering::Relaxed);
            self.avail_idx = self.avail_idx.wrapping_add(1);
        }
        // Release: the entries are visible before the index that covers them.
        ring_u16(&self.mem, self.layout.avail + 2).store(self.avail_idx, Ordering::Release);
    }

    /// The avail index published so far.
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// The used index the device last published.
    pub fn used_idx(&self) -> u16 {
        ring_u16(&self.mem, self.layout.used + 2).load(Ordering::Acquire)
    }

    /// Notifies the device.
    pub fn kick(&self) -> io::Result<()> {
        self.kick.write(1)
    }
}

/// virtio `vring_need_event`: did the index move from `old` to `new` cross `event`?
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(event_idx: bool) -> DriverQueue {
        let layout = QueueLayout::new(0, 8, 4, 100);
        let mem = Arc::new(GuestMemory::new(layout.end as usize).unwrap());
        DriverQueue::new(0, mem, layout, event_idx).unwrap()
    }

    fn read_desc(q: &DriverQueue, d: u16) -> Descriptor {
        let mut b = [0u8; 16];
        q.memory().read(q.layout().desc + 16 * u64::from(d), &mut b);
        Descriptor {
            addr: u64::from_le_bytes(b[0..8].try_into().unwrap()),
            len: u32::from_le_bytes(b[8..12].try_into().unwrap()),
            flags: u16::from_le_bytes([b[12], b[13]]),
            next: u16::from_le_bytes([b[14], b[15]]),
        }
    }

    /// Plays the device: returns `head` with `len` in the used ring.
    fn device_use(q: &DriverQueue, at: u16, head: u16, len: u32) {
        let mut e = [0u8; 8];
        e[0..4].copy_from_slice(&u32::from(head).to_le_bytes());
        e[4..8].copy_from_slice(&len.to_le_bytes());
        q.memory().write(q.layout().used + 4 + 8 * u64::from(at % 8), &e);
        q.memory().write(q.layout().used + 2, &at.wrapping_add(1).to_le_bytes());
    }

    #[test]
    fn chain_links_and_recycles() {
        let mut q = queue(false);
        let segs = [Segment { off: 0, len: 10 }, Segment { off: 10, len: 20 }, Segment { off: 30, len: 5 }];
        let head = q.add_chain(&segs, false).unwrap();
        assert_eq!(head, 0);
        assert_eq!(q.num_free(), 5);
        let d0 = read_desc(&q, 0);
        assert_eq!((d0.addr, d0.len, d0.flags, d0.next), (q.slot_gpa(0), 10, VIRTQ_DESC_F_NEXT, 1));
        let d2 = read_desc(&q, 2);
        assert_eq!((d2.addr, d2.len, d2.flags), (q.slot_gpa(0) + 30, 5, 0));
        assert!(q.publish(), "no NO_NOTIFY flag: kick wanted");
        device_use(&q, 0, head, 35);
        assert_eq!(q.pop_used(), Some(UsedElem { id: 0, len: 35, known: true }));
        assert_eq!(q.num_free(), 8);
        assert_eq!(q.pop_used(), None);
    }

    #[test]
    fn full_queue_and_bad_segments_are_refused() {
        let mut q = queue(false);
        let big = [Segment { off: 0, len: 1 }; 9];
        assert!(matches!(q.add_chain(&big, true), Err(QueueError::BadSegmentCount { .. })));
        let over = [Segment { off: 100, len: 29 }]; // slot_len 100 rounds up to 128
        assert!(matches!(q.add_chain(&over, true), Err(QueueError::SegmentOutsideSlot { .. })));
        assert_eq!(q.num_free(), 8);
        for _ in 0..8 {
            q.add_chain(&[Segment { off: 0, len: 1 }], true).unwrap();
        }
        assert!(matches!(q.add_chain(&[Segment { off: 0, len: 1 }], true), Err(QueueError::Full { .. })));
    }

    #[test]
    fn indirect_uses_one_descriptor() {
        let mut q = queue(false);
        let segs = [Segment { off: 0, len: 12 }, Segment { off: 12, len: 60 }];
        let head = q.add_indirect(&segs, false).unwrap();
        assert_eq!(q.num_free(), 7);
        let d = read_desc(&q, head);
        assert_eq!((d.addr, d.len, d.flags), (q.layout().indirect, 32, VIRTQ_DESC_F_INDIRECT));
    }

    #[test]
    fn event_idx_kick_decision() {
        let mut q = queue(true);
        q.add_chain(&[Segment { off: 0, len: 1 }], false).unwrap();
        // avail_event = 0: the device wants a kick when entry 0 is published.
        assert!(q.publish());
        q.add_chain(&[Segment { off: 0, len: 1 }], false).unwrap();
        assert!(!q.publish(), "avail_event still 0, already passed");
        assert!(need_event(5, 6, 5));
        assert!(!need_event(7, 6, 5));
        assert!(need_event(0xffff, 1, 0xfffe));
    }

    #[test]
    fn raw_descriptors_reach_the_rings_untracked() {
        let mut q = queue(false);
        let d = Descriptor { addr: 0xdead_0000, len: 7, flags: VIRTQ_DESC_F_NEXT, next: 5 };
        q.add_raw_descriptors(&[(3, d)], &[3, 9]);
        assert_eq!(read_desc(&q, 3), d);
        let mut ring = [0u8; 8];
        q.memory().read(q.layout().avail + 2, &mut ring);
        assert_eq!(ring[0..2], 2u16.to_le_bytes(), "avail.idx");
        assert_eq!(ring[2..4], 3u16.to_le_bytes());
        assert_eq!(ring[4..6], 9u16.to_le_bytes(), "out-of-range head written as given");
        assert_eq!(q.num_free(), 8, "raw writes do not touch the free list");
        device_use(&q, 0, 9, 0);
        assert_eq!(q.pop_used(), Some(UsedElem { id: 9, len: 0, known: false }));
        assert_eq!(q.num_free(), 8);
        q.set_avail_idx_raw(1000);
        q.memory().read(q.layout().avail + 2, &mut ring[..2]);
        assert_eq!(ring[0..2], 1000u16.to_le_bytes());
    }
}
