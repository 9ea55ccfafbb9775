//! The state of one frontend connection: negotiated features, guest memory, the vrings, and
//! the queue-pair workers. vhost's request parser calls in here through
//! `VhostUserBackendReqHandlerMut`; a new connection gets a new `Session`.
//!
//! A queue pair runs when both its rings have been started (kick fd received) and enabled;
//! it stops on GET_VRING_BASE, disable, reset or disconnect. Its tap queue is attached only
//! while it runs.
//!
//! Generic over the device's tap queues ([`TapControl`]): the unit tests below drive a session
//! over a mock tap and memfd-backed guest memory, as a frontend would, without root.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use log::{debug, info, warn};
use thiserror::Error;
use vhost::vhost_user::message::*;
use vhost::vhost_user::GpuBackend;
use vhost::vhost_user::{Backend, Error as VhostError, Result as VhostResult, VhostUserBackendReqHandlerMut};
use vhost::VhostUserMemoryRegionBase;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;
use vutap_virtio::offload::tun_offload_flags;
use vutap_virtio::Features;

use crate::control::device::Device;
use crate::control::mapped_fd::ShrinkSeal;
use crate::control::memory::{MemoryError, SharedMemory};
use crate::datapath::dirty_log::{DirtyLog, DirtyLogError};
use crate::datapath::tap_io::TapControl;
use crate::datapath::used_ring::read_used_idx;
use crate::datapath::worker::{CallFd, RingSetup, Worker, WorkerSetup};
use crate::operations::upgrade::state::{ChannelState, ConnectionState, LogState, RegionState, VringState};
use crate::tap::{TapError, TapQueue};
use vutap_virtio::resume::resume_position;
use vutap_virtio::{ConfigError, FeatureError};

