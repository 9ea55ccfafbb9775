//! The state of one frontend connection: negotiated features, guest memory, the vrings, and
//! the queue-pair workers. vhost's request parser calls in here through
//! `VhostUserBackendReqHandlerMut`; a new connection gets a new `Session`.
//!
//! A queue pair runs when both its rings have been started (kick fd received) and enabled;
//! it stops on GET_VRING_BASE, disable, reset or disconnect. Its tap queue is attached only
//! while it runs.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use log::{debug, info, warn};
use vhost::vhost_user::message::*;
use vhost::vhost_user::GpuBackend;
use vhost::vhost_user::{Backend, Error as VhostError, Result as VhostResult, VhostUserBackendReqHandlerMut};
use vhost::VhostUserMemoryRegionBase;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;
use vutap_virtio::offload::tun_offload_flags;
use vutap_virtio::Features;

use crate::device::Device;
use crate::dirty_log::{DirtyLog, DirtyLogError};
use crate::mapped_fd::ShrinkSeal;
use crate::memory::{MemoryError, SharedMemory};
use crate::upgrade::state::{ChannelState, ConnectionState, LogState, RegionState, VringState};
use crate::used_ring::read_used_idx;
use crate::worker::{CallFd, RingSetup, Worker, WorkerSetup};
use vutap_virtio::resume::resume_position;

/// Largest ring vutap accepts (the split-ring maximum).
pub const MAX_QUEUE_SIZE: u16 = 32768;

fn handler_error(msg: impl Into<String>) -> VhostError {
    VhostError::ReqHandlerError(std::io::Error::new(std::io::ErrorKind::InvalidInput, msg.into()))
}

/// One virtqueue as the frontend configured it.
#[derive(Default)]
struct Vring {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    base: u16,
    kick: Option<EventFd>,
    call: CallFd,
    enabled: bool,
    /// Set by SET_VRING_KICK, cleared by GET_VRING_BASE.
    started: bool,
}

pub struct Session {
    dev: Arc<Device>,
    features: Option<Features>,
    acked_protocol: u64,
    memory: Option<SharedMemory>,
    vrings: Vec<Vring>,
    workers: Vec<Option<Worker>>,
    /// The migration log from SET_LOG_BASE; used while VHOST_F_LOG_ALL is acked.
    log: Option<Arc<DirtyLog>>,
    /// Set when the frontend handed us an fd that does not hold what it claims: the
    /// connection is closed after the reply.
    refused: Option<String>,
    /// Set while a resumed connection's request parser is taught the negotiated features (see
    /// `upgrade`): SET_FEATURES then only records them, the tap already has its offloads.
    replaying: bool,
}

impl Session {
    pub fn new(dev: Arc<Device>) -> Self {
        let pairs = dev.queue_pairs();
        Session {
            dev,
            features: None,
            acked_protocol: 0,
            memory: None,
            vrings: (0..pairs * 2).map(|_| Vring::default()).collect(),
            workers: (0..pairs).map(|_| None).collect(),
            log: None,
            refused: None,
            replaying: false,
        }
    }

    /// Why the connection must close, if the last request handed us an fd we refused to map.
    pub fn take_refusal(&mut self) -> Option<String> {
        self.refused.take()
    }

    /// Refuses a lying fd: counted, and the connection closes after the failure reply.
    fn refuse_fd(&mut self, what: String) -> VhostError {
        self.dev.device_metrics.bad_memory_fds.fetch_add(1, Ordering::Relaxed);
        let err = handler_error(what.clone());
        self.refused = Some(what);
        err
    }

