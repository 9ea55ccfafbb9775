//! The seed's macvtap experiment with real guests, vutap and QEMU's tap backend side by
//! side in the same run.
//!
//! - **external**: one guest on a bridge-mode macvtap of the veth lower; iperf3 against the server
//!   in the peer namespace (the seed's "VM to external host").
//! - **internal**: two guests, each on its own bridge-mode macvtap of the same lower; guest B runs
//!   `iperf3 -s -D`, guest A the client (the seed's "VM to VM through one macvtap bridge").
//! - **VEPA check**: two guests on VEPA-mode macvtaps: they reach the peer but not each other,
//!   until the peer end (the "switch") becomes a bridge port with hairpin on.
//!
//! A *group* is one boot of the guest(s) with one backend, QEMU version and queue-pair count.
//! The groups of all backends of one (path, QEMU, queue pairs) block are booted side by side on
//! their own macvtaps of the same lower (idle TCG guests cost little), then every cell (streams ×
//! direction) is measured with each backend in turn, the order rotating from cell to cell, so the
//! noise of other work on the host hits every backend alike. Under TCG the guests are CPU-bound:
//! internal guests get `-smp 1` each (two busy guests on a 2-core host), external ones `-smp 2`.

use std::fmt;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Deserializer, Serialize};

use vutap_testbed::guest::{Guest, GuestConfig, Nic, QemuVersion};
use vutap_testbed::host_cpu::{CpuUsed, DatapathCpu};
use vutap_testbed::topo::{MacvtapMode, Tap, Topology};
use vutap_testbed::vutap::Vutap;
use vutap_testbed::{log_dir, Error, Result};

/// Which of the seed's two measurements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SeedPath {
    /// Guest to a host behind the lower (peer netns).
    External,
    /// Guest to guest through the macvtap bridge.
    Internal,
}

impl fmt::Display for SeedPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SeedPath::External => "external",
            SeedPath::Internal => "internal",
        })
    }
}

/// The guest NIC's data path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Variant {
    /// vutap over vhost-user (INTx on QEMU 7.2, MSI-X on 10).
    Vutap,
    /// QEMU's tap backend (`-netdev tap,fd=N`), MSI-X.
    QemuTap,
    /// QEMU's tap backend with `vectors=0` (INTx): like for like with vutap on QEMU 7.2.
    QemuTapIntx,
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Variant::Vutap => "vutap",
            Variant::QemuTap => "qemu-tap",
            Variant::QemuTapIntx => "qemu-tap-intx",
        })
    }
}

/// iperf3 direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Direction {
    /// external: guest → host; internal: guest A → guest B.
    Forward,
    /// `iperf3 -R`: external: host → guest; internal: B → A.
    Reverse,
}

impl Direction {
    /// Every label [`Direction::label`] gives.
    const LABELS: [&'static str; 4] = ["guest->host", "host->guest", "A->B", "B->A"];

    pub fn label(self, path: SeedPath) -> &'static str {
        match (path, self) {
            (SeedPath::External, Direction::Forward) => "guest->host",
            (SeedPath::External, Direction::Reverse) => "host->guest",
            (SeedPath::Internal, Direction::Forward) => "A->B",
            (SeedPath::Internal, Direction::Reverse) => "B->A",
        }
    }
}

/// What to run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SeedPlan {
    pub qemus: Vec<QemuVersion>,
    pub paths: Vec<SeedPath>,
    pub queues: Vec<u16>,
    pub streams: Vec<u16>,
    /// Seconds per iperf3 run.
    pub seconds: u32,
    /// Times each cell is measured (per backend, interleaved); the table shows the median.
    pub rounds: u32,
    /// Also run QEMU's tap backend with `vectors=0` on QEMU 7.2 (like for like with vutap there).
    pub intx_baseline: bool,
    /// Run the VEPA isolation check (on the first QEMU version).
    pub vepa_check: bool,
    /// Prefix of the log directories under `results/tmp/`.
    pub tag: String,
}

/// One iperf3 number (or why there is none).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measurement {
    pub path: SeedPath,
    pub qemu: QemuVersion,
    pub variant: Variant,
    pub queues: u16,
    pub streams: u16,
    pub direction: Direction,
    /// Receiver-side Gbit/s.
    pub gbps: Option<f64>,
    pub retransmits: Option<u64>,
    pub error: Option<String>,
    /// Host load average (1 min) just before this run.
    pub loadavg: f64,
    /// Host CPU the network datapath used during the run ([`DatapathCpu`]).
    #[serde(default)]
    pub cpu: Option<CpuUsed>,
    /// 0-based repetition of the cell.
    pub round: u32,
}

