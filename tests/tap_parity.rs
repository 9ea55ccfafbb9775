//! Taps as QEMU's `-netdev tap` accepts them: created without `multi_queue` (served with one
//! queue pair, refused with a clear line for more), without `vnet_hdr` (switched on at open),
//! and persistent taps owned by another user (served when vutap runs as that user, refused with
//! the reason otherwise). Each served tap carries frames both ways, compared byte for byte.
//!
//! Inherited fds (QEMU's `fd=`, libvirt) are served when opened with `IFF_VNET_HDR` and refused,
//! with the reason, when opened without it (QEMU's `vnet_hdr=off`). `--sndbuf` (QEMU's
//! `sndbuf=`) bounds what a queue has in flight.
//!
//! Needs root (creates taps in the host namespace and macvtaps in a netns topology, runs vutap
//! as `nobody`) and a built `vutap`.

mod common;
mod tap_util;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{run_refused, serial};
use tap_util::{check_frames_both_ways, UserTap};
use vutap_testbed::{log_dir, Vutap};

const NOBODY: u32 = 65534;

fn vutap(socket: &Path, tap: &str, queues: u16) -> Command {
    let mut c = Command::new(Vutap::binary().unwrap());
    c.arg("--socket").arg(socket).args(["--tap", tap, "--queues", &queues.to_string(), "--log-level", "error"]).env_remove("RUST_LOG");
    c
}

fn assert_one_line(code: i32, lines: &[String], needles: &[&str]) {
    assert_eq!(code, 1, "{lines:?}");
    assert_eq!(lines.len(), 1, "exactly one line on stderr: {lines:?}");
    for n in needles {
        assert!(lines[0].contains(n), "{:?} does not mention {n:?}", lines[0]);
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
    assert!(v.log_text().contains("is not multi_queue: serving its one queue"), "{}", v.log_text());
}

#[test]
fn test_tap_parity_single_queue_tap_refused_with_more_queue_pairs() {
    let _g = serial();
    let tap = UserTap::create(&["vnet_hdr"]);
    let sock = log_dir("tap-parity-single-mq").unwrap().join("vutap.sock");
    let (code, lines) = run_refused(&mut vutap(&sock, &tap.name, 2));
    assert_one_line(code, &lines, &[&tap.name, "not a multi_queue tap", "multi_queue vnet_hdr", "--queues 1"]);
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
        assert!(v.0.try_wait().unwrap().is_none(), "vutap as nobody exited on a tap nobody owns");
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
    assert_one_line(code, &lines, &[&tap.name, "Operation not permitted", "owner", "CAP_NET_ADMIN"]);
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
    let mut req = IfReq { name: [0; libc::IFNAMSIZ], flags, _pad: [0; 22] };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: a NUL-terminated path; the returned fd is checked and then owned.
    let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR) };
    assert!(fd >= 0, "open /dev/net/tun: {}", std::io::Error::last_os_error());
    // SAFETY: open just returned this fd; nothing else owns it.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // SAFETY: `req` is a valid ifreq for TUNSETIFF, alive across the call.
    let rc = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&fd), TUNSETIFF as _, &mut req as *mut IfReq) };
    assert!(rc == 0, "TUNSETIFF {name} {flags:#x}: {}", std::io::Error::last_os_error());
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
    let v = Vutap::spawn(&sock, Path::new(&format!("fd:{}", fd.as_raw_fd())), 1, &[], &dir).unwrap();
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

/// The value of `name{device="DEV",queue_pair="0"}` on vutap's metrics endpoint.
fn pair0_counter(port: u16, device: &str, name: &str) -> u64 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let key = format!("{name}{{device=\"{device}\",queue_pair=\"0\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&key)).and_then(|v| v.trim().parse().ok()).unwrap_or_else(|| panic!("no {key} in\n{text}"))
}

/// Test frames waiting on a macvtap queue (each after its 10-byte virtio_net_hdr), until `n`
/// have arrived or none comes for a while.
fn read_test_frames(queue: &std::fs::File, n: usize) -> Vec<Vec<u8>> {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65536];
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < n && Instant::now() < deadline {
        match (&*queue).read(&mut buf) {
            Ok(len) if len > 10 && common::is_test_frame(&buf[10..len]) => got.push(buf[10..len].to_vec()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let mut p = libc::pollfd { fd: queue.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                // SAFETY: one valid pollfd, alive across the call.
                unsafe { libc::poll(&mut p, 1, 100) };
            }
            Err(e) => panic!("read from the receiving macvtap: {e}"),
        }
    }
    got
}

