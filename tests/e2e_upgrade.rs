//! Live upgrade under a real guest (QEMU 10.0 and 7.2, TCG): the peer pings the guest every
//! 10 ms while `vutap upgrade` replaces vutap three times. The guest must not notice: its eth0 keeps its
//! carrier (`carrier_changes` unchanged), QEMU keeps its one vhost-user connection (its chardev
//! has no reconnect here, so a dropped connection would end the traffic for good), and the ping
//! gap is measured. Needs root, `scripts/install-deps.sh` and a built `vutap` binary.

use std::process::Command;
use std::time::Duration;

use vutap_bench::testbed::{
    log_dir, Guest, GuestConfig, MacvtapMode, Nic, QemuVersion, Topology, Vutap,
};

const T: Duration = Duration::from_secs(20);
const UPGRADES: usize = 3;
/// 10 ms pings for 8 s.
const PINGS: u32 = 800;

fn carrier_changes(g: &mut Guest) -> u64 {
    let out = g
        .run_ok("cat /sys/class/net/eth0/carrier_changes", T)
        .unwrap();
    out.split_whitespace()
        .find_map(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("carrier_changes: {out:?}"))
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

/// The host has 2 cores and each TCG guest wants both: one guest at a time.
static ONE_GUEST: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn test_e2e_upgrade_under_ping_qemu10() {
    upgrade_under_ping(QemuVersion::V10);
}

#[test]
fn test_e2e_upgrade_under_ping_qemu7() {
    upgrade_under_ping(QemuVersion::V7);
}

fn upgrade_under_ping(qemu: QemuVersion) {
    let _held = ONE_GUEST.lock().unwrap_or_else(|p| p.into_inner());
    let topo = Topology::new(1, MacvtapMode::Bridge).unwrap();
    let dir = log_dir(&format!("e2e-upgrade-{}", qemu.label())).unwrap();
    let sock = dir.join("vutap.sock");
    let control = dir.join("ctl.sock");
    let first = Vutap::spawn(
        &sock,
        &topo.taps[0].dev,
        1,
        &["--control-socket", control.to_str().unwrap()],
        &dir,
    )
    .unwrap();
    let tap = &topo.taps[0];
    let nic = Nic::VhostUser {
        socket: sock.clone(),
        queues: 1,
        mac: tap.mac.clone(),
    };
    let mut cfg = GuestConfig::new(qemu, nic, dir.clone());
    cfg.chardev_reconnect = false;
    let mut g = Guest::boot(cfg).expect("guest boots");
    g.configure_ip(tap.guest_ip, topo.prefix_len).unwrap();
    let p = g.ping(topo.peer_ip, 3).unwrap();
    assert!(p.received > 0, "no ping replies before the upgrades: {p:?}");
    let changes_before = carrier_changes(&mut g);

    let (ns, gip) = (topo.netns.clone(), tap.guest_ip.to_string());
    let pinger = std::thread::spawn(move || {
        let o = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns,
                "busybox",
                "ping",
                "-i",
                "0.01",
                "-c",
                &PINGS.to_string(),
                "-W",
                "1",
                &gip,
            ])
            .output()
            .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    });
    // Upgrades spread over the ping run, each as soon as the previous one is done.
    let mut pid = first.pid();
    let mut pauses = Vec::new();
    std::thread::sleep(Duration::from_secs(1)); // let the pinger start: pacing, not a condition
    for round in 0..UPGRADES {
        let out = Command::new(Vutap::binary().unwrap())
            .arg("upgrade")
            .arg(&control)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "upgrade {round}: {text}\n{}",
            first.log_text()
        );
        let new: u32 = text
            .split("pid ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next()?.parse().ok())
            .unwrap();
        let pause: f64 = text
            .split("paused ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next()?.parse().ok())
            .unwrap();
        pauses.push(pause);
        let old = pid;
        assert!(
            vutap_tests_wait(|| !alive(old)),
            "old vutap {old} still running"
        );
        pid = new;
        std::thread::sleep(Duration::from_secs(2)); // spread over the run: pacing
    }
    let out = pinger.join().unwrap();
    let seqs: Vec<u32> = out
        .lines()
        .filter_map(|l| {
            l.split("seq=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    let max_gap = seqs
        .windows(2)
        .map(|w| w[1].saturating_sub(w[0]))
        .max()
        .unwrap_or(0);
    let changes_after = carrier_changes(&mut g);
    let p = g.ping(topo.peer_ip, 3).unwrap();
    let qemu_log = g.qemu_log();
    let log = first.log_text();
    drop(g);
    if alive(pid) {
        // SAFETY: kill(2) on the pid the last upgrade reported, alive just above.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        vutap_tests_wait(|| !alive(pid));
    }
    eprintln!(
        "{qemu}: {UPGRADES} live upgrades under 10 ms pings: {} / {PINGS} replies, largest gap {} ms; pause per upgrade {pauses:?} ms; carrier_changes {changes_before} -> {changes_after}",
        seqs.len(),
        max_gap * 10
    );
    assert!(p.received > 0, "no ping replies after the upgrades: {p:?}");
    assert_eq!(
        changes_after, changes_before,
        "the guest's eth0 lost carrier"
    );
    assert_eq!(
        log.matches("frontend connected").count(),
        1,
        "QEMU reconnected:\n{log}"
    );
    assert_eq!(
        log.matches("took over every device").count(),
        UPGRADES,
        "{log}"
    );
    assert!(
        !qemu_log.to_lowercase().contains("disconnect"),
        "QEMU logged a disconnect:\n{qemu_log}"
    );
    assert!(
        seqs.len() as u32 >= PINGS * 95 / 100,
        "only {} of {PINGS} pings answered:\n{out}",
        seqs.len()
    );
    assert!(max_gap * 10 <= 500, "a {} ms ping gap", max_gap * 10);
}

fn vutap_tests_wait(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}
