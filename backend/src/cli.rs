//! Command line: clap arguments, turned into a checked [`Config`] without touching any device.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use thiserror::Error;

use crate::control::vhost_user::SocketMode;
use crate::datapath::poll_window::PollPolicy;
use crate::operations::sandbox::Seccomp;
use crate::tap::{parse_mac, TapError, TapSpec};

/// The largest number of queue pairs (one tap fd and one thread each).
pub const MAX_QUEUE_PAIRS: u16 = 16;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "vutap",
    version,
    about = "vhost-user-net backend that moves a VM's frames to and from a macvtap or tap",
    after_help = "`vutap stats ENDPOINT` prints the counters of a running vutap started with --metrics-addr or --metrics-unix.\n`vutap upgrade CONTROL [--binary PATH]` replaces a running vutap started with --control-socket CONTROL by PATH (default: its own binary), live."
)]
pub struct Args {
    /// vhost-user socket path. vutap listens there (the VMM connects), unless --client.
    #[arg(long, value_name = "PATH", requires = "tap", required_unless_present_any = ["device", "config"])]
    pub socket: Option<PathBuf>,

    /// The device: `/dev/tapN` (a macvtap's char device; N is its ifindex), an interface name
    /// (a macvtap is resolved to its /dev/tapN; anything else is opened as a multi-queue tap
    /// through /dev/net/tun, and created if missing; a tap made without multi_queue is served
    /// with --queues 1), or `fd:3,4` (inherited fds, one per queue pair).
    #[arg(long, value_name = "SPEC", requires = "socket")]
    pub tap: Option<String>,

    /// Another device to serve, in its own threads and on its own socket (repeatable):
    /// `socket=PATH,tap=SPEC[,queues=N][,mac=MAC][,mtu=N][,client][,name=LABEL]`.
    #[arg(long, value_name = "KEY=VALUE,...")]
    pub device: Vec<String>,

    /// A file with one --device spec per line (`#` starts a comment).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Serve Prometheus metrics over HTTP on this address (e.g. 127.0.0.1:9477), at /metrics.
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_addr: Option<SocketAddr>,

    /// Serve the same metrics text on a unix socket (read by `vutap stats PATH`).
    #[arg(long, value_name = "PATH")]
    pub metrics_unix: Option<PathBuf>,

    /// Send buffer of every tap queue, in bytes, like QEMU's `-netdev tap,sndbuf=`: once that
    /// many bytes written to a queue are still in flight (not yet consumed by whoever receives
    /// them), TX waits for the tap (it never drops). Default, and 0: unlimited (QEMU's default).
    #[arg(long, value_name = "BYTES")]
    pub sndbuf: Option<u64>,
    /// Listen here for `vutap upgrade PATH` (live upgrade: a new binary takes over every device
    /// and connection without the frontends noticing).
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,

    /// Log a one-line traffic summary per device every N seconds.
    #[arg(long, value_name = "SECS")]
    pub stats_interval: Option<u64>,

    /// After opening taps and sockets, become this user and drop every capability.
    #[arg(long, value_name = "NAME")]
    pub user: Option<String>,

    /// How often to poll the tap's carrier for the link state, in milliseconds (0: never).
    #[arg(long, default_value_t = 250, value_name = "MS")]
    pub link_poll_ms: u64,

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

    /// Do not install the seccomp allow-lists of the worker and device threads.
    #[arg(long)]
    pub no_seccomp: bool,

    /// When a tap fails for good (device deleted), exit with status 75 (EX_TEMPFAIL) so a
    /// supervisor restarts vutap once the device is back. Default: log it, keep serving the
    /// other queue pairs and devices, and leave that pair stopped until the frontend restarts it.
    #[arg(long)]
    pub exit_on_tap_loss: bool,

