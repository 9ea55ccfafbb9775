//! vutap's datapath against real kernel devices, driven by the vhost-user frontend library:
//! a macvtap (bridge mode) on a veth lower whose peer lives in a test namespace, and a plain
//! multi-queue tap vutap creates by name. The far end is an AF_PACKET socket (on the veth peer
//! inside the namespace, or on the tap interface). Frames are compared byte for byte and the
//! backend's per-pair counters are checked exactly.
//!
//! Needs root; run with `cargo test -p vutap-tests --test datapath`.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;
use vutap_frontend::features::{DEFAULT_REQUESTED, NET_F_CSUM, NET_F_GUEST_CSUM, NET_F_GUEST_TSO4, NET_F_HOST_TSO4};
use vutap_frontend::hdr::{GSO_TCPV4, HDR_F_NEEDS_CSUM};
use vutap_frontend::{FrontendOptions, HandshakeOrder, NetFrontend, VirtioNetHdr};

const WAIT: Duration = Duration::from_secs(5);

fn opts(order: HandshakeOrder, pairs: u16) -> FrontendOptions {
    FrontendOptions { order, queue_pairs: pairs, ..FrontendOptions::default() }
}

/// Sends each of `frames` on `pair` and checks it leaves the far end unchanged; then waits for
/// every TX chain to come back.
fn check_tx(bed: &Bed, fe: &mut NetFrontend, pair: u16, frames: &[Vec<u8>]) {
    for f in frames {
        fe.send_frame(pair, &VirtioNetHdr::default(), f).expect("send_frame");
        let seq = seq_of(f);
        let got = bed
            .far
            .recv_matching(WAIT, |g| is_test_frame(g) && seq_of(g) == seq)
            .unwrap_or_else(|| panic!("TX frame seq {seq} ({} B) on pair {pair} never reached the far end", f.len()));
        assert_eq!(got.len(), f.len(), "TX frame seq {seq}: length");
        assert!(got == *f, "TX frame seq {seq} ({} B) changed on the way", f.len());
    }
    let mut done = 0;
    assert!(
        wait_until(WAIT, || {
            done += fe.reclaim_tx(pair).unwrap();
            done == frames.len()
        }),
        "only {done}/{} TX chains returned",
        frames.len()
    );
}

/// Next test frame on `pair` (other frames are skipped), with its header.
fn recv_test(fe: &mut NetFrontend, pair: u16) -> Option<(VirtioNetHdr, Vec<u8>)> {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        let fr = fe.recv_frame(pair, left).expect("recv_frame")?;
        if is_test_frame(&fr.payload) {
            return Some((fr.hdr, fr.payload));
        }
        eprintln!("skipping a non-test frame of {} B on RX", fr.payload.len());
    }
}

/// Injects each of `frames` at the far end and checks it arrives unchanged on pair 0 with a
/// plain header.
fn check_rx(bed: &Bed, fe: &mut NetFrontend, frames: &[Vec<u8>]) {
    for f in frames {
        bed.far.send(f);
        let (hdr, got) = recv_test(fe, 0).unwrap_or_else(|| panic!("RX frame seq {} ({} B) never arrived", seq_of(f), f.len()));
        assert_eq!(seq_of(&got), seq_of(f), "RX order");
        assert_eq!(got.len(), f.len(), "RX frame seq {}: length", seq_of(f));
        assert!(got == *f, "RX frame seq {} changed on the way", seq_of(f));
        assert_eq!((hdr.gso_type, hdr.gso_size), (0, 0), "RX header of a plain frame: {hdr:?}");
    }
}

fn both_ways(bed: &Bed, order: HandshakeOrder) {
    let mut fe = bed.daemon.connect(opts(order, 1));
    assert_eq!(fe.hdr_len(), 12);
    let cfg = fe.config().expect("GET_CONFIG").expect("CONFIG protocol feature");
    assert_eq!(cfg.mac, bed.guest_mac, "config space MAC");
    let tx: Vec<_> =
        [60, 1514, 61, 1000, 1514].iter().enumerate().map(|(i, &l)| test_frame(bed.far_mac, bed.guest_mac, l, i as u32)).collect();
    check_tx(bed, &mut fe, 0, &tx);
    let rx: Vec<_> =
        [60, 1514, 61, 1000, 1514].iter().enumerate().map(|(i, &l)| test_frame(bed.guest_mac, bed.far_mac, l, 100 + i as u32)).collect();
    check_rx(bed, &mut fe, &rx);
}

