//! The Debian package installed into a fresh Debian bookworm root with `dpkg -i`, as on a new
//! system: its Depends must resolve there, its postinst must create the `vutap` user, and
//! dpkg must know every file (binary, unit, man page, completions, examples). Then the installed
//! binary, started inside the root with the unit's own ExecStart line (so as the `vutap` user),
//! serves the test frontend on a tap with frames both ways, and `dpkg -r` takes it away again.
//!
//! The root is cached per machine by `scripts/build-debian-root.sh` (mmdebstrap, from
//! scripts/install-deps.sh); each run installs into a throwaway overlay over it, see
//! `debian_root`. Needs root.

mod common;
mod debian_root;
mod tap_util;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{serial, unique};
use debian_root::{host_mounts_under, ThrowawayRoot};
use tap_util::{check_frames_both_ways, UserTap};
use vutap_testbed::workspace_root;

const VERSION: &str = env!("CARGO_PKG_VERSION");
const UNIT: &str = "/usr/lib/systemd/system/vutap@.service";
const WAIT: Duration = Duration::from_secs(10);

/// Builds the package from the release build; returns the .deb's path.
fn build_deb() -> PathBuf {
    let out = Command::new("bash")
        .arg(workspace_root().join("scripts/build-deb.sh"))
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/build-deb.sh");
    assert!(out.status.success(), "scripts/build-deb.sh: {}", out.status);
    let stdout = String::from_utf8(out.stdout).unwrap();
    let deb = PathBuf::from(stdout.lines().last().expect("build-deb.sh prints the .deb").trim());
    assert!(deb.is_file(), "{}", deb.display());
    deb
}

/// The unit's ExecStart as systemd would run it for instance `instance` with `env` from its
/// EnvironmentFile: `%i` replaced, `${VAR}` substituted in place, a bare `$VAR` word split.
fn exec_start(unit: &str, instance: &str, env: &[(&str, &str)]) -> Vec<String> {
    let line = unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).expect("the unit has an ExecStart line");
    let mut words = Vec::new();
    for word in line.split_whitespace() {
        let word = word.replace("%i", instance);
        if let Some((_, value)) = env.iter().find(|(k, _)| word == format!("${k}")) {
            words.extend(value.split_whitespace().map(str::to_string));
            continue;
        }
        let mut word = word;
        for (k, v) in env {
            word = word.replace(&format!("${{{k}}}"), v);
        }
        assert!(!word.contains(['$', '%']), "ExecStart word {word:?} left unsubstituted");
        words.push(word);
    }
    words
}

/// The installed vutap, running in the root; killed on drop if the test did not stop it.
struct Served {
    child: Child,
    log: PathBuf,
}

impl Served {
    /// Starts `args` in the root and waits until vutap listens on `socket` (host path).
    fn start(root: &ThrowawayRoot, args: &[String], log: PathBuf, socket: &Path) -> Served {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let child = root.command(&args).stderr(File::create(&log).unwrap()).spawn().expect("start the installed vutap");
        let mut served = Served { child, log: log.clone() };
        // The line comes after the bind; the socket file alone may be a stale one.
        let listening = format!("listening on /run/vutap/{}", socket.file_name().unwrap().to_str().unwrap());
        served.wait_until(&listening, || served_log(&log).contains(&listening) && socket.exists());
        served
    }

    fn pid(&self) -> u32 {
        // unshare, sh and chroot each exec the next: the child's pid is vutap's.
        self.child.id()
    }

