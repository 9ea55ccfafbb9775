//! `vutap-bench`: a load generator playing the VMM side against any vhost-user-net backend.
//!
//! Two arrangements, each measured side by side in one run:
//! - **macvtap**: vutap on a macvtap whose lower is a veth; the far side is the veth peer in a
//!   netns (AF_PACKET sink/source there). Ceiling = raw write/read loop on the same /dev/tapN.
//! - **tap**: a plain multi-queue tap, far side = AF_PACKET on the tap itself in the host. This
//!   is where DPDK testpmd (vhost PMD + tap PMD, which makes its own tap) is compared: vutap runs
//!   with `--tap NAME` (creating a multi-queue tap), the ceiling creates its own tap.
//!
//! TX: the bench keeps the TX rings full; the far-side sink counts and verifies. RX: a far-side
//! source floods; the bench recycles RX buffers (mergeable or not) and counts. Throughput is what
//! arrived and verified; drops = offered - delivered over the window.
//!
//! Each cell also says why it ran at that speed: vutap's own counters over the window
//! ([`backend_counters`]: frames per batch, kicks, interrupts and wake-ups per frame...), and the
//! CPU of both sides ([`load_cpu`]), flagged when the load generator rather than the backend was
//! the limit.

pub mod backend_counters;
pub mod error;
pub mod load_cpu;
pub mod placement;
pub mod procs;
pub mod profile;
pub mod raw;
pub mod report;
pub mod vhost;
pub mod wake_cost;
pub mod wire;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Deserializer, Serialize};

use vutap_frontend::features::{NET_F_CSUM, NET_F_GUEST_CSUM, NET_F_GUEST_TSO4, NET_F_GUEST_TSO6, NET_F_HOST_TSO4, NET_F_MRG_RXBUF};
use vutap_frontend::hdr::{GSO_TCPV4, HDR_F_NEEDS_CSUM};
use vutap_frontend::{mergeable, FrontendOptions, NetFrontend, QueueLayout, VirtioNetHdr};
use vutap_testbed::{frames, host_cpu, link, MacvtapMode, Topology};

use backend_counters::BackendCounters;
pub use error::{LoadgenError, Result};
use load_cpu::LoadCpu;
use placement::Placement;
use wire::{Counters, OTHER_MAC, PEER_MAC};

/// Wake-ups timed for [`Report::wake_cost`] (each way; ~0.3 ms apiece).
const WAKE_COST_SAMPLES: usize = 200;

/// The size label of the TSO case.
pub const TSO_SIZE: u32 = 65536;

#[derive(Clone, Debug)]
pub struct Config {
    pub sizes: Vec<u32>,
    pub pairs: Vec<u16>,
    /// Sizes that also run with more than one pair.
    pub multi_sizes: Vec<u32>,
    pub dirs: Vec<Dir>,
    pub arrangements: Vec<Arrangement>,
    pub warmup: Duration,
    pub duration: Duration,
    pub dpdk: bool,
    /// Also run non-mergeable RX buffers (1 pair).
    pub nomrg: bool,
    pub latency: bool,
    /// Round trips each ping-pong records. Its p99 is set by the worst 1 % of them: of 2000
    /// (10 ms of a polled ping-pong) that is 20 round trips, which one stall of this shared
    /// host can fill; of 20000, 200.
    pub latency_samples: usize,
    /// One-pair cases: backend on CPU 0, load on the others (see `placement`).
    pub pin: bool,
    /// Rounds per case; the backends of a case take turns within a round, and each reports
    /// its median round (a shared host drifts within seconds).
    pub rounds: u32,
    /// One-pair cells also run vutap with `--io-uring`.
    pub io_uring: bool,
    /// Record the backend with `perf` over each window and split its CPU per frame by where
    /// it went (see `profile`). Sampling costs the backend a little CPU: profiled runs explain
    /// a cell, unprofiled ones measure it.
    pub profile: bool,
}

