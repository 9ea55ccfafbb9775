//! Test bed of vutap: netns/veth/macvtap topologies, AF_PACKET far ends, and TCG QEMU guests for
//! end-to-end runs.
//!
//! - [`topo`]: a peer network namespace behind a veth pair with macvtaps on the host end
//!   ([`Topology`]), plus an iperf3 server in that namespace ([`IperfServer`]).
//! - [`guest`]: a tiny busybox guest under QEMU 7.2 or 10.0 (TCG), driven over its serial console
//!   ([`Guest`]).
//! - [`vutap`]: the `vutap` daemon as a child process ([`Vutap`]).
//! - [`iperf`]: parsing of `iperf3 -J` reports.
//! - [`libvirt`]: the same guest as a libvirt domain (daemons, domain from the example XML,
//!   serial console over a unix socket).
//! - [`monitor`]: QEMU's human monitor over a unix socket (live migration).
//! - [`scenario`]: one boot + ping + iperf3 run, shared by the e2e tests and `vutap-vm`.
//! - [`host_cpu`]: CPU time of host processes and threads, and of a guest's network datapath.
//! - [`link`]: MTU and IPv6 settings of interfaces made for a run.
//! - [`frames`]: test frames (plain, UDP, TCP) with their checksums, and MAC parsing.
//! - [`packet`]: AF_PACKET sockets on an interface of the host or of a namespace (the far end of
//!   the wire).
//!
//! Everything here but [`frames`] needs root. Every guard deletes what it made on `Drop`,
//! including on panic.

pub mod cmd;
pub mod console;
pub mod frames;
pub mod guest;
pub mod host_cpu;
pub mod iperf;
pub mod libvirt;
pub mod link;
pub mod monitor;
pub mod packet;
pub mod scenario;
pub mod scrape;
pub mod topo;
pub mod vutap;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

pub use guest::{Guest, GuestConfig, Nic, PingResult, QemuVersion, QueuePackets};
pub use iperf::IperfResult;
pub use scenario::{Backend, Outcome, Scenario};
pub use topo::{IperfServer, MacvtapMode, Tap, Topology};
pub use vutap::Vutap;

/// Errors of the test bed. Each carries enough context to tell which step failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("command `{cmd}` failed ({status}): {stderr}")]
    Command { cmd: String, status: String, stderr: String },
    #[error("timed out after {after:?} waiting for {what}; last output:\n{tail}")]
    Timeout { what: String, after: Duration, tail: String },
    #[error("{what} exited early ({status}); see {log}")]
    Exited { what: String, status: String, log: String },
    #[error("cannot parse {what}: {detail}")]
    Parse { what: String, detail: String },
    #[error("{0}")]
    Setup(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Wraps an `io::Error` with what we were doing.
pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

/// The workspace root, found from this crate's manifest dir so the harness works from any clone.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the testbed crate lives inside the workspace").to_path_buf()
}

/// Directory for logs of one run: `<workspace>/results/tmp/<name>` (git-ignored).
pub fn log_dir(name: &str) -> Result<PathBuf> {
    let dir = workspace_root().join("results/tmp").join(name);
    std::fs::create_dir_all(&dir).map_err(io_err(format!("create {}", dir.display())))?;
    Ok(dir)
}

/// A TCP port on loopback that is free now and that the kernel will not hand out as an
/// ephemeral port meanwhile: it lies below `ip_local_port_range`, so between this check and
/// the bind by QEMU or vutap only another explicit binder could take it. Candidates start at
/// a point derived from the pid and a counter, so parallel test processes try different ones.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse::<u32>().ok()))
        .unwrap_or(32768);
    let (first, span) = (10_000u32, low.saturating_sub(10_000).max(1000));
    let start = std::process::id().wrapping_mul(7919).wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed) * 131);
    (0..span)
        .map(|i| (first + (start.wrapping_add(i)) % span) as u16)
        .find(|&p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
        .expect("no free TCP port below the ephemeral range")
}

/// A short suffix unique within this host while this process lives: `<pid>-<counter>` in hex
/// (pids fit 6 hex digits, so `vt` + suffix + a 2-byte role stays within the 15-byte ifname
/// limit). The pid lets [`topo`] sweep leftovers of runs that were killed before `Drop` ran.
pub(crate) fn unique_suffix() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{:x}-{:x}", std::process::id(), n & 0xff)
}

/// Builds the guest kernel and initramfs if needed (`scripts/build-guest.sh` is idempotent) and
/// returns `(vmlinuz, initrd)`.
pub fn ensure_guest_built() -> Result<(PathBuf, PathBuf)> {
    // One build at a time, even when tests boot guests from several threads.
    static BUILD: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _held = BUILD.lock().unwrap_or_else(|p| p.into_inner());
    let root = workspace_root();
    let script = root.join("scripts/build-guest.sh");
    cmd::run("bash", &[script.to_str().unwrap_or_default()])?;
    let dir = root.join(".deps/guest");
    Ok((dir.join("vmlinuz"), dir.join("initrd.img")))
}