    /// After a pass that moved frames, a worker keeps polling its TX ring and tap for this many
    /// microseconds before it sleeps (like vhost-net's busyloop): lower latency, paid in CPU
    /// while traffic is sparse. 0 (default): sleep at once.
    #[arg(long, default_value_t = 0, value_name = "US")]
    pub busy_poll_us: u32,

    /// After a pass that moved frames, a worker polls for a window that follows the traffic, at
    /// most this many microseconds (KVM's halt-polling rule): it grows while the next event came
    /// soon after the last pass and shrinks to nothing when it came later than this, so sparse
    /// traffic, and none, is not polled. 0: off. `--busy-poll-us` wins over it.
    #[arg(long, default_value_t = 0, value_name = "US")]
    pub adaptive_poll_us: u32,

    /// Write each TX batch to the tap, and read RX frames in runs, with one io_uring_enter instead
    /// of one write/writev/readv per frame (a ring per queue, restricted to reads and writes of
    /// that queue). Default: writev/readv.
    #[arg(long)]
    pub io_uring: bool,

    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long, default_value = "info", value_name = "LEVEL")]
    pub log_level: String,
}

/// How the process guards its threads and what it does when a tap fails for good
/// (`--no-seccomp`, `--exit-on-tap-loss`, `--busy-poll-us`). The default is the library's: no
/// filters, a lost tap stops only its queue pair, and workers sleep as soon as they are idle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Policy {
    pub seccomp: Seccomp,
    pub exit_on_tap_loss: bool,
    /// `--busy-poll-us`, `--adaptive-poll-us`: how long a worker polls before it sleeps.
    pub poll: PollPolicy,
    /// `--io-uring`: TX batches and RX reads go through an io_uring.
    pub io_uring: bool,
}

impl From<&Args> for Policy {
    fn from(args: &Args) -> Policy {
        Policy {
            seccomp: Seccomp::new(!args.no_seccomp),
            exit_on_tap_loss: args.exit_on_tap_loss,
            poll: PollPolicy::from_micros(args.busy_poll_us, args.adaptive_poll_us),
            io_uring: args.io_uring,
        }
    }
}

/// A validated configuration of one device.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub socket: SocketModeCfg,
    pub tap: TapSpec,
    pub queues: usize,
    pub mac: Option<[u8; 6]>,
    pub mtu: Option<u16>,
    pub once: bool,
    pub policy: Policy,
}

#[derive(Debug, Clone, PartialEq)]
pub enum SocketModeCfg {
    Server(PathBuf),
    Client(PathBuf),
}

