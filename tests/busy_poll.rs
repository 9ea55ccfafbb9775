//! `--busy-poll-us`: after a pass that moved frames, a worker polls for that long before it
//! sleeps, and then sleeps. Checked on the worker thread's own CPU time (from the kernel's
//! schedstat, in ns) around one frame, against a vutap without the option. Needs root (a tap).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use vutap_frontend::{FrontendOptions, NetFrontend, VirtioNetHdr};
use vutap_testbed::Vutap;

/// Nanoseconds the thread called `name` of process `pid` has run so far.
fn thread_cpu_ns(pid: u32, name: &str) -> Option<u64> {
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim_end() == name {
            let stat = std::fs::read_to_string(t.path().join("schedstat")).ok()?;
            return stat.split_whitespace().next()?.parse().ok();
        }
    }
    None
}

/// CPU share of vutap's worker over `window`, starting now.
fn worker_share(pid: u32, window: Duration) -> f64 {
    let a = thread_cpu_ns(pid, "vutap-q0").expect("worker thread vutap-q0");
    let t0 = Instant::now();
    std::thread::sleep(window);
    let b = thread_cpu_ns(pid, "vutap-q0").expect("worker thread vutap-q0");
    (b - a) as f64 / 1e9 / t0.elapsed().as_secs_f64()
}

/// Sends one frame through a vutap started with `extra`, checks it arrives byte for byte, and
/// returns the worker's CPU share over the 200 ms right after it and over 200 ms a second later.
fn shares_around_one_frame(extra: &[&str]) -> (f64, f64) {
    let name = format!("vbp{}", unique());
    let dir = std::env::temp_dir().join(&name);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("vutap.sock");
    let mut v = Vutap::spawn(&sock, Path::new(&name), 1, extra, &dir).expect("start vutap");
    no_ipv6(&name);
    sh("ip", &["link", "set", &name, "up"]);
    let far = PacketSocket::bind(&name);
    let mut fe = NetFrontend::connect(&sock, FrontendOptions::default()).expect("handshake");
    let frame = test_frame([0x02, 0x77, 0, 0, 0, 1], [0x52, 0x54, 0, 0, 0, 1], 200, 7);
    fe.send_frame(0, &VirtioNetHdr::default(), &frame).unwrap();
    let got = far.recv_matching(Duration::from_secs(5), |f| is_test_frame(f) && f == &frame[..]).expect("the frame at the far side");
    assert_eq!(got, frame, "byte for byte");
    let right_after = worker_share(v.pid(), Duration::from_millis(200));
    std::thread::sleep(Duration::from_secs(1));
    let later = worker_share(v.pid(), Duration::from_millis(200));
    drop(fe);
    v.signal(libc::SIGTERM);
    let _ = v.wait_exit(Duration::from_secs(5));
    let _ = std::fs::remove_dir_all(&dir);
    (right_after, later)
}

#[test]
fn test_busy_poll_polls_after_traffic_then_sleeps() {
    let _g = serial();
    // 400 ms of polling covers the whole first window; by the second it has ended.
    let (polling, after) = shares_around_one_frame(&["--busy-poll-us", "400000"]);
    assert!(polling > 0.5, "the worker should poll right after a frame: {:.0} % of a CPU", polling * 100.0);
    assert!(after < 0.05, "the worker should sleep once the window ended: {:.0} % of a CPU", after * 100.0);
    let (default_after, default_later) = shares_around_one_frame(&[]);
    assert!(
        default_after < 0.05 && default_later < 0.05,
        "without the option the worker sleeps at once: {:.0} % / {:.0} % of a CPU",
        default_after * 100.0,
        default_later * 100.0
    );
}
