//! Live upgrade (`vutap upgrade`): a new vutap process takes over a running one's devices and
//! connections while the test frontend keeps sending and receiving frames. Checked: the same
//! vhost-user connection throughout (no reconnect), every frame both ways delivered byte for
//! byte (none lost), the pause per upgrade; a failed upgrade (the new binary exits at once,
//! or cannot take the state) leaves the old process serving; a new binary of another state
//! version is refused before anything stops; with no frontend, the listener is handed over.
//! Needs root (a tap) and a built `vutap` binary.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use vutap_frontend::virtqueue::QueueError;
use vutap_frontend::{FrontendError, FrontendOptions, NetFrontend, VirtioNetHdr};
use vutap_testbed::{free_port, log_dir, Vutap};

const WAIT: Duration = Duration::from_secs(10);
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const PEER_MAC: [u8; 6] = [0x02, 0x77, 0x00, 0x00, 0x00, 0x01];
/// Frames per second each way: steady traffic that a few ms of pause cannot overflow (the tap
/// queue holds 500 frames, the TX ring 256).
const PACE: Duration = Duration::from_micros(1000);

fn tx_frame(seq: u32) -> Vec<u8> {
    test_frame([0xff; 6], GUEST_MAC, 60 + (seq as usize % 400), seq)
}

fn rx_frame(seq: u32) -> Vec<u8> {
    test_frame([0xff; 6], PEER_MAC, 60 + (seq as usize % 300), seq)
}

