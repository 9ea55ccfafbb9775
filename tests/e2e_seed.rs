//! The short version of `vutap-vm seed` for CI: QEMU 10, 1 queue pair, 1 stream, 2 s
//! per iperf3 run, both topologies (internal: guest to guest through a bridge-mode macvtap;
//! external: guest to the peer netns), both backends (vutap, QEMU's tap backend), plus the VEPA
//! isolation check. Every cell must produce a number and a datapath CPU figure, bridge-mode
//! guests must reach each other, VEPA guests must not (until the far end hairpins). About 2
//! minutes on the 2-core host.
//!
//! Needs root, `scripts/install-deps.sh` and a built `vutap` (`cargo build --release -p vutap`).

use vutap_bench::seed::{self, SeedPath, SeedPlan};
use vutap_testbed::QemuVersion;

#[test]
fn test_e2e_seed_quick_every_cell_has_a_number_and_vepa_isolates() {
    let _ = env_logger::builder().is_test(true).try_init();
    let plan = SeedPlan {
        qemus: vec![QemuVersion::V10],
        paths: vec![SeedPath::Internal, SeedPath::External],
        queues: vec![1],
        streams: vec![1],
        seconds: 2,
        rounds: 1,
        intx_baseline: false,
        vepa_check: true,
        tag: "e2e-seed".into(),
    };
    let report = seed::run(&plan).expect("seed run");
    eprintln!("{}", seed::markdown(&report));
    // 2 paths x 2 directions, each with a vutap and a QEMU tap number.
    assert_eq!(report.cells.len(), 4, "{:?}", report.cells);
    for c in &report.cells {
        for (what, v) in [("vutap", c.vutap), ("QEMU tap", c.qemu_tap)] {
            assert!(
                v.is_some_and(|g| g > 0.0),
                "{} {} {what}: no throughput; measurements: {:#?}",
                c.path,
                c.direction,
                report.measurements
            );
        }
        // The datapath's host CPU was read from /proc: a run moves bytes only if it used some.
        for (what, v) in [("vutap", c.vutap_cpu_per_gb), ("vutap's own part", c.vutap_own_cpu_per_gb), ("QEMU tap", c.qemu_tap_cpu_per_gb)]
        {
            assert!(v.is_some_and(|x| x > 0.0), "{} {} {what}: no datapath CPU per GB; cell: {c:?}", c.path, c.direction);
        }
        assert!(c.vutap_own_cpu_per_gb <= c.vutap_cpu_per_gb, "vutap's part exceeds the whole: {c:?}");
    }
    for g in report.groups.iter().filter(|g| g.path == SeedPath::Internal) {
        assert_eq!(g.a_reaches_b, Some(true), "bridge mode: guest A must reach guest B ({})", g.variant);
    }
    let v = report.vepa.as_ref().expect("VEPA check ran");
    assert!(v.error.is_none(), "VEPA check failed: {:?}", v.error);
    assert!(v.a_reaches_peer && v.b_reaches_peer, "VEPA guests must reach the peer: {v:?}");
    assert!(!v.a_reaches_b && !v.b_reaches_a, "VEPA guests must not reach each other without a hairpin switch: {v:?}");
    assert!(v.a_reaches_b_with_hairpin, "VEPA guests must reach each other through a hairpin switch: {v:?}");
}