impl Config {
    pub fn full() -> Self {
        Config {
            sizes: vec![64, 1500, 9000, TSO_SIZE],
            pairs: vec![1, 2, 4],
            multi_sizes: vec![64, 1500],
            dirs: vec![Dir::Tx, Dir::Rx],
            arrangements: vec![Arrangement::Macvtap, Arrangement::Tap],
            warmup: Duration::from_millis(1000),
            duration: Duration::from_secs(3),
            dpdk: true,
            nomrg: true,
            latency: true,
            latency_samples: 20_000,
            pin: true,
            rounds: 3,
            io_uring: true,
            profile: false,
        }
    }
    /// A couple of seconds: 1500 B, one pair, macvtap arrangement, vutap + ceiling.
    pub fn smoke() -> Self {
        Config {
            sizes: vec![1500],
            pairs: vec![1],
            multi_sizes: vec![],
            arrangements: vec![Arrangement::Macvtap],
            warmup: Duration::from_millis(300),
            duration: Duration::from_millis(1000),
            dpdk: false,
            nomrg: false,
            latency_samples: 200,
            pin: true,
            rounds: 1,
            ..Config::full()
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dir {
    Tx,
    Rx,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arrangement {
    Macvtap,
    Tap,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Vutap,
    /// vutap with `--io-uring` (one-pair cells).
    #[serde(rename = "vutap-io-uring")]
    VutapIoUring,
    Dpdk,
    Ceiling,
}

/// One measured case.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CaseResult {
    pub arrangement: Arrangement,
    pub backend: Backend,
    pub dir: Dir,
    pub size: u32,
    pub frame_len: usize,
    pub pairs: u16,
    /// "mrg" / "nomrg" for vhost RX, "-" otherwise.
    #[serde(deserialize_with = "rxbuf_from")]
    pub rxbuf: Label,
    pub secs: f64,
    pub gbps: f64,
    pub mpps: f64,
    pub offered_mpps: f64,
    pub drops: u64,
    pub drop_pct: f64,
    pub bad: u64,
    /// Backend CPU (vutap/testpmd process, or the raw loop's threads) per delivered frame.
    pub cpu_ns_per_frame: f64,
    /// Backend CPU as a fraction of one core.
    pub cpu_cores: f64,
    /// CPU of the load side (this process's frontend driver and far-end threads).
    #[serde(default)]
    pub load: LoadCpu,
    /// CPUs the load side ran on.
    #[serde(default)]
    pub load_cpus: usize,
    /// The load side was busy (a thread or all its CPUs at >= 90 %) while the backend was not:
    /// the cell measures the load generator, not the backend.
    #[serde(default)]
    pub load_limited: bool,
    /// vutap's counters over the window (vutap cells only).
    #[serde(default)]
    pub counters: Option<BackendCounters>,
    /// Gbit/s of every round, sorted (the figures above are the median round's).
    pub rounds_gbps: Vec<f64>,
    /// Every round's figures in the order the rounds ran (`None`: the round failed), to compare
    /// two backends round by round (see [`paired_ratio`]).
    #[serde(default)]
    pub rounds: Vec<Option<RoundFigures>>,
    /// With `--profile`: the backend's CPU ns per delivered frame by where it went.
    #[serde(default)]
    pub profile: Option<BTreeMap<profile::Bucket, f64>>,
    pub error: Option<String>,
}

/// One round's headline figures.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundFigures {
    pub gbps: f64,
    pub cpu_ns_per_frame: f64,
}

/// `a`'s figure over `b`'s, as the median of the rounds' ratios: each round puts the two side by
/// side within seconds, so the host's drift between rounds, which moves a median round by up
/// to ±30 %, mostly cancels. Falls back to the ratio of the median rounds when the two do not
/// share a round (a run from before rounds were kept, or a different round count).
pub fn paired_ratio(a: &CaseResult, b: &CaseResult, figure: fn(&RoundFigures) -> f64) -> Option<f64> {
    let mut ratios: Vec<f64> = if a.rounds.len() == b.rounds.len() {
        a.rounds.iter().zip(&b.rounds).filter_map(|(x, y)| Some(figure(x.as_ref()?) / figure(y.as_ref()?))).collect()
    } else {
        Vec::new()
    };
    ratios.retain(|r| r.is_finite() && *r > 0.0);
    if ratios.is_empty() {
        let (x, y) = (
            figure(&RoundFigures { gbps: a.gbps, cpu_ns_per_frame: a.cpu_ns_per_frame }),
            figure(&RoundFigures { gbps: b.gbps, cpu_ns_per_frame: b.cpu_ns_per_frame }),
        );
        return (x > 0.0 && y > 0.0).then(|| x / y);
    }
    crate::median(ratios)
}

/// One backend's rounds of a case: where its windows go, and how to measure one.
type Turn<'a> = (&'a mut Vec<Result<Window>>, Box<dyn FnMut() -> Result<Window> + 'a>);

/// Runs `rounds` rounds of a case, each backend once per round in [`turn_order`].
fn take_turns(rounds: u32, mut turns: Vec<Turn>) {
    for round in 0..rounds {
        for i in turn_order(turns.len(), round) {
            let (windows, measure) = &mut turns[i];
            windows.push(measure());
        }
    }
}

/// The order the backends of a case take in round `round`: each round starts one further along,
/// so no backend always runs first, or always right after another, and a drift across a round
/// touches each alike over the rounds.
fn turn_order(backends: usize, round: u32) -> impl Iterator<Item = usize> {
    (0..backends).map(move |i| (i + round as usize) % backends)
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LatencyResult {
    pub arrangement: Arrangement,
    pub backend: Backend,
    pub samples: usize,
    pub p50_us: f64,
    pub p99_us: f64,
    pub error: Option<String>,
    /// vutap's `--busy-poll-us` in this run (0: off; the other backends: always 0).
    #[serde(default)]
    pub busy_poll_us: u32,
    /// vutap's `--adaptive-poll-us` in this run (0: off; the other backends: always 0).
    #[serde(default)]
    pub adaptive_poll_us: u32,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    pub host: String,
    /// What a wake-up costs its writer on this host (see [`wake_cost`]); `None` in a report from
    /// before it was measured, or on one CPU.
    #[serde(default)]
    pub wake_cost: Option<wake_cost::WakeCost>,
    pub cases: Vec<CaseResult>,
    pub latency: Vec<LatencyResult>,
    pub notes: Vec<String>,
}

/// A fixed label. The alias keeps serde's derive from borrowing a `&str` field from the input
/// (which would tie the report to `'static` input); [`rxbuf_from`] maps it to a constant.
type Label = &'static str;

/// The `rxbuf` labels a run writes; anything else reads as "-".
fn rxbuf_from<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<&'static str, D::Error> {
    Ok(match String::deserialize(d)?.as_str() {
        "mrg" => "mrg",
        "nomrg" => "nomrg",
        _ => "-",
    })
}

impl Report {
    pub fn find(&self, a: Arrangement, b: Backend, d: Dir, size: u32, pairs: u16, rxbuf: &str) -> Option<&CaseResult> {
        self.cases
            .iter()
            .find(|c| c.arrangement == a && c.backend == b && c.dir == d && c.size == size && c.pairs == pairs && c.rxbuf == rxbuf)
    }
}

/// Ethernet frame length for a size label: 64 B on the wire (60 + FCS), MTU-sized for 1500/9000,
/// the TSO frame for 64 KiB.
pub fn frame_len(size: u32) -> usize {
    match size {
        TSO_SIZE => 14 + 40 + wire::TSO_SEGS * usize::from(wire::TSO_MSS),
        s if s <= 64 => 60,
        s => s as usize + 14,
    }
}

fn progress(msg: &str) {
    eprintln!("[vutap-bench] {msg}");
}

/// Where the far side is.
struct Far {
    netns: Option<String>,
    ifname: String,
    /// Destination MAC of frames toward the backend (the macvtap's own MAC; anything on a tap).
    backend_mac: [u8; 6],
}

fn tso_hdr() -> VirtioNetHdr {
    VirtioNetHdr {
        flags: HDR_F_NEEDS_CSUM,
        gso_type: GSO_TCPV4,
        hdr_len: 54,
        gso_size: wire::TSO_MSS,
        csum_start: 34,
        csum_offset: 16,
        num_buffers: 0,
    }
}

fn tx_frame(size: u32, src: [u8; 6]) -> (VirtioNetHdr, Vec<u8>) {
    if size == TSO_SIZE {
        (tso_hdr(), wire::tso_frame(OTHER_MAC, src))
    } else {
        (VirtioNetHdr::default(), wire::udp_frame(frame_len(size), OTHER_MAC, src, 4000, 0))
    }
}

/// Counters over the measurement window.
struct Window {
    secs: f64,
    d: wire::Snap,
    cpu_ns: u64,
    load: LoadCpu,
    load_cpus: usize,
    load_limited: bool,
    counters: Option<BackendCounters>,
    /// Samples per bucket, with `--profile`.
    profile: Option<BTreeMap<profile::Bucket, u64>>,
}

impl Window {
    fn gbps(&self) -> f64 {
        self.d.delivered_bytes as f64 * 8.0 / self.secs / 1e9
    }

    /// Gbit/s and CPU per frame, if any frame arrived.
    fn figures(&self) -> Option<RoundFigures> {
        let frames = self.d.delivered_frames;
        (frames > 0).then(|| RoundFigures { gbps: self.gbps(), cpu_ns_per_frame: self.cpu_ns as f64 / frames as f64 })
    }
}

/// How the backend of a case is read, besides the far side's counters.
struct BackendSide<'a> {
    /// Its CPU time in ns.
    cpu: &'a dyn Fn() -> u64,
    /// Its threads inside this process (the raw loop's), which are not load.
    tids: &'a dyn Fn() -> Vec<i32>,
    /// vutap's metrics endpoint.
    metrics: Option<&'a Path>,
    /// The backend's process, if it is one (else its threads are `tids`).
    pid: Option<u32>,
    /// Cores it can use: its threads, bounded by its CPUs.
    capacity: f64,
    /// CPUs the load side runs on.
    load_cpus: usize,
}

impl<'a> BackendSide<'a> {
    /// A backend process (vutap, testpmd) with `threads` busy threads.
    fn process(pid: u32, cpu: &'a dyn Fn() -> u64, metrics: Option<&'a Path>, threads: u16, place: Option<&Placement>) -> Self {
        BackendSide { cpu, tids: &Vec::new, metrics, pid: Some(pid), capacity: capacity(threads, place), load_cpus: load_cpus(place) }
    }

