//! Operations with real guests (TCG): QEMU restart on the same vutap, vutap SIGKILL + restart
//! under a running guest with a reconnecting chardev (QEMU 7.2 and 10.0), and what QEMU's guest
//! sees when the macvtap's lower loses carrier.
//!
//! Needs root, `scripts/install-deps.sh` and a built `vutap` binary.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use vutap_testbed::{log_dir, Guest, GuestConfig, MacvtapMode, Nic, QemuVersion, Topology, Vutap};

/// The host has 2 cores and each TCG guest wants both: one guest at a time.
static ONE_GUEST: Mutex<()> = Mutex::new(());
const T: Duration = Duration::from_secs(20);

fn boot(topo: &Topology, qemu: QemuVersion, socket: &std::path::Path, dir: &std::path::Path, reconnect: bool) -> Guest {
    let tap = &topo.taps[0];
    let nic = Nic::VhostUser { socket: socket.to_path_buf(), queues: 1, mac: tap.mac.clone() };
    let mut cfg = GuestConfig::new(qemu, nic, dir.to_path_buf());
    cfg.chardev_reconnect = reconnect;
    let mut g = Guest::boot(cfg).expect("guest boots");
    g.configure_ip(tap.guest_ip, topo.prefix_len).unwrap();
    g
}

/// The 0/1 of a `cat .../carrier` output (the console may echo prompts around it).
fn carrier(out: &str) -> String {
    out.split_whitespace().find(|t| *t == "0" || *t == "1").unwrap_or("?").to_string()
}

fn ping_ok(g: &mut Guest, topo: &Topology, what: &str) {
    let p = g.ping(topo.peer_ip, 3).unwrap();
    assert!(p.received > 0, "{what}: no ping replies {p:?}");
}

#[test]
fn test_e2e_ops_qemu_restart_same_vutap_qemu10() {
    let _held = ONE_GUEST.lock().unwrap_or_else(|p| p.into_inner());
    let topo = Topology::new(1, MacvtapMode::Bridge).unwrap();
    let dir = log_dir("e2e-ops-qemu-restart").unwrap();
    let sock = dir.join("vutap.sock");
    let mut v = Vutap::spawn(&sock, &topo.taps[0].dev, 1, &[], &dir).unwrap();
    for round in 0..2 {
        let mut g = boot(&topo, QemuVersion::V10, &sock, &dir, false);
        ping_ok(&mut g, &topo, &format!("boot {round}"));
        drop(g); // QEMU killed: the VM is gone, vutap must serve the next one
    }
    assert!(v.is_running(), "{}", v.log_text());
    assert_eq!(v.log_text().matches("frontend connected").count(), 2);
}

/// Kills vutap with SIGKILL while the peer pings the guest every 100 ms, restarts it, and
/// measures the gap from the missing ping sequence numbers.
fn sigkill_restart(qemu: QemuVersion) {
    let _held = ONE_GUEST.lock().unwrap_or_else(|p| p.into_inner());
    let topo = Topology::new(1, MacvtapMode::Bridge).unwrap();
    let dir = log_dir(&format!("e2e-ops-sigkill-{}", qemu.label())).unwrap();
    let sock = dir.join("vutap.sock");
    let tapdev = topo.taps[0].dev.clone();
    let mut v = Vutap::spawn(&sock, &tapdev, 1, &[], &dir).unwrap();
    let mut g = boot(&topo, qemu, &sock, &dir, true);
    ping_ok(&mut g, &topo, "before restart");
    let _server = topo.iperf_server(5201).unwrap();
    let peer = topo.peer_ip;
    // The peer pings the guest every 100 ms (from the host side: no guest background jobs).
    let (ns, gip) = (topo.netns.clone(), topo.taps[0].guest_ip.to_string());
    let pinger = std::thread::spawn(move || {
        let o = std::process::Command::new("ip")
            .args(["netns", "exec", &ns, "busybox", "ping", "-i", "0.1", "-c", "100", "-W", "1", &gip])
            .output()
            .unwrap();
        format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
    });
    std::thread::sleep(Duration::from_secs(2));
    v.signal(libc::SIGKILL);
    let killed = Instant::now();
    let carrier_while_dead = carrier(&g.run_ok("cat /sys/class/net/eth0/carrier", T).unwrap_or_default());
    // Reap the killed daemon's guard *before* starting the new one: its Drop removes the socket
    // path, which would otherwise unlink the new daemon's socket and leave QEMU nothing to
    // reconnect to.
    drop(v);
    let mut v = Vutap::spawn(&sock, &tapdev, 1, &[], &dir).unwrap();
    let respawn_ms = killed.elapsed().as_millis();
    let out = pinger.join().unwrap();
    let seqs: Vec<u32> = out.lines().filter_map(|l| l.split("seq=").nth(1)?.split_whitespace().next()?.parse().ok()).collect();
    assert!(!seqs.is_empty(), "no ping replies at all:\n{out}");
    let max_gap = seqs.windows(2).map(|w| w[1].saturating_sub(w[0])).max().unwrap_or(0);
    let last = *seqs.last().unwrap();
    eprintln!(
        "{qemu}: SIGKILL -> respawned in {respawn_ms} ms; ping replies {} / 100, largest gap {} ms, last seq {last}, guest carrier while vutap was dead: {}",
        seqs.len(),
        max_gap * 100,
        carrier_while_dead
    );
    assert!(last >= 90, "traffic did not resume after the restart (last reply seq {last}):\n{out}");
    // A fresh iperf3 run goes through the restarted vutap.
    let r = g.iperf3(peer, 5201, 2, 1, false).unwrap();
    assert!(r.received_gbps > 0.0, "no throughput after restart: {r:?}");
    ping_ok(&mut g, &topo, "after restart");
    assert!(v.is_running(), "{}", v.log_text());
    assert!(v.log_text().contains("queue pair 0 started"), "{}", v.log_text());
}

