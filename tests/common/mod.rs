//! Shared helpers of the vutap integration tests: an in-process daemon guard, AF_PACKET sockets
//! (on the host or inside a test namespace), frame builders and checksum helpers.
//!
//! Everything needs root. Tests never skip: without root they fail with a clear message.

#![allow(dead_code)] // each test binary uses a different subset

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vutap::cli::{Config, Policy, SocketModeCfg};
use vutap::control::device::Device;
use vutap::control::vhost_user::{bind_socket, serve_counted};
use vutap::operations::sandbox::Seccomp;
use vutap::tap::TapSpec;
use vutap_frontend::{FrontendOptions, NetFrontend};
use vutap_testbed::{link, packet, MacvtapMode, Topology};

// Frame builders and checksums live in the test bed, shared with the benchmarks; each test
// binary uses a different subset.
#[allow(unused_imports)]
pub use vutap_testbed::frames::{
    csum_add, csum_fold, is_test_frame, parse_tcp, payload, pseudo_sum, seq_of, tcp_frame, test_frame, udp_frame, udp_ports, TcpFlow,
    TcpSeg, ETHERTYPE, IP_TCP, IP_UDP, MAGIC,
};

/// Topology-creating tests run one at a time: the host has two cores and each test counts
/// frames exactly.
static SERIAL: Mutex<()> = Mutex::new(());
static NEXT: AtomicU32 = AtomicU32::new(0);

/// Takes the global test lock (poison-tolerant), checks root, sets up logging.
pub fn serial() -> MutexGuard<'static, ()> {
    let g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "the vutap integration tests need root (netns, macvtap, tun)");
    let _ = env_logger::builder().is_test(true).try_init();
    g
}