/// One boot of the guest(s).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupRun {
    pub path: SeedPath,
    pub qemu: QemuVersion,
    pub variant: Variant,
    pub queues: u16,
    pub smp: u16,
    /// Host load average (1 min) when the group started: the noise from other work.
    pub loadavg: f64,
    pub boot_secs: f64,
    /// internal: whether A's ping of B got replies (bridge mode: it must).
    pub a_reaches_b: Option<bool>,
    /// vutap's per-pair totals lines, one per guest and pair (`queue pair N stopped; totals: ...`).
    pub vutap_totals: Vec<String>,
    pub error: Option<String>,
}

/// One row cell of the table: vutap vs the QEMU tap backend.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cell {
    pub path: SeedPath,
    #[serde(deserialize_with = "direction_label")]
    pub direction: Label,
    pub qemu: QemuVersion,
    pub queues: u16,
    pub streams: u16,
    pub vutap: Option<f64>,
    pub qemu_tap: Option<f64>,
    pub ratio: Option<f64>,
    /// QEMU tap with `vectors=0` (only when run).
    pub qemu_tap_intx: Option<f64>,
    pub ratio_intx: Option<f64>,
    /// Host CPU seconds of the datapath per GB the receiver got (median over the runs): what
    /// moving the bytes cost outside the guests' own CPUs.
    #[serde(default)]
    pub vutap_cpu_per_gb: Option<f64>,
    /// The part of `vutap_cpu_per_gb` that vutap's processes used; the rest is QEMU's.
    #[serde(default)]
    pub vutap_own_cpu_per_gb: Option<f64>,
    #[serde(default)]
    pub qemu_tap_cpu_per_gb: Option<f64>,
}

/// A fixed label. The alias keeps serde's derive from borrowing a `&str` field from the input
/// (which would tie the report to `'static` input); [`direction_label`] maps it to a constant.
type Label = &'static str;

/// A [`Cell::direction`] read back from JSON: one of [`Direction::LABELS`].
fn direction_label<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<&'static str, D::Error> {
    let s = String::deserialize(d)?;
    Direction::LABELS.into_iter().find(|l| *l == s).ok_or_else(|| serde::de::Error::unknown_variant(&s, &Direction::LABELS))
}

/// Result of the VEPA check.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VepaCheck {
    pub qemu: QemuVersion,
    /// Each VEPA guest pings the peer namespace (the link works).
    pub a_reaches_peer: bool,
    pub b_reaches_peer: bool,
    /// VEPA without a hairpin switch: A → B and B → A (expected: false).
    pub a_reaches_b: bool,
    pub b_reaches_a: bool,
    /// After the peer end becomes a bridge port with `hairpin on`: A → B (expected: true).
    pub a_reaches_b_with_hairpin: bool,
    pub error: Option<String>,
}

impl VepaCheck {
    /// The seed's claim holds: isolated without hairpin, reachable with it, link fine.
    pub fn as_expected(&self) -> bool {
        self.error.is_none()
            && self.a_reaches_peer
            && self.b_reaches_peer
            && !self.a_reaches_b
            && !self.b_reaches_a
            && self.a_reaches_b_with_hairpin
    }
}

/// Everything a run produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SeedReport {
    pub plan: SeedPlan,
    pub started_unix: u64,
    pub duration_secs: f64,
    pub nproc: usize,
    pub groups: Vec<GroupRun>,
    pub measurements: Vec<Measurement>,
    pub cells: Vec<Cell>,
    pub vepa: Option<VepaCheck>,
}

/// Port of the iperf3 servers (peer netns and guest B).
const IPERF_PORT: u16 = 5201;

/// Runs the whole plan. Failures are recorded in the report, not returned (only a topology that
/// cannot be built is an error).
pub fn run(plan: &SeedPlan) -> Result<SeedReport> {
    let started = Instant::now();
    let started_unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    // Up to 3 variants x 2 guests, each on its own macvtap of one bridge-mode lower.
    let topo = Topology::new(6, MacvtapMode::Bridge)?;
    let _server = topo.iperf_server(IPERF_PORT)?;
    let mut groups = Vec::new();
    let mut measurements = Vec::new();
    for &qemu in &plan.qemus {
        for &queues in &plan.queues {
            for &path in &plan.paths {
                let mut variants = vec![Variant::Vutap, Variant::QemuTap];
                if plan.intx_baseline && qemu == QemuVersion::V7 {
                    variants.push(Variant::QemuTapIntx);
                }
                let (gs, ms) = run_block(plan, &topo, path, qemu, queues, &variants);
                groups.extend(gs);
                measurements.extend(ms);
            }
        }
    }
    let vepa = match (plan.vepa_check, plan.qemus.first()) {
        (true, Some(&qemu)) => Some(vepa_check(qemu, &plan.tag)),
        _ => None,
    };
    let cells = cells(plan, &measurements);
    Ok(SeedReport {
        plan: plan.clone(),
        started_unix,
        duration_secs: started.elapsed().as_secs_f64(),
        nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
        groups,
        measurements,
        cells,
        vepa,
    })
}

