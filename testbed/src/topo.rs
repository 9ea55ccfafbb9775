//! A peer network namespace reached through a veth pair whose host end carries macvtaps:
//!
//! ```text
//!   guest NIC ── /dev/tapN ── macvtap (vt…m0) ─┐
//!                                             veth lower (vt…l) ══ veth peer (vt…p) in netns vt…n
//!                                                                   10.77.S.1/24  (the "far host")
//! ```
//!
//! A macvtap drops frames whose source MAC is not its own (outside passthru mode), so the guest
//! must use [`Tap::mac`]. The host itself cannot talk to the guest through the lower; the peer
//! namespace is the only far end, which keeps all test traffic inside namespaces we made.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use super::cmd::{die_with_parent, run, run_quiet};
use super::{io_err, unique_suffix, Error, Result};

/// Macvtap forwarding mode between macvtaps on the same lower.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MacvtapMode {
    Bridge,
    Vepa,
}

impl MacvtapMode {
    fn as_str(self) -> &'static str {
        match self {
            MacvtapMode::Bridge => "bridge",
            MacvtapMode::Vepa => "vepa",
        }
    }
}

/// One macvtap: its interface, character device and the MAC/IP the guest behind it must use.
#[derive(Debug, Clone)]
pub struct Tap {
    pub ifname: String,
    pub ifindex: u32,
    /// `/dev/tapN` with N = ifindex.
    pub dev: PathBuf,
    /// The macvtap's own MAC; the guest NIC must use exactly this one.
    pub mac: String,
    /// The address to give the guest behind this macvtap.
    pub guest_ip: Ipv4Addr,
}

/// Netns + veth pair + macvtaps; `Drop` deletes all of them.
#[derive(Debug)]
pub struct Topology {
    pub netns: String,
    pub lower: String,
    pub peer: String,
    /// Address of the peer end inside the netns (10.77.S.1).
    pub peer_ip: Ipv4Addr,
    pub prefix_len: u8,
    pub taps: Vec<Tap>,
}

impl Topology {
    /// Creates a topology with `n_taps` macvtaps in `mode` on one veth lower.
    pub fn new(n_taps: usize, mode: MacvtapMode) -> Result<Topology> {
        // Distinct subnets per topology of this process keep logs unambiguous; namespaces isolate
        // them anyway.
        static SUBNET: AtomicU8 = AtomicU8::new(0);
        let subnet = 1 + SUBNET.fetch_add(1, Ordering::Relaxed) % 250;
        sweep_dead_runs();
        let sfx = unique_suffix();
        let mut topo = Topology {
            netns: format!("vt{sfx}n"),
            lower: format!("vt{sfx}l"),
            peer: format!("vt{sfx}p"),
            peer_ip: Ipv4Addr::new(10, 77, subnet, 1),
            prefix_len: 24,
            taps: Vec::new(),
        };
        // From here on `Drop` cleans up whatever part was created if a step fails.
        topo.create_base()?;
        for i in 0..n_taps {
            let tap = topo.create_macvtap(&sfx, i, mode)?;
            topo.taps.push(tap);
        }
        Ok(topo)
    }

    fn create_base(&self) -> Result<()> {
        let (ns, lower, peer) = (&self.netns, &self.lower, &self.peer);
        run("ip", &["netns", "add", ns])?;
        run("ip", &["link", "add", lower, "type", "veth", "peer", "name", peer])?;
        run("ip", &["link", "set", peer, "netns", ns])?;
        let addr = format!("{}/{}", self.peer_ip, self.prefix_len);
        self.exec_ok(&["ip", "addr", "add", &addr, "dev", peer])?;
        self.exec_ok(&["ip", "link", "set", peer, "up"])?;
        self.exec_ok(&["ip", "link", "set", "lo", "up"])?;
        run("ip", &["link", "set", lower, "up"])?;
        Ok(())
    }

