//! The test guest run by libvirt instead of by hand: the daemons ([`Daemons`]), a domain defined
//! from `examples/libvirt-domain.xml` ([`render_template`], [`Domain`]), and the guest's serial
//! console, which QEMU connects to a unix socket we listen on ([`SerialListener`],
//! [`DomainConsole`]).
//!
//! libvirt runs QEMU as `libvirt-qemu:kvm` and relabels (chowns) the files a domain uses, so the
//! kernel and initrd are per-run copies (the shared `.deps/guest` is never touched), and vutap's
//! socket must be handed to that user ([`grant_socket_to_qemu`]).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::cmd::{run, run_quiet};
use super::console::Console;
use super::guest::{parse_ping, PingResult, QemuVersion, READY_MARKER};
use super::iperf::IperfResult;
use super::{io_err, workspace_root, Error, Result};

/// The system instance of libvirt's QEMU driver.
pub const URI: &str = "qemu:///system";
/// Who libvirt (Debian's build) runs QEMU as.
pub const QEMU_OWNER: &str = "libvirt-qemu:kvm";
/// Bound on every `virsh` call: a QEMU stuck at start-up must fail the test, not hang it.
const VIRSH_TIMEOUT_SECS: &str = "120";

/// A daemon libvirt needs, with the socket that answers once it is up.
struct Daemon {
    prog: &'static str,
    socket: &'static str,
    pidfile: &'static str,
}

/// virtlogd first: libvirtd hands it QEMU's stderr when a domain starts.
const DAEMONS: [Daemon; 2] = [
    Daemon { prog: "virtlogd", socket: "/run/libvirt/virtlogd-sock", pidfile: "/run/virtlogd.pid" },
    Daemon { prog: "libvirtd", socket: "/run/libvirt/libvirt-sock", pidfile: "/run/libvirtd.pid" },
];

/// virtlogd and libvirtd, started (`-d`, no systemd here) only if they were not running; `Drop`
/// stops exactly the ones started here.
pub struct Daemons {
    started: Vec<(&'static str, u32)>,
}

impl Daemons {
    /// Makes sure both daemons answer. Missing binaries are an error naming the fix.
    pub fn ensure() -> Result<Daemons> {
        for prog in ["virsh", "virtlogd", "libvirtd"] {
            if find_program(prog).is_none() {
                return Err(Error::Setup(format!(
                    "{prog} not found: run scripts/install-deps.sh (libvirt-daemon, libvirt-daemon-driver-qemu, libvirt-clients)"
                )));
            }
        }
        let mut daemons = Daemons { started: Vec::new() };
        for d in &DAEMONS {
            if UnixStream::connect(d.socket).is_ok() {
                continue;
            }
            run(d.prog, &["-d"])?;
            wait_until(&format!("{} to answer on {}", d.prog, d.socket), Duration::from_secs(30), || {
                UnixStream::connect(d.socket).is_ok()
            })?;
            let pid = std::fs::read_to_string(d.pidfile)
                .map_err(io_err(format!("read {}", d.pidfile)))?
                .trim()
                .parse()
                .map_err(|e| Error::Parse { what: d.pidfile.into(), detail: format!("{e}") })?;
            daemons.started.push((d.prog, pid));
        }
        Ok(daemons)
    }
}

impl Drop for Daemons {
    fn drop(&mut self) {
        for (prog, pid) in self.started.iter().rev() {
            log::info!("stopping the {prog} this test started (pid {pid})");
            // SAFETY: kill(2) with a pid read from the pidfile of a daemon we started; no memory
            // is touched.
            unsafe { libc::kill(*pid as libc::pid_t, libc::SIGTERM) };
            let proc_dir = PathBuf::from(format!("/proc/{pid}"));
            if wait_until(&format!("{prog} to exit"), Duration::from_secs(15), || !proc_dir.exists()).is_err() {
                // SAFETY: as above; the daemon ignored SIGTERM.
                unsafe { libc::kill(*pid as libc::pid_t, libc::SIGKILL) };
            }
        }
    }
}

/// Gives vutap's socket to the user QEMU runs as (libvirt does not relabel vhost-user sockets,
/// and connecting needs write permission). Needed again whenever vutap recreates the socket.
pub fn grant_socket_to_qemu(socket: &Path) -> Result<()> {
    run("chown", &[QEMU_OWNER, path_str(socket)?]).map(drop)
}

/// Replaces every `@KEY@` of `template` by its value; a placeholder left over is an error, so a
/// template and its caller cannot drift apart silently.
pub fn render_template(template: &str, values: &[(&str, &str)]) -> Result<String> {
    let mut out = template.to_string();
    for (key, value) in values {
        let placeholder = format!("@{key}@");
        if !out.contains(&placeholder) {
            return Err(Error::Setup(format!("template has no {placeholder}")));
        }
        out = out.replace(&placeholder, value);
    }
    let left = placeholders(&out);
    if !left.is_empty() {
        return Err(Error::Setup(format!("template placeholders without a value: {left:?}")));
    }
    Ok(out)
}

/// The `@KEY@` placeholders (KEY: upper case and `_`) in `text`.
fn placeholders(text: &str) -> Vec<&str> {
    let is_key = |k: &str| !k.is_empty() && k.chars().all(|c| c.is_ascii_uppercase() || c == '_');
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find('@') {
        let after = &rest[start + 1..];
        match after.find('@') {
            Some(end) if is_key(&after[..end]) => {
                found.push(&after[..end]);
                rest = &after[end + 1..];
            }
            Some(_) => rest = after,
            None => break,
        }
    }
    found
}

/// Writes `dir/qemu-VERSION.sh`, the `<emulator>`: the unpacked QEMU with its module and
/// firmware directories (what [`super::Guest`] passes on the command line).
pub fn write_emulator(qemu: QemuVersion, dir: &Path) -> Result<PathBuf> {
    let root = qemu.dir();
    let path = dir.join(format!("qemu-{}.sh", qemu.label()));
    let script = format!(
        "#!/bin/sh\nexport QEMU_MODULE_DIR={root}/usr/lib/x86_64-linux-gnu/qemu\n\
         exec {root}/usr/bin/qemu-system-x86_64 -L {root}/usr/share/qemu -L /usr/share/seabios -L /usr/lib/ipxe/qemu \"$@\"\n",
        root = path_str(&root)?
    );
    std::fs::write(&path, script).map_err(io_err(format!("write {}", path.display())))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).map_err(io_err(format!("chmod {}", path.display())))?;
    Ok(path)
}

