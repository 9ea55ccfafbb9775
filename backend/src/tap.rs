//! Opening macvtaps and taps, one non-blocking fd per queue pair, and their typed ioctls.
//!
//! A SPEC is `/dev/tapN` (a macvtap's character device), an interface name (a macvtap is
//! resolved to its `/dev/tap<ifindex>`, anything else opened through `/dev/net/tun` as a
//! multi-queue tap, created if missing, or as a single-queue tap with one queue pair), or `fd:3,4` (fds inherited from a manager).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use thiserror::Error;

use crate::datapath::tap_ring::{TapRing, TapRingError};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNSETQUEUE: libc::c_ulong = 0x4004_54d9;
const TUNSETSNDBUF: libc::c_ulong = 0x4004_54d4;
const TUNGETSNDBUF: libc::c_ulong = 0x8004_54d3;

const IFF_TAP: u16 = 0x0002;
const IFF_NO_PI: u16 = 0x1000;
const IFF_VNET_HDR: u16 = 0x4000;
const IFF_MULTI_QUEUE: u16 = 0x0100;
const IFF_ATTACH_QUEUE: u16 = 0x0200;
const IFF_DETACH_QUEUE: u16 = 0x0400;

#[derive(Debug, Error)]
pub enum TapError {
    #[error("tap spec {0:?} is empty or malformed (expected /dev/tapN, an interface name, or fd:N[,N...])")]
    BadSpec(String),
    #[error("no such network device {0:?} (create it first, e.g. `ip link add link LOWER name {0} type macvtap mode bridge`)")]
    NoSuchDevice(String),
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0} is not a tap/macvtap character device")]
    NotATap(PathBuf),
    #[error("TUNSETIFF on {name}: {source}{hint}")]
    SetIff {
        name: String,
        hint: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("inherited fd {fd} is not a tap/macvtap: {source}")]
    InheritedNotTap {
        fd: RawFd,
        #[source]
        source: io::Error,
    },
    #[error("{count} fds given for {queues} queue pairs: pass exactly one fd per queue pair")]
    FdCount { count: usize, queues: usize },
    #[error("TUNSETVNETHDRSZ {len}: {source}")]
    SetVnetHdrSz {
        len: usize,
        #[source]
        source: io::Error,
    },
    #[error("TUNSETOFFLOAD {flags:#x}: {source}")]
    SetOffload {
        flags: u32,
        #[source]
        source: io::Error,
    },
    #[error("TUNSETQUEUE ({action}): {source}")]
    SetQueue {
        action: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("reading {path}: {source}")]
    Sysfs {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// `struct ifreq` as the tun ioctls use it: a name and the flags of the union.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: u16,
    _pad: [u8; 22],
}

impl IfReq {
    fn new(name: &str, flags: u16) -> Self {
        let mut req = IfReq { name: [0; libc::IFNAMSIZ], flags, _pad: [0; 22] };
        let n = name.len().min(libc::IFNAMSIZ - 1);
        req.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        req
    }

