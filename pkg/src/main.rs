//! `vutap-gen man DIR` writes `vutap.1`; `vutap-gen completions DIR` writes bash, zsh and fish
//! completions for `vutap`. Both come from the daemon's own clap definitions
//! ([`vutap::cli::Args`]), so they cannot drift from the options vutap accepts.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::CommandFactory;
use clap_complete::Shell;

/// Where each shell looks for a completion file, relative to the directory given.
const COMPLETIONS: [(Shell, &str); 3] = [
    (Shell::Bash, "bash-completion/completions/vutap"),
    (Shell::Zsh, "zsh/vendor-completions/_vutap"),
    (Shell::Fish, "fish/vendor_completions.d/vutap.fish"),
];

fn write_man(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let path = dir.join("vutap.1");
    let mut out = Vec::new();
    clap_mangen::Man::new(vutap::cli::Args::command()).render(&mut out)?;
    std::fs::create_dir_all(dir)?;
    std::fs::write(&path, out)?;
    Ok(vec![path])
}

fn write_completions(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    for (shell, rel) in COMPLETIONS {
        let path = dir.join(rel);
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut vutap::cli::Args::command(), "vutap", &mut out);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, out)?;
        written.push(path);
    }
    Ok(written)
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let result = match argv.as_slice() {
        [what, dir] if what == "man" => write_man(Path::new(dir)),
        [what, dir] if what == "completions" => write_completions(Path::new(dir)),
        _ => {
            eprintln!("usage: vutap-gen man DIR | vutap-gen completions DIR");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(paths) => {
            for p in paths {
                println!("{}", p.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vutap-gen: {e}");
            ExitCode::FAILURE
        }
    }
}
