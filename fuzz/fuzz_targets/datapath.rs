//! The TX and RX batch loops over rings a hostile guest wrote: random descriptor tables (any
//! address, length, flags and `next`, indirect tables taken from guest memory), avail rings
//! with any index and heads, guest scribbles between batches, and a scripted tap (frames of any
//! size, EAGAIN, EINVAL, EOF, device gone). Guest memory is two memfd-backed regions, adjacent
//! or with a hole, mapped the way SET_MEM_TABLE maps them.
//!
//! Checked on every step: no panic or overflow; everything the TX loop counts as sent is what
//! the tap got (frames and bytes); the RX loop never claims more frames or bytes than the tap
//! delivered. As in the worker, a ring that reported itself broken or a gone tap is not
//! served again.
#![no_main]

use std::fs::File;
use std::os::fd::FromRawFd;

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use vhost::vhost_user::message::VhostUserMemoryRegion;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vutap::control::memory::{GuestMem, SharedMemory};
use vutap::control::memory_guard::FaultOwner;
use vutap::datapath::flat_mem::FlatMem;
use vutap::datapath::rx::{RxLoop, RxOutcome};
use vutap::datapath::tx::{TxLoop, TxOutcome};
use vutap::metrics::PairCounts;
use vutap::test_utils::{memfd_log, MockTap, TapStep};
use vutap_virtio::features::offered_features;
use vutap_virtio::Features;

const REGION: u64 = 0x2_0000;
/// Rings of one queue: descriptor table, avail ring, used ring (each fits a 256-entry ring).
const TX_RINGS: [u64; 3] = [0x0000, 0x1000, 0x2000];
const RX_RINGS: [u64; 3] = [0x3000, 0x4000, 0x5000];
/// Where buffers (and indirect tables) usually point; its first bytes come from the input.
const DATA: u64 = 0x8000;
const ERRNOS: [i32; 7] = [libc::EAGAIN, libc::EINVAL, libc::EFAULT, libc::EIO, libc::EBADFD, libc::ENODEV, libc::EMSGSIZE];

fn memfd(len: u64) -> File {
    // SAFETY: memfd_create with a static NUL-terminated name; the fd is checked, then owned by
    // the File.
    let fd = unsafe { libc::memfd_create(c"vutap-fuzz-guest".as_ptr(), 0) };
    assert!(fd >= 0, "memfd_create failed");
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len).expect("memfd set_len");
    file
}

/// Two regions of one memfd, the second right after the first or behind a hole.
fn guest_memory(u: &mut Unstructured) -> Result<GuestMem> {
    let file = memfd(2 * REGION);
    let second_gpa = if u.arbitrary()? { REGION } else { 2 * REGION };
    let regions = [
        VhostUserMemoryRegion::new(0, REGION, 0x7000_0000_0000, 0),
        VhostUserMemoryRegion::new(second_gpa, REGION, 0x7000_1000_0000, REGION),
    ];
    let files = vec![file.try_clone().expect("dup memfd"), file];
    // The owner registers the regions with the SIGBUS guard; nothing here shrinks the memfd.
    let owner = FaultOwner::new().expect("a fault-guard slot");
    Ok(SharedMemory::map(&regions, files, &owner).expect("a valid two-region layout maps").mem)
}

fn guest_addr(u: &mut Unstructured) -> Result<u64> {
    Ok(match u.int_in_range(0u8..=7)? {
        0..=4 => DATA + u64::from(u.int_in_range(0u32..=0x1_0000)?),
        5 => REGION - u64::from(u.arbitrary::<u8>()?),
        6 => 3 * REGION - u64::from(u.arbitrary::<u16>()?),
        _ => u.arbitrary()?,
    })
}

fn desc_len(u: &mut Unstructured) -> Result<u32> {
    Ok(match u.int_in_range(0u8..=3)? {
        0 => *u.choose(&[0, 1, 10, 11, 12, 60, 1514, 4096, 65_550, 65_562])?,
        1 => u32::from(u.arbitrary::<u8>()?),
        2 => u32::from(u.arbitrary::<u16>()?),
        _ => u.arbitrary()?,
    })
}