#[test]
fn test_datapath_macvtap_both_ways_qemu_order() {
    let _g = serial();
    let bed = Bed::macvtap(1, None, false);
    both_ways(&bed, HandshakeOrder::Qemu);
}

#[test]
fn test_datapath_macvtap_both_ways_cloud_hypervisor_order() {
    let _g = serial();
    let bed = Bed::macvtap(1, None, false);
    both_ways(&bed, HandshakeOrder::CloudHypervisor);
}

#[test]
fn test_datapath_tap_both_ways_qemu_order() {
    let _g = serial();
    let bed = Bed::tap(1);
    both_ways(&bed, HandshakeOrder::Qemu);
}

#[test]
fn test_datapath_tap_both_ways_cloud_hypervisor_order() {
    let _g = serial();
    let bed = Bed::tap(1);
    both_ways(&bed, HandshakeOrder::CloudHypervisor);
}

#[test]
fn test_jumbo_macvtap_9014_bytes_both_ways() {
    let _g = serial();
    let bed = Bed::macvtap(1, Some(9000), false);
    assert_eq!(bed.daemon.dev.mtu, 9000, "vutap takes the macvtap's MTU");
    let mut fe = bed.daemon.connect(opts(HandshakeOrder::Qemu, 1));
    let cfg = fe.config().unwrap().unwrap();
    assert_eq!(cfg.mtu, 9000, "MTU announced in the config space");
    check_tx(&bed, &mut fe, 0, &[test_frame(bed.far_mac, bed.guest_mac, 9014, 1), test_frame(bed.far_mac, bed.guest_mac, 60, 2)]);
    let big = test_frame(bed.guest_mac, bed.far_mac, 9014, 3);
    bed.far.send(&big);
    let (hdr, got) = recv_test(&mut fe, 0).expect("9014 B frame on RX");
    assert!(got == big, "jumbo RX frame changed ({} B)", got.len());
    assert!(hdr.num_buffers >= 5, "a 9014 B frame spans 2 KiB mergeable buffers: num_buffers {}", hdr.num_buffers);
}

/// A tap whose MTU is raised while vutap serves it (vutap sized its RX window for the old
/// one): the first jumbo frame is dropped and counted, never delivered cut short; vutap then
/// holds enough mergeable buffers and the next one arrives whole. (Before, the tap copied
/// what fit and the guest got the first 2–4 KiB as if it were the frame.)
#[test]
fn test_jumbo_rx_after_tap_mtu_raised_never_truncated() {
    let _g = serial();
    let bed = Bed::tap(1);
    assert_eq!(bed.daemon.dev.mtu, 1500);
    let mut fe = bed.daemon.connect(opts(HandshakeOrder::Qemu, 1));
    sh("ip", &["link", "set", &bed.tap_name, "mtu", "9000"]);
    let first = test_frame(bed.guest_mac, bed.far_mac, 9014, 1);
    bed.far.send(&first);
    let counts = || bed.daemon.dev.metrics[0].snapshot();
    assert!(wait_until(Duration::from_secs(5), || counts().rx_dropped == 1), "first jumbo frame dropped: {:?}", counts());
    let second = test_frame(bed.guest_mac, bed.far_mac, 9014, 2);
    bed.far.send(&second);
    let (hdr, got) = recv_test(&mut fe, 0).expect("second 9014 B frame on RX");
    assert!(got == second, "the frame the guest gets is the whole second one ({} B)", got.len());
    assert!(hdr.num_buffers >= 5, "spans 2 KiB mergeable buffers: num_buffers {}", hdr.num_buffers);
    assert!(fe.recv_frame(0, Duration::ZERO).expect("recv_frame").is_none(), "nothing else delivered");
    // After the connection ends the workers have flushed every count: they are final.
    drop(fe);
    bed.daemon.wait_connections_ended(1);
    let c = counts();
    assert_eq!((c.rx_frames, c.rx_dropped), (1, 1), "nothing else delivered (no cut-short first frame)");
}