    /// Broadcasts a RARP from `mac` out of the tap (VHOST_USER_SEND_RARP, sent by the frontend
    /// after a migration so that switches learn the guest's MAC on this port). Uses a queue
    /// of a running pair: a detached tap queue cannot send.
    pub fn send_rarp(&self, mac: [u8; 6]) -> Result<(), String> {
        let pair = self.workers.iter().position(Option::is_some).ok_or("no queue pair is running")?;
        let hdr_len = self.features.map_or(vutap_virtio::features::HDR_LEN, |f| f.hdr_len());
        let mut frame = vec![0u8; hdr_len];
        frame.extend_from_slice(&vutap_virtio::announce::rarp_frame(mac));
        crate::tap_io::TapIo::write_bytes(&*self.dev.queues[pair], &frame).map(|_| ()).map_err(|e| format!("tap write: {e}"))
    }

    pub fn features_acked(&self) -> bool {
        self.features.is_some()
    }

    /// The protocol features the frontend acked (SET_PROTOCOL_FEATURES), 0 before that.
    pub fn acked_protocol(&self) -> u64 {
        self.acked_protocol
    }

    fn vring(&mut self, index: u32) -> VhostResult<&mut Vring> {
        let n = self.vrings.len();
        self.vrings.get_mut(index as usize).ok_or_else(|| handler_error(format!("vring index {index} out of range (device has {n} rings)")))
    }

    /// Records an enable/disable. Called for SET_VRING_ENABLE also when it arrives before
    /// SET_FEATURES, as QEMU's virtio-net sends it; it takes effect once the ring can run.
    pub fn set_enable(&mut self, index: u32, enable: bool) -> VhostResult<()> {
        self.vring(index)?.enabled = enable;
        debug!("vring {index} {}", if enable { "enabled" } else { "disabled" });
        self.reconcile_pair(index as usize / 2);
        Ok(())
    }

    /// Whether a ring counts as enabled: without PROTOCOL_FEATURES rings are enabled once
    /// started (vhost-user spec); with it, SET_VRING_ENABLE decides.
    fn ring_enabled(&self, index: usize) -> bool {
        let protocol = self.features.is_some_and(|f| f.protocol_features());
        !protocol || self.vrings[index].enabled
    }

    fn pair_should_run(&self, pair: usize) -> bool {
        let (rx, tx) = (pair * 2, pair * 2 + 1);
        self.features.is_some()
            && self.memory.is_some()
            && self.vrings[rx].started
            && self.vrings[tx].started
            && self.ring_enabled(rx)
            && self.ring_enabled(tx)
    }

    /// Starts or stops a pair's worker to match the rings' state.
    fn reconcile_pair(&mut self, pair: usize) {
        let should_run = self.pair_should_run(pair);
        let running = self.workers[pair].is_some();
        if should_run && !running {
            if let Err(e) = self.start_pair(pair) {
                warn!("queue pair {pair}: cannot start: {e}");
            }
        } else if !should_run && running {
            self.stop_pair(pair);
        }
    }

    fn make_queue(&self, index: usize, mem: &SharedMemory) -> Result<Queue, String> {
        let v = &self.vrings[index];
        let mut q = Queue::new(MAX_QUEUE_SIZE).map_err(|e| e.to_string())?;
        q.set_size(v.size);
        q.set_desc_table_address(Some(v.desc as u32), Some((v.desc >> 32) as u32));
        q.set_avail_ring_address(Some(v.avail as u32), Some((v.avail >> 32) as u32));
        q.set_used_ring_address(Some(v.used as u32), Some((v.used >> 32) as u32));
        q.set_event_idx(self.features.is_some_and(|f| f.event_idx()));
        q.set_ready(true);
        if !q.is_valid(&mem.mem) {
            return Err(format!(
                "vring {index} is invalid (size {}, desc {:#x}, avail {:#x}, used {:#x}: not a power of two, misaligned, or outside guest memory)",
                v.size, v.desc, v.avail, v.used
            ));
        }
        // Resume from what the guest last saw, so a restarted backend neither skips nor repeats.
        let resume = resume_position(v.base, read_used_idx(&q, &mem.mem), v.size);
        if resume.retaken > 0 {
            warn!(
                "vring {index}: base {} is {} chain(s) ahead of the used index {}: resuming there (chains a previous backend left unfinished)",
                v.base, resume.retaken, resume.next_used
            );
        }
        q.set_next_avail(resume.next_avail);
        q.set_next_used(resume.next_used);
        Ok(q)
    }

