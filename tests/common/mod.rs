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
use vutap::device::Device;
use vutap::sandbox::Seccomp;
use vutap::tap::TapSpec;
use vutap::vhost_user::{bind_socket, serve_counted};
use vutap_bench::frontend::{FrontendOptions, NetFrontend};
use vutap_bench::packet;
use vutap_bench::testbed::{MacvtapMode, Topology};

/// Experimental ethertype of the plain test frames, and their magic.
pub const ETHERTYPE: u16 = 0x88b5;
pub const MAGIC: &[u8; 8] = b"VUTAPIT!";

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

pub fn sh(prog: &str, args: &[&str]) {
    let st = std::process::Command::new(prog)
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("spawn {prog}: {e}"));
    assert!(st.success(), "`{prog} {}` failed: {st}", args.join(" "));
}

pub fn parse_mac(s: &str) -> [u8; 6] {
    vutap::tap::parse_mac(s.trim()).unwrap_or_else(|| panic!("bad MAC {s:?}"))
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
    let policy = Policy { seccomp: Seccomp::ON, exit_on_tap_loss: false };
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
            let r = vutap::vhost_user::serve(&vutap::vhost_user::SocketMode::Server(path), d, false);
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
fn no_ipv6(ifname: &str) {
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6"), "1");
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

// ------------------------------------------------------------------------------- frames

pub fn is_test_frame(f: &[u8]) -> bool {
    f.len() >= 26 && f[12..14] == ETHERTYPE.to_be_bytes() && &f[14..22] == MAGIC
}

pub fn seq_of(f: &[u8]) -> u32 {
    u32::from_be_bytes(f[22..26].try_into().unwrap())
}

fn pattern(out: &mut Vec<u8>, len: usize, seed: u32) {
    let mut x = seed.wrapping_mul(2_654_435_761) | 1;
    while out.len() < len {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        out.push((x >> 16) as u8);
    }
    out.truncate(len);
}

/// A `len`-byte Ethernet frame with our ethertype, magic, `seq` and a pseudo-random pattern.
pub fn test_frame(dst: [u8; 6], src: [u8; 6], len: usize, seq: u32) -> Vec<u8> {
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.extend_from_slice(MAGIC);
    f.extend_from_slice(&seq.to_be_bytes());
    pattern(&mut f, len, seq);
    f
}

/// Internet checksum (ones' complement sum) of `data`, folded, not inverted, starting at `init`.
pub fn csum_add(init: u32, data: &[u8]) -> u32 {
    let mut s = init;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        s += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [b] = chunks.remainder() {
        s += u32::from(*b) << 8;
    }
    s
}

pub fn csum_fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

pub const IP_TCP: u8 = 6;
pub const IP_UDP: u8 = 17;

/// Pseudo-header sum for `proto` over `len` bytes of L4 (unfolded).
pub fn pseudo_sum(src: [u8; 4], dst: [u8; 4], proto: u8, len: usize) -> u32 {
    csum_add(0, &[src[0], src[1], src[2], src[3], dst[0], dst[1], dst[2], dst[3], 0, proto, (len >> 8) as u8, len as u8])
}

fn ipv4_header(src: [u8; 4], dst: [u8; 4], proto: u8, l4_len: usize, id: u16) -> [u8; 20] {
    let total = (20 + l4_len) as u16;
    let mut h = [0u8; 20];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&total.to_be_bytes());
    h[4..6].copy_from_slice(&id.to_be_bytes());
    h[6] = 0x40; // DF
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(&src);
    h[16..20].copy_from_slice(&dst);
    let c = !csum_fold(csum_add(0, &h));
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h
}

/// An Ethernet/IPv4/UDP frame (valid IP and UDP checksums) whose payload starts with `seq`.
pub fn udp_frame(dst: [u8; 6], src: [u8; 6], ips: ([u8; 4], [u8; 4]), ports: (u16, u16), payload_len: usize, seq: u32) -> Vec<u8> {
    let mut payload = seq.to_be_bytes().to_vec();
    pattern(&mut payload, payload_len.max(4), seq);
    let l4_len = 8 + payload.len();
    let mut udp = Vec::with_capacity(l4_len);
    udp.extend_from_slice(&ports.0.to_be_bytes());
    udp.extend_from_slice(&ports.1.to_be_bytes());
    udp.extend_from_slice(&(l4_len as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(&payload);
    let c = !csum_fold(csum_add(pseudo_sum(ips.0, ips.1, IP_UDP, l4_len), &udp));
    udp[6..8].copy_from_slice(&(if c == 0 { 0xffff } else { c }).to_be_bytes());
    let mut f = Vec::with_capacity(14 + 20 + l4_len);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    f.extend_from_slice(&ipv4_header(ips.0, ips.1, IP_UDP, l4_len, seq as u16));
    f.extend_from_slice(&udp);
    f
}

/// UDP ports of an Ethernet/IPv4/UDP frame, if it is one.
pub fn udp_ports(f: &[u8]) -> Option<(u16, u16)> {
    (f.len() >= 42 && f[12..14] == [0x08, 0x00] && f[23] == IP_UDP)
        .then(|| (u16::from_be_bytes([f[34], f[35]]), u16::from_be_bytes([f[36], f[37]])))
}

/// The TCP segment description of [`tcp_frame`].
#[derive(Clone, Copy, Debug)]
pub struct TcpFlow {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src_ip: [u8; 4],
    pub dst_ip: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
}

/// An Ethernet/IPv4/TCP frame (20-byte TCP header, ACK|PSH) carrying `payload`. The TCP
/// checksum field holds the folded pseudo-header sum (what a driver leaves for a NEEDS_CSUM
/// frame), or the full checksum if `full_csum`.
pub fn tcp_frame(fl: &TcpFlow, payload: &[u8], full_csum: bool) -> Vec<u8> {
    let l4_len = 20 + payload.len();
    let mut f = Vec::with_capacity(14 + 20 + l4_len);
    f.extend_from_slice(&fl.dst_mac);
    f.extend_from_slice(&fl.src_mac);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    f.extend_from_slice(&ipv4_header(fl.src_ip, fl.dst_ip, IP_TCP, l4_len, 0x1234));
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&fl.sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&fl.dport.to_be_bytes());
    tcp[4..8].copy_from_slice(&fl.seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&1u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x18; // ACK | PSH
    tcp[14..16].copy_from_slice(&0xffffu16.to_be_bytes());
    let pseudo = pseudo_sum(fl.src_ip, fl.dst_ip, IP_TCP, l4_len);
    let c = if full_csum { !csum_fold(csum_add(csum_add(pseudo, &tcp), payload)) } else { csum_fold(pseudo) };
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&tcp);
    f.extend_from_slice(payload);
    f
}

/// A parsed Ethernet/IPv4/TCP frame.
pub struct TcpSeg<'a> {
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub payload: &'a [u8],
    pub ip_csum_ok: bool,
    pub tcp_csum_ok: bool,
}

pub fn parse_tcp(f: &[u8]) -> Option<TcpSeg<'_>> {
    if f.len() < 54 || f[12..14] != [0x08, 0x00] || f[14] != 0x45 || f[23] != IP_TCP {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([f[16], f[17]]));
    let ip = &f[14..34];
    let l4 = f.get(34..14 + total)?;
    let doff = usize::from(l4[12] >> 4) * 4;
    let src: [u8; 4] = ip[12..16].try_into().unwrap();
    let dst: [u8; 4] = ip[16..20].try_into().unwrap();
    Some(TcpSeg {
        sport: u16::from_be_bytes([l4[0], l4[1]]),
        dport: u16::from_be_bytes([l4[2], l4[3]]),
        seq: u32::from_be_bytes(l4[4..8].try_into().unwrap()),
        payload: &l4[doff..],
        ip_csum_ok: csum_fold(csum_add(0, ip)) == 0xffff,
        tcp_csum_ok: csum_fold(csum_add(pseudo_sum(src, dst, IP_TCP, l4.len()), l4)) == 0xffff,
    })
}

/// Pseudo-random payload bytes.
pub fn payload(len: usize, seed: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    pattern(&mut v, len, seed);
    v
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