/// A booted guest and, for vutap, its daemon. Field order matters: the guest is dropped first.
struct Node {
    guest: Guest,
    vutap: Option<Vutap>,
}

fn boot_node(qemu: QemuVersion, variant: Variant, queues: u16, smp: u16, tap: &Tap, prefix_len: u8, dir: &Path) -> Result<Node> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io { context: format!("create {}", dir.display()), source })?;
    let (nic, vutap) = match variant {
        Variant::Vutap => {
            let socket = dir.join("vutap.sock");
            let v = Vutap::spawn(&socket, tap.dev.as_ref(), queues, &[], dir)?;
            let nic = Nic::VhostUser { socket, queues, mac: tap.mac.clone() };
            (nic, Some(v))
        }
        Variant::QemuTap | Variant::QemuTapIntx => (Nic::QemuTap { tap_path: tap.dev.clone(), queues, mac: tap.mac.clone() }, None),
    };
    let mut cfg = GuestConfig::new(qemu, nic, dir.to_path_buf());
    cfg.smp = smp;
    cfg.force_intx = variant == Variant::QemuTapIntx;
    let mut guest = Guest::boot(cfg).map_err(|e| match &vutap {
        Some(v) => Error::Setup(format!("{e}\n--- vutap log:\n{}", v.log_text())),
        None => e,
    })?;
    guest.configure_ip(tap.guest_ip, prefix_len)?;
    if queues > 1 {
        guest.set_channels(queues)?;
    }
    Ok(Node { guest, vutap })
}

/// Shuts the guests down, stops the vutaps, and returns their per-pair totals lines.
fn teardown(nodes: Vec<Node>) -> Vec<String> {
    let mut totals = Vec::new();
    for (i, node) in nodes.into_iter().enumerate() {
        let Node { guest, vutap } = node;
        if let Err(e) = guest.shutdown(Duration::from_secs(10)) {
            log::warn!("guest {i}: {e}");
        }
        if let Some(v) = vutap {
            let log = v.log.clone();
            drop(v);
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let guest_name = if i == 0 { "A" } else { "B" };
            totals.extend(
                text.lines()
                    .filter_map(|l| l.split_once("queue pair "))
                    .filter(|(_, rest)| rest.contains("stopped; totals:"))
                    .map(|(_, rest)| format!("guest {guest_name}: pair {rest}")),
            );
        }
    }
    totals
}

fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg").ok().and_then(|s| s.split_whitespace().next()?.parse().ok()).unwrap_or(0.0)
}

