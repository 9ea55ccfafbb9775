//! One end-to-end run shared by the e2e tests and `vutap-vm`: boot a guest on a macvtap of a
//! [`Topology`] (through vutap or QEMU's tap backend), ping the peer netns, iperf3 both ways.

use std::fmt;
use std::time::Duration;

use serde::Serialize;

use super::guest::{Guest, GuestConfig, Nic, PingResult, QemuVersion, QueuePackets};
use super::host_cpu::{CpuUsed, DatapathCpu};
use super::iperf::IperfResult;
use super::topo::{Tap, Topology};
use super::vutap::Vutap;
use super::{log_dir, Error, Result};

/// Which data path carries the guest's frames to the macvtap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Backend {
    /// vutap over vhost-user.
    Vutap,
    /// QEMU's built-in tap backend.
    QemuTap,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Vutap => "vutap",
            Backend::QemuTap => "qemu-tap",
        })
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub qemu: QemuVersion,
    pub backend: Backend,
    pub queues: u16,
    pub ping_count: u32,
    pub iperf_secs: u32,
    /// Parallel iperf3 streams; 0 means one per queue pair.
    pub streams: u16,
    /// Hash the guest's TX flows over its queues (XPS off) instead of pinning them to the
    /// sending CPU's queue, so that many streams use every queue pair both ways.
    pub spread_flows: bool,
    /// Extra vutap options (vutap backend only).
    pub vutap_args: Vec<String>,
}

/// What came out of it.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub qemu: QemuVersion,
    pub backend: Backend,
    pub queues: u16,
    pub streams: u16,
    pub boot_secs: f64,
    pub ping: PingResult,
    /// Guest sends to the peer.
    pub tx: IperfResult,
    /// Peer sends to the guest (`iperf3 -R`).
    pub rx: IperfResult,
    /// Host CPU of the guest's datapath during each run ([`DatapathCpu`]).
    pub tx_cpu: CpuUsed,
    pub rx_cpu: CpuUsed,
    /// Packets each of the guest's queue pairs carried during the run (from `ethtool -S`).
    pub per_queue: Vec<QueuePackets>,
}

/// Port of the iperf3 server in the peer namespace.
const IPERF_PORT: u16 = 5201;

impl Scenario {
    /// Runs it on `tap` of `topo`; logs go to `results/tmp/<name>/`.
    pub fn run(&self, topo: &Topology, tap: &Tap, name: &str) -> Result<Outcome> {
        let dir = log_dir(name)?;
        let queues = self.queues.max(1);
        // Keep vutap alive for the whole guest lifetime: declared before `guest`, dropped after.
        let mut vutap = None;
        let nic = match self.backend {
            Backend::QemuTap => Nic::QemuTap { tap_path: tap.dev.clone(), queues, mac: tap.mac.clone() },
            Backend::Vutap => {
                let socket = dir.join("vutap.sock");
                let tap_arg = tap.dev.to_str().unwrap_or_default().to_string();
                let extra: Vec<&str> = self.vutap_args.iter().map(String::as_str).collect();
                let v = Vutap::spawn(&socket, tap.dev.as_ref(), queues, &extra, &dir)
                    .map_err(|e| Error::Setup(format!("starting vutap on {tap_arg}: {e}")))?;
                vutap = Some(v);
                Nic::VhostUser { socket, queues, mac: tap.mac.clone() }
            }
        };
        let result = self.drive(topo, tap, name, nic, vutap.as_ref(), &dir);
        match (result, &vutap) {
            (Err(e), Some(v)) => Err(Error::Setup(format!("{e}\n--- vutap log ({}):\n{}", v.log.display(), tail(&v.log_text())))),
            (r, _) => r,
        }
    }

    /// The guest part of [`Scenario::run`], once the backend is up.
    fn drive(&self, topo: &Topology, tap: &Tap, name: &str, nic: Nic, vutap: Option<&Vutap>, dir: &std::path::Path) -> Result<Outcome> {
        let queues = nic.queues();
        let mut guest = Guest::boot(GuestConfig::new(self.qemu, nic, dir.to_path_buf()))?;
        log::info!("{name}: booted in {:.1} s", guest.boot_time.as_secs_f64());
        guest.configure_ip(tap.guest_ip, topo.prefix_len)?;
        if queues > 1 {
            guest.set_channels(queues)?;
        }
        if self.spread_flows {
            guest.spread_tx_flows()?;
        }
        let before = guest.queue_packets()?;
        let ping = guest.ping(topo.peer_ip, self.ping_count)?;
        let streams = if self.streams == 0 { queues } else { self.streams };
        let _server = topo.iperf_server(IPERF_PORT)?;
        let cpu = |guest: &Guest| DatapathCpu::read([(guest, vutap)]);
        let cpu_start = cpu(&guest);
        let tx = guest.iperf3(topo.peer_ip, IPERF_PORT, self.iperf_secs, streams, false)?;
        let cpu_between = cpu(&guest);
        let rx = guest.iperf3(topo.peer_ip, IPERF_PORT, self.iperf_secs, streams, true)?;
        let (tx_cpu, rx_cpu) = (cpu_between.since(cpu_start), cpu(&guest).since(cpu_between));
        let after = guest.queue_packets()?;
        let per_queue = after.iter().zip(&before).map(|(a, b)| a.since(b)).collect();
        let outcome = Outcome {
            qemu: self.qemu,
            backend: self.backend,
            queues,
            streams,
            boot_secs: guest.boot_time.as_secs_f64(),
            ping,
            tx,
            rx,
            tx_cpu,
            rx_cpu,
            per_queue,
        };
        if let Err(e) = guest.shutdown(Duration::from_secs(10)) {
            log::warn!("{name}: {e}");
        }
        Ok(outcome)
    }
}

fn tail(s: &str) -> &str {
    let mut start = s.len().saturating_sub(3000);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}
