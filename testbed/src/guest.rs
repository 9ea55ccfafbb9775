//! A tiny busybox guest under TCG QEMU with one virtio-net NIC, driven over its serial console.
//!
//! The NIC is either QEMU's own tap backend on a macvtap (`-netdev tap,fds=...`) or a vhost-user
//! socket served by vutap. Guest memory is always a shared memfd so both variants run the same
//! machine (vhost-user requires it).

use std::fmt;
use std::fs::{File, OpenOptions};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::cmd::die_with_parent;
use super::console::Console;
use super::iperf::IperfResult;
use super::{ensure_guest_built, io_err, workspace_root, Error, Result};

/// Printed by scripts/guest-init once the shell is about to read the console.
pub(crate) const READY_MARKER: &str = "__VUTAP_GUEST_READY__";

/// Which of the two unpacked QEMU builds under `.deps/` to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum QemuVersion {
    /// Debian bookworm's QEMU 7.2.
    V7,
    /// bookworm-backports' QEMU 10.0.
    V10,
}

impl QemuVersion {
    pub(crate) fn dir(self) -> PathBuf {
        workspace_root().join(match self {
            QemuVersion::V7 => ".deps/qemu7",
            QemuVersion::V10 => ".deps/qemu10",
        })
    }

    pub fn label(self) -> &'static str {
        match self {
            QemuVersion::V7 => "7.2",
            QemuVersion::V10 => "10.0",
        }
    }
}

impl fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// The guest's network backend.
#[derive(Debug, Clone)]
pub enum Nic {
    /// QEMU's built-in tap backend on a (mac)vtap character device, opened once per queue pair.
    QemuTap { tap_path: PathBuf, queues: u16, mac: String },
    /// A vhost-user-net backend listening on `socket`.
    VhostUser { socket: PathBuf, queues: u16, mac: String },
}

impl Nic {
    pub fn queues(&self) -> u16 {
        match self {
            Nic::QemuTap { queues, .. } | Nic::VhostUser { queues, .. } => *queues,
        }
    }

    fn mac(&self) -> &str {
        match self {
            Nic::QemuTap { mac, .. } | Nic::VhostUser { mac, .. } => mac,
        }
    }
}

/// How to boot a guest.
#[derive(Debug, Clone)]
pub struct GuestConfig {
    pub qemu: QemuVersion,
    pub nic: Nic,
    pub smp: u16,
    pub mem_mb: u32,
    pub boot_timeout: Duration,
    /// Where `qemu.log` (stderr) and `console.log` (serial) go.
    pub log_dir: PathBuf,
    /// vhost-user only: the chardev reconnects when the backend goes away (QEMU 7.2
    /// `reconnect=1`, QEMU 10 `reconnect-ms=1000`), so a restarted vutap picks the guest up again.
    pub chardev_reconnect: bool,
    /// `-incoming URI` (e.g. `tcp:127.0.0.1:4444`): a live-migration destination. [`Guest::boot`]
    /// then returns as soon as QEMU runs, without waiting for the shell (the guest arrives
    /// already booted; its console continues where the source's left off).
    pub incoming: Option<String>,
    /// `-monitor unix:PATH,server=on,wait=off`, for [`Guest::hmp`].
    pub monitor: Option<PathBuf>,
    /// Give the NIC `vectors=0` (INTx) whatever the backend. QEMU 7.2 under TCG always needs it
    /// for vhost-user; setting it for QEMU's tap backend too makes a like-for-like comparison.
    pub force_intx: bool,
    /// QEMU tap only: open the queue detached (`TUNSETQUEUE IFF_DETACH_QUEUE`), so it takes no
    /// frames from the macvtap until [`Guest::set_tap_attached`] — a migration destination's
    /// second queue on the source's macvtap (QEMU never attaches a single-queue tap itself).
    pub tap_detached: bool,
    /// `-S`: with [`GuestConfig::incoming`], the destination stays paused after the migration
    /// (HMP `cont` starts it), e.g. to compare its memory with the source's.
    pub start_paused: bool,
}

impl GuestConfig {
    /// 2 vCPUs, 512 MiB, 60 s to boot (TCG on a busy 2-core host can be slow).
    pub fn new(qemu: QemuVersion, nic: Nic, log_dir: PathBuf) -> GuestConfig {
        GuestConfig {
            qemu,
            nic,
            smp: 2,
            mem_mb: 512,
            boot_timeout: Duration::from_secs(60),
            log_dir,
            chardev_reconnect: false,
            incoming: None,
            monitor: None,
            force_intx: false,
            tap_detached: false,
            start_paused: false,
        }
    }
}