    fn name(&self) -> String {
        let end = self.name.iter().position(|&b| b == 0).unwrap_or(self.name.len());
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

fn ioctl_ifreq(fd: RawFd, request: libc::c_ulong, req: &mut IfReq) -> io::Result<()> {
    // SAFETY: `req` is a valid, properly sized `struct ifreq` that lives across the call; the
    // tun/tap ioctls used here read or write only within it.
    let ret = unsafe { libc::ioctl(fd, request as _, req as *mut IfReq) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn ioctl_int(fd: RawFd, request: libc::c_ulong, value: &libc::c_int) -> io::Result<()> {
    // SAFETY: TUNSETVNETHDRSZ and TUNSETSNDBUF read one int through the pointer, which is valid
    // for the call.
    let ret = unsafe { libc::ioctl(fd, request as _, value as *const libc::c_int) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// What kind of device the queues belong to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TapKind {
    /// A macvtap: the guest must use its MAC.
    Macvtap,
    /// A tun/tap device.
    Tap,
}

/// The largest frame a tap queue hands out: a 64 KiB GSO frame plus its virtio_net_hdr, and
/// then some. A read into this many bytes is never cut short.
pub const MAX_READ: usize = 65536 + 64;

/// One queue (fd) of a tap or macvtap, non-blocking, with a virtio_net_hdr prefix on every frame.
#[derive(Debug)]
pub struct TapQueue {
    fd: OwnedFd,
    /// `--io-uring`: the ring TX batches are written and RX frames read through; none, or
    /// dropped after it failed, means one `write`/`writev`/`readv` per frame. Only the queue
    /// pair's worker takes the lock.
    ring: Mutex<Option<TapRing>>,
    /// The send buffer is unlimited, so the tap never refuses a write for room. Tracked here:
    /// a detached tun queue reports its old value until it is attached again.
    sndbuf_unlimited: AtomicBool,
}

impl std::os::fd::AsFd for TapQueue {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for TapQueue {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl TapQueue {
    /// A queue fd handed over by a previous vutap (already non-blocking, with its vnet header
    /// and offloads set).
    pub fn from_fd(fd: OwnedFd) -> Self {
        let q = TapQueue { fd, ring: Mutex::new(None), sndbuf_unlimited: AtomicBool::new(false) };
        q.sndbuf_unlimited.store(q.sndbuf().is_ok_and(|b| b == libc::c_int::MAX), Ordering::Relaxed);
        q
    }

    /// Writes TX batches and reads RX frames through an io_uring of `entries` entries bound to
    /// this queue (see [`TapRing`]) instead of one `write`/`writev`/`readv` per frame.
    pub fn use_io_uring(&self, entries: u32) -> Result<(), TapRingError> {
        let ring = TapRing::new(self.as_raw_fd(), entries, self.may_refuse_writes())?;
        *self.ring.lock().unwrap_or_else(|e| e.into_inner()) = Some(ring);
        Ok(())
    }

    /// With `--io-uring`: whether the ring links the writes of a batch (see [`TapRing`]).
    pub fn io_uring_links_writes(&self) -> Option<bool> {
        self.ring().as_ref().map(TapRing::links_writes)
    }

    /// Whether a write can be refused for room: the send buffer is limited (or unknown).
    fn may_refuse_writes(&self) -> bool {
        !self.sndbuf_unlimited.load(Ordering::Relaxed)
    }

    /// The send buffer in bytes (`TUNGETSNDBUF`).
    fn sndbuf(&self) -> io::Result<libc::c_int> {
        let mut bytes: libc::c_int = 0;
        // SAFETY: TUNGETSNDBUF writes one int through the pointer, which is valid for the call.
        let ret = unsafe { libc::ioctl(self.as_raw_fd(), TUNGETSNDBUF as _, &mut bytes as *mut libc::c_int) };
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(bytes)
        }
    }

    /// The queue's ring, while it has one.
    pub(crate) fn ring(&self) -> std::sync::MutexGuard<'_, Option<TapRing>> {
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the virtio_net_hdr length the tap reads and writes (10 or 12).
    pub fn set_vnet_hdr_len(&self, len: usize) -> Result<(), TapError> {
        ioctl_int(self.as_raw_fd(), TUNSETVNETHDRSZ, &(len as libc::c_int)).map_err(|source| TapError::SetVnetHdrSz { len, source })
    }

    /// Tells the tap which offloads (`TUN_F_*`) the reader copes with.
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
        let ret = unsafe { libc::ioctl(self.as_raw_fd(), TUNSETOFFLOAD as _, flags as libc::c_ulong) };
        if ret < 0 {
            return Err(TapError::SetOffload { flags, source: io::Error::last_os_error() });
        }
        Ok(())
    }

    /// Sets how many bytes of frames written to this queue may be in flight (not yet freed by
    /// whoever receives them) before writes return `EAGAIN`. The kernel default is
    /// `net.core.wmem_default` (~208 KiB, three 64 KiB GSO frames); frames from one macvtap to
    /// another on the same lower stay charged to the writer until the receiving side reads them.
    pub fn set_sndbuf(&self, bytes: libc::c_int) -> io::Result<()> {
        ioctl_int(self.as_raw_fd(), TUNSETSNDBUF, &bytes)?;
        self.sndbuf_unlimited.store(bytes == libc::c_int::MAX, Ordering::Relaxed);
        // A ring built before links its writes again once they can be refused (and back).
        if let Some(ring) = self.ring().as_mut() {
            ring.set_may_refuse(self.may_refuse_writes());
        }
        Ok(())
    }

    /// Attaches (true) or detaches (false) this queue. A queue nobody reads must be detached,
    /// or the flows that hash to it are silently lost. Re-attaching an attached queue (or the
    /// reverse) is not an error.
    pub fn set_attached(&self, attached: bool) -> Result<(), TapError> {
        let (flag, action) = if attached { (IFF_ATTACH_QUEUE, "attach") } else { (IFF_DETACH_QUEUE, "detach") };
        let mut req = IfReq::new("", flag);
        match ioctl_ifreq(self.as_raw_fd(), TUNSETQUEUE, &mut req) {
            // EINVAL: already in that state (tun and macvtap both say so).
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
            Err(source) => Err(TapError::SetQueue { action, source }),
            Ok(()) => Ok(()),
        }
    }

    /// Detaches this queue and drops the frames still waiting on it; returns how many.
    ///
    /// A detached queue keeps what was queued on it, and a queued frame pins its sender's
    /// socket memory: a local TCP sender (a peer behind the macvtap's lower, another guest)
    /// then can neither send more (TCP small queues) nor retransmit those segments ("still in
    /// host queue"), and its stream stalls for as long as vutap keeps the fd open. QEMU's own
    /// tap backend frees them by closing the fd when the VM stops or migrates away.
    pub fn park(&self) -> Result<usize, TapError> {
        self.set_attached(false)?;
        Ok(self.drain())
    }

    /// Reads and discards frames until the queue is empty (it is non-blocking).
    fn drain(&self) -> usize {
        let mut buf = vec![0u8; MAX_READ];
        let mut dropped = 0;
        // Bounded, in case frames keep coming (the queue itself holds at most tx_queue_len).
        for _ in 0..4096 {
            // SAFETY: reading into a buffer we own, of the length we pass.
            let n = unsafe { libc::read(self.as_raw_fd(), buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
            if n <= 0 {
                break;
            }
            dropped += 1;
        }
        dropped
    }
}

/// All queues of one device plus what we learnt about it.
#[derive(Debug)]
pub struct Tap {
    pub queues: Vec<TapQueue>,
    pub kind: TapKind,
    /// Interface name, when known.
    pub name: Option<String>,
    /// The interface's MAC (a macvtap's is the one the guest must use).
    pub mac: Option<[u8; 6]>,
    pub mtu: Option<u16>,
}

/// Parsed form of the `--tap` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TapSpec {
    DevPath(PathBuf),
    Name(String),
    Fds(Vec<RawFd>),
}

impl std::str::FromStr for TapSpec {
    type Err = TapError;

    fn from_str(s: &str) -> Result<Self, TapError> {
        let bad = || TapError::BadSpec(s.to_string());
        if let Some(list) = s.strip_prefix("fd:") {
            let fds: Result<Vec<RawFd>, _> = list.split(',').map(|f| f.trim().parse::<RawFd>()).collect();
            let fds = fds.map_err(|_| bad())?;
            if fds.is_empty() || fds.iter().any(|&fd| fd < 0) {
                return Err(bad());
            }
            return Ok(TapSpec::Fds(fds));
        }
        if s.starts_with('/') {
            return Ok(TapSpec::DevPath(PathBuf::from(s)));
        }
        if s.is_empty() || s.len() >= libc::IFNAMSIZ || s.contains('/') || s.contains(char::is_whitespace) {
            return Err(bad());
        }
        Ok(TapSpec::Name(s.to_string()))
    }
}

fn sysfs_net(name: &str) -> PathBuf {
    Path::new("/sys/class/net").join(name)
}

fn read_sysfs(path: &Path) -> Result<String, TapError> {
    std::fs::read_to_string(path).map(|s| s.trim().to_string()).map_err(|source| TapError::Sysfs { path: path.to_path_buf(), source })
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in mac.iter_mut() {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// Reads MAC and MTU of an interface from sysfs.
fn link_info(name: &str) -> (Option<[u8; 6]>, Option<u16>) {
    let mac = read_sysfs(&sysfs_net(name).join("address")).ok().and_then(|s| parse_mac(&s));
    let mtu = read_sysfs(&sysfs_net(name).join("mtu")).ok().and_then(|s| s.parse().ok());
    (mac, mtu)
}

fn is_macvtap(name: &str) -> bool {
    sysfs_net(name).join("macvtap").is_dir()
}

/// The interface whose ifindex is N, for `/dev/tapN`.
fn name_for_ifindex(ifindex: u32) -> Option<String> {
    let entries = std::fs::read_dir("/sys/class/net").ok()?;
    entries.flatten().find_map(|e| {
        let idx = std::fs::read_to_string(e.path().join("ifindex")).ok()?;
        (idx.trim().parse::<u32>().ok()? == ifindex).then(|| e.file_name().to_string_lossy().into_owned())
    })
}

fn open_nonblocking(path: &Path) -> Result<File, TapError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| TapError::Open { path: path.to_path_buf(), source })
}

/// Opens a macvtap's character device `queues` times.
fn open_macvtap_dev(path: &Path, queues: usize) -> Result<Tap, TapError> {
    let meta = std::fs::metadata(path).map_err(|source| TapError::Open { path: path.to_path_buf(), source })?;
    if !meta.file_type().is_char_device() {
        return Err(TapError::NotATap(path.to_path_buf()));
    }
    let name = path
        .file_name()
        .and_then(|f| f.to_str())
        .and_then(|f| f.strip_prefix("tap"))
        .and_then(|n| n.parse().ok())
        .and_then(name_for_ifindex);
    let mut tap_queues = Vec::with_capacity(queues);
    for _ in 0..queues {
        let file = open_nonblocking(path)?;
        let mut req = IfReq::new("", IFF_TAP | IFF_NO_PI | IFF_VNET_HDR);
        ioctl_ifreq(file.as_raw_fd(), TUNSETIFF, &mut req).map_err(|source| TapError::SetIff {
            name: path.display().to_string(),
            hint: "",
            source,
        })?;
        tap_queues.push(TapQueue::from_fd(file.into()));
    }
    let (mac, mtu) = name.as_deref().map(link_info).unwrap_or((None, None));
    Ok(Tap { queues: tap_queues, kind: TapKind::Macvtap, name, mac, mtu })
}

/// The `/dev/tapN` node of a macvtap, created from sysfs if udev has not made it.
fn macvtap_dev_path(name: &str) -> Result<PathBuf, TapError> {
    let ifindex = read_sysfs(&sysfs_net(name).join("ifindex"))?;
    let path = PathBuf::from(format!("/dev/tap{ifindex}"));
    if path.exists() {
        return Ok(path);
    }
    let devnum = read_sysfs(&sysfs_net(name).join("macvtap").join(format!("tap{ifindex}")).join("dev"))?;
    let (major, minor) = devnum.split_once(':').ok_or_else(|| TapError::NotATap(path.clone()))?;
    let (major, minor): (u32, u32) =
        (major.parse().map_err(|_| TapError::NotATap(path.clone()))?, minor.parse().map_err(|_| TapError::NotATap(path.clone()))?);
    let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| TapError::NotATap(path.clone()))?;
    // SAFETY: `cpath` is a valid NUL-terminated path; mknod does not retain it.
    let ret = unsafe { libc::mknod(cpath.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(major, minor)) };
    if ret < 0 {
        return Err(TapError::Open { path, source: io::Error::last_os_error() });
    }
    Ok(path)
}

/// Why TUNSETIFF on `/dev/net/tun` failed, in the user's terms.
fn tun_hint(source: &io::Error, multi_queue: bool) -> &'static str {
    match source.raw_os_error() {
        Some(libc::EINVAL) if multi_queue => {
            " (the existing device is not a multi_queue tap: recreate it with `ip tuntap add NAME mode tap multi_queue vnet_hdr`, or serve it with --queues 1)"
        }
        Some(libc::EINVAL) => " (an interface of that name exists but is not a tap: a tun (L3) device or another kind of link)",
        Some(libc::EPERM) => " (creating or attaching a tap needs CAP_NET_ADMIN, or to run as the tap's owner user/group: `ip tuntap add NAME mode tap user U`)",
        Some(libc::EBUSY) => " (the tap is not multi_queue and another process, e.g. QEMU, already has it open)",
        _ => "",
    }
}

/// Opens (creating it if missing) the tap `name` `queues` times, as a multi-queue tap.
///
/// A tap created without `multi_queue` (as QEMU's own tap backend accepts) is served when one
/// queue pair is asked for: it has a single queue, which the kernel never detaches, so frames
/// that arrive while no frontend is connected wait on it (up to its txqueuelen) and reach the
/// guest when the pair starts, as with QEMU's tap backend while a VM is stopped.
fn open_tun(name: &str, queues: usize) -> Result<Tap, TapError> {
    let mut tap_queues = Vec::with_capacity(queues);
    let mut actual = name.to_string();
    let mut multi_queue = true;
    for _ in 0..queues {
        let file = open_nonblocking(Path::new("/dev/net/tun"))?;
        let base = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        let mut req = IfReq::new(&actual, base | IFF_MULTI_QUEUE);
        let mut result = ioctl_ifreq(file.as_raw_fd(), TUNSETIFF, &mut req);
        if queues == 1 && matches!(&result, Err(e) if e.raw_os_error() == Some(libc::EINVAL)) {
            // Maybe a single-queue tap: the kernel refuses a multi_queue open of it.
            let mut single = IfReq::new(&actual, base);
            if ioctl_ifreq(file.as_raw_fd(), TUNSETIFF, &mut single).is_ok() {
                multi_queue = false;
                req = single;
                result = Ok(());
            }
        }
        result.map_err(|source| TapError::SetIff { name: actual.clone(), hint: tun_hint(&source, queues > 1), source })?;
        actual = req.name();
        tap_queues.push(TapQueue::from_fd(file.into()));
    }
    if !multi_queue {
        log::info!(
            "tap {actual} is not multi_queue: serving its one queue, which cannot be detached: frames that arrive while no frontend is connected wait on it (up to its txqueuelen) instead of being dropped; create it with `multi_queue` for more queue pairs"
        );
    }
    let (mac, mtu) = link_info(&actual);
    Ok(Tap { queues: tap_queues, kind: TapKind::Tap, name: Some(actual), mac, mtu })
}

/// Adopts inherited fds: checks each is a tap or macvtap, makes it non-blocking with a vnet header.
fn adopt_fds(fds: &[RawFd], queues: usize) -> Result<Tap, TapError> {
    if fds.len() != queues {
        return Err(TapError::FdCount { count: fds.len(), queues });
    }
    let mut tap_queues = Vec::with_capacity(queues);
    let mut name = None;
    for &fd in fds {
        let mut req = IfReq::new("", 0);
        ioctl_ifreq(fd, TUNGETIFF, &mut req).map_err(|source| TapError::InheritedNotTap { fd, source })?;
        let wanted = req.flags | IFF_VNET_HDR;
        name.get_or_insert_with(|| req.name());
        // SAFETY: the fd was handed to us by the parent to own; we take ownership exactly once.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        set_nonblocking(fd).map_err(|source| TapError::InheritedNotTap { fd, source })?;
        if req.flags & IFF_VNET_HDR == 0 {
            let mut set = IfReq::new(&req.name(), wanted);
            ioctl_ifreq(fd, TUNSETIFF, &mut set).map_err(|source| TapError::SetIff {
                name: req.name(),
                hint: " (the inherited fd was opened without IFF_VNET_HDR, which cannot be set on an attached fd: open it with vnet_hdr, e.g. QEMU/libvirt `vnet_hdr=on`)",
                source,
            })?;
        }
        tap_queues.push(TapQueue::from_fd(owned));
    }
    let kind = match name.as_deref() {
        Some(n) if is_macvtap(n) => TapKind::Macvtap,
        _ => TapKind::Tap,
    };
    let (mac, mtu) = name.as_deref().map(link_info).unwrap_or((None, None));
    Ok(Tap { queues: tap_queues, kind, name, mac, mtu })
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on an fd we own; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Tap {
    /// Opens `queues` queues of the device named by `spec`. Every queue starts detached, so no
    /// traffic is swallowed by a queue before its worker reads it.
    pub fn open(spec: &TapSpec, queues: usize) -> Result<Tap, TapError> {
        let tap = match spec {
            TapSpec::DevPath(path) => open_macvtap_dev(path, queues)?,
            TapSpec::Name(name) if is_macvtap(name) => open_macvtap_dev(&macvtap_dev_path(name)?, queues)?,
            TapSpec::Name(name) => {
                if !sysfs_net(name).exists() && !Path::new("/dev/net/tun").exists() {
                    return Err(TapError::NoSuchDevice(name.clone()));
                }
                open_tun(name, queues)?
            }
            TapSpec::Fds(fds) => adopt_fds(fds, queues)?,
        };
        for q in &tap.queues {
            // Frames queued between open and detach belong to nobody.
            q.park()?;
            // Like QEMU's tap backend (its default `sndbuf` is INT_MAX): with the kernel's
            // ~208 KiB default, guest-to-guest TX through a macvtap bridge stalls on EAGAIN
            // every few GSO frames until the other guest's backend has read them.
            if let Err(e) = q.set_sndbuf(libc::c_int::MAX) {
                log::warn!("TUNSETSNDBUF: {e}; keeping the kernel's default send buffer");
            }
        }
        Ok(tap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_tap_spec_parse() {
        assert_eq!("/dev/tap7".parse::<TapSpec>().unwrap(), TapSpec::DevPath("/dev/tap7".into()));
        assert_eq!("mvt0".parse::<TapSpec>().unwrap(), TapSpec::Name("mvt0".into()));
        assert_eq!("fd:3,4".parse::<TapSpec>().unwrap(), TapSpec::Fds(vec![3, 4]));
        assert!("fd:".parse::<TapSpec>().is_err());
        assert!("fd:3,x".parse::<TapSpec>().is_err());
        assert!("".parse::<TapSpec>().is_err());
        assert!("a-name-that-is-too-long".parse::<TapSpec>().is_err());
    }

    #[test]
    fn test_parse_and_format_mac() {
        let mac = parse_mac("52:54:00:ab:CD:0f").unwrap();
        assert_eq!(mac, [0x52, 0x54, 0, 0xab, 0xcd, 0x0f]);
        assert_eq!(format_mac(&mac), "52:54:00:ab:cd:0f");
        assert_eq!(parse_mac("52:54:00:ab:cd"), None);
        assert_eq!(parse_mac("52:54:00:ab:cd:0f:00"), None);
        assert_eq!(parse_mac("zz:54:00:ab:cd:0f"), None);
    }
}
