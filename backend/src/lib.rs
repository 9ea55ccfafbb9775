//! vutap: a vhost-user-net backend that moves a VM's frames to and from a macvtap or tap.
//!
//! Module map:
//! - [`cli`]: arguments -> [`cli::Config`].
//! - [`tap`]: opening taps/macvtaps and their ioctls; [`tap_io`]: the datapath's two syscalls.
//! - [`device`]: a served device (tap queues, MAC, MTU, counters).
//! - [`vhost_user`]: the socket, the connection loop and QEMU's message-order quirk.
//! - [`session`]: per-connection state (features, memory, vrings, workers).
//! - [`worker`]: one epoll thread per queue pair, scheduled by `pair_state`; [`tx`] and [`rx`]:
//!   the batch loops (RX holds popped chains in `held_chains`), stopping a ring on a
//!   [`ring_error::RingError`].
//! - [`chain_iov`], [`used_ring`], [`memory`]: guest-memory plumbing; [`dirty_log`]: the
//!   migration log; [`metrics`]: counters.
//! - [`mapped_fd`]: size and seal checks of the fds a frontend hands us to map;
//!   [`memory_guard`]: SIGBUS containment when such an fd shrinks after mapping.
//! - Operations: [`daemon`] (several devices, one process), [`signals`] (SIGTERM/SIGINT),
//!   [`metrics_server`] (Prometheus text) and [`stats`] (`vutap stats`, log summaries),
//!   [`privilege`] (`--user`), [`link_state`] (carrier -> STATUS and config-change messages).
//! - [`upgrade`]: live upgrade (hand every fd and the ring state to a new binary).
//! - [`sandbox`]: seccomp allow-lists of the worker and device serving threads (`--no-seccomp`).

pub mod chain_iov;
pub mod cli;
pub mod daemon;
pub mod device;
pub mod dirty_log;
pub(crate) mod held_chains;
pub mod link_state;
pub mod mapped_fd;
pub mod memory;
pub mod memory_guard;
pub mod metrics;
pub mod metrics_http;
pub mod metrics_server;
pub(crate) mod pair_state;
pub mod privilege;
pub mod ring_error;
pub mod rx;
pub mod sandbox;
pub mod session;
pub mod signals;
pub mod stats;
pub mod tap;
pub mod tap_io;
pub mod tx;
pub mod upgrade;
pub mod used_ring;
pub mod vhost_user;
pub mod worker;

/// Test helpers; public only with the `fuzzing` feature, for the fuzz targets in `fuzz/`.
#[cfg(any(test, feature = "fuzzing"))]
pub mod test_utils;

use std::sync::Arc;

use thiserror::Error;

use crate::cli::Config;
use crate::device::Device;
use crate::tap::{format_mac, Tap, TapError, TapKind};
use crate::vhost_user::SocketError;

#[derive(Debug, Error)]
pub enum StartError {
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("--mac {given} differs from the macvtap's MAC {device}: a macvtap (outside passthru mode) drops frames from and to any other MAC; omit --mac, or change the macvtap's address with `ip link set DEV address {given}`")]
    MacMismatch { given: String, device: String },
    #[error("--mtu {given} exceeds the device MTU {device}: raise it first with `ip link set DEV mtu {given}`")]
    MtuTooBig { given: u16, device: u16 },
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error("cannot set up the guest-memory fault guard: {0}")]
    Guard(#[from] crate::memory_guard::GuardError),
}

/// A locally administered unicast MAC derived from the tap's name, stable across restarts.
fn mac_from_name(name: &str) -> [u8; 6] {
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    let b = h.to_le_bytes();
    [0x52, 0x54, 0x00, b[0], b[1], b[2]]
}

/// Opens the device the configuration names and decides its MAC and MTU.
pub fn open_device(config: &Config) -> Result<Device, StartError> {
    let tap = Tap::open(&config.tap, config.queues)?;
    let mac = match (tap.kind.clone(), config.mac, tap.mac) {
        (TapKind::Macvtap, Some(given), Some(device)) if given != device => {
            return Err(StartError::MacMismatch { given: format_mac(&given), device: format_mac(&device) })
        }
        (TapKind::Macvtap, _, Some(device)) => device,
        (_, Some(given), _) => given,
        (_, None, _) => mac_from_name(tap.name.as_deref().unwrap_or("vutap")),
    };
    let device_mtu = tap.mtu.unwrap_or(1500);
    let mtu = match config.mtu {
        Some(m) if m > device_mtu => return Err(StartError::MtuTooBig { given: m, device: device_mtu }),
        Some(m) => m,
        None => device_mtu,
    };
    log::info!(
        "device {} ({:?}): {} queue pair(s), MAC {}, MTU {mtu}",
        tap.name.as_deref().unwrap_or("?"),
        tap.kind,
        tap.queues.len(),
        format_mac(&mac)
    );
    Ok(Device::new(tap, mac, mtu)?)
}

/// Opens the device and serves frontends until `--once` ends it.
pub fn run(config: Config) -> Result<(), StartError> {
    let dev = Arc::new(open_device(&config)?);
    vhost_user::serve(&config.socket.to_mode(), dev, config.once)?;
    Ok(())
}
