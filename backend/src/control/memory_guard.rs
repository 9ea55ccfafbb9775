//! Containment of SIGBUS on guest memory. A frontend can shrink the fd behind a region after
//! SET_MEM_TABLE (or behind the dirty log after SET_LOG_BASE); the next access past the new end
//! raises SIGBUS, whose default action kills vutap and every device it serves.
//!
//! So every range vutap maps from a frontend fd is entered in a fixed-size, lock-free registry
//! together with its owner (the device serving that frontend). A process-wide SIGBUS handler
//! (SA_SIGINFO, installed once) looks the faulting address up there; when it is inside a
//! registered range it maps anonymous memory over the whole range (MAP_FIXED), so the faulting
//! access completes on zeros, marks the owner's memory as lost and writes the owner's eventfd.
//! The device's serving thread polls that eventfd and closes the connection; the next one is
//! served. A SIGBUS anywhere else is passed on as before (the previous handler, or the default
//! action, which kills the process).
//!
//! The handler only uses atomics, `mmap`, `write`, `sigaction` and `raise` (async-signal-safe),
//! all of which the worker threads' seccomp filter allows (`sandbox.rs`). Kernel copies from a
//! truncated range (`writev`/`readv` on the tap) fail with EFAULT instead of a signal: the
//! datapath then [`probes`](FaultWatch::probe_lost) the buffers from user space, which turns a
//! lost range into the same contained SIGBUS.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Once, OnceLock};

use log::warn;
use thiserror::Error;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::datapath::chain_iov::IoVec;

/// Registered ranges across all devices: up to 8 regions plus a dirty log per device, twice
/// while a new table replaces the old one.
pub const MAX_RANGES: usize = 1024;
/// Devices that can be guarded.
pub const MAX_OWNERS: usize = 256;

/// Granularity of the probe: the smallest page size, so every page of a buffer is touched.
const PROBE_STEP: usize = 4096;

#[derive(Debug, Error)]
pub enum GuardError {
    #[error("all {MAX_OWNERS} fault-owner slots are taken")]
    OwnersFull,
    #[error("all {MAX_RANGES} guarded-range slots are taken")]
    RangesFull,
    #[error("cannot create the fault eventfd: {0}")]
    EventFd(#[source] io::Error),
}

/// One registered range. `seq` is a seqlock: odd while the fields change, so a reader (the
/// signal handler) never uses a torn entry. `len == 0` means free.
struct RangeSlot {
    claimed: AtomicBool,
    seq: AtomicU64,
    start: AtomicUsize,
    len: AtomicUsize,
    owner: AtomicUsize,
}

impl RangeSlot {
    const fn new() -> Self {
        RangeSlot {
            claimed: AtomicBool::new(false),
            seq: AtomicU64::new(0),
            start: AtomicUsize::new(0),
            len: AtomicUsize::new(0),
            owner: AtomicUsize::new(0),
        }
    }

    fn write(&self, start: usize, len: usize, owner: usize) {
        self.seq.fetch_add(1, Ordering::AcqRel);
        self.start.store(start, Ordering::Relaxed);
        self.len.store(len, Ordering::Relaxed);
        self.owner.store(owner, Ordering::Relaxed);
        self.seq.fetch_add(1, Ordering::Release);
    }

    /// A consistent (start, len, owner), or None while the slot is being rewritten.
    fn read(&self) -> Option<(usize, usize, usize)> {
        for _ in 0..64 {
            let before = self.seq.load(Ordering::Acquire);
            if before % 2 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let entry = (self.start.load(Ordering::Relaxed), self.len.load(Ordering::Relaxed), self.owner.load(Ordering::Relaxed));
            fence(Ordering::Acquire);
            if self.seq.load(Ordering::Relaxed) == before {
                return Some(entry);
            }
        }
        None
    }
}

/// What the handler records for a device whose memory it replaced.
struct OwnerSlot {
    claimed: AtomicBool,
    lost: AtomicBool,
    notify_fd: AtomicI32,
    fault_addr: AtomicUsize,
    range_start: AtomicUsize,
    range_len: AtomicUsize,
}

impl OwnerSlot {
    const fn new() -> Self {
        OwnerSlot {
            claimed: AtomicBool::new(false),
            lost: AtomicBool::new(false),
            notify_fd: AtomicI32::new(-1),
            fault_addr: AtomicUsize::new(0),
            range_start: AtomicUsize::new(0),
            range_len: AtomicUsize::new(0),
        }
    }
}

static RANGES: [RangeSlot; MAX_RANGES] = [const { RangeSlot::new() }; MAX_RANGES];
static OWNERS: [OwnerSlot; MAX_OWNERS] = [const { OwnerSlot::new() }; MAX_OWNERS];
static INSTALL: Once = Once::new();
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

/// A registered range that contains an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Hit {
    start: usize,
    len: usize,
    owner: usize,
}

