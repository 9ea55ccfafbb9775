//! The `vutap` binary: parse arguments, set up logging, run. `vutap stats ENDPOINT` prints the
//! counters of a running vutap instead; `vutap upgrade CONTROL` replaces a running vutap live.

use clap::Parser;
use vutap::cli::{Args, DaemonConfig};

fn stats_main(rest: &[String]) -> ! {
    match rest {
        [endpoint] if !endpoint.starts_with('-') => match vutap::operations::stats::run(endpoint) {
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

/// `vutap upgrade CONTROL [--binary PATH]`: live upgrade of the vutap listening on CONTROL.
fn upgrade_main(rest: &[String]) -> ! {
    let usage = || -> ! {
        eprintln!("usage: vutap upgrade CONTROL_SOCKET [--binary PATH]\n(the --control-socket of a running vutap; PATH defaults to its own binary)");
        std::process::exit(2)
    };
    let (control, binary) = match rest {
        [c] if !c.starts_with('-') => (c, None),
        [c, flag, b] if !c.starts_with('-') && flag == "--binary" => (c, Some(std::path::PathBuf::from(b))),
        _ => usage(),
    };
    match vutap::operations::upgrade::coordinator::request_upgrade(
        std::path::Path::new(control),
        binary,
        std::time::Duration::from_secs(60),
    ) {
        Ok(reply) if reply.ok => {
            println!(
                "upgraded: pid {} serves every device now (queue pairs paused {:.1} ms)",
                reply.pid.unwrap_or(0),
                reply.pause_ms.unwrap_or(0.0)
            );
            std::process::exit(0)
        }
        Ok(reply) => {
            eprintln!("vutap upgrade: failed, the running vutap goes on: {}", reply.error.unwrap_or_default());
            std::process::exit(1)
        }
        Err(e) => {
            eprintln!("vutap upgrade: {e}");
            std::process::exit(1)
        }
    }
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("stats") {
        stats_main(&argv[2..]);
    }
    if argv.get(1).map(String::as_str) == Some("upgrade") {
        upgrade_main(&argv[2..]);
    }
    let args = Args::parse();
    env_logger::Builder::new().parse_filters(&args.log_level).parse_default_env().format_timestamp_millis().init();
    let config = match DaemonConfig::try_from(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vutap: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = vutap::operations::daemon::run(config) {
        eprintln!("vutap: {e}");
        std::process::exit(1);
    }
}
