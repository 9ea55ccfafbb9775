//! The benchmark's smoke mode, in-process: one second of 1500 B frames through vutap and through
//! the raw-tap ceiling, both directions. Asserts frames flowed and a report (markdown, JSON, SVG)
//! comes out; no timing assertions. Needs root and a built `vutap` (release or debug).

use vutap_bench::loadgen::{self, report, Arrangement, Backend, Config, Dir};

#[test]
fn test_bench_smoke_reports_nonzero_throughput() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "the bench smoke test needs root (netns, macvtap)");
    let rep = loadgen::run(&Config::smoke()).expect("smoke bench runs");
    let md = report::markdown(&rep);
    eprintln!("{md}");
    for backend in [Backend::Vutap, Backend::Ceiling] {
        for dir in [Dir::Tx, Dir::Rx] {
            let rxbuf = if dir == Dir::Rx && backend == Backend::Vutap { "mrg" } else { "-" };
            let c = rep
                .find(Arrangement::Macvtap, backend, dir, 1500, 1, rxbuf)
                .unwrap_or_else(|| panic!("no {backend:?} {dir:?} case in the report"));
            assert!(c.gbps > 0.0 && c.mpps > 0.0, "{backend:?} {dir:?}: no throughput: {c:?}");
            assert_eq!(c.bad, 0, "{backend:?} {dir:?}: frames failed verification");
            assert!(c.load.cores > 0.0 && c.load_cpus > 0, "{backend:?} {dir:?}: no load-side CPU: {c:?}");
            if backend == Backend::Vutap {
                // vutap's window encloses the far side's; at most the rings' worth in flight differ.
                let k = c.counters.unwrap_or_else(|| panic!("{dir:?}: no vutap counters: {c:?}"));
                let delivered = (c.mpps * c.secs * 1e6).round() as u64;
                assert!(k.frames + 512 >= delivered, "{dir:?}: vutap moved {} frames, {delivered} delivered", k.frames);
                assert!(k.batches > 0 && k.wakeups > 0 && k.frames_per_batch >= 1.0, "{dir:?}: {k:?}");
            }
        }
    }
    let json = serde_json::to_value(&rep).expect("report serialises");
    assert!(json["cases"].as_array().is_some_and(|a| a.len() >= 4));
    assert!(md.contains("vutap % ceiling") && md.contains("wake-ups/f"));
    assert!(report::svg(&rep).starts_with("<svg"));
}