/// Per-run copies of the test guest's kernel and initrd (libvirt chowns what a domain boots).
/// The initrd gets the ACPI power button appended (the kernel unpacks concatenated archives):
/// `virsh reboot` presses it and waits for the guest to power off, which the stock guest, with
/// no button driver and no acpid, would never do. [`DomainConsole::enable_power_button`] loads it.
pub fn guest_files(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let (kernel, initrd) = super::ensure_guest_built()?;
    let kernel_copy = dir.join("vmlinuz");
    std::fs::copy(&kernel, &kernel_copy).map_err(io_err(format!("copy {}", kernel.display())))?;

    let modules = workspace_root().join(".deps/guest/kernel/lib/modules");
    let kver = std::fs::read_dir(&modules)
        .map_err(io_err(format!("list {}", modules.display())))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .next()
        .ok_or_else(|| Error::Setup(format!("no kernel under {}", modules.display())))?;
    let stage = dir.join("initrd-power-button");
    let _ = std::fs::remove_dir_all(&stage);
    let (mods, action) = (stage.join("lib/acpi"), stage.join("etc/acpi/PWRF"));
    for d in [&mods, &action] {
        std::fs::create_dir_all(d).map_err(io_err(format!("create {}", d.display())))?;
    }
    for m in ["drivers/acpi/button.ko", "drivers/input/evdev.ko"] {
        let src = kver.join("kernel").join(m);
        let name = src.file_name().unwrap_or_default();
        std::fs::copy(&src, mods.join(name)).map_err(io_err(format!("copy {}", src.display())))?;
    }
    // busybox acpid runs CONFDIR/PWRF/00000080 when the power button is pressed.
    let script = action.join("00000080");
    std::fs::write(&script, "#!/bin/sh\npoweroff -f\n").map_err(io_err("write acpid action"))?;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).map_err(io_err("chmod acpid action"))?;
    let extra = dir.join("power-button.cpio");
    run("sh", &["-c", "cd \"$1\" && find . | cpio --quiet -o -H newc -R 0:0 > \"$2\"", "sh", path_str(&stage)?, path_str(&extra)?])?;
    let initrd_copy = dir.join("initrd.img");
    let mut out = File::create(&initrd_copy).map_err(io_err(format!("create {}", initrd_copy.display())))?;
    let mut written = 0u64;
    for part in [&initrd, &extra] {
        // Each archive must start 4-byte aligned; the kernel skips zero padding between them.
        let pad = [0u8; 3];
        let pad = &pad[..((4 - written % 4) % 4) as usize];
        out.write_all(pad).map_err(io_err("pad initrd"))?;
        let mut f = File::open(part).map_err(io_err(format!("open {}", part.display())))?;
        written += pad.len() as u64 + std::io::copy(&mut f, &mut out).map_err(io_err(format!("append {}", part.display())))?;
    }
    Ok((kernel_copy, initrd_copy))
}

