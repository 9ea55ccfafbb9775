//! Backend processes under test (vutap, DPDK testpmd).

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::error::{LoadgenError, Result};
use super::placement::Placement;
use vutap_testbed::Vutap;

/// A child process killed with SIGTERM, then SIGKILL, on drop.
pub struct Proc {
    pub child: Child,
    pub what: &'static str,
    pub log: PathBuf,
    /// vutap's `--metrics-unix` socket.
    pub metrics: Option<PathBuf>,
    cleanup: Vec<PathBuf>,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
    pub fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        s.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
    }
    fn wait_for(mut self, what: &str, ready: impl Fn() -> bool, timeout: Duration) -> Result<Proc> {
        let deadline = Instant::now() + timeout;
        while !ready() {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Err(LoadgenError::Exited { what: self.what, status: st, log: self.log_tail() });
            }
            if Instant::now() > deadline {
                return Err(LoadgenError::NotReady { what: self.what, ready: what.to_string(), timeout, log: self.log_tail() });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(self)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // SAFETY: kill(2) on our own unreaped child.
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        for p in &self.cleanup {
            let _ = std::fs::remove_file(p);
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

/// Spawns `bin`; with `cpus`, the process (and every thread it starts) runs only there.
fn spawn(what: &'static str, bin: &Path, args: &[String], log: &Path, cpus: Option<Vec<usize>>) -> Result<Proc> {
    let io = |what: String| move |source| LoadgenError::Io { what, source };
    let out = File::create(log).map_err(io(format!("create {}", log.display())))?;
    let err = out.try_clone().map_err(io(format!("dup {}", log.display())))?;
    let mut cmd = Command::new(bin);
    if let Some(cpus) = cpus {
        // SAFETY: only sched_setaffinity (async-signal-safe) runs between fork and exec.
        unsafe { cmd.pre_exec(move || super::placement::pin_current_thread(&cpus)) };
    }
    let child = cmd
        .args(args)
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(io(format!("spawn {}", bin.display())))?;
    Ok(Proc { child, what, log: log.to_path_buf(), metrics: None, cleanup: Vec::new() })
}

/// `vutap --socket SOCK --tap SPEC --queues Q --metrics-unix SOCK.metrics`, ready once the
/// socket exists.
pub fn vutap(socket: &Path, tap: &str, queues: u16, log_dir: &Path, place: Option<&Placement>, extra: &[String]) -> Result<Proc> {
    let bin = Vutap::binary()?;
    let metrics = socket.with_extension("metrics");
    let _ = std::fs::remove_file(socket);
    let _ = std::fs::remove_file(&metrics);
    let args = vec![
        "--socket".into(),
        socket.display().to_string(),
        "--tap".into(),
        tap.into(),
        "--queues".into(),
        queues.to_string(),
        "--metrics-unix".into(),
        metrics.display().to_string(),
    ];
    // Extra daemon options for experiments (e.g. VUTAP_BENCH_ARGS="--poll-us 50").
    let mut args = args;
    args.extend(extra.iter().cloned());
    args.extend(std::env::var("VUTAP_BENCH_ARGS").unwrap_or_default().split_whitespace().map(String::from));
    let variant: String = extra.iter().map(|a| a.trim_start_matches('-')).collect::<Vec<_>>().join("-");
    let log = if variant.is_empty() { format!("vutap-q{queues}.log") } else { format!("vutap-q{queues}-{variant}.log") };
    let mut p = spawn("vutap", &bin, &args, &log_dir.join(log), place.map(|p| p.backend.clone()))?;
    p.cleanup.push(socket.to_path_buf());
    p.cleanup.push(metrics.clone());
    p.metrics = Some(metrics.clone());
    let s = socket.to_path_buf();
    p.wait_for("sockets", move || s.exists() && metrics.exists(), Duration::from_secs(10))
}

pub const TESTPMD: &str = "/usr/bin/dpdk-testpmd";

/// DPDK testpmd: vhost PMD on `socket` forwarding (io mode) to a tap PMD creating `tap`.
/// Placed (`place`), its forwarding lcore runs on the backend's CPU and its main lcore (stats,
/// mostly asleep) on the load's; unplaced, on CPUs 0 and 1 as EAL likes.
pub fn testpmd(socket: &Path, tap: &str, queues: u16, log_dir: &Path, place: Option<&Placement>) -> Result<Proc> {
    let _ = std::fs::remove_file(socket);
    let prefix = format!("vutapbench{}", std::process::id());
    let (fwd, main) = place.map_or((1, 0), |p| (p.backend[0], p.load[0]));
    let (lcores, main_lcore) = (format!("{fwd},{main}"), main.to_string());
    let args: Vec<String> = [
        "-l",
        &lcores,
        "--main-lcore",
        &main_lcore,
        "--no-huge",
        "-m",
        "1024",
        "--no-pci",
        "--file-prefix",
        &prefix,
        "--vdev",
        &format!("net_vhost0,iface={},queues={queues}", socket.display()),
        "--vdev",
        &format!("net_tap0,iface={tap}"),
        "--",
        "--forward-mode=io",
        "--auto-start",
        "--stats-period",
        "60",
        &format!("--rxq={queues}"),
        &format!("--txq={queues}"),
        // 10 KiB mbufs so 9000 B frames fit one mbuf; a bounded pool fits in -m 1024.
        "--mbuf-size=10240",
        "--total-num-mbufs=16384",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // EAL pins its lcores itself; give it every CPU to choose from.
    let all = super::placement::online_cpus_at_start();
    let mut p = spawn("dpdk-testpmd", Path::new(TESTPMD), &args, &log_dir.join(format!("testpmd-q{queues}.log")), Some(all))?;
    p.cleanup.push(socket.to_path_buf());
    p.cleanup.push(PathBuf::from(format!("/var/run/dpdk/{prefix}")));
    let (s, t) = (socket.to_path_buf(), tap.to_string());
    p.wait_for("socket and tap", move || s.exists() && vutap_testbed::packet::ifindex(&t).is_some(), Duration::from_secs(30))
}