/// Bursts of frames of mixed sizes, long enough for the RX read window to settle, arrive in
/// order and byte for byte; vutap counts exactly the frames the frontend got.
fn rx_bursts(bed: &Bed) {
    let mut fe = bed.daemon.connect(opts(HandshakeOrder::Qemu, 1));
    let sizes = [60, 1514, 200, 90, 1000];
    let mut sent = 0;
    for burst in 0..4u32 {
        let frames: Vec<_> =
            (0..150u32).map(|i| test_frame(bed.guest_mac, bed.far_mac, sizes[i as usize % sizes.len()], burst * 1000 + i)).collect();
        for f in &frames {
            bed.far.send(f);
        }
        sent += frames.len() as u64;
        for f in &frames {
            let (_, got) = recv_test(&mut fe, 0).unwrap_or_else(|| panic!("burst {burst}: frame seq {} never arrived", seq_of(f)));
            assert_eq!(seq_of(&got), seq_of(f), "burst {burst}: RX order");
            assert!(got == *f, "burst {burst}: frame seq {} ({} B) changed on the way", seq_of(f), f.len());
        }
    }
    let received = fe.stats().rx_frames;
    assert!(received >= sent, "{received} frames received, {sent} sent");
    drop(fe);
    bed.daemon.wait_connections_ended(1);
    assert_eq!(bed.daemon.dev.metrics[0].snapshot().rx_frames, received, "vutap's count");
}

#[test]
fn test_datapath_tap_rx_bursts_in_order_byte_for_byte() {
    let _g = serial();
    let bed = Bed::tap(1);
    rx_bursts(&bed);
}

/// The same with `--io-uring`, whose RX reads runs of frames in one `io_uring_enter` and lays
/// out again any frame that did not land where a frame-by-frame read would have put it.
#[test]
fn test_datapath_tap_rx_bursts_through_io_uring_in_order_byte_for_byte() {
    let _g = serial();
    let bed = Bed::tap(1);
    bed.daemon.dev.use_io_uring().expect("an io_uring per tap queue");
    rx_bursts(&bed);
}

// ------------------------------------------------------------------------------- offloads

const TSO_PAYLOAD: usize = 64_000;
const MSS: u16 = 1448;

fn tso_hdr() -> VirtioNetHdr {
    VirtioNetHdr {
        flags: HDR_F_NEEDS_CSUM,
        gso_type: GSO_TCPV4,
        hdr_len: 54,
        gso_size: MSS,
        csum_start: 34,
        csum_offset: 16,
        num_buffers: 0,
    }
}

fn peer_ip(bed: &Bed) -> [u8; 4] {
    bed.topo.as_ref().unwrap().peer_ip.octets()
}

fn guest_ip(bed: &Bed) -> [u8; 4] {
    let mut ip = peer_ip(bed);
    ip[3] = 2;
    ip
}

#[test]
fn test_tso_tx_64k_frame_leaves_as_checksummed_mss_segments() {
    let _g = serial();
    let bed = Bed::macvtap(1, None, true);
    let o = FrontendOptions {
        requested_features: DEFAULT_REQUESTED | NET_F_CSUM | NET_F_HOST_TSO4,
        ..opts(HandshakeOrder::CloudHypervisor, 1)
    };
    let mut fe = bed.daemon.connect(o);
    assert_eq!(fe.acked_features() & (NET_F_CSUM | NET_F_HOST_TSO4), NET_F_CSUM | NET_F_HOST_TSO4, "CSUM + HOST_TSO4 negotiated");
    let data = payload(TSO_PAYLOAD, 7);
    let flow = TcpFlow {
        src_mac: bed.guest_mac,
        dst_mac: bed.far_mac,
        src_ip: guest_ip(&bed),
        dst_ip: peer_ip(&bed),
        sport: 40001,
        dport: 5001,
        seq: 1_000_000,
    };
    let frame = tcp_frame(&flow, &data, false);
    assert_eq!(frame.len(), 54 + TSO_PAYLOAD);
    fe.send_frame(0, &tso_hdr(), &frame).expect("send the 64 KB TSO frame");

    let expected = TSO_PAYLOAD.div_ceil(usize::from(MSS));
    let segs = bed.far.collect(expected + 5, Duration::from_secs(2), |f| parse_tcp(f).is_some_and(|s| s.dport == 5001));
    assert_eq!(segs.len(), expected, "segments of {TSO_PAYLOAD} B at MSS {MSS}");
    let mut joined = Vec::with_capacity(TSO_PAYLOAD);
    for (i, f) in segs.iter().enumerate() {
        let s = parse_tcp(f).unwrap();
        assert_eq!(s.sport, 40001);
        assert_eq!(s.seq, 1_000_000 + joined.len() as u32, "segment {i} in order");
        let want = if i + 1 < expected { usize::from(MSS) } else { TSO_PAYLOAD - (expected - 1) * usize::from(MSS) };
        assert_eq!(s.payload.len(), want, "segment {i} size");
        assert!(s.ip_csum_ok, "segment {i}: bad IPv4 header checksum");
        assert!(s.tcp_csum_ok, "segment {i}: bad TCP checksum");
        joined.extend_from_slice(s.payload);
    }
    assert!(joined == data, "segment payloads are not the original bytes in order");
    drop(fe);
    bed.daemon.wait_connections_ended(1);
    let c = bed.daemon.dev.metrics[0].snapshot();
    assert_eq!((c.tx_frames, c.tx_bytes), (1, 12 + frame.len() as u64), "one GSO frame through the tap");
}

