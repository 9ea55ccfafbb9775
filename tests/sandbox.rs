//! seccomp in the running daemon: every thread of a `vutap` process runs under a filter, each
//! kind under its own (counted in /proc/PID/task/*/status: one filter, two for a worker, which
//! stacks its list on its serving thread's), and everything still works under them: frames both
//! ways, the metrics endpoints (TCP and unix), `vutap stats`, the stats summary, link changes
//! reaching the frontend, SIGTERM, and `--user` with `--once`. `--no-seccomp` leaves every
//! thread unfiltered. What each list refuses is tested in `backend/src/operations/sandbox`.
//!
//! Needs root (netns, veth, macvtaps via the testbed) and a built `vutap` binary.

use std::collections::BTreeMap;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use vhost::vhost_user::{VhostUserFrontend, VhostUserProtocolFeatures};
use vutap_frontend::{FrontendOptions, NetFrontend, VirtioNetHdr};
use vutap_testbed::host_cpu::threads;
use vutap_testbed::scrape::{http_get, metric_sum, read_backend_req, vutap_stats as stats};
use vutap_testbed::{free_port, log_dir, MacvtapMode, Topology, Vutap};

static SERIAL: Mutex<()> = Mutex::new(());

const WAIT: Duration = Duration::from_secs(10);

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A broadcast frame from `src` with an experimental ethertype and a sequence number.
fn frame(src: [u8; 6], seq: u8) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x88, 0xb5, seq]);
    f.resize(96, seq ^ 0x5a);
    f
}

/// One thread of a process as /proc shows it.
#[derive(Debug)]
struct Task {
    name: String,
    /// The `Seccomp:` mode: 0 none, 2 filter.
    mode: u32,
    /// `Seccomp_filters:`, how many filters are stacked on the thread.
    filters: u32,
}

fn tasks(pid: u32) -> Vec<Task> {
    let field = |status: &str, key: &str| -> u32 {
        status.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.trim().parse().ok()).unwrap_or(u32::MAX)
    };
    threads(&pid.to_string())
        .into_iter()
        .filter_map(|t| {
            let status = std::fs::read_to_string(t.dir().join("status")).ok()?;
            Some(Task { name: t.name, mode: field(&status, "Seccomp:"), filters: field(&status, "Seccomp_filters:") })
        })
        .collect()
}

/// The kind of a vutap thread, from its name (as /proc shows it, cut to 15 bytes), and how many
/// filters it must carry.
fn kind_of(name: &str) -> (&'static str, u32) {
    match name {
        "vutap" => ("main", 1),
        "vutap-signals" => ("signals", 1),
        "vutap-stats" => ("stats summary", 1),
        n if n.starts_with("vutap-metrics") => ("metrics", 1),
        n if n.starts_with("vutap-link-") => ("link monitor", 1),
        n if n.starts_with("vutap-dev-") => ("control", 1),
        n if n.starts_with("vutap-q") => ("worker", 2),
        _ => ("unknown", 0),
    }
}

/// Every thread of `pid` is filtered with its kind's filters; returns how many threads of each kind.
fn assert_all_filtered(pid: u32) -> BTreeMap<&'static str, usize> {
    let mut kinds = BTreeMap::new();
    let all = tasks(pid);
    for t in &all {
        let (kind, filters) = kind_of(&t.name);
        assert_ne!(kind, "unknown", "a thread vutap does not name: {t:?} (all: {all:?})");
        assert_eq!((t.mode, t.filters), (2, filters), "{kind} thread {t:?} not filtered as it should be (all: {all:?})");
        *kinds.entry(kind).or_default() += 1;
    }
    kinds
}

/// The state letter of /proc/PID/stat (R, S, T...).
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.chars().next()
}

/// What a log must not contain when every thread's list is complete.
fn assert_nothing_refused(log: &str) {
    for bad in ["os error 1)", "Operation not permitted", "panicked", "running unfiltered"] {
        assert!(!log.contains(bad), "{bad:?} in the log:\n{log}");
    }
}