/// `virsh -c qemu:///system ARGS`, bounded by [`VIRSH_TIMEOUT_SECS`].
pub fn virsh(args: &[&str]) -> Result<String> {
    let mut full = vec![VIRSH_TIMEOUT_SECS, "virsh", "-c", URI];
    full.extend_from_slice(args);
    run("timeout", &full)
}

/// A defined domain; `Drop` destroys it if running and undefines it.
pub struct Domain {
    pub name: String,
}

impl Domain {
    /// `virsh define XML`. `name` must be the `<name>` in it.
    pub fn define(name: &str, xml: &Path) -> Result<Domain> {
        sweep_dead_domains();
        virsh(&["define", path_str(xml)?])?;
        Ok(Domain { name: name.into() })
    }

    pub fn start(&self) -> Result<()> {
        virsh(&["start", &self.name]).map(drop)
    }

    /// `virsh reboot`: libvirt presses the ACPI power button and, once the guest powered off,
    /// resets and resumes the same QEMU process.
    pub fn reboot(&self) -> Result<()> {
        virsh(&["reboot", &self.name]).map(drop)
    }

    /// `virsh destroy`: QEMU is killed.
    pub fn destroy(&self) -> Result<()> {
        virsh(&["destroy", &self.name]).map(drop)
    }

    /// `virsh domstate`, e.g. `running`, `shut off`.
    pub fn state(&self) -> Result<String> {
        Ok(virsh(&["domstate", &self.name])?.trim().to_string())
    }

    /// QEMU's command line and stderr, as libvirt logged them.
    pub fn qemu_log(&self) -> String {
        std::fs::read_to_string(format!("/var/log/libvirt/qemu/{}.log", self.name)).unwrap_or_default()
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        if let Err(e) = virsh(&["destroy", &self.name]) {
            log::debug!("cleanup: {e}");
        }
        if let Err(e) = virsh(&["undefine", &self.name]) {
            log::warn!("cleanup: {e}");
        }
    }
}

/// Domain names this module gives out: `vutap-<pid>-<tag>`, so leftovers of a killed run can be
/// told apart from anything else defined on the host.
pub fn domain_name(tag: &str) -> String {
    format!("vutap-{}-{tag}", std::process::id())
}

/// Destroys and undefines domains named by [`domain_name`] for processes that no longer exist.
fn sweep_dead_domains() {
    let Ok(list) = virsh(&["list", "--all", "--name"]) else {
        return;
    };
    for name in list.lines().map(str::trim) {
        let Some(pid) = name.strip_prefix("vutap-").and_then(|r| r.split_once('-')).and_then(|(pid, _)| pid.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            log::info!("removing domain {name} of a dead run");
            run_quiet("virsh", &["-c", URI, "destroy", name]);
            run_quiet("virsh", &["-c", URI, "undefine", name]);
        }
    }
}

/// The unix socket a domain's `<serial type='unix'><source mode='connect'>` connects to. We
/// listen before QEMU starts, so no console output is lost; each QEMU process connects once.
pub struct SerialListener {
    listener: UnixListener,
    path: PathBuf,
    log: PathBuf,
}

impl SerialListener {
    /// Listens on `path`; console output of every connection is appended to `log`.
    pub fn bind(path: &Path, log: &Path) -> Result<SerialListener> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).map_err(io_err(format!("bind {}", path.display())))?;
        Ok(SerialListener { listener, path: path.to_path_buf(), log: log.to_path_buf() })
    }

    /// Waits up to `timeout` for QEMU to connect.
    pub fn accept(&self, timeout: Duration) -> Result<DomainConsole> {
        let mut pfd = libc::pollfd { fd: self.listener.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
        // SAFETY: `pfd` is one valid pollfd on our stack for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            return Err(io_err("poll serial listener")(std::io::Error::last_os_error()));
        }
        if n == 0 {
            return Err(Error::Timeout {
                what: format!("QEMU to connect its serial console to {}", self.path.display()),
                after: timeout,
                tail: String::new(),
            });
        }
        let (stream, _) = self.listener.accept().map_err(io_err("accept serial console"))?;
        let log = OpenOptions::new().create(true).append(true).open(&self.log).map_err(io_err(format!("open {}", self.log.display())))?;
        let clone = |s: &UnixStream| s.try_clone().map_err(io_err("dup serial console socket"));
        let console = Console::new(clone(&stream)?, clone(&stream)?, log);
        Ok(DomainConsole { stream, console })
    }
}

impl Drop for SerialListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A domain's serial console, driving the test guest's shell (as [`super::Guest`] does).
pub struct DomainConsole {
    stream: UnixStream,
    console: Console,
}