    fn create_macvtap(&self, sfx: &str, i: usize, mode: MacvtapMode) -> Result<Tap> {
        let name = format!("vt{sfx}m{i}");
        run("ip", &["link", "add", "link", &self.lower, "name", &name, "type", "macvtap", "mode", mode.as_str()])?;
        run("ip", &["link", "set", &name, "up"])?;
        let sys = PathBuf::from("/sys/class/net").join(&name);
        let ifindex: u32 = read_trimmed(&sys.join("ifindex"))?
            .parse()
            .map_err(|e| Error::Parse { what: format!("ifindex of {name}"), detail: format!("{e}") })?;
        let mac = read_trimmed(&sys.join("address"))?;
        let dev = PathBuf::from(format!("/dev/tap{ifindex}"));
        ensure_tap_node(&dev, &sys.join(format!("macvtap/tap{ifindex}/dev")))?;
        let o = self.peer_ip.octets();
        let guest_ip = Ipv4Addr::new(o[0], o[1], o[2], 2 + i as u8);
        Ok(Tap { ifname: name, ifindex, dev, mac, guest_ip })
    }

    /// `ip netns exec <ns> args...`, returning stdout.
    pub fn exec_ok(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["netns", "exec", &self.netns];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Pings `ip` from the peer namespace; true if any reply came back.
    pub fn ping_from_peer(&self, ip: Ipv4Addr, count: u32) -> bool {
        self.exec_ok(&["ping", "-c", &count.to_string(), "-W", "2", &ip.to_string()]).is_ok()
    }

    /// Starts an iperf3 server in the peer namespace on `port`, ready when this returns.
    pub fn iperf_server(&self, port: u16) -> Result<IperfServer> {
        IperfServer::start(&self.netns, port)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for tap in &self.taps {
            run_quiet("ip", &["link", "del", &tap.ifname]);
        }
        // Deleting the lower removes its veth peer inside the namespace too.
        run_quiet("ip", &["link", "del", &self.lower]);
        run_quiet("ip", &["netns", "del", &self.netns]);
    }
}

/// Deletes namespaces and veths named by [`Topology`] for processes that no longer exist (a test
/// runner killed with SIGKILL never runs `Drop`). Only our exact `vt<pid>-<n>n` pattern matches.
fn sweep_dead_runs() {
    let Ok(list) = run("ip", &["netns", "list"]) else {
        return;
    };
    for ns in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(sfx) = ns.strip_prefix("vt").and_then(|s| s.strip_suffix('n')) else {
            continue;
        };
        let Some((pid, n)) = sfx.split_once('-') else {
            continue;
        };
        let hex = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_hexdigit());
        let Ok(pid) = u32::from_str_radix(pid, 16) else {
            continue;
        };
        if !hex(n) || pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        log::info!("removing leftovers of dead run {sfx}");
        run_quiet("ip", &["link", "del", &format!("vt{sfx}l")]);
        run_quiet("ip", &["netns", "del", ns]);
    }
}

fn read_trimmed(path: &Path) -> Result<String> {
    let s = std::fs::read_to_string(path).map_err(io_err(format!("read {}", path.display())))?;
    Ok(s.trim().to_string())
}

/// Waits for devtmpfs/udev to create `/dev/tapN`; creates it from sysfs `major:minor` if it
/// never appears (hosts without udev and without devtmpfs on /dev).
fn ensure_tap_node(dev: &Path, sys_dev: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if dev.exists() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let majmin = read_trimmed(sys_dev)?;
    let (maj, min) = majmin.split_once(':').ok_or_else(|| Error::Parse { what: sys_dev.display().to_string(), detail: majmin.clone() })?;
    run("mknod", &[dev.to_str().unwrap_or_default(), "c", maj, min])?;
    Ok(())
}

/// An `iperf3 -s` child running in a namespace; killed on `Drop`.
#[derive(Debug)]
pub struct IperfServer {
    child: Child,
    pub port: u16,
}

impl IperfServer {
    fn start(netns: &str, port: u16) -> Result<IperfServer> {
        let port_s = port.to_string();
        // `ip netns exec` execs iperf3 in place, so killing this child kills the server.
        let mut cmd = Command::new("ip");
        die_with_parent(&mut cmd);
        let child = cmd
            .args(["netns", "exec", netns, "iperf3", "-s", "-p", &port_s])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(io_err("spawn iperf3 server"))?;
        let server = IperfServer { child, port };
        let filter = format!("sport = :{port}");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let out = run("ip", &["netns", "exec", netns, "ss", "-Hltn", &filter])?;
            if !out.trim().is_empty() {
                return Ok(server);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(Error::Timeout {
            what: format!("iperf3 server to listen on port {port} in {netns}"),
            after: Duration::from_secs(5),
            tail: String::new(),
        })
    }
}

impl Drop for IperfServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