fn http_get(port: u16) -> String {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn device_counter(port: u16, tap: &str, name: &str) -> Option<u64> {
    let key = format!("vutap_device_{name}_total{{device=\"{tap}\"}} ");
    http_get(port).lines().find_map(|l| l.strip_prefix(&key)).and_then(|v| v.trim().parse().ok())
}

fn pair_counter(port: u16, tap: &str, pair: u16, name: &str) -> Option<u64> {
    let key = format!("vutap_{name}_total{{device=\"{tap}\",queue_pair=\"{pair}\"}} ");
    http_get(port).lines().find_map(|l| l.strip_prefix(&key)).and_then(|v| v.trim().parse().ok())
}

/// The vutap process serving now: the one the test spawned, then each one an upgrade started
/// (not the test's child: it is stopped by pid).
struct Serving {
    first: Vutap,
    pid: u32,
}

impl Serving {
    fn alive(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        if self.pid != self.first.pid() && Serving::alive(self.pid) {
            // SAFETY: kill(2) on the pid the upgrade reported, checked alive just above.
            unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
            let pid = self.pid;
            wait_until(Duration::from_secs(3), || !Serving::alive(pid));
        }
    }
}

struct Bed {
    serving: Serving,
    socket: PathBuf,
    control: PathBuf,
    tap: String,
    port: u16,
    dir: PathBuf,
}

impl Bed {
    fn start(name: &str, queues: u16, extra: &[&str]) -> Bed {
        let tap = format!("vup{}", unique());
        assert!(tap.len() < 16);
        let dir = log_dir(&format!("upgrade-{name}")).unwrap();
        let socket = dir.join("vu.sock");
        let control = dir.join("ctl.sock");
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let vutap = Vutap::spawn(
            &socket,
            Path::new(&tap),
            queues,
            &[&["--control-socket", control.to_str().unwrap(), "--metrics-addr", &addr][..], extra].concat(),
            &dir,
        )
        .expect("spawn vutap");
        no_ipv6(&tap);
        sh("ip", &["link", "set", &tap, "up"]);
        let pid = vutap.pid();
        Bed { serving: Serving { first: vutap, pid }, socket, control, tap, port, dir }
    }

    fn log(&self) -> String {
        self.serving.first.log_text()
    }

    /// Runs `vutap upgrade` (with `--binary`, if given): (succeeded, its output).
    fn upgrade(&self, binary: Option<&Path>) -> (bool, String) {
        run_upgrade(&self.control, binary)
    }
}

/// Runs `vutap upgrade CONTROL` (with `--binary`, if given): (succeeded, its output).
fn run_upgrade(control: &Path, binary: Option<&Path>) -> (bool, String) {
    let mut cmd = Command::new(Vutap::binary().unwrap());
    cmd.arg("upgrade").arg(control);
    if let Some(b) = binary {
        cmd.arg("--binary").arg(b);
    }
    let out = cmd.output().expect("run vutap upgrade");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// Spawns a traffic thread whose error is also recorded in `failures` (for a stall's report).
fn spawn_recorded(
    failures: Arc<Mutex<Vec<String>>>,
    f: impl FnOnce() -> Result<(), String> + Send + 'static,
) -> JoinHandle<Result<(), String>> {
    std::thread::spawn(move || {
        let r = f();
        if let Err(e) = &r {
            failures.lock().unwrap().push(e.clone());
        }
        r
    })
}

/// Messages the new process's request parser must handle as the old one did: GET_CONFIG (needs
/// the CONFIG protocol feature acked) and SET_VRING_ENABLE with NEED_REPLY (needs
/// PROTOCOL_FEATURES acked and REPLY_ACK on: the frontend waits for the ack).
fn probe_control_plane(fe: &mut NetFrontend, pairs: u16) -> Result<(), String> {
    use vhost::vhost_user::message::VhostUserHeaderFlag;
    use vhost::vhost_user::VhostUserFrontend;
    match fe.config() {
        Ok(Some(c)) if c.max_virtqueue_pairs == pairs => {}
        other => return Err(format!("GET_CONFIG: {other:?}")),
    }
    fe.vhost().set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    let r = fe.vhost().set_vring_enable(1, true);
    fe.vhost().set_hdr_flags(VhostUserHeaderFlag::empty());
    r.map_err(|e| format!("SET_VRING_ENABLE with NEED_REPLY: {e}"))
}

/// "upgraded: pid N serves every device now (queue pairs paused X ms)" -> (N, X).
fn parse_upgraded(out: &str) -> (u32, f64) {
    let pid = out.split("pid ").nth(1).and_then(|r| r.split_whitespace().next()).and_then(|p| p.parse().ok());
    let pause = out.split("paused ").nth(1).and_then(|r| r.split_whitespace().next()).and_then(|p| p.parse().ok());
    match (pid, pause) {
        (Some(p), Some(ms)) => (p, ms),
        _ => panic!("unexpected `vutap upgrade` output: {out}"),
    }
}

/// Traffic both ways until stopped: the frontend sends TX frames and takes RX frames; a packet
/// socket on the tap sends RX frames and takes TX frames. Every frame is checked byte for byte.
struct Traffic {
    stop: Arc<AtomicBool>,
    tx_sent: Arc<AtomicU32>,
    rx_sent: Arc<AtomicU32>,
    tx_seen: Arc<Mutex<BTreeSet<u32>>>,
    rx_seen: Arc<Mutex<BTreeSet<u32>>>,
    /// The longest time the guest went without an RX frame while the peer kept sending.
    rx_gap: Arc<Mutex<Duration>>,
    /// Control-plane probes asked of the guest thread, and their results.
    probes_asked: Arc<AtomicU32>,
    probes_done: Arc<Mutex<Vec<Result<(), String>>>>,
    /// What made a traffic thread stop early.
    failures: Arc<Mutex<Vec<String>>>,
    guest: JoinHandle<Result<(), String>>,
    peer_tx: JoinHandle<()>,
    peer_rx: JoinHandle<Result<(), String>>,
}

impl Traffic {
    /// With `pairs` queue pairs, TX frames go out on each in turn and RX frames are taken from
    /// any (the tap picks the queue by flow hash).
    fn start(socket: &Path, tap: &str, pairs: u16) -> Traffic {
        let opts = FrontendOptions { queue_pairs: pairs, ..FrontendOptions::default() };
        let fe = NetFrontend::connect(socket, opts).expect("handshake");
        Traffic::start_on(fe, tap, pairs)
    }

    /// [`Traffic::start`] on a frontend already connected.
    fn start_on(mut fe: NetFrontend, tap: &str, pairs: u16) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx_sent, rx_sent) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
        let (tx_seen, rx_seen) = (Arc::new(Mutex::new(BTreeSet::new())), Arc::new(Mutex::new(BTreeSet::new())));
        let rx_gap = Arc::new(Mutex::new(Duration::ZERO));
        let probes_asked = Arc::new(AtomicU32::new(0));
        let probes_done = Arc::new(Mutex::new(Vec::new()));
        let failures = Arc::new(Mutex::new(Vec::new()));
        // Bound before the guest sends its first frame.
        let peer_rx_sock = PacketSocket::bind(tap);

        let guest = {
            let (stop, sent, seen, gap) = (stop.clone(), tx_sent.clone(), rx_seen.clone(), rx_gap.clone());
            let (asked, done) = (probes_asked.clone(), probes_done.clone());
            spawn_recorded(failures.clone(), move || -> Result<(), String> {
                let mut last_rx = Instant::now();
                let mut next_tx = Instant::now();
                // Keeps receiving after the stop until the peer's frames have all come.
                let mut quiet_since: Option<Instant> = None;
                loop {
                    if asked.load(Ordering::SeqCst) as usize > done.lock().unwrap().len() {
                        let r = probe_control_plane(&mut fe, pairs);
                        done.lock().unwrap().push(r);
                    }
                    let stopping = stop.load(Ordering::SeqCst);
                    if !stopping && Instant::now() >= next_tx {
                        let seq = sent.load(Ordering::SeqCst);
                        let sent_now = fe.send_frame((seq % u32::from(pairs)) as u16, &VirtioNetHdr::default(), &tx_frame(seq));
                        match sent_now {
                            Ok(()) => {
                                sent.fetch_add(1, Ordering::SeqCst);
                                next_tx += PACE;
                            }
                            // A full ring (vutap slowed down by the load, or paused): like a
                            // driver, try the same frame again once chains come back.
                            Err(FrontendError::Queue(QueueError::Full { .. })) => {}
                            Err(e) => return Err(format!("send_frame {seq}: {e}")),
                        }
                    }
                    match fe.recv_frame_any(Duration::from_micros(500)).map_err(|e| format!("recv_frame: {e}"))?.map(|(_, f)| f) {
                        Some(f) if is_test_frame(&f.payload) => {
                            let seq = seq_of(&f.payload);
                            if f.payload != rx_frame(seq) {
                                return Err(format!("RX frame {seq} differs in the guest"));
                            }
                            if !seen.lock().unwrap().insert(seq) {
                                return Err(format!("RX frame {seq} delivered twice"));
                            }
                            let now = Instant::now();
                            if !stopping {
                                let mut g = gap.lock().unwrap();
                                *g = (*g).max(now - last_rx);
                            }
                            last_rx = now;
                            quiet_since = None;
                        }
                        Some(_) => {}
                        None if stopping => {
                            let since = *quiet_since.get_or_insert_with(Instant::now);
                            if since.elapsed() > Duration::from_secs(2) {
                                for pair in 0..pairs {
                                    let _ = fe.reclaim_tx(pair);
                                }
                                return Ok(());
                            }
                        }
                        None => {}
                    }
                }
            })
        };
        let peer_tx = {
            let (stop, sent, tap) = (stop.clone(), rx_sent.clone(), tap.to_string());
            std::thread::spawn(move || {
                let sock = PacketSocket::bind(&tap);
                let mut next = Instant::now();
                while !stop.load(Ordering::SeqCst) {
                    let seq = sent.load(Ordering::SeqCst);
                    sock.send(&rx_frame(seq));
                    sent.fetch_add(1, Ordering::SeqCst);
                    next += PACE;
                    if let Some(d) = next.checked_duration_since(Instant::now()) {
                        // Pacing the sender, not waiting for a condition.
                        std::thread::sleep(d);
                    }
                }
            })
        };
        let peer_rx = {
            let (stop, seen, sock) = (stop.clone(), tx_seen.clone(), peer_rx_sock);
            spawn_recorded(failures.clone(), move || -> Result<(), String> {
                loop {
                    let got = sock.recv_matching(Duration::from_secs(2), |f| is_test_frame(f) && f[6..12] == GUEST_MAC);
                    match got {
                        Some(f) => {
                            let seq = seq_of(&f);
                            if f != tx_frame(seq) {
                                return Err(format!("TX frame {seq} differs on the tap"));
                            }
                            if !seen.lock().unwrap().insert(seq) {
                                return Err(format!("TX frame {seq} sent twice"));
                            }
                        }
                        None if stop.load(Ordering::SeqCst) => return Ok(()),
                        None => {}
                    }
                }
            })
        };
        let t = Traffic { stop, tx_sent, rx_sent, tx_seen, rx_seen, rx_gap, probes_asked, probes_done, failures, guest, peer_tx, peer_rx };
        t.wait_for_more(0, 0);
        t
    }

    fn counts(&self) -> (usize, usize) {
        (self.tx_seen.lock().unwrap().len(), self.rx_seen.lock().unwrap().len())
    }

    /// Has the guest thread send control messages on the connection (see
    /// [`probe_control_plane`]) and checks their answers.
    fn probe(&self) {
        let n = self.probes_asked.fetch_add(1, Ordering::SeqCst) as usize + 1;
        assert!(wait_until(WAIT, || self.probes_done.lock().unwrap().len() >= n), "no answer to control messages after an upgrade");
        if let Err(e) = &self.probes_done.lock().unwrap()[n - 1] {
            panic!("control messages after an upgrade: {e}");
        }
    }

    /// Waits until both directions moved at least 20 more frames than `tx`/`rx`.
    fn wait_for_more(&self, tx: usize, rx: usize) {
        let ok = wait_until(WAIT, || {
            let (t, r) = self.counts();
            (t >= tx + 20 && r >= rx + 20) || self.guest.is_finished() || self.peer_rx.is_finished()
        });
        let (t, r) = self.counts();
        assert!(
            ok && !self.guest.is_finished() && !self.peer_rx.is_finished(),
            "traffic stalled at TX {t} / RX {r} frames (from {tx} / {rx}): {:?}",
            self.failures.lock().unwrap()
        );
    }

    /// Stops and checks that every frame sent either way arrived: (tx, rx, longest RX gap).
    fn finish(self) -> (u32, u32, Duration) {
        self.stop.store(true, Ordering::SeqCst);
        self.peer_tx.join().expect("peer sender");
        self.guest.join().expect("guest thread").unwrap_or_else(|e| panic!("guest: {e}"));
        self.peer_rx.join().expect("peer receiver").unwrap_or_else(|e| panic!("peer: {e}"));
        let (tx, rx) = (self.tx_sent.load(Ordering::SeqCst), self.rx_sent.load(Ordering::SeqCst));
        let missing = |seen: &BTreeSet<u32>, n: u32| (0..n).filter(|s| !seen.contains(s)).collect::<Vec<_>>();
        let tx_missing = missing(&self.tx_seen.lock().unwrap(), tx);
        let rx_missing = missing(&self.rx_seen.lock().unwrap(), rx);
        assert!(tx_missing.is_empty(), "{} of {tx} TX frames lost: {:?}", tx_missing.len(), &tx_missing[..tx_missing.len().min(20)]);
        assert!(rx_missing.is_empty(), "{} of {rx} RX frames lost: {:?}", rx_missing.len(), &rx_missing[..rx_missing.len().min(20)]);
        let gap = *self.rx_gap.lock().unwrap();
        (tx, rx, gap)
    }
}

