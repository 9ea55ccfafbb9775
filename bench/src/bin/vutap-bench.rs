//! `vutap-bench`: load generator for vhost-user-net backends (vutap vs raw-tap ceiling vs DPDK
//! testpmd). Markdown on stdout, JSON + SVG files, progress on stderr. Needs root.
//!
//! `vutap-bench [--smoke] [--sizes 64,1500,9000,65536] [--pairs 1,2,4] [--duration 3] [--warmup 1]`
//! `vutap-bench --render-from results/bench.json [--markdown results/bench.md]` (redraw only)

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use vutap_bench::loadgen::{self, report, Arrangement, Config, Dir};

#[derive(Parser)]
#[command(name = "vutap-bench")]
struct Args {
    /// A couple of seconds: 1500 B, one pair, macvtap arrangement, vutap + ceiling.
    #[arg(long)]
    smoke: bool,
    /// Frame sizes: 64 (60 B + FCS), 1500, 9000 (MTU-sized), 65536 (64 KiB TSO, TX only).
    #[arg(long, value_delimiter = ',')]
    sizes: Option<Vec<u32>>,
    /// Queue-pair counts.
    #[arg(long, value_delimiter = ',')]
    pairs: Option<Vec<u16>>,
    /// Sizes that also run with more than one pair.
    #[arg(long, value_delimiter = ',')]
    multi_sizes: Option<Vec<u32>>,
    /// Directions: tx, rx.
    #[arg(long, value_delimiter = ',')]
    dirs: Option<Vec<String>>,
    /// Arrangements: macvtap, tap.
    #[arg(long, value_delimiter = ',')]
    arrangements: Option<Vec<String>>,
    /// Measured seconds per case.
    #[arg(long)]
    duration: Option<f64>,
    /// Warm-up seconds per case (not measured).
    #[arg(long)]
    warmup: Option<f64>,
    /// Skip DPDK testpmd.
    #[arg(long)]
    no_dpdk: bool,
    /// Skip the non-mergeable RX buffer cases.
    #[arg(long)]
    no_nomrg: bool,
    /// Rounds per case (backends take turns within a round; each reports its median round)
    #[arg(long)]
    rounds: Option<u32>,
    /// Do not pin one-pair cases (backend on CPU 0, load on the other CPUs).
    #[arg(long)]
    no_pin: bool,
    /// Skip the ping-pong latency runs.
    #[arg(long)]
    no_latency: bool,
    /// Round trips each backend's ping-pong records (after its warm-up).
    #[arg(long)]
    latency_samples: Option<usize>,
    /// Record each backend with `perf` during its windows and split its CPU per frame by where
    /// it went (tap copy, tap path, own code, wake-ups, eventfd, io_uring, ...). Sampling costs
    /// a little CPU: use a profiled run to explain cells, an unprofiled one to measure them.
    #[arg(long)]
    profile: bool,
    #[arg(long, default_value = "results/bench.json")]
    json: PathBuf,
    #[arg(long, default_value = "results/bench.svg")]
    svg: PathBuf,
    /// Also write the markdown here.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Run nothing: redraw the markdown (stdout, --markdown) and the SVG from this JSON of an
    /// earlier run.
    #[arg(long)]
    render_from: Option<PathBuf>,
}

/// The report of an earlier run, from its JSON.
fn read_report(p: &PathBuf) -> Result<loadgen::Report, String> {
    let text = std::fs::read_to_string(p).map_err(|e| format!("read {}: {e}", p.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("parse {}: {e}", p.display()))
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let a = Args::parse();
    let mut cfg = if a.smoke { Config::smoke() } else { Config::full() };
    if let Some(v) = a.sizes {
        cfg.sizes = v;
    }
    if let Some(v) = a.pairs {
        cfg.pairs = v;
    }
    if let Some(v) = a.multi_sizes {
        cfg.multi_sizes = v;
    }
    if let Some(v) = a.dirs {
        cfg.dirs = v
            .iter()
            .filter_map(|d| match d.as_str() {
                "tx" => Some(Dir::Tx),
                "rx" => Some(Dir::Rx),
                _ => None,
            })
            .collect();
    }
    if let Some(v) = a.arrangements {
        cfg.arrangements = v
            .iter()
            .filter_map(|d| match d.as_str() {
                "macvtap" => Some(Arrangement::Macvtap),
                "tap" => Some(Arrangement::Tap),
                _ => None,
            })
            .collect();
    }
    if let Some(d) = a.duration {
        cfg.duration = Duration::from_secs_f64(d);
    }
    if let Some(d) = a.warmup {
        cfg.warmup = Duration::from_secs_f64(d);
    }
    cfg.dpdk &= !a.no_dpdk;
    cfg.nomrg &= !a.no_nomrg;
    cfg.latency &= !a.no_latency;
    cfg.pin &= !a.no_pin;
    if let Some(n) = a.latency_samples {
        cfg.latency_samples = n.max(1);
    }
    if let Some(r) = a.rounds {
        cfg.rounds = r.max(1);
    }
    cfg.profile = a.profile;
    if cfg.profile && a.render_from.is_none() {
        if let Err(e) = loadgen::profile::check_available() {
            eprintln!("vutap-bench: --profile: {e}");
            std::process::exit(1);
        }
    }
    let rendering = a.render_from.is_some();
    let rep = match &a.render_from {
        Some(p) => read_report(p),
        None => loadgen::run(&cfg).map_err(|e| e.to_string()),
    };
    let rep = match rep {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vutap-bench: {e}");
            std::process::exit(1);
        }
    };
    let md = report::markdown(&rep);
    print!("{md}");
    let write = |p: &PathBuf, s: String| {
        if let Some(d) = p.parent() {
            let _ = std::fs::create_dir_all(d);
        }
        if let Err(e) = std::fs::write(p, s) {
            eprintln!("vutap-bench: write {}: {e}", p.display());
        }
    };
    if !rendering {
        write(&a.json, serde_json::to_string_pretty(&rep).unwrap_or_default());
    }
    write(&a.svg, report::svg(&rep));
    if let Some(p) = &a.markdown {
        write(p, md);
    }
    if rendering {
        eprintln!("[vutap-bench] wrote {}", a.svg.display());
    } else {
        eprintln!("[vutap-bench] wrote {} and {}", a.json.display(), a.svg.display());
    }
}