/// One block: the guests of every variant booted side by side (idle TCG guests cost little),
/// then each cell measured with each variant in turn, the order alternating from cell to cell, so
/// that the host's noise hits all variants alike.
fn run_block(
    plan: &SeedPlan,
    topo: &Topology,
    path: SeedPath,
    qemu: QemuVersion,
    queues: u16,
    variants: &[Variant],
) -> (Vec<GroupRun>, Vec<Measurement>) {
    let (n, smp) = match path {
        SeedPath::External => (1, 2),
        SeedPath::Internal => (2, 1),
    };
    let mut groups = Vec::new();
    let mut booted: Vec<Option<Vec<Node>>> = Vec::new();
    for (vi, &variant) in variants.iter().enumerate() {
        let mut group = GroupRun {
            path,
            qemu,
            variant,
            queues,
            smp,
            loadavg: loadavg(),
            boot_secs: 0.0,
            a_reaches_b: None,
            vutap_totals: Vec::new(),
            error: None,
        };
        let name = format!("{}-{path}-{variant}-q{}-{queues}qp", plan.tag, qemu.label());
        eprintln!("== boot {path} | {variant} | QEMU {qemu} | {queues} queue pair(s) | smp {smp} | load {:.1}", group.loadavg);
        let t0 = Instant::now();
        let nodes = (|| -> Result<Vec<Node>> {
            let dir = log_dir(&name)?;
            let mut nodes = Vec::new();
            for i in 0..n {
                let sub = if n == 1 { dir.clone() } else { dir.join(["a", "b"][i]) };
                let tap = &topo.taps[vi * 2 + i];
                nodes.push(boot_node(qemu, variant, queues, smp, tap, topo.prefix_len, &sub)?);
            }
            if path == SeedPath::Internal {
                nodes[1].guest.run_ok(&format!("iperf3 -s -D -p {IPERF_PORT} && sleep 1"), Duration::from_secs(20))?;
            }
            Ok(nodes)
        })();
        group.boot_secs = t0.elapsed().as_secs_f64();
        match nodes {
            Ok(mut nodes) => {
                if path == SeedPath::Internal {
                    let b_ip = topo.taps[vi * 2 + 1].guest_ip;
                    let ping = nodes[0].guest.ping(b_ip, 3);
                    group.a_reaches_b = Some(ping.map(|p| p.received > 0).unwrap_or(false));
                }
                booted.push(Some(nodes));
            }
            Err(e) => {
                eprintln!("   FAILED boot: {e}");
                group.error = Some(format!("boot: {e}"));
                booted.push(None);
            }
        }
        groups.push(group);
    }
    let mut measurements = Vec::new();
    let mut cell_no = 0usize;
    for round in 0..plan.rounds.max(1) {
        for &streams in &plan.streams {
            for direction in [Direction::Forward, Direction::Reverse] {
                let reverse = direction == Direction::Reverse;
                // Rotate which variant goes first from one cell to the next.
                let order: Vec<usize> = (0..variants.len()).map(|k| (k + cell_no) % variants.len()).collect();
                cell_no += 1;
                for vi in order {
                    let variant = variants[vi];
                    let server_ip = match path {
                        SeedPath::External => topo.peer_ip,
                        SeedPath::Internal => topo.taps[vi * 2 + 1].guest_ip,
                    };
                    let load = loadavg();
                    let r = match booted[vi].as_mut() {
                        None => Err(groups[vi].error.clone().unwrap_or_default()),
                        Some(nodes) => {
                            // One retry: a lost connect on a loaded host should not leave a hole.
                            let mut r = Err(String::new());
                            for attempt in 0..2 {
                                let datapath = |nodes: &[Node]| DatapathCpu::read(nodes.iter().map(|n| (&n.guest, n.vutap.as_ref())));
                                let cpu_before = datapath(nodes);
                                r = nodes[0]
                                    .guest
                                    .iperf3(server_ip, IPERF_PORT, plan.seconds, streams, reverse)
                                    .map(|x| (x.received_gbps, x.retransmits, datapath(nodes).since(cpu_before)))
                                    .map_err(|e| e.to_string());
                                match &r {
                                    Ok(_) => break,
                                    Err(e) => eprintln!("   iperf3 attempt {attempt}: {e}"),
                                }
                            }
                            r
                        }
                    };
                    match &r {
                        Ok((g, rt, cpu)) => eprintln!(
                            "   {path} QEMU {qemu} {queues}qp {streams}s {:<11} {variant:<13} {g:6.2} Gbit/s (retr {rt}, datapath CPU {:.2} s, load {load:.1})",
                            direction.label(path),
                            cpu.total_secs
                        ),
                        Err(e) => eprintln!("   {path} {variant} {streams}s {}: FAILED {e}", direction.label(path)),
                    }
                    let (gbps, retransmits, cpu, error) = match r {
                        Ok((g, rt, cpu)) => (Some(g), Some(rt), Some(cpu), None),
                        Err(e) => (None, None, None, Some(e)),
                    };
                    measurements.push(Measurement {
                        path,
                        qemu,
                        variant,
                        queues,
                        streams,
                        direction,
                        gbps,
                        retransmits,
                        error,
                        loadavg: load,
                        cpu,
                        round,
                    });
                }
            }
        }
    }
    for (vi, nodes) in booted.into_iter().enumerate() {
        if let Some(nodes) = nodes {
            groups[vi].vutap_totals = teardown(nodes);
            for t in &groups[vi].vutap_totals {
                eprintln!("   vutap {t}");
            }
        }
    }
    (groups, measurements)
}

/// Builds the table cells from the measurements.
pub fn cells(plan: &SeedPlan, ms: &[Measurement]) -> Vec<Cell> {
    let find = |path, qemu, variant, queues, streams, direction, value: &dyn Fn(&Measurement) -> Option<f64>| {
        let v: Vec<f64> = ms
            .iter()
            .filter(|m| {
                m.path == path
                    && m.qemu == qemu
                    && m.variant == variant
                    && m.queues == queues
                    && m.streams == streams
                    && m.direction == direction
            })
            .filter_map(value)
            .collect();
        crate::median(v)
    };
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let mut out = Vec::new();
    for &qemu in &plan.qemus {
        for &path in &plan.paths {
            for direction in [Direction::Forward, Direction::Reverse] {
                for &queues in &plan.queues {
                    for &streams in &plan.streams {
                        let args = (path, qemu, queues, streams, direction);
                        let gbps = |m: &Measurement| m.gbps;
                        let per_gb = |m: &Measurement| m.cpu?.per_gb(m.gbps?, f64::from(plan.seconds));
                        let cpu = |m: &Measurement| per_gb(m).map(|(all, _)| all);
                        let vutap_cpu = |m: &Measurement| per_gb(m).map(|(_, vutap)| vutap);
                        let get = |v, value: &dyn Fn(&Measurement) -> Option<f64>| find(args.0, args.1, v, args.2, args.3, args.4, value);
                        let (vutap, tap, intx) =
                            (get(Variant::Vutap, &gbps), get(Variant::QemuTap, &gbps), get(Variant::QemuTapIntx, &gbps));
                        out.push(Cell {
                            path,
                            direction: direction.label(path),
                            qemu,
                            queues,
                            streams,
                            vutap,
                            qemu_tap: tap,
                            ratio: ratio(vutap, tap),
                            qemu_tap_intx: intx,
                            ratio_intx: ratio(vutap, intx),
                            vutap_cpu_per_gb: get(Variant::Vutap, &cpu),
                            vutap_own_cpu_per_gb: get(Variant::Vutap, &vutap_cpu),
                            qemu_tap_cpu_per_gb: get(Variant::QemuTap, &cpu),
                        });
                    }
                }
            }
        }
    }
    out
}