    /// What `perf` records for this backend.
    fn perf_target(&self) -> profile::Target {
        self.pid.map_or_else(|| profile::Target::Tids((self.tids)()), profile::Target::Pid)
    }

    /// The raw loop: `pairs` threads `tids` of this process.
    fn raw_loop(cpu: &'a dyn Fn() -> u64, tids: &'a dyn Fn() -> Vec<i32>, pairs: u16, place: Option<&Placement>) -> Self {
        BackendSide { cpu, tids, metrics: None, pid: None, capacity: capacity(pairs, place), load_cpus: load_cpus(place) }
    }
}

/// Cores `threads` backend threads can use under `place`.
fn capacity(threads: u16, place: Option<&Placement>) -> f64 {
    let cpus = place.map_or_else(|| placement::online_cpus_at_start().len(), |p| p.backend.len());
    f64::from(threads).min(cpus.max(1) as f64)
}

fn load_cpus(place: Option<&Placement>) -> usize {
    place.map_or_else(|| placement::online_cpus_at_start().len(), |p| p.load.len())
}

fn scrape(metrics: Option<&Path>) -> Option<backend_counters::Totals> {
    let m = metrics?;
    backend_counters::scrape(m).map_err(|e| progress(&format!("{e}"))).ok()
}

fn measure(cfg: &Config, counters: &Counters, dir: Dir, backend: &BackendSide) -> Window {
    std::thread::sleep(cfg.warmup);
    let m0 = scrape(backend.metrics);
    let recording = cfg
        .profile
        .then(|| profile::start(&backend.perf_target(), cfg.duration, &std::env::temp_dir()))
        .and_then(|r| r.map_err(|e| progress(&format!("perf record: {e}"))).ok());
    let (s0, l0, c0, t0) = (counters.snap(), load_cpu::thread_times(), (backend.cpu)(), Instant::now());
    std::thread::sleep(cfg.duration);
    let (s1, l1, c1, secs) = (counters.snap(), load_cpu::thread_times(), (backend.cpu)(), t0.elapsed().as_secs_f64());
    let profile = recording.and_then(|r| r.finish().map_err(|e| progress(&format!("perf: {e}"))).ok());
    let m1 = scrape(backend.metrics);
    let cpu_ns = c1.saturating_sub(c0);
    let d = s1.since(&s0);
    let polling = load_cpu::Polling { tid: counters.far_tid.load(Ordering::Relaxed), ns: d.far_idle_ns };
    let load = LoadCpu::between(&l0, &l1, &(backend.tids)(), polling, secs);
    let backend_cores = cpu_ns as f64 / 1e9 / secs;
    Window {
        secs,
        d,
        cpu_ns,
        load,
        load_cpus: backend.load_cpus,
        load_limited: load.was_the_limit(backend.load_cpus, backend_cores, backend.capacity),
        counters: m0.zip(m1).map(|(a, b)| BackendCounters::between(&a, &b, dir)),
        profile,
    }
}

struct CaseKey {
    arrangement: Arrangement,
    backend: Backend,
    dir: Dir,
    size: u32,
    pairs: u16,
    rxbuf: &'static str,
}

fn result(k: &CaseKey, w: Result<Window>) -> CaseResult {
    let mut r = CaseResult {
        arrangement: k.arrangement,
        backend: k.backend,
        dir: k.dir,
        size: k.size,
        frame_len: frame_len(k.size),
        pairs: k.pairs,
        rxbuf: k.rxbuf,
        secs: 0.0,
        gbps: 0.0,
        mpps: 0.0,
        offered_mpps: 0.0,
        drops: 0,
        drop_pct: 0.0,
        bad: 0,
        cpu_ns_per_frame: 0.0,
        cpu_cores: 0.0,
        load: LoadCpu::default(),
        load_cpus: 0,
        load_limited: false,
        counters: None,
        rounds_gbps: Vec::new(),
        rounds: Vec::new(),
        profile: None,
        error: None,
    };
    match w {
        Err(e) => r.error = Some(e.to_string()),
        Ok(w) => {
            let d = &w.d;
            r.secs = w.secs;
            r.gbps = w.gbps();
            r.mpps = d.delivered_frames as f64 / w.secs / 1e6;
            r.offered_mpps = d.offered_frames as f64 / w.secs / 1e6;
            r.drops = d.offered_frames.saturating_sub(d.delivered_frames);
            r.drop_pct = if d.offered_frames > 0 { 100.0 * r.drops as f64 / d.offered_frames as f64 } else { 0.0 };
            r.bad = d.bad;
            r.cpu_ns_per_frame = w.figures().map_or(0.0, |f| f.cpu_ns_per_frame);
            r.cpu_cores = w.cpu_ns as f64 / 1e9 / w.secs;
            (r.load, r.load_cpus, r.load_limited, r.counters) = (w.load, w.load_cpus, w.load_limited, w.counters);
            r.profile = w.profile.as_ref().filter(|_| d.delivered_frames > 0).map(|samples| {
                let per_frame = profile::PERIOD_NS as f64 / d.delivered_frames as f64;
                samples.iter().map(|(&b, &n)| (b, n as f64 * per_frame)).collect()
            });
            if d.delivered_frames == 0 {
                r.error = Some(format!("no frames delivered ({} offered)", d.offered_frames));
            }
        }
    }
    progress(&format!(
        "{:?}/{:?} {:?} {} B x{} {}: {:.3} Gbit/s {:.3} Mpps drops {:.1}% cpu {:.0} ns/frame, {:.2} cores; load {:.2} cores{}{}",
        r.arrangement,
        r.backend,
        r.dir,
        r.size,
        r.pairs,
        r.rxbuf,
        r.gbps,
        r.mpps,
        r.drop_pct,
        r.cpu_ns_per_frame,
        r.cpu_cores,
        r.load.cores,
        if r.load_limited { " (load-limited)" } else { "" },
        r.error.as_deref().map(|e| format!(" ERROR {e}")).unwrap_or_default()
    ));
    r
}

/// The result of the median round by throughput (rounds that failed only count if all did).
fn median_result(k: &CaseKey, rounds: Vec<Result<Window>>) -> CaseResult {
    let figures: Vec<Option<RoundFigures>> = rounds.iter().map(|w| w.as_ref().ok().and_then(Window::figures)).collect();
    let (mut ok, errs): (Vec<_>, Vec<_>) = rounds.into_iter().partition(Result::is_ok);
    let mut ok: Vec<Window> = ok.drain(..).filter_map(Result::ok).collect();
    if ok.is_empty() {
        return result(k, errs.into_iter().next().unwrap_or(Err(LoadgenError::NoRounds)));
    }
    ok.sort_by(|a, b| a.gbps().total_cmp(&b.gbps()));
    let all: Vec<f64> = ok.iter().map(|w| (w.gbps() * 1000.0).round() / 1000.0).collect();
    let mid = ok.swap_remove(ok.len() / 2);
    let mut r = result(k, Ok(mid));
    r.rounds_gbps = all;
    r.rounds = figures;
    r
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

/// The poll window (fixed, or an adaptive one's maximum) of vutap's polling latency runs.
const POLL_US: u32 = 50;

/// The polling latency runs of vutap: `(--busy-poll-us, --adaptive-poll-us)`.
const POLLED: [(u32, u32); 2] = [(POLL_US, 0), (0, POLL_US)];

/// Whether the `--io-uring` variant runs for `pairs` (one-pair cells).
fn io_uring_wanted(cfg: &Config, pairs: u16) -> bool {
    cfg.io_uring && pairs == 1
}

fn io_uring_args() -> Vec<String> {
    vec!["--io-uring".into()]
}

fn poll_args((fixed, adaptive): (u32, u32)) -> Vec<String> {
    vec!["--busy-poll-us".into(), fixed.to_string(), "--adaptive-poll-us".into(), adaptive.to_string()]
}

/// The ping-pong of a vutap started with [`poll_args`]`(polled)`.
fn polled_result(a: Arrangement, polled: (u32, u32), r: Result<Vec<u64>>) -> LatencyResult {
    LatencyResult { busy_poll_us: polled.0, adaptive_poll_us: polled.1, ..latency_result(a, Backend::Vutap, r) }
}

fn latency_result(a: Arrangement, b: Backend, r: Result<Vec<u64>>) -> LatencyResult {
    let mut out = LatencyResult {
        arrangement: a,
        backend: b,
        samples: 0,
        p50_us: 0.0,
        p99_us: 0.0,
        error: None,
        busy_poll_us: 0,
        adaptive_poll_us: 0,
    };
    match r {
        Ok(mut v) => {
            v.sort_unstable();
            out.samples = v.len();
            out.p50_us = percentile(&v, 0.5);
            out.p99_us = percentile(&v, 0.99);
            if v.is_empty() {
                out.error = Some("no replies".into());
            }
        }
        Err(e) => out.error = Some(e.to_string()),
    }
    progress(&format!("{a:?}/{b:?} ping-pong 64 B: p50 {:.1} us p99 {:.1} us ({} samples)", out.p50_us, out.p99_us, out.samples));
    out
}

/// The virtio-net header with `num_buffers`, as negotiated with MRG_RXBUF.
const MRG_HDR_LEN: u32 = 12;

/// Frontend options for a case.
fn fe_opts(pairs: u16, dir: Dir, size: u32, rxbuf: &str) -> FrontendOptions {
    let mut o = FrontendOptions { queue_pairs: pairs, ..FrontendOptions::default() };
    if dir == Dir::Tx && size == TSO_SIZE {
        o.requested_features |= NET_F_CSUM | NET_F_HOST_TSO4;
    } else {
        // TX slots sized like the kmalloc chunks a Linux guest's frames sit in (the next power
        // of two), not 64 KiB apart: 256 frames spread over 16 MiB cost the backend a TLB miss
        // per frame that no guest would make it pay.
        o.tx_buf_len = ((frame_len(size) + 12) as u32).next_power_of_two();
    }
    if rxbuf == "nomrg" {
        o.requested_features &= !NET_F_MRG_RXBUF;
        o.rx_buf_len = 9216;
    } else {
        // Mergeable buffers sized as a Linux guest that has been receiving this frame size
        // sizes them (see `vutap_frontend::mergeable`): ~1.5 KiB up to 1500 B, a page for 9000 B.
        o.rx_buf_len = mergeable::linux_buf_len(frame_len(size) as u32, MRG_HDR_LEN);
        // And it takes GSO frames, as every Linux guest with mergeable buffers does: the backend
        // must then hold buffers for a 64 KiB frame, whatever size the frames really are.
        if dir == Dir::Rx {
            o.requested_features |= NET_F_GUEST_CSUM | NET_F_GUEST_TSO4 | NET_F_GUEST_TSO6;
        }
    }
    o
}

/// The bytes between consecutive guest buffers of the case's queue (TX, or RX in mergeable
/// buffers, what a Linux guest posts), which the raw loop's buffers are laid out by.
fn guest_slot_len(k: &CaseKey) -> usize {
    let o = fe_opts(k.pairs, k.dir, k.size, "mrg");
    let len = if k.dir == Dir::Tx { o.tx_buf_len } else { o.rx_buf_len };
    QueueLayout::new(0, o.queue_size, o.indirect_max, len).slot_len as usize
}

/// One vhost-user case against the backend at `socket`.
/// One round of a vhost case against a running vutap process.
fn vutap_case(cfg: &Config, k: &CaseKey, socket: &Path, far: &Far, p: &procs::Proc, place: Option<&Placement>) -> Result<Window> {
    let pid = p.pid().to_string();
    let cpu = || host_cpu::cpu_ns(&pid);
    vhost_case(cfg, k, socket, far, &BackendSide::process(p.pid(), &cpu, p.metrics.as_deref(), k.pairs, place))
}

fn vhost_case(cfg: &Config, k: &CaseKey, socket: &Path, far: &Far, backend: &BackendSide) -> Result<Window> {
    let fe = connect(socket, fe_opts(k.pairs, k.dir, k.size, k.rxbuf))?;
    if k.dir == Dir::Tx && k.size == TSO_SIZE && fe.acked_features() & NET_F_HOST_TSO4 == 0 {
        return Err(LoadgenError::Negotiation("HOST_TSO4 not offered"));
    }
    if k.rxbuf == "nomrg" && fe.acked_features() & NET_F_MRG_RXBUF != 0 {
        return Err(LoadgenError::Negotiation("MRG_RXBUF negotiated though not requested"));
    }
    std::thread::sleep(Duration::from_millis(200)); // testpmd starts forwarding a bit later
    let counters = Arc::new(Counters::default());
    let sock = wire::far_socket(far.netns.as_deref(), &far.ifname)?;
    let guest_mac = far.backend_mac;
    let (w, res) = match k.dir {
        Dir::Tx => {
            let (hdr, frame) = tx_frame(k.size, guest_mac);
            vhost::prefill_tx(&fe, &hdr, &frame);
            let expect = (k.size != TSO_SIZE).then_some(frame.len());
            let _sink = wire::sink(sock, counters.clone(), expect);
            let drv = vhost::tx(fe, frame.len(), counters.clone());
            let w = measure(cfg, &counters, k.dir, backend);
            (w, drv.stop())
        }
        Dir::Rx => {
            let frame = wire::udp_frame(frame_len(k.size), guest_mac, PEER_MAC, 10000, 0);
            let drv = vhost::rx(fe, counters.clone());
            let _src = wire::source(sock, counters.clone(), frame);
            let w = measure(cfg, &counters, k.dir, backend);
            drop(_src);
            (w, drv.stop())
        }
    };
    res.map(|_| w)
}

fn ceiling_case(cfg: &Config, k: &CaseKey, fds: Vec<vutap::tap::TapQueue>, far: &Far, place: Option<&Placement>) -> Result<Window> {
    // The raw loop's threads are the backend here: spawned while this thread sits on its CPUs.
    let on_backend = || place.map(|p| PinnedFor::new(&p.backend, &p.load));
    let counters = Arc::new(Counters::default());
    let sock = wire::far_socket(far.netns.as_deref(), &far.ifname)?;
    let tid_cpu = |tids: &[Arc<std::sync::atomic::AtomicI32>]| {
        tids.iter().map(|t| host_cpu::cpu_ns(&format!("self/task/{}", t.load(Ordering::Relaxed)))).sum::<u64>()
    };
    let tid_list = |tids: &[Arc<std::sync::atomic::AtomicI32>]| tids.iter().map(|t| t.load(Ordering::Relaxed)).collect::<Vec<i32>>();
    match k.dir {
        Dir::Tx => {
            let (hdr, frame) = tx_frame(k.size, far.backend_mac);
            let mut h = [0u8; 12];
            hdr.write_to(&mut h);
            let expect = (k.size != TSO_SIZE).then_some(frame.len());
            let _sink = wire::sink(sock, counters.clone(), expect);
            let lp = {
                let _on = on_backend();
                raw::tx(fds, h, frame, guest_slot_len(k), counters.clone())
            };
            let (cpu, tids) = (|| tid_cpu(&lp.tids), || tid_list(&lp.tids));
            let w = measure(cfg, &counters, k.dir, &BackendSide::raw_loop(&cpu, &tids, k.pairs, place));
            lp.stop();
            Ok(w)
        }
        Dir::Rx => {
            let frame = wire::udp_frame(frame_len(k.size), far.backend_mac, PEER_MAC, 10000, 0);
            let lp = {
                let _on = on_backend();
                raw::rx(fds, guest_slot_len(k), counters.clone())
            };
            let _src = wire::source(sock, counters.clone(), frame);
            let (cpu, tids) = (|| tid_cpu(&lp.tids), || tid_list(&lp.tids));
            let w = measure(cfg, &counters, k.dir, &BackendSide::raw_loop(&cpu, &tids, k.pairs, place));
            drop(_src);
            lp.stop();
            Ok(w)
        }
    }
}

/// Cases (dir, size, rxbuf) for `pairs`.
fn case_list(cfg: &Config, pairs: u16) -> Vec<(Dir, u32, &'static str)> {
    let mut v = Vec::new();
    for &dir in &cfg.dirs {
        for &size in &cfg.sizes {
            if pairs > 1 && !cfg.multi_sizes.contains(&size) {
                continue;
            }
            if dir == Dir::Rx && size == TSO_SIZE {
                continue; // RX 64 KiB: skipped (see the report notes)
            }
            v.push((dir, size, if dir == Dir::Rx { "mrg" } else { "-" }));
            if dir == Dir::Rx && cfg.nomrg && pairs == 1 {
                v.push((dir, size, "nomrg"));
            }
        }
    }
    v
}

fn connect(socket: &Path, opts: FrontendOptions) -> Result<NetFrontend> {
    NetFrontend::connect(socket, opts).map_err(|source| LoadgenError::Connect { socket: socket.to_path_buf(), source })
}

/// Quiet (no IPv6 chatter among the counted frames) is best effort: a far side that cannot
/// be quietened still works, the sink tells chatter from test frames.
fn quiet_iface(ifname: &str) {
    if let Err(e) = link::disable_ipv6(ifname) {
        progress(&format!("{e}"));
    }
}

/// Runs every configured case; progress on stderr.
pub fn run(cfg: &Config) -> Result<Report> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(LoadgenError::NotRoot);
    }
    let log_dir = vutap_testbed::log_dir("bench")?;
    let mut rep =
        Report { host: format!("{} CPUs", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)), ..Report::default() };
    rep.wake_cost = wake_cost::measure(&placement::online_cpus_at_start(), WAKE_COST_SAMPLES)?;
    if let Some(w) = rep.wake_cost {
        progress(&format!("a wake-up costs its writer {:.1} us across CPUs, {:.1} us on one", w.cross_cpu_ns / 1e3, w.same_cpu_ns / 1e3));
    }
    let dpdk = cfg.dpdk && Path::new(procs::TESTPMD).exists();
    if cfg.dpdk && !dpdk {
        rep.notes.push(format!("{} not found: DPDK comparison skipped", procs::TESTPMD));
    }
    if dpdk {
        rep.notes.push(
            "DPDK 22.11 testpmd (vhost PMD + tap PMD) has no 9000 B or 64 KiB TSO cases: the tap PMD's largest frame is 1522 B \
             (\"Frame size (9018) > device max frame size (1522)\"), and the vhost PMD offers no TSO the tap PMD could take"
                .into(),
        );
    }
    if placement::for_case(1, cfg.pin, &placement::online_cpus_at_start()).is_some() {
        rep.notes.push("one-pair cases are placed: the backend (vutap, DPDK's forwarding lcore, the raw loop) on CPU 0, the load (frontend, far-end sink/source) on the other CPUs; multi-pair cases run unpinned".into());
    }
    let sock_path = PathBuf::from(format!("/tmp/vutap-bench-{}.sock", std::process::id()));
    for &arr in &cfg.arrangements {
        match arr {
            Arrangement::Macvtap => run_macvtap(cfg, &mut rep, &sock_path, &log_dir)?,
            Arrangement::Tap => run_tap(cfg, &mut rep, &sock_path, &log_dir, dpdk)?,
        }
    }
    Ok(rep)
}

