//! vutap: a vhost-user-net backend that moves a VM's frames to and from a macvtap or tap.
//!
//! Module map:
//! - [`cli`]: arguments -> [`cli::Config`]; [`tap`]: opening taps/macvtaps and their ioctls;
//!   [`metrics`]: the counters every part updates.
//! - [`datapath`]: the worker thread per queue pair and its TX/RX batch loops.
//! - [`control`]: the vhost-user connection, its session state and guest memory.
//! - [`operations`]: the daemon, signals, privileges, seccomp, metrics endpoint, stats and
//!   live upgrade.

pub mod cli;
pub mod control;
pub mod datapath;
pub mod metrics;
pub mod operations;
pub mod tap;

/// Test helpers; public only with the `fuzzing` feature, for the fuzz targets in `fuzz/`.
#[cfg(any(test, feature = "fuzzing"))]
pub mod test_utils;

use std::sync::Arc;

use thiserror::Error;

use crate::cli::Config;
use crate::control::device::Device;
use crate::control::vhost_user::SocketError;
use crate::tap::{format_mac, Tap, TapError, TapKind};

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
    #[error("--io-uring: {0}")]
    IoUring(#[from] crate::datapath::tap_ring::TapRingError),
    #[error("cannot set up the guest-memory fault guard: {0}")]
    Guard(#[from] crate::control::memory_guard::GuardError),
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
    let mut dev = Device::new(tap, mac, mtu)?;
    dev.policy = config.policy;
    if config.policy.io_uring {
        dev.use_io_uring()?;
        log::info!("device {}: TX and RX through io_uring", dev.label);
    }
    Ok(dev)
}

/// Opens the device and serves frontends until `--once` ends it.
pub fn run(config: Config) -> Result<(), StartError> {
    let dev = Arc::new(open_device(&config)?);
    control::vhost_user::serve(&config.socket.to_mode(), dev, config.once)?;
    Ok(())
}