/// Two guests on VEPA-mode macvtaps of one lower whose far end is a plain veth (no hairpin):
/// they must reach the peer but not each other; then the far end becomes a bridge port with
/// `hairpin on` (a reflective relay) and A must reach B.
pub fn vepa_check(qemu: QemuVersion, tag: &str) -> VepaCheck {
    let mut check = VepaCheck {
        qemu,
        a_reaches_peer: false,
        b_reaches_peer: false,
        a_reaches_b: false,
        b_reaches_a: false,
        a_reaches_b_with_hairpin: false,
        error: None,
    };
    eprintln!("== VEPA check (QEMU {qemu}, vutap, 2 guests on VEPA macvtaps)");
    let r = (|| -> Result<()> {
        let topo = Topology::new(2, MacvtapMode::Vepa)?;
        let dir = log_dir(&format!("{tag}-vepa-q{}", qemu.label()))?;
        let mut a = boot_node(qemu, Variant::Vutap, 1, 1, &topo.taps[0], topo.prefix_len, &dir.join("a"))?;
        let mut b = boot_node(qemu, Variant::Vutap, 1, 1, &topo.taps[1], topo.prefix_len, &dir.join("b"))?;
        let reaches = |n: &mut Node, ip: Ipv4Addr| -> Result<bool> { Ok(n.guest.ping(ip, 3)?.received > 0) };
        check.a_reaches_peer = reaches(&mut a, topo.peer_ip)?;
        check.b_reaches_peer = reaches(&mut b, topo.peer_ip)?;
        check.a_reaches_b = reaches(&mut a, topo.taps[1].guest_ip)?;
        check.b_reaches_a = reaches(&mut b, topo.taps[0].guest_ip)?;
        // Make the "switch" (the veth peer) hairpin: a bridge in the peer netns, port in
        // hairpin mode, so frames from one macvtap come back down the same link to the other.
        topo.exec_ok(&["ip", "link", "add", "vtbr0", "type", "bridge"])?;
        topo.exec_ok(&["ip", "link", "set", &topo.peer, "master", "vtbr0"])?;
        topo.exec_ok(&["ip", "link", "set", "vtbr0", "up"])?;
        topo.exec_ok(&["bridge", "link", "set", "dev", &topo.peer, "hairpin", "on"])?;
        check.a_reaches_b_with_hairpin = reaches(&mut a, topo.taps[1].guest_ip)?;
        teardown(vec![a, b]);
        Ok(())
    })();
    if let Err(e) = r {
        check.error = Some(e.to_string());
    }
    eprintln!(
        "   VEPA: A->peer {} B->peer {} A->B {} B->A {}; with hairpin switch A->B {}",
        check.a_reaches_peer, check.b_reaches_peer, check.a_reaches_b, check.b_reaches_a, check.a_reaches_b_with_hairpin
    );
    check
}