#[test]
fn test_upgrade_under_traffic_keeps_the_connection_and_every_frame() {
    upgrades_under_traffic("traffic", 1, 5);
}

#[test]
fn test_upgrade_with_two_queue_pairs_keeps_every_frame() {
    upgrades_under_traffic("two-pairs", 2, 3);
}

/// `upgrades` live upgrades of a vutap (`--user nobody`, `pairs` queue pairs) while traffic
/// runs both ways; see the module doc for what is checked.
fn upgrades_under_traffic(name: &str, pairs: u16, upgrades: usize) {
    let _g = serial();
    // Stands in for systemd's notify socket: each old process must name its successor the
    // main process (MAINPID) before it exits.
    let notify_path = log_dir(&format!("upgrade-notify-{name}")).unwrap().join("notify.sock");
    let _ = std::fs::remove_file(&notify_path);
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(WAIT)).unwrap();
    // As systemd's own: the old vutap runs as nobody when it sends.
    std::fs::set_permissions(&notify_path, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::env::set_var("NOTIFY_SOCKET", &notify_path);
    let mut bed = Bed::start(name, pairs, &["--user", "nobody"]);
    std::env::remove_var("NOTIFY_SOCKET");
    let traffic = Traffic::start(&bed.socket, &bed.tap, pairs);
    let mut pauses = Vec::new();
    for round in 0..upgrades {
        let old = bed.serving.pid;
        let (ok, out) = bed.upgrade(None);
        assert!(ok, "upgrade {round} failed: {out}\n{}", bed.log());
        let (pid, pause_ms) = parse_upgraded(&out);
        assert_ne!(pid, old);
        bed.serving.pid = pid;
        let mut buf = [0u8; 64];
        let n = notify.recv(&mut buf).expect("MAINPID notification");
        assert_eq!(std::str::from_utf8(&buf[..n]).unwrap(), format!("MAINPID={pid}\n"));
        assert!(wait_until(WAIT, || !Serving::alive(old)), "the old vutap {old} did not exit after upgrade {round}");
        assert!(Serving::alive(pid), "the new vutap {pid} is not running:\n{}", bed.log());
        // Started by an unprivileged process, it runs with no more than that one had. Its main
        // thread installs its own list last, after answering: wait for it.
        let status_path = format!("/proc/{pid}/status");
        wait_until(WAIT, || std::fs::read_to_string(&status_path).is_ok_and(|s| s.contains("Seccomp_filters:\t2")));
        let status = std::fs::read_to_string(&status_path).unwrap();
        for want in [
            "Uid:\t65534\t65534",
            "CapEff:\t0000000000000000",
            "NoNewPrivs:\t1",
            "Seccomp:\t2",
            // The previous process's upgrade list (inherited) and its own: no pile-up.
            "Seccomp_filters:\t2",
        ] {
            assert!(status.contains(want), "new vutap {pid}: no {want:?} in\n{status}");
        }
        pauses.push(pause_ms);
        let (t, r) = traffic.counts();
        traffic.wait_for_more(t, r);
        traffic.probe();
    }
    assert_eq!(bed.serving.first.wait_exit(WAIT).map(|s| s.code()), Some(Some(0)), "the first vutap's exit status");
    // Same connection: one accepted in all, none ended (device counters carry over).
    assert_eq!(device_counter(bed.port, &bed.tap, "connections"), Some(1), "{}", bed.log());
    assert_eq!(device_counter(bed.port, &bed.tap, "disconnects"), Some(0));
    assert_eq!(device_counter(bed.port, &bed.tap, "protocol_errors"), Some(0));
    let (tx, rx, gap) = traffic.finish();
    // The pair's counters carried over every upgrade: once the connection is gone (its last
    // batch flushed), every TX frame of the run is counted once.
    assert!(wait_until(WAIT, || device_counter(bed.port, &bed.tap, "disconnects") == Some(1)));
    let total = |counter: &str| -> u64 { (0..pairs).map(|p| pair_counter(bed.port, &bed.tap, p, counter).unwrap()).sum() };
    assert_eq!(total("tx_frames"), u64::from(tx), "tx_frames_total after {upgrades} upgrades");
    assert!(total("rx_frames") >= u64::from(rx));
    let log = bed.log();
    assert_eq!(log.matches("frontend connected").count(), 1, "a reconnect was logged:\n{log}");
    assert_eq!(log.matches("took over every device").count(), upgrades);
    pauses.sort_by(f64::total_cmp);
    eprintln!(
        "{upgrades} live upgrades under traffic, {pairs} queue pair(s): TX {tx} / RX {rx} frames, none lost, all byte for byte; pause per upgrade {:.2}-{:.2} ms (median {:.2}); longest RX gap in the guest {:.1} ms (1 frame/ms sent)",
        pauses[0],
        pauses[upgrades - 1],
        pauses[upgrades / 2],
        gap.as_secs_f64() * 1e3
    );
    let _ = std::fs::remove_dir_all(&bed.dir);
}