fn run_macvtap(cfg: &Config, rep: &mut Report, sock_path: &Path, log_dir: &Path) -> Result<()> {
    progress("macvtap arrangement: netns + veth + macvtap");
    let topo = Topology::new(1, MacvtapMode::Bridge)?;
    let tap = &topo.taps[0];
    link::set_mtu(None, &topo.lower, 9000)?;
    link::set_mtu(Some(&topo.netns), &topo.peer, 9000)?;
    link::set_mtu(None, &tap.ifname, 9000)?;
    quiet_iface(&tap.ifname);
    quiet_iface(&topo.lower);
    let far = Far {
        netns: Some(topo.netns.clone()),
        ifname: topo.peer.clone(),
        backend_mac: frames::parse_mac(&tap.mac).ok_or_else(|| LoadgenError::BadMac(tap.mac.clone()))?,
    };
    let spec = tap.dev.display().to_string();
    for &pairs in &cfg.pairs {
        let cases = case_list(cfg, pairs);
        let place = place_load(cfg, pairs);
        // One vutap per pair count, a fresh connection per case. Between its cases it has no
        // frontend, so its queues are detached and the ceiling's queues get every frame.
        let p = procs::vutap(sock_path, &spec, pairs, log_dir, place.as_ref(), &[])?;
        // The io_uring variant: a second vutap on the same macvtap, idle (detached) but for its cases.
        let uring_sock = sock_path.with_extension("io-uring.sock");
        let pu = io_uring_wanted(cfg, pairs)
            .then(|| procs::vutap(&uring_sock, &spec, pairs, log_dir, place.as_ref(), &io_uring_args()))
            .transpose()?;
        for &(dir, size, rxbuf) in &cases {
            let kv = CaseKey { arrangement: Arrangement::Macvtap, backend: Backend::Vutap, dir, size, pairs, rxbuf };
            let ku = CaseKey { backend: Backend::VutapIoUring, ..kv };
            let kc = CaseKey { backend: Backend::Ceiling, rxbuf: "-", ..kv };
            // The ceiling does not depend on the guest's buffers: measured with the mergeable case.
            let ceiling = rxbuf != "nomrg";
            let uring = pu.as_ref();
            let (mut vs, mut us, mut cs) = (Vec::new(), Vec::new(), Vec::new());
            let mut turns: Vec<Turn> = vec![(&mut vs, Box::new(|| vutap_case(cfg, &kv, sock_path, &far, &p, place.as_ref())))];
            if let Some(pu) = uring {
                turns.push((&mut us, Box::new(|| vutap_case(cfg, &ku, &uring_sock, &far, pu, place.as_ref()))));
            }
            if ceiling {
                turns.push((
                    &mut cs,
                    Box::new(|| {
                        raw::open_macvtap(&tap.dev, pairs)
                            .map_err(|source| LoadgenError::OpenTap { what: tap.dev.display().to_string(), source })
                            .and_then(|fds| ceiling_case(cfg, &kc, fds, &far, place.as_ref()))
                    }),
                ));
            }
            take_turns(cfg.rounds, turns);
            rep.cases.push(median_result(&kv, vs));
            if uring.is_some() {
                rep.cases.push(median_result(&ku, us));
            }
            if ceiling {
                rep.cases.push(median_result(&kc, cs));
            }
        }
        drop(pu);
        if cfg.latency && pairs == 1 {
            rep.latency.push(latency_result(Arrangement::Macvtap, Backend::Vutap, vhost_latency(cfg, sock_path, &far)));
            let r = raw::open_macvtap(&tap.dev, 1)
                .map_err(|source| LoadgenError::OpenTap { what: tap.dev.display().to_string(), source })
                .and_then(|fds| raw_latency(cfg, &fds[0], &far, place.as_ref()));
            rep.latency.push(latency_result(Arrangement::Macvtap, Backend::Ceiling, r));
        }
        drop(p);
        if cfg.latency && pairs == 1 {
            for polled in POLLED {
                let r = procs::vutap(sock_path, &spec, 1, log_dir, place.as_ref(), &poll_args(polled))
                    .and_then(|_polling| vhost_latency(cfg, sock_path, &far));
                rep.latency.push(polled_result(Arrangement::Macvtap, polled, r));
            }
        }
    }
    Ok(())
}

