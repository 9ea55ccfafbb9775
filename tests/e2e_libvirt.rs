//! vutap under libvirt, as the README's libvirt section describes it: a TCG domain rendered from
//! `examples/libvirt-domain.xml` (memfd shared memory, `<interface type='vhostuser'>` with a
//! reconnecting `<source>`) on vutap's socket over a macvtap. Boots, pings the peer namespace,
//! runs iperf3, then survives `virsh reboot`, `virsh destroy` + `virsh start`, and vutap being
//! SIGKILLed and restarted under the running domain (the gap is measured).
//!
//! Needs root, `scripts/install-deps.sh` (libvirt 9.0, QEMU 10) and a built `vutap` binary. A
//! missing libvirt fails the test. libvirtd and virtlogd are started if they are not running,
//! and stopped afterwards if this test started them.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vutap_testbed::cmd::run;
use vutap_testbed::libvirt::{
    domain_name, grant_socket_to_qemu, guest_files, render_template, write_emulator, write_file, Daemons, Domain, DomainConsole,
    SerialListener,
};
use vutap_testbed::{log_dir, workspace_root, MacvtapMode, QemuVersion, Topology, Vutap};

/// The template the README shows.
const TEMPLATE: &str = "examples/libvirt-domain.xml";
/// The guest's MAC in the README's before/after example: the macvtap is created with it, so the
/// domain keeps its MAC when it moves from `type='direct'` to vutap.
const DOMAIN_MAC: &str = "52:54:00:6b:3c:58";
const QUEUES: u16 = 2;
/// TCG on a 2-core host shared with other builds and guests: boots can take a minute.
const BOOT: Duration = Duration::from_secs(120);
const T: Duration = Duration::from_secs(30);
const IPERF_PORT: u16 = 5201;