    fn start_pair(&mut self, pair: usize) -> Result<(), String> {
        let mem = self.memory.clone().ok_or("no guest memory")?;
        let features = self.features.ok_or("features not negotiated")?;
        let (rx_i, tx_i) = (pair * 2, pair * 2 + 1);
        let rx_queue = self.make_queue(rx_i, &mem)?;
        let tx_queue = self.make_queue(tx_i, &mem)?;
        let dup = |v: &Vring| v.kick.as_ref().ok_or("no kick fd").and_then(|k| k.try_clone().map_err(|_| "cannot dup kick fd"));
        let rx_kick = dup(&self.vrings[rx_i])?;
        let tx_kick = dup(&self.vrings[tx_i])?;
        let tap = self.dev.queues[pair].clone();
        tap.set_attached(true).map_err(|e| e.to_string())?;
        let setup = WorkerSetup {
            pair,
            tap,
            mem: mem.mem,
            features,
            mtu: self.dev.mtu,
            rx: RingSetup { queue: rx_queue, kick: rx_kick, call: self.vrings[rx_i].call.clone() },
            tx: RingSetup { queue: tx_queue, kick: tx_kick, call: self.vrings[tx_i].call.clone() },
            metrics: self.dev.metrics[pair].clone(),
            log: if features.log_all() { self.log.clone() } else { None },
            faults: self.dev.faults.watch(),
            mem_guards: mem.guards.clone(),
        };
        let worker = Worker::spawn(setup).map_err(|e| format!("cannot spawn worker: {e}"))?;
        self.workers[pair] = Some(worker);
        info!("queue pair {pair} started");
        Ok(())
    }

    /// Stops a pair's worker and keeps the rings' positions, so GET_VRING_BASE (or a later
    /// start) resumes where it stopped. The tap queue stays attached. Returns whether it ran.
    fn halt_worker(&mut self, pair: usize) -> bool {
        let Some(worker) = self.workers[pair].take() else { return false };
        if let Some(stopped) = worker.stop() {
            self.vrings[pair * 2].base = stopped.rx.next_avail();
            self.vrings[pair * 2 + 1].base = stopped.tx.next_avail();
        }
        let counts = self.dev.metrics[pair].snapshot();
        let summary: Vec<String> = counts.fields().iter().filter(|(_, v)| *v != 0).map(|(k, v)| format!("{k}={v}")).collect();
        info!("queue pair {pair} stopped; totals: {}", summary.join(" "));
        true
    }

    /// Stops a pair for good: its worker, then its tap queue (detached, and the frames left
    /// on it dropped so that their senders can retransmit; see `TapQueue::park`).
    fn stop_pair(&mut self, pair: usize) {
        if self.halt_worker(pair) {
            self.dev.park_queue(pair);
        }
    }

    fn stop_all(&mut self) {
        for pair in 0..self.workers.len() {
            self.stop_pair(pair);
        }
    }

    /// Applies `change` with every worker halted, then starts the pairs that should run. A
    /// restart (new features, memory table, dirty log, kick fd) keeps the tap queues attached,
    /// so nothing queued meanwhile is lost; pairs that no longer run are stopped for good.
    fn restart_pairs(&mut self, pairs: std::ops::Range<usize>, change: impl FnOnce(&mut Self) -> VhostResult<()>) -> VhostResult<()> {
        let ran: Vec<bool> = pairs.clone().map(|pair| self.halt_worker(pair)).collect();
        let result = change(self);
        for (pair, ran) in pairs.zip(ran) {
            self.reconcile_pair(pair);
            if ran && self.workers[pair].is_none() {
                self.dev.park_queue(pair);
            }
        }
        result
    }

