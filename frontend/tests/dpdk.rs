//! The frontend against a real vhost-user-net backend: DPDK's vhost PMD in `dpdk-testpmd`,
//! forwarding between the vhost port and a tap it creates. Frames the frontend sends must come
//! out of the tap byte for byte (seen with AF_PACKET), and frames written to the tap must
//! arrive on the frontend's RX queue. Needs root and dpdk-testpmd; skipped (with a message)
//! otherwise.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use vutap_frontend::features::{F_VERSION_1, NET_F_MRG_RXBUF, RING_F_EVENT_IDX, RING_F_INDIRECT_DESC};
use vutap_frontend::{rx_queue, tx_queue, FrontendOptions, HandshakeOrder, NetFrontend, TxShape, TxSplit, VirtioNetHdr};
use vutap_testbed::frames::{self, is_test_frame};
use vutap_testbed::link;
use vutap_testbed::packet::{ifindex, PacketOptions, PacketSocket};

const TESTPMD: &str = "/usr/bin/dpdk-testpmd";

/// testpmd polls with a busy core; run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());
static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// A running testpmd with a vhost-user server socket and a tap; killed and cleaned on drop.
struct Testpmd {
    child: Child,
    socket: PathBuf,
    tap: String,
    prefix: String,
    log: PathBuf,
}

impl Testpmd {
    fn start(queues: u16) -> Testpmd {
        let id = format!("{}x{}", std::process::id() % 100_000, NEXT_ID.fetch_add(1, Ordering::Relaxed));
        let socket = PathBuf::from(format!("/tmp/vutap-fe-{id}.sock"));
        let tap = format!("vfe{id}");
        assert!(tap.len() <= 15, "interface name too long: {tap}");
        let prefix = format!("vutapfe{id}");
        let _ = std::fs::remove_file(&socket);
        let log_path = PathBuf::from(format!("/tmp/vutap-fe-{id}.log"));
        let log = std::fs::File::create(&log_path).expect("log file");
        let child = Command::new(TESTPMD)
            .args(["-l", "0-1", "--no-huge", "-m", "1024", "--no-pci", "--file-prefix", &prefix])
            .arg("--vdev")
            .arg(format!("net_vhost0,iface={},queues={queues}", socket.display()))
            .arg("--vdev")
            .arg(format!("net_tap0,iface={tap}"))
            // testpmd starts forwarding only once the vhost port's link is up, i.e. after the
            // frontend connected, and by default first drains and drops whatever waits on its
            // ports' RX queues: a frame a test sent right after the handshake could go there.
            .args(["--", "--forward-mode=io", "--auto-start", "--no-flush-rx", "--stats-period", "60"])
            .arg(format!("--rxq={queues}"))
            .arg(format!("--txq={queues}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn dpdk-testpmd");
        let mut t = Testpmd { child, socket, tap, prefix, log: log_path };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !(t.socket.exists() && ifindex(&t.tap).is_some()) {
            if let Ok(Some(st)) = t.child.try_wait() {
                panic!("testpmd exited early ({st}); see /tmp/vutap-fe-{id}.log");
            }
            assert!(Instant::now() < deadline, "testpmd did not come up; see /tmp/vutap-fe-{id}.log");
            std::thread::sleep(Duration::from_millis(50));
        }
        // Quieten the tap: no IPv6 autoconf/ND traffic.
        let _ = link::disable_ipv6(&t.tap);
        t
    }
}

impl Testpmd {
    /// How many lines of testpmd's log contain `needle` (DPDK logs to unbuffered stderr).
    fn log_count(&self, needle: &str) -> usize {
        std::fs::read_to_string(&self.log).map(|t| t.lines().filter(|l| l.contains(needle)).count()).unwrap_or(0)
    }