/// Markdown: one table per QEMU version, rows path × direction × queue pairs/streams.
pub fn markdown(report: &SeedReport) -> String {
    let f = |x: Option<f64>| x.map_or("FAIL".to_string(), |x| format!("{x:.2}"));
    let r = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.2}×"));
    let mut s = String::new();
    for &qemu in &report.plan.qemus {
        let intx = report.cells.iter().any(|c| c.qemu == qemu && c.qemu_tap_intx.is_some());
        s.push_str(&format!(
            "**QEMU {qemu}** (Gbit/s, iperf3 receiver side; CPU s/GB: host CPU seconds of the datapath per GB received, vutap's processes plus QEMU's threads but the vCPUs, vutap's own part in brackets)\n\n"
        ));
        s.push_str("| path | direction | queue pairs / streams | vutap | QEMU tap | ratio |");
        if intx {
            s.push_str(" QEMU tap, INTx | ratio vs INTx |");
        }
        s.push_str(" CPU s/GB, vutap / QEMU tap | CPU ratio |\n|---|---|---|---:|---:|---:|");
        if intx {
            s.push_str("---:|---:|");
        }
        s.push_str("---:|---:|\n");
        for c in report.cells.iter().filter(|c| c.qemu == qemu) {
            s.push_str(&format!(
                "| {} | {} | {} / {} | {} | {} | {} |",
                c.path,
                c.direction,
                c.queues,
                c.streams,
                f(c.vutap),
                f(c.qemu_tap),
                r(c.ratio)
            ));
            if intx {
                s.push_str(&format!(" {} | {} |", f(c.qemu_tap_intx), r(c.ratio_intx)));
            }
            let cpu = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.2}"));
            let own = c.vutap_own_cpu_per_gb.map_or(String::new(), |x| format!(" (vutap {x:.2})"));
            let cpu_ratio = match (c.vutap_cpu_per_gb, c.qemu_tap_cpu_per_gb) {
                (Some(a), Some(b)) if b > 0.0 => Some(a / b),
                _ => None,
            };
            s.push_str(&format!(" {}{own} / {} | {} |\n", cpu(c.vutap_cpu_per_gb), cpu(c.qemu_tap_cpu_per_gb), r(cpu_ratio)));
        }
        s.push('\n');
    }
    if let Some(v) = &report.vepa {
        let yn = |b: bool| if b { "yes" } else { "no" };
        s.push_str(&format!(
            "**VEPA** (QEMU {}, two vutap guests on VEPA macvtaps of one lower): A→peer {}, B→peer {}, \
             A→B **{}**, B→A **{}**; after the far end became a bridge port with `hairpin on`: A→B **{}**.{}\n\n",
            v.qemu,
            yn(v.a_reaches_peer),
            yn(v.b_reaches_peer),
            yn(v.a_reaches_b),
            yn(v.b_reaches_a),
            yn(v.a_reaches_b_with_hairpin),
            v.error.as_ref().map_or(String::new(), |e| format!(" Error: {e}"))
        ));
    }
    let loads: Vec<f64> = report.groups.iter().map(|g| g.loadavg).collect();
    if !loads.is_empty() {
        let max = loads.iter().cloned().fold(0.0, f64::max);
        let min = loads.iter().cloned().fold(f64::MAX, f64::min);
        s.push_str(&format!(
            "{} s per iperf3 run, median of {} interleaved run(s) per cell and backend, {} guest boots, {:.0} min in all on {} host cores; host load average \
             (1 min) at group start {min:.1}–{max:.1}.\n",
            report.plan.seconds,
            report.plan.rounds.max(1),
            report.groups.len(),
            report.duration_secs / 60.0,
            report.nproc
        ));
    }
    s
}

/// Font size of the chart's body text, px.
const SVG_FONT: f64 = 11.0;

/// How wide `text` is drawn at `font` px: 0.6 em a character, wider than the average sans-serif
/// glyph, so that room sized from it suffices.
fn text_width(text: &str, font: f64) -> f64 {
    text.chars().count() as f64 * 0.6 * font
}

/// The box (x_min, x_max, y_min, y_max) of a label drawn at `(x, y)` with `rotate(-45)` and
/// `text-anchor="end"`: it runs up and right to end at the anchor, so it reaches down and left
/// by its width times cos 45°, plus the glyphs' height (taken as a whole em) across it.
fn rotated_label_box(x: f64, y: f64, text: &str, font: f64) -> (f64, f64, f64, f64) {
    let c = std::f64::consts::FRAC_1_SQRT_2;
    let run = text_width(text, font) * c;
    let across = font * c;
    (x - run - across, x + across, y - across, y + run + across)
}

/// The x-axis label of a cell.
fn cell_label(c: &Cell) -> String {
    format!("{} {} {}q/{}s", &c.path.to_string()[..3], c.direction, c.queues, c.streams)
}

