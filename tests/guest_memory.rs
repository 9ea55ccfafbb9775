//! Guest memory that lies: a frontend declares a region larger than its fd, hands a dirty log
//! shorter than it says, or truncates guest memory under a running connection (TX and RX). vutap
//! must survive, log it, count it, close that connection, serve the next one, and keep its other
//! device forwarding byte for byte throughout.
//!
//! vutap runs as a separate process with two devices (two taps it creates): `a` is attacked,
//! `b` forwards frames in a background thread before, during and after. The test frontend maps
//! the same memfd, so after a truncation it never touches the cut range again (only eventfds
//! and the rings that are still backed). Needs root (taps) and a built `vutap` binary.

mod common;
mod hardening_util;

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use common::*;
use hardening_util::{closed_within, conn_fd, memfd, raw_send, NO_REPLY};
use vhost::vhost_user::message::FrontendReq;
use vhost::vhost_user::VhostUserProtocolFeatures;
use vhost::{VhostBackend, VhostUserDirtyLogRegion};
use vutap_frontend::{tx_queue, Descriptor, FrontendOptions, NetFrontend, VirtioNetHdr};
use vutap_testbed::free_port;
use vutap_testbed::scrape::{http_get, metric};
use vutap_testbed::{log_dir, Vutap};

const SET_OWNER: u32 = FrontendReq::SET_OWNER as u32;
const SET_MEM_TABLE: u32 = FrontendReq::SET_MEM_TABLE as u32;
const WAIT: Duration = Duration::from_secs(10);

/// One device of the vutap under test: its socket, its tap and the far end on the tap.
struct Dev {
    socket: PathBuf,
    tap: String,
    far: PacketSocket,
}

/// A guest frame and its echo: TX one frame and see it on the tap, then send one from the tap
/// and see it in the guest, both byte for byte. Returns a description of what went wrong.
fn roundtrip(fe: &mut NetFrontend, far: &PacketSocket, seq: u32) -> Result<(), String> {
    let src = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    let tx = test_frame([0xff; 6], src, 60 + (seq as usize % 200), seq);
    fe.send_frame(0, &VirtioNetHdr::default(), &tx).map_err(|e| format!("send_frame {seq}: {e}"))?;
    let got = far.recv_matching(WAIT, |f| is_test_frame(f) && seq_of(f) == seq).ok_or(format!("TX frame {seq} never reached the tap"))?;
    if got != tx {
        return Err(format!("TX frame {seq} differs on the tap"));
    }
    let rx_seq = seq | 0x8000_0000;
    let rx = test_frame([0xff; 6], [0x02, 0x77, 0, 0, 0, 1], 60 + (seq as usize % 300), rx_seq);
    far.send(&rx);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let left =
            deadline.checked_duration_since(std::time::Instant::now()).ok_or(format!("RX frame {rx_seq:#x} never reached the guest"))?;
        let Some(f) = fe.recv_frame(0, left).map_err(|e| format!("recv_frame: {e}"))? else {
            continue;
        };
        if is_test_frame(&f.payload) && seq_of(&f.payload) == rx_seq {
            return if f.payload == rx { Ok(()) } else { Err(format!("RX frame {rx_seq:#x} differs in the guest")) };
        }
    }
}

/// Device b forwarding in a background thread until stopped.
struct Forwarding {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU32>,
    thread: JoinHandle<Result<(), String>>,
}

impl Forwarding {
    fn start(dev: &Dev) -> Forwarding {
        let mut fe = NetFrontend::connect(&dev.socket, FrontendOptions::default()).expect("handshake on device b");
        let far = PacketSocket::bind(&dev.tap);
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU32::new(0));
        let (s, d) = (stop.clone(), done.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                roundtrip(&mut fe, &far, d.load(Ordering::SeqCst))?;
                d.fetch_add(1, Ordering::SeqCst);
            }
            Ok(())
        });
        let fwd = Forwarding { stop, done, thread };
        // Forwarding before the attack starts...
        fwd.wait_for_more(0);
        fwd
    }

    fn wait_for_more(&self, than: u32) {
        let more = wait_until(WAIT, || self.done.load(Ordering::SeqCst) >= than + 3 || self.thread.is_finished());
        assert!(more && !self.thread.is_finished(), "device b stopped forwarding after {} round trips", self.done.load(Ordering::SeqCst));
    }

    /// ...and still after it ended: no round trip failed in between. Returns how many
    /// completed, each byte for byte.
    fn finish(self) -> u32 {
        self.wait_for_more(self.done.load(Ordering::SeqCst));
        self.stop.store(true, Ordering::SeqCst);
        let n = self.done.load(Ordering::SeqCst);
        if let Err(e) = self.thread.join().expect("forwarding thread") {
            panic!("device b stopped forwarding after {n} round trips: {e}");
        }
        n
    }
}