/// `vutap stats` of the daemon's metrics socket: the "N connection(s)" it reports.
fn connections(metrics: &Path) -> u64 {
    let out = Command::new(Vutap::binary().unwrap()).args(["stats", metrics.to_str().unwrap()]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.split(", ").nth(1)?.strip_suffix(" connection(s)")?.parse().ok())
        .unwrap_or_else(|| panic!("no connection count in `vutap stats`: {text}"))
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The guest's one-time set-up after each boot: power button (for `virsh reboot`) and address.
fn set_up_guest(console: &mut DomainConsole, topo: &Topology) {
    console.enable_power_button().unwrap();
    console.configure_ip(topo.taps[0].guest_ip, topo.prefix_len).unwrap();
}

fn ping_ok(console: &mut DomainConsole, topo: &Topology, what: &str) {
    let p = console.ping(topo.peer_ip, 3).unwrap();
    assert!(p.received > 0, "{what}: no ping replies {p:?}\n{}", console.tail(1500));
}

/// Starts vutap the README's way: listening on `sock`, the macvtap by name, the socket handed to
/// the user QEMU runs as.
fn start_vutap(sock: &Path, ifname: &str, metrics: &Path, dir: &Path) -> Vutap {
    let v = Vutap::spawn(sock, Path::new(ifname), QUEUES, &["--metrics-unix", metrics.to_str().unwrap()], dir).unwrap();
    grant_socket_to_qemu(sock).unwrap();
    v
}

#[test]
fn test_readme_shows_the_libvirt_template_verbatim() {
    let root = workspace_root();
    let template = std::fs::read_to_string(root.join(TEMPLATE)).unwrap();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    assert!(readme.contains(&format!("```xml\n{template}```")), "README.md must show {TEMPLATE} verbatim in an ```xml block");
}

#[test]
fn test_e2e_libvirt_domain_on_vutap() {
    let started = Instant::now();
    let _daemons = Daemons::ensure().expect("libvirt (virsh, libvirtd, virtlogd) is installed and starts");
    let topo = Topology::new(1, MacvtapMode::Bridge).unwrap();
    let ifname = topo.taps[0].ifname.clone();
    run("ip", &["link", "set", "dev", &ifname, "address", DOMAIN_MAC]).unwrap();
    let dir = log_dir("e2e-libvirt").unwrap();
    let (sock, metrics) = (dir.join("vutap.sock"), dir.join("metrics.sock"));
    let mut vutap = start_vutap(&sock, &ifname, &metrics, &dir);

    let (kernel, initrd) = guest_files(&dir).unwrap();
    let emulator = write_emulator(QemuVersion::V10, &dir).unwrap();
    let serial = SerialListener::bind(&dir.join("console.sock"), &dir.join("console.log")).unwrap();
    let name = domain_name("e2e");
    let template = std::fs::read_to_string(workspace_root().join(TEMPLATE)).unwrap();
    let xml = render_template(
        &template,
        &[
            ("DOMAIN_TYPE", "qemu"),
            ("NAME", &name),
            ("MEMORY_MIB", "512"),
            ("KERNEL", kernel.to_str().unwrap()),
            ("INITRD", initrd.to_str().unwrap()),
            ("EMULATOR", emulator.to_str().unwrap()),
            ("MAC", DOMAIN_MAC),
            ("SOCKET", sock.to_str().unwrap()),
            ("QUEUES", &QUEUES.to_string()),
            ("CONSOLE", dir.join("console.sock").to_str().unwrap()),
        ],
    )
    .unwrap();
    let xml_path = dir.join("domain.xml");
    write_file(&xml_path, &xml).unwrap();
    let domain = Domain::define(&name, &xml_path).unwrap();

    // 1. Boot, ping, iperf3 both ways.
    domain.start().unwrap_or_else(|e| panic!("{e}\n{}", domain.qemu_log()));
    let boot = Instant::now();
    let mut console = serial.accept(T).unwrap();
    console.wait_ready(0, BOOT).unwrap();
    eprintln!("libvirt: domain booted in {:.1} s", boot.elapsed().as_secs_f64());
    set_up_guest(&mut console, &topo);
    ping_ok(&mut console, &topo, "first boot");
    let _server = topo.iperf_server(IPERF_PORT).unwrap();
    let tx = console.iperf3(topo.peer_ip, IPERF_PORT, 3, false).unwrap();
    let rx = console.iperf3(topo.peer_ip, IPERF_PORT, 3, true).unwrap();
    eprintln!("libvirt: iperf3 guest->peer {:.2} Gbit/s, peer->guest {:.2} Gbit/s", tx.received_gbps, rx.received_gbps);
    assert!(tx.received_gbps > 0.0 && rx.received_gbps > 0.0, "tx {tx:?} rx {rx:?}");
    assert_eq!(connections(&metrics), 1);
    let starts = |v: &Vutap| v.log_text().matches("queue pair 0 started").count();
    let starts_before_reboot = starts(&vutap);

    // 2. virsh reboot: the guest powers off on the ACPI button, libvirt resets the same QEMU,
    // which keeps its vhost-user connection and starts the queues again on it.
    let from = console.mark();
    domain.reboot().unwrap();
    let reboot = Instant::now();
    console.wait_ready(from, BOOT).unwrap_or_else(|e| panic!("{e}\n{}", domain.qemu_log()));
    eprintln!("libvirt: virsh reboot -> shell again in {:.1} s", reboot.elapsed().as_secs_f64());
    set_up_guest(&mut console, &topo);
    ping_ok(&mut console, &topo, "after virsh reboot");
    assert!(starts(&vutap) > starts_before_reboot, "vutap restarted queue pair 0 for the rebooted guest:\n{}", vutap.log_text());
    assert_eq!(connections(&metrics), 1, "virsh reboot keeps QEMU and its connection");

    // 3. virsh destroy + virsh start: a new QEMU, a new connection to the same vutap.
    domain.destroy().unwrap();
    drop(console);
    wait_for("vutap to see QEMU go", T, || vutap.log_text().matches("frontend disconnected").count() == 1);
    domain.start().unwrap_or_else(|e| panic!("{e}\n{}", domain.qemu_log()));
    let mut console = serial.accept(T).unwrap();
    console.wait_ready(0, BOOT).unwrap();
    set_up_guest(&mut console, &topo);
    ping_ok(&mut console, &topo, "after destroy + start");
    assert_eq!(connections(&metrics), 2, "the restarted domain is vutap's second connection");

    // 4. vutap SIGKILLed and restarted under the running domain: QEMU reconnects (timeout='1').
    // The peer pings the guest every 100 ms; the gap is read from the missing sequence numbers.
    const PINGS: u32 = 250;
    let mut pinger = Command::new("ip")
        .args(["netns", "exec", &topo.netns, "busybox", "ping", "-i", "0.1", "-W", "1"])
        .args(["-c", &PINGS.to_string(), &topo.taps[0].guest_ip.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (seq_tx, seq_rx) = mpsc::channel();
    let reader = BufReader::new(pinger.stdout.take().unwrap());
    let collect = std::thread::spawn(move || {
        for line in reader.lines().map_while(Result::ok) {
            if let Some(seq) = line.split("seq=").nth(1).and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok()) {
                let _ = seq_tx.send(seq);
            }
        }
    });
    let mut seqs = vec![seq_rx.recv_timeout(T).expect("the peer's pings reach the guest before the kill")];
    vutap.signal(libc::SIGKILL);
    let killed = Instant::now();
    // The killed daemon's guard removes the socket path on drop: drop it before respawning.
    drop(vutap);
    let vutap = start_vutap(&sock, &ifname, &metrics, &dir);
    let respawn_ms = killed.elapsed().as_millis();
    wait_for("QEMU to reconnect and restart the queues", T, || vutap.log_text().contains("queue pair 0 started"));
    let reconnect_ms = killed.elapsed().as_millis();
    seqs.extend(seq_rx.iter());
    let _ = pinger.wait();
    collect.join().unwrap();
    let max_gap = seqs.windows(2).map(|w| w[1].saturating_sub(w[0])).max().unwrap_or(0);
    let last = *seqs.last().unwrap();
    eprintln!(
        "libvirt: vutap SIGKILL -> respawned in {respawn_ms} ms, queues running again after {reconnect_ms} ms; \
         {} / {PINGS} replies, largest gap {} ms, last seq {last}",
        seqs.len(),
        max_gap * 100
    );
    assert!(last + 10 >= PINGS, "traffic did not resume after the restart (last reply seq {last})\n{}", vutap.log_text());
    assert_eq!(connections(&metrics), 1, "QEMU reconnected to the new vutap");
    ping_ok(&mut console, &topo, "after vutap restart");
    assert!(vutap.log_text().contains("queue pair 0 started"), "{}", vutap.log_text());
    assert_eq!(domain.state().unwrap(), "running");

    drop(console);
    drop(domain);
    eprintln!("libvirt: whole run {:.0} s", started.elapsed().as_secs_f64());
}