impl DomainConsole {
    /// Where the output so far ends (for [`DomainConsole::wait_ready`] after a reboot).
    pub fn mark(&self) -> usize {
        self.console.mark()
    }

    /// Waits for the guest's shell to come up after output offset `from`.
    pub fn wait_ready(&mut self, from: usize, timeout: Duration) -> Result<()> {
        self.console.wait_for(READY_MARKER, from, timeout)?;
        // Throwaway command: makes sure the shell itself is reading (not just /init).
        self.run_ok("true", Duration::from_secs(30)).map(drop)
    }

    /// Runs a one-line shell command; a non-zero exit is an error.
    pub fn run_ok(&mut self, cmd: &str, timeout: Duration) -> Result<String> {
        let (code, out) = self.console.run(cmd, timeout)?;
        if code != 0 {
            return Err(Error::Command { cmd: format!("(guest) {cmd}"), status: code.to_string(), stderr: out });
        }
        Ok(out)
    }

    /// Loads the power button driver and starts acpid (see [`guest_files`]), so `virsh reboot`
    /// works.
    pub fn enable_power_button(&mut self) -> Result<()> {
        let t = Duration::from_secs(30);
        self.run_ok("insmod /lib/acpi/evdev.ko && insmod /lib/acpi/button.ko", t)?;
        self.run_ok("acpid -c /etc/acpi -l /tmp/acpid.log", t).map(drop)
    }

    /// Brings eth0 up with `ip/prefix`.
    pub fn configure_ip(&mut self, ip: Ipv4Addr, prefix: u8) -> Result<()> {
        let t = Duration::from_secs(30);
        self.run_ok(&format!("ip addr add {ip}/{prefix} dev eth0"), t)?;
        self.run_ok("ip link set eth0 up", t).map(drop)
    }

    /// Pings `ip` `count` times (0.2 s apart). A run with lost replies is not an error.
    pub fn ping(&mut self, ip: Ipv4Addr, count: u32) -> Result<PingResult> {
        let timeout = Duration::from_secs(20 + 2 * count as u64);
        let (_, out) = self.console.run(&format!("ping -c {count} -i 0.2 -W 2 {ip}"), timeout)?;
        parse_ping(&out)
    }

    /// iperf3 client against `server:port` for `secs`, one stream; `reverse`: the server sends.
    pub fn iperf3(&mut self, server: Ipv4Addr, port: u16, secs: u32, reverse: bool) -> Result<IperfResult> {
        let r = if reverse { " -R" } else { "" };
        let cmd = format!("iperf3 -c {server} -p {port} -t {secs} -i 0 -J --connect-timeout 5000{r}");
        let (_, out) = self.console.run(&cmd, Duration::from_secs(secs as u64 + 60))?;
        IperfResult::parse(&out)
    }

    /// The last `n` bytes of console output (for failure messages).
    pub fn tail(&self, n: usize) -> String {
        self.console.tail(n)
    }
}

impl Drop for DomainConsole {
    fn drop(&mut self) {
        // Ends the console's reader thread even while QEMU still holds the other end.
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

/// Polls `done` every 20 ms until it holds or `timeout` passes.
fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !done() {
        if Instant::now() >= deadline {
            return Err(Error::Timeout { what: what.into(), after: timeout, tail: String::new() });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// `prog` in `$PATH` or the sbin directories (root's daemons live there).
fn find_program(prog: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path.split(':').chain(["/usr/sbin", "/sbin", "/usr/bin"]).map(|d| Path::new(d).join(prog)).find(|p| p.is_file());
    found
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().ok_or_else(|| Error::Setup(format!("non-UTF-8 path {}", p.display())))
}

/// Writes `text` to `path` (the rendered domain XML, kept beside the logs).
pub fn write_file(path: &Path, text: &str) -> Result<()> {
    File::create(path).and_then(|mut f| f.write_all(text.as_bytes())).map_err(io_err(format!("write {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_render_template_fills_every_placeholder() {
        let t = "<a x='@ONE@'>user@host @TWO@ @ONE@</a>";
        assert_eq!(render_template(t, &[("ONE", "1"), ("TWO", "2")]).unwrap(), "<a x='1'>user@host 2 1</a>");
        assert_eq!(placeholders("a@b @KEY_1@ @KEY@ x@"), vec!["KEY"]);
        let missing_value = render_template(t, &[("ONE", "1")]).unwrap_err().to_string();
        assert!(missing_value.contains("TWO"), "{missing_value}");
        let unknown_key = render_template(t, &[("ONE", "1"), ("TWO", "2"), ("THREE", "3")]);
        assert!(unknown_key.unwrap_err().to_string().contains("@THREE@"));
    }
}