/// A script standing in for a new binary that cannot take over.
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

#[test]
fn test_upgrade_that_fails_leaves_the_old_vutap_serving() {
    let _g = serial();
    let mut bed = Bed::start("fails", 1, &[]);
    let traffic = Traffic::start(&bed.socket, &bed.tap, 1);
    // The new binary exits at once.
    let (ok, out) = bed.upgrade(Some(Path::new("/bin/false")));
    assert!(!ok, "{out}");
    assert!(out.contains("the running vutap goes on") && out.contains("exit status: 1"), "{out}");
    let (t, r) = traffic.counts();
    traffic.wait_for_more(t, r);
    // A new binary that starts and then cannot take the state over (configured for another
    // socket): the devices were parked by then, and must resume.
    let other = bed.dir.join("other.sock");
    let wrong = script(
        &bed.dir,
        "wrong-config.sh",
        &format!("#!/bin/sh\nexec {} --socket {} --tap {}\n", Vutap::binary().unwrap().display(), other.display(), bed.tap),
    );
    let (ok, out) = bed.upgrade(Some(&wrong));
    assert!(!ok, "{out}");
    assert!(out.contains("the new process refused") && out.contains("this one is configured for"), "{out}");
    let (t, r) = traffic.counts();
    traffic.wait_for_more(t, r);
    assert!(bed.serving.first.is_running(), "{}", bed.log());
    let (tx, rx, _) = traffic.finish();
    assert_eq!(device_counter(bed.port, &bed.tap, "connections"), Some(1));
    assert!(bed.log().contains("every device resumed"), "{}", bed.log());
    eprintln!("two failed upgrades: the old vutap kept serving; TX {tx} / RX {rx} frames, none lost");
    let _ = std::fs::remove_dir_all(&bed.dir);
}

