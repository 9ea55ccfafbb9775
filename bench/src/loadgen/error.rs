//! Why a benchmark case, or the whole run, failed. A failed case is reported with this error's
//! text and the run goes on; a failed setup ends the run.

use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use vutap_frontend::virtqueue::QueueError;
use vutap_frontend::FrontendError;

#[derive(Debug, thiserror::Error)]
pub enum LoadgenError {
    #[error("vutap-bench needs root (netns, macvtap, tap)")]
    NotRoot,
    #[error(transparent)]
    Testbed(#[from] vutap_testbed::Error),
    #[error("connect to {}: {source}", socket.display())]
    Connect {
        socket: PathBuf,
        #[source]
        source: FrontendError,
    },
    #[error(transparent)]
    Frontend(#[from] FrontendError),
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("kick: {0}")]
    Kick(#[source] io::Error),
    #[error("backend did not negotiate as asked: {0}")]
    Negotiation(&'static str),
    #[error("backend returned unknown {dir} id {id}")]
    UnknownId { dir: &'static str, id: u32 },
    #[error("merged frame missing buffers ({used}/{expected})")]
    MergedFrameShort { used: u16, expected: u16 },
    #[error("driver thread panicked")]
    DriverPanicked,
    #[error("AF_PACKET socket on {ifname}: {source}")]
    FarSocket {
        ifname: String,
        #[source]
        source: io::Error,
    },
    #[error("open {what}: {source}")]
    OpenTap {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("bad MAC address {0:?}")]
    BadMac(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{what} exited early ({status}):\n{log}")]
    Exited { what: &'static str, status: ExitStatus, log: String },
    #[error("{what} not ready ({ready}) after {timeout:?}:\n{log}")]
    NotReady { what: &'static str, ready: String, timeout: Duration, log: String },
    #[error("vutap metrics at {}: {source}", socket.display())]
    Metrics {
        socket: PathBuf,
        #[source]
        source: vutap::operations::stats::StatsError,
    },
    #[error("no rounds ran")]
    NoRounds,
}

pub type Result<T> = std::result::Result<T, LoadgenError>;
