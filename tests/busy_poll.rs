//! `--busy-poll-us`: after a pass that moved frames, a worker polls for that long before it
//! sleeps, and then sleeps; `--adaptive-poll-us`: it polls only while frames come soon after each
//! other. Checked on the worker thread's scheduler state, sampled every 250 µs around one frame
//! and under paced frames, against a vutap without the option. A polling worker never sleeps, so
//! it reads runnable (`R`) in every sample, whether it has a CPU or waits for one: the share of
//! such samples does not fall when other load or the hypervisor takes CPU time, as the worker's
//! own CPU time does (a polling worker beside two busy loops on two CPUs gets about half of one).
//! The CPU time (from schedstat) is printed beside it. Needs root (a tap).

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use vutap_frontend::{FrontendOptions, NetFrontend, VirtioNetHdr};
use vutap_testbed::host_cpu::threads;
use vutap_testbed::Vutap;

/// `/proc` directory of the thread called `name` of process `pid`.
fn thread_dir(pid: u32, name: &str) -> Option<std::path::PathBuf> {
    threads(&pid.to_string()).into_iter().find(|t| t.name == name).map(|t| t.dir())
}

/// Nanoseconds the thread at `dir` has run so far.
fn cpu_ns(dir: &Path) -> u64 {
    let stat = std::fs::read_to_string(dir.join("schedstat")).expect("schedstat");
    stat.split_whitespace().next().and_then(|ns| ns.parse().ok()).expect("run time in schedstat")
}

/// Whether the thread at `dir` is runnable (running or waiting for a CPU) rather than asleep.
fn is_runnable(dir: &Path) -> bool {
    let stat = std::fs::read_to_string(dir.join("stat")).expect("stat");
    // The state follows the command name, which is in parentheses and may hold spaces.
    stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next()) == Some('R')
}

/// How vutap's worker spent a stretch of time.
struct Awake {
    /// Share of the samples in which the worker was runnable.
    runnable: f64,
    /// Its CPU time over the wall time.
    cpu: f64,
}

impl std::fmt::Display for Awake {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "runnable in {:.0} % of the samples, {:.0} % of a CPU", self.runnable * 100.0, self.cpu * 100.0)
    }
}

/// Samples the worker of `pid` every 250 µs while `work` runs.
fn watch_worker(pid: u32, work: impl FnOnce()) -> Awake {
    let dir = thread_dir(pid, "vutap-q0").expect("worker thread vutap-q0");
    let done = AtomicBool::new(false);
    let cpu0 = cpu_ns(&dir);
    let t0 = Instant::now();
    let (samples, runnable) = std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let (mut samples, mut runnable) = (0u32, 0u32);
            while !done.load(Ordering::Relaxed) {
                samples += 1;
                runnable += u32::from(is_runnable(&dir));
                std::thread::sleep(Duration::from_micros(250));
            }
            (samples, runnable)
        });
        work();
        done.store(true, Ordering::Relaxed);
        sampler.join().unwrap()
    });
    let cpu = (cpu_ns(&dir) - cpu0) as f64 / 1e9 / t0.elapsed().as_secs_f64();
    assert!(samples >= 20, "too few samples of the worker: {samples}");
    Awake { runnable: f64::from(runnable) / f64::from(samples), cpu }
}

