//! A network device vutap serves: its tap queues and what the guest is told about it.
//! It outlives connections; each connection gets a fresh [`crate::control::session::Session`] over it.
//! Generic over its tap queues ([`TapControl`]) so the control plane runs on a mock in tests.

use std::sync::Arc;

use vutap_virtio::features::offered_features;
use vutap_virtio::NetConfig;

use crate::cli::Policy;
use crate::control::link_state::LinkState;
use crate::control::memory_guard::{FaultOwner, GuardError};
use crate::datapath::tap_io::TapControl;
use crate::datapath::tap_ring::TapRingError;
use crate::datapath::worker::BATCH_BUDGET;
use crate::metrics::{DeviceMetrics, PairMetrics};
use crate::operations::upgrade::port::UpgradePort;
use crate::tap::{Tap, TapKind, TapQueue};

pub struct Device<T: TapControl = TapQueue> {
    pub name: String,
    pub queues: Vec<Arc<T>>,
    pub kind: TapKind,
    pub mac: [u8; 6],
    pub mtu: u16,
    pub metrics: Vec<Arc<PairMetrics>>,
    /// How this device is called in metrics and logs (`--device name=`, else the tap's name).
    pub label: String,
    /// Carrier of the tap, announced in the config space and to the frontend.
    pub link: Arc<LinkState>,
    pub device_metrics: Arc<DeviceMetrics>,
    /// Catches a SIGBUS on this device's guest memory (a frontend shrinking its fds) so that
    /// only this device's connection ends.
    pub faults: FaultOwner,
    /// Where a live upgrade asks this device's serving thread to park (see `upgrade`).
    pub upgrade: UpgradePort,
    /// Seccomp filters of its threads and what a lost tap does (the daemon's configuration).
    pub policy: Policy,
}

impl Device<TapQueue> {
    pub fn new(tap: Tap, mac: [u8; 6], mtu: u16) -> Result<Self, GuardError> {
        let name = tap.name.clone().unwrap_or_else(|| "tap".into());
        Device::with_queues(name, tap.kind, tap.queues, mac, mtu)
    }

    /// `--io-uring`: every queue writes its TX batches and reads its RX frames through an
    /// io_uring of its own, sized for one batch.
    pub fn use_io_uring(&self) -> Result<(), TapRingError> {
        for q in &self.queues {
            q.use_io_uring(BATCH_BUDGET as u32)?;
        }
        Ok(())
    }
}

impl<T: TapControl> Device<T> {
    /// A device over `queues` (one per queue pair), with the default [`Policy`].
    pub fn with_queues(name: String, kind: TapKind, queues: Vec<T>, mac: [u8; 6], mtu: u16) -> Result<Self, GuardError> {
        let pairs = queues.len();
        Ok(Device {
            label: name.clone(),
            link: Arc::new(LinkState::default()),
            device_metrics: Arc::new(DeviceMetrics::default()),
            name,
            queues: queues.into_iter().map(Arc::new).collect(),
            kind,
            mac,
            mtu,
            metrics: (0..pairs).map(|_| Arc::new(PairMetrics::default())).collect(),
            faults: FaultOwner::new()?,
            upgrade: UpgradePort::new().map_err(GuardError::EventFd)?,
            policy: Policy::default(),
        })
    }

    pub fn queue_pairs(&self) -> usize {
        self.queues.len()
    }

    pub fn offered_features(&self) -> u64 {
        offered_features()
    }

    pub fn config(&self) -> NetConfig {
        NetConfig { mac: self.mac, link_up: self.link.is_up(), max_queue_pairs: self.queue_pairs() as u16, mtu: self.mtu }
    }

    /// Detaches every tap queue and drops what waits on it: nobody reads them until a guest
    /// starts the pair again (see [`TapQueue::park`]).
    pub fn detach_all(&self) {
        for pair in 0..self.queues.len() {
            self.park_queue(pair);
        }
    }

    /// Detaches one pair's tap queue and drops (and counts) the frames left on it.
    pub fn park_queue(&self, pair: usize) {
        match self.queues[pair].park() {
            Ok(0) => {}
            Ok(n) => {
                log::info!("queue pair {pair}: dropped {n} frame(s) left on the stopped tap queue");
                self.metrics[pair].add(&crate::metrics::PairCounts { rx_flushed: n as u64, ..Default::default() });
            }
            Err(e) => log::warn!("queue pair {pair}: {e}"),
        }
    }
}