/// vutap with devices a (attacked) and b (forwarding), metrics on a free port.
struct Bed {
    vutap: Vutap,
    a: Dev,
    b: Dev,
    port: u16,
    _dir: PathBuf,
}

impl Bed {
    fn start(name: &str) -> Bed {
        let id = unique();
        let (tap_a, tap_b) = (format!("vgm{id}a"), format!("vgm{id}b"));
        assert!(tap_a.len() < 16);
        let dir = log_dir(&format!("guest-memory-{name}")).unwrap();
        let (sa, sb) = (dir.join("a.sock"), dir.join("b.sock"));
        let port = free_port();
        let dev_b = format!("socket={},tap={tap_b},name=b", sb.display());
        let addr = format!("127.0.0.1:{port}");
        let vutap = Vutap::spawn(&sa, Path::new(&tap_a), 1, &["--device", &dev_b, "--metrics-addr", &addr], &dir).expect("spawn vutap");
        assert!(wait_until(WAIT, || sb.exists()), "socket b: {}", vutap.log_text());
        for tap in [&tap_a, &tap_b] {
            no_ipv6(tap);
            sh("ip", &["link", "set", tap, "up"]);
        }
        let (far_a, far_b) = (PacketSocket::bind(&tap_a), PacketSocket::bind(&tap_b));
        Bed { vutap, a: Dev { socket: sa, tap: tap_a, far: far_a }, b: Dev { socket: sb, tap: tap_b, far: far_b }, port, _dir: dir }
    }

    fn metrics(&self) -> String {
        http_get(self.port, "/metrics")
    }

    fn device_counter(&self, dev: &str, name: &str) -> Option<u64> {
        metric(&self.metrics(), &format!("vutap_device_{name}_total"), &format!("device=\"{dev}\""))
    }

    fn pair_counter(&self, dev: &str, name: &str) -> Option<u64> {
        metric(&self.metrics(), &format!("vutap_{name}_total"), &format!("device=\"{dev}\",queue_pair=\"0\""))
    }

    fn wait_logged(&self, needle: &str) {
        assert!(wait_until(WAIT, || self.vutap.log_text().contains(needle)), "no {needle:?} in the log:\n{}", self.vutap.log_text());
    }

    /// Device a serves a new connection, byte for byte, and vutap is still the same process.
    fn assert_a_serves_again(&mut self) {
        let mut fe = NetFrontend::connect(&self.a.socket, FrontendOptions::default()).expect("next connection on device a");
        roundtrip(&mut fe, &self.a.far, 7000).unwrap_or_else(|e| panic!("device a after reconnect: {e}\n{}", self.vutap.log_text()));
        assert!(self.vutap.is_running(), "{}", self.vutap.log_text());
    }

    fn a_label(&self) -> String {
        self.a.tap.clone()
    }
}

/// Device b before the attack, then forwarding in the background during it.
fn b_before_and_during(bed: &Bed) -> Forwarding {
    let mut fe = NetFrontend::connect(&bed.b.socket, FrontendOptions::default()).expect("handshake on device b");
    roundtrip(&mut fe, &bed.b.far, 1).expect("device b before");
    drop(fe);
    Forwarding::start(&bed.b)
}

/// Device b after the attack: the background forwarding ran, and a fresh check passes.
fn b_during_and_after(bed: &Bed, fwd: Forwarding) {
    let during = fwd.finish();
    let mut fe = NetFrontend::connect(&bed.b.socket, FrontendOptions::default()).expect("handshake on device b after");
    roundtrip(&mut fe, &bed.b.far, 9000).expect("device b after");
    assert_eq!(bed.device_counter("b", "guest_memory_lost"), Some(0));
    assert_eq!(bed.device_counter("b", "bad_memory_fds"), Some(0));
    eprintln!("device b: {during} round trips in the background across the attack, all byte for byte");
}

/// A SET_MEM_TABLE body with one region (gpa 0) of `size` bytes at `offset` in the fd.
fn one_region(size: u64, user_addr: u64, offset: u64) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    for v in [0u64, size, user_addr, offset] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b
}