fn run_tap(cfg: &Config, rep: &mut Report, sock_path: &Path, log_dir: &Path, dpdk: bool) -> Result<()> {
    progress("tap arrangement: plain multi-queue taps, far side AF_PACKET on the tap in the host");
    let id = std::process::id() & 0xfffff;
    let (vname, dname, cname, uname) = (format!("vb{id:x}v"), format!("vb{id:x}d"), format!("vb{id:x}c"), format!("vb{id:x}u"));
    let dpdk_sock = sock_path.with_extension("dpdk.sock");
    for &pairs in &cfg.pairs {
        let cases = case_list(cfg, pairs);
        let place = place_load(cfg, pairs);
        // vutap idles at no cost between its cases and stays up; testpmd's forwarding lcore
        // spins even when idle, so it runs only for its own case.
        let vp = procs::vutap(sock_path, &vname, pairs, log_dir, place.as_ref(), &[])?;
        let vfar = host_tap_far(&vname)?;
        // The io_uring variant: a second vutap on a tap of its own.
        let uring_sock = sock_path.with_extension("io-uring.sock");
        let pu = io_uring_wanted(cfg, pairs)
            .then(|| -> Result<_> {
                let p = procs::vutap(&uring_sock, &uname, pairs, log_dir, place.as_ref(), &io_uring_args())?;
                Ok((p, host_tap_far(&uname)?))
            })
            .transpose()?;
        for &(dir, size, rxbuf) in &cases {
            let kv = CaseKey { arrangement: Arrangement::Tap, backend: Backend::Vutap, dir, size, pairs, rxbuf };
            let ku = CaseKey { backend: Backend::VutapIoUring, ..kv };
            let kd = CaseKey { backend: Backend::Dpdk, ..kv };
            let kc = CaseKey { backend: Backend::Ceiling, rxbuf: "-", ..kv };
            let ceiling = rxbuf != "nomrg";
            let uring = pu.as_ref();
            let (mut vs, mut us, mut ds, mut cs) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let mut turns: Vec<Turn> = vec![(&mut vs, Box::new(|| vutap_case(cfg, &kv, sock_path, &vfar, &vp, place.as_ref())))];
            if let Some((pu, ufar)) = uring {
                turns.push((&mut us, Box::new(|| vutap_case(cfg, &ku, &uring_sock, ufar, pu, place.as_ref()))));
            }
            if dpdk {
                turns.push((&mut ds, Box::new(|| dpdk_case(cfg, &kd, &dpdk_sock, &dname, log_dir, place.as_ref()))));
            }
            if ceiling {
                turns.push((
                    &mut cs,
                    Box::new(|| {
                        let w = raw::open_tap(&cname, pairs)
                            .map_err(|source| LoadgenError::OpenTap { what: format!("new tap {cname}"), source })
                            .and_then(|fds| ceiling_case(cfg, &kc, fds, &host_tap_far(&cname)?, place.as_ref()));
                        wait_gone(&cname);
                        w
                    }),
                ));
            }
            take_turns(cfg.rounds, turns);
            rep.cases.push(median_result(&kv, vs));
            if uring.is_some() {
                rep.cases.push(median_result(&ku, us));
            }
            if dpdk {
                rep.cases.push(median_result(&kd, ds));
            }
            if ceiling {
                rep.cases.push(median_result(&kc, cs));
            }
        }
        if cfg.latency && pairs == 1 {
            rep.latency.push(latency_result(Arrangement::Tap, Backend::Vutap, vhost_latency(cfg, sock_path, &vfar)));
            if dpdk {
                let r = start_testpmd(&dpdk_sock, &dname, 1, log_dir, place.as_ref())
                    .and_then(|(_p, far)| vhost_latency(cfg, &dpdk_sock, &far));
                wait_gone(&dname);
                rep.latency.push(latency_result(Arrangement::Tap, Backend::Dpdk, r));
            }
            let r = raw::open_tap(&cname, 1)
                .map_err(|source| LoadgenError::OpenTap { what: format!("new tap {cname}"), source })
                .and_then(|fds| raw_latency(cfg, &fds[0], &host_tap_far(&cname)?, place.as_ref()));
            wait_gone(&cname);
            rep.latency.push(latency_result(Arrangement::Tap, Backend::Ceiling, r));
        }
        drop(vp);
        wait_gone(&vname);
        if pu.is_some() {
            drop(pu);
            wait_gone(&uname);
        }
        if cfg.latency && pairs == 1 {
            for polled in POLLED {
                let r = procs::vutap(sock_path, &vname, 1, log_dir, place.as_ref(), &poll_args(polled))
                    .and_then(|_polling| vhost_latency(cfg, sock_path, &host_tap_far(&vname)?));
                wait_gone(&vname);
                rep.latency.push(polled_result(Arrangement::Tap, polled, r));
            }
        }
    }
    Ok(())
}