    fn wait_until(&mut self, what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + WAIT;
        while !done() {
            let exited = self.child.try_wait().unwrap();
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "the installed vutap: no {what:?} ({exited:?}); its log:\n{}",
                served_log(&self.log)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, as `systemctl stop` sends it; vutap must exit 0.
    fn stop(mut self) {
        // SAFETY: kill with the pid of a child this test spawned and has not reaped.
        assert_eq!(unsafe { libc::kill(self.pid() as libc::pid_t, libc::SIGTERM) }, 0);
        let deadline = Instant::now() + WAIT;
        let exit = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            assert!(Instant::now() < deadline, "the installed vutap ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(exit.success(), "vutap after SIGTERM: {exit}; its log:\n{}", served_log(&self.log));
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn served_log(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

/// The `Uid:` line's real and effective uids from /proc/PID/status.
fn uids_of(pid: u32) -> (u32, u32) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find_map(|l| l.strip_prefix("Uid:")).unwrap();
    let ids: Vec<u32> = line.split_whitespace().map(|s| s.parse().unwrap()).collect();
    (ids[0], ids[1])
}

#[test]
fn test_package_installs_into_a_fresh_debian_root_and_serves_a_tap() {
    let _g = serial();
    let deb = build_deb();
    let root = ThrowawayRoot::new(&format!("package-install-{}", unique()));
    let started = Instant::now();

    // A fresh root: no vutap, no vutap user.
    assert!(!root.succeeds(&["getent", "passwd", "vutap"]), "the pristine root already has a vutap user");
    assert!(!root.succeeds(&["test", "-e", "/usr/bin/vutap"]));

    root.copy_in(&deb, "/tmp/vutap.deb");
    let installed = root.run(&["dpkg", "-i", "/tmp/vutap.deb"]);
    assert!(installed.contains(&format!("Setting up vutap ({VERSION})")), "{installed}");
    let status = root.run(&["dpkg-query", "-W", "-f=${Status} ${Version}", "vutap"]);
    assert_eq!(status, format!("install ok installed {VERSION}"));

    // The postinst made a system user that cannot log in.
    let passwd = root.run(&["getent", "passwd", "vutap"]);
    let fields: Vec<&str> = passwd.trim().split(':').collect();
    assert_eq!(fields.len(), 7, "{passwd}");
    let uid: u32 = fields[2].parse().unwrap();
    assert!(uid > 0 && uid < 1000, "not a system uid: {passwd}");
    assert_eq!(&fields[5..], ["/nonexistent", "/usr/sbin/nologin"], "{passwd}");

    // dpkg owns every file, and each is where a user's tools look for it.
    let listed = root.run(&["dpkg", "-L", "vutap"]);
    for f in [
        "/usr/bin/vutap",
        UNIT,
        "/usr/share/man/man1/vutap.1.gz",
        "/usr/share/bash-completion/completions/vutap",
        "/usr/share/zsh/vendor-completions/_vutap",
        "/usr/share/fish/vendor_completions.d/vutap.fish",
        "/usr/share/doc/vutap/copyright",
        "/usr/share/doc/vutap/examples/vutap.conf",
        "/usr/share/doc/vutap/examples/vm0.env",
        "/usr/share/doc/vutap/examples/grafana-vutap.json",
    ] {
        assert!(listed.lines().any(|l| l == f), "dpkg -L vutap lacks {f}:\n{listed}");
        assert!(root.succeeds(&["test", "-f", f]), "{f} not installed");
    }
    assert_eq!(root.run(&["man", "-w", "vutap"]).trim(), "/usr/share/man/man1/vutap.1.gz");
    let page = root.run(&["sh", "-c", "man vutap | cat"]);
    assert!(page.contains("--queues") && page.contains("--tap"), "{page}");
    // bash-completion's on-demand loader finds the completion by the command's name.
    let complete =
        root.run(&["bash", "-c", ". /usr/share/bash-completion/bash_completion && __load_completion vutap && complete -p vutap"]);
    assert!(complete.trim_end().ends_with(" vutap"), "{complete}");
    assert_eq!(root.run(&["vutap", "--version"]).trim(), format!("vutap {VERSION}"));

    // Serve a tap the way the unit would: its ExecStart, as root, dropping to the vutap user.
    let unit = root.run(&["cat", UNIT]);
    let tap = UserTap::create(&["multi_queue", "vnet_hdr"]);
    let args = exec_start(&unit, "vm0", &[("VUTAP_TAP", &tap.name), ("VUTAP_QUEUES", "1"), ("VUTAP_ARGS", "--log-level info")]);
    assert_eq!(args[0], "/usr/bin/vutap", "{args:?}");
    assert!(args.windows(2).any(|w| w == ["--user", "vutap"]), "{args:?}");
    let run = root.runtime_dir();
    let socket = run.join("vm0.sock");
    let served = Served::start(&root, &args, root.logs().join("vutap.log"), &socket);
    assert_eq!(std::fs::read_to_string(format!("/proc/{}/comm", served.pid())).unwrap().trim(), "vutap");
    for f in ["vm0.metrics", "vm0.ctl"] {
        assert!(run.join(f).exists(), "the unit's {f} socket is missing");
    }
    check_frames_both_ways(&socket, &tap.name);
    assert_eq!(uids_of(served.pid()), (uid, uid), "the installed vutap did not become the vutap user");
    served.stop();

    // systemd's Restart=: the new process binds over whatever sockets the last one left.
    let served = Served::start(&root, &args, root.logs().join("vutap-restart.log"), &socket);
    check_frames_both_ways(&socket, &tap.name);
    served.stop();

    // And dpkg removes it again, leaving the user (Debian does not delete system users).
    root.run(&["dpkg", "-r", "vutap"]);
    assert!(!root.succeeds(&["test", "-e", "/usr/bin/vutap"]));
    assert!(!root.succeeds(&["test", "-e", UNIT]));
    assert!(root.succeeds(&["getent", "passwd", "vutap"]));

    eprintln!("install, checks, serve and remove in the root: {:?}", started.elapsed());
    assert_eq!(host_mounts_under(root.logs()), Vec::<String>::new(), "a mount outlived its run");
}
