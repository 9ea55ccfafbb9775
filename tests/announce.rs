//! VHOST_USER_SEND_RARP: after a migration the frontend hands vutap the guest's MAC and vutap
//! broadcasts a RARP out of the tap, so switches learn the guest on its new port.
//! Needs root: netns + veth + macvtap.

mod common;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::*;
use vhost::vhost_user::message::{FrontendReq, VhostUserProtocolFeatures};
use vutap::control::wire::{self, Header};
use vutap_frontend::FrontendOptions;

/// Sends SEND_RARP with NEED_REPLY on a dup of the frontend's connection; returns the ack value.
fn send_rarp(conn_fd: i32, mac: [u8; 6]) -> u64 {
    // SAFETY: dup of the frontend's open socket fd; the copy is owned by the OwnedFd.
    let fd = unsafe { libc::dup(conn_fd) };
    assert!(fd >= 0);
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let sock = UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let body = wire::rarp_body(mac);
    wire::send(&sock, &Header::request(FrontendReq::SEND_RARP, body.len() as u32).need_reply(), &body, &[]).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    wire::recv_ack(&sock, FrontendReq::SEND_RARP).expect("an ack to SEND_RARP")
}

#[test]
fn test_announce_send_rarp_reaches_the_peer() {
    let _g = serial();
    let bed = Bed::macvtap(1, None, false);
    let mut opts = FrontendOptions::default();
    opts.requested_protocol |= VhostUserProtocolFeatures::RARP;
    let mut fe = bed.daemon.connect(opts);
    assert!(fe.protocol_features().contains(VhostUserProtocolFeatures::RARP), "vutap offers RARP");
    let status = send_rarp(fe.vhost().as_raw_fd(), bed.guest_mac);
    assert_eq!(status, 0, "SEND_RARP acked as done");
    let mac = bed.guest_mac;
    let rarp = bed
        .far
        .recv_matching(Duration::from_secs(5), |f| f.len() >= 38 && f[12..14] == [0x80, 0x35] && f[6..12] == mac)
        .expect("a RARP from the guest's MAC reaches the peer");
    assert_eq!(&rarp[0..6], &[0xff; 6], "broadcast");
    assert_eq!(&rarp[20..22], &[0, 3], "RARP request-reverse");
    assert_eq!(&rarp[22..28], &mac, "sender hardware address is the guest's");
    drop(fe);
}