/// A short id unique on this host while this process lives, for interface and socket names:
/// `<pid>x<counter>` in hex (the separator keeps pid 0x12 + counter 0x34 apart from pid 0x123 +
/// counter 0x4; "vti" + 6 + 1 + 4 digits stays within the 15-byte interface-name limit).
pub fn unique() -> String {
    format!("{:x}x{:x}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Runs a host command that must succeed (the error names the command and carries its stderr).
pub fn sh(prog: &str, args: &[&str]) {
    vutap_testbed::cmd::run(prog, args).unwrap_or_else(|e| panic!("{e}"));
}

pub fn parse_mac(s: &str) -> [u8; 6] {
    vutap_testbed::frames::parse_mac(s).unwrap_or_else(|| panic!("bad MAC {s:?}"))
}

// ------------------------------------------------------------------------------- daemon

/// vutap serving one device in this process: `bind_socket` + an accept loop calling
/// `serve_counted` for each frontend, like `vhost_user::serve(.., once = false)`, but
/// stoppable so the device (and a tap vutap created) goes away when the test ends.
pub struct Daemon {
    pub dev: Arc<Device>,
    pub socket: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

pub fn socket_path() -> PathBuf {
    PathBuf::from(format!("/tmp/vutap-it-{}.sock", unique()))
}

/// The daemon's serving and worker threads run under their seccomp lists, as in the binary (the
/// library's default policy leaves them off; the test's own threads are never filtered).
pub fn config(socket: &Path, tap: TapSpec, queues: usize, mtu: Option<u16>) -> Config {
    let policy = Policy { seccomp: Seccomp::ON, ..Policy::default() };
    Config { socket: SocketModeCfg::Server(socket.to_path_buf()), tap, queues, mac: None, mtu, once: false, policy }
}

impl Daemon {
    pub fn start(tap: TapSpec, queues: usize) -> Daemon {
        let socket = socket_path();
        let dev = Arc::new(vutap::open_device(&config(&socket, tap, queues, None)).expect("open_device"));
        let listener = bind_socket(&socket).expect("bind vhost-user socket");
        let stop = Arc::new(AtomicBool::new(false));
        let (d, s) = (dev.clone(), stop.clone());
        let thread = std::thread::spawn(move || loop {
            let Ok((stream, _)) = listener.accept() else { continue };
            if s.load(Ordering::SeqCst) {
                return;
            }
            serve_counted(stream, &d);
        });
        Daemon { dev, socket, stop, thread: Some(thread) }
    }

    /// The daemon's own loop: `vhost_user::serve(Server(socket), dev, once = false)` on a
    /// detached thread, exactly as the binary runs it.
    pub fn serve_forever(tap: TapSpec, queues: usize) -> Daemon {
        let socket = socket_path();
        let dev = Arc::new(vutap::open_device(&config(&socket, tap, queues, None)).expect("open_device"));
        let (d, path) = (dev.clone(), socket.clone());
        std::thread::spawn(move || {
            let r = vutap::control::vhost_user::serve(&vutap::control::vhost_user::SocketMode::Server(path), d, false);
            panic!("serve(once = false) returned: {r:?}");
        });
        assert!(wait_until(Duration::from_secs(5), || socket.exists()), "vutap socket never appeared");
        Daemon { dev, socket, stop: Arc::new(AtomicBool::new(false)), thread: None }
    }

    pub fn connect(&self, opts: FrontendOptions) -> NetFrontend {
        NetFrontend::connect(&self.socket, opts).expect("vhost-user handshake with vutap")
    }

    /// Connections the daemon has finished with (the frontend closed, vutap closed it for a
    /// protocol error, or its guest memory was lost): counted only after the session's workers
    /// stopped and flushed their counters.
    pub fn connections_ended(&self) -> u64 {
        let m = &self.dev.device_metrics;
        [&m.disconnects, &m.protocol_errors, &m.guest_memory_lost].iter().map(|c| c.load(Ordering::SeqCst)).sum()
    }

    /// Connections vutap closed because the frontend broke the protocol.
    pub fn protocol_errors(&self) -> u64 {
        self.dev.device_metrics.protocol_errors.load(Ordering::SeqCst)
    }

    /// Waits until `n` connections have ended, so per-pair counters are final.
    pub fn wait_connections_ended(&self, n: u64) {
        assert!(
            wait_until(Duration::from_secs(10), || self.connections_ended() >= n),
            "vutap finished {} connections, expected {n}",
            self.connections_ended()
        );
    }

    /// Sum of one counter over all pairs.
    pub fn total(&self, f: impl Fn(&vutap::metrics::PairCounts) -> u64) -> u64 {
        self.dev.metrics.iter().map(|m| f(&m.snapshot())).sum()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.thread.is_none() {
            // `serve` forever: it cannot be stopped; its thread and device fds stay until the
            // test process exits (a macvtap is deleted under it by the topology's Drop).
            let _ = std::fs::remove_file(&self.socket);
            return;
        }
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept; the frontends of the test are gone by now (declared later).
        let _ = UnixStream::connect(&self.socket);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

// ------------------------------------------------------------------------------- test beds

/// The far end of the wire plus the daemon serving the near end.
/// Field order is drop order: socket, daemon (closes the device), topology.
pub struct Bed {
    pub far: PacketSocket,
    pub daemon: Daemon,
    /// The MAC the guest must use (the macvtap's, or the one vutap derived for a tap).
    pub guest_mac: [u8; 6],
    /// MAC of the far end (the veth peer; arbitrary for a tap).
    pub far_mac: [u8; 6],
    pub tap_name: String,
    pub topo: Option<Topology>,
}

/// Silences IPv6 (router solicitations, MLD) on an interface we created, so counters are exact.
pub fn no_ipv6(ifname: &str) {
    // Best effort: a kernel without IPv6 has nothing to silence.
    let _ = link::disable_ipv6(ifname);
}

impl Bed {
    /// netns + veth + macvtap (bridge); the far end is the veth peer inside the netns.
    /// `mtu`: raised on veth pair and macvtap before vutap opens the device.
    /// `lower_offloads_off`: no TSO/checksum offload on the veth lower, so a guest TSO frame
    /// leaves the host as checksummed MSS-sized segments.
    pub fn macvtap(queues: usize, mtu: Option<u32>, lower_offloads_off: bool) -> Bed {
        Bed::macvtap_with(queues, mtu, lower_offloads_off, false)
    }

    /// As [`Bed::macvtap`], served by the real `vhost_user::serve` loop (never stopped).
    pub fn macvtap_serve_forever(queues: usize) -> Bed {
        Bed::macvtap_with(queues, None, false, true)
    }

    fn macvtap_with(queues: usize, mtu: Option<u32>, lower_offloads_off: bool, serve_forever: bool) -> Bed {
        let topo = Topology::new(1, MacvtapMode::Bridge).expect("create netns/veth/macvtap topology");
        let tap = topo.taps[0].clone();
        topo.exec_ok(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]).expect("sysctl in netns");
        topo.exec_ok(&["sysctl", "-qw", &format!("net.ipv6.conf.{}.disable_ipv6=1", topo.peer)]).expect("sysctl");
        no_ipv6(&topo.lower);
        no_ipv6(&tap.ifname);
        if let Some(m) = mtu {
            let m = m.to_string();
            sh("ip", &["link", "set", &topo.lower, "mtu", &m]);
            topo.exec_ok(&["ip", "link", "set", &topo.peer, "mtu", &m]).expect("peer mtu");
            sh("ip", &["link", "set", &tap.ifname, "mtu", &m]);
        }
        if lower_offloads_off {
            sh("ethtool", &["-K", &topo.lower, "tx", "off", "tso", "off", "gso", "off"]);
        }
        let far_mac = parse_mac(&topo.exec_ok(&["cat", &format!("/sys/class/net/{}/address", topo.peer)]).unwrap());
        let spec = TapSpec::DevPath(tap.dev.clone());
        let daemon = if serve_forever { Daemon::serve_forever(spec, queues) } else { Daemon::start(spec, queues) };
        assert_eq!(daemon.dev.mac, parse_mac(&tap.mac), "vutap must announce the macvtap's MAC");
        let far = PacketSocket::bind_in_netns(&topo.netns, &topo.peer);
        Bed { far, guest_mac: daemon.dev.mac, daemon, far_mac, tap_name: tap.ifname, topo: Some(topo) }
    }

    /// A multi-queue tap created by vutap by name; the far end is an AF_PACKET socket on the
    /// tap interface in the host (the tap itself is the wire).
    pub fn tap(queues: usize) -> Bed {
        let name = format!("vti{}", unique());
        assert!(name.len() < 16);
        let daemon = Daemon::start(TapSpec::Name(name.clone()), queues);
        assert_eq!(daemon.dev.name, name);
        no_ipv6(&name);
        sh("ip", &["link", "set", &name, "up"]);
        let far = PacketSocket::bind(&name);
        Bed { far, guest_mac: daemon.dev.mac, daemon, far_mac: [0x02, 0x77, 0, 0, 0, 1], tap_name: name, topo: None }
    }
}

// ------------------------------------------------------------------------------- AF_PACKET

/// The far end's AF_PACKET socket: [`packet::PacketSocket`] (whose receive calls it derefs to)
/// with an 8 MiB receive buffer, panicking where that one returns an error.
pub struct PacketSocket(packet::PacketSocket);

impl std::ops::Deref for PacketSocket {
    type Target = packet::PacketSocket;
    fn deref(&self) -> &packet::PacketSocket {
        &self.0
    }
}

impl PacketSocket {
    /// Binds in the calling thread's network namespace.
    pub fn bind(ifname: &str) -> PacketSocket {
        PacketSocket::open(None, ifname)
    }

    /// Binds to `ifname` inside network namespace `netns` (the calling thread stays where it is).
    pub fn bind_in_netns(netns: &str, ifname: &str) -> PacketSocket {
        PacketSocket::open(Some(netns), ifname)
    }

    fn open(netns: Option<&str>, ifname: &str) -> PacketSocket {
        let opts = packet::PacketOptions { rcvbuf: Some(8 << 20), ..Default::default() };
        let s = packet::PacketSocket::open(netns, ifname, opts);
        PacketSocket(s.unwrap_or_else(|e| panic!("AF_PACKET socket on {ifname} (netns {netns:?}): {e}")))
    }

    /// Enables PACKET_VNET_HDR: every sent frame is preceded by a 10-byte virtio_net_hdr.
    pub fn set_vnet_hdr(&self) {
        self.0.set_vnet_hdr().unwrap_or_else(|e| panic!("{e}"));
    }

    /// Sends `frame` (with its virtio_net_hdr first if `set_vnet_hdr` was called; `dst` is the
    /// frame's destination MAC, `proto` its ethertype).
    pub fn send_raw(&self, bytes: &[u8], dst: [u8; 6], proto: u16) {
        self.0.send_to(bytes, dst, proto).unwrap_or_else(|e| panic!("{e}"));
    }

    pub fn send(&self, frame: &[u8]) {
        self.0.send(frame).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Sends `frame` where failing is expected at times (e.g. "Network is down" while a soak
    /// flaps the tap): no panic, so no backtrace symbolization inflates the process's RSS.
    pub fn try_send(&self, frame: &[u8]) -> bool {
        self.0.send(frame).is_ok()
    }
}

/// Polls `cond` until true or `timeout`; returns its last value.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs a vutap command to completion (it is expected to refuse to start); returns its exit code
/// and stderr lines. Fails if it keeps running for 10 s.
pub fn run_refused(cmd: &mut std::process::Command) -> (i32, Vec<String>) {
    use std::process::Stdio;
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawn vutap");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for vutap") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("vutap {cmd:?} kept running instead of refusing");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().expect("piped stderr"), &mut err).expect("read stderr");
    let lines: Vec<String> = err.lines().filter(|l| !l.trim().is_empty()).map(str::to_string).collect();
    eprintln!("vutap {cmd:?} -> {status}: {lines:?}");
    (status.code().expect("exited, not killed"), lines)
}
