//! Operations without a guest: SIGTERM/SIGINT, several devices in one process, Prometheus
//! metrics and `vutap stats`, `--user`, link state through the backend request channel (with the
//! test frontend), and the shipped examples (config file, systemd unit).
//!
//! Needs root (netns, veth, macvtaps via the testbed) and a built `vutap` binary.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use vhost::vhost_user::VhostUserFrontend;
use vhost::vhost_user::VhostUserProtocolFeatures;
use vutap_frontend::{FrontendOptions, NetFrontend, VirtioNetHdr};
use vutap_testbed::scrape::{http_get, metric, read_backend_req, vutap_stats as stats};
use vutap_testbed::{free_port, log_dir, workspace_root, MacvtapMode, Topology, Vutap};

static SERIAL: Mutex<()> = Mutex::new(());

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn broadcast_frame(src: [u8; 6]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x88, 0xb5]);
    f.resize(64, 0xab);
    f
}

fn mac_of(s: &str) -> [u8; 6] {
    vutap_testbed::frames::parse_mac(s).unwrap_or_else(|| panic!("bad MAC {s:?}"))
}

#[test]
fn test_ops_sigterm_and_sigint_remove_socket_and_exit_0() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let topo = Topology::new(1, MacvtapMode::Bridge).unwrap();
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let dir = log_dir(&format!("ops-signal-{sig}")).unwrap();
        let sock = dir.join("vutap.sock");
        let metrics = dir.join("metrics.sock");
        let mut v = Vutap::spawn(&sock, &topo.taps[0].dev, 1, &["--metrics-unix", metrics.to_str().unwrap()], &dir).unwrap();
        // A connected frontend must not keep it from exiting.
        let _fe = NetFrontend::connect(&sock, FrontendOptions::default()).unwrap();
        v.signal(sig);
        let st = v.wait_exit(Duration::from_secs(5)).expect("vutap exits on the signal");
        assert_eq!(st.code(), Some(0), "exit status after signal {sig}: {st}\n{}", v.log_text());
        assert!(!sock.exists(), "socket removed");
        assert!(!metrics.exists(), "metrics socket removed");
        assert!(v.log_text().contains("received: removing sockets"), "{}", v.log_text());
    }
}