    /// Waits until `n` lines of the log contain `needle`.
    fn wait_log_count(&self, needle: &str, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.log_count(needle) < n {
            assert!(
                Instant::now() < deadline,
                "testpmd never logged {needle:?} ({n} times):\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_dir_all(format!("/var/run/dpdk/{}", self.prefix));
        if ifindex(&self.tap).is_some() {
            let _ = Command::new("ip").args(["link", "del", &self.tap]).status();
        }
        // Keep testpmd's log only when the test failed, for the post-mortem.
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// An AF_PACKET socket on the tap, seeing every frame on it.
fn tap_socket(pmd: &Testpmd) -> PacketSocket {
    PacketSocket::open(None, &pmd.tap, PacketOptions::default()).expect("AF_PACKET socket on the tap")
}

/// A `len`-byte test frame between two locally administered MACs.
fn test_frame(len: usize, seq: u32) -> Vec<u8> {
    frames::test_frame([0x02, 0, 0, 0, 0xfe, 0x01], [0x02, 0, 0, 0, 0xfe, 0x02], len, seq)
}

/// Checks what every test here needs; they fail, never skip, without it (`scripts/test.sh`
/// runs as root and installs DPDK).
fn require_root_and_testpmd() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "the DPDK peer tests need root");
    assert!(Path::new(TESTPMD).exists(), "{TESTPMD} missing: run scripts/install-deps.sh");
}

fn connect(pmd: &Testpmd, opts: FrontendOptions) -> NetFrontend {
    let ready = pmd.log_count(READY);
    let fe = NetFrontend::connect(&pmd.socket, opts).expect("handshake with DPDK vhost");
    // testpmd forwards once its vhost library has declared the device ready.
    pmd.wait_log_count(READY, ready + 1);
    fe
}

/// What DPDK's vhost library logs when a device is ready, and when its frontend went away.
const READY: &str = "virtio is now ready for processing";
const CLOSED: &str = "vhost peer closed";

/// Sends `frames` on TX and checks each comes out of the tap unchanged, in order.
fn check_tx(fe: &mut NetFrontend, sock: &PacketSocket, frames: &[Vec<u8>], shape: TxShape) {
    for f in frames {
        fe.send_frame_shaped(0, &VirtioNetHdr::default(), f, shape).expect("send_frame");
        let got = sock.recv_matching(Duration::from_secs(5), is_test_frame).expect("frame out of the tap");
        assert_eq!(got.len(), f.len(), "length of frame seq {:?}", &f[22..26]);
        assert!(got == *f, "TX frame differs ({shape:?})");
    }
    // Every chain must come back as used.
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut done = 0;
    while done < frames.len() && Instant::now() < deadline {
        done += fe.reclaim_tx(0).expect("reclaim");
    }
    assert_eq!(done, frames.len(), "TX chains returned by the backend");
    assert_eq!(fe.queue(tx_queue(0)).unwrap().descriptors_in_flight(), 0);
}

/// Writes `frames` into the tap and checks each arrives on RX unchanged, in order.
fn check_rx(fe: &mut NetFrontend, sock: &PacketSocket, frames: &[Vec<u8>]) {
    for f in frames {
        sock.send(f).expect("sendto");
        let deadline = Instant::now() + Duration::from_secs(5);
        let got = loop {
            let left = deadline.checked_duration_since(Instant::now()).expect("frame on RX in time");
            let fr = fe.recv_frame(0, left).expect("recv_frame").expect("frame on RX");
            if is_test_frame(&fr.payload) {
                break fr;
            }
        };
        assert_eq!(got.payload.len(), f.len());
        assert!(got.payload == *f, "RX frame differs");
        assert_eq!(got.hdr.gso_type, 0);
        assert!(got.num_buffers >= 1);
    }
}

fn sizes() -> Vec<Vec<u8>> {
    [60usize, 1514, 60, 1514, 61, 1000].iter().enumerate().map(|(i, &l)| test_frame(l, i as u32)).collect()
}

#[test]
fn test_frontend_dpdk_both_directions_cloud_hypervisor_order() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    require_root_and_testpmd();
    let pmd = Testpmd::start(1);
    let sock = tap_socket(&pmd);
    let mut fe = connect(&pmd, FrontendOptions::default());
    let acked = fe.acked_features();
    eprintln!(
        "offered {:#x} acked {acked:#x} protocol {:?} queues {:?}",
        fe.offered_features(),
        fe.protocol_features(),
        fe.backend_queue_num()
    );
    assert_ne!(acked & F_VERSION_1, 0, "DPDK offers VERSION_1");
    assert_eq!(fe.hdr_len(), 12);
    if let Some(cfg) = fe.config().expect("GET_CONFIG") {
        eprintln!("config {cfg:?}");
    }
    check_tx(&mut fe, &sock, &sizes(), TxShape::default());
    check_rx(&mut fe, &sock, &sizes());
    let s = fe.stats();
    assert_eq!(s.tx_frames, 6);
    assert!(s.rx_frames >= 6);
}

#[test]
fn test_frontend_dpdk_qemu_order_and_chain_shapes() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    require_root_and_testpmd();
    let pmd = Testpmd::start(1);
    let sock = tap_socket(&pmd);
    let opts = FrontendOptions { order: HandshakeOrder::Qemu, ..FrontendOptions::default() };
    let mut fe = connect(&pmd, opts);
    let frames = sizes();
    check_tx(&mut fe, &sock, &frames, TxShape { split: TxSplit::HeaderApart, indirect: false });
    check_tx(&mut fe, &sock, &frames, TxShape { split: TxSplit::Every(100), indirect: false });
    if fe.acked_features() & RING_F_INDIRECT_DESC != 0 {
        check_tx(&mut fe, &sock, &frames, TxShape { split: TxSplit::Every(512), indirect: true });
    } else {
        eprintln!("backend did not take INDIRECT_DESC; indirect shape not exercised");
    }
    check_rx(&mut fe, &sock, &frames);
}

#[test]
fn test_frontend_dpdk_rx_without_mergeable_split_buffers() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    require_root_and_testpmd();
    let pmd = Testpmd::start(1);
    let sock = tap_socket(&pmd);
    let opts = FrontendOptions {
        requested_features: FrontendOptions::default().requested_features & !(NET_F_MRG_RXBUF | RING_F_EVENT_IDX),
        rx_buf_len: 1526,
        rx_segments: 3, // each RX buffer is a 3-descriptor chain
        ..FrontendOptions::default()
    };
    let mut fe = connect(&pmd, opts);
    assert_eq!(fe.acked_features() & (NET_F_MRG_RXBUF | RING_F_EVENT_IDX), 0);
    check_rx(&mut fe, &sock, &sizes());
    check_tx(&mut fe, &sock, &sizes(), TxShape::default());
}