#[test]
fn test_e2e_ops_vutap_sigkill_restart_qemu10() {
    sigkill_restart(QemuVersion::V10);
}

#[test]
fn test_e2e_ops_vutap_sigkill_restart_qemu7() {
    sigkill_restart(QemuVersion::V7);
}

/// vutap sees the macvtap's lower lose carrier; QEMU's virtio-net does not take link status
/// from a vhost-user backend (it does not negotiate CONFIG), so the guest's carrier is recorded
/// (and asserted to stay up, which is what QEMU does) rather than expected to follow.
#[test]
fn test_e2e_ops_link_state_qemu10() {
    let _held = ONE_GUEST.lock().unwrap_or_else(|p| p.into_inner());
    let topo = Topology::new(1, MacvtapMode::Bridge).unwrap();
    let dir = log_dir("e2e-ops-link").unwrap();
    let sock = dir.join("vutap.sock");
    let munix = dir.join("metrics.sock");
    let v = Vutap::spawn(&sock, &topo.taps[0].dev, 1, &["--metrics-unix", munix.to_str().unwrap(), "--link-poll-ms", "50"], &dir).unwrap();
    let mut g = boot(&topo, QemuVersion::V10, &sock, &dir, false);
    ping_ok(&mut g, &topo, "link up");
    assert_eq!(carrier(&g.run_ok("cat /sys/class/net/eth0/carrier", T).unwrap()), "1");
    let stats = || {
        let m = std::process::Command::new(Vutap::binary().unwrap()).args(["stats", munix.to_str().unwrap()]).output().unwrap();
        String::from_utf8_lossy(&m.stdout).to_string()
    };
    std::process::Command::new("ip").args(["link", "set", &topo.lower, "down"]).status().unwrap();
    // Once vutap has seen the carrier loss, a frontend that listens would have been told.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !stats().contains("link down") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let table = stats();
    // Watch the guest's carrier for half a second after vutap saw the loss: it never changes.
    let watch = Instant::now();
    let mut guest_carrier = carrier(&g.run_ok("cat /sys/class/net/eth0/carrier", T).unwrap());
    while guest_carrier == "1" && watch.elapsed() < Duration::from_millis(500) {
        guest_carrier = carrier(&g.run_ok("cat /sys/class/net/eth0/carrier", T).unwrap());
    }
    std::process::Command::new("ip").args(["link", "set", &topo.lower, "up"]).status().unwrap();
    eprintln!("lower down: vutap says {:?}; QEMU 10 guest carrier {}", table.lines().last(), guest_carrier.trim());
    assert!(table.contains("link down"), "vutap saw the carrier loss: {table}");
    assert!(v.log_text().contains("link down"), "{}", v.log_text());
    assert!(v.log_text().contains("CONFIG not negotiated"), "QEMU set up the backend channel without CONFIG: {}", v.log_text());
    assert_eq!(guest_carrier, "1", "QEMU's virtio-net keeps its own link state");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !stats().contains("link up") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    ping_ok(&mut g, &topo, "link back");
}