/// The registered range of `slots` that contains `addr`.
fn find(slots: &[RangeSlot], addr: usize) -> Option<Hit> {
    slots.iter().filter(|s| s.claimed.load(Ordering::Acquire)).find_map(|s| {
        let (start, len, owner) = s.read()?;
        (len != 0 && addr >= start && addr - start < len).then_some(Hit { start, len, owner })
    })
}

/// Claims a free slot of `slots` for `start..start+len`; None when all are taken.
fn claim(slots: &[RangeSlot], start: usize, len: usize, owner: usize) -> Option<usize> {
    let index = slots.iter().position(|s| s.claimed.compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed).is_ok())?;
    slots[index].write(start, len, owner);
    Some(index)
}

fn release(slots: &[RangeSlot], index: usize) {
    slots[index].write(0, 0, 0);
    slots[index].claimed.store(false, Ordering::Release);
}

/// Maps fresh anonymous memory over `start..start+len`. Async-signal-safe.
fn replace_with_anonymous(start: usize, len: usize) -> bool {
    // SAFETY: `start..start+len` is a range vutap mapped and registered (page-aligned start from
    // mmap, its full length); replacing it keeps it mapped, only its backing changes.
    let p = unsafe {
        libc::mmap(
            start as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    p != libc::MAP_FAILED
}

/// Records the fault for the owner and wakes its serving thread. Async-signal-safe.
fn report(hit: Hit, addr: usize) {
    let Some(o) = OWNERS.get(hit.owner) else {
        return;
    };
    o.fault_addr.store(addr, Ordering::Relaxed);
    o.range_start.store(hit.start, Ordering::Relaxed);
    o.range_len.store(hit.len, Ordering::Relaxed);
    o.lost.store(true, Ordering::Release);
    let fd = o.notify_fd.load(Ordering::Acquire);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) of 8 bytes from a local to the owner's eventfd.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    // code > 0: raised by a fault, not sent with kill/tgkill.
    if code > 0 {
        if let Some(hit) = find(&RANGES, addr) {
            if replace_with_anonymous(hit.start, hit.len) {
                report(hit, addr);
                return;
            }
        }
    }
    pass_on(sig, info, ctx, code);
}

/// What SIGBUS did before vutap's handler: the previous handler, or the default action.
fn pass_on(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void, code: libc::c_int) {
    if let Some(prev) = PREVIOUS.get() {
        let h = prev.sa_sigaction;
        if code > 0 && h != libc::SIG_DFL && h != libc::SIG_IGN {
            if prev.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: with SA_SIGINFO the previous handler has this signature.
                let f = unsafe { std::mem::transmute::<usize, extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void)>(h) };
                f(sig, info, ctx);
            } else {
                // SAFETY: without SA_SIGINFO the previous handler takes the signal number only.
                let f = unsafe { std::mem::transmute::<usize, extern "C" fn(libc::c_int)>(h) };
                f(sig);
            }
            return;
        }
    }
    // SAFETY: an all-zero sigaction with SIG_DFL is the default disposition.
    unsafe {
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(sig, &dfl, std::ptr::null_mut());
        if code <= 0 {
            // Sent, not a fault: returning would not repeat it, so deliver it again (it is
            // blocked until the handler returns, then the default action applies).
            libc::raise(sig);
        }
    }
}