#[test]
fn test_upgrade_to_another_major_state_version_is_refused_before_anything_stops() {
    let _g = serial();
    // The stand-in below is a Python script, which the upgrade thread's seccomp list (made
    // for starting vutap) would not let run.
    let bed = Bed::start("version", 1, &["--no-seccomp"]);
    let mut fe = NetFrontend::connect(&bed.socket, FrontendOptions::default()).expect("handshake");
    // A "future vutap": says hello with state version 2.0 on the hand-over socket.
    let future = script(
        &bed.dir,
        "future.py",
        "#!/usr/bin/env python3\nimport os, socket, json, time\n\
         s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM, fileno=int(os.environ['VUTAP_UPGRADE_FD']))\n\
         s.send(json.dumps({'pid': os.getpid(), 'version': {'major': 2, 'minor': 0}}).encode())\n\
         time.sleep(30)\n",
    );
    let (ok, out) = bed.upgrade(Some(&future));
    assert!(!ok, "{out}");
    assert!(out.contains("reads hand-over state version 2.0, this vutap writes 1.0") && out.contains("restart instead"), "{out}");
    assert!(!bed.log().contains("parking the devices"), "devices were halted for a refused version:\n{}", bed.log());
    // Still the same connection, still forwarding.
    let far = PacketSocket::bind(&bed.tap);
    fe.send_frame(0, &VirtioNetHdr::default(), &tx_frame(1)).unwrap();
    let got = far.recv_matching(WAIT, |f| is_test_frame(f) && f[6..12] == GUEST_MAC);
    assert_eq!(got, Some(tx_frame(1)));
    let _ = std::fs::remove_dir_all(&bed.dir);
}