#[test]
fn test_ops_multi_device_metrics_stats_and_isolation() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let topo = Topology::new(2, MacvtapMode::Bridge).unwrap();
    let dir = log_dir("ops-multi").unwrap();
    let (sa, sb, sc) = (dir.join("a.sock"), dir.join("b.sock"), dir.join("c.sock"));
    let munix = dir.join("metrics.sock");
    let port = free_port();
    let dev_b = format!("socket={},tap={},queues=2,name=b", sb.display(), topo.taps[1].dev.display());
    let dev_c = format!("socket={},tap=/dev/tap999999,name=c", sc.display());
    let addr = format!("127.0.0.1:{port}");
    let mut v = Vutap::spawn(
        &sa,
        &topo.taps[0].dev,
        1,
        &["--device", &dev_b, "--device", &dev_c, "--metrics-addr", &addr, "--metrics-unix", munix.to_str().unwrap()],
        &dir,
    )
    .unwrap();
    wait_for("socket b", Duration::from_secs(5), || sb.exists());
    // Devices open one after another: c's failure may be logged after b's socket exists.
    wait_for("device c skipped", Duration::from_secs(5), || v.log_text().contains("serving the others"));
    assert!(!sc.exists(), "a device that cannot open is skipped");

    let opts2 = FrontendOptions { queue_pairs: 2, ..FrontendOptions::default() };
    let mut fa = NetFrontend::connect(&sa, FrontendOptions::default()).unwrap();
    let mut fb = NetFrontend::connect(&sb, opts2).unwrap();
    let (ma, mb) = (mac_of(&topo.taps[0].mac), mac_of(&topo.taps[1].mac));
    for _ in 0..5 {
        fa.send_frame(0, &VirtioNetHdr::default(), &broadcast_frame(ma)).unwrap();
        fb.send_frame(1, &VirtioNetHdr::default(), &broadcast_frame(mb)).unwrap();
    }
    let a = topo.taps[0].ifname.clone();
    let la = format!("device=\"{a}\",queue_pair=\"0\"");
    wait_for("tx counters", Duration::from_secs(5), || {
        let t = http_get(port, "/metrics");
        // Bytes too: a pass adds its counters one by one.
        metric(&t, "vutap_tx_frames_total", &la) == Some(5)
            && metric(&t, "vutap_tx_bytes_total", &la) == Some(5 * (64 + 12))
            && metric(&t, "vutap_tx_frames_total", "device=\"b\",queue_pair=\"1\"") == Some(5)
    });
    let text = http_get(port, "/metrics");
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    assert!(text.contains("# TYPE vutap_tx_frames_total counter"), "{text}");
    assert_eq!(metric(&text, "vutap_tx_bytes_total", &la), Some(5 * (64 + 12)), "{text}");
    assert_eq!(metric(&text, "vutap_queue_pairs", "device=\"b\""), Some(2));
    assert_eq!(metric(&text, "vutap_device_connections_total", "device=\"b\""), Some(1));
    assert!(metric(&text, "vutap_kicks_total", &la).unwrap() >= 1, "{text}");
    assert!(http_get(port, "/nope").starts_with("HTTP/1.1 404"));

    for endpoint in [addr.as_str(), munix.to_str().unwrap()] {
        let (code, out) = stats(endpoint);
        assert_eq!(code, 0, "{out}");
        let row = out.lines().find(|l| l.starts_with("b ") && l.split_whitespace().nth(1) == Some("1")).unwrap_or_else(|| panic!("{out}"));
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cols[4], "5", "tx_frames column of b/1: {out}");
        assert!(out.contains(&format!("{a}: link up, 1 connection(s)")), "{out}");
    }

    // Device a loses its macvtap: b keeps working, the process stays up.
    Command::new("ip").args(["link", "del", &a]).status().unwrap();
    fa.send_frame(0, &VirtioNetHdr::default(), &broadcast_frame(ma)).ok();
    // vutap has handled a's frame after the loss: written (a deleted macvtap may still take
    // writes on an open fd), refused or a tap error.
    wait_for("device a's frame after the loss handled", Duration::from_secs(5), || {
        let t = http_get(port, "/metrics");
        let m = |name| metric(&t, name, &la).unwrap_or(0);
        m("vutap_tx_frames_total") + m("vutap_tx_dropped_total") + m("vutap_tap_errors_total") >= 6
    });
    for _ in 0..3 {
        fb.send_frame(0, &VirtioNetHdr::default(), &broadcast_frame(mb)).unwrap();
    }
    wait_for("b still forwarding", Duration::from_secs(5), || {
        metric(&http_get(port, "/metrics"), "vutap_tx_frames_total", "device=\"b\",queue_pair=\"0\"") == Some(3)
    });
    assert!(v.is_running(), "{}", v.log_text());
    drop(fa);
    drop(fb);
}

#[test]
fn test_ops_stats_cli_errors() {
    let (code, out) = stats("127.0.0.1:1");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("cannot reach the metrics endpoint"), "{out}");
    let out = Command::new(Vutap::binary().unwrap()).arg("stats").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

fn proc_status(pid: u32, key: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines().find_map(|l| l.strip_prefix(&format!("{key}:"))).unwrap_or("").trim().to_string()
}

#[test]
fn test_ops_user_drops_to_nobody_without_capabilities() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let topo = Topology::new(1, MacvtapMode::Bridge).unwrap();
    let dir = log_dir("ops-user").unwrap();
    let sock = dir.join("vutap.sock");
    let munix = dir.join("metrics.sock");
    let mut v = Vutap::spawn(&sock, &topo.taps[0].dev, 1, &["--user", "nobody", "--metrics-unix", munix.to_str().unwrap()], &dir).unwrap();
    wait_for("privilege drop", Duration::from_secs(5), || v.log_text().contains("with no capabilities"));
    let pid = v.pid();
    let uid = proc_status(pid, "Uid");
    assert!(uid.split_whitespace().all(|u| u == "65534"), "Uid: {uid}");
    for k in ["CapEff", "CapPrm", "CapBnd", "CapAmb"] {
        assert_eq!(proc_status(pid, k), "0000000000000000", "{k}");
    }
    assert_eq!(proc_status(pid, "NoNewPrivs"), "1");
    // Still a working backend: frames go out through the tap opened before the drop.
    let mut fe = NetFrontend::connect(&sock, FrontendOptions::default()).unwrap();
    let mac = mac_of(&topo.taps[0].mac);
    fe.send_frame(0, &VirtioNetHdr::default(), &broadcast_frame(mac)).unwrap();
    wait_for("tx as nobody", Duration::from_secs(5), || {
        stats(munix.to_str().unwrap()).1.lines().nth(1).is_some_and(|l| l.split_whitespace().nth(4) == Some("1"))
    });
    assert!(v.is_running());
    // Unknown user: refused at start.
    let out = Command::new(Vutap::binary().unwrap())
        .args([
            "--socket",
            dir.join("x.sock").to_str().unwrap(),
            "--tap",
            topo.taps[0].dev.to_str().unwrap(),
            "--user",
            "vutap-no-such-user",
        ])
        .output()
        .unwrap();
    drop(fe);
    drop(v);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such user"), "{out:?}");
}

