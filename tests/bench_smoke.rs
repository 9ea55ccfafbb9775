//! The benchmark's smoke mode, in-process: one second of 1500 B frames through vutap and through
//! the raw-tap ceiling, both directions. Asserts frames flowed and a report (markdown, JSON, SVG)
//! comes out; no timing assertions. Needs root and a built `vutap` (release or debug).

use vutap_bench::loadgen::profile::Bucket;
use vutap_bench::loadgen::{self, report, Arrangement, Backend, Config, Dir};

/// One bench at a time: they share the socket path and the pinned CPUs.
static ONE_BENCH: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn test_bench_smoke_reports_nonzero_throughput() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "the bench smoke test needs root (netns, macvtap)");
    let _one = ONE_BENCH.lock().unwrap_or_else(|e| e.into_inner());
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

/// `--profile` in the smoke setting: each TX window's backend gets a split of its CPU per frame,
/// perf's total (samples × period) agrees with the CPU the bench read from /proc for the same
/// window, and the buckets tell the backends apart (only vutap runs a seccomp filter and eventfds).
#[test]
fn test_bench_profile_splits_each_backends_cpu_per_frame() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "the bench profile test needs root (netns, macvtap, perf)");
    loadgen::profile::check_available().expect("perf records here (scripts/install-deps.sh installs linux-perf)");
    let cfg = Config { profile: true, dirs: vec![Dir::Tx], ..Config::smoke() };
    let _one = ONE_BENCH.lock().unwrap_or_else(|e| e.into_inner());
    let rep = loadgen::run(&cfg).expect("profiled smoke bench runs");
    eprintln!("{}", report::markdown(&rep));
    for backend in [Backend::Vutap, Backend::VutapIoUring, Backend::Ceiling] {
        let c = rep.find(Arrangement::Macvtap, backend, Dir::Tx, 1500, 1, "-").unwrap_or_else(|| panic!("no {backend:?} TX case"));
        let p = c.profile.as_ref().unwrap_or_else(|| panic!("{backend:?}: no profile: {c:?}"));
        let ns = |b: Bucket| p.get(&b).copied().unwrap_or(0.0);
        let total: f64 = p.values().sum();
        assert!(
            (total / c.cpu_ns_per_frame - 1.0).abs() < 0.3,
            "{backend:?}: perf saw {total:.0} ns/frame, /proc {:.0}: {p:?}",
            c.cpu_ns_per_frame
        );
        assert!(ns(Bucket::TapCopy) > 0.0 && ns(Bucket::TapPath) > ns(Bucket::TapCopy), "{backend:?}: {p:?}");
        match backend {
            Backend::Ceiling => {
                assert!(ns(Bucket::Seccomp) == 0.0 && ns(Bucket::Eventfd) == 0.0, "the raw loop has no filter, no eventfd: {p:?}")
            }
            Backend::VutapIoUring => assert!(ns(Bucket::IoUring) > 0.0 && ns(Bucket::BackendCode) > 0.0, "{p:?}"),
            _ => assert!(ns(Bucket::Seccomp) > 0.0 && ns(Bucket::BackendCode) > 0.0, "vutap's workers run a seccomp filter: {p:?}"),
        }
    }
}