impl SocketModeCfg {
    pub fn path(&self) -> &std::path::Path {
        match self {
            SocketModeCfg::Server(p) | SocketModeCfg::Client(p) => p,
        }
    }

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
    #[error("no device: give --socket and --tap, or --device, or --config")]
    NoDevice,
    #[error("--device {spec:?}: {source}")]
    DeviceSpec {
        spec: String,
        #[source]
        source: SpecError,
    },
    #[error("--config {path}: {source}")]
    ConfigFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What is wrong with one `--device` spec.
#[derive(Debug, Error)]
pub enum SpecError {
    #[error("{key}={value} is not a number")]
    NotANumber { key: &'static str, value: String },
    #[error("unknown key {0:?} (socket, tap, queues, mac, mtu, client, name)")]
    UnknownKey(String),
    #[error("{0}= is missing")]
    Missing(&'static str),
    /// A value the single-device flags would refuse too (queues, MAC, MTU, tap).
    #[error(transparent)]
    Invalid(Box<ConfigError>),
}

/// The single-device form (`--socket --tap ...`) as a [`Config`].
impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(args: Args) -> Result<Self, ConfigError> {
        let policy = Policy::from(&args);
        let (Some(socket), Some(tap)) = (args.socket, args.tap) else { return Err(ConfigError::NoDevice) };
        DeviceArgs { socket, tap, queues: args.queues, mac: args.mac, mtu: args.mtu, client: args.client, once: args.once, policy }.check()
    }
}

/// The checks of one device's options, shared by the single-device flags and `--device`.
struct DeviceArgs {
    socket: PathBuf,
    tap: String,
    queues: u16,
    mac: Option<String>,
    mtu: Option<u16>,
    client: bool,
    once: bool,
    policy: Policy,
}

impl DeviceArgs {
    fn check(self) -> Result<Config, ConfigError> {
        if self.queues == 0 || self.queues > MAX_QUEUE_PAIRS {
            return Err(ConfigError::Queues(self.queues));
        }
        let mac = match &self.mac {
            Some(s) => {
                let mac = parse_mac(s).ok_or_else(|| ConfigError::Mac(s.clone()))?;
                if mac[0] & 1 != 0 {
                    return Err(ConfigError::MulticastMac(s.clone()));
                }
                Some(mac)
            }
            None => None,
        };
        if let Some(mtu) = self.mtu {
            if mtu < 68 {
                return Err(ConfigError::Mtu(mtu));
            }
        }
        let tap: TapSpec = self.tap.parse()?;
        let socket = if self.client { SocketModeCfg::Client(self.socket) } else { SocketModeCfg::Server(self.socket) };
        Ok(Config { socket, tap, queues: self.queues as usize, mac, mtu: self.mtu, once: self.once, policy: self.policy })
    }
}

/// One device of a daemon: its configuration and an optional label for metrics and logs.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedDevice {
    pub name: Option<String>,
    pub config: Config,
}

/// Everything `vutap` (the daemon form) was asked to do.
#[derive(Debug, Clone, PartialEq)]
pub struct DaemonConfig {
    pub devices: Vec<NamedDevice>,
    pub metrics_addr: Option<SocketAddr>,
    pub metrics_unix: Option<PathBuf>,
    pub stats_interval: Option<u64>,
    pub user: Option<String>,
    pub link_poll_ms: u64,
    /// `--sndbuf`, when it sets a limit (0 and values past `i32::MAX` mean unlimited).
    pub sndbuf: Option<i32>,
    /// Where `vutap upgrade` connects.
    pub control_socket: Option<PathBuf>,
    /// Also in every device's [`Config`].
    pub policy: Policy,
}

/// Parses `socket=PATH,tap=SPEC[,queues=N][,mac=MAC][,mtu=N][,client][,name=LABEL]`. A tap of
/// the form `fd:3,4` keeps the bare numbers that follow it. The device gets the default
/// [`Policy`]; the daemon's configuration gives every device its own.
pub fn parse_device_spec(spec: &str, once: bool) -> Result<NamedDevice, ConfigError> {
    let bad = |source: SpecError| ConfigError::DeviceSpec { spec: spec.to_string(), source };
    let (mut socket, mut tap, mut queues, mut mac, mut mtu, mut client, mut name) = (None, None::<String>, 1u16, None, None, false, None);
    let mut last_key = "";
    for tok in spec.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let (k, v) = match tok.split_once('=') {
            Some((k, v)) => (k.trim(), v.trim()),
            None if last_key == "tap" && tok.bytes().all(|b| b.is_ascii_digit()) => {
                if let Some(t) = tap.as_mut() {
                    t.push(',');
                    t.push_str(tok);
                }
                continue;
            }
            None => (tok, ""),
        };
        match k {
            "socket" => socket = Some(PathBuf::from(v)),
            "tap" => tap = Some(v.to_string()),
            "queues" => queues = v.parse().map_err(|_| bad(SpecError::NotANumber { key: "queues", value: v.to_string() }))?,
            "mac" => mac = Some(v.to_string()),
            "mtu" => mtu = Some(v.parse().map_err(|_| bad(SpecError::NotANumber { key: "mtu", value: v.to_string() }))?),
            "client" => client = v.is_empty() || v == "true" || v == "on" || v == "1",
            "name" => name = Some(v.to_string()),
            _ => return Err(bad(SpecError::UnknownKey(k.to_string()))),
        }
        last_key = k;
    }
    let socket = socket.ok_or_else(|| bad(SpecError::Missing("socket")))?;
    let tap = tap.ok_or_else(|| bad(SpecError::Missing("tap")))?;
    let config = DeviceArgs { socket, tap, queues, mac, mtu, client, once, policy: Policy::default() }
        .check()
        .map_err(|e| bad(SpecError::Invalid(Box::new(e))))?;
    Ok(NamedDevice { name, config })
}