#[test]
fn test_ops_link_state_config_change_via_backend_channel() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let topo = Topology::new(1, MacvtapMode::Bridge).unwrap();
    let dir = log_dir("ops-link").unwrap();
    let sock = dir.join("vutap.sock");
    let munix = dir.join("metrics.sock");
    let _v = Vutap::spawn(&sock, &topo.taps[0].dev, 1, &["--metrics-unix", munix.to_str().unwrap(), "--link-poll-ms", "50"], &dir).unwrap();
    let mut opts = FrontendOptions::default();
    opts.requested_protocol |= VhostUserProtocolFeatures::BACKEND_REQ;
    let mut fe = NetFrontend::connect(&sock, opts).unwrap();
    assert!(fe.protocol_features().contains(VhostUserProtocolFeatures::BACKEND_REQ | VhostUserProtocolFeatures::CONFIG));
    let (mut ours, theirs) = UnixStream::pair().unwrap();
    fe.vhost().set_backend_request_fd(&theirs).unwrap();
    drop(theirs);
    assert_eq!(fe.config().unwrap().unwrap().status & 1, 1, "link up at start");

    let started = Instant::now();
    Command::new("ip").args(["link", "set", &topo.lower, "down"]).status().unwrap();
    let msg = read_backend_req(&mut ours, Duration::from_secs(3)).expect("CONFIG_CHANGE_MSG after carrier loss");
    let down_ms = started.elapsed().as_millis();
    assert_eq!(msg, (2, 1, 0), "CONFIG_CHANGE_MSG header");
    assert_eq!(fe.config().unwrap().unwrap().status & 1, 0, "STATUS link down");
    let m = stats(munix.to_str().unwrap()).1;
    assert!(m.contains("link down"), "{m}");

    let started = Instant::now();
    Command::new("ip").args(["link", "set", &topo.lower, "up"]).status().unwrap();
    let msg = read_backend_req(&mut ours, Duration::from_secs(3)).expect("CONFIG_CHANGE_MSG after carrier returns");
    let up_ms = started.elapsed().as_millis();
    assert_eq!(msg.0, 2);
    assert_eq!(fe.config().unwrap().unwrap().status & 1, 1, "STATUS link up again");
    eprintln!("link state: carrier loss -> CONFIG_CHANGE_MSG in {down_ms} ms, carrier back -> {up_ms} ms");

    // Without CONFIG negotiated, no message is sent (QEMU's virtio-net case), but STATUS follows.
    drop(fe);
    drop(ours);
}

#[test]
fn test_ops_example_config_file_parses() {
    let path = workspace_root().join("examples/vutap.conf");
    let devices = vutap::cli::parse_config_file(&path, false).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(devices.len(), 2);
    assert_eq!(devices[0].name.as_deref(), Some("vm0"));
    assert_eq!(devices[1].config.queues, 2);
}

#[test]
fn test_ops_systemd_unit_verifies() {
    let unit = workspace_root().join("examples/systemd/vutap@.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    assert!(text.contains("ExecStart="), "{text}");
    assert!(
        Command::new("systemd-analyze").arg("--version").output().is_ok(),
        "systemd-analyze missing: scripts/install-deps.sh installs systemd"
    );
    // verify wants the binary to exist: point ExecStart at the built one.
    let dir = log_dir("ops-systemd").unwrap();
    let copy: PathBuf = dir.join("vutap@vm0.service");
    let bin = Vutap::binary().unwrap();
    std::fs::write(&copy, text.replace("/usr/local/bin/vutap", bin.to_str().unwrap())).unwrap();
    let out = Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&copy).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let problems: Vec<&str> = err.lines().filter(|l| l.contains("vutap@")).collect();
    assert!(out.status.success() && problems.is_empty(), "systemd-analyze verify: {err}");
}