    fn restart_all(&mut self, change: impl FnOnce(&mut Self) -> VhostResult<()>) -> VhostResult<()> {
        self.restart_pairs(0..self.workers.len(), change)
    }

    /// Forgets everything the frontend set up (RESET_OWNER / RESET_DEVICE).
    fn reset(&mut self) {
        self.stop_all();
        let dev = self.dev.clone();
        *self = Session::new(dev);
    }

    fn apply_offloads(&self, features: Features) -> VhostResult<()> {
        let flags = tun_offload_flags(features);
        for q in &self.dev.queues {
            q.set_vnet_hdr_len(features.hdr_len()).map_err(|e| handler_error(e.to_string()))?;
            q.set_offload(flags).map_err(|e| handler_error(e.to_string()))?;
        }
        info!("features {:#x} acked: vnet header {} bytes, tap offloads {flags:#x}", features.bits(), features.hdr_len());
        Ok(())
    }

    fn file_to_eventfd(file: Option<File>) -> Option<EventFd> {
        // SAFETY: the fd comes from SCM_RIGHTS and is owned by `file`; ownership moves to the EventFd.
        file.map(|f| unsafe { EventFd::from_raw_fd(f.into_raw_fd()) })
    }
}

/// Live upgrade: halting, exporting and restoring a connection's state (see `upgrade`).
impl Session {
    /// Halts every running pair at a batch boundary (used index published, held RX chains
    /// given back and `next_avail` rewound over them); the tap queues stay attached.
    pub fn halt_all(&mut self) {
        for pair in 0..self.workers.len() {
            self.halt_worker(pair);
        }
    }

    /// Starts every pair that should run (after [`Session::halt_all`], or a restore).
    pub fn resume_all(&mut self) {
        for pair in 0..self.workers.len() {
            self.reconcile_pair(pair);
        }
    }

    /// The negotiated features and protocol features (for the resumed request parser).
    pub fn negotiated(&self) -> (Option<u64>, u64) {
        (self.features.map(|f| f.bits()), self.acked_protocol)
    }

    pub fn set_replaying(&mut self, on: bool) {
        self.replaying = on;
    }