/// A `--config` file: one `--device` spec per line; `#` starts a comment.
pub fn parse_config_file(path: &std::path::Path, once: bool) -> Result<Vec<NamedDevice>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ConfigFile { path: path.to_path_buf(), source })?;
    text.lines().map(|l| l.split('#').next().unwrap_or("").trim()).filter(|l| !l.is_empty()).map(|l| parse_device_spec(l, once)).collect()
}

impl TryFrom<Args> for DaemonConfig {
    type Error = ConfigError;

    fn try_from(args: Args) -> Result<Self, ConfigError> {
        let mut devices = Vec::new();
        if args.socket.is_some() || args.tap.is_some() {
            devices.push(NamedDevice { name: None, config: Config::try_from(args.clone())? });
        }
        for spec in &args.device {
            devices.push(parse_device_spec(spec, args.once)?);
        }
        if let Some(path) = &args.config {
            devices.extend(parse_config_file(path, args.once)?);
        }
        if devices.is_empty() {
            return Err(ConfigError::NoDevice);
        }
        let policy = Policy::from(&args);
        for d in &mut devices {
            d.config.policy = policy;
        }
        Ok(DaemonConfig {
            devices,
            metrics_addr: args.metrics_addr,
            metrics_unix: args.metrics_unix,
            stats_interval: args.stats_interval.filter(|s| *s > 0),
            user: args.user,
            link_poll_ms: args.link_poll_ms,
            sndbuf: args.sndbuf.filter(|&b| b > 0).and_then(|b| i32::try_from(b).ok()),
            control_socket: args.control_socket,
            policy,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
    fn test_device_spec() {
        let d = parse_device_spec("socket=/run/a.sock,tap=fd:3,4,queues=2,client,name=vm0,mtu=9000", false).unwrap();
        assert_eq!(d.name.as_deref(), Some("vm0"));
        assert_eq!(d.config.socket, SocketModeCfg::Client("/run/a.sock".into()));
        assert_eq!(d.config.tap, "fd:3,4".parse().unwrap());
        assert_eq!((d.config.queues, d.config.mtu), (2, Some(9000)));
        let spec_error = |spec: &str| match parse_device_spec(spec, false) {
            Err(ConfigError::DeviceSpec { source, .. }) => source,
            other => panic!("{spec}: {other:?}"),
        };
        assert!(matches!(spec_error("tap=mvt0"), SpecError::Missing("socket")));
        assert!(matches!(spec_error("socket=/a,tap=mvt0,colour=red"), SpecError::UnknownKey(k) if k == "colour"));
        assert!(matches!(spec_error("socket=/a,tap=mvt0,queues=two"), SpecError::NotANumber { key: "queues", .. }));
        let zero = spec_error("socket=/a,tap=mvt0,queues=0");
        assert!(matches!(&zero, SpecError::Invalid(e) if matches!(**e, ConfigError::Queues(0))));
        assert_eq!(
            ConfigError::DeviceSpec { spec: "socket=/a,tap=mvt0,queues=0".into(), source: zero }.to_string(),
            "--device \"socket=/a,tap=mvt0,queues=0\": --queues must be between 1 and 16, got 0"
        );
        let both = Args::try_parse_from(["vutap", "--socket", "/s", "--tap", "/dev/tap5", "--device", "socket=/b,tap=/dev/tap6"]).unwrap();
        assert_eq!(DaemonConfig::try_from(both).unwrap().devices.len(), 2);
        let only = Args::try_parse_from(["vutap", "--device", "socket=/b,tap=/dev/tap6"]).unwrap();
        assert_eq!(DaemonConfig::try_from(only).unwrap().devices.len(), 1);
        assert!(Args::try_parse_from(["vutap", "--socket", "/s"]).is_err(), "--socket needs --tap");
        assert!(Args::try_parse_from(["vutap"]).is_err(), "a device is required");
    }

    #[test]
    fn test_sndbuf_zero_and_huge_mean_unlimited() {
        let daemon = |v: &str| {
            let a = Args::try_parse_from(["vutap", "--socket", "/s", "--tap", "/dev/tap5", "--sndbuf", v]).unwrap();
            DaemonConfig::try_from(a).unwrap().sndbuf
        };
        assert_eq!(daemon("65536"), Some(65536));
        assert_eq!(daemon("0"), None);
        assert_eq!(daemon("4294967296"), None);
        assert!(Args::try_parse_from(["vutap", "--socket", "/s", "--tap", "/dev/tap5", "--sndbuf", "-1"]).is_err());
    }

    #[test]
    fn test_config_policy_from_flags() {
        let daemon = |extra: &[&str]| {
            let mut v = vec!["vutap", "--socket", "/s", "--tap", "/dev/tap5", "--device", "socket=/b,tap=/dev/tap6"];
            v.extend_from_slice(extra);
            DaemonConfig::try_from(Args::try_parse_from(v).unwrap()).unwrap()
        };
        let default = daemon(&[]);
        assert_eq!(default.policy, Policy { seccomp: Seccomp::ON, exit_on_tap_loss: false, poll: PollPolicy::Off, io_uring: false });
        let relaxed = daemon(&["--no-seccomp", "--exit-on-tap-loss", "--busy-poll-us", "50", "--io-uring"]);
        assert_eq!(
            relaxed.policy,
            Policy { seccomp: Seccomp::OFF, exit_on_tap_loss: true, poll: PollPolicy::Fixed(Duration::from_micros(50)), io_uring: true }
        );
        let adaptive = daemon(&["--adaptive-poll-us", "80"]);
        assert_eq!(adaptive.policy.poll, PollPolicy::Adaptive { max: Duration::from_micros(80) });
        // Every device, the flag-given one and the --device one, carries the daemon's policy.
        assert!(relaxed.devices.iter().all(|d| d.config.policy == relaxed.policy));
        assert!(default.devices.iter().all(|d| d.config.policy == default.policy));
        assert_eq!(Config::try_from(args(&["--no-seccomp"])).unwrap().policy.seccomp, Seccomp::OFF);
        // A spec parsed on its own has the library's policy: no filters, no exit.
        assert_eq!(parse_device_spec("socket=/a,tap=mvt0", false).unwrap().config.policy, Policy::default());
        assert!(!Policy::default().seccomp.enabled());
    }

    #[test]
    fn test_config_rejects_bad_values() {
        assert!(matches!(Config::try_from(args(&["--queues", "0"])), Err(ConfigError::Queues(0))));
        assert!(matches!(Config::try_from(args(&["--queues", "17"])), Err(ConfigError::Queues(17))));
        assert!(matches!(Config::try_from(args(&["--mac", "nope"])), Err(ConfigError::Mac(_))));
        assert!(matches!(Config::try_from(args(&["--mac", "01:00:5e:00:00:01"])), Err(ConfigError::MulticastMac(_))));
        assert!(matches!(Config::try_from(args(&["--mtu", "10"])), Err(ConfigError::Mtu(10))));
        let mut a = args(&[]);
        a.tap = Some("fd:x".into());
        assert!(matches!(Config::try_from(a), Err(ConfigError::Tap(_))));
    }
}