/// Installs the SIGBUS handler once for the process.
fn install_handler() {
    INSTALL.call_once(|| {
        // SAFETY: sigaction with a handler of the SA_SIGINFO signature and a valid old-action
        // out pointer; the handler only does async-signal-safe work.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_sigbus as *const () as usize;
            act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_RESTART;
            libc::sigemptyset(&mut act.sa_mask);
            let mut old: libc::sigaction = std::mem::zeroed();
            // The previous action must be readable before the handler can run.
            if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old) == 0 {
                let _ = PREVIOUS.set(old);
            }
            if libc::sigaction(libc::SIGBUS, &act, std::ptr::null_mut()) != 0 {
                warn!(
                    "cannot install the SIGBUS handler ({}): a frontend shrinking guest memory would kill vutap",
                    io::Error::last_os_error()
                );
            }
        }
    });
}

/// Touches one byte in every page of `len` bytes at `ptr`, so a range that was lost faults
/// (and is replaced) here rather than only failing a kernel copy.
fn touch_pages(ptr: *const u8, len: usize) {
    if len == 0 {
        return;
    }
    let start = ptr as usize;
    let end = start.saturating_add(len);
    let mut p = start;
    while p < end {
        // SAFETY: `p` lies inside a buffer the caller resolved in mapped guest memory (or our
        // own spill buffer); a volatile read of one byte has no other effect.
        unsafe { std::ptr::read_volatile(p as *const u8) };
        p = (p / PROBE_STEP + 1) * PROBE_STEP;
    }
}

/// Where and what the handler replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LostRange {
    pub fault_addr: usize,
    pub start: usize,
    pub len: usize,
}

impl std::fmt::Display for LostRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SIGBUS at {:#x} inside the mapped range {:#x}..{:#x} (the fd behind it shrank); the range now reads as zeros",
            self.fault_addr,
            self.start,
            self.start + self.len
        )
    }
}

/// A device's registration: the slot its ranges point at and the eventfd the handler writes.
pub struct FaultOwner {
    index: usize,
    notify: EventFd,
}

impl FaultOwner {
    /// Installs the handler (once per process) and claims an owner slot.
    pub fn new() -> Result<Self, GuardError> {
        install_handler();
        let notify = EventFd::new(EFD_NONBLOCK).map_err(GuardError::EventFd)?;
        let index = OWNERS
            .iter()
            .position(|o| o.claimed.compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed).is_ok())
            .ok_or(GuardError::OwnersFull)?;
        let o = &OWNERS[index];
        o.lost.store(false, Ordering::Relaxed);
        o.notify_fd.store(notify.as_raw_fd(), Ordering::Release);
        Ok(FaultOwner { index, notify })
    }

    /// Readable when the handler replaced one of this owner's ranges.
    pub fn notifier(&self) -> &EventFd {
        &self.notify
    }

    /// A handle for the datapath.
    pub fn watch(&self) -> FaultWatch {
        FaultWatch { index: self.index }
    }

    /// Registers `len` bytes mapped at `start`; the range is guarded until the guard drops
    /// (drop it after unmapping).
    pub fn guard(&self, start: *const u8, len: usize) -> Result<RangeGuard, GuardError> {
        let index = claim(&RANGES, start as usize, len, self.index).ok_or(GuardError::RangesFull)?;
        Ok(RangeGuard { index })
    }

    /// The fault recorded since the last [`reset`](Self::reset), if any. It stays recorded:
    /// the workers stop on it until the connection is gone.
    pub fn lost_range(&self) -> Option<LostRange> {
        let _ = self.notify.read();
        let o = &OWNERS[self.index];
        o.lost.load(Ordering::Acquire).then(|| LostRange {
            fault_addr: o.fault_addr.load(Ordering::Relaxed),
            start: o.range_start.load(Ordering::Relaxed),
            len: o.range_len.load(Ordering::Relaxed),
        })
    }

    /// Forgets a recorded fault: a new connection starts clean (call it when no worker of the
    /// previous one runs any more).
    pub fn reset(&self) {
        let _ = self.notify.read();
        OWNERS[self.index].lost.store(false, Ordering::Release);
    }
}

impl Drop for FaultOwner {
    fn drop(&mut self) {
        let o = &OWNERS[self.index];
        o.notify_fd.store(-1, Ordering::Release);
        o.claimed.store(false, Ordering::Release);
    }
}

/// A guarded range; unregisters on drop.
#[derive(Debug)]
pub struct RangeGuard {
    index: usize,
}

