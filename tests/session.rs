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
use vutap_bench::frontend::{FrontendOptions, HandshakeOrder, NetFrontend, VirtioNetHdr};

const WAIT: Duration = Duration::from_secs(5);

/// One frame each way through `fe`, byte for byte.
fn traffic(bed: &Bed, fe: &mut NetFrontend, seq: u32) {
    let out = test_frame(bed.far_mac, bed.guest_mac, 1514, seq);
    fe.send_frame(0, &VirtioNetHdr::default(), &out).expect("send_frame");
    let got = bed.far.recv_matching(WAIT, |f| is_test_frame(f) && seq_of(f) == seq).expect("TX frame at the far end");
    assert!(got == out, "TX frame changed");
    let inb = test_frame(bed.guest_mac, bed.far_mac, 1514, seq + 1);
    bed.far.send(&inb);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let left = deadline.checked_duration_since(std::time::Instant::now()).expect("RX frame in time");
        let fr = fe.recv_frame(0, left).expect("recv_frame").expect("RX frame");
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
    for (round, order) in orders.into_iter().enumerate() {
        let mut fe = bed.daemon.connect(FrontendOptions { queue_pairs: 2, ..opts(order) });
        traffic(&bed, &mut fe, 10 * round as u32);
        fe.disconnect();
        // The macvtap queues are detached while nobody is connected: frames for the guest
        // in between are dropped by the macvtap, not queued into a stale fd.
    }
    // Counters are flushed by the worker when its pair stops, which the daemon does after the
    // disconnect is seen: wait for it rather than read them at once.
    let counts = || bed.daemon.dev.metrics[0].snapshot();
    assert!(wait_until(WAIT, || counts().tx_frames == 3), "TX over 3 connections: {:?}", counts());
    assert!(wait_until(WAIT, || counts().rx_frames >= 3), "RX over 3 connections: {:?}", counts());
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
