//! Taps as QEMU's `-netdev tap` accepts them: created without `multi_queue` (served with one
//! queue pair, refused with a clear line for more), without `vnet_hdr` (switched on at open),
//! and persistent taps owned by another user (served when vutap runs as that user, refused with
//! the reason otherwise). Each served tap carries frames both ways, compared byte for byte.
//!
//! Inherited fds (QEMU's `fd=`, libvirt) are served when opened with `IFF_VNET_HDR` and refused,
//! with the reason, when opened without it (QEMU's `vnet_hdr=off`).
//!
//! Needs root (creates taps in the host namespace, runs vutap as `nobody`) and a built `vutap`.

mod common;
mod tap_util;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::serial;
use tap_util::{check_frames_both_ways, UserTap};
use vutap_bench::testbed::{log_dir, Vutap};

const NOBODY: u32 = 65534;

/// Runs vutap to completion (it is expected to refuse); returns its exit code and stderr lines.
fn run_refused(cmd: &mut Command) -> (i32, Vec<String>) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vutap");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("vutap kept running instead of refusing");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    let lines: Vec<String> = err
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect();
    eprintln!("vutap -> {status}: {lines:?}");
    (status.code().expect("exited, not killed"), lines)
}

fn vutap(socket: &Path, tap: &str, queues: u16) -> Command {
    let mut c = Command::new(Vutap::binary().unwrap());
    c.arg("--socket")
        .arg(socket)
        .args([
            "--tap",
            tap,
            "--queues",
            &queues.to_string(),
            "--log-level",
            "error",
        ])
        .env_remove("RUST_LOG");
    c
}

fn assert_one_line(code: i32, lines: &[String], needles: &[&str]) {
    assert_eq!(code, 1, "{lines:?}");
    assert_eq!(lines.len(), 1, "exactly one line on stderr: {lines:?}");
    for n in needles {
        assert!(
            lines[0].contains(n),
            "{:?} does not mention {n:?}",
            lines[0]
        );
    }
}

/// A directory any user may create sockets in, removed on drop.
struct OpenDir(PathBuf);