/// QEMU's `sndbuf=`: `--sndbuf` bounds the bytes a tap queue has in flight. Frames from one
/// macvtap to another on the same lower stay charged to the writer until the receiver reads
/// them, so with the receiver not reading, a 32 KiB limit makes vutap wait (EAGAIN, counted)
/// after a few frames, while the default (unlimited) writes all 64. Either way every frame
/// arrives, in order and unchanged, once the receiver reads. The same with `--io-uring`, whose
/// writes are linked under a limit and stop at the EAGAIN (the worker must wait for room, not
/// sleep in the ring), and go unlinked without one.
#[test]
fn test_tap_parity_sndbuf_bounds_bytes_in_flight() {
    use std::os::unix::fs::OpenOptionsExt;
    use vutap_frontend::{FrontendOptions, NetFrontend, VirtioNetHdr};
    use vutap_testbed::{free_port, MacvtapMode, Topology};
    let _g = serial();
    for (limit, io_uring) in [(Some("32768"), false), (None, false), (Some("32768"), true), (None, true)] {
        let topo = Topology::new(2, MacvtapMode::Bridge).unwrap();
        let receiver = std::fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_NONBLOCK).open(&topo.taps[1].dev).unwrap();
        let dir = log_dir("tap-parity-sndbuf").unwrap();
        let sock = dir.join("vutap.sock");
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let mut extra = vec!["--metrics-addr", addr.as_str()];
        if let Some(bytes) = limit {
            extra.extend(["--sndbuf", bytes]);
        }
        if io_uring {
            extra.push("--io-uring");
        }
        let v = Vutap::spawn(&sock, &topo.taps[0].dev, 1, &extra, &dir).unwrap();
        let device = topo.taps[0].ifname.as_str();
        let mut fe = NetFrontend::connect(&sock, FrontendOptions::default()).unwrap();
        let (src, dst) = (common::parse_mac(&topo.taps[0].mac), common::parse_mac(&topo.taps[1].mac));
        let frames: Vec<Vec<u8>> = (0..64).map(|seq| common::test_frame(dst, src, 1514, seq)).collect();
        for f in &frames {
            fe.send_frame(0, &VirtioNetHdr::default(), f).unwrap();
        }
        let written = || pair0_counter(port, device, "vutap_tx_frames_total");
        let waits = || pair0_counter(port, device, "vutap_tx_eagain_total");
        assert!(
            common::wait_until(Duration::from_secs(10), || written() == 64 || waits() >= 1),
            "vutap neither wrote every frame nor waited: {} written\n{}",
            written(),
            v.log_text()
        );
        let (w, e) = (written(), waits());
        eprintln!("sndbuf {limit:?}, io_uring {io_uring}: {w} frames written, {e} EAGAIN wait(s) before the receiver read");
        match limit {
            Some(_) => assert!(e >= 1 && w < 64, "with --sndbuf: {w} written, {e} waits"),
            None => assert_eq!((w, e), (64, 0), "unlimited: every frame written at once"),
        }
        let got = read_test_frames(&receiver, frames.len());
        assert_eq!(got.len(), frames.len(), "frames at the receiving macvtap");
        assert!(got == frames, "frames changed or reordered on the way");
        assert!(common::wait_until(Duration::from_secs(5), || written() == 64), "{}", v.log_text());
        if limit.is_some() {
            assert!(v.log_text().contains("tap send buffer 32768 bytes per queue"), "{}", v.log_text());
        }
        let rings = io_uring_fds(v.pid());
        if io_uring {
            assert_eq!(rings, 1, "one ring for the one queue");
            assert!(v.log_text().contains("TX and RX through io_uring"), "{}", v.log_text());
            assert!(!v.log_text().contains("with writev from now on"), "the ring failed:\n{}", v.log_text());
        } else {
            assert_eq!(rings, 0, "no ring without --io-uring");
        }
    }
}

/// `--io-uring` links a batch's writes only while the queue can refuse one for room: not with
/// the unlimited send buffer vutap opens taps with, again once a limit is set (a ring built
/// before `--sndbuf` is applied follows it), and not once the limit is lifted.
#[test]
fn test_tap_parity_io_uring_links_writes_only_under_a_send_buffer_limit() {
    use vutap::tap::{Tap, TapSpec};
    let _g = serial();
    let name = format!("vtlink{}", std::process::id() % 100_000);
    let tap = Tap::open(&TapSpec::Name(name.clone()), 1).expect("open a tap");
    let q = &tap.queues[0];
    assert_eq!(q.io_uring_links_writes(), None, "no ring yet");
    q.use_io_uring(64).expect("io_uring on a tap");
    assert_eq!(q.io_uring_links_writes(), Some(false), "unlimited: a tap never refuses for room");
    q.set_sndbuf(32768).unwrap();
    assert_eq!(q.io_uring_links_writes(), Some(true), "limited: a refused write must stop the ones behind it");
    q.set_sndbuf(libc::c_int::MAX).unwrap();
    assert_eq!(q.io_uring_links_writes(), Some(false));
    drop(tap);
    // A tap vutap created goes with its last fd; a leftover one (a failed assertion) does not.
    let _ = Command::new("ip").args(["link", "del", &name]).stderr(Stdio::null()).status();
}

/// How many io_uring instances process `pid` holds open.
fn io_uring_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter(|e| std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy().contains("io_uring")))
        .count()
}