/// Sends one 64 KB TCP GSO frame from the far end (AF_PACKET with PACKET_VNET_HDR) and returns
/// what the frontend got: (header, frame) per arrival, until `TSO_PAYLOAD` bytes of TCP payload.
fn gso_from_peer(bed: &Bed, fe: &mut NetFrontend) -> (Vec<u8>, Vec<(VirtioNetHdr, Vec<u8>)>) {
    let data = payload(TSO_PAYLOAD, 9);
    let flow = TcpFlow {
        src_mac: bed.far_mac,
        dst_mac: bed.guest_mac,
        src_ip: peer_ip(bed),
        dst_ip: guest_ip(bed),
        sport: 5002,
        dport: 40002,
        seq: 77,
    };
    let frame = tcp_frame(&flow, &data, false);
    let mut h = [0u8; 10];
    tso_hdr().write_to(&mut h);
    bed.far.set_vnet_hdr();
    bed.far.send_raw(&[&h[..], &frame].concat(), bed.guest_mac, 0x0800);
    let mut got = Vec::new();
    let mut bytes = 0;
    let deadline = Instant::now() + WAIT;
    while bytes < TSO_PAYLOAD {
        let left = deadline.checked_duration_since(Instant::now()).unwrap_or_else(|| panic!("only {bytes} B of the GSO frame arrived"));
        let Some(fr) = fe.recv_frame(0, left).expect("recv_frame") else { continue };
        if let Some(s) = parse_tcp(&fr.payload).filter(|s| s.dport == 40002) {
            bytes += s.payload.len();
            got.push((fr.hdr, fr.payload));
        }
    }
    assert_eq!(bytes, TSO_PAYLOAD);
    (data, got)
}

#[test]
fn test_gso_rx_with_guest_tso4_arrives_as_one_gso_frame() {
    let _g = serial();
    let bed = Bed::macvtap(1, None, false);
    let o =
        FrontendOptions { requested_features: DEFAULT_REQUESTED | NET_F_GUEST_CSUM | NET_F_GUEST_TSO4, ..opts(HandshakeOrder::Qemu, 1) };
    let mut fe = bed.daemon.connect(o);
    let want = NET_F_GUEST_CSUM | NET_F_GUEST_TSO4;
    assert_eq!(fe.acked_features() & want, want, "GUEST_CSUM + GUEST_TSO4 negotiated");
    let (data, got) = gso_from_peer(&bed, &mut fe);
    // The tap only keeps a GSO frame whole if vutap told it (TUNSETOFFLOAD) the reader copes.
    assert_eq!(got.len(), 1, "one GSO frame expected, got {} pieces", got.len());
    let (hdr, f) = &got[0];
    assert_eq!(hdr.gso_type, GSO_TCPV4, "{hdr:?}");
    assert_eq!(hdr.gso_size, MSS, "{hdr:?}");
    assert_ne!(hdr.flags & HDR_F_NEEDS_CSUM, 0, "partial checksum: {hdr:?}");
    assert_eq!((hdr.csum_start, hdr.csum_offset), (34, 16), "{hdr:?}");
    assert!(hdr.num_buffers > 1, "a 64 KB frame spans many mergeable buffers");
    assert_eq!(f.len(), 54 + TSO_PAYLOAD);
    assert!(parse_tcp(f).unwrap().payload == &data[..], "GSO payload changed");
    drop(fe);
    bed.daemon.wait_connections_ended(1);
    let c = bed.daemon.dev.metrics[0].snapshot();
    assert_eq!((c.rx_frames, c.rx_dropped), (1, 0), "{c:?}");
}