/// A vutap started with `extra` options, a frontend on it and a packet socket on its tap.
struct Rig {
    v: Vutap,
    fe: NetFrontend,
    far: PacketSocket,
    dir: std::path::PathBuf,
    sent: u32,
    /// The metrics socket, if started with one.
    metrics: Option<std::path::PathBuf>,
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
        Rig { v, fe, far, dir, sent: 0, metrics: None }
    }

    /// As [`Rig::start`], with `--busy-poll-us 300000` and a metrics socket.
    fn start_polling_with_metrics() -> Rig {
        let metrics = std::env::temp_dir().join(format!("vbp-metrics-{}.sock", unique()));
        let mut rig = Rig::start(&["--busy-poll-us", "300000", "--metrics-unix", metrics.to_str().unwrap()]);
        rig.metrics = Some(metrics);
        rig
    }

    /// A pair counter (`vutap_<name>_total`) since the start, from the metrics socket.
    fn counter(&self, name: &str) -> u64 {
        let metrics = self.metrics.as_ref().expect("started with a metrics socket");
        let text = vutap::operations::stats::fetch(metrics.to_str().unwrap()).expect("metrics");
        vutap_testbed::scrape::metric_sum(&text, &format!("vutap_{name}_total"), "")
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

    /// How the worker spends its time while a frame goes out about every `every`, for `over`,
    /// and the mean gap between frames it saw (longer than `every` on a slow host).
    fn watch_paced_frames(&mut self, every: Duration, over: Duration) -> (Awake, Duration) {
        // The worker thread starts (and names itself) as the frontend's last message is handled,
        // which the handshake does not wait for: a first frame through it shows it is there.
        self.send_one();
        std::thread::sleep(every);
        let mut frames = 0u32;
        let t0 = Instant::now();
        let awake = watch_worker(self.v.pid(), || {
            while t0.elapsed() < over {
                self.send_one();
                frames += 1;
                std::thread::sleep(every);
            }
        });
        (awake, t0.elapsed() / frames.max(1))
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.v.signal(libc::SIGTERM);
        let _ = self.v.wait_exit(Duration::from_secs(5));
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Some(metrics) = &self.metrics {
            let _ = std::fs::remove_file(metrics);
        }
    }
}

/// Sends one frame through a vutap started with `extra` and watches its worker over the 200 ms
/// right after it and over 200 ms a second later.
fn watch_around_one_frame(extra: &[&str]) -> (Awake, Awake) {
    let mut rig = Rig::start(extra);
    rig.send_one();
    let pid = rig.v.pid();
    let right_after = watch_worker(pid, || std::thread::sleep(Duration::from_millis(200)));
    std::thread::sleep(Duration::from_secs(1));
    let later = watch_worker(pid, || std::thread::sleep(Duration::from_millis(200)));
    (right_after, later)
}

#[test]
fn test_busy_poll_polls_after_traffic_then_sleeps() {
    let _g = serial();
    // 400 ms of polling covers the whole first window; by the second it has ended.
    let (polling, after) = watch_around_one_frame(&["--busy-poll-us", "400000"]);
    assert!(polling.runnable > 0.9, "the worker should poll right after a frame: {polling}");
    assert!(after.runnable < 0.05 && after.cpu < 0.05, "the worker should sleep once the window ended: {after}");
    let (default_after, default_later) = watch_around_one_frame(&[]);
    eprintln!("worker: busy-poll right after a frame {polling}; default right after a frame {default_after}");
    for (when, awake) in [("right after a frame", default_after), ("a second later", default_later)] {
        assert!(awake.runnable < 0.05 && awake.cpu < 0.05, "without the option the worker sleeps at once; {when}: {awake}");
    }
}

#[test]
fn test_adaptive_poll_polls_only_while_the_gaps_are_short() {
    let _g = serial();
    // Frames ~1 ms apart, at most 10 ms of polling: the window grows past the gap and the worker
    // stays awake between frames (a maximum well above the gap, so that a late frame on a busy
    // host, which halves the window, does not shrink it below the gap for long).
    let ms = Duration::from_millis;
    let (dense, _) = Rig::start(&["--adaptive-poll-us", "10000"]).watch_paced_frames(ms(1), ms(400));
    assert!(dense.runnable > 0.7, "short gaps should be polled: {dense}");
    // Frames ~2 ms apart, at most 0.4 ms of polling: every gap is longer, so the window never
    // opens (a fixed 0.4 ms window polls after every frame, ~15 % of the time).
    let (sparse, _) = Rig::start(&["--adaptive-poll-us", "400"]).watch_paced_frames(ms(2), ms(400));
    assert!(sparse.runnable < 0.05 && sparse.cpu < 0.05, "long gaps should not be polled: {sparse}");
    let (fixed, gap) = Rig::start(&["--busy-poll-us", "400"]).watch_paced_frames(ms(2), ms(400));
    // A fixed window polls 0.4 ms after each frame: that share of the gap the frames really had
    // (a slow host stretches it), of which at least half shows in the samples.
    let polled_share = (0.4e-3 / gap.as_secs_f64()).min(1.0);
    eprintln!("worker: dense adaptive {dense}; sparse adaptive {sparse}; sparse fixed {fixed}, frames {gap:?} apart");
    assert!(
        fixed.runnable > 0.5 * polled_share && fixed.runnable > 2.0 * sparse.runnable,
        "a fixed window polls after every frame ({gap:?} apart): {fixed}, against adaptive {sparse}"
    );
}