#[test]
fn test_guest_memory_region_larger_than_its_fd_is_refused() {
    let _g = serial();
    let mut bed = Bed::start("region");
    let fwd = b_before_and_during(&bed);

    // 64 KiB behind a region that claims 1 MiB; then 64 KiB at an offset that leaves 60 KiB.
    let cases = [(1u64 << 20, 0u64, "needs 1048576"), (0x10000, 0x1000, "needs 69632")];
    for (i, (size, offset, needle)) in cases.into_iter().enumerate() {
        let s = std::os::unix::net::UnixStream::connect(&bed.a.socket).unwrap();
        let fd = memfd(0x10000);
        raw_send(s.as_raw_fd(), SET_OWNER, NO_REPLY, 0, &[], &[]).unwrap();
        let body = one_region(size, 0x7f00_0000_0000, offset);
        raw_send(s.as_raw_fd(), SET_MEM_TABLE, NO_REPLY, body.len() as u32, &body, &[fd.as_raw_fd()]).unwrap();
        assert!(closed_within(s.as_raw_fd(), WAIT), "case {i}: connection not closed\n{}", bed.vutap.log_text());
        bed.wait_logged(&format!("SET_MEM_TABLE refused: region 0 (gpa 0x0): the fd holds 65536 bytes but the mapping {needle}"));
        assert_eq!(bed.device_counter(&bed.a_label(), "bad_memory_fds"), Some(i as u64 + 1));
    }
    // Each refused table ends its connection as a protocol error, once.
    assert!(
        wait_until(WAIT, || bed.device_counter(&bed.a_label(), "protocol_errors") == Some(cases.len() as u64)),
        "{}",
        bed.vutap.log_text()
    );
    bed.assert_a_serves_again();
    b_during_and_after(&bed, fwd);
}

#[test]
fn test_guest_memory_dirty_log_fd_too_short_is_refused() {
    let _g = serial();
    let mut bed = Bed::start("log");
    let fwd = b_before_and_during(&bed);

    let opts = FrontendOptions {
        requested_protocol: FrontendOptions::default().requested_protocol | VhostUserProtocolFeatures::LOG_SHMFD,
        ..FrontendOptions::default()
    };
    let mut fe = NetFrontend::connect(&bed.a.socket, opts).expect("handshake on device a");
    assert!(fe.protocol_features().contains(VhostUserProtocolFeatures::LOG_SHMFD));
    roundtrip(&mut fe, &bed.a.far, 1).expect("device a before");
    let raw = conn_fd(fe.vhost());
    let log = memfd(4096);
    let region = VhostUserDirtyLogRegion { mmap_size: 64 * 4096, mmap_offset: 0, mmap_handle: log.as_raw_fd() };
    assert!(fe.vhost().set_log_base(0, Some(region)).is_err(), "a short log must not be acked");
    assert!(closed_within(raw.as_raw_fd(), WAIT), "connection not closed\n{}", bed.vutap.log_text());
    bed.wait_logged("SET_LOG_BASE refused (262144 bytes at 0): log fd: the fd holds 4096 bytes but the mapping needs 262144");
    assert_eq!(bed.device_counter(&bed.a_label(), "bad_memory_fds"), Some(1));
    drop(fe);
    bed.assert_a_serves_again();
    b_during_and_after(&bed, fwd);
}

/// Truncates the frontend's memfd to `len` bytes (the frontend must not touch what is cut).
fn truncate_guest_memory(fe: &NetFrontend, len: u64) {
    let fd = fe.memory().region_info().mmap_handle;
    // SAFETY: ftruncate on the frontend's own memfd; the test no longer touches the cut range.
    assert_eq!(unsafe { libc::ftruncate(fd, len as libc::off_t) }, 0);
}

/// After a truncation: device a's connection closes, the fault is logged and counted, and the
/// next connection on a is served.
fn assert_memory_lost_contained(bed: &mut Bed, raw: &impl AsRawFd, kernel_copy: bool, range_len: u64) {
    assert!(closed_within(raw.as_raw_fd(), WAIT), "connection not closed\n{}", bed.vutap.log_text());
    bed.wait_logged("closing connection: guest memory lost: SIGBUS at");
    assert_eq!(lost_range_len(&bed.vutap.log_text()), Some(range_len), "{}", bed.vutap.log_text());
    assert!(bed.vutap.is_running(), "{}", bed.vutap.log_text());
    let a = bed.a_label();
    assert!(wait_until(WAIT, || bed.device_counter(&a, "guest_memory_lost") == Some(1)), "{}", bed.metrics());
    assert_eq!(bed.pair_counter(&a, "guest_memory_faults"), Some(u64::from(kernel_copy)), "{}", bed.metrics());
    assert_eq!(bed.pair_counter(&a, "tap_errors"), Some(0));
    assert_eq!(bed.pair_counter(&a, "tx_dropped"), Some(0));
    assert_eq!(bed.pair_counter(&a, "rx_dropped"), Some(0));
    bed.assert_a_serves_again();
}