/// testpmd serving `socket` with a tap `name` it creates, ready for a case.
fn start_testpmd(socket: &Path, name: &str, pairs: u16, log_dir: &Path, place: Option<&Placement>) -> Result<(procs::Proc, Far)> {
    let p = procs::testpmd(socket, name, pairs, log_dir, place)?;
    Ok((p, host_tap_far(name)?))
}

/// A tap in the host as the far side of a case: quiet, MTU 9000, frames toward any MAC.
fn host_tap_far(name: &str) -> Result<Far> {
    quiet_iface(name);
    link::set_mtu(None, name, 9000)?;
    Ok(Far { netns: None, ifname: name.to_string(), backend_mac: OTHER_MAC })
}

/// One round of a case against a testpmd started for it.
fn dpdk_case(cfg: &Config, k: &CaseKey, socket: &Path, name: &str, log_dir: &Path, place: Option<&Placement>) -> Result<Window> {
    let r = start_testpmd(socket, name, k.pairs, log_dir, place).and_then(|(p, far)| {
        let pid = p.pid().to_string();
        // Its forwarding lcore polls, 100 % busy with or without traffic: its CPU cannot say
        // whether it was the limit, so only the load side's can (unbounded capacity).
        let cpu = || host_cpu::cpu_ns(&pid);
        let side = BackendSide { capacity: f64::INFINITY, ..BackendSide::process(p.pid(), &cpu, None, 1, place) };
        vhost_case(cfg, k, socket, &far, &side)
    });
    wait_gone(name);
    r
}