impl Drop for RangeGuard {
    fn drop(&mut self) {
        release(&RANGES, self.index);
    }
}

/// The datapath's view of its device's guard: has its guest memory been lost?
#[derive(Debug, Clone, Copy)]
pub struct FaultWatch {
    index: usize,
}

impl FaultWatch {
    pub fn lost(&self) -> bool {
        OWNERS[self.index].lost.load(Ordering::Acquire)
    }

    /// After a kernel copy failed with EFAULT: touches the buffers from user space (a lost
    /// range faults and is replaced there) and says whether this device's memory is lost.
    pub fn probe_lost(&self, iovs: &[IoVec]) -> bool {
        for v in iovs {
            touch_pages(v.as_ptr(), v.len());
        }
        self.lost()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::fd::FromRawFd;

    #[test]
    fn test_registry_lookup_finds_only_live_ranges() {
        let slots: Vec<RangeSlot> = (0..4).map(|_| RangeSlot::new()).collect();
        let a = claim(&slots, 0x10000, 0x2000, 3).unwrap();
        let b = claim(&slots, 0x40000, 0x1000, 5).unwrap();
        assert_ne!(a, b);
        assert_eq!(find(&slots, 0x10000), Some(Hit { start: 0x10000, len: 0x2000, owner: 3 }));
        assert_eq!(find(&slots, 0x11fff), Some(Hit { start: 0x10000, len: 0x2000, owner: 3 }));
        assert_eq!(find(&slots, 0x12000), None, "one past the end");
        assert_eq!(find(&slots, 0xffff), None);
        assert_eq!(find(&slots, 0x40800).map(|h| h.owner), Some(5));
        release(&slots, a);
        assert_eq!(find(&slots, 0x10000), None, "released");
        assert_eq!(find(&slots, 0x40000).map(|h| h.owner), Some(5));
        // Full registry: claims fail, then succeed again after a release.
        let rest: Vec<usize> = (0..3).map(|i| claim(&slots, 0x100000 * (i + 1), 0x1000, 1).unwrap()).collect();
        assert_eq!(claim(&slots, 0x900000, 0x1000, 1), None);
        release(&slots, rest[0]);
        assert!(claim(&slots, 0x900000, 0x1000, 1).is_some());
        // A range reaching the top of the address space does not overflow.
        let top = usize::MAX - 0xfff;
        release(&slots, b);
        claim(&slots, top, 0x1000, 2).unwrap();
        assert_eq!(find(&slots, usize::MAX).map(|h| h.owner), Some(2));
    }

    fn shared_memfd(len: usize) -> (File, *mut u8) {
        // SAFETY: memfd_create with a valid name; the fd is owned by the File.
        let f = unsafe { File::from_raw_fd(libc::memfd_create(c"vutap-guard-test".as_ptr(), 0)) };
        f.set_len(len as u64).unwrap();
        // SAFETY: a fresh shared mapping of our own memfd, checked below.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, f.as_raw_fd(), 0) };
        assert_ne!(p, libc::MAP_FAILED);
        (f, p.cast())
    }

    /// The whole path on a worker thread under the worker seccomp filter: the handler's mmap,
    /// eventfd write and sigreturn are allowed there.
    #[test]
    fn test_truncated_mapping_is_replaced_and_reported_under_the_worker_filter() {
        let owner = FaultOwner::new().unwrap();
        let len = 4 * 4096;
        let (file, p) = shared_memfd(len);
        // SAFETY: inside our mapping.
        unsafe { p.add(100).write_volatile(7) };
        let guard = owner.guard(p, len).unwrap();
        file.set_len(4096).unwrap();
        let watch = owner.watch();
        let addr = p as usize;
        let seen = std::thread::spawn(move || {
            seccompiler::apply_filter(&crate::operations::sandbox::worker_filter().unwrap()).unwrap();
            assert!(!watch.lost());
            // Page 0 is still backed: no fault.
            // SAFETY: page 0 of our mapping, still backed, kept mapped until the test unmaps it.
            let iov = [unsafe { IoVec::from_raw_parts(addr as *mut u8, 4096) }];
            assert!(!watch.probe_lost(&iov));
            // Page 2 is past the new end: SIGBUS, contained.
            // SAFETY: inside the mapping we registered; the handler makes it readable.
            let v = unsafe { std::ptr::read_volatile((addr + 2 * 4096 + 8) as *const u8) };
            (v, watch.lost())
        })
        .join()
        .unwrap();
        assert_eq!(seen, (0, true));
        let lost = owner.lost_range().expect("fault recorded");
        assert_eq!(lost, LostRange { fault_addr: addr + 2 * 4096 + 8, start: addr, len });
        assert_eq!(owner.lost_range(), Some(lost), "stays recorded until reset");
        owner.reset();
        assert!(owner.lost_range().is_none());
        assert!(!owner.watch().lost());
        // The whole range is anonymous now: writable, zeros (the old page 0 data is gone).
        // SAFETY: still mapped (anonymous) at the same place.
        unsafe {
            assert_eq!(p.add(100).read_volatile(), 0);
            p.add(3 * 4096).write_volatile(1);
            libc::munmap(p.cast(), len);
        }
        drop(guard);
    }

    #[test]
    fn test_probe_turns_a_kernel_efault_into_a_contained_fault() {
        let owner = FaultOwner::new().unwrap();
        let len = 2 * 4096;
        let (file, p) = shared_memfd(len);
        let guard = owner.guard(p, len).unwrap();
        file.set_len(0).unwrap();
        // A kernel copy from the truncated range fails with EFAULT, no signal.
        let (r, w) = std::os::unix::net::UnixStream::pair().unwrap();
        // SAFETY: the start of our mapping, kept mapped (replaced when it faults) until the test
        // unmaps it; only the kernel and the probe touch it.
        let iov = [unsafe { IoVec::from_raw_parts(p, 64) }];
        // SAFETY: writev from our (truncated) mapping; the kernel checks the access.
        let n = unsafe { libc::writev(w.as_raw_fd(), IoVec::as_iovecs(&iov), 1) };
        assert_eq!(n, -1);
        assert_eq!(io::Error::last_os_error().raw_os_error(), Some(libc::EFAULT));
        assert!(!owner.watch().lost());
        assert!(owner.watch().probe_lost(&iov));
        assert!(owner.lost_range().is_some());
        // SAFETY: our mapping, replaced but still ours.
        unsafe { libc::munmap(p.cast(), len) };
        drop((guard, r));
    }

    /// Set in a child run of the test binary: what the child does before it should die.
    const CHILD_ENV: &str = "VUTAP_SIGBUS_CHILD";

    /// In the child: a SIGBUS outside every guarded range (a fault, or one sent with raise)
    /// must still kill the process, with the guard installed and a range registered.
    #[test]
    fn test_sigbus_child_outside_guarded_ranges() {
        let Ok(how) = std::env::var(CHILD_ENV) else {
            return;
        };
        let owner = FaultOwner::new().unwrap();
        let (guarded_file, guarded) = shared_memfd(4096);
        let _guard = owner.guard(guarded, 4096).unwrap();
        let (file, p) = shared_memfd(2 * 4096);
        file.set_len(0).unwrap();
        drop(guarded_file);
        match how.as_str() {
            // SAFETY: a read of our own (truncated, unguarded) mapping: the SIGBUS under test.
            "fault" => unsafe { std::ptr::read_volatile(p.add(4096)) },
            // SAFETY: raise(3) has no memory preconditions.
            _ => unsafe { libc::raise(libc::SIGBUS) as u8 },
        };
        eprintln!("survived a SIGBUS ({how})");
        std::process::exit(3);
    }

    #[test]
    fn test_sigbus_outside_guarded_ranges_still_kills_the_process() {
        use std::os::unix::process::ExitStatusExt;
        if std::env::var(CHILD_ENV).is_ok() {
            return;
        }
        // The child test's name as the test harness knows it: its module path without the crate.
        let child = format!("{}::test_sigbus_child_outside_guarded_ranges", module_path!().split_once("::").unwrap().1);
        for how in ["fault", "raise"] {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", &child, "--nocapture", "--test-threads=1"])
                .env(CHILD_ENV, how)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.signal(), Some(libc::SIGBUS), "{how}: {:?}\n{text}", out.status);
        }
    }
}