/// A hand-written SVG bar chart: one panel per QEMU version, a pair of bars (vutap, QEMU tap) per
/// cell, the ratio above each pair. The rotated labels under the bars size the room below each
/// panel (the longest) and the left margin (the first).
pub fn svg(report: &SeedReport) -> String {
    let qemus = &report.plan.qemus;
    let per = |q: QemuVersion| report.cells.iter().filter(move |c| c.qemu == q);
    let n = qemus.iter().map(|&q| per(q).count()).max().unwrap_or(0).max(1);
    let slot = 52.0;
    // Label anchors: this far right of the slot's start and below the axis.
    let (label_dx, label_dy) = (30.0, 12.0);
    let labels: Vec<String> = report.cells.iter().map(cell_label).collect();
    let deepest = labels.iter().map(|l| rotated_label_box(0.0, 0.0, l, SVG_FONT).3).fold(0.0, f64::max);
    let first_reach = qemus
        .iter()
        .filter_map(|&q| per(q).next())
        .map(|c| -rotated_label_box(label_dx, 0.0, &cell_label(c), SVG_FONT).0)
        .fold(0.0, f64::max);
    let pad = 6.0;
    let left = f64::max(60.0, first_reach + pad);
    let (right, top_pad, panel_h) = (20.0, 40.0, 220.0);
    let bottom = label_dy + deepest + pad;
    let width = left + right + slot * n as f64;
    let panel_total = top_pad + panel_h + bottom;
    let height = 40.0 + panel_total * qemus.len() as f64;
    let max = report.cells.iter().flat_map(|c| [c.vutap, c.qemu_tap]).flatten().fold(0.0, f64::max).max(0.1);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0}\" height=\"{height:.0}\" \
         font-family=\"sans-serif\" font-size=\"{SVG_FONT}\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{left}\" y=\"20\" font-size=\"14\">vutap vs QEMU tap backend, real TCG guests on a macvtap \
         (Gbit/s; ratio above)</text>\n\
         <rect x=\"{:.0}\" y=\"10\" width=\"10\" height=\"10\" fill=\"#1f77b4\"/><text x=\"{:.0}\" y=\"19\">vutap</text>\n\
         <rect x=\"{:.0}\" y=\"10\" width=\"10\" height=\"10\" fill=\"#ff7f0e\"/><text x=\"{:.0}\" y=\"19\">QEMU tap</text>\n",
        width - 170.0,
        width - 156.0,
        width - 100.0,
        width - 86.0
    );
    for (pi, &q) in qemus.iter().enumerate() {
        let y0 = 40.0 + panel_total * pi as f64 + top_pad;
        let base = y0 + panel_h;
        s.push_str(&format!("<text x=\"{left}\" y=\"{:.0}\" font-size=\"13\" font-weight=\"bold\">QEMU {q}</text>\n", y0 - 14.0));
        for t in 0..=4 {
            let v = max * t as f64 / 4.0;
            let y = base - panel_h * t as f64 / 4.0;
            s.push_str(&format!(
                "<line x1=\"{left}\" x2=\"{:.0}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>\
                 <text x=\"{:.0}\" y=\"{:.1}\" text-anchor=\"end\">{v:.1}</text>\n",
                width - right,
                left - 4.0,
                y + 4.0
            ));
        }
        for (i, c) in per(q).enumerate() {
            let x = left + slot * i as f64;
            for (k, (v, color)) in [(c.vutap, "#1f77b4"), (c.qemu_tap, "#ff7f0e")].iter().enumerate() {
                let h = v.map_or(0.0, |v| panel_h * v / max);
                s.push_str(&format!(
                    "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"20\" height=\"{h:.1}\" fill=\"{color}\"/>\n",
                    x + 5.0 + 21.0 * k as f64,
                    base - h
                ));
            }
            let ratio = c.ratio.map_or("-".into(), |r| format!("{r:.2}×"));
            let top = [c.vutap, c.qemu_tap].iter().flatten().fold(0.0, |a: f64, &b| a.max(b));
            let color = match c.ratio {
                Some(r) if r < 1.0 => "#c00",
                _ => "#000",
            };
            s.push_str(&format!(
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"{color}\">{ratio}</text>\n",
                x + 26.0,
                base - panel_h * top / max - 4.0
            ));
            s.push_str(&format!(
                "<text transform=\"translate({:.1},{:.1}) rotate(-45)\" text-anchor=\"end\">{}</text>\n",
                x + label_dx,
                base + label_dy,
                xml_escape(&cell_label(c))
            ));
        }
    }
    s.push_str("</svg>\n");
    s
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(qemus: Vec<QemuVersion>) -> SeedReport {
        let plan = SeedPlan {
            qemus,
            paths: vec![SeedPath::Internal, SeedPath::External],
            queues: vec![1, 2],
            streams: vec![1, 4],
            seconds: 5,
            rounds: 1,
            intx_baseline: false,
            vepa_check: false,
            tag: "t".into(),
        };
        let cells = cells(&plan, &[]);
        let cells = cells.into_iter().enumerate().map(|(i, c)| Cell { vutap: Some(1.0 + i as f64), qemu_tap: Some(2.0), ..c }).collect();
        SeedReport { plan, started_unix: 0, duration_secs: 1.0, nproc: 2, groups: Vec::new(), measurements: Vec::new(), cells, vepa: None }
    }

    /// The `f64` after `key="` in `tag`.
    fn attr(tag: &str, key: &str) -> f64 {
        let at = tag.find(&format!("{key}=\"")).unwrap_or_else(|| panic!("no {key} in {tag}")) + key.len() + 2;
        tag[at..].split('"').next().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("bad {key} in {tag}"))
    }

    #[test]
    fn test_svg_rotated_labels_stay_inside_the_canvas_and_their_panel() {
        let svg = svg(&report(vec![QemuVersion::V7, QemuVersion::V10]));
        let root = svg.lines().next().expect("svg root");
        let (width, height) = (attr(root, "width"), attr(root, "height"));
        // Panel titles: the top of each (13 px font) is where the panel above must end.
        let titles: Vec<f64> = svg.lines().filter(|l| l.contains("font-weight=\"bold\"")).map(|l| attr(l, "y") - 13.0).collect();
        assert_eq!(titles.len(), 2);
        let mut seen = 0;
        for line in svg.lines().filter(|l| l.contains("rotate(-45)")) {
            let xy = line.split("translate(").nth(1).and_then(|r| r.split(')').next()).expect("translate");
            let (x, y) = xy.split_once(',').map(|(x, y)| (x.parse::<f64>().unwrap(), y.parse::<f64>().unwrap())).expect("x,y");
            let text = line.split('>').nth(1).and_then(|t| t.split('<').next()).expect("label text");
            let text = text.replace("&gt;", ">").replace("&lt;", "<").replace("&amp;", "&");
            let (x0, x1, y0, y1) = rotated_label_box(x, y, &text, SVG_FONT);
            assert!(x0 >= 0.0 && x1 <= width, "label {text:?} spans x {x0:.1}..{x1:.1} of {width}");
            assert!(y0 >= 0.0 && y1 <= height, "label {text:?} spans y {y0:.1}..{y1:.1} of {height}");
            if let Some(next) = titles.iter().find(|&&t| t > y) {
                assert!(y1 < *next, "label {text:?} reaches y {y1:.1}, into the next panel's title at {next:.1}");
            }
            seen += 1;
        }
        assert_eq!(seen, 2 * 16, "a label per cell");
    }

    #[test]
    fn test_cells_give_datapath_cpu_per_gb_received_from_the_median_run() {
        let plan = SeedPlan {
            qemus: vec![QemuVersion::V10],
            paths: vec![SeedPath::External],
            queues: vec![1],
            streams: vec![1],
            seconds: 8,
            rounds: 3,
            intx_baseline: false,
            vepa_check: false,
            tag: "t".into(),
        };
        let run = |variant, gbps: Option<f64>, cpu: Option<f64>, round| Measurement {
            path: SeedPath::External,
            qemu: QemuVersion::V10,
            variant,
            queues: 1,
            streams: 1,
            direction: Direction::Forward,
            gbps,
            retransmits: Some(0),
            error: None,
            loadavg: 0.0,
            cpu: cpu.map(|c| CpuUsed { total_secs: c, vutap_secs: if variant == Variant::Vutap { c * 0.75 } else { 0.0 } }),
            round,
        };
        // 8 s at 4 Gbit/s = 4 GB: 2 CPU-seconds are 0.5 s per GB.
        let ms = [
            run(Variant::Vutap, Some(4.0), Some(2.0), 0),
            run(Variant::Vutap, Some(2.0), Some(2.0), 1),
            run(Variant::Vutap, Some(8.0), Some(2.0), 2),
            run(Variant::QemuTap, Some(4.0), Some(6.0), 0),
            // No CPU figure (a report from before it was recorded), and a failed run: skipped.
            run(Variant::QemuTap, Some(1.0), None, 1),
            run(Variant::QemuTap, None, Some(9.0), 2),
        ];
        let cells = cells(&plan, &ms);
        let forward = &cells[0];
        assert_eq!(forward.vutap_cpu_per_gb, Some(0.5));
        assert_eq!(forward.vutap_own_cpu_per_gb, Some(0.375));
        assert_eq!(forward.qemu_tap_cpu_per_gb, Some(1.5));
        assert_eq!((forward.vutap, forward.qemu_tap), (Some(4.0), Some(2.5)));
        assert_eq!((cells[1].vutap_cpu_per_gb, cells[1].qemu_tap_cpu_per_gb), (None, None), "no reverse runs");
        let report = SeedReport {
            plan,
            started_unix: 0,
            duration_secs: 1.0,
            nproc: 2,
            groups: Vec::new(),
            measurements: ms.to_vec(),
            cells,
            vepa: None,
        };
        let md = markdown(&report);
        assert!(md.contains("| 4.00 | 2.50 | 1.60× | 0.50 (vutap 0.38) / 1.50 | 0.33× |"), "{md}");
        assert!(md.contains("| - / - | - |"), "{md}");
    }

    #[test]
    fn test_measurements_recorded_before_the_cpu_figure_still_load() {
        let old = r#"{"path": "Internal", "qemu": "V7", "variant": "Vutap", "queues": 1, "streams": 1, "direction": "Forward",
            "gbps": 2.86, "retransmits": 0, "error": null, "loadavg": 0.88, "round": 0}"#;
        let m: Measurement = serde_json::from_str(old).expect("old measurement");
        assert_eq!((m.gbps, m.cpu), (Some(2.86), None));
    }

    #[test]
    fn test_report_round_trips_through_json() {
        let r = report(vec![QemuVersion::V10]);
        let back: SeedReport = serde_json::from_str(&serde_json::to_string(&r).expect("to json")).expect("from json");
        assert_eq!(markdown(&back), markdown(&r));
        assert_eq!(svg(&back), svg(&r));
    }
}