/// Result of a guest `ping`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct PingResult {
    pub transmitted: u32,
    pub received: u32,
    pub avg_ms: Option<f64>,
}

/// A running guest; `Drop` kills QEMU.
pub struct Guest {
    child: Child,
    // Declared after `child` on purpose: dropped after `Drop::drop` killed QEMU, so the reader
    // thread sees EOF.
    console: Console,
    pub config: GuestConfig,
    /// Time from spawning QEMU to the ready marker.
    pub boot_time: Duration,
    /// QEMU tap only: our copies of the queue fds QEMU got (same open files), for
    /// [`Guest::set_tap_attached`].
    tap_fds: Vec<OwnedFd>,
}

impl Guest {
    /// Boots the guest and waits for its shell.
    pub fn boot(config: GuestConfig) -> Result<Guest> {
        let (kernel, initrd) = ensure_guest_built()?;
        let dir = config.qemu.dir();
        let qemu_bin = dir.join("usr/bin/qemu-system-x86_64");
        if !qemu_bin.exists() {
            return Err(Error::Setup(format!("{} missing: run scripts/install-deps.sh", qemu_bin.display())));
        }
        std::fs::create_dir_all(&config.log_dir).map_err(io_err(format!("create {}", config.log_dir.display())))?;
        let qemu_log = config.log_dir.join("qemu.log");
        let stderr = File::create(&qemu_log).map_err(io_err(format!("create {}", qemu_log.display())))?;
        let console_log = config.log_dir.join("console.log");
        let console_file = File::create(&console_log).map_err(io_err(format!("create {}", console_log.display())))?;

        let mut cmd = Command::new(&qemu_bin);
        cmd.env("QEMU_MODULE_DIR", dir.join("usr/lib/x86_64-linux-gnu/qemu"));
        cmd.args(["-L", path_str(&dir.join("usr/share/qemu"))?]);
        cmd.args(["-L", "/usr/share/seabios", "-L", "/usr/lib/ipxe/qemu"]);
        cmd.args(["-display", "none", "-nodefaults", "-serial", "stdio", "-no-reboot"]);
        // Names the vCPU threads ("CPU 0/TCG"), so host CPU can be split into the guest's own
        // and QEMU's device work (the seed's datapath CPU).
        cmd.args(["-name", "guest,debug-threads=on"]);
        cmd.args(["-accel", "tcg", "-smp", &config.smp.to_string()]);
        let mem = format!("{}M", config.mem_mb);
        cmd.args(["-object", &format!("memory-backend-memfd,id=mem,size={mem},share=on")]);
        cmd.args(["-numa", "node,memdev=mem", "-m", &mem]);
        cmd.args(["-kernel", path_str(&kernel)?, "-initrd", path_str(&initrd)?]);
        cmd.args(["-append", "console=ttyS0 quiet panic=-1"]);
        let tap_fds = add_nic_args(&mut cmd, &config)?;
        if let Some(mon) = &config.monitor {
            let _ = std::fs::remove_file(mon);
            cmd.args(["-monitor", &format!("unix:{},server=on,wait=off", path_str(mon)?)]);
        }
        if let Some(uri) = &config.incoming {
            cmd.args(["-incoming", uri]);
        }
        if config.start_paused {
            cmd.arg("-S");
        }
        if !tap_fds.is_empty() {
            let raw: Vec<RawFd> = tap_fds.iter().map(|f| f.as_raw_fd()).collect();
            // SAFETY: the closure runs in the forked child before exec and only calls dup2, which
            // is async-signal-safe. `raw` holds fds that stay open in the parent (owned by
            // `tap_fds`, alive until after spawn) and are all >= FD_BASE, so dup2 onto 3.. never
            // clobbers a source fd still to be copied. dup2 clears FD_CLOEXEC on the target, so
            // exactly fds 3..3+n survive into QEMU.
            unsafe {
                cmd.pre_exec(move || {
                    for (i, fd) in raw.iter().enumerate() {
                        if libc::dup2(*fd, 3 + i as RawFd) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        die_with_parent(&mut cmd);
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(stderr);

        let started = Instant::now();
        let mut child = cmd.spawn().map_err(io_err(format!("spawn {}", qemu_bin.display())))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            return Err(Error::Setup("QEMU stdio pipes missing".into()));
        };
        let console = Console::new(stdin, stdout, console_file);
        let mut guest = Guest { child, console, config, boot_time: Duration::ZERO, tap_fds };
        if guest.config.incoming.is_some() {
            // Nothing to wait for: the guest's state arrives with the migration.
            return Ok(guest);
        }
        if let Err(e) = guest.console.wait_for(READY_MARKER, 0, guest.config.boot_timeout) {
            let log = std::fs::read_to_string(&qemu_log).unwrap_or_default();
            return Err(Error::Setup(format!("guest did not boot: {e}\nqemu.log:\n{log}")));
        }
        guest.boot_time = started.elapsed();
        // Throwaway command: makes sure the shell itself is reading (not just /init).
        guest.run("true", Duration::from_secs(20))?;
        Ok(guest)
    }

    /// Runs a one-line shell command in the guest; returns `(exit status, output)`.
    pub fn run(&mut self, cmd: &str, timeout: Duration) -> Result<(i32, String)> {
        self.console.run(cmd, timeout)
    }

    /// Like [`Guest::run`] but a non-zero exit is an error.
    pub fn run_ok(&mut self, cmd: &str, timeout: Duration) -> Result<String> {
        let (code, out) = self.run(cmd, timeout)?;
        if code != 0 {
            return Err(Error::Command { cmd: format!("(guest) {cmd}"), status: code.to_string(), stderr: out });
        }
        Ok(out)
    }

    /// Brings eth0 up with `ip/prefix`.
    pub fn configure_ip(&mut self, ip: Ipv4Addr, prefix: u8) -> Result<()> {
        let t = Duration::from_secs(20);
        self.run_ok(&format!("ip addr add {ip}/{prefix} dev eth0"), t)?;
        self.run_ok("ip link set eth0 up", t)?;
        Ok(())
    }

    /// `ethtool -L eth0 combined n`: how many queue pairs the guest driver uses.
    pub fn set_channels(&mut self, n: u16) -> Result<()> {
        self.run_ok(&format!("ethtool -L eth0 combined {n}"), Duration::from_secs(20)).map(drop)
    }

    /// Turns XPS off on every TX queue, so the driver picks a flow's queue by its hash rather
    /// than by the sending CPU: with many flows every queue carries some.
    pub fn spread_tx_flows(&mut self) -> Result<()> {
        self.run_ok("for f in /sys/class/net/eth0/queues/tx-*/xps_cpus; do echo 0 > $f; done", Duration::from_secs(20)).map(drop)
    }

    /// Packets per queue pair so far, from the virtio-net driver's `ethtool -S` counters.
    pub fn queue_packets(&mut self) -> Result<Vec<QueuePackets>> {
        let out = self.run_ok("ethtool -S eth0", Duration::from_secs(20))?;
        Ok(QueuePackets::parse(&out))
    }

    /// Pings `ip` `count` times (0.2 s apart). A run with lost replies is not an error.
    pub fn ping(&mut self, ip: Ipv4Addr, count: u32) -> Result<PingResult> {
        let timeout = Duration::from_secs(10 + 2 * count as u64);
        let (_, out) = self.run(&format!("ping -c {count} -i 0.2 -W 2 {ip}"), timeout)?;
        parse_ping(&out)
    }

    /// Runs an iperf3 client against `server:port` for `secs` with `streams` parallel streams;
    /// `reverse` makes the server send (peer → guest).
    pub fn iperf3(&mut self, server: Ipv4Addr, port: u16, secs: u32, streams: u16, reverse: bool) -> Result<IperfResult> {
        let r = if reverse { " -R" } else { "" };
        let cmd = format!("iperf3 -c {server} -p {port} -t {secs} -P {streams} -i 0 -J --connect-timeout 5000{r}");
        let (_, out) = self.run(&cmd, Duration::from_secs(secs as u64 + 60))?;
        IperfResult::parse(&out)
    }

    /// `poweroff -f` and wait up to `timeout` for QEMU to exit (killed after that).
    pub fn shutdown(mut self, timeout: Duration) -> Result<()> {
        self.console.send_line("poweroff -f")?;
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.child.try_wait().map_err(io_err("wait for QEMU"))?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(Error::Timeout { what: "guest poweroff".into(), after: timeout, tail: self.console.tail(500) })
    }

    /// QEMU's stderr so far.
    pub fn qemu_log(&self) -> String {
        std::fs::read_to_string(self.config.log_dir.join("qemu.log")).unwrap_or_default()
    }

    /// Sends a raw line to the guest shell without waiting for anything (e.g. a foreground
    /// command whose end is awaited with [`Guest::wait_output`], possibly on a migration
    /// destination's console).
    pub fn send_line(&mut self, line: &str) -> Result<()> {
        self.console.send_line(line)
    }

    /// Waits until `needle` appears in this QEMU's console output (searched from its start).
    pub fn wait_output(&self, needle: &str, timeout: Duration) -> Result<()> {
        self.console.wait_for(needle, 0, timeout).map(drop)
    }

    /// Runs one HMP command on the monitor set up by [`GuestConfig::monitor`].
    pub fn hmp(&self, cmd: &str, timeout: Duration) -> Result<String> {
        let mon = self.config.monitor.as_deref().ok_or_else(|| Error::Setup("guest has no monitor socket".into()))?;
        super::monitor::hmp(mon, cmd, timeout)
    }

    /// QEMU tap only: attaches (true) or detaches (false) this guest's tap queues on the
    /// macvtap (`TUNSETQUEUE`), e.g. to hand a macvtap over from a migration source to its
    /// destination. Already in that state is not an error.
    pub fn set_tap_attached(&self, attached: bool) -> Result<()> {
        for fd in &self.tap_fds {
            set_queue_attached(fd.as_raw_fd(), attached)?;
        }
        Ok(())
    }

    /// QEMU's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether QEMU is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// First fd number the tap fds are moved to before fork (see the SAFETY note in `boot`).
const FD_BASE: RawFd = 64;

/// Appends `-netdev/-device` (and `-chardev`) for the NIC; returns the tap fds to pass as 3, 4, ...
fn add_nic_args(cmd: &mut Command, config: &GuestConfig) -> Result<Vec<OwnedFd>> {
    let q = config.nic.queues().max(1);
    let mut fds = Vec::new();
    match &config.nic {
        Nic::QemuTap { tap_path, .. } => {
            for _ in 0..q {
                let f = OpenOptions::new().read(true).write(true).open(tap_path).map_err(io_err(format!("open {}", tap_path.display())))?;
                if config.tap_detached {
                    set_queue_attached(f.as_raw_fd(), false)?;
                }
                fds.push(dup_above(&f, FD_BASE)?);
            }
            let list: Vec<String> = (0..q).map(|i| (3 + i).to_string()).collect();
            let fd_arg = if q == 1 { "fd=3".to_string() } else { format!("fds={}", list.join(":")) };
            cmd.args(["-netdev", &format!("tap,id=n0,{fd_arg},vhost=off")]);
        }
        Nic::VhostUser { socket, .. } => {
            cmd.args([
                "-chardev",
                &format!(
                    "socket,id=c0,path={}{}",
                    path_str(socket)?,
                    match (config.chardev_reconnect, config.qemu) {
                        (false, _) => "",
                        (true, QemuVersion::V7) => ",reconnect=1",
                        (true, QemuVersion::V10) => ",reconnect-ms=1000",
                    }
                ),
            ]);
            cmd.args(["-netdev", &format!("vhost-user,id=n0,chardev=c0,queues={q}")]);
        }
    }
    // romfile= : no iPXE option ROM, we boot with -kernel and it only costs boot time.
    let mut dev = format!("virtio-net-pci,netdev=n0,mac={},romfile=", config.nic.mac());
    if q > 1 {
        dev.push_str(",mq=on");
    }
    let vhost_user = matches!(config.nic, Nic::VhostUser { .. });
    if (vhost_user && config.qemu == QemuVersion::V7) || config.force_intx {
        // QEMU 7.2 under TCG segfaults with a vhost-user NIC using MSI-X: use INTx.
        dev.push_str(",vectors=0");
    } else if q > 1 {
        dev.push_str(&format!(",vectors={}", 2 * q + 2));
    }
    cmd.args(["-device", &dev]);
    Ok(fds)
}

/// `TUNSETQUEUE` with `IFF_ATTACH_QUEUE`/`IFF_DETACH_QUEUE`; EINVAL (already so) is fine.
fn set_queue_attached(fd: RawFd, attached: bool) -> Result<()> {
    const TUNSETQUEUE: libc::c_ulong = 0x4004_54d9;
    // struct ifreq: 16-byte name (empty), then the flags.
    let mut req = [0u8; 40];
    let flag: u16 = if attached { 0x0200 } else { 0x0400 };
    req[16..18].copy_from_slice(&flag.to_ne_bytes());
    // SAFETY: `req` is a zeroed buffer the size of struct ifreq, alive across the call;
    // TUNSETQUEUE reads only the flags from it.
    let ret = unsafe { libc::ioctl(fd, TUNSETQUEUE as _, req.as_mut_ptr()) };
    let err = std::io::Error::last_os_error();
    if ret < 0 && err.raw_os_error() != Some(libc::EINVAL) {
        return Err(io_err(format!("TUNSETQUEUE attach={attached}"))(err));
    }
    Ok(())
}

/// Duplicates `f` to the lowest free fd >= `min` (close-on-exec set).
fn dup_above(f: &File, min: RawFd) -> Result<OwnedFd> {
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) on a valid open fd borrowed from `f`; no memory is touched.
    let fd = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_DUPFD_CLOEXEC, min) };
    if fd < 0 {
        return Err(io_err("dup tap fd")(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by fcntl, is open, and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().ok_or_else(|| Error::Setup(format!("non-UTF-8 path {}", p.display())))
}

/// Parses busybox ping's summary: "N packets transmitted, M packets received" and
/// "round-trip min/avg/max = a/b/c ms".
pub(crate) fn parse_ping(out: &str) -> Result<PingResult> {
    let bad = || Error::Parse { what: "ping output".into(), detail: out.trim().to_string() };
    let line = out.lines().find(|l| l.contains("packets transmitted")).ok_or_else(bad)?;
    let nums: Vec<u32> =
        line.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).take(2).filter_map(|s| s.parse().ok()).collect();
    let [transmitted, received] = nums[..] else {
        return Err(bad());
    };
    let avg_ms =
        out.lines().find_map(|l| l.split_once("min/avg/max = ")).and_then(|(_, v)| v.split('/').nth(1)).and_then(|s| s.trim().parse().ok());
    Ok(PingResult { transmitted, received, avg_ms })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_busybox_ping() {
        let out = "PING 10.77.1.1 (10.77.1.1): 56 data bytes\n64 bytes from 10.77.1.1: seq=0 ttl=64 time=1.2 ms\n\n\
                   --- 10.77.1.1 ping statistics ---\n3 packets transmitted, 2 packets received, 33% packet loss\n\
                   round-trip min/avg/max = 0.9/1.250/1.6 ms\n";
        let p = parse_ping(out).unwrap();
        assert_eq!((p.transmitted, p.received), (3, 2));
        assert_eq!(p.avg_ms, Some(1.25));
        let none = "--- x ping statistics ---\n2 packets transmitted, 0 packets received, 100% packet loss\n";
        assert_eq!(parse_ping(none).unwrap().received, 0);
        assert!(parse_ping("ping: sendto: Network unreachable").is_err());
    }
}

/// Packets one queue pair of the guest's NIC carried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct QueuePackets {
    pub rx: u64,
    pub tx: u64,
}

impl QueuePackets {
    /// Parses `ethtool -S` of virtio-net (`rx_queue_N_packets: V`, `tx_queue_N_packets: V`)
    /// into one entry per queue pair.
    pub fn parse(out: &str) -> Vec<QueuePackets> {
        let mut queues: Vec<QueuePackets> = Vec::new();
        for line in out.lines() {
            let Some((key, value)) = line.trim().split_once(':') else { continue };
            let Ok(value) = value.trim().parse::<u64>() else { continue };
            let (dir, rest) = if let Some(r) = key.strip_prefix("rx_queue_") {
                (0, r)
            } else if let Some(r) = key.strip_prefix("tx_queue_") {
                (1, r)
            } else {
                continue;
            };
            let Some(Ok(q)) = rest.strip_suffix("_packets").map(str::parse::<usize>) else { continue };
            if queues.len() <= q {
                queues.resize(q + 1, QueuePackets::default());
            }
            if dir == 0 {
                queues[q].rx = value;
            } else {
                queues[q].tx = value;
            }
        }
        queues
    }

    /// What was carried between `earlier` and `self`.
    pub fn since(&self, earlier: &QueuePackets) -> QueuePackets {
        QueuePackets { rx: self.rx.saturating_sub(earlier.rx), tx: self.tx.saturating_sub(earlier.tx) }
    }
}

#[cfg(test)]
mod queue_packets_tests {
    use super::QueuePackets;

    #[test]
    fn test_queue_packets_parse_virtio_net_ethtool_stats() {
        let out = "NIC statistics:\n     rx_packets: 9\n     rx_queue_0_packets: 5\n     rx_queue_0_bytes: 700\n     \
                   rx_queue_1_packets: 4\n     tx_queue_0_packets: 3\n     tx_queue_1_packets: 0\n     tx_queue_1_kicks: 2\n";
        assert_eq!(QueuePackets::parse(out), vec![QueuePackets { rx: 5, tx: 3 }, QueuePackets { rx: 4, tx: 0 }]);
        assert_eq!(QueuePackets { rx: 5, tx: 3 }.since(&QueuePackets { rx: 2, tx: 3 }), QueuePackets { rx: 3, tx: 0 });
    }
}
