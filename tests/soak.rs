//! Soak: mixed traffic from the test frontend with random disconnects/reconnects and
//! tap flaps. At the end the process is back to its start: fd count, thread count and RSS (within
//! a margin for allocator caches), no panic logged, every TX frame the guest handed over is
//! accounted for (sent to the tap or counted as dropped), and every RX frame the far end sent is
//! either read by the guest, byte for byte and once, or accounted as lost.
//!
//! `SOAK_SECS` sets the length (default 30, what CI runs); `scripts/soak.sh MINUTES` runs it
//! longer. Needs root; run with `cargo test --release -p vutap-tests --test soak -- --nocapture`.

mod common;
mod hardening_util;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use hardening_util::*;
use vutap_frontend::{FrontendOptions, VirtioNetHdr};

#[test]
fn test_soak_mixed_traffic_reconnects_and_flaps() {
    capture_logs();
    let _g = serial();
    let secs: u64 = std::env::var("SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(30);
    let bed = Bed::tap(2);
    let mark = log_mark();
    let opts = FrontendOptions { queue_pairs: 2, ..FrontendOptions::default() };
    // Warm up once so lazily allocated state (logger, allocator arenas) is in the baseline.
    drop(bed.daemon.connect(opts.clone()));
    bed.daemon.wait_connections_ended(1);
    let (fds0, threads0, rss0) = (fd_count(), thread_count(), rss_kib());
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut rand = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let (mut sent, mut rx_sent, mut rx_got, mut rx_lost, mut conns, mut flaps, mut seq) = (0u64, 0u64, 0u64, 0u64, 0u64, 0u64, 0u32);
    // RX frames sent by the far end and not yet read by the guest: seq -> length.
    let mut outstanding: BTreeMap<u32, usize> = BTreeMap::new();
    let hdr = VirtioNetHdr::default();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(secs) {
        let mut fe = bed.daemon.connect(opts.clone());
        conns += 1;
        let rounds = 1 + rand(20);
        for _ in 0..rounds {
            for pair in 0..2u16 {
                let n = 1 + rand(64) as usize;
                let frames: Vec<Vec<u8>> = (0..n)
                    .map(|_| {
                        seq += 1;
                        test_frame(bed.far_mac, bed.guest_mac, 60 + rand(1454) as usize, seq)
                    })
                    .collect();
                sent += fe.send_batch(pair, &hdr, &frames).expect("send_batch") as u64;
            }
            for _ in 0..rand(16) {
                seq += 1;
                let len = 60 + rand(1454) as usize;
                let f = test_frame(bed.guest_mac, bed.far_mac, len, seq);
                // ENETDOWN while no queue is attached yet or the tap is flapping: skip it.
                if std::fs::read_to_string(format!("/sys/class/net/{}/carrier", bed.tap_name)).is_ok_and(|c| c.trim() == "1")
                    && bed.far.try_send(&f)
                {
                    rx_sent += 1;
                    outstanding.insert(seq, len);
                }
            }
            // Read this round's frames before the tap may flap (on any pair: flows are hashed).
            rx_got += read_rx(&mut fe, &mut outstanding, &bed, Duration::from_secs(2));
            if rand(10) == 0 {
                sh("ip", &["link", "set", &bed.tap_name, "down"]);
                std::thread::sleep(Duration::from_millis(rand(20)));
                sh("ip", &["link", "set", &bed.tap_name, "up"]);
                flaps += 1;
            }
        }
        // Everything handed over is completed before the frontend goes away.
        let expect = sent;
        assert!(
            wait_until(Duration::from_secs(5), || {
                let _ = fe.reclaim_tx(0);
                let _ = fe.reclaim_tx(1);
                bed.daemon.total(|c| c.tx_frames + c.tx_dropped + c.tx_bad_chains) == expect
            }),
            "TX not all completed: {expect} handed over, {:?}",
            bed.daemon.dev.metrics.iter().map(|m| m.snapshot()).collect::<Vec<_>>()
        );
        // Whatever is still on its way is read before the guest goes away; the rest is lost.
        rx_got += read_rx(&mut fe, &mut outstanding, &bed, Duration::from_secs(2));
        rx_lost += outstanding.len() as u64;
        outstanding.clear();
        drop(fe);
    }
    // The warm-up connection plus every soak connection has ended: the counters are final.
    bed.daemon.wait_connections_ended(conns + 1);
    assert!(wait_until(Duration::from_secs(5), || threads_named("vutap-q") == 0), "workers left over");
    let (fds1, threads1, rss1) = (fd_count(), thread_count(), rss_kib());
    let c = |f: fn(&vutap::metrics::PairCounts) -> u64| bed.daemon.total(f);
    let (tx_frames, tx_dropped, tx_bad, rx_frames) = (c(|c| c.tx_frames), c(|c| c.tx_dropped), c(|c| c.tx_bad_chains), c(|c| c.rx_frames));
    eprintln!(
        "SOAK {secs}s: {conns} connections, {flaps} tap flaps; TX {sent} handed over = {tx_frames} sent + {tx_dropped} dropped + {tx_bad} bad; \
         RX {rx_sent} sent by the far end = {rx_got} read by the guest + {rx_lost} lost; vutap delivered {rx_frames}; \
         fds {fds0} -> {fds1}, threads {threads0} -> {threads1}, RSS {rss0} -> {rss1} KiB"
    );
    assert_eq!(sent, tx_frames + tx_dropped + tx_bad, "TX accounting");
    assert_eq!(tx_bad, 0);
    assert!(rx_got > 0, "RX delivered nothing");
    assert_eq!(rx_got + rx_lost, rx_sent, "RX accounting on the guest side");
    // vutap counts the frames it put in guest buffers: all those the guest read, plus any it
    // delivered to a guest that went away first (which are among the lost).
    assert!(rx_got <= rx_frames && rx_frames <= rx_got + rx_lost, "RX accounting: vutap delivered {rx_frames}");
    // Frames are only sent while the tap has carrier and are read before it flaps or the guest
    // disconnects: losing more than a few means RX is broken.
    assert!(rx_lost * 100 <= rx_sent, "{rx_lost} of {rx_sent} RX frames lost");
    assert_eq!(fds1, fds0, "fd count");
    assert_eq!(threads1, threads0, "thread count");
    assert!(rss1 < rss0 + 8 * 1024, "RSS grew from {rss0} to {rss1} KiB");
    assert!(!panicked_since(mark), "a panic was logged");
}

/// The log capture the soak's panic check reads keeps a bounded tail, so a long soak's RSS
/// check measures vutap rather than the log, and still finds a panic line the tail has dropped.
#[test]
fn test_log_capture_is_bounded_and_keeps_every_panic() {
    capture_logs();
    let _g = serial();
    let start = log_mark();
    log::error!("log capture test: thread 'x' panicked at nowhere");
    for i in 0..KEPT_LINES + 10 {
        log::info!("log capture test: line {i}");
    }
    assert_eq!(log_mark(), start + KEPT_LINES + 11, "every line counts towards the marks");
    assert!(panicked_since(start), "the panic line has left the tail but is still found");
    assert!(!panicked_since(start + 1));
    let late = log_mark() - 3;
    assert_eq!(
        log_since(late).lines().collect::<Vec<_>>(),
        (KEPT_LINES + 7..KEPT_LINES + 10).map(|i| format!("INFO soak: log capture test: line {i}")).collect::<Vec<_>>()
    );
    assert!(std::panic::catch_unwind(|| log_since(start)).is_err(), "a mark older than the kept lines fails instead of hiding lines");
}

/// Reads RX frames on both pairs until every outstanding frame arrived or `patience` passed with
/// none arriving; checks each byte for byte against what the far end sent, once. Returns how
/// many test frames it read.
fn read_rx(fe: &mut vutap_frontend::NetFrontend, outstanding: &mut BTreeMap<u32, usize>, bed: &Bed, patience: Duration) -> u64 {
    let mut got = 0;
    while !outstanding.is_empty() {
        let Some((_pair, fr)) = fe.recv_frame_any(patience).expect("recv_frame_any") else { break };
        if !is_test_frame(&fr.payload) {
            continue;
        }
        let seq = seq_of(&fr.payload);
        let len = outstanding.remove(&seq).unwrap_or_else(|| panic!("RX frame seq {seq} read twice or never sent"));
        assert!(fr.payload == test_frame(bed.guest_mac, bed.far_mac, len, seq), "RX frame seq {seq} changed on the way");
        got += 1;
    }
    got
}
