//! The `vutap` binary: parse arguments, set up logging, run.

use clap::Parser;
use vutap::cli::{Args, Config};

fn main() {
    let args = Args::parse();
    env_logger::Builder::new()
        .parse_filters(&args.log_level)
        .parse_default_env()
        .format_timestamp_millis()
        .init();
    let config = match Config::try_from(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vutap: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = vutap::run(config) {
        eprintln!("vutap: {e}");
        std::process::exit(1);
    }
}
