//! End to end with real guests: QEMU 7.2 and 10.0 (TCG) with a virtio-net NIC on a macvtap,
//! through vutap (vhost-user) or QEMU's own tap backend as the baseline. The guest pings a peer
//! network namespace behind the macvtap's veth lower and runs iperf3 both ways.
//!
//! Needs root, `scripts/install-deps.sh`, and for the vutap tests a built `vutap` binary
//! (`cargo build --release -p vutap`, or `VUTAP_BIN`). The guest image is built on first use.

use std::sync::Mutex;

use vutap_testbed::{Backend, MacvtapMode, QemuVersion, Scenario, Topology};

/// The host has 2 cores and each TCG guest wants both: one guest at a time.
static ONE_GUEST: Mutex<()> = Mutex::new(());

fn e2e(qemu: QemuVersion, backend: Backend, queues: u16) {
    e2e_with(qemu, backend, queues, &[]);
}

fn e2e_with(qemu: QemuVersion, backend: Backend, queues: u16, vutap_args: &[&str]) {
    let _held = ONE_GUEST.lock().unwrap_or_else(|p| p.into_inner());
    let _ = env_logger::builder().is_test(true).try_init();
    let topo = Topology::new(1, MacvtapMode::Bridge).expect("create netns/veth/macvtap topology");
    let tap = topo.taps[0].clone();
    let variant: String = vutap_args.iter().map(|a| a.trim_start_matches('-')).collect::<Vec<_>>().join("-");
    let name = format!("e2e-{backend}-q{}-{queues}q{}{variant}", qemu.label(), if variant.is_empty() { "" } else { "-" });
    let scenario = Scenario {
        qemu,
        backend,
        queues,
        ping_count: 3,
        iperf_secs: 2,
        // With several pairs, 8 hashed flows per pair and direction make it all but certain
        // (a chance of 2^-15 against, per direction) that every pair carries some of them.
        streams: if queues > 1 { 8 * queues } else { 1 },
        spread_flows: queues > 1,
        vutap_args: vutap_args.iter().map(|a| a.to_string()).collect(),
    };
    let out = scenario.run(&topo, &tap, &name).unwrap_or_else(|e| panic!("{name}: {e}"));
    eprintln!(
        "{name}: boot {:.1} s, ping {}/{} avg {:?} ms, tx {:.3} Gbit/s, rx {:.3} Gbit/s",
        out.boot_secs, out.ping.received, out.ping.transmitted, out.ping.avg_ms, out.tx.received_gbps, out.rx.received_gbps
    );
    assert!(out.ping.received > 0, "{name}: no ping replies: {:?}", out.ping);
    assert!(out.tx.received_gbps > 0.0, "{name}: no guest->peer throughput: {:?}", out.tx);
    assert!(out.rx.received_gbps > 0.0, "{name}: no peer->guest throughput: {:?}", out.rx);
    // The datapath's host CPU (what the demo and the seed table report) was read: moving the
    // bytes took some, and vutap's part of it is there exactly when vutap carried them.
    for (dir, used) in [("guest->peer", out.tx_cpu), ("peer->guest", out.rx_cpu)] {
        assert!(used.total_secs > 0.0, "{name} {dir}: no datapath CPU: {used:?}");
        match backend {
            Backend::Vutap => assert!(used.vutap_secs > 0.0 && used.vutap_secs <= used.total_secs, "{name} {dir}: vutap's part: {used:?}"),
            Backend::QemuTap => assert_eq!(used.vutap_secs, 0.0, "{name} {dir}: no vutap runs: {used:?}"),
        }
    }
    eprintln!("{name}: packets per queue pair {:?}", out.per_queue);
    assert_eq!(out.per_queue.len(), usize::from(queues), "{name}: queue pairs the guest driver uses");
    for (pair, q) in out.per_queue.iter().enumerate() {
        assert!(q.rx > 0 && q.tx > 0, "{name}: queue pair {pair} carried nothing one way: {:?}", out.per_queue);
    }
    if vutap_args.contains(&"--io-uring") {
        let log = std::fs::read_to_string(vutap_testbed::log_dir(&name).unwrap().join("vutap.log")).unwrap();
        assert!(log.contains("TX and RX through io_uring"), "{name}: the ring was not set up:\n{log}");
        assert!(!log.contains("with writev from now on"), "{name}: the ring failed:\n{log}");
    }
}

#[test]
fn test_e2e_vutap_qemu7_1q() {
    e2e(QemuVersion::V7, Backend::Vutap, 1);
}

#[test]
fn test_e2e_vutap_qemu7_2q() {
    e2e(QemuVersion::V7, Backend::Vutap, 2);
}

#[test]
fn test_e2e_vutap_qemu10_1q() {
    e2e(QemuVersion::V10, Backend::Vutap, 1);
}

/// TX batches through io_uring with a real guest: TSO frames over several descriptors, both
/// pairs, under seccomp.
#[test]
fn test_e2e_vutap_qemu10_2q_io_uring() {
    e2e_with(QemuVersion::V10, Backend::Vutap, 2, &["--io-uring"]);
}

#[test]
fn test_e2e_vutap_qemu10_2q() {
    e2e(QemuVersion::V10, Backend::Vutap, 2);
}

// Baselines: the same harness through QEMU's built-in tap backend on the same kind of macvtap.

#[test]
fn test_e2e_qemutap_qemu7_1q() {
    e2e(QemuVersion::V7, Backend::QemuTap, 1);
}

#[test]
fn test_e2e_qemutap_qemu7_2q() {
    e2e(QemuVersion::V7, Backend::QemuTap, 2);
}

#[test]
fn test_e2e_qemutap_qemu10_1q() {
    e2e(QemuVersion::V10, Backend::QemuTap, 1);
}

#[test]
fn test_e2e_qemutap_qemu10_2q() {
    e2e(QemuVersion::V10, Backend::QemuTap, 2);
}
