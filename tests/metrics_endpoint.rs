//! The Prometheus endpoint against clients that do not play along: idle connections,
//! slow-loris requests (a byte at a time) and more connections than the endpoint keeps open
//! must not delay a scrape; those clients are closed at their deadline. And the shipped Grafana
//! dashboard queries only metrics that vutap exports.
//!
//! Needs root (netns, veth, macvtap via the testbed) and a built `vutap` binary (`VUTAP_BIN`
//! picks another one, e.g. to measure an older build).

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vutap_testbed::{free_port, log_dir, workspace_root, MacvtapMode, Topology, Vutap};

static SERIAL: Mutex<()> = Mutex::new(());

/// Prometheus' default scrape timeout; a scrape that takes longer is lost.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a scrape may take with every hostile client below connected. Unloaded it takes about a
/// millisecond; the bound leaves room for a machine busy with other builds.
const SCRAPE_BOUND: Duration = Duration::from_millis(1500);

/// The endpoint's per-connection deadline (`CONNECTION_DEADLINE` in metrics_server.rs).
const CONNECTION_DEADLINE: Duration = Duration::from_secs(5);

/// GET /metrics; returns the whole response and how long it took.
fn scrape(port: u16) -> (String, Duration) {
    let started = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(SCRAPE_TIMEOUT)).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: text/plain\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap_or_else(|e| panic!("scrape not answered within {SCRAPE_TIMEOUT:?}: {e}"));
    (out, started.elapsed())
}

/// True once the peer has closed `s` (EOF or reset), waiting at most `within`.
fn closed_by_peer(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue, // a 400 for a head cut short, then EOF
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => return false,
            Err(_) => return true,
        }
    }
}

fn spawn_vutap(name: &str, topo: &Topology) -> (Vutap, u16, std::path::PathBuf) {
    let dir = log_dir(name).unwrap();
    let port = free_port();
    let munix = dir.join("metrics.sock");
    let v = Vutap::spawn(
        &dir.join("vutap.sock"),
        &topo.taps[0].dev,
        1,
        &["--metrics-addr", &format!("127.0.0.1:{port}"), "--metrics-unix", munix.to_str().unwrap()],
        &dir,
    )
    .unwrap();
    // The socket exists once vutap serves; the metrics thread starts just before it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "metrics endpoint never listened:\n{}", v.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    (v, port, munix)
}

#[test]
fn test_metrics_scrape_not_stalled_by_idle_slowloris_or_too_many_clients() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let topo = Topology::new(1, MacvtapMode::Bridge).unwrap();
    let (mut v, port, munix) = spawn_vutap("metrics-stall", &topo);
    let device = format!("device=\"{}\"", topo.taps[0].ifname);

    let (_, quiet) = scrape(port);
    // 48 idle + 24 slow-loris: more than the 64 connections the endpoint keeps.
    let mut idle: Vec<TcpStream> = (0..48).map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap()).collect();
    let mut loris: Vec<TcpStream> = (0..24).map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap()).collect();
    let unix_idle: Vec<UnixStream> = (0..8).map(|_| UnixStream::connect(&munix).unwrap()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let dripper = {
        let mut streams: Vec<TcpStream> = loris.iter().map(|s| s.try_clone().unwrap()).collect();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let head = b"GET /metrics HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
            for &byte in head.iter().cycle() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                for s in &mut streams {
                    let _ = s.write(&[byte]);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    // Let every hostile connection be accepted and the drip start.
    std::thread::sleep(Duration::from_millis(300));

    let mut worst = Duration::ZERO;
    for _ in 0..5 {
        let (text, took) = scrape(port);
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains(&format!("vutap_queue_pairs{{{device}}} 1\n")), "{text}");
        worst = worst.max(took);
    }
    let started = Instant::now();
    let out = std::process::Command::new(Vutap::binary().unwrap()).args(["stats", munix.to_str().unwrap()]).output().unwrap();
    let stats_took = started.elapsed();
    assert!(out.status.success(), "{out:?}");
    eprintln!(
        "scrape: {quiet:?} alone; worst of 5 with 48 idle + 24 slow-loris TCP and 8 idle unix clients: {worst:?}; vutap stats: {stats_took:?}"
    );
    assert!(worst < SCRAPE_BOUND, "a scrape took {worst:?} with hostile clients connected");
    assert!(stats_took < SCRAPE_BOUND, "vutap stats took {stats_took:?}");

    // Every hostile client is closed by its deadline (or earlier, evicted for a newer one).
    let deadline = Instant::now() + CONNECTION_DEADLINE + Duration::from_secs(3);
    for s in idle.iter_mut().chain(loris.iter_mut()) {
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        assert!(closed_by_peer(s, left), "a hostile connection outlived its deadline");
    }
    stop.store(true, Ordering::Relaxed);
    dripper.join().unwrap();
    drop(unix_idle);
    assert!(v.is_running(), "{}", v.log_text());
}

#[test]
fn test_metrics_bad_requests_answered_and_endpoint_survives() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let topo = Topology::new(1, MacvtapMode::Bridge).unwrap();
    let (mut v, port, _munix) = spawn_vutap("metrics-bad", &topo);
    let ask = |raw: &[u8]| {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(SCRAPE_TIMEOUT)).unwrap();
        s.write_all(raw).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    };
    assert!(ask(b"GET /nope HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
    assert!(ask(b"DELETE /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
    assert!(ask(b"\x00\x01garbage\r\n\r\n").starts_with("HTTP/1.1 400"));
    assert!(ask(&vec![b'A'; 20_000]).starts_with("HTTP/1.1 400"), "an endless head is refused, not buffered");
    // A client that connects and leaves at once.
    drop(TcpStream::connect(("127.0.0.1", port)).unwrap());
    let (text, _) = scrape(port);
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    assert!(v.is_running(), "{}", v.log_text());
}

/// Every `vutap_*` metric name in the PromQL expressions of a Grafana dashboard.
fn queried_metrics(node: &serde_json::Value, out: &mut BTreeSet<String>) {
    match node {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "definition", serde_json::Value::String(e)) => {
                        let mut rest = e.as_str();
                        while let Some(at) = rest.find("vutap_") {
                            let name: String = rest[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                            rest = &rest[at + name.len()..];
                            out.insert(name);
                        }
                    }
                    _ => queried_metrics(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| queried_metrics(v, out)),
        _ => {}
    }
}

#[test]
fn test_metrics_grafana_dashboard_queries_only_exported_metrics() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let path = workspace_root().join("examples/grafana/vutap.json");
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut queried = BTreeSet::new();
    queried_metrics(&dashboard, &mut queried);
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.iter().all(|p| p["targets"].as_array().is_some_and(|t| !t.is_empty())), "a panel without a query");

    let topo = Topology::new(1, MacvtapMode::Bridge).unwrap();
    let (_v, port, _) = spawn_vutap("metrics-grafana", &topo);
    let (text, _) = scrape(port);
    let exported: BTreeSet<String> =
        text.lines().filter_map(|l| l.strip_prefix("# TYPE ")).filter_map(|l| l.split(' ').next()).map(str::to_string).collect();
    let missing: Vec<&String> = queried.difference(&exported).collect();
    assert!(missing.is_empty(), "the dashboard queries metrics vutap does not export: {missing:?}\nexported: {exported:?}");
    let unused: Vec<&String> = exported.difference(&queried).collect();
    eprintln!("dashboard queries {} of {} exported metrics; not shown: {unused:?}", queried.len(), exported.len());
    assert!(queried.len() >= 20, "{queried:?}");
}