#[test]
fn test_upgrade_without_a_frontend_hands_over_the_listener() {
    let _g = serial();
    let mut bed = Bed::start("idle", 1, &[]);
    let (ok, out) = bed.upgrade(None);
    assert!(ok, "{out}\n{}", bed.log());
    let (pid, _) = parse_upgraded(&out);
    bed.serving.pid = pid;
    assert!(bed.serving.first.wait_exit(WAIT).is_some(), "the old vutap did not exit");
    // The new process accepts on the listener it took over: a frontend connects and forwards.
    let mut fe = NetFrontend::connect(&bed.socket, FrontendOptions::default()).expect("handshake");
    let far = PacketSocket::bind(&bed.tap);
    fe.send_frame(0, &VirtioNetHdr::default(), &tx_frame(7)).unwrap();
    let got = far.recv_matching(WAIT, |f| is_test_frame(f) && f[6..12] == GUEST_MAC);
    assert_eq!(got, Some(tx_frame(7)), "{}", bed.log());
    far.send(&rx_frame(8));
    let rx = loop {
        let f = fe.recv_frame(0, WAIT).unwrap().expect("RX frame after the upgrade");
        if is_test_frame(&f.payload) {
            break f.payload;
        }
    };
    assert_eq!(rx, rx_frame(8));
    let _ = std::fs::remove_dir_all(&bed.dir);
}