/// Writes descriptor `slot` of the table at `table`: address, length, flags, next.
fn write_desc(u: &mut Unstructured, mem: &GuestMem, table: u64, slot: u16, size: u16) -> Result<()> {
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&guest_addr(u)?.to_le_bytes());
    d[8..12].copy_from_slice(&desc_len(u)?.to_le_bytes());
    // NEXT, WRITE and INDIRECT mostly; now and then any bits.
    let flags: u16 = if u.ratio(1, 16)? { u.arbitrary()? } else { u16::from(u.arbitrary::<u8>()? & 7) };
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    let next: u16 = if u.ratio(1, 16)? { u.arbitrary()? } else { u.int_in_range(0..=size - 1)? };
    d[14..16].copy_from_slice(&next.to_le_bytes());
    mem.write_slice(&d, GuestAddress(table + u64::from(slot) * 16)).expect("table is in memory");
    Ok(())
}

/// Makes `count` more heads available after `idx` and publishes the new index.
fn publish_avail(u: &mut Unstructured, mem: &GuestMem, avail: u64, size: u16, idx: &mut u16, count: u16) -> Result<()> {
    for _ in 0..count {
        let head: u16 = if u.ratio(1, 16)? { u.arbitrary()? } else { u.int_in_range(0..=size - 1)? };
        mem.write_obj(head, GuestAddress(avail + 4 + u64::from(*idx % size) * 2)).expect("avail ring");
        *idx = idx.wrapping_add(1);
    }
    mem.write_obj(*idx, GuestAddress(avail + 2)).expect("avail idx");
    Ok(())
}

struct Ring {
    queue: Queue,
    addrs: [u64; 3],
    size: u16,
    avail_idx: u16,
    stopped: bool,
}

fn ring(u: &mut Unstructured, mem: &GuestMem, addrs: [u64; 3], event_idx: bool) -> Result<Option<Ring>> {
    let size = 1u16 << u.int_in_range(0..=8)?;
    for slot in 0..u.int_in_range(0..=size)? {
        write_desc(u, mem, addrs[0], slot, size)?;
    }
    let flags: u16 = u.int_in_range(0..=1)?;
    mem.write_obj(flags, GuestAddress(addrs[1])).expect("avail flags");
    let next_avail: u16 = if u.ratio(1, 8)? { u.arbitrary()? } else { 0 };
    let mut avail_idx = next_avail;
    let count = u.int_in_range(0..=size)?;
    publish_avail(u, mem, addrs[1], size, &mut avail_idx, count)?;
    let used_event: u16 = u.arbitrary()?;
    mem.write_obj(used_event, GuestAddress(addrs[1] + 4 + 2 * u64::from(size))).expect("used_event");

    let mut queue = Queue::new(256).expect("queue");
    queue.set_size(size);
    queue.set_desc_table_address(Some(addrs[0] as u32), Some(0));
    queue.set_avail_ring_address(Some(addrs[1] as u32), Some(0));
    queue.set_used_ring_address(Some(addrs[2] as u32), Some(0));
    queue.set_event_idx(event_idx);
    queue.set_ready(true);
    if !queue.is_valid(mem) {
        return Ok(None);
    }
    queue.set_next_avail(next_avail);
    queue.set_next_used(next_avail);
    Ok(Some(Ring { queue, addrs, size, avail_idx, stopped: false }))
}

fn tap_step(u: &mut Unstructured) -> Result<TapStep> {
    Ok(match u.int_in_range(0u8..=5)? {
        0..=3 => {
            let len = match u.int_in_range(0u8..=3)? {
                0 => usize::from(u.arbitrary::<u8>()?),
                1 => u.int_in_range(0..=1600)?,
                2 => u.int_in_range(0..=9100)?,
                _ => u.int_in_range(0..=vutap::tap::MAX_READ + 64)?,
            };
            let mut frame = vutap::test_utils::frame(len, u.arbitrary()?);
            let hdr = len.min(12);
            frame[..hdr].copy_from_slice(u.bytes(hdr).unwrap_or(&[0; 12][..hdr]));
            TapStep::Frame(frame)
        }
        4 => TapStep::Fail(*u.choose(&ERRNOS)?),
        _ => TapStep::Accept,
    })
}