    /// The state of a halted connection and dups of its fds, the first being `stream`'s.
    pub fn export(&self, stream: &UnixStream, owned: bool) -> Result<(ConnectionState, Vec<OwnedFd>), String> {
        let mut fds: Vec<OwnedFd> = Vec::new();
        let mut add = |fd: BorrowedFd<'_>| -> Result<usize, String> {
            fds.push(fd.try_clone_to_owned().map_err(|e| format!("cannot dup fd: {e}"))?);
            Ok(fds.len() - 1)
        };
        let stream_index = add(stream.as_fd())?;
        let mut memory = Vec::new();
        if let Some(m) = &self.memory {
            for r in m.regions.iter() {
                memory.push(RegionState {
                    guest_phys_addr: r.guest_phys_addr,
                    memory_size: r.memory_size,
                    user_addr: r.user_addr,
                    mmap_offset: r.mmap_offset,
                    fd: add(r.file.as_fd())?,
                });
            }
        }
        let log = match &self.log {
            Some(l) => Some(LogState { size: l.source.1, offset: l.source.2, fd: add(l.source.0.as_fd())? }),
            None => None,
        };
        let mut vrings = Vec::new();
        for v in &self.vrings {
            let kick = match &v.kick {
                Some(k) => Some(add(eventfd_as_fd(k))?),
                None => None,
            };
            let call = match v.call.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                Some(c) => Some(add(eventfd_as_fd(c))?),
                None => None,
            };
            vrings.push(VringState {
                size: v.size,
                desc: v.desc,
                avail: v.avail,
                used: v.used,
                next_avail: v.base,
                kick,
                call,
                enabled: v.enabled,
                started: v.started,
            });
        }
        let backend_channel = match self.dev.link.channel_fd() {
            Some((fd, config_acked)) => Some(ChannelState { fd: add(fd.as_fd())?, config_acked }),
            None => None,
        };
        let state = ConnectionState {
            stream: stream_index,
            owned,
            features: self.features.map(|f| f.bits()),
            acked_protocol: self.acked_protocol,
            memory,
            log,
            vrings,
            backend_channel,
        };
        Ok((state, fds))
    }

    /// Rebuilds a connection's session from an exported state; `fds` are the state's fds (each
    /// taken once). No pair runs yet and the session is replaying: see [`Session::set_replaying`].
    pub fn restore(dev: Arc<Device>, c: &ConnectionState, fds: &mut [Option<OwnedFd>]) -> Result<Session, String> {
        let mut take = |i: usize| fds.get_mut(i).and_then(Option::take).ok_or_else(|| format!("fd #{i} missing or used twice"));
        let mut session = Session::new(dev.clone());
        session.replaying = true;
        session.acked_protocol = c.acked_protocol;
        if let Some(bits) = c.features {
            session.features = Some(Features::negotiate(dev.offered_features(), bits).map_err(|e| e.to_string())?);
        }
        if !c.memory.is_empty() {
            let mut regions = Vec::new();
            let mut files = Vec::new();
            for r in &c.memory {
                regions.push(VhostUserMemoryRegion::new(r.guest_phys_addr, r.memory_size, r.user_addr, r.mmap_offset));
                files.push(File::from(take(r.fd)?));
            }
            session.memory = Some(SharedMemory::map(&regions, files, &dev.faults).map_err(|e| e.to_string())?);
        }
        if let Some(l) = &c.log {
            let file = File::from(take(l.fd)?);
            session.log = Some(Arc::new(DirtyLog::map(&file, l.size, l.offset, &dev.faults).map_err(|e| e.to_string())?));
        }
        if c.vrings.len() != session.vrings.len() {
            return Err(format!("{} rings handed over, the device has {}", c.vrings.len(), session.vrings.len()));
        }
        for (v, s) in session.vrings.iter_mut().zip(&c.vrings) {
            v.size = s.size;
            v.desc = s.desc;
            v.avail = s.avail;
            v.used = s.used;
            v.base = s.next_avail;
            v.enabled = s.enabled;
            v.started = s.started;
            v.kick = s.kick.map(&mut take).transpose()?.map(eventfd_from);
            *v.call.lock().unwrap_or_else(|p| p.into_inner()) = s.call.map(&mut take).transpose()?.map(eventfd_from);
        }
        if let Some(ch) = &c.backend_channel {
            let stream = UnixStream::from(take(ch.fd)?);
            dev.link.set_channel(Some(crate::link_state::BackendChannel { stream, config_acked: ch.config_acked }));
        }
        Ok(session)
    }
}

fn eventfd_as_fd(e: &EventFd) -> BorrowedFd<'_> {
    // SAFETY: the EventFd owns its fd and outlives the borrow.
    unsafe { BorrowedFd::borrow_raw(e.as_raw_fd()) }
}

fn eventfd_from(fd: OwnedFd) -> EventFd {
    // SAFETY: ownership of the fd (an eventfd the previous process had) moves to the EventFd.
    unsafe { EventFd::from_raw_fd(fd.into_raw_fd()) }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.stop_all();
        self.dev.detach_all();
    }
}

impl VhostUserBackendReqHandlerMut for Session {
    fn set_owner(&mut self) -> VhostResult<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> VhostResult<()> {
        self.reset();
        Ok(())
    }

    fn reset_device(&mut self) -> VhostResult<()> {
        self.reset();
        Ok(())
    }

    fn get_features(&mut self) -> VhostResult<u64> {
        Ok(self.dev.offered_features())
    }

