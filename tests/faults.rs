//! Faults: the tap goes away or its lower device goes down under traffic, and a peer
//! that does not read. The daemon must log it, not spin, resume when it can, and neither grow
//! without bound nor reorder.
//!
//! Needs root; run with `cargo test -p vutap-tests --test faults`.

mod common;
mod hardening_util;

use std::time::Duration;

use common::*;
use hardening_util::*;
use vutap_frontend::{FrontendOptions, NetFrontend, VirtioNetHdr};

const WAIT: Duration = Duration::from_secs(5);

fn tx(bed: &Bed, fe: &mut NetFrontend, seq: u32) -> bool {
    let out = test_frame(bed.far_mac, bed.guest_mac, 600, seq);
    fe.send_frame(0, &VirtioNetHdr::default(), &out).expect("send_frame");
    bed.far.recv_matching(Duration::from_secs(2), |f| is_test_frame(f) && seq_of(f) == seq).as_deref() == Some(&out[..])
}

#[test]
fn test_fault_tap_deleted_under_traffic_logs_and_idles() {
    capture_logs();
    let _g = serial();
    let bed = Bed::tap(1);
    let mut fe = bed.daemon.connect(FrontendOptions::default());
    assert!(tx(&bed, &mut fe, 1));
    let mark = log_mark();
    sh("ip", &["link", "del", &bed.tap_name]);
    // Traffic keeps coming from the guest.
    for i in 0..20 {
        let f = test_frame(bed.far_mac, bed.guest_mac, 600, 100 + i);
        let _ = fe.send_frame(0, &VirtioNetHdr::default(), &f);
    }
    assert!(logged_since(mark, "tap failed", WAIT), "{}", log_since(mark));
    assert!(wait_until(WAIT, || bed.daemon.total(|c| c.tap_errors) >= 1), "tap error counted");
    let cpu = cpu_share("vutap-q", Duration::from_secs(1));
    assert!(cpu < 0.05, "workers used {:.0}% of a CPU with the tap gone", cpu * 100.0);
    // The frontend can still talk to the daemon and disconnect cleanly.
    drop(fe);
    assert!(!panicked_since(mark));
}

#[test]
fn test_fault_lower_down_then_up_resumes() {
    capture_logs();
    let _g = serial();
    let bed = Bed::macvtap(1, None, false);
    let lower = bed.topo.as_ref().unwrap().lower.clone();
    let mut fe = bed.daemon.connect(FrontendOptions::default());
    assert!(tx(&bed, &mut fe, 1));
    sh("ip", &["link", "set", &lower, "down"]);
    for i in 0..50 {
        let f = test_frame(bed.far_mac, bed.guest_mac, 600, 100 + i);
        let _ = fe.send_frame(0, &VirtioNetHdr::default(), &f);
    }
    let cpu = cpu_share("vutap-q", Duration::from_secs(1));
    assert!(cpu < 0.05, "workers used {:.0}% of a CPU with the lower down", cpu * 100.0);
    // Every frame the guest queued was completed: sent (and dropped by the kernel) or counted.
    let c = || bed.daemon.dev.metrics[0].snapshot();
    assert!(wait_until(WAIT, || c().tx_frames + c().tx_dropped == 51), "{:?}", c());
    sh("ip", &["link", "set", &lower, "up"]);
    assert!(wait_until(Duration::from_secs(10), || tx(&bed, &mut fe, 1000)), "traffic did not resume after the lower came back");
}

#[test]
fn test_fault_guest_not_reading_bounded_and_in_order() {
    capture_logs();
    let _g = serial();
    let bed = Bed::tap(1);
    let mut fe = bed.daemon.connect(FrontendOptions { rx_prefill: false, ..FrontendOptions::default() });
    fe.post_rx_buffers(0, 16).unwrap();
    let rss0 = rss_kib();
    // 3 s of the far end sending while the guest reads nothing.
    let t0 = std::time::Instant::now();
    let mut sent = 0u32;
    while t0.elapsed() < Duration::from_secs(3) {
        for _ in 0..100 {
            bed.far.send(&test_frame(bed.guest_mac, bed.far_mac, 1000, sent));
            sent += 1;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let grown = rss_kib().saturating_sub(rss0);
    assert!(grown < 16 * 1024, "RSS grew by {grown} KiB while the guest was not reading");
    assert!(wait_until(WAIT, || bed.daemon.total(|c| c.rx_no_buffers) > 0), "ran out of RX buffers");
    let cpu = cpu_share("vutap-q", Duration::from_millis(500));
    assert!(cpu < 0.05, "workers used {:.0}% of a CPU waiting for buffers", cpu * 100.0);
    // Drain: whatever arrives comes in order.
    fe.post_rx_buffers(0, usize::MAX).unwrap();
    let mut got = Vec::new();
    while let Ok(Some(fr)) = fe.recv_frame(0, Duration::from_millis(300)) {
        if is_test_frame(&fr.payload) {
            got.push(seq_of(&fr.payload));
        }
    }
    assert!(!got.is_empty());
    assert!(got.windows(2).all(|w| w[0] < w[1]), "RX frames reordered: {got:?}");
    eprintln!("guest not reading: {sent} sent, {} delivered in order, RSS +{grown} KiB", got.len());
}