#[test]
fn test_gso_rx_without_guest_tso_arrives_as_checksummed_segments() {
    let _g = serial();
    let bed = Bed::macvtap(1, None, false);
    let mut fe = bed.daemon.connect(opts(HandshakeOrder::CloudHypervisor, 1));
    assert_eq!(fe.acked_features() & (NET_F_GUEST_CSUM | NET_F_GUEST_TSO4), 0);
    let (data, got) = gso_from_peer(&bed, &mut fe);
    assert_eq!(got.len(), TSO_PAYLOAD.div_ceil(usize::from(MSS)), "segments");
    let mut joined = Vec::new();
    for (i, (hdr, f)) in got.iter().enumerate() {
        assert_eq!(hdr.gso_type, 0, "segment {i}: {hdr:?}");
        assert_eq!(hdr.flags & HDR_F_NEEDS_CSUM, 0, "segment {i}: no partial checksums without GUEST_CSUM: {hdr:?}");
        let s = parse_tcp(f).unwrap();
        assert!(s.tcp_csum_ok && s.ip_csum_ok, "segment {i}: checksums");
        assert_eq!(s.seq, 77 + joined.len() as u32, "segment {i} in order");
        joined.extend_from_slice(s.payload);
    }
    assert!(joined == data);
}

// ------------------------------------------------------------------------------- multi-queue

