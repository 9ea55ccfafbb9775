//! `vutap-vm`: real-guest runs of vutap against QEMU's own tap backend.
//!
//! `vutap-vm demo` builds one netns/veth/macvtap topology, then for each QEMU version boots the
//! test guest through vutap and through QEMU's tap backend on the same /dev/tapN, pings the peer
//! namespace, runs iperf3 both ways, prints a markdown table and writes `results/demo.json`.
//! Needs root.

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use serde::Serialize;
use vutap_bench::seed;
use vutap_testbed::{workspace_root, Backend, MacvtapMode, Outcome, QemuVersion, Scenario, Topology};

#[derive(Parser)]
#[command(about = "End-to-end runs of vutap with real QEMU guests")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// vutap vs QEMU's tap backend: ping + iperf3 both directions, markdown table + JSON.
    Demo(DemoArgs),
    /// The seed experiment: internal (guest to guest) and external (guest to host)
    /// through a bridge-mode macvtap, vutap vs QEMU's tap backend side by side, QEMU 7.2 and 10.0,
    /// 1 and 2 queue pairs, 1 and 4 streams, both directions; plus the VEPA isolation check.
    /// Prints markdown tables and writes JSON + an SVG bar chart.
    Seed(SeedArgs),
}

#[derive(clap::Args)]
struct SeedArgs {
    #[arg(long, value_enum, default_value = "both")]
    qemu: QemuChoice,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    /// Times each cell is measured per backend (interleaved); the table shows the median.
    #[arg(long, default_value_t = 2)]
    rounds: u32,
    /// Queue pairs to run (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    queues: Vec<u16>,
    /// iperf3 parallel streams to run (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    streams: Vec<u16>,
    /// Short version (CI): QEMU 10 only, 1 queue pair, 1 stream, 2 s per run, no INTx baseline.
    #[arg(long)]
    quick: bool,
    /// Skip QEMU's tap backend with `vectors=0` on QEMU 7.2 (the like-for-like baseline).
    #[arg(long)]
    no_intx: bool,
    /// Skip the VEPA isolation check.
    #[arg(long)]
    no_vepa: bool,
    /// Outputs (relative paths are under the workspace root).
    #[arg(long, default_value = "results/seed.json")]
    json: std::path::PathBuf,
    #[arg(long, default_value = "results/seed.svg")]
    svg: std::path::PathBuf,
    #[arg(long, default_value = "results/seed.md")]
    markdown: std::path::PathBuf,
    /// Run nothing: redraw the markdown and the SVG from this JSON of an earlier run.
    #[arg(long)]
    render_from: Option<std::path::PathBuf>,
}

