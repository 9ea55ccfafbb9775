//! The `vutap` daemon as a child process: spawned on a tap, ready once its socket exists,
//! stopped with SIGTERM (then SIGKILL) on `Drop`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::cmd::die_with_parent;
use super::{io_err, workspace_root, Error, Result};

/// A running `vutap --socket SOCK --tap TAP --queues Q`.
pub struct Vutap {
    child: Child,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl Vutap {
    /// The binary to run: `$VUTAP_BIN`, else the `vutap` built with the same profile as the
    /// running program (a release bench or test runs the release daemon, never a stale debug
    /// one), else `target/release/vutap`.
    pub fn binary() -> Result<PathBuf> {
        if let Some(p) = std::env::var_os("VUTAP_BIN") {
            return Ok(PathBuf::from(p));
        }
        // A binary lives in target/<profile>/; a test in target/<profile>/deps/.
        let exe = std::env::current_exe().map_err(io_err("current_exe"))?;
        let same_profile = exe.ancestors().skip(1).take(2).map(|dir| dir.join("vutap")).find(|p| p.is_file() && p != &exe);
        let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("target"));
        same_profile.or_else(|| Some(target.join("release").join("vutap")).filter(|p| p.is_file())).ok_or_else(|| {
            Error::Setup(format!(
                "no vutap binary beside {} or under {}: run `cargo build --release -p vutap` or set VUTAP_BIN",
                exe.display(),
                target.display()
            ))
        })
    }

    /// Spawns vutap serving `socket` on `tap` with `queues` queue pairs, `extra` args appended;
    /// waits up to 10 s for the socket to appear. Its stdout+stderr go to `log_dir/vutap.log`.
    pub fn spawn(socket: &Path, tap: &Path, queues: u16, extra: &[&str], log_dir: &Path) -> Result<Vutap> {
        let bin = Vutap::binary()?;
        let _ = std::fs::remove_file(socket); // a stale socket would fake readiness
        let log = log_dir.join("vutap.log");
        let out = File::create(&log).map_err(io_err(format!("create {}", log.display())))?;
        let err = out.try_clone().map_err(io_err("dup vutap log fd"))?;
        let mut cmd = Command::new(&bin);
        die_with_parent(&mut cmd);
        let child = cmd
            .arg("--socket")
            .arg(socket)
            .arg("--tap")
            .arg(tap)
            .args(["--queues", &queues.to_string()])
            .args(extra)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(io_err(format!("spawn {}", bin.display())))?;
        let mut v = Vutap { child, socket: socket.to_path_buf(), log };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if socket.exists() {
                return Ok(v);
            }
            if let Some(status) = v.child.try_wait().map_err(io_err("wait for vutap"))? {
                return Err(Error::Exited {
                    what: "vutap".into(),
                    status: status.to_string(),
                    log: format!("{}:\n{}", v.log.display(), v.log_text()),
                });
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!("vutap socket {}", socket.display()),
                    after: Duration::from_secs(10),
                    tail: v.log_text(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `sig` (e.g. `libc::SIGKILL`) and, for SIGKILL, reaps the child.
    pub fn signal(&mut self, sig: libc::c_int) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // SAFETY: kill(2) on our own child's pid, not yet reaped (try_wait returned None),
            // so the pid cannot have been reused.
            unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        }
        if sig == libc::SIGKILL {
            let _ = self.child.wait();
        }
    }

    /// Waits up to `timeout` for the daemon to exit; its exit status if it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the daemon is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The daemon's output so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Vutap {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // SAFETY: kill(2) on our own child's pid, which has not been reaped yet (try_wait
            // returned None), so the pid cannot have been reused.
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}