#[test]
fn test_sandbox_every_thread_filtered_and_everything_works_until_sigterm() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let topo = Topology::new(2, MacvtapMode::Bridge).unwrap();
    let dir = log_dir("sandbox-all").unwrap();
    let (sa, sb) = (dir.join("a.sock"), dir.join("b.sock"));
    let munix = dir.join("metrics.sock");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let dev_b = format!("socket={},tap={},queues=2,name=b", sb.display(), topo.taps[1].dev.display());
    let mut v = Vutap::spawn(
        &sa,
        &topo.taps[0].dev,
        1,
        &[
            "--device",
            &dev_b,
            "--metrics-addr",
            &addr,
            "--metrics-unix",
            munix.to_str().unwrap(),
            "--link-poll-ms",
            "50",
            "--stats-interval",
            "1",
        ],
        &dir,
    )
    .unwrap();
    wait_for("socket b", || sb.exists());

    // Device a: one pair and the backend request channel; device b: two pairs.
    let mut opts = FrontendOptions::default();
    opts.requested_protocol |= VhostUserProtocolFeatures::BACKEND_REQ;
    let mut fa = NetFrontend::connect(&sa, opts).unwrap();
    let (mut channel, theirs) = UnixStream::pair().unwrap();
    fa.vhost().set_backend_request_fd(&theirs).unwrap();
    drop(theirs);
    let mut fb = NetFrontend::connect(&sb, FrontendOptions { queue_pairs: 2, ..FrontendOptions::default() }).unwrap();

    // TX on a's worker, through the lower (bridge mode), RX on b's workers: byte for byte.
    let (a, ma) = (topo.taps[0].ifname.clone(), parse_mac(&topo.taps[0].mac));
    let sent: Vec<Vec<u8>> = (0..5).map(|i| frame(ma, i)).collect();
    for f in &sent {
        fa.send_frame(0, &VirtioNetHdr::default(), f).unwrap();
    }
    let mut got = Vec::new();
    let deadline = Instant::now() + WAIT;
    while got.len() < sent.len() && Instant::now() < deadline {
        for pair in 0..2 {
            // Flow hashing picks the queue: accept a frame on either pair; skip the peer's own
            // traffic (IPv6 neighbour discovery and the like).
            if let Some(fr) = fb.recv_frame(pair, Duration::from_millis(20)).unwrap() {
                if fr.payload.get(6..14) == Some(&[&ma[..], &[0x88, 0xb5]].concat()[..]) {
                    got.push(fr.payload);
                }
            }
        }
    }
    got.sort_by_key(|f| f[14]);
    assert_eq!(got, sent, "frames from a, as received on b");

    // Now every thread exists: main, signals, metrics (one for TCP and unix), stats summary, two
    // link monitors, two serving threads and three workers.
    let pid = v.pid();
    let want: BTreeMap<&str, usize> =
        [("main", 1), ("signals", 1), ("metrics", 1), ("stats summary", 1), ("link monitor", 2), ("control", 2), ("worker", 3)].into();
    wait_for("every thread", || tasks(pid).len() == want.values().sum::<usize>());
    assert_eq!(assert_all_filtered(pid), want);

    // Metrics over HTTP and the unix socket, and `vutap stats` on both.
    let la = format!("device=\"{a}\"");
    wait_for("counters", || {
        let t = http_get(port, "/metrics");
        metric_sum(&t, "vutap_tx_frames_total", &la) == 5 && metric_sum(&t, "vutap_rx_frames_total", "device=\"b\"") >= 5
    });
    assert!(http_get(port, "/nope").starts_with("HTTP/1.1 404"));
    for endpoint in [addr.as_str(), munix.to_str().unwrap()] {
        let (code, out) = stats(endpoint);
        assert_eq!(code, 0, "{out}");
        let row = out.lines().find(|l| l.starts_with(&format!("{a} "))).unwrap_or_else(|| panic!("{out}"));
        assert_eq!(row.split_whitespace().nth(4), Some("5"), "tx_frames of {a}: {out}");
    }

    // A link monitor reads the carrier and tells the frontend, both ways.
    Command::new("ip").args(["link", "set", &topo.lower, "down"]).status().unwrap();
    assert_eq!(read_backend_req(&mut channel, WAIT), Some((2, 1, 0)), "CONFIG_CHANGE_MSG after carrier loss");
    assert_eq!(fa.config().unwrap().unwrap().status & 1, 0, "STATUS link down");
    Command::new("ip").args(["link", "set", &topo.lower, "up"]).status().unwrap();
    assert_eq!(read_backend_req(&mut channel, WAIT).map(|m| m.0), Some(2), "CONFIG_CHANGE_MSG after carrier back");

    // The stats summary thread logs.
    wait_for("a stats summary line", || v.log_text().contains(&format!("stats {a}: rx ")));

    // SIGSTOP/SIGCONT (job control, a debugger) interrupts the sleeping link monitors and stats
    // thread; the kernel resumes their sleeps with restart_syscall, which their lists allow.
    v.signal(libc::SIGSTOP);
    wait_for("vutap stopped", || process_state(pid) == Some('T'));
    v.signal(libc::SIGCONT);
    wait_for("vutap running again", || process_state(pid) != Some('T'));
    let summaries = v.log_text().matches(&format!("stats {a}: rx ")).count();
    wait_for("a stats summary after SIGCONT", || v.log_text().matches(&format!("stats {a}: rx ")).count() > summaries);
    assert!(http_get(port, "/metrics").starts_with("HTTP/1.1 200 OK"));

    // Still the same threads, all filtered; then SIGTERM: sockets removed, exit 0.
    assert_eq!(assert_all_filtered(pid), want);
    v.signal(libc::SIGTERM);
    let st = v.wait_exit(WAIT).expect("vutap exits on SIGTERM");
    let log = v.log_text();
    assert_eq!(st.code(), Some(0), "{st}\n{log}");
    assert!(log.contains("SIGTERM received: removing sockets"), "{log}");
    for s in [&sa, &sb, &munix] {
        assert!(!s.exists(), "{} left behind", s.display());
    }
    assert_nothing_refused(&log);
    drop((fa, fb));
}

