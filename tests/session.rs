//! Connection lifecycle of the daemon's real accept loop (`vhost_user::serve(.., once = false)`,
//! in-process on a macvtap): frontends come and go and traffic works for each; a frontend that
//! sends garbage is disconnected and the next proper one is served.
//!
//! Needs root; run with `cargo test -p vutap-tests --test session`.

mod common;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::*;
use vutap_frontend::{FrontendOptions, HandshakeOrder, NetFrontend, VirtioNetHdr};

const WAIT: Duration = Duration::from_secs(5);

/// One frame each way through `fe`, byte for byte: TX on pair 0. The RX frame may land on any
/// running pair: the macvtap picks the queue by a flow hash seeded at boot.
fn traffic(bed: &Bed, fe: &mut NetFrontend, seq: u32) {
    traffic_on_pairs(bed, fe, seq, 1);
}

/// [`traffic`] with one TX frame on each of the first `pairs` pairs (`seq`, `seq + 1`, ...).
fn traffic_on_pairs(bed: &Bed, fe: &mut NetFrontend, seq: u32, pairs: u16) {
    for pair in 0..pairs {
        let seq = seq + u32::from(pair);
        let out = test_frame(bed.far_mac, bed.guest_mac, 1514, seq);
        fe.send_frame(pair, &VirtioNetHdr::default(), &out).expect("send_frame");
        let got = bed.far.recv_matching(WAIT, |f| is_test_frame(f) && seq_of(f) == seq).expect("TX frame at the far end");
        assert!(got == out, "TX frame of pair {pair} changed");
    }
    let seq = seq + u32::from(pairs) - 1;
    let inb = test_frame(bed.guest_mac, bed.far_mac, 1514, seq + 1);
    bed.far.send(&inb);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let left = deadline.checked_duration_since(std::time::Instant::now()).expect("RX frame in time");
        let (_pair, fr) = fe.recv_frame_any(left).expect("recv_frame").expect("RX frame");
        if is_test_frame(&fr.payload) {
            assert!(fr.payload == inb, "RX frame changed");
            return;
        }
    }
}

fn opts(order: HandshakeOrder) -> FrontendOptions {
    FrontendOptions { order, ..FrontendOptions::default() }
}

#[test]
fn test_reconnect_new_frontend_after_disconnect_gets_traffic() {
    let _g = serial();
    let bed = Bed::macvtap_serve_forever(2);
    let orders = [HandshakeOrder::Qemu, HandshakeOrder::CloudHypervisor, HandshakeOrder::Qemu];
    let mut frontend_rx = 0;
    for (round, order) in orders.into_iter().enumerate() {
        let mut fe = bed.daemon.connect(FrontendOptions { queue_pairs: 2, ..opts(order) });
        // Every pair transmits on every connection: a reconnect (CH's reboot of a guest is one)
        // must serve the second pair as it did the first.
        traffic_on_pairs(&bed, &mut fe, 10 * round as u32, 2);
        frontend_rx += fe.stats().rx_frames;
        fe.disconnect();
        // The macvtap queues are detached while nobody is connected: frames for the guest
        // in between are dropped by the macvtap, not queued into a stale fd.
        bed.daemon.wait_connections_ended(round as u64 + 1);
    }
    // Every connection has ended, so the workers' counters are flushed and final.
    let tx = bed.daemon.total(|c| c.tx_frames);
    let rx = bed.daemon.total(|c| c.rx_frames);
    assert_eq!(tx, 6, "TX over 3 connections, 2 pairs each");
    assert_eq!(rx, frontend_rx, "RX frames counted by vutap = frames the frontends received");
    assert!(rx >= 3, "one test frame per connection: {rx}");
}

#[test]
fn test_reconnect_abrupt_close_mid_traffic() {
    let _g = serial();
    let bed = Bed::macvtap_serve_forever(1);
    {
        let mut fe = bed.daemon.connect(opts(HandshakeOrder::CloudHypervisor));
        let frames: Vec<_> = (0..100).map(|i| test_frame(bed.far_mac, bed.guest_mac, 1514, 1000 + i)).collect();
        fe.send_batch(0, &VirtioNetHdr::default(), &frames).expect("send_batch");
        // Dropped with chains in flight, without GET_VRING_BASE: like a killed VMM.
    }
    let mut fe = bed.daemon.connect(opts(HandshakeOrder::Qemu));
    traffic(&bed, &mut fe, 5000);
}

/// Connects a raw socket, sends `bytes`, optionally half-closes, and expects the daemon to
/// close the connection without sending anything.
fn garbage(bed: &Bed, bytes: &[u8], half_close: bool) {
    let mut s = UnixStream::connect(&bed.daemon.socket).expect("connect");
    s.write_all(bytes).expect("write garbage");
    if half_close {
        s.shutdown(Shutdown::Write).unwrap();
    }
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 256];
    match s.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("the daemon answered {n} bytes to garbage {bytes:02x?}: {:02x?}", &buf[..n]),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the daemon did not close the connection after garbage {bytes:02x?}: {e}"),
    }
}

fn header(code: u32, flags: u32, size: u32) -> Vec<u8> {
    [code.to_le_bytes(), flags.to_le_bytes(), size.to_le_bytes()].concat()
}

#[test]
fn test_protocol_truncated_header_then_proper_frontend() {
    let _g = serial();
    let bed = Bed::macvtap_serve_forever(1);
    garbage(&bed, &[1, 0, 0, 0, 1], true);
    let mut fe = bed.daemon.connect(opts(HandshakeOrder::Qemu));
    traffic(&bed, &mut fe, 1);
}