fn run(u: &mut Unstructured) -> Result<()> {
    let mem = guest_memory(u)?;
    let fill_len = u.int_in_range(0..=4096)?;
    let fill = u.bytes(fill_len)?;
    mem.write_slice(fill, GuestAddress(DATA)).expect("data area");

    let acked: u64 = u.arbitrary()?;
    let features = Features::negotiate(offered_features(), acked & offered_features())
        .or_else(|_| Features::negotiate(offered_features(), 1 << 32))
        .expect("VERSION_1 alone negotiates");
    let mtu: u16 = u.int_in_range(68..=u16::MAX)?;
    let event_idx = features.event_idx();
    let Some(mut tx) = ring(u, &mem, TX_RINGS, event_idx)? else { return Ok(()) };
    let Some(mut rx) = ring(u, &mem, RX_RINGS, event_idx)? else { return Ok(()) };

    let log = if u.ratio(1, 4)? { Some(std::sync::Arc::new(memfd_log(u.int_in_range(1..=64)?).1)) } else { None };
    let mut tx_loop = TxLoop::new(u.int_in_range(1..=64)?, tx.size, features.hdr_len()).with_log(log.clone());
    // The loops read guest memory the way a worker does.
    let flat = FlatMem::new(mem.clone());
    let mut rx_loop = RxLoop::new(u.int_in_range(1..=64)?, rx.size, features, mtu, &flat).with_log(log);

    let tap = MockTap::default();
    // Frame by frame (readv), or batches of reads as through io_uring.
    tap.read_batch_capacity.set(*u.choose(&[1, 2, 8, 32])?);
    let mut counts = PairCounts::default();
    let (mut offered_frames, mut offered_bytes) = (0u64, 0u64);
    for _ in 0..64 {
        if u.is_empty() {
            break;
        }
        match u.int_in_range(0u8..=8)? {
            0 if !tx.stopped => {
                let (outcome, _) = tx_loop.process(&mut tx.queue, &flat, &tap, &mut counts);
                tx.stopped = matches!(outcome, TxOutcome::TapGone(_) | TxOutcome::RingBroken(_));
            }
            1 if !rx.stopped => {
                let (outcome, _) = rx_loop.process(&mut rx.queue, &flat, &tap, &mut counts);
                rx.stopped = matches!(outcome, RxOutcome::TapGone(_) | RxOutcome::RingBroken(_));
            }
            2 | 3 => {
                let r = if u.arbitrary()? { &mut tx } else { &mut rx };
                let count = u.int_in_range(0..=r.size)?;
                publish_avail(u, &mem, r.addrs[1], r.size, &mut r.avail_idx, count)?;
            }
            4 => {
                let r = if u.arbitrary()? { &tx } else { &rx };
                let slot = u.int_in_range(0..=r.size - 1)?;
                write_desc(u, &mem, r.addrs[0], slot, r.size)?;
            }
            5 => {
                let step = tap_step(u)?;
                if let TapStep::Frame(f) = &step {
                    offered_frames += 1;
                    offered_bytes += f.len() as u64;
                }
                tap.read_script.borrow_mut().push_back(step);
            }
            6 => {
                let step = if u.arbitrary()? { TapStep::Fail(*u.choose(&ERRNOS)?) } else { TapStep::Accept };
                tap.write_script.borrow_mut().push_back(step);
            }
            7 if !rx.stopped => {
                rx_loop.return_held(&mut rx.queue, &flat);
            }
            8 => {
                // The guest scribbles over any ring while the device works.
                let at = u.int_in_range(0..=0x5fffu64)?;
                mem.write_obj(u.arbitrary::<u16>()?, GuestAddress(at)).expect("ring area");
            }
            _ => {}
        }
        let written = tap.written.borrow();
        assert_eq!(counts.tx_frames, written.len() as u64, "TX frames counted = frames the tap got");
        assert_eq!(counts.tx_bytes, written.iter().map(|f| f.len() as u64).sum::<u64>(), "TX bytes counted = bytes the tap got");
        assert!(counts.rx_frames <= offered_frames, "RX delivered more frames than the tap gave");
        assert!(counts.rx_bytes <= offered_bytes, "RX delivered more bytes than the tap gave");
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
