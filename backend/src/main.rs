//! The `vutap` binary: parse arguments, set up logging, run. `vutap stats ENDPOINT` prints the
//! counters of a running vutap instead.

use clap::Parser;
use vutap::cli::{Args, DaemonConfig};

fn stats_main(rest: &[String]) -> ! {
    match rest {
        [endpoint] if !endpoint.starts_with('-') => match vutap::stats::run(endpoint) {
            Ok(table) => {
                print!("{table}");
                std::process::exit(0)
            }
            Err(e) => {
                eprintln!("vutap stats: {e}");
                std::process::exit(1)
            }
        },
        _ => {
            eprintln!("usage: vutap stats HOST:PORT | /path/to/metrics.sock\n(the --metrics-addr or --metrics-unix of a running vutap)");
            std::process::exit(2)
        }
    }
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("stats") {
        stats_main(&argv[2..]);
    }
    let args = Args::parse();
    env_logger::Builder::new()
        .parse_filters(&args.log_level)
        .parse_default_env()
        .format_timestamp_millis()
        .init();
    vutap::sandbox::set_enabled(!args.no_seccomp);
    vutap::worker::set_exit_on_tap_loss(args.exit_on_tap_loss);
    let config = match DaemonConfig::try_from(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vutap: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = vutap::daemon::run(config) {
        eprintln!("vutap: {e}");
        std::process::exit(1);
    }
}