impl OpenDir {
    fn new() -> OpenDir {
        let dir = std::env::temp_dir().join(format!("vutap-tap-parity-{}", common::unique()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        OpenDir(dir)
    }
}

impl Drop for OpenDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// vutap running as `nobody`, killed on drop.
struct AsNobody(Child);

impl Drop for AsNobody {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn test_tap_parity_single_queue_tap_served_with_one_queue_pair() {
    let _g = serial();
    let tap = UserTap::create(&["vnet_hdr"]);
    assert_eq!(tap.flags() & 0x100, 0, "created without multi_queue");
    let dir = log_dir("tap-parity-single").unwrap();
    let sock = dir.join("vutap.sock");
    let v = Vutap::spawn(&sock, Path::new(&tap.name), 1, &[], &dir).unwrap();
    check_frames_both_ways(&sock, &tap.name);
    assert!(
        v.log_text()
            .contains("is not multi_queue: serving its one queue"),
        "{}",
        v.log_text()
    );
}

#[test]
fn test_tap_parity_single_queue_tap_refused_with_more_queue_pairs() {
    let _g = serial();
    let tap = UserTap::create(&["vnet_hdr"]);
    let sock = log_dir("tap-parity-single-mq").unwrap().join("vutap.sock");
    let (code, lines) = run_refused(&mut vutap(&sock, &tap.name, 2));
    assert_one_line(
        code,
        &lines,
        &[
            &tap.name,
            "not a multi_queue tap",
            "multi_queue vnet_hdr",
            "--queues 1",
        ],
    );
    assert!(!sock.exists(), "no socket left behind");
}

#[test]
fn test_tap_parity_tap_without_vnet_hdr_served() {
    let _g = serial();
    for (extra, queues) in [(&[][..], 1u16), (&["multi_queue"][..], 2)] {
        let tap = UserTap::create(extra);
        assert_eq!(tap.flags() & 0x4000, 0, "created without vnet_hdr");
        let dir = log_dir("tap-parity-no-vnet-hdr").unwrap();
        let sock = dir.join("vutap.sock");
        let _v = Vutap::spawn(&sock, Path::new(&tap.name), queues, &[], &dir).unwrap();
        // Byte-for-byte equality shows the header is there: without it, a 12-byte header
        // would be read from (and written into) the frames.
        check_frames_both_ways(&sock, &tap.name);
    }
}

#[test]
fn test_tap_parity_persistent_tap_of_another_user() {
    let _g = serial();
    let dir = OpenDir::new();
    // Owned by nobody: vutap running as nobody, without any capability, serves it.
    let tap = UserTap::create(&["multi_queue", "vnet_hdr", "user", &NOBODY.to_string()]);
    let sock = dir.0.join("owned.sock");
    let mut cmd = vutap(&sock, &tap.name, 2);
    cmd.uid(NOBODY).gid(NOBODY).stdin(Stdio::null());
    let mut v = AsNobody(cmd.spawn().unwrap());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(
            v.0.try_wait().unwrap().is_none(),
            "vutap as nobody exited on a tap nobody owns"
        );
        assert!(Instant::now() < deadline, "vutap as nobody never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    check_frames_both_ways(&sock, &tap.name);
    drop(v);
    drop(tap);

    // Owned by root: refused, saying who may attach.
    let tap = UserTap::create(&["multi_queue", "vnet_hdr", "user", "0"]);
    let sock = dir.0.join("other.sock");
    let mut cmd = vutap(&sock, &tap.name, 1);
    cmd.uid(NOBODY).gid(NOBODY);
    let (code, lines) = run_refused(&mut cmd);
    assert_one_line(
        code,
        &lines,
        &[
            &tap.name,
            "Operation not permitted",
            "owner",
            "CAP_NET_ADMIN",
        ],
    );
}

/// Opens one queue of tap `name` the way a manager would hand it over: `/dev/net/tun`, TUNSETIFF
/// with `flags`, and no close-on-exec so a spawned vutap inherits it.
fn open_inheritable_queue(name: &str, flags: u16) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        flags: u16,
        _pad: [u8; 22],
    }
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: a NUL-terminated path; the returned fd is checked and then owned.
    let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR) };
    assert!(
        fd >= 0,
        "open /dev/net/tun: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: open just returned this fd; nothing else owns it.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // SAFETY: `req` is a valid ifreq for TUNSETIFF, alive across the call.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            TUNSETIFF as _,
            &mut req as *mut IfReq,
        )
    };
    assert!(
        rc == 0,
        "TUNSETIFF {name} {flags:#x}: {}",
        std::io::Error::last_os_error()
    );
    fd
}

#[test]
fn test_tap_parity_inherited_fd_with_and_without_vnet_hdr() {
    use std::os::fd::AsRawFd;
    const IFF_TAP: u16 = 0x0002;
    const IFF_NO_PI: u16 = 0x1000;
    const IFF_VNET_HDR: u16 = 0x4000;
    let _g = serial();

    let tap = UserTap::create(&["vnet_hdr"]);
    let fd = open_inheritable_queue(&tap.name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR);
    let dir = log_dir("tap-parity-fd").unwrap();
    let sock = dir.join("vutap.sock");
    let v = Vutap::spawn(
        &sock,
        Path::new(&format!("fd:{}", fd.as_raw_fd())),
        1,
        &[],
        &dir,
    )
    .unwrap();
    drop(fd); // vutap holds its own copy
    check_frames_both_ways(&sock, &tap.name);
    drop(v);
    drop(tap);

    // QEMU's vnet_hdr=off: the fd carries bare frames, and the flag cannot be added later.
    let tap = UserTap::create(&[]);
    let fd = open_inheritable_queue(&tap.name, IFF_TAP | IFF_NO_PI);
    let (code, lines) = run_refused(&mut vutap(&sock, &format!("fd:{}", fd.as_raw_fd()), 1));
    assert_one_line(code, &lines, &[&tap.name, "without IFF_VNET_HDR"]);
}