/// The report of an earlier seed run, from its JSON.
fn read_seed_report(p: &std::path::Path) -> Result<seed::SeedReport, String> {
    let text = std::fs::read_to_string(p).map_err(|e| format!("read {}: {e}", p.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("parse {}: {e}", p.display()))
}

#[derive(clap::Args)]
struct DemoArgs {
    #[arg(long, value_enum, default_value = "both")]
    qemu: QemuChoice,
    #[arg(long, value_enum, default_value = "both")]
    backend: BackendChoice,
    /// Queue pairs (the guest uses that many channels and iperf3 streams).
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    /// Where to write the JSON results (relative paths are under the workspace root).
    #[arg(long, default_value = "results/demo.json")]
    json: std::path::PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
enum QemuChoice {
    #[value(name = "7")]
    V7,
    #[value(name = "10")]
    V10,
    Both,
}

#[derive(Clone, Copy, ValueEnum)]
enum BackendChoice {
    Vutap,
    QemuTap,
    Both,
}

/// One line of the table / JSON.
#[derive(Serialize)]
struct Row {
    backend: Backend,
    qemu: &'static str,
    queues: u16,
    direction: &'static str,
    gbps: f64,
    /// vutap Gbit/s over qemu-tap Gbit/s for the same QEMU, queues and direction (vutap rows).
    ratio_vs_qemu_tap: Option<f64>,
    /// Host CPU seconds of the datapath per GB received: vutap's processes plus QEMU's threads
    /// but the vCPUs (`vutap_testbed::host_cpu::DatapathCpu`).
    cpu_s_per_gb: Option<f64>,
    /// The part of it vutap's processes used (vutap rows).
    vutap_cpu_s_per_gb: Option<f64>,
    /// `cpu_s_per_gb` over qemu-tap's for the same QEMU, queues and direction (vutap rows).
    cpu_ratio_vs_qemu_tap: Option<f64>,
}

#[derive(Serialize)]
struct Report {
    seconds: u32,
    outcomes: Vec<Outcome>,
    rows: Vec<Row>,
    /// Runs that failed, as "backend qemu: error".
    failures: Vec<String>,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match Cli::parse().cmd {
        Cmd::Demo(args) => demo(args),
        Cmd::Seed(args) => seed_cmd(args),
    }
}

fn demo(args: DemoArgs) -> ExitCode {
    let qemus: &[QemuVersion] = match args.qemu {
        QemuChoice::V7 => &[QemuVersion::V7],
        QemuChoice::V10 => &[QemuVersion::V10],
        QemuChoice::Both => &[QemuVersion::V7, QemuVersion::V10],
    };
    let backends: &[Backend] = match args.backend {
        BackendChoice::Vutap => &[Backend::Vutap],
        BackendChoice::QemuTap => &[Backend::QemuTap],
        BackendChoice::Both => &[Backend::Vutap, Backend::QemuTap],
    };
    let topo = match Topology::new(1, MacvtapMode::Bridge) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("vutap-vm: topology: {e}");
            return ExitCode::FAILURE;
        }
    };
    let tap = topo.taps[0].clone();
    eprintln!("topology: netns {} peer {} guest {} on {} ({})", topo.netns, topo.peer_ip, tap.guest_ip, tap.dev.display(), tap.mac);

    let mut outcomes = Vec::new();
    let mut failures = Vec::new();
    for &qemu in qemus {
        for &backend in backends {
            let name = format!("demo-{backend}-q{}-{}q", qemu.label(), args.queues);
            eprintln!("== {backend} on QEMU {qemu}, {} queue pair(s)", args.queues);
            let s = Scenario {
                qemu,
                backend,
                queues: args.queues,
                ping_count: 5,
                iperf_secs: args.seconds,
                streams: 1,
                spread_flows: false,
                vutap_args: vec![],
            };
            match s.run(&topo, &tap, &name) {
                Ok(o) => {
                    eprintln!(
                        "   boot {:.1} s, ping {}/{}, guest->peer {:.2} Gbit/s, peer->guest {:.2} Gbit/s",
                        o.boot_secs, o.ping.received, o.ping.transmitted, o.tx.received_gbps, o.rx.received_gbps
                    );
                    outcomes.push(o);
                }
                Err(e) => {
                    eprintln!("   FAILED: {e}");
                    failures.push(format!("{backend} {qemu}: {e}"));
                }
            }
        }
    }
    let rows = rows(&outcomes, f64::from(args.seconds));
    print_table(&rows);
    let report = Report { seconds: args.seconds, outcomes, rows, failures };
    let path = if args.json.is_absolute() { args.json.clone() } else { workspace_root().join(&args.json) };
    let written = path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|_| std::fs::write(&path, serde_json::to_string_pretty(&report).unwrap_or_default()));
    match written {
        Ok(()) => eprintln!("wrote {}", path.display()),
        Err(e) => eprintln!("vutap-vm: write {}: {e}", path.display()),
    }
    if report.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn rows(outcomes: &[Outcome], secs: f64) -> Vec<Row> {
    let gbps = |o: &Outcome, dir: &str| {
        if dir == "guest->peer" {
            o.tx.received_gbps
        } else {
            o.rx.received_gbps
        }
    };
    let cpu_per_gb = |o: &Outcome, dir: &str| {
        let used = if dir == "guest->peer" { o.tx_cpu } else { o.rx_cpu };
        used.per_gb(gbps(o, dir), secs)
    };
    let mut rows = Vec::new();
    for o in outcomes {
        for dir in ["guest->peer", "peer->guest"] {
            let baseline = outcomes.iter().find(|b| b.backend == Backend::QemuTap && b.qemu == o.qemu && b.queues == o.queues);
            let ratio = match (o.backend, baseline) {
                (Backend::Vutap, Some(b)) if gbps(b, dir) > 0.0 => Some(gbps(o, dir) / gbps(b, dir)),
                _ => None,
            };
            let cpu = cpu_per_gb(o, dir);
            let cpu_ratio = match (o.backend, cpu, baseline.and_then(|b| cpu_per_gb(b, dir))) {
                (Backend::Vutap, Some((a, _)), Some((b, _))) if b > 0.0 => Some(a / b),
                _ => None,
            };
            rows.push(Row {
                backend: o.backend,
                qemu: o.qemu.label(),
                queues: o.queues,
                direction: dir,
                gbps: gbps(o, dir),
                ratio_vs_qemu_tap: ratio,
                cpu_s_per_gb: cpu.map(|(all, _)| all),
                vutap_cpu_s_per_gb: cpu.filter(|_| o.backend == Backend::Vutap).map(|(_, vutap)| vutap),
                cpu_ratio_vs_qemu_tap: cpu_ratio,
            });
        }
    }
    rows
}