/// `n` UDP flows from the far end to the guest; returns how many arrived on each pair.
fn rx_flows(bed: &Bed, fe: &mut NetFrontend, n: u16) -> Vec<usize> {
    let (gip, pip) = if bed.topo.is_some() { (guest_ip(bed), peer_ip(bed)) } else { ([10, 78, 0, 2], [10, 78, 0, 1]) };
    for i in 0..n {
        bed.far.send(&udp_frame(bed.guest_mac, bed.far_mac, (pip, gip), (20_000 + i, 7000), 100, u32::from(i)));
    }
    let pairs = fe.queue_pairs();
    let mut per_pair = vec![0usize; usize::from(pairs)];
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + WAIT;
    while seen.len() < usize::from(n) && Instant::now() < deadline {
        for p in 0..pairs {
            fe.recv_batch(p, usize::MAX, |_, f| {
                if let Some((sport, 7000)) = udp_ports(f) {
                    assert!(seen.insert(sport), "flow {sport} delivered twice");
                    per_pair[usize::from(p)] += 1;
                }
            })
            .expect("recv_batch");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(seen.len(), usize::from(n), "flows delivered (per pair {per_pair:?})");
    per_pair
}

fn multi_queue(bed: &Bed, pairs: u16, order: HandshakeOrder) {
    let mut fe = bed.daemon.connect(opts(order, pairs));
    assert_eq!(fe.backend_queue_num(), Some(u64::from(pairs) * 2), "GET_QUEUE_NUM");
    for p in 0..pairs {
        let frames: Vec<_> = (0..5).map(|i| test_frame(bed.far_mac, bed.guest_mac, 60 + 300 * i, u32::from(p) * 10 + i as u32)).collect();
        check_tx(bed, &mut fe, p, &frames);
    }
    let per_pair = rx_flows(bed, &mut fe, 64);
    eprintln!("{pairs} pairs: 64 RX flows spread {per_pair:?}");
    // With a boot-seeded hash, 64 flows all on one of 2+ queues has a chance below 2^-63.
    assert!(per_pair.iter().filter(|&&c| c > 0).count() >= 2, "64 flows all hashed to one pair: {per_pair:?}");
    let received = fe.stats().rx_frames as usize;
    drop(fe);
    bed.daemon.wait_connections_ended(1);
    let tx: Vec<u64> = bed.daemon.dev.metrics.iter().map(|m| m.snapshot().tx_frames).collect();
    assert_eq!(tx, vec![5; usize::from(pairs)], "TX frames per pair");
    let rx: Vec<usize> = bed.daemon.dev.metrics.iter().map(|m| m.snapshot().rx_frames as usize).collect();
    assert_eq!(rx.iter().sum::<usize>(), received, "backend RX counters add up to what the frontend got: {rx:?}");
    for (p, (&counted, &flows)) in rx.iter().zip(&per_pair).enumerate() {
        assert!(counted >= flows, "pair {p}: vutap counted {counted} frames, the frontend got {flows} test flows there");
    }
}

#[test]
fn test_mq_macvtap_4_pairs_tx_every_pair_rx_no_loss() {
    let _g = serial();
    let bed = Bed::macvtap(4, None, false);
    multi_queue(&bed, 4, HandshakeOrder::CloudHypervisor);
}

#[test]
fn test_mq_tap_2_pairs_tx_every_pair_rx_no_loss() {
    let _g = serial();
    let bed = Bed::tap(2);
    multi_queue(&bed, 2, HandshakeOrder::Qemu);
}

fn one_of_four(bed: &Bed) {
    let mut fe = bed.daemon.connect(opts(HandshakeOrder::Qemu, 1));
    let per_pair = rx_flows(bed, &mut fe, 50);
    assert_eq!(per_pair, vec![50]);
    let received = fe.stats().rx_frames;
    drop(fe);
    bed.daemon.wait_connections_ended(1);
    let rx: Vec<u64> = bed.daemon.dev.metrics.iter().map(|m| m.snapshot().rx_frames).collect();
    assert_eq!(rx, vec![received, 0, 0, 0], "the 3 unused tap queues must be detached");
}

#[test]
fn test_mq_macvtap_one_of_four_pairs_used_loses_nothing() {
    let _g = serial();
    let bed = Bed::macvtap(4, None, false);
    one_of_four(&bed);
}

#[test]
fn test_mq_tap_one_of_four_pairs_used_loses_nothing() {
    let _g = serial();
    let bed = Bed::tap(4);
    one_of_four(&bed);
}

// ------------------------------------------------------------------------------- counters

#[test]
fn test_counters_macvtap_tx_rx_frames_and_bytes_exact() {
    let _g = serial();
    let bed = Bed::macvtap(1, None, false);
    let mut fe = bed.daemon.connect(opts(HandshakeOrder::CloudHypervisor, 1));
    let sizes = [60usize, 1514, 100, 999, 1514, 64, 512, 1400, 60, 1514];
    let tx: Vec<_> = sizes.iter().enumerate().map(|(i, &l)| test_frame(bed.far_mac, bed.guest_mac, l, i as u32)).collect();
    check_tx(&bed, &mut fe, 0, &tx);
    let want_tx_bytes: u64 = sizes.iter().map(|&l| l as u64 + 12).sum();
    let m = &bed.daemon.dev.metrics[0];
    assert!(
        wait_until(WAIT, || (m.snapshot().tx_frames, m.snapshot().tx_bytes) == (sizes.len() as u64, want_tx_bytes)),
        "TX counters {:?}, want {} frames / {want_tx_bytes} B",
        m.snapshot(),
        sizes.len()
    );
    let rx: Vec<_> = sizes.iter().enumerate().map(|(i, &l)| test_frame(bed.guest_mac, bed.far_mac, l, 50 + i as u32)).collect();
    check_rx(&bed, &mut fe, &rx);
    let s = fe.stats();
    assert_eq!(s.rx_frames, sizes.len() as u64, "frames the frontend received (nothing but ours)");
    let want_rx_bytes: u64 = sizes.iter().map(|&l| l as u64 + 12).sum();
    assert_eq!(s.rx_bytes + 12 * s.rx_frames, want_rx_bytes);
    assert!(
        wait_until(WAIT, || (m.snapshot().rx_frames, m.snapshot().rx_bytes) == (sizes.len() as u64, want_rx_bytes)),
        "RX counters {:?}, want {} frames / {want_rx_bytes} B",
        m.snapshot(),
        sizes.len()
    );
    let c = m.snapshot();
    assert_eq!((c.tx_dropped, c.tx_bad_chains, c.rx_dropped, c.rx_bad_chains, c.tap_errors), (0, 0, 0, 0, 0), "{c:?}");
}
