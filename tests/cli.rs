//! The `vutap` binary's start-up errors: each refused configuration exits non-zero with exactly
//! one line on stderr that names the cause. The binary is (re)built by the test with the same
//! profile, so it is never stale.
//!
//! Needs root; run with `cargo test -p vutap-tests --test cli`.

mod common;

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use common::*;
use vutap_testbed::{MacvtapMode, Topology};

fn binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
        let release = !cfg!(debug_assertions);
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut c = Command::new(cargo);
        c.current_dir(&root).args(["build", "-q", "-p", "vutap", "--bin", "vutap"]);
        if release {
            c.arg("--release");
        }
        let st = c.status().expect("spawn cargo build");
        assert!(st.success(), "cargo build -p vutap failed");
        let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"));
        target.join(if release { "release" } else { "debug" }).join("vutap")
    })
    .clone()
}

/// Runs vutap with `args`; returns (exit code, stderr lines). Fails if it keeps running.
fn run(args: &[&str]) -> (i32, Vec<String>) {
    run_refused(Command::new(binary()).args(args).args(["--log-level", "error"]).env_remove("RUST_LOG"))
}

fn assert_refused(args: &[&str], code: i32, needles: &[&str]) {
    let (c, lines) = run(args);
    assert_eq!(c, code, "exit code of vutap {args:?}; stderr {lines:?}");
    assert_eq!(lines.len(), 1, "exactly one line on stderr: {lines:?}");
    assert!(lines[0].starts_with("vutap: "), "{lines:?}");
    for n in needles {
        assert!(lines[0].contains(n), "{:?} does not mention {n:?}", lines[0]);
    }
}

#[test]
fn test_cli_missing_tap_device() {
    let _g = serial();
    let sock = socket_path();
    assert_refused(&["--socket", sock.to_str().unwrap(), "--tap", "/dev/tap999999"], 1, &["/dev/tap999999", "No such file"]);
    assert!(!sock.exists(), "no socket left behind");
}

#[test]
fn test_cli_bad_arguments() {
    let _g = serial();
    let sock = socket_path();
    let s = sock.to_str().unwrap();
    assert_refused(&["--socket", s, "--tap", "fd:x"], 2, &["--tap", "fd:x"]);
    assert_refused(&["--socket", s, "--tap", "/dev/tap5", "--queues", "0"], 2, &["--queues", "0"]);
    assert_refused(&["--socket", s, "--tap", "/dev/tap5", "--mac", "01:00:5e:00:00:01"], 2, &["multicast"]);
}

#[test]
fn test_cli_mac_differing_from_macvtap_refused() {
    let _g = serial();
    let topo = Topology::new(1, MacvtapMode::Bridge).expect("topology");
    let tap = &topo.taps[0];
    let other = if tap.mac == "52:54:00:aa:bb:cc" { "52:54:00:aa:bb:cd" } else { "52:54:00:aa:bb:cc" };
    let sock = socket_path();
    assert_refused(
        &["--socket", sock.to_str().unwrap(), "--tap", tap.dev.to_str().unwrap(), "--mac", other],
        1,
        &[other, &tap.mac, "macvtap"],
    );
    // By interface name too.
    assert_refused(&["--socket", sock.to_str().unwrap(), "--tap", &tap.ifname, "--mac", other], 1, &[other, &tap.mac]);
}

#[test]
fn test_cli_socket_in_use_by_live_listener_refused() {
    let _g = serial();
    let topo = Topology::new(1, MacvtapMode::Bridge).expect("topology");
    let sock = socket_path();
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock).expect("our listener");
    assert_refused(
        &["--socket", sock.to_str().unwrap(), "--tap", topo.taps[0].dev.to_str().unwrap()],
        1,
        &[sock.to_str().unwrap(), "in use"],
    );
    assert!(sock.exists(), "vutap must not remove a live socket");
    drop(listener);
    let _ = std::fs::remove_file(&sock);
}