#[test]
fn test_frontend_dpdk_small_rx_buffers_merge() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    require_root_and_testpmd();
    let pmd = Testpmd::start(1);
    let sock = tap_socket(&pmd);
    // 512-byte buffers: a 1514-byte frame must be spread over 3+ buffers via num_buffers.
    let opts = FrontendOptions { rx_buf_len: 512, ..FrontendOptions::default() };
    let mut fe = connect(&pmd, opts);
    assert_ne!(fe.acked_features() & NET_F_MRG_RXBUF, 0);
    let f = test_frame(1514, 77);
    sock.send(&f).expect("sendto");
    let deadline = Instant::now() + Duration::from_secs(5);
    let got = loop {
        let left = deadline.checked_duration_since(Instant::now()).expect("in time");
        let fr = fe.recv_frame(0, left).unwrap().expect("frame");
        if is_test_frame(&fr.payload) {
            break fr;
        }
    };
    assert!(got.num_buffers >= 3, "num_buffers {}", got.num_buffers);
    assert!(got.payload == f);
}

#[test]
fn test_frontend_dpdk_batch_throughput_and_vring_base() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    require_root_and_testpmd();
    let pmd = Testpmd::start(1);
    let mut fe = connect(&pmd, FrontendOptions::default());
    let frames: Vec<Vec<u8>> = (0..64).map(|i| test_frame(60, i)).collect();
    let hdr = VirtioNetHdr::default();
    let total = 200_000u64;
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < total {
        fe.reclaim_tx(0).unwrap();
        let want = frames.len().min((total - sent) as usize);
        let n = fe.send_batch(0, &hdr, &frames[..want]).unwrap();
        sent += n as u64;
        if n == 0 {
            std::hint::spin_loop();
        }
    }
    while fe.stats().tx_completed < total && start.elapsed() < Duration::from_secs(30) {
        fe.reclaim_tx(0).unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    let s = fe.stats();
    eprintln!("TX {} frames of 60 B in {secs:.3}s = {:.0} pps, {} kicks", s.tx_completed, s.tx_completed as f64 / secs, s.tx_kicks);
    assert_eq!(s.tx_completed, total);
    assert!(s.tx_kicks < total, "batching kicks at most once per batch");
    // Stopping the TX ring reports where the backend stopped: all frames consumed.
    let base = fe.get_vring_base(tx_queue(0)).expect("GET_VRING_BASE");
    assert_eq!(base, (total % 65536) as u32);
    let rx_base = fe.get_vring_base(rx_queue(0)).expect("GET_VRING_BASE rx");
    eprintln!("rx vring base {rx_base}");
}

#[test]
fn test_frontend_dpdk_reconnect() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    require_root_and_testpmd();
    let pmd = Testpmd::start(1);
    let sock = tap_socket(&pmd);
    let fe = connect(&pmd, FrontendOptions::default());
    let closed = pmd.log_count(CLOSED);
    fe.disconnect();
    pmd.wait_log_count(CLOSED, closed + 1);
    let mut fe = connect(&pmd, FrontendOptions::default());
    check_tx(&mut fe, &sock, &sizes()[..2], TxShape::default());
    check_rx(&mut fe, &sock, &sizes()[..2]);
}

#[test]
fn test_frontend_dpdk_two_queue_pairs_qemu_order() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    require_root_and_testpmd();
    let pmd = Testpmd::start(2);
    let sock = tap_socket(&pmd);
    // Pair 0 is enabled early (before SET_FEATURES), pair 1 after the rings are set up.
    let opts = FrontendOptions { queue_pairs: 2, order: HandshakeOrder::Qemu, ..FrontendOptions::default() };
    let mut fe = connect(&pmd, opts);
    for pair in [1u16, 0] {
        for (i, len) in [60usize, 1514].into_iter().enumerate() {
            let f = test_frame(len, 100 * u32::from(pair) + i as u32);
            fe.send_frame(pair, &VirtioNetHdr::default(), &f).expect("send_frame");
            let got = sock.recv_matching(Duration::from_secs(5), is_test_frame).expect("frame out of the tap");
            assert!(got == f, "TX frame from pair {pair} differs");
        }
    }
    assert!(fe.send_frame(2, &VirtioNetHdr::default(), &[0; 60]).is_err(), "no pair 2");
}