#[test]
fn test_guest_memory_truncated_under_tx_ring_access_is_contained() {
    let _g = serial();
    let mut bed = Bed::start("trunc-ring");
    let fwd = b_before_and_during(&bed);

    let mut fe = NetFrontend::connect(&bed.a.socket, FrontendOptions::default()).expect("handshake on device a");
    roundtrip(&mut fe, &bed.a.far, 1).expect("device a before");
    bed.wait_logged("memory region 0: fd NOT sealed against shrinking");
    let raw = conn_fd(fe.vhost());
    // All of guest memory goes; a kick makes the worker read the TX ring: SIGBUS in vutap.
    truncate_guest_memory(&fe, 0);
    fe.queue(tx_queue(0)).unwrap().kick().unwrap();
    assert_memory_lost_contained(&mut bed, &raw, false, fe.memory().size() as u64);
    drop(fe);
    b_during_and_after(&bed, fwd);
}

#[test]
fn test_guest_memory_truncated_under_tx_frame_is_contained() {
    let _g = serial();
    let mut bed = Bed::start("trunc-tx");
    let fwd = b_before_and_during(&bed);

    let mut fe = NetFrontend::connect(&bed.a.socket, FrontendOptions::default()).expect("handshake on device a");
    roundtrip(&mut fe, &bed.a.far, 1).expect("device a before");
    let raw = conn_fd(fe.vhost());
    // Keep the rings, cut the TX buffers: the tap's writev reads a lost page (EFAULT).
    let q = tx_queue(0);
    let slots = fe.queue(q).unwrap().layout().slots;
    truncate_guest_memory(&fe, slots);
    let txq = fe.queue_mut(q).unwrap();
    let head = txq.next_head().expect("a free TX descriptor");
    let desc = Descriptor { addr: txq.slot_gpa(head), len: 12 + 60, flags: 0, next: 0 };
    assert!(desc.addr >= slots);
    txq.add_raw_descriptors(&[(head, desc)], &[head]);
    txq.kick().unwrap();
    assert_memory_lost_contained(&mut bed, &raw, true, fe.memory().size() as u64);
    drop(fe);
    b_during_and_after(&bed, fwd);
}

#[test]
fn test_guest_memory_truncated_under_rx_buffers_is_contained() {
    let _g = serial();
    let mut bed = Bed::start("trunc-rx");
    let fwd = b_before_and_during(&bed);

    let mut fe = NetFrontend::connect(&bed.a.socket, FrontendOptions::default()).expect("handshake on device a");
    roundtrip(&mut fe, &bed.a.far, 1).expect("device a before");
    let raw = conn_fd(fe.vhost());
    // Keep the RX rings (posted buffers), cut the RX buffers and everything after: the tap's
    // readv writes into a lost page (EFAULT).
    let slots = fe.queue(0).unwrap().layout().slots;
    truncate_guest_memory(&fe, slots);
    bed.a.far.send(&test_frame([0xff; 6], [0x02, 0x77, 0, 0, 0, 1], 100, 42));
    assert_memory_lost_contained(&mut bed, &raw, true, fe.memory().size() as u64);
    drop(fe);
    b_during_and_after(&bed, fwd);
}

#[test]
fn test_guest_memory_dirty_log_truncated_while_logging_is_contained() {
    let _g = serial();
    let mut bed = Bed::start("log-trunc");
    let fwd = b_before_and_during(&bed);

    let opts = FrontendOptions {
        requested_protocol: FrontendOptions::default().requested_protocol | VhostUserProtocolFeatures::LOG_SHMFD,
        ..FrontendOptions::default()
    };
    let mut fe = NetFrontend::connect(&bed.a.socket, opts).expect("handshake on device a");
    let raw = conn_fd(fe.vhost());
    let log = fe.start_dirty_log().expect("a full-size log is mapped and logging is on");
    let log_len = log.metadata().unwrap().len() as usize;
    roundtrip(&mut fe, &bed.a.far, 1).expect("device a while logging");
    bed.wait_logged("dirty log mapped");
    // The log was written: the used rings' pages are marked.
    let mut bitmap = vec![0u8; log_len];
    std::os::unix::fs::FileExt::read_exact_at(&log, &mut bitmap, 0).unwrap();
    assert!(bitmap.iter().any(|b| *b != 0), "nothing marked in the dirty log");
    // The log goes; the next frame's used-ring update marks it: SIGBUS in vutap.
    log.set_len(0).unwrap();
    let frame = test_frame([0xff; 6], [0x52, 0x54, 0, 0x12, 0x34, 0x56], 100, 77);
    fe.send_frame(0, &VirtioNetHdr::default(), &frame).unwrap();
    assert_memory_lost_contained(&mut bed, &raw, false, log_len as u64);
    drop(fe);
    b_during_and_after(&bed, fwd);
}

/// The length of the range named in the first "inside the mapped range A..B" log line.
fn lost_range_len(log: &str) -> Option<u64> {
    let rest = &log[log.find("inside the mapped range ")? + "inside the mapped range ".len()..];
    let (a, rest) = rest.split_once("..")?;
    let b = rest.split_whitespace().next()?;
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok();
    Some(hex(b)? - hex(a)?)
}