#[test]
fn test_upgrade_in_client_mode_keeps_the_connection() {
    let _g = serial();
    let tap = format!("vup{}", unique());
    let dir = log_dir("upgrade-client").unwrap();
    let (socket, control) = (dir.join("fe.sock"), dir.join("ctl.sock"));
    let _ = std::fs::remove_file(&socket);
    // The frontend listens (QEMU `server=on`); vutap connects with --client.
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let log = std::fs::File::create(dir.join("vutap.log")).unwrap();
    let mut first = Command::new(Vutap::binary().unwrap())
        .args(["--socket", socket.to_str().unwrap(), "--tap", &tap, "--client"])
        .args(["--control-socket", control.to_str().unwrap()])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let log_text = || std::fs::read_to_string(dir.join("vutap.log")).unwrap_or_default();
    let fe = NetFrontend::accept(&listener, FrontendOptions::default()).expect("vutap connects");
    no_ipv6(&tap);
    sh("ip", &["link", "set", &tap, "up"]);
    let traffic = Traffic::start_on(fe, &tap, 1);
    let mut pids = vec![first.id()];
    for round in 0..2 {
        let (ok, out) = run_upgrade(&control, None);
        assert!(ok, "upgrade {round}: {out}\n{}", log_text());
        pids.push(parse_upgraded(&out).0);
        let (t, r) = traffic.counts();
        traffic.wait_for_more(t, r);
        traffic.probe();
    }
    // One connection across both upgrades.
    assert_eq!(log_text().matches("frontend connected").count(), 1, "{}", log_text());
    let (tx, rx, _) = traffic.finish();
    let last = *pids.last().unwrap();
    // The frontend closed: a client-mode vutap tries to connect again, to the same listener.
    let _again = listener.accept().expect("the new vutap reconnects after the frontend closed");
    // SAFETY: kill(2) on the pid the last upgrade reported (the test's grandchild).
    unsafe { libc::kill(last as libc::pid_t, libc::SIGTERM) };
    wait_until(WAIT, || !Serving::alive(last));
    assert_eq!(first.wait().unwrap().code(), Some(0));
    eprintln!("client mode: 2 live upgrades, TX {tx} / RX {rx} frames, none lost");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A CONFIG_CHANGE_MSG header on the backend channel: (request, flags, size).
fn read_backend_req(ch: &mut std::os::unix::net::UnixStream, timeout: Duration) -> Option<(u32, u32, u32)> {
    use std::io::Read;
    ch.set_read_timeout(Some(timeout)).unwrap();
    let mut h = [0u8; 12];
    ch.read_exact(&mut h).ok()?;
    let u = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().unwrap());
    Some((u(0), u(4), u(8)))
}

