//! The Debian package's contents: `scripts/build-deb.sh` builds it from the release build, it is
//! unpacked into a directory (`dpkg -x`: no maintainer scripts touch this host), and its files are
//! checked against the host's tools (the man page and completions describe the binary's options,
//! the example config parses, `systemd-analyze verify` accepts the unit). Installing it with dpkg
//! on a fresh system and serving a tap from it is `package_install.rs`.
//!
//! Needs dpkg-deb, objdump, strip, systemd-analyze (scripts/install-deps.sh).

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use common::{serial, unique};
use vutap_testbed::{log_dir, workspace_root};

fn output(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Builds the package and unpacks it into a new directory; returns (deb, root).
fn build_and_unpack() -> (PathBuf, PathBuf) {
    let started = Instant::now();
    let stdout = output(Command::new("bash").arg(workspace_root().join("scripts/build-deb.sh")));
    let deb = PathBuf::from(stdout.lines().last().expect("build-deb.sh prints the .deb").trim());
    eprintln!("build-deb.sh: {} in {:?}", deb.display(), started.elapsed());
    assert!(deb.is_file(), "{}", deb.display());
    let root = log_dir(&format!("package-root-{}", unique())).unwrap();
    output(Command::new("dpkg").arg("-x").arg(&deb).arg(&root));
    (deb, root)
}

#[test]
fn test_package_contents_describe_the_binary() {
    let _g = serial();
    let (deb, root) = build_and_unpack();

    let field = |name: &str| output(Command::new("dpkg-deb").arg("-f").arg(&deb).arg(name)).trim().to_string();
    assert_eq!(field("Package"), "vutap");
    assert_eq!(field("Version"), env!("CARGO_PKG_VERSION"));
    assert!(field("Depends").starts_with("libc6 (>= 2."), "{}", field("Depends"));

    for f in [
        "usr/bin/vutap",
        "usr/lib/systemd/system/vutap@.service",
        "usr/share/doc/vutap/examples/vutap.conf",
        "usr/share/doc/vutap/examples/vm0.env",
        "usr/share/doc/vutap/copyright",
        "usr/share/man/man1/vutap.1.gz",
        "usr/share/bash-completion/completions/vutap",
        "usr/share/zsh/vendor-completions/_vutap",
        "usr/share/fish/vendor_completions.d/vutap.fish",
    ] {
        assert!(root.join(f).is_file(), "{f} missing from the package");
    }
    let bin = root.join("usr/bin/vutap");
    let version = output(Command::new(&bin).arg("--version"));
    assert_eq!(version.trim(), format!("vutap {}", env!("CARGO_PKG_VERSION")));

    // The man page and completions describe the options the binary has.
    let man = output(Command::new("zcat").arg(root.join("usr/share/man/man1/vutap.1.gz")));
    assert!(man.contains(".TH vutap 1"), "{man}");
    for opt in ["\\-\\-tap", "\\-\\-queues", "\\-\\-metrics\\-addr"] {
        assert!(man.contains(opt), "man page lacks {opt}");
    }
    let bash = root.join("usr/share/bash-completion/completions/vutap");
    let complete = output(Command::new("bash").arg("-c").arg(format!("source {} && complete -p vutap", bash.display())));
    assert!(complete.contains("vutap"), "{complete}");
    for f in ["usr/share/zsh/vendor-completions/_vutap", "usr/share/fish/vendor_completions.d/vutap.fish"] {
        assert!(std::fs::read_to_string(root.join(f)).unwrap().contains("queues"), "{f}");
    }
    // The example config parses as vutap reads it.
    let devices =
        vutap::cli::parse_config_file(&root.join("usr/share/doc/vutap/examples/vutap.conf"), false).unwrap_or_else(|e| panic!("{e}"));
    assert!(!devices.is_empty());

    // The unit runs the packaged binary and passes systemd's checks (pointed at the unpacked one).
    let unit = std::fs::read_to_string(root.join("usr/lib/systemd/system/vutap@.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/vutap "), "{unit}");
    let copy = root.join("vutap@vm0.service");
    std::fs::write(&copy, unit.replace("/usr/bin/vutap", bin.to_str().unwrap())).unwrap();
    let out = Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&copy).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !err.lines().any(|l| l.contains("vutap@")), "systemd-analyze verify: {err}");
}
