//! A fresh Debian bookworm root to install the package into, as on a newly built system.
//!
//! The pristine root (mmdebstrap minbase plus man-db and bash-completion) is built once per
//! machine by `scripts/build-debian-root.sh` and cached under `.deps/`; each test gets a
//! throwaway overlay on top of it, so an install never changes the cached copy.
//!
//! Every command runs in a mount namespace of its own (`unshare --mount`): the overlay and the
//! binds of the host's `/dev` (hence `/dev/net/tun`), `/proc`, `/sys` and of a host directory at
//! `/run/vutap` exist only there. The kernel takes them all down when the command's last process
//! exits, whether it ends, is killed or the test dies, so no mount can outlive a run. Commands
//! run one at a time: one overlay upper dir must not be mounted twice at once.
#![allow(dead_code)] // each test binary uses a different subset

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use vutap_testbed::{log_dir, workspace_root};

/// Mounts the overlay and the binds, then becomes the command inside the root. `exec` all the way
/// down: the command keeps this process's pid, so killing it ends the namespace.
const ENTER: &str = r#"set -eu
lower=$1 upper=$2 work=$3 merged=$4 run=$5
shift 5
mount -t overlay overlay -o "lowerdir=$lower,upperdir=$upper,workdir=$work" "$merged"
for d in dev proc sys; do mount --bind "/$d" "$merged/$d"; done
mkdir -p "$merged/run/vutap"
mount --bind "$run" "$merged/run/vutap"
exec chroot "$merged" "$@"
"#;

/// What a fresh root's login shell would have; nothing of the test's environment leaks in.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A throwaway copy-on-write root over the cached pristine one; its files are removed on drop.
pub struct ThrowawayRoot {
    lower: PathBuf,
    /// `upper`, `work` and `merged` of the overlay; removed on drop.
    layers: PathBuf,
    /// The host directory seen as `/run/vutap` inside the root; kept with the run's logs.
    runtime: PathBuf,
    logs: PathBuf,
}

impl ThrowawayRoot {
    /// Builds the pristine root if this machine has none yet, then prepares an empty overlay.
    pub fn new(name: &str) -> ThrowawayRoot {
        let out = Command::new("bash")
            .arg(workspace_root().join("scripts/build-debian-root.sh"))
            .stderr(Stdio::inherit())
            .output()
            .expect("run scripts/build-debian-root.sh");
        assert!(out.status.success(), "scripts/build-debian-root.sh: {}", out.status);
        let lower = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        assert!(lower.join("usr/bin/dpkg").is_file(), "{} is no Debian root", lower.display());

        let logs = log_dir(name).unwrap();
        let layers = logs.join("root");
        let runtime = logs.join("run-vutap");
        for d in [layers.join("upper"), layers.join("work"), layers.join("merged"), runtime.clone()] {
            std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("create {}: {e}", d.display()));
        }
        ThrowawayRoot { lower, layers, runtime, logs }
    }

    /// The host directory the root sees as `/run/vutap` (sockets made there are reachable here).
    pub fn runtime_dir(&self) -> &Path {
        &self.runtime
    }

    /// The directory for this run's logs (kept after the run).
    pub fn logs(&self) -> &Path {
        &self.logs
    }

    /// `chroot ROOT args...` with the mounts above, a clean environment and no stdin.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "sh", "-c", ENTER, "enter"])
            .arg(&self.lower)
            .arg(self.layers.join("upper"))
            .arg(self.layers.join("work"))
            .arg(self.layers.join("merged"))
            .arg(&self.runtime)
            .args(args)
            .env_clear()
            .env("PATH", PATH)
            .env("HOME", "/root")
            .env("LANG", "C.UTF-8")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `args` in the root; panics unless it exits 0. Returns its stdout.
    pub fn run(&self, args: &[&str]) -> String {
        let out = expect_success(args, self.command(args));
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs `args` in the root; returns whether it exited 0 (its output goes to the test's).
    pub fn succeeds(&self, args: &[&str]) -> bool {
        self.command(args).stdout(Stdio::null()).status().unwrap().success()
    }

    /// Copies the host file `from` to `to` inside the root (through the root's own `cat`).
    pub fn copy_in(&self, from: &Path, to: &str) {
        let mut cmd = self.command(&["sh", "-c", "cat > \"$1\"", "copy_in", to]);
        cmd.stdin(File::open(from).unwrap_or_else(|e| panic!("{}: {e}", from.display())));
        expect_success(&["cat >", to], cmd);
    }
}

fn expect_success(args: &[&str], mut cmd: Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{args:?} in the root: {e}"));
    assert!(
        out.status.success(),
        "{args:?} in the root: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Mount points in this (the host's) namespace at or under `dir`: there must be none, since
/// every mount of a run lives in the run's own namespace.
pub fn host_mounts_under(dir: &Path) -> Vec<String> {
    let dir = dir.to_str().unwrap();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| *m == dir || m.starts_with(&format!("{dir}/")))
        .map(str::to_string)
        .collect()
}

impl Drop for ThrowawayRoot {
    fn drop(&mut self) {
        // Nothing is mounted here in this namespace, but never delete through a mount.
        let mounts = host_mounts_under(&self.layers);
        if mounts.is_empty() {
            let _ = std::fs::remove_dir_all(&self.layers);
        } else {
            eprintln!("leaving {}: still mounted at {mounts:?}", self.layers.display());
        }
    }
}