#[test]
fn test_protocol_bad_header_flags_disconnected_then_proper_frontend() {
    let _g = serial();
    let bed = Bed::macvtap_serve_forever(1);
    garbage(&bed, &header(1, 0x2, 0), false); // GET_FEATURES with version 2
    garbage(&bed, &header(1, 0x1, 0x10_0000), false); // absurd body size
                                                      // Reserved flag bits, with a body vhost rejects before reading it.
    garbage(&bed, &[header(1, 0x101, 12), header(1, 0x1, 0)].concat(), false);
    let mut fe = bed.daemon.connect(opts(HandshakeOrder::CloudHypervisor));
    traffic(&bed, &mut fe, 1);
}

#[test]
fn test_protocol_unknown_request_code_disconnected_then_proper_frontend() {
    let _g = serial();
    let bed = Bed::macvtap_serve_forever(1);
    // Request 9999 with a 12-byte body that happens to be a GET_FEATURES header. A backend that
    // skips only the header of an unknown request answers the smuggled GET_FEATURES.
    let mut msg = header(9999, 0x1, 12);
    msg.extend_from_slice(&header(1, 0x1, 0));
    garbage(&bed, &msg, false);
    let mut fe = bed.daemon.connect(opts(HandshakeOrder::Qemu));
    traffic(&bed, &mut fe, 1);
}

/// Bytes the far end's socket has sent that are not freed yet (SIOCOUTQ on a packet socket:
/// its send-buffer charge). A frame sitting in a tap queue keeps it charged.
fn unfreed_bytes(s: &PacketSocket) -> i32 {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int to the pointer we pass.
    let r = unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    assert_eq!(r, 0, "SIOCOUTQ: {}", std::io::Error::last_os_error());
    n
}

/// Frames the interface has received, from its kernel statistics.
fn rx_packets(ifname: &str) -> u64 {
    let path = format!("/sys/class/net/{ifname}/statistics/rx_packets");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.trim().parse().unwrap_or_else(|e| panic!("{path}: {text:?}: {e}"))
}

/// Frames that wait on the tap queue of a pair that stops for good (GET_VRING_BASE, as at the
/// end of a migration) are dropped and counted, which frees their sender's memory. Left on the
/// detached queue they stayed charged to the sender for as long as vutap ran, and a TCP sender
/// behind them stalled: it could neither send more nor retransmit a segment "still in a host
/// queue" (found as a stalled iperf3 after live migration).
#[test]
fn test_stopped_pair_frees_frames_left_on_its_tap_queue() {
    let _g = serial();
    let bed = Bed::macvtap_serve_forever(1);
    let mut fe = bed.daemon.connect(FrontendOptions { rx_prefill: false, ..opts(HandshakeOrder::Qemu) });
    // No RX buffers posted: vutap leaves the frames on the tap queue.
    let received = || rx_packets(&bed.tap_name);
    let received0 = received();
    for i in 0..20 {
        bed.far.send(&test_frame(bed.guest_mac, bed.far_mac, 1514, 100 + i));
    }
    // A sent frame is charged at once, but may still wait for the kernel's receive processing:
    // wait until the macvtap has taken all of them, or a late one would meet a detached queue.
    assert!(wait_until(WAIT, || received() >= received0 + 20), "frames reached the macvtap: {}", received() - received0);
    assert!(wait_until(WAIT, || unfreed_bytes(&bed.far) >= 20 * 1514), "frames queued and charged: {}", unfreed_bytes(&bed.far));
    fe.get_vring_base(0).expect("GET_VRING_BASE");
    let counts = || bed.daemon.dev.metrics[0].snapshot();
    assert!(wait_until(WAIT, || counts().rx_flushed == 20), "20 frames flushed: {:?}", counts());
    assert!(wait_until(WAIT, || unfreed_bytes(&bed.far) == 0), "sender's memory freed: {}", unfreed_bytes(&bed.far));
    // GET_VRING_BASE stopped the pair, whose last flush carried rx_flushed: the count is final.
    assert_eq!(counts().rx_frames, 0);
}

/// A restart of the workers (the frontend re-sends SET_FEATURES, as QEMU does when dirty
/// logging starts) keeps the tap queue attached: frames queued meanwhile are all delivered.
#[test]
fn test_worker_restart_keeps_frames_queued_on_the_tap() {
    use vhost::VhostBackend;
    let _g = serial();
    let bed = Bed::macvtap_serve_forever(1);
    let mut fe = bed.daemon.connect(FrontendOptions { rx_prefill: false, ..opts(HandshakeOrder::Qemu) });
    let frames: Vec<_> = (0..10).map(|i| test_frame(bed.guest_mac, bed.far_mac, 1514, 200 + i)).collect();
    for f in &frames {
        bed.far.send(f);
    }
    assert!(wait_until(WAIT, || unfreed_bytes(&bed.far) >= 10 * 1514), "frames queued");
    let acked = fe.acked_features();
    fe.vhost().set_features(acked).expect("SET_FEATURES again");
    fe.post_rx_buffers(0, 64).expect("post RX buffers");
    let mut got = Vec::new();
    let deadline = std::time::Instant::now() + WAIT;
    while got.len() < frames.len() {
        let left = deadline.checked_duration_since(std::time::Instant::now()).unwrap_or_else(|| panic!("only {} of 10 frames", got.len()));
        if let Some(fr) = fe.recv_frame(0, left).expect("recv_frame") {
            if is_test_frame(&fr.payload) {
                got.push(fr.payload);
            }
        }
    }
    assert!(got == frames, "all 10 frames, in order, byte for byte");
    let received = fe.stats().rx_frames;
    drop(fe);
    bed.daemon.wait_connections_ended(1);
    let c = bed.daemon.dev.metrics[0].snapshot();
    assert_eq!((c.rx_frames, c.rx_flushed), (received, 0), "delivered, none flushed: {c:?}");
}
