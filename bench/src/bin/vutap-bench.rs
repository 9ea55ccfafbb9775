//! `vutap-bench`: load generator for vhost-user-net backends (vutap vs raw-tap ceiling vs DPDK
//! testpmd). Markdown on stdout, JSON + SVG files, progress on stderr. Needs root.
//!
//! `vutap-bench [--smoke] [--sizes 64,1500,9000,65536] [--pairs 1,2,4] [--duration 3] [--warmup 1]`

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
    #[arg(long, default_value = "results/bench.json")]
    json: PathBuf,
    #[arg(long, default_value = "results/bench.svg")]
    svg: PathBuf,
    /// Also write the markdown here.
    #[arg(long)]
    markdown: Option<PathBuf>,
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
    if let Some(r) = a.rounds {
        cfg.rounds = r.max(1);
    }
    let rep = match loadgen::run(&cfg) {
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
    write(&a.json, serde_json::to_string_pretty(&rep).unwrap_or_default());
    write(&a.svg, report::svg(&rep));
    if let Some(p) = &a.markdown {
        write(p, md);
    }
    eprintln!("[vutap-bench] wrote {} and {}", a.json.display(), a.svg.display());
}