    fn set_features(&mut self, acked: u64) -> VhostResult<()> {
        let features = Features::negotiate(self.dev.offered_features(), acked).map_err(|e| handler_error(e.to_string()))?;
        if self.replaying {
            self.features = Some(features);
            return Ok(());
        }
        // Running workers use the old header size and offloads: restart them with the new set.
        self.restart_all(|s| {
            s.apply_offloads(features)?;
            s.features = Some(features);
            Ok(())
        })
    }

    fn set_mem_table(
        &mut self,
        regions: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy: Option<bool>,
    ) -> VhostResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        if postcopy.is_some() {
            return Err(VhostError::InvalidOperation("postcopy is not supported"));
        }
        let memory = match SharedMemory::map(regions, files, &self.dev.faults) {
            Ok(m) => m,
            Err(e @ MemoryError::BadFd { .. }) => return Err(self.refuse_fd(format!("SET_MEM_TABLE refused: {e}"))),
            Err(e) => return Err(handler_error(e.to_string())),
        };
        for (index, seal) in memory.seals.iter().enumerate() {
            match seal {
                ShrinkSeal::Sealed => info!("memory region {index}: fd {}", seal.describe()),
                _ => warn!("memory region {index}: fd {}", seal.describe()),
            }
        }
        // Workers hold the old mapping; restart them on the new one.
        self.restart_all(|s| {
            s.memory = Some(memory);
            Ok(())
        })?;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VhostResult<()> {
        if num == 0 || num > u32::from(MAX_QUEUE_SIZE) || !num.is_power_of_two() {
            return Err(handler_error(format!("vring {index}: size {num} is not a power of two in 1..={MAX_QUEUE_SIZE}")));
        }
        self.vring(index)?.size = num as u16;
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VhostResult<()> {
        let mem = self.memory.as_ref().ok_or_else(|| handler_error("SET_VRING_ADDR before SET_MEM_TABLE"))?;
        let to_gpa = |a: u64| mem.vmm_to_gpa(a).map_err(|e| handler_error(format!("vring {index}: {e}")));
        let (desc, used, avail) = (to_gpa(descriptor)?, to_gpa(used)?, to_gpa(available)?);
        let v = self.vring(index)?;
        v.desc = desc;
        v.used = used;
        v.avail = avail;
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VhostResult<()> {
        let base = u16::try_from(base).map_err(|_| handler_error(format!("vring {index}: base {base} exceeds 16 bits")))?;
        self.vring(index)?.base = base;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VhostResult<VhostUserVringState> {
        self.vring(index)?;
        let pair = index as usize / 2;
        // The spec: GET_VRING_BASE stops the ring. Its pair partner stops with it (one worker
        // serves both) and resumes if the frontend starts it again.
        self.stop_pair(pair);
        let v = &mut self.vrings[index as usize];
        v.started = false;
        v.kick = None;
        Ok(VhostUserVringState::new(index, u32::from(v.base)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VhostResult<()> {
        let kick = Self::file_to_eventfd(fd).ok_or_else(|| handler_error("polling mode (no kick fd) is not supported"))?;
        let pair = index as usize / 2;
        self.vring(u32::from(index))?;
        self.restart_pairs(pair..pair + 1, |s| {
            let v = &mut s.vrings[usize::from(index)];
            v.kick = Some(kick);
            v.started = true;
            Ok(())
        })
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VhostResult<()> {
        let call = Self::file_to_eventfd(fd);
        let v = self.vring(u32::from(index))?;
        *v.call.lock().unwrap_or_else(|p| p.into_inner()) = call;
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> VhostResult<()> {
        self.vring(u32::from(index))?;
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VhostResult<VhostUserProtocolFeatures> {
        Ok(VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::RESET_DEVICE
            | VhostUserProtocolFeatures::LOG_SHMFD
            // SEND_RARP is taken by vhost_user.rs: the migrated guest's announce.
            | VhostUserProtocolFeatures::RARP
            // The channel itself is taken by vhost_user.rs (link-state config changes).
            | VhostUserProtocolFeatures::BACKEND_REQ)
    }

    fn set_protocol_features(&mut self, features: u64) -> VhostResult<()> {
        self.acked_protocol = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> VhostResult<u64> {
        Ok(self.dev.queue_pairs() as u64 * 2)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VhostResult<()> {
        self.set_enable(index, enable)
    }

    fn get_config(&mut self, offset: u32, size: u32, _flags: VhostUserConfigFlags) -> VhostResult<Vec<u8>> {
        self.dev.config().read(offset, size).map_err(|e| handler_error(e.to_string()))
    }

    fn set_config(&mut self, offset: u32, buf: &[u8], _flags: VhostUserConfigFlags) -> VhostResult<()> {
        // The config space is read-only for vutap (the MAC is the tap's); accept and ignore.
        debug!("ignoring SET_CONFIG of {} bytes at {offset}", buf.len());
        Ok(())
    }

    fn set_backend_req_fd(&mut self, _backend: Backend) {}

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VhostResult<()> {
        Err(VhostError::InvalidOperation("not a GPU device"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VhostResult<File> {
        Err(VhostError::InvalidOperation("shared objects are not supported"))
    }

    fn get_inflight_fd(&mut self, _inflight: &VhostUserInflight) -> VhostResult<(VhostUserInflight, File)> {
        Err(VhostError::InvalidOperation("inflight tracking is not supported"))
    }

    fn set_inflight_fd(&mut self, _inflight: &VhostUserInflight, _file: File) -> VhostResult<()> {
        Err(VhostError::InvalidOperation("inflight tracking is not supported"))
    }

    fn get_max_mem_slots(&mut self) -> VhostResult<u64> {
        Err(VhostError::InvalidOperation("memory slots are not supported"))
    }

    fn add_mem_region(
        &mut self,
        _region: &VhostUserSingleMemoryRegion,
        _fd: File,
        _postcopy: Option<bool>,
    ) -> VhostResult<Option<VhostUserMemoryRegionBase>> {
        Err(VhostError::InvalidOperation("memory slots are not supported"))
    }

    fn remove_mem_region(&mut self, _region: &VhostUserSingleMemoryRegion) -> VhostResult<()> {
        Err(VhostError::InvalidOperation("memory slots are not supported"))
    }

    fn set_device_state_fd(
        &mut self,
        _d: VhostTransferStateDirection,
        _p: VhostTransferStatePhase,
        _fd: File,
    ) -> VhostResult<Option<File>> {
        Err(VhostError::InvalidOperation("device state transfer is not supported"))
    }

    fn check_device_state(&mut self) -> VhostResult<()> {
        Err(VhostError::InvalidOperation("device state transfer is not supported"))
    }

    fn get_shmem_config(&mut self) -> VhostResult<VhostUserShMemConfig> {
        Err(VhostError::InvalidOperation("shared memory regions are not supported"))
    }

    fn set_log_base(&mut self, log: &VhostUserLog, file: File) -> VhostResult<()> {
        let (size, offset) = (log.mmap_size, log.mmap_offset);
        let mapped = match DirtyLog::map(&file, size, offset, &self.dev.faults) {
            Ok(l) => l,
            Err(e @ DirtyLogError::BadFd(_)) => return Err(self.refuse_fd(format!("SET_LOG_BASE refused ({size} bytes at {offset}): {e}"))),
            Err(e) => return Err(handler_error(format!("SET_LOG_BASE ({size} bytes at {offset}): {e}"))),
        };
        info!("dirty log mapped: {size} bytes, fd {}", mapped.seal.describe());
        // Workers hold the previous log (the frontend resizes it as memory grows): restart them.
        self.restart_all(|s| {
            s.log = Some(Arc::new(mapped));
            Ok(())
        })
    }
}
