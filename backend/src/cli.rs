//! Command line: clap arguments, turned into a checked [`Config`] without touching any device.

use std::path::PathBuf;

use clap::Parser;
use thiserror::Error;

use crate::tap::{parse_mac, TapError, TapSpec};
use crate::vhost_user::SocketMode;

/// The largest number of queue pairs (one tap fd and one thread each).
pub const MAX_QUEUE_PAIRS: u16 = 16;

#[derive(Parser, Debug, Clone)]
#[command(name = "vutap", version, about = "vhost-user-net backend that moves a VM's frames to and from a macvtap or tap")]
pub struct Args {
    /// vhost-user socket path. vutap listens there (the VMM connects), unless --client.
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,

    /// The device: `/dev/tapN` (a macvtap's char device; N is its ifindex), an interface name
    /// (a macvtap is resolved to its /dev/tapN; anything else is opened as a multi-queue tap
    /// through /dev/net/tun, and created if missing), or `fd:3,4` (inherited fds, one per queue
    /// pair).
    #[arg(long, value_name = "SPEC")]
    pub tap: String,

    /// Queue pairs to offer; one tap fd and one worker thread each.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub queues: u16,

    /// Guest MAC announced in the config space. Defaults to the macvtap's own MAC (a macvtap
    /// drops frames for any other MAC outside passthru mode, so a different one is refused);
    /// for a tap, defaults to a stable MAC derived from the tap's name.
    #[arg(long, value_name = "MAC")]
    pub mac: Option<String>,

    /// MTU announced to the guest (VIRTIO_NET_F_MTU). Defaults to the device's MTU; may not
    /// exceed it.
    #[arg(long, value_name = "N")]
    pub mtu: Option<u16>,

    /// Connect to a VMM listening on --socket (QEMU `server=on`) instead of listening, and
    /// reconnect whenever it goes away.
    #[arg(long)]
    pub client: bool,

    /// Serve one connection, then exit (default: serve the next connection, forever).
    #[arg(long)]
    pub once: bool,

    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long, default_value = "info", value_name = "LEVEL")]
    pub log_level: String,
}

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub socket: SocketModeCfg,
    pub tap: TapSpec,
    pub queues: usize,
    pub mac: Option<[u8; 6]>,
    pub mtu: Option<u16>,
    pub once: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum SocketModeCfg {
    Server(PathBuf),
    Client(PathBuf),
}

impl SocketModeCfg {
    pub fn to_mode(&self) -> SocketMode {
        match self {
            SocketModeCfg::Server(p) => SocketMode::Server(p.clone()),
            SocketModeCfg::Client(p) => SocketMode::Client(p.clone()),
        }
    }
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("--queues must be between 1 and {MAX_QUEUE_PAIRS}, got {0}")]
    Queues(u16),
    #[error("--mac {0:?} is not a MAC address like 52:54:00:12:34:56")]
    Mac(String),
    #[error("--mac {0} is a multicast address; a NIC needs a unicast MAC")]
    MulticastMac(String),
    #[error("--mtu must be between 68 and 65535, got {0}")]
    Mtu(u16),
    #[error("--tap: {0}")]
    Tap(#[from] TapError),
}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(args: Args) -> Result<Self, ConfigError> {
        if args.queues == 0 || args.queues > MAX_QUEUE_PAIRS {
            return Err(ConfigError::Queues(args.queues));
        }
        let mac = match &args.mac {
            Some(s) => {
                let mac = parse_mac(s).ok_or_else(|| ConfigError::Mac(s.clone()))?;
                if mac[0] & 1 != 0 {
                    return Err(ConfigError::MulticastMac(s.clone()));
                }
                Some(mac)
            }
            None => None,
        };
        if let Some(mtu) = args.mtu {
            if mtu < 68 {
                return Err(ConfigError::Mtu(mtu));
            }
        }
        let tap: TapSpec = args.tap.parse()?;
        let socket = if args.client { SocketModeCfg::Client(args.socket) } else { SocketModeCfg::Server(args.socket) };
        Ok(Config { socket, tap, queues: args.queues as usize, mac, mtu: args.mtu, once: args.once })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let mut v = vec!["vutap", "--socket", "/tmp/s.sock", "--tap", "/dev/tap5"];
        v.extend_from_slice(extra);
        Args::try_parse_from(v).unwrap()
    }

    #[test]
    fn test_config_defaults() {
        let c = Config::try_from(args(&[])).unwrap();
        assert_eq!(c.socket, SocketModeCfg::Server("/tmp/s.sock".into()));
        assert_eq!(c.tap, TapSpec::DevPath("/dev/tap5".into()));
        assert_eq!((c.queues, c.mac, c.mtu, c.once), (1, None, None, false));
    }

    #[test]
    fn test_config_client_queues_mac() {
        let c = Config::try_from(args(&["--client", "--queues", "4", "--mac", "52:54:00:00:00:01"])).unwrap();
        assert_eq!(c.socket, SocketModeCfg::Client("/tmp/s.sock".into()));
        assert_eq!(c.queues, 4);
        assert_eq!(c.mac, Some([0x52, 0x54, 0, 0, 0, 1]));
    }

    #[test]
    fn test_config_rejects_bad_values() {
        assert!(matches!(Config::try_from(args(&["--queues", "0"])), Err(ConfigError::Queues(0))));
        assert!(matches!(Config::try_from(args(&["--queues", "17"])), Err(ConfigError::Queues(17))));
        assert!(matches!(Config::try_from(args(&["--mac", "nope"])), Err(ConfigError::Mac(_))));
        assert!(matches!(Config::try_from(args(&["--mac", "01:00:5e:00:00:01"])), Err(ConfigError::MulticastMac(_))));
        assert!(matches!(Config::try_from(args(&["--mtu", "10"])), Err(ConfigError::Mtu(10))));
        let mut a = args(&[]);
        a.tap = "fd:x".into();
        assert!(matches!(Config::try_from(a), Err(ConfigError::Tap(_))));
    }
}