/// Largest ring vutap accepts (the split-ring maximum).
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// What a frontend request (or a live upgrade's export/restore) failed on.
#[derive(Debug, Error)]
pub enum SessionError {
    #[error("vring index {index} out of range (device has {rings} rings)")]
    VringIndex { index: u32, rings: usize },
    #[error("vring {index}: size {size} is not a power of two in 1..={MAX_QUEUE_SIZE}")]
    VringSize { index: u32, size: u32 },
    #[error("vring {index}: base {base} exceeds 16 bits")]
    VringBase { index: u32, base: u32 },
    #[error("SET_VRING_ADDR before SET_MEM_TABLE")]
    AddrBeforeMemTable,
    #[error("vring {index}: {source}")]
    VringAddr {
        index: u32,
        #[source]
        source: MemoryError,
    },
    #[error(
        "vring {index} is invalid (size {size}, desc {desc:#x}, avail {avail:#x}, used {used:#x}: not a power of two, misaligned, or outside guest memory)"
    )]
    InvalidVring { index: usize, size: u16, desc: u64, avail: u64, used: u64 },
    #[error("cannot build vring {index}: {source}")]
    Queue {
        index: usize,
        #[source]
        source: virtio_queue::Error,
    },
    #[error("polling mode (no kick fd) is not supported")]
    NoKickFd,
    #[error("no guest memory")]
    NoMemory,
    #[error("features not negotiated")]
    NoFeatures,
    #[error("no kick fd")]
    NotStarted,
    #[error("cannot dup kick fd: {0}")]
    DupKick(#[source] std::io::Error),
    #[error("cannot spawn worker: {0}")]
    SpawnWorker(#[source] std::io::Error),
    #[error(transparent)]
    Features(#[from] FeatureError),
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("SET_MEM_TABLE refused: {0}")]
    MemTableRefused(#[source] MemoryError),
    #[error("SET_LOG_BASE refused ({size} bytes at {offset}): {source}")]
    LogRefused {
        size: u64,
        offset: u64,
        #[source]
        source: DirtyLogError,
    },
    #[error("SET_LOG_BASE ({size} bytes at {offset}): {source}")]
    LogMap {
        size: u64,
        offset: u64,
        #[source]
        source: DirtyLogError,
    },
    #[error("no queue pair is running")]
    NoPairRunning,
    #[error("tap write: {0}")]
    TapWrite(#[source] std::io::Error),
    #[error("cannot dup fd: {0}")]
    DupFd(#[source] std::io::Error),
    #[error("fd #{0} missing or used twice")]
    FdMissing(usize),
    #[error("{given} rings handed over, the device has {device}")]
    RingCount { given: usize, device: usize },
    #[error("cannot map the dirty log: {0}")]
    RestoreLog(#[source] DirtyLogError),
}

/// The vhost crate's error for a failed request: the only place a [`SessionError`] is converted.
impl From<SessionError> for VhostError {
    fn from(e: SessionError) -> VhostError {
        VhostError::ReqHandlerError(std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
    }
}

type SessionResult<T> = Result<T, SessionError>;

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

pub struct Session<T: TapControl = TapQueue> {
    dev: Arc<Device<T>>,
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

impl<T: TapControl> Session<T> {
    pub fn new(dev: Arc<Device<T>>) -> Self {
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
    fn refuse_fd(&mut self, refusal: SessionError) -> SessionError {
        self.dev.device_metrics.bad_memory_fds.fetch_add(1, Ordering::Relaxed);
        self.refused = Some(refusal.to_string());
        refusal
    }

    /// Broadcasts a RARP from `mac` out of the tap (VHOST_USER_SEND_RARP, sent by the frontend
    /// after a migration so that switches learn the guest's MAC on this port). Uses a queue
    /// of a running pair: a detached tap queue cannot send.
    pub fn send_rarp(&self, mac: [u8; 6]) -> SessionResult<()> {
        let pair = self.workers.iter().position(Option::is_some).ok_or(SessionError::NoPairRunning)?;
        let hdr_len = self.features.map_or(vutap_virtio::features::HDR_LEN, |f| f.hdr_len());
        let mut frame = vec![0u8; hdr_len];
        frame.extend_from_slice(&vutap_virtio::announce::rarp_frame(mac));
        self.dev.queues[pair].write_bytes(&frame).map(|_| ()).map_err(SessionError::TapWrite)
    }

    pub fn features_acked(&self) -> bool {
        self.features.is_some()
    }

    /// The protocol features the frontend acked (SET_PROTOCOL_FEATURES), 0 before that.
    pub fn acked_protocol(&self) -> u64 {
        self.acked_protocol
    }

    fn vring(&mut self, index: u32) -> SessionResult<&mut Vring> {
        let rings = self.vrings.len();
        self.vrings.get_mut(index as usize).ok_or(SessionError::VringIndex { index, rings })
    }

    /// Records an enable/disable. Called for SET_VRING_ENABLE also when it arrives before
    /// SET_FEATURES, as QEMU's virtio-net sends it; it takes effect once the ring can run.
    pub fn set_enable(&mut self, index: u32, enable: bool) -> SessionResult<()> {
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

    fn make_queue(&self, index: usize, mem: &SharedMemory) -> SessionResult<Queue> {
        let v = &self.vrings[index];
        let mut q = Queue::new(MAX_QUEUE_SIZE).map_err(|source| SessionError::Queue { index, source })?;
        q.set_size(v.size);
        q.set_desc_table_address(Some(v.desc as u32), Some((v.desc >> 32) as u32));
        q.set_avail_ring_address(Some(v.avail as u32), Some((v.avail >> 32) as u32));
        q.set_used_ring_address(Some(v.used as u32), Some((v.used >> 32) as u32));
        q.set_event_idx(self.features.is_some_and(|f| f.event_idx()));
        q.set_ready(true);
        if !q.is_valid(&mem.mem) {
            return Err(SessionError::InvalidVring { index, size: v.size, desc: v.desc, avail: v.avail, used: v.used });
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

    fn start_pair(&mut self, pair: usize) -> SessionResult<()> {
        let mem = self.memory.clone().ok_or(SessionError::NoMemory)?;
        let features = self.features.ok_or(SessionError::NoFeatures)?;
        let (rx_i, tx_i) = (pair * 2, pair * 2 + 1);
        let rx_queue = self.make_queue(rx_i, &mem)?;
        let tx_queue = self.make_queue(tx_i, &mem)?;
        let dup = |v: &Vring| v.kick.as_ref().ok_or(SessionError::NotStarted)?.try_clone().map_err(SessionError::DupKick);
        let rx_kick = dup(&self.vrings[rx_i])?;
        let tx_kick = dup(&self.vrings[tx_i])?;
        let tap = self.dev.queues[pair].clone();
        tap.set_attached(true)?;
        let setup = WorkerSetup {
            pair,
            tap,
            mem: mem.mem,
            features,
            mtu: self.dev.mtu,
            rx: RingSetup { queue: rx_queue, kick: rx_kick, call: self.vrings[rx_i].call.clone() },
            tx: RingSetup { queue: tx_queue, kick: tx_kick, call: self.vrings[tx_i].call.clone() },
            metrics: self.dev.metrics[pair].clone(),
            policy: self.dev.policy,
            log: if features.log_all() { self.log.clone() } else { None },
            faults: self.dev.faults.watch(),
            mem_guards: mem.guards.clone(),
        };
        let worker = Worker::spawn(setup).map_err(SessionError::SpawnWorker)?;
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
    fn restart_pairs(&mut self, pairs: std::ops::Range<usize>, change: impl FnOnce(&mut Self) -> SessionResult<()>) -> SessionResult<()> {
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

    fn restart_all(&mut self, change: impl FnOnce(&mut Self) -> SessionResult<()>) -> SessionResult<()> {
        self.restart_pairs(0..self.workers.len(), change)
    }

    /// Forgets everything the frontend set up (RESET_OWNER / RESET_DEVICE).
    fn reset(&mut self) {
        self.stop_all();
        let dev = self.dev.clone();
        *self = Session::new(dev);
    }

    fn apply_offloads(&self, features: Features) -> SessionResult<()> {
        let flags = tun_offload_flags(features);
        for q in &self.dev.queues {
            q.set_vnet_hdr_len(features.hdr_len())?;
            q.set_offload(flags)?;
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
impl<T: TapControl> Session<T> {
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
    pub fn export(&self, stream: &UnixStream, owned: bool) -> SessionResult<(ConnectionState, Vec<OwnedFd>)> {
        let mut fds: Vec<OwnedFd> = Vec::new();
        let mut add = |fd: BorrowedFd<'_>| -> SessionResult<usize> {
            fds.push(fd.try_clone_to_owned().map_err(SessionError::DupFd)?);
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
    pub fn restore(dev: Arc<Device<T>>, c: &ConnectionState, fds: &mut [Option<OwnedFd>]) -> SessionResult<Self> {
        let mut take = |i: usize| fds.get_mut(i).and_then(Option::take).ok_or(SessionError::FdMissing(i));
        let mut session = Session::new(dev.clone());
        session.replaying = true;
        session.acked_protocol = c.acked_protocol;
        if let Some(bits) = c.features {
            session.features = Some(Features::negotiate(dev.offered_features(), bits)?);
        }
        if !c.memory.is_empty() {
            let mut regions = Vec::new();
            let mut files = Vec::new();
            for r in &c.memory {
                regions.push(VhostUserMemoryRegion::new(r.guest_phys_addr, r.memory_size, r.user_addr, r.mmap_offset));
                files.push(File::from(take(r.fd)?));
            }
            session.memory = Some(SharedMemory::map(&regions, files, &dev.faults)?);
        }
        if let Some(l) = &c.log {
            let file = File::from(take(l.fd)?);
            session.log = Some(Arc::new(DirtyLog::map(&file, l.size, l.offset, &dev.faults).map_err(SessionError::RestoreLog)?));
        }
        if c.vrings.len() != session.vrings.len() {
            return Err(SessionError::RingCount { given: c.vrings.len(), device: session.vrings.len() });
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
            dev.link.set_channel(Some(crate::control::link_state::BackendChannel { stream, config_acked: ch.config_acked }));
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

impl<T: TapControl> Drop for Session<T> {
    fn drop(&mut self) {
        self.stop_all();
        self.dev.detach_all();
    }
}

/// The vhost crate's request parser calls in here; [`SessionError`] becomes its error here only.
impl<T: TapControl> VhostUserBackendReqHandlerMut for Session<T> {
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
        let features = Features::negotiate(self.dev.offered_features(), acked).map_err(SessionError::from)?;
        if self.replaying {
            self.features = Some(features);
            return Ok(());
        }
        // Running workers use the old header size and offloads: restart them with the new set.
        Ok(self.restart_all(|s| {
            s.apply_offloads(features)?;
            s.features = Some(features);
            Ok(())
        })?)
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
            Err(e @ MemoryError::BadFd { .. }) => return Err(self.refuse_fd(SessionError::MemTableRefused(e)).into()),
            Err(e) => return Err(SessionError::from(e).into()),
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
            return Err(SessionError::VringSize { index, size: num }.into());
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
        let mem = self.memory.as_ref().ok_or(SessionError::AddrBeforeMemTable)?;
        let to_gpa = |a: u64| mem.vmm_to_gpa(a).map_err(|source| SessionError::VringAddr { index, source });
        let (desc, used, avail) = (to_gpa(descriptor)?, to_gpa(used)?, to_gpa(available)?);
        let v = self.vring(index)?;
        v.desc = desc;
        v.used = used;
        v.avail = avail;
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VhostResult<()> {
        let base = u16::try_from(base).map_err(|_| SessionError::VringBase { index, base })?;
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
        let kick = Self::file_to_eventfd(fd).ok_or(SessionError::NoKickFd)?;
        let pair = index as usize / 2;
        self.vring(u32::from(index))?;
        Ok(self.restart_pairs(pair..pair + 1, |s| {
            let v = &mut s.vrings[usize::from(index)];
            v.kick = Some(kick);
            v.started = true;
            Ok(())
        })?)
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
        Ok(self.set_enable(index, enable)?)
    }

    fn get_config(&mut self, offset: u32, size: u32, _flags: VhostUserConfigFlags) -> VhostResult<Vec<u8>> {
        Ok(self.dev.config().read(offset, size).map_err(SessionError::from)?)
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
            Err(source @ DirtyLogError::BadFd(_)) => return Err(self.refuse_fd(SessionError::LogRefused { size, offset, source }).into()),
            Err(source) => return Err(SessionError::LogMap { size, offset, source }.into()),
        };
        info!("dirty log mapped: {size} bytes, fd {}", mapped.seal.describe());
        // Workers hold the previous log (the frontend resizes it as memory grows): restart them.
        Ok(self.restart_all(|s| {
            s.log = Some(Arc::new(mapped));
            Ok(())
        })?)
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::FromRawFd;
    use std::time::{Duration, Instant};

    use vhost::vhost_user::message::{VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserVringAddrFlags};
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use vm_memory::{Bytes, FileOffset, GuestAddress};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
    use vutap_virtio::features::{offered_features, HDR_LEN};
    use vutap_virtio::offload::tun_offload_flags;

    use super::*;
    use crate::control::memory::GuestMem;
    use crate::tap::TapKind;
    use crate::test_utils::{frame, page_marked, MockTapQueue};

    const MEM_SIZE: usize = 0x100_0000;
    /// Where the frontend (the VMM) has guest memory mapped: SET_VRING_ADDR speaks in these.
    const VMM_BASE: u64 = 0x7f00_0000_0000;
    const RING_SIZE: u16 = 16;
    const BUF_LEN: u32 = 8192;
    /// RX buffers a guest posts: with mergeable buffers vutap holds chains for one largest
    /// (64 KiB GSO) frame before it reads the tap, like a Linux guest keeps its ring full.
    const RX_BUFFERS: u16 = 12;
    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    const PROTOCOL_FEATURES: u64 = 1 << 30;

    fn memfd(len: usize) -> File {
        // SAFETY: memfd_create with a static NUL-terminated name; the fd is checked, then owned
        // by the File.
        let fd = unsafe { libc::memfd_create(c"vutap-session-test".as_ptr(), 0) };
        assert!(fd >= 0, "memfd_create failed");
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len as u64).unwrap();
        file
    }

    fn eventfd_file(e: &EventFd) -> File {
        // SAFETY: the clone is a fresh fd owned by nobody else; the File takes it over.
        unsafe { File::from_raw_fd(e.try_clone().unwrap().into_raw_fd()) }
    }

    /// Waits for `cond` (a worker thread moves frames on its own), failing after a deadline.
    fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Where ring `index`'s tables are (split-ring layout; its buffers are at [`buffer`]).
    #[derive(Clone, Copy)]
    struct RingAddrs {
        desc: u64,
        avail: u64,
        used: u64,
    }

    fn ring(index: usize) -> RingAddrs {
        let desc = index as u64 * 0x1000;
        let avail = desc + 16 * u64::from(RING_SIZE);
        RingAddrs { desc, avail, used: (avail + 4 + 2 * u64::from(RING_SIZE) + 2).next_multiple_of(4) }
    }

    /// Buffer `slot` of ring `index`.
    fn buffer(index: usize, slot: u16) -> u64 {
        0x10_0000 + index as u64 * 0x10_0000 + u64::from(slot) * u64::from(BUF_LEN)
    }

    /// A frontend driving a session through the request handler trait, as vhost's parser does,
    /// over memfd guest memory it maps too (to fill rings and read them back) and mock tap queues.
    struct Frontend {
        dev: Arc<Device<MockTapQueue>>,
        session: Session<MockTapQueue>,
        file: File,
        mem: GuestMem,
        kicks: Vec<EventFd>,
        /// Descriptor-table slot of the next chain of each ring.
        next_slot: Vec<u16>,
    }

    impl Frontend {
        fn new(pairs: usize) -> Frontend {
            let queues = (0..pairs).map(|_| MockTapQueue::default()).collect();
            let dev = Arc::new(Device::with_queues("mock0".into(), TapKind::Tap, queues, MAC, 1500).unwrap());
            let file = memfd(MEM_SIZE);
            let ranges = [(GuestAddress(0), MEM_SIZE, Some(FileOffset::new(file.try_clone().unwrap(), 0)))];
            let mem = GuestMem::from_ranges_with_files(&ranges).unwrap();
            Frontend {
                session: Session::new(dev.clone()),
                dev,
                file,
                mem,
                kicks: (0..pairs * 2).map(|_| EventFd::new(EFD_NONBLOCK).unwrap()).collect(),
                next_slot: vec![0; pairs * 2],
            }
        }

        fn tap(&self, pair: usize) -> &MockTapQueue {
            &self.dev.queues[pair]
        }

        fn running(&self, pair: usize) -> bool {
            self.session.workers[pair].is_some()
        }

        fn counts(&self, pair: usize) -> crate::metrics::PairCounts {
            self.dev.metrics[pair].snapshot()
        }

        /// Writes a one-descriptor chain at table `slot` of ring `index` and makes it available.
        fn add_chain(&mut self, index: usize, slot: u16, addr: u64, len: u32, writable: bool) {
            let r = ring(index);
            let flags: u16 = if writable { VRING_DESC_F_WRITE as u16 } else { 0 };
            let desc = r.desc + 16 * u64::from(slot);
            self.mem.write_obj(addr, GuestAddress(desc)).unwrap();
            self.mem.write_obj(len, GuestAddress(desc + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(desc + 12)).unwrap();
            let idx: u16 = self.mem.read_obj(GuestAddress(r.avail + 2)).unwrap();
            self.mem.write_obj(slot, GuestAddress(r.avail + 4 + 2 * u64::from(idx % RING_SIZE))).unwrap();
            self.mem.write_obj(idx.wrapping_add(1), GuestAddress(r.avail + 2)).unwrap();
        }

        fn set_mem_table(&mut self) -> VhostResult<()> {
            let region = VhostUserMemoryRegion::new(0, MEM_SIZE as u64, VMM_BASE, 0);
            self.session.set_mem_table(&[region], vec![self.file.try_clone().unwrap()], None).map(|_| ())
        }

        /// SET_VRING_NUM, SET_VRING_BASE (0), SET_VRING_ADDR and SET_VRING_CALL of one ring.
        fn set_up_ring(&mut self, index: usize) {
            let RingAddrs { desc, avail, used } = ring(index);
            let i = index as u32;
            self.session.set_vring_num(i, u32::from(RING_SIZE)).unwrap();
            self.session.set_vring_base(i, 0).unwrap();
            let flags = VhostUserVringAddrFlags::empty();
            self.session.set_vring_addr(i, flags, VMM_BASE + desc, VMM_BASE + used, VMM_BASE + avail, 0).unwrap();
            self.session.set_vring_call(index as u8, Some(eventfd_file(&EventFd::new(EFD_NONBLOCK).unwrap()))).unwrap();
        }

        fn kick_fd(&mut self, index: usize) {
            let kick = eventfd_file(&self.kicks[index]);
            self.session.set_vring_kick(index as u8, Some(kick)).unwrap();
        }

        fn enable(&mut self, index: usize, on: bool) {
            self.session.set_vring_enable(index as u32, on).unwrap();
        }

        /// QEMU's virtio-net order: protocol features, then every ring enabled *before*
        /// SET_FEATURES, then memory and the rings, ending with the kick fds.
        fn qemu_start(&mut self, features: u64) {
            let pairs = self.dev.queue_pairs();
            self.session.set_owner().unwrap();
            assert_eq!(self.session.get_features().unwrap(), offered_features());
            let protocol = self.session.get_protocol_features().unwrap();
            self.session.set_protocol_features(protocol.bits()).unwrap();
            assert_eq!(self.session.get_queue_num().unwrap(), pairs as u64 * 2);
            for index in 0..pairs * 2 {
                self.enable(index, true);
            }
            self.session.set_features(features).unwrap();
            self.set_mem_table().unwrap();
            for index in 0..pairs * 2 {
                self.set_up_ring(index);
                self.kick_fd(index);
            }
        }

        /// cloud-hypervisor's order: features and memory first, the rings, and SET_VRING_ENABLE
        /// last.
        fn cloud_hypervisor_start(&mut self, features: u64) {
            let pairs = self.dev.queue_pairs();
            self.session.set_owner().unwrap();
            self.session.set_protocol_features(VhostUserProtocolFeatures::MQ.bits() | VhostUserProtocolFeatures::REPLY_ACK.bits()).unwrap();
            self.session.set_features(features).unwrap();
            self.set_mem_table().unwrap();
            for index in 0..pairs * 2 {
                self.set_up_ring(index);
                self.kick_fd(index);
            }
            for index in 0..pairs * 2 {
                assert!(!self.running(index / 2), "a pair runs before its rings are enabled");
                self.enable(index, true);
            }
        }

        /// The guest posts a frame on pair `pair`'s TX ring and kicks it.
        fn send(&mut self, pair: usize, bytes: &[u8]) {
            let index = pair * 2 + 1;
            let slot = self.next_slot[index];
            let addr = buffer(index, slot);
            self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
            self.add_chain(index, slot, addr, bytes.len() as u32, false);
            self.next_slot[index] = (slot + 1) % RING_SIZE;
            self.kicks[index].write(1).unwrap();
        }

        /// The guest posts `n` receive buffers on pair `pair`'s RX ring and kicks it.
        fn post_rx_buffers(&mut self, pair: usize, n: u16) {
            let index = pair * 2;
            for _ in 0..n {
                let slot = self.next_slot[index];
                self.add_chain(index, slot, buffer(index, slot), BUF_LEN, true);
                self.next_slot[index] = (slot + 1) % RING_SIZE;
            }
            self.kicks[index].write(1).unwrap();
        }

        /// The used ring's entries (id, len) up to its published index.
        fn used(&self, index: usize) -> Vec<(u32, u32)> {
            let base = ring(index).used;
            let idx: u16 = self.mem.read_obj(GuestAddress(base + 2)).unwrap();
            (0..idx)
                .map(|i| {
                    let slot = base + 4 + u64::from(i % RING_SIZE) * 8;
                    (self.mem.read_obj(GuestAddress(slot)).unwrap(), self.mem.read_obj(GuestAddress(slot + 4)).unwrap())
                })
                .collect()
        }

        /// The bytes the device wrote into the buffer of RX used entry `entry` of `pair`.
        fn received(&self, pair: usize, entry: usize) -> Vec<u8> {
            let (head, len) = self.used(pair * 2)[entry];
            let mut bytes = vec![0u8; len as usize];
            self.mem.read_slice(&mut bytes, GuestAddress(buffer(pair * 2, head as u16))).unwrap();
            bytes
        }
    }

    /// Every offered feature but PROTOCOL_FEATURES, which a test adds when it wants it.
    fn all_features() -> u64 {
        offered_features()
    }

    /// What the guest reads on RX: the frame with `num_buffers` (bytes 10..12) set to 1.
    fn with_one_buffer(mut bytes: Vec<u8>) -> Vec<u8> {
        bytes[10..12].copy_from_slice(&1u16.to_le_bytes());
        bytes
    }

    #[test]
    fn test_session_qemu_order_early_enable_starts_pair_on_kick() {
        let mut fe = Frontend::new(1);
        assert_ne!(all_features() & PROTOCOL_FEATURES, 0, "vutap offers PROTOCOL_FEATURES");
        fe.enable(0, true);
        fe.enable(1, true);
        assert!(!fe.running(0), "an early enable starts nothing before SET_FEATURES");
        let negotiated = Features::negotiate(offered_features(), all_features()).unwrap();
        fe.session.set_features(all_features()).unwrap();
        fe.set_mem_table().unwrap();
        fe.set_up_ring(0);
        fe.kick_fd(0);
        fe.set_up_ring(1);
        assert!(!fe.running(0), "the pair waits for its TX ring's kick fd");
        fe.kick_fd(1);
        assert!(fe.running(0), "QEMU never repeats the enable: the early one must take effect");
        let s = fe.tap(0).state();
        assert_eq!(s.attach_log, [true]);
        assert_eq!(s.vnet_hdr_len, Some(HDR_LEN));
        assert_eq!(s.offload, Some(tun_offload_flags(negotiated)));
    }

    #[test]
    fn test_session_qemu_order_moves_frames_both_ways() {
        let mut fe = Frontend::new(1);
        fe.qemu_start(all_features());
        assert!(fe.running(0));
        let out = frame(100, 7);
        fe.send(0, &out);
        wait_until("the TX frame reaches the tap", || fe.tap(0).written().len() == 1);
        assert_eq!(fe.tap(0).written()[0], out, "the tap gets the guest's header and frame byte for byte");
        wait_until("the TX chain is used", || fe.used(1).len() == 1);
        assert_eq!(fe.used(1), [(0, 0)], "TX chains are returned with length 0");

        fe.post_rx_buffers(0, RX_BUFFERS);
        let inbound = frame(300, 9);
        assert!(fe.tap(0).deliver(inbound.clone()));
        wait_until("the RX frame is used", || fe.used(0).len() == 1);
        assert_eq!(fe.used(0), [(0, 300)]);
        assert_eq!(fe.received(0, 0), with_one_buffer(inbound));
        wait_until("the counters are flushed", || fe.counts(0).rx_frames == 1 && fe.counts(0).tx_frames == 1);
        assert_eq!((fe.counts(0).tx_bytes, fe.counts(0).rx_bytes), (100, 300));
    }

    #[test]
    fn test_session_cloud_hypervisor_order_starts_pair_on_enable() {
        let mut fe = Frontend::new(2);
        fe.cloud_hypervisor_start(all_features());
        assert!(fe.running(0) && fe.running(1));
        for pair in 0..2 {
            fe.send(pair, &frame(60 + pair, pair as u8));
        }
        for pair in 0..2 {
            wait_until("each pair's frame reaches its own tap queue", || fe.tap(pair).written().len() == 1);
            assert_eq!(fe.tap(pair).written()[0], frame(60 + pair, pair as u8));
        }
    }

    #[test]
    fn test_session_without_protocol_features_rings_run_once_kicked() {
        let mut fe = Frontend::new(1);
        fe.session.set_features(all_features() & !PROTOCOL_FEATURES).unwrap();
        fe.set_mem_table().unwrap();
        fe.set_up_ring(0);
        fe.set_up_ring(1);
        fe.kick_fd(0);
        assert!(!fe.running(0));
        fe.kick_fd(1);
        assert!(fe.running(0), "without PROTOCOL_FEATURES a started ring is enabled (vhost-user spec)");
    }

    #[test]
    fn test_session_get_vring_base_stops_pair_and_returns_base() {
        let mut fe = Frontend::new(1);
        fe.qemu_start(all_features());
        for seed in 0..3 {
            fe.send(0, &frame(80, seed));
        }
        wait_until("three TX chains are used", || fe.used(1).len() == 3);
        fe.tap(0).deliver(frame(64, 1));
        let state = fe.session.get_vring_base(1).unwrap();
        assert_eq!((state.index, state.num), (1, 3), "GET_VRING_BASE returns the next avail index");
        assert!(!fe.running(0), "the pair stops with its ring");
        let s = fe.tap(0).state();
        assert_eq!((s.attached, s.parks), (false, 1), "the stopped pair's tap queue is parked");
        drop(s);
        assert_eq!(fe.counts(0).rx_flushed, 1, "the frame left on the parked queue is dropped and counted");
        let rx = fe.session.get_vring_base(0).unwrap();
        assert_eq!((rx.index, rx.num), (0, 0));
        // The frontend starts the ring again where it stopped.
        fe.session.set_vring_base(1, 3).unwrap();
        fe.kick_fd(1);
        assert!(!fe.running(0), "the RX ring stopped too and has no kick fd");
        fe.kick_fd(0);
        assert!(fe.running(0));
        fe.send(0, &frame(90, 4));
        wait_until("the frame after the restart is sent", || fe.tap(0).written().len() == 4);
        assert_eq!(fe.tap(0).written()[3], frame(90, 4));
    }

    #[test]
    fn test_session_set_mem_table_while_running_keeps_queue_attached() {
        let mut fe = Frontend::new(1);
        fe.qemu_start(all_features());
        fe.send(0, &frame(70, 1));
        wait_until("the first frame is sent", || fe.tap(0).written().len() == 1);
        fe.set_mem_table().unwrap();
        assert!(fe.running(0), "the pair restarts on the new memory table");
        assert_eq!(fe.tap(0).state().attach_log, [true, true], "a restart never detaches the tap queue");
        // Frames that arrive during and after the restart reach the guest.
        assert!(fe.tap(0).deliver(frame(120, 3)));
        fe.post_rx_buffers(0, RX_BUFFERS);
        wait_until("the RX frame is used after the restart", || fe.used(0).len() == 1);
        assert_eq!(fe.received(0, 0), with_one_buffer(frame(120, 3)));
        fe.send(0, &frame(71, 2));
        wait_until("TX resumes at the next chain", || fe.tap(0).written().len() == 2);
        assert_eq!(fe.tap(0).written()[1], frame(71, 2));
        assert_eq!(fe.used(1), [(0, 0), (1, 0)], "no chain repeated or skipped across the restart");
    }

    #[test]
    fn test_session_tap_write_error_halts_only_that_pair() {
        let mut fe = Frontend::new(2);
        fe.qemu_start(all_features());
        fe.tap(0).fail_next_write(libc::EBADFD);
        fe.send(0, &frame(60, 1));
        wait_until("pair 0 sees its tap fail", || fe.counts(0).tap_errors == 1);
        fe.send(0, &frame(60, 2));
        fe.send(1, &frame(61, 3));
        wait_until("pair 1 still moves frames", || fe.tap(1).written().len() == 1);
        assert_eq!(fe.tap(1).written()[0], frame(61, 3));
        // Pair 1 served a frame posted after pair 0's second one: pair 0 had its chance and stays halted.
        wait_until("pair 0's kick is counted", || fe.counts(0).kicks >= 2);
        assert!(fe.tap(0).written().is_empty(), "the halted pair writes nothing more");
        assert!(fe.running(0), "the worker stays until the frontend stops the ring");
        assert_eq!(fe.counts(1).tap_errors, 0);
    }

    #[test]
    fn test_session_disable_stops_pair_and_parks_queue() {
        let mut fe = Frontend::new(1);
        fe.qemu_start(all_features());
        assert!(fe.tap(0).deliver(frame(64, 1)) && fe.tap(0).deliver(frame(64, 2)));
        fe.enable(0, false);
        assert!(!fe.running(0));
        assert_eq!(fe.tap(0).state().attach_log, [true, false]);
        assert_eq!(fe.counts(0).rx_flushed, 2, "frames nobody will read are dropped and counted");
        assert!(!fe.tap(0).deliver(frame(64, 3)), "a parked queue gets no frames");
        fe.enable(0, true);
        assert!(fe.running(0), "enabling again restarts the pair");
        assert!(fe.tap(0).state().attached);
    }

    #[test]
    fn test_session_set_features_refuses_unoffered_bits() {
        let mut fe = Frontend::new(1);
        let unoffered = (0..64).map(|b| 1u64 << b).find(|b| offered_features() & b == 0).unwrap();
        let err = fe.session.set_features(all_features() | unoffered).unwrap_err();
        assert!(err.to_string().contains("not offered"), "{err}");
        assert!(!fe.session.features_acked());
        assert_eq!(fe.tap(0).state().vnet_hdr_len, None, "a refused set changes nothing on the tap");
        fe.session.set_features(all_features()).unwrap();
        assert!(fe.session.features_acked());
    }

    #[test]
    fn test_session_reset_device_stops_and_forgets() {
        let mut fe = Frontend::new(1);
        fe.qemu_start(all_features());
        fe.session.reset_device().unwrap();
        assert!(!fe.running(0));
        assert!(!fe.session.features_acked());
        assert_eq!(fe.session.acked_protocol(), 0);
        assert!(!fe.tap(0).state().attached);
        // The new session starts clean: kicks alone start nothing.
        fe.kick_fd(0);
        fe.kick_fd(1);
        assert!(!fe.running(0));
    }

    #[test]
    fn test_session_send_rarp_needs_a_running_pair() {
        let mut fe = Frontend::new(1);
        assert!(matches!(fe.session.send_rarp(MAC), Err(SessionError::NoPairRunning)));
        fe.qemu_start(all_features());
        fe.session.send_rarp(MAC).unwrap();
        let written = fe.tap(0).written();
        let mut expected = vec![0u8; HDR_LEN];
        expected.extend_from_slice(&vutap_virtio::announce::rarp_frame(MAC));
        assert_eq!(written, [expected]);
        fe.tap(0).fail_next_write(libc::EIO);
        assert!(matches!(fe.session.send_rarp(MAC), Err(SessionError::TapWrite(_))));
    }

    #[test]
    fn test_session_requests_refused_with_their_reason() {
        let mut fe = Frontend::new(1);
        let text = |r: VhostResult<()>| r.unwrap_err().to_string();
        let flags = VhostUserVringAddrFlags::empty;
        assert!(
            text(fe.session.set_vring_addr(0, flags(), VMM_BASE, VMM_BASE, VMM_BASE, 0)).contains("SET_VRING_ADDR before SET_MEM_TABLE")
        );
        assert!(text(fe.session.set_vring_num(2, 16)).contains("vring index 2 out of range (device has 2 rings)"));
        assert!(text(fe.session.set_vring_num(0, 24)).contains("size 24 is not a power of two"));
        assert!(text(fe.session.set_vring_base(0, 0x1_0000)).contains("exceeds 16 bits"));
        assert!(text(fe.session.set_vring_kick(0, None)).contains("polling mode"));
        fe.set_mem_table().unwrap();
        assert!(text(fe.session.set_vring_addr(0, flags(), 0x1000, VMM_BASE, VMM_BASE, 0))
            .contains("VMM address 0x1000 is in no shared region"));
        assert!(text(fe.session.get_config(0, 0x1000, VhostUserConfigFlags::empty()).map(|_| ())).contains("outside the"));
        assert_eq!(fe.session.get_config(0, 6, VhostUserConfigFlags::empty()).unwrap(), MAC);
    }

    #[test]
    fn test_session_export_then_restore_resumes_where_it_halted() {
        let mut fe = Frontend::new(1);
        fe.qemu_start(all_features());
        fe.send(0, &frame(80, 1));
        wait_until("the first frame is sent", || fe.tap(0).written().len() == 1);
        fe.session.halt_all();
        assert!(!fe.running(0));
        assert!(fe.tap(0).state().attached, "a halt keeps the tap queue attached");
        let (stream, _peer) = UnixStream::pair().unwrap();
        let (state, fds) = fe.session.export(&stream, true).unwrap();
        assert_eq!(state.features, Some(all_features()));
        assert_eq!((state.vrings[0].next_avail, state.vrings[1].next_avail), (0, 1));
        assert_eq!(fds.len(), 1 + 1 + 2 * 2, "the stream, one memory region, a kick and a call fd per ring");
        let mut fds: Vec<Option<OwnedFd>> = fds.into_iter().map(Some).collect();
        let restored = Session::restore(fe.dev.clone(), &state, &mut fds).unwrap();
        assert!(fds[0].is_some(), "the stream is the request parser's, not the session's");
        assert!(fds[1..].iter().all(Option::is_none), "every other fd handed over is taken");
        // The old session goes (in a live upgrade, with the old process), the new one resumes.
        fe.session = restored;
        fe.session.set_replaying(false);
        assert!(!fe.running(0), "a restored session runs nothing until resumed");
        fe.session.resume_all();
        assert!(fe.running(0));
        fe.send(0, &frame(81, 2));
        wait_until("the restored pair sends", || fe.tap(0).written().len() == 2);
        assert_eq!(fe.tap(0).written()[1], frame(81, 2));
        assert_eq!(fe.used(1), [(0, 0), (1, 0)]);
        let mut short: Vec<Option<OwnedFd>> = Vec::new();
        assert!(matches!(Session::restore(fe.dev.clone(), &state, &mut short), Err(SessionError::FdMissing(_))));
    }

    #[test]
    fn test_session_set_features_while_running_restarts_with_new_offloads() {
        use virtio_bindings::virtio_net::*;
        let mut fe = Frontend::new(1);
        fe.qemu_start(all_features());
        let guest_offloads =
            [VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_GUEST_ECN];
        let fewer = guest_offloads.iter().fold(all_features(), |f, b| f & !(1u64 << b));
        let (before, after) =
            (Features::negotiate(offered_features(), all_features()).unwrap(), Features::negotiate(offered_features(), fewer).unwrap());
        assert_ne!(tun_offload_flags(before), tun_offload_flags(after));
        fe.session.set_features(fewer).unwrap();
        assert!(fe.running(0), "the pair restarts with the new features");
        let s = fe.tap(0).state();
        assert_eq!(s.offload, Some(tun_offload_flags(after)), "the tap is told the guest takes no offloads now");
        assert_eq!(s.attach_log, [true, true], "the restart keeps the tap queue attached");
        drop(s);
        fe.send(0, &frame(64, 1));
        wait_until("the restarted pair sends", || fe.tap(0).written().len() == 1);
        assert_eq!(fe.tap(0).written()[0], frame(64, 1));
    }

    #[test]
    fn test_session_dirty_log_marks_what_the_device_writes() {
        let mut fe = Frontend::new(1);
        fe.qemu_start(all_features());
        let log = memfd(0x1000);
        fe.session.set_log_base(&VhostUserLog::new(0x1000, 0), log.try_clone().unwrap()).unwrap();
        assert!(fe.running(0), "the pair restarts with the log");
        fe.post_rx_buffers(0, RX_BUFFERS);
        assert!(fe.tap(0).deliver(frame(200, 5)));
        wait_until("the RX frame is used", || fe.used(0).len() == 1);
        let page = |gpa: u64| gpa / crate::datapath::dirty_log::LOG_PAGE;
        wait_until("the RX buffer's page is logged", || page_marked(&log, page(buffer(0, 0))));
        wait_until("the RX used ring's page is logged", || page_marked(&log, page(ring(0).used)));
        assert!(!page_marked(&log, page(buffer(0, 5))), "a buffer the device did not write is not logged");
        fe.send(0, &frame(64, 1));
        wait_until("the TX chain is used", || fe.used(1).len() == 1);
        wait_until("the TX used ring's page is logged", || page_marked(&log, page(ring(1).used)));
        assert!(!page_marked(&log, page(buffer(1, 0))), "a TX buffer is only read: not logged");
    }

    #[test]
    fn test_session_mem_table_larger_than_its_fd_is_refused_and_closes() {
        let mut fe = Frontend::new(1);
        let short = memfd(0x1000);
        let region = VhostUserMemoryRegion::new(0, MEM_SIZE as u64, VMM_BASE, 0);
        let err = fe.session.set_mem_table(&[region], vec![short], None).unwrap_err();
        assert!(err.to_string().contains("SET_MEM_TABLE refused: region 0"), "{err}");
        let why = fe.session.take_refusal().expect("a lying fd closes the connection");
        assert!(why.starts_with("SET_MEM_TABLE refused: region 0"), "{why}");
        assert!(fe.session.take_refusal().is_none());
        assert_eq!(fe.dev.device_metrics.bad_memory_fds.load(Ordering::Relaxed), 1);
        let flags = VhostUserVringAddrFlags::empty();
        assert!(fe.session.set_vring_addr(0, flags, VMM_BASE, VMM_BASE, VMM_BASE, 0).is_err(), "nothing was mapped");
    }

    #[test]
    fn test_session_invalid_ring_never_starts() {
        let mut fe = Frontend::new(1);
        fe.session.set_features(all_features()).unwrap();
        fe.set_mem_table().unwrap();
        fe.set_up_ring(0);
        fe.set_up_ring(1);
        // A descriptor table running past the end of guest memory.
        let RingAddrs { avail, used, .. } = ring(1);
        let desc = VMM_BASE + MEM_SIZE as u64 - 16;
        fe.session.set_vring_addr(1, VhostUserVringAddrFlags::empty(), desc, VMM_BASE + used, VMM_BASE + avail, 0).unwrap();
        fe.enable(0, true);
        fe.enable(1, true);
        fe.kick_fd(0);
        fe.kick_fd(1);
        assert!(!fe.running(0), "a ring outside guest memory does not run");
        assert!(!fe.tap(0).state().attached, "and its tap queue stays detached");
    }
}