/// A non-persistent tap goes with its last fd; wait so that names do not clash.
fn wait_gone(name: &str) {
    let deadline = Instant::now() + Duration::from_secs(3);
    while vutap_testbed::packet::ifindex(name).is_some() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Round trips a ping-pong makes before it records any: every buffer of a 256-entry ring used
/// twice over. A backend's first touch of each guest page it maps costs a page fault (~4 us
/// here, once per page for the life of a connection), which in the first few hundred round
/// trips of a fresh connection lands on every second or third one.
const PING_WARMUP_ROUND_TRIPS: usize = 512;

fn ping_frame(far: &Far) -> Vec<u8> {
    wire::udp_frame(60, OTHER_MAC, far.backend_mac, 4000, 0)
}

fn vhost_latency(cfg: &Config, socket: &Path, far: &Far) -> Result<Vec<u64>> {
    let mut fe = connect(socket, fe_opts(1, Dir::Rx, 64, "mrg"))?;
    std::thread::sleep(Duration::from_millis(200));
    let sock = wire::far_socket(far.netns.as_deref(), &far.ifname)?;
    let budget = cfg.duration.max(Duration::from_secs(1));
    vhost::ping_pong(&mut fe, &sock, far.backend_mac, &ping_frame(far), PING_WARMUP_ROUND_TRIPS, cfg.latency_samples, budget)
}

fn raw_latency(cfg: &Config, fd: &vutap::tap::TapQueue, far: &Far, place: Option<&Placement>) -> Result<Vec<u64>> {
    let sock = wire::far_socket(far.netns.as_deref(), &far.ifname)?;
    let _refl = wire::reflector(sock, far.backend_mac);
    std::thread::sleep(Duration::from_millis(50));
    let budget = cfg.duration.max(Duration::from_secs(1));
    // The raw loop's ping-pong runs on this thread: on the backend's CPUs, like its other loops.
    let _on_backend = place.map(|p| PinnedFor::new(&p.backend, &p.load));
    Ok(raw::ping_pong(fd, &ping_frame(far), PING_WARMUP_ROUND_TRIPS, cfg.latency_samples, budget))
}

/// Pins this thread (and so what it spawns from now on) for the cases of one pair count: the
/// load's CPUs if the cases are placed, else every CPU.
fn place_load(cfg: &Config, pairs: u16) -> Option<Placement> {
    let all = placement::online_cpus_at_start();
    let place = placement::for_case(pairs, cfg.pin, &all);
    if let Err(e) = placement::pin_current_thread(place.as_ref().map_or(&all, |p| &p.load)) {
        progress(&format!("cannot pin the load threads: {e}; running unpinned"));
        return None;
    }
    place
}

/// Moves this thread to `to` until dropped, then back to `back`.
struct PinnedFor(Vec<usize>);

impl PinnedFor {
    fn new(to: &[usize], back: &[usize]) -> Self {
        let _ = placement::pin_current_thread(to);
        PinnedFor(back.to_vec())
    }
}

impl Drop for PinnedFor {
    fn drop(&mut self) {
        let _ = placement::pin_current_thread(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(gbps: f64, cpu: f64, rounds: &[Option<(f64, f64)>]) -> CaseResult {
        let mut c = result(
            &CaseKey { arrangement: Arrangement::Tap, backend: Backend::Vutap, dir: Dir::Tx, size: 1500, pairs: 1, rxbuf: "-" },
            Err(LoadgenError::NoRounds),
        );
        (c.gbps, c.cpu_ns_per_frame, c.error) = (gbps, cpu, None);
        c.rounds = rounds.iter().map(|r| r.map(|(gbps, cpu_ns_per_frame)| RoundFigures { gbps, cpu_ns_per_frame })).collect();
        c
    }

    fn cpu(r: &RoundFigures) -> f64 {
        r.cpu_ns_per_frame
    }

    #[test]
    fn test_paired_ratio_is_the_median_of_each_rounds_ratio() {
        // The host slowed down in round 2 for both: each round says 1.10, the medians 1.50.
        let a = cell(5.0, 3300.0, &[Some((6.0, 2200.0)), Some((4.0, 3300.0)), Some((5.0, 2750.0))]);
        let b = cell(5.0, 2200.0, &[Some((6.0, 2000.0)), Some((4.0, 3000.0)), Some((5.0, 2500.0))]);
        assert!((paired_ratio(&a, &b, cpu).unwrap() - 1.10).abs() < 1e-9);
        assert!((paired_ratio(&a, &b, |r| r.gbps).unwrap() - 1.0).abs() < 1e-9);
    }

    #[test]
    fn test_paired_ratio_skips_failed_rounds_and_takes_the_middle_of_an_even_count() {
        let a = cell(5.0, 1000.0, &[Some((1.0, 1200.0)), None, Some((1.0, 1400.0))]);
        let b = cell(5.0, 1000.0, &[Some((1.0, 1000.0)), Some((1.0, 1000.0)), Some((1.0, 1000.0))]);
        assert!((paired_ratio(&a, &b, cpu).unwrap() - 1.30).abs() < 1e-9);
    }

    #[test]
    fn test_paired_ratio_falls_back_to_the_median_rounds_without_shared_rounds() {
        let a = cell(5.0, 1500.0, &[]);
        let b = cell(5.0, 1000.0, &[Some((1.0, 900.0))]);
        assert!((paired_ratio(&a, &b, cpu).unwrap() - 1.5).abs() < 1e-9);
        let dead = cell(0.0, 0.0, &[]);
        assert_eq!(paired_ratio(&a, &dead, cpu), None);
    }

    #[test]
    fn test_ceiling_buffers_sit_as_far_apart_as_the_guest_buffers_of_the_case() {
        let key = |dir, size| CaseKey { arrangement: Arrangement::Tap, backend: Backend::Ceiling, dir, size, pairs: 1, rxbuf: "-" };
        // TX: the next power of two of header + frame (a guest's kmalloc chunk), a TSO frame's
        // 64 KiB slot rounded to a cache line; RX: Linux's mergeable buffers.
        let tx: Vec<usize> = [64, 1500, 9000, TSO_SIZE].iter().map(|&s| guest_slot_len(&key(Dir::Tx, s))).collect();
        assert_eq!(tx, vec![128, 2048, 16384, 65600]);
        let rx: Vec<usize> = [64, 1500, 9000].iter().map(|&s| guest_slot_len(&key(Dir::Rx, s))).collect();
        assert_eq!(rx, vec![1536, 1536, 4096]);
    }

    #[test]
    fn test_turn_order_rotates_so_each_backend_leads_a_round() {
        let orders: Vec<Vec<usize>> = (0..4).map(|r| turn_order(3, r).collect()).collect();
        assert_eq!(orders, vec![vec![0, 1, 2], vec![1, 2, 0], vec![2, 0, 1], vec![0, 1, 2]]);
        let (mut a, mut b, mut seen) = (Vec::new(), Vec::new(), Vec::new());
        let log = std::cell::RefCell::new(&mut seen);
        let mut turns: Vec<Turn> = Vec::new();
        turns.push((
            &mut a,
            Box::new(|| {
                log.borrow_mut().push('a');
                Err(LoadgenError::NoRounds)
            }),
        ));
        turns.push((
            &mut b,
            Box::new(|| {
                log.borrow_mut().push('b');
                Err(LoadgenError::NoRounds)
            }),
        ));
        take_turns(3, turns);
        assert_eq!((a.len(), b.len()), (3, 3));
        assert_eq!(seen, vec!['a', 'b', 'b', 'a', 'a', 'b']);
    }
}
