//! `--busy-poll-us`: after a pass that moved frames, a worker polls for that long before it
//! sleeps, and then sleeps; `--adaptive-poll-us`: it polls only while frames come soon after each
//! other. Checked on the worker thread's own CPU time (from the kernel's schedstat, in ns) around
//! one frame and under paced frames, against a vutap without the option. Needs root (a tap).

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

/// A vutap started with `extra` options, a frontend on it and a packet socket on its tap.
struct Rig {
    v: Vutap,
    fe: NetFrontend,
    far: PacketSocket,
    dir: std::path::PathBuf,
    sent: u32,
}

impl Rig {
    fn start(extra: &[&str]) -> Rig {
        let name = format!("vbp{}", unique());
        let dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("vutap.sock");
        let v = Vutap::spawn(&sock, Path::new(&name), 1, extra, &dir).expect("start vutap");
        no_ipv6(&name);
        sh("ip", &["link", "set", &name, "up"]);
        let far = PacketSocket::bind(&name);
        let fe = NetFrontend::connect(&sock, FrontendOptions::default()).expect("handshake");
        Rig { v, fe, far, dir, sent: 0 }
    }

    /// Sends one frame and checks it arrives byte for byte.
    fn send_one(&mut self) {
        self.sent += 1;
        let frame = test_frame([0x02, 0x77, 0, 0, 0, 1], [0x52, 0x54, 0, 0, 0, 1], 200, self.sent);
        self.fe.send_frame(0, &VirtioNetHdr::default(), &frame).unwrap();
        let got =
            self.far.recv_matching(Duration::from_secs(5), |f| is_test_frame(f) && f == &frame[..]).expect("the frame at the far side");
        assert_eq!(got, frame, "byte for byte");
    }

    /// The worker's CPU share while a frame goes out about every `every`, for `over`.
    fn share_under_paced_frames(&mut self, every: Duration, over: Duration) -> f64 {
        let pid = self.v.pid();
        // The worker thread starts (and names itself) as the frontend's last message is handled,
        // which the handshake does not wait for: a first frame through it shows it is there.
        self.send_one();
        std::thread::sleep(every);
        let a = thread_cpu_ns(pid, "vutap-q0").expect("worker thread vutap-q0");
        let t0 = Instant::now();
        while t0.elapsed() < over {
            self.send_one();
            std::thread::sleep(every);
        }
        let b = thread_cpu_ns(pid, "vutap-q0").expect("worker thread vutap-q0");
        (b - a) as f64 / 1e9 / t0.elapsed().as_secs_f64()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.v.signal(libc::SIGTERM);
        let _ = self.v.wait_exit(Duration::from_secs(5));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Sends one frame through a vutap started with `extra` and returns the worker's CPU share over
/// the 200 ms right after it and over 200 ms a second later.
fn shares_around_one_frame(extra: &[&str]) -> (f64, f64) {
    let mut rig = Rig::start(extra);
    rig.send_one();
    let right_after = worker_share(rig.v.pid(), Duration::from_millis(200));
    std::thread::sleep(Duration::from_secs(1));
    let later = worker_share(rig.v.pid(), Duration::from_millis(200));
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

#[test]
fn test_adaptive_poll_polls_only_while_the_gaps_are_short() {
    let _g = serial();
    // Frames ~1 ms apart, at most 3 ms of polling: the window grows past the gap and the worker
    // stays awake between frames.
    let dense = Rig::start(&["--adaptive-poll-us", "3000"]).share_under_paced_frames(Duration::from_millis(1), Duration::from_millis(400));
    assert!(dense > 0.5, "short gaps should be polled: {:.0} % of a CPU", dense * 100.0);
    // Frames ~2 ms apart, at most 0.4 ms of polling: every gap is longer, so the window never
    // opens (a fixed 0.4 ms window would poll ~15 % of the time).
    let sparse = Rig::start(&["--adaptive-poll-us", "400"]).share_under_paced_frames(Duration::from_millis(2), Duration::from_millis(400));
    assert!(sparse < 0.05, "long gaps should not be polled: {:.0} % of a CPU", sparse * 100.0);
    let fixed = Rig::start(&["--busy-poll-us", "400"]).share_under_paced_frames(Duration::from_millis(2), Duration::from_millis(400));
    eprintln!("worker CPU: dense adaptive {dense:.3}, sparse adaptive {sparse:.3}, sparse fixed {fixed:.3}");
    assert!(fixed > 0.08 && fixed > 2.0 * sparse, "a fixed window polls after every frame: {:.0} % of a CPU", fixed * 100.0);
}