fn print_table(rows: &[Row]) {
    println!("| backend | qemu | queues | direction | Gbit/s | vutap/qemu-tap | CPU s/GB | CPU vutap/qemu-tap |");
    println!("|---|---|---|---|---|---|---|---|");
    let two = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.2}"));
    for r in rows {
        let ratio = two(r.ratio_vs_qemu_tap);
        let own = r.vutap_cpu_s_per_gb.map_or(String::new(), |x| format!(" (vutap {x:.2})"));
        let cpu = format!("{}{own}", two(r.cpu_s_per_gb));
        let backend = match r.backend {
            Backend::Vutap => "vutap",
            Backend::QemuTap => "qemu-tap",
        };
        println!(
            "| {backend} | {} | {} | {} | {:.2} | {ratio} | {cpu} | {} |",
            r.qemu,
            r.queues,
            r.direction,
            r.gbps,
            two(r.cpu_ratio_vs_qemu_tap)
        );
    }
}

fn seed_cmd(args: SeedArgs) -> ExitCode {
    let mut plan = seed::SeedPlan {
        qemus: match args.qemu {
            QemuChoice::V7 => vec![QemuVersion::V7],
            QemuChoice::V10 => vec![QemuVersion::V10],
            QemuChoice::Both => vec![QemuVersion::V7, QemuVersion::V10],
        },
        paths: vec![seed::SeedPath::Internal, seed::SeedPath::External],
        queues: args.queues.clone(),
        streams: args.streams.clone(),
        seconds: args.seconds,
        rounds: args.rounds,
        intx_baseline: !args.no_intx,
        vepa_check: !args.no_vepa,
        tag: "seed".into(),
    };
    if args.quick {
        plan.qemus = vec![QemuVersion::V10];
        plan.queues = vec![1];
        plan.streams = vec![1];
        plan.seconds = 2;
        plan.rounds = 1;
        plan.intx_baseline = false;
    }
    let report = match &args.render_from {
        Some(p) => read_seed_report(p),
        None => seed::run(&plan).map_err(|e| e.to_string()),
    };
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vutap-vm seed: {e}");
            return ExitCode::FAILURE;
        }
    };
    let md = seed::markdown(&report);
    println!("{md}");
    let out = |p: &std::path::Path, text: String| {
        let path = if p.is_absolute() { p.to_path_buf() } else { workspace_root().join(p) };
        let r = path.parent().map_or(Ok(()), std::fs::create_dir_all).and_then(|_| std::fs::write(&path, text));
        match r {
            Ok(()) => eprintln!("wrote {}", path.display()),
            Err(e) => eprintln!("vutap-vm: write {}: {e}", path.display()),
        }
    };
    if args.render_from.is_none() {
        out(&args.json, serde_json::to_string_pretty(&report).unwrap_or_default());
    }
    out(&args.svg, seed::svg(&report));
    out(&args.markdown, md);
    let holes = report.cells.iter().any(|c| c.vutap.is_none() || c.qemu_tap.is_none());
    let vepa_ok = report.vepa.as_ref().is_none_or(|v| v.as_expected());
    if holes || !vepa_ok {
        eprintln!("vutap-vm seed: missing numbers or unexpected VEPA result (see above)");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
