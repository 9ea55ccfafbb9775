//! A hostile or buggy frontend: sequences of vhost-user messages, fds included, into
//! `serve_connection` over a socketpair, one connection per input. Messages are mostly
//! well-formed with fuzzed values (memfds of random sizes and declared sizes, eventfds, a
//! backend-request socket, ring addresses inside and outside the table), sometimes raw
//! (any code, flags, size, body, fd count). Half the inputs start with QEMU's set-up order so
//! queue pairs really start, and the fuzzer then kicks the workers and scribbles on the rings
//! in the shared memfds while they run.
//!
//! The device is a real multi-queue tap, opened once per process (the fuzzer runs as root):
//! `Device` holds concrete `TapQueue`s and the session drives their ioctls (vnet header size,
//! offloads, attach/detach), which a mock would not check. It is non-persistent and stays down,
//! so it vanishes with the process and carries no traffic.
//!
//! Checked: no panic or overflow anywhere (connection thread, workers), the connection always
//! ends once the frontend closes, and it leaves no fd behind.
#![no_main]

use std::fs::File;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use vhost::vhost_user::message::{FrontendReq as R, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vmm_sys_util::eventfd::EventFd;
use vutap::control::device::Device;
use vutap::control::wire::{self, Header};
use vutap::tap::{Tap, TapSpec};
use vutap_virtio::features::offered_features;

const VERSION: u32 = wire::VERSION_1;
const NEED_REPLY: u32 = VhostUserHeaderFlag::NEED_REPLY.bits();
/// Where the frontend pretends region `i` lives in its own address space.
const USER_BASE: u64 = 0x7f00_0000_0000;
const USER_STRIDE: u64 = 0x1000_0000;
const RING_PAIRS: u32 = 2;
const PROTOCOL_FEATURES: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
/// What QEMU's virtio-net negotiates.
const QEMU_PROTOCOL: u64 = VhostUserProtocolFeatures::MQ
    .union(VhostUserProtocolFeatures::REPLY_ACK)
    .union(VhostUserProtocolFeatures::BACKEND_REQ)
    .union(VhostUserProtocolFeatures::CONFIG)
    .union(VhostUserProtocolFeatures::RESET_DEVICE)
    .union(VhostUserProtocolFeatures::LOG_SHMFD)
    .union(VhostUserProtocolFeatures::RARP)
    .bits();
/// Raw request codes are drawn up to here: vhost's last code (GET_SHMEM_CONFIG) and two unknown.
const LAST_CODE: u32 = 45;

/// The device every connection of this process is served on.
fn device() -> Arc<Device> {
    static DEVICE: OnceLock<Arc<Device>> = OnceLock::new();
    DEVICE
        .get_or_init(|| {
            let name = format!("vfz{}", std::process::id());
            let tap = Tap::open(&TapSpec::Name(name), RING_PAIRS as usize).expect("open a tap (run as root)");
            Arc::new(Device::new(tap, [0x52, 0x54, 0, 0x12, 0x34, 0x56], 1500).expect("device"))
        })
        .clone()
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

fn memfd(len: u64) -> File {
    // SAFETY: memfd_create with a static NUL-terminated name; the fd is checked, then owned by
    // the File.
    let fd = unsafe { libc::memfd_create(c"vutap-fuzz-mem".as_ptr(), 0) };
    assert!(fd >= 0, "memfd_create failed");
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len).expect("memfd set_len");
    file
}

/// Sends one message (header + body in one sendmsg, fds as SCM_RIGHTS). False once the
/// backend has closed the connection.
fn send(stream: &UnixStream, code: impl Into<u32>, flags: u32, size: u32, body: &[u8], fds: &[RawFd]) -> bool {
    wire::send(stream, &Header::raw(code.into(), flags, size), body, fds).is_ok()
}

fn u64_body(v: u64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

fn state_body(index: u32, num: u32) -> Vec<u8> {
    let mut b = index.to_le_bytes().to_vec();
    b.extend_from_slice(&num.to_le_bytes());
    b
}

/// What the fuzzed frontend holds on to during one connection.
struct Frontend {
    stream: UnixStream,
    /// The last memory table's files and where the frontend says they are mapped.
    regions: Vec<(File, u64, u64)>,
    kicks: Vec<EventFd>,
    /// Call and error eventfds and fds sent where none belongs.
    events: Vec<EventFd>,
    /// Everything else it passed (log files, channel ends), closed at the end.
    keep: Vec<OwnedFd>,
}

impl Frontend {
    fn ring_index(u: &mut Unstructured) -> Result<u32> {
        Ok(if u.ratio(1, 16)? { u.arbitrary()? } else { u.int_in_range(0..=2 * RING_PAIRS - 1)? })
    }

    fn flags(u: &mut Unstructured) -> Result<u32> {
        Ok(match u.int_in_range(0u8..=15)? {
            0 => u.arbitrary()?,
            1..=5 => VERSION | NEED_REPLY,
            _ => VERSION,
        })
    }

    /// A frontend address: inside a mapped region (aligned or not), or anywhere.
    fn user_addr(&self, u: &mut Unstructured) -> Result<u64> {
        if self.regions.is_empty() || u.ratio(1, 16)? {
            return u.arbitrary();
        }
        let i = u.choose_index(self.regions.len())?;
        let (_, user, size) = &self.regions[i];
        let off = u.int_in_range(0..=size.saturating_add(0x10))?;
        Ok(user.wrapping_add(if u.ratio(7, 8)? { off & !0xf } else { off }))
    }

    fn eventfd(&mut self) -> RawFd {
        let e = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let fd = e.as_raw_fd();
        self.events.push(e);
        fd
    }

    /// A memory table: 0 to 9 memfds of random sizes, declared sizes and offsets that mostly
    /// but not always match the files, guest addresses adjacent, apart or overlapping.
    fn mem_table(&mut self, u: &mut Unstructured) -> Result<(Vec<u8>, Vec<RawFd>)> {
        let n: u32 = if u.ratio(1, 8)? { u.int_in_range(0..=9)? } else { u.int_in_range(1..=2)? };
        let mut body = n.to_le_bytes().to_vec();
        body.extend_from_slice(&0u32.to_le_bytes());
        let mut regions = Vec::new();
        let mut gpa = 0u64;
        for i in 0..u64::from(n) {
            let file_len =
                u64::from(u.int_in_range(1u32..=64)?) * 0x1000 + if u.ratio(1, 8)? { u64::from(u.arbitrary::<u16>()?) } else { 0 };
            let file = memfd(file_len);
            let fill_len = u.int_in_range(0..=2048)?;
            let fill = u.bytes(fill_len)?;
            file.write_all_at(fill, 0).expect("memfd write");
            let (size, offset) = match u.int_in_range(0u8..=9)? {
                0 => (file_len + u64::from(u.int_in_range(1u32..=0x10_0000)?), 0),
                1 => (u.arbitrary()?, u.arbitrary()?),
                2 => (file_len / 2, u64::from(u.int_in_range(0u32..=0x10)?) * 0x1000),
                _ => (file_len, 0),
            };
            gpa = match u.int_in_range(0u8..=7)? {
                0 => u.arbitrary()?,
                1 => gpa.wrapping_sub(0x1000),
                2 => gpa.wrapping_add(0x10_0000),
                _ => gpa,
            };
            let user = USER_BASE + i * USER_STRIDE;
            for v in [gpa, size, user, offset] {
                body.extend_from_slice(&v.to_le_bytes());
            }
            gpa = gpa.wrapping_add(size);
            regions.push((file, user, size));
        }
        let mut fds: Vec<RawFd> = regions.iter().map(|r| r.0.as_raw_fd()).collect();
        if u.ratio(1, 16)? {
            fds.pop();
        } else if u.ratio(1, 16)? {
            let extra = self.eventfd();
            fds.push(extra);
        }
        self.regions = regions;
        Ok((body, fds))
    }

    /// One message chosen and filled in by the input. Returns false once the backend is gone.
    fn step(&mut self, u: &mut Unstructured) -> Result<bool> {
        let mut fds = Vec::new();
        let (code, body): (u32, Vec<u8>) = match u.int_in_range(0u8..=27)? {
            0 => (R::GET_FEATURES.into(), vec![]),
            1 => {
                let f: u64 = u.arbitrary()?;
                (R::SET_FEATURES.into(), u64_body(if u.ratio(3, 4)? { f & (offered_features() | PROTOCOL_FEATURES) } else { f }))
            }
            2 => (R::SET_OWNER.into(), vec![]),
            3 => (R::RESET_OWNER.into(), vec![]),
            4 => {
                let (body, table_fds) = self.mem_table(u)?;
                fds = table_fds;
                (R::SET_MEM_TABLE.into(), body)
            }
            5 => {
                let len = u64::from(u.int_in_range(0u32..=16)?) * 0x1000 + if u.ratio(1, 8)? { 1 } else { 0 };
                let file = memfd(len);
                let size = if u.ratio(3, 4)? { len } else { u.arbitrary()? };
                let offset: u64 = if u.ratio(3, 4)? { 0 } else { u.arbitrary()? };
                fds.push(file.as_raw_fd());
                self.keep.push(file.into());
                let mut body = u64_body(size);
                body.extend_from_slice(&offset.to_le_bytes());
                (R::SET_LOG_BASE.into(), body)
            }
            6 => {
                fds.push(self.eventfd());
                (R::SET_LOG_FD.into(), u64_body(0))
            }
            7 => {
                let num = if u.ratio(7, 8)? { 1u32 << u.int_in_range(0..=15)? } else { u.arbitrary()? };
                (R::SET_VRING_NUM.into(), state_body(Self::ring_index(u)?, num))
            }
            8 => {
                let mut body = Self::ring_index(u)?.to_le_bytes().to_vec();
                body.extend_from_slice(&0u32.to_le_bytes());
                for _ in 0..3 {
                    body.extend_from_slice(&self.user_addr(u)?.to_le_bytes());
                }
                body.extend_from_slice(&0u64.to_le_bytes());
                (R::SET_VRING_ADDR.into(), body)
            }
            9 => {
                let base = if u.ratio(7, 8)? { u32::from(u.arbitrary::<u16>()?) } else { u.arbitrary()? };
                (R::SET_VRING_BASE.into(), state_body(Self::ring_index(u)?, base))
            }
            10 => (R::GET_VRING_BASE.into(), state_body(Self::ring_index(u)?, 0)),
            11..=13 => {
                let code = [R::SET_VRING_KICK, R::SET_VRING_CALL, R::SET_VRING_ERR][usize::from(u.int_in_range(0u8..=2)?)];
                let index = Self::ring_index(u)? & 0xff;
                let no_fd = u.ratio(1, 16)?;
                if !no_fd || u.ratio(1, 4)? {
                    if code == R::SET_VRING_KICK {
                        let kick = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
                        fds.push(kick.as_raw_fd());
                        self.kicks.push(kick);
                    } else {
                        fds.push(self.eventfd());
                    }
                }
                (code.into(), u64_body(u64::from(index) | if no_fd { 0x100 } else { 0 }))
            }
            14 => (R::GET_PROTOCOL_FEATURES.into(), vec![]),
            15 => {
                let f = if u.ratio(3, 4)? { QEMU_PROTOCOL & u.arbitrary::<u64>()? } else { u.arbitrary()? };
                (R::SET_PROTOCOL_FEATURES.into(), u64_body(f))
            }
            16 => (R::GET_QUEUE_NUM.into(), vec![]),
            17 => {
                let num = if u.ratio(7, 8)? { u32::from(u.arbitrary::<bool>()?) } else { u.arbitrary()? };
                (R::SET_VRING_ENABLE.into(), state_body(Self::ring_index(u)?, num))
            }
            18 => (R::SEND_RARP.into(), u64_body(u.arbitrary()?)),
            19 => {
                let (ours, theirs) = UnixStream::pair().expect("socketpair");
                fds.push(theirs.as_raw_fd());
                self.keep.push(ours.into());
                self.keep.push(theirs.into());
                (R::SET_BACKEND_REQ_FD.into(), vec![])
            }
            20 | 21 => {
                let offset: u32 = if u.ratio(3, 4)? { u.int_in_range(0..=32)? } else { u.arbitrary()? };
                let size: u32 = if u.ratio(3, 4)? { u.int_in_range(0..=32)? } else { u.arbitrary()? };
                let mut body = [offset, size, u.int_in_range(0..=1)?].iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
                body.extend(std::iter::repeat_n(0u8, size.min(0x100) as usize));
                (if u.arbitrary()? { R::GET_CONFIG } else { R::SET_CONFIG }.into(), body)
            }
            22 => (if u.arbitrary()? { R::RESET_DEVICE } else { R::GET_MAX_MEM_SLOTS }.into(), vec![]),
            23 => {
                let code = u.int_in_range(0..=LAST_CODE)?;
                let body_len = u.int_in_range(0..=64)?;
                let body = u.bytes(body_len)?.to_vec();
                for _ in 0..u.int_in_range(0..=2)? {
                    fds.push(self.eventfd());
                }
                (code, body)
            }
            24 | 25 => {
                // The guest rings a doorbell: wake a worker if one runs.
                if !self.kicks.is_empty() {
                    let i = u.choose_index(self.kicks.len())?;
                    let _ = self.kicks[i].write(1);
                }
                return Ok(true);
            }
            _ => {
                // The guest writes into its memory (rings, descriptors, buffers) meanwhile.
                if !self.regions.is_empty() {
                    let i = u.choose_index(self.regions.len())?;
                    let file_len = self.regions[i].0.metadata().map(|m| m.len()).unwrap_or(0);
                    let at = u.int_in_range(0..=file_len.saturating_sub(1))?;
                    let bytes_len = u.int_in_range(0..=64)?;
                    let bytes = u.bytes(bytes_len)?;
                    let n = bytes.len().min(file_len.saturating_sub(at) as usize);
                    let _ = self.regions[i].0.write_all_at(&bytes[..n], at);
                }
                return Ok(true);
            }
        };
        let flags = Self::flags(u)?;
        let size = if u.ratio(1, 32)? { u.int_in_range(0..=0x1100)? } else { body.len() as u32 };
        Ok(send(&self.stream, code, flags, size, &body, &fds))
    }

    /// QEMU's order up to running queue pairs, with values from the input: owner, features,
    /// protocol features, one memfd region, and for every ring size, addresses, base, call,
    /// kick and enable.
    fn qemu_setup(&mut self, u: &mut Unstructured) -> Result<bool> {
        let mem_len: u64 = u64::from(u.int_in_range(4u32..=64)?) * 0x1000;
        let file = memfd(mem_len);
        let fill_len = u.int_in_range(0..=4096)?;
        let fill = u.bytes(fill_len)?;
        file.write_all_at(fill, 0).expect("memfd write");
        let mut ok = send(&self.stream, R::SET_OWNER, VERSION, 0, &[], &[]);
        let features = (offered_features() & u.arbitrary::<u64>()?) | (1 << 32) | PROTOCOL_FEATURES;
        ok &= send(&self.stream, R::SET_PROTOCOL_FEATURES, VERSION, 8, &u64_body(QEMU_PROTOCOL), &[]);
        ok &= send(&self.stream, R::SET_FEATURES, VERSION, 8, &u64_body(features), &[]);
        let mut table = 1u32.to_le_bytes().to_vec();
        table.extend_from_slice(&0u32.to_le_bytes());
        for v in [0, mem_len, USER_BASE, 0] {
            table.extend_from_slice(&v.to_le_bytes());
        }
        ok &= send(&self.stream, R::SET_MEM_TABLE, VERSION | NEED_REPLY, table.len() as u32, &table, &[file.as_raw_fd()]);
        self.regions = vec![(file, USER_BASE, mem_len)];
        for index in 0..2 * u32::from(u.int_in_range(1u8..=2)?) {
            let size: u32 = 1 << u.int_in_range(0..=8)?;
            ok &= send(&self.stream, R::SET_VRING_NUM, VERSION, 8, &state_body(index, size), &[]);
            let mut addr = index.to_le_bytes().to_vec();
            addr.extend_from_slice(&0u32.to_le_bytes());
            let ring_base = USER_BASE + u64::from(u.int_in_range(0u32..=(mem_len as u32 / 0x1000 - 3))?) * 0x1000;
            for v in [ring_base, ring_base + 0x2000, ring_base + 0x1000, 0] {
                addr.extend_from_slice(&v.to_le_bytes());
            }
            ok &= send(&self.stream, R::SET_VRING_ADDR, VERSION, 40, &addr, &[]);
            ok &= send(&self.stream, R::SET_VRING_BASE, VERSION, 8, &state_body(index, 0), &[]);
            let call = self.eventfd();
            ok &= send(&self.stream, R::SET_VRING_CALL, VERSION, 8, &u64_body(u64::from(index)), &[call]);
            let kick = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
            ok &= send(&self.stream, R::SET_VRING_KICK, VERSION, 8, &u64_body(u64::from(index)), &[kick.as_raw_fd()]);
            self.kicks.push(kick);
            ok &= send(&self.stream, R::SET_VRING_ENABLE, VERSION, 8, &state_body(index, 1), &[]);
        }
        Ok(ok)
    }
}

fn run(u: &mut Unstructured, frontend: &mut Frontend) -> Result<()> {
    if u.arbitrary()? && !frontend.qemu_setup(u)? {
        return Ok(());
    }
    for _ in 0..48 {
        if u.is_empty() || !frontend.step(u)? {
            break;
        }
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let dev = device();
    let fds_before = open_fds();
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let server_dev = dev.clone();
    let server = std::thread::spawn(move || vutap::control::vhost_user::serve_connection(theirs, server_dev));
    // Replies are read (and dropped) all along, so the backend never blocks on a full socket.
    let mut reader = ours.try_clone().expect("dup socket");
    let drain = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while matches!(reader.read(&mut buf), Ok(n) if n > 0) {}
    });
    let mut frontend = Frontend { stream: ours, regions: Vec::new(), kicks: Vec::new(), events: Vec::new(), keep: Vec::new() };
    let _ = run(&mut Unstructured::new(data), &mut frontend);
    // The frontend hangs up: the backend must end the connection and let go of everything.
    let _ = frontend.stream.shutdown(Shutdown::Write);
    let _end = server.join().expect("connection thread panicked");
    dev.link.set_channel(None);
    drain.join().expect("reader thread");
    let _ = frontend.stream.flush();
    drop(frontend);
    assert_eq!(open_fds(), fds_before, "fds left open after the connection ended");
});