#[test]
fn test_sandbox_user_and_once_filtered_and_main_thread_ends_the_process() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let topo = Topology::new(1, MacvtapMode::Bridge).unwrap();
    let dir = log_dir("sandbox-user-once").unwrap();
    let sock = dir.join("vutap.sock");
    let munix = dir.join("metrics.sock");
    let mut v = Vutap::spawn(&sock, &topo.taps[0].dev, 1, &["--user", "nobody", "--once", "--metrics-unix", munix.to_str().unwrap()], &dir)
        .unwrap();
    wait_for("privilege drop", || v.log_text().contains("with no capabilities"));
    let mut fe = NetFrontend::connect(&sock, FrontendOptions::default()).unwrap();
    fe.send_frame(0, &VirtioNetHdr::default(), &frame(parse_mac(&topo.taps[0].mac), 1)).unwrap();
    wait_for("tx as nobody", || stats(munix.to_str().unwrap()).1.lines().nth(1).is_some_and(|l| l.split_whitespace().nth(4) == Some("1")));
    let pid = v.pid();
    let want: BTreeMap<&str, usize> =
        [("main", 1), ("signals", 1), ("metrics", 1), ("link monitor", 1), ("control", 1), ("worker", 1)].into();
    wait_for("every thread", || tasks(pid).len() == want.values().sum::<usize>());
    assert_eq!(assert_all_filtered(pid), want);

    // `--once`: the frontend leaves, the serving thread ends, the main thread (under its own
    // filter) joins it, stops the link monitor and ends the process with 0.
    drop(fe);
    let st = v.wait_exit(WAIT).expect("vutap --once exits after its frontend leaves");
    let log = v.log_text();
    assert_eq!(st.code(), Some(0), "{st}\n{log}");
    assert_nothing_refused(&log);
}

#[test]
fn test_sandbox_no_seccomp_leaves_every_thread_unfiltered() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let topo = Topology::new(1, MacvtapMode::Bridge).unwrap();
    let dir = log_dir("sandbox-off").unwrap();
    let sock = dir.join("vutap.sock");
    let munix = dir.join("metrics.sock");
    let v = Vutap::spawn(&sock, &topo.taps[0].dev, 1, &["--no-seccomp", "--metrics-unix", munix.to_str().unwrap()], &dir).unwrap();
    let _fe = NetFrontend::connect(&sock, FrontendOptions::default()).unwrap();
    let pid = v.pid();
    wait_for("a worker", || tasks(pid).iter().any(|t| t.name.starts_with("vutap-q")));
    let all = tasks(pid);
    assert!(all.len() >= 5, "{all:?}");
    assert!(all.iter().all(|t| (t.mode, t.filters) == (0, 0)), "{all:?}");
}

fn parse_mac(s: &str) -> [u8; 6] {
    vutap_testbed::frames::parse_mac(s).unwrap_or_else(|| panic!("bad MAC {s:?}"))
}