#[test]
fn test_upgrade_hands_over_the_backend_channel() {
    use vhost::vhost_user::{VhostUserFrontend, VhostUserProtocolFeatures};
    use vutap_testbed::{MacvtapMode, Topology};
    let _g = serial();
    let topo = Topology::new(1, MacvtapMode::Bridge).unwrap();
    let dir = log_dir("upgrade-channel").unwrap();
    let (sock, control) = (dir.join("vu.sock"), dir.join("ctl.sock"));
    let first =
        Vutap::spawn(&sock, &topo.taps[0].dev, 1, &["--control-socket", control.to_str().unwrap(), "--link-poll-ms", "50"], &dir).unwrap();
    let mut opts = FrontendOptions::default();
    opts.requested_protocol |= VhostUserProtocolFeatures::BACKEND_REQ;
    let mut fe = NetFrontend::connect(&sock, opts).unwrap();
    let (mut ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    fe.vhost().set_backend_request_fd(&theirs).unwrap();
    drop(theirs);
    let (ok, out) = run_upgrade(&control, None);
    assert!(ok, "{out}\n{}", first.log_text());
    let serving = Serving { pid: parse_upgraded(&out).0, first };
    // The new process tells the frontend of a carrier change on the channel it took over.
    sh("ip", &["link", "set", &topo.lower, "down"]);
    let msg = read_backend_req(&mut ours, WAIT);
    assert_eq!(msg, Some((2, 1, 0)), "CONFIG_CHANGE_MSG from the new vutap:\n{}", serving.first.log_text());
    // Read STATUS before the carrier returns: the monitor would report it up within its poll.
    assert_eq!(fe.config().unwrap().unwrap().status & 1, 0, "STATUS after the carrier loss");
    sh("ip", &["link", "set", &topo.lower, "up"]);
    assert!(read_backend_req(&mut ours, WAIT).is_some(), "CONFIG_CHANGE_MSG when the carrier returns");
    assert_eq!(fe.config().unwrap().unwrap().status & 1, 1);
    drop(fe);
    drop(serving);
}

#[test]
fn test_upgrade_hands_over_the_dirty_log() {
    use std::os::unix::fs::FileExt;
    use vhost::vhost_user::VhostUserProtocolFeatures;
    let _g = serial();
    let mut bed = Bed::start("log", 1, &[]);
    let opts = FrontendOptions {
        requested_protocol: FrontendOptions::default().requested_protocol | VhostUserProtocolFeatures::LOG_SHMFD,
        ..FrontendOptions::default()
    };
    let mut fe = NetFrontend::connect(&bed.socket, opts).expect("handshake");
    // One bit per 4 KiB page of guest memory, in whole pages.
    let log = fe.start_dirty_log().expect("log mapped and logging on");
    let log_len = log.metadata().unwrap().len() as usize;
    let (ok, out) = bed.upgrade(None);
    assert!(ok, "{out}\n{}", bed.log());
    bed.serving.pid = parse_upgraded(&out).0;
    assert!(bed.serving.first.wait_exit(WAIT).is_some(), "the old vutap did not exit");
    // Only the new process runs now: what it writes must be marked in the log it took over.
    log.write_all_at(&vec![0u8; log_len], 0).unwrap();
    let far = PacketSocket::bind(&bed.tap);
    fe.send_frame(0, &VirtioNetHdr::default(), &tx_frame(3)).unwrap();
    let got = far.recv_matching(WAIT, |f| is_test_frame(f) && f[6..12] == GUEST_MAC);
    assert_eq!(got, Some(tx_frame(3)));
    let marked = wait_until(WAIT, || {
        let mut bitmap = vec![0u8; log_len];
        log.read_exact_at(&mut bitmap, 0).unwrap();
        bitmap.iter().any(|b| *b != 0)
    });
    assert!(marked, "the new vutap marked nothing in the dirty log:\n{}", bed.log());
    let _ = std::fs::remove_dir_all(&bed.dir);
}