/// While its poll window is open a polling worker looks at the TX ring itself, as vhost-net's
/// busyloop does, so the guest sends frames without kicking (an eventfd write, a system call on
/// the guest's side and a wake-up of the worker); once the window has closed it asks for kicks
/// again, and a frame sent then still goes out.
#[test]
fn test_busy_poll_takes_frames_from_the_ring_without_kicks() {
    let _g = serial();
    let mut rig = Rig::start_polling_with_metrics();
    let kicks = |rig: &Rig| rig.counter("kicks");
    // The first frame finds the worker asleep and kicks it; each pass re-opens the window.
    // (The worker adds up its counters after the pass that sent the frame: wait for them.)
    rig.send_one();
    assert!(wait_until(Duration::from_secs(5), || kicks(&rig) >= 1), "the first frame kicked");
    let before = kicks(&rig);
    for _ in 0..20 {
        rig.send_one();
    }
    let polled = kicks(&rig) - before;
    assert_eq!(polled, 0, "20 frames sent while the worker polled: {polled} kicks");
    // After the window: the worker asked for kicks before it slept, and the next frame wakes it.
    std::thread::sleep(Duration::from_millis(600));
    let before = kicks(&rig);
    rig.send_one();
    assert!(wait_until(Duration::from_secs(5), || kicks(&rig) > before), "a frame after the window kicks the sleeping worker");
    assert_eq!(kicks(&rig) - before, 1);
}

/// While its poll window is open a polling worker looks at the tap by reading it, which takes a
/// frame that is there in the one system call epoll_wait would spend saying so; every few looks
/// go through epoll_wait, which also sees the stop request. Frames from the network arrive
/// byte for byte, most of them found by such a read.
#[test]
fn test_busy_poll_reads_frames_from_the_tap_without_epoll() {
    let _g = serial();
    let mut rig = Rig::start_polling_with_metrics();
    // A frame out opens the window (and shows the worker is there).
    rig.send_one();
    assert!(wait_until(Duration::from_secs(5), || rig.counter("tx_frames") == 1), "the first frame counted");
    let before = rig.counter("poll_finds");
    const FRAMES: u32 = 20;
    for seq in 1..=FRAMES {
        let frame = test_frame([0x52, 0x54, 0, 0, 0, 1], [0x02, 0x77, 0, 0, 0, 1], 200, seq);
        rig.far.send(&frame);
        let got = loop {
            let fr = rig.fe.recv_frame(0, Duration::from_secs(5)).expect("recv_frame").expect("the frame on RX");
            if is_test_frame(&fr.payload) {
                break fr.payload;
            }
        };
        assert_eq!(got, frame, "byte for byte");
    }
    assert!(wait_until(Duration::from_secs(5), || rig.counter("rx_frames") >= u64::from(FRAMES)), "RX counted");
    let found = rig.counter("poll_finds") - before;
    // One look in five goes through epoll_wait, and a frame can land in one of those.
    assert!(found >= u64::from(FRAMES) / 2, "{found} of {FRAMES} frames found by a read of the tap");
    eprintln!("{found} of {FRAMES} frames found by a read of the tap");
}
