//! Errors of the frontend, one variant per step that can fail.

use std::io;
use std::path::PathBuf;

use super::memory::MemoryError;
use super::virtqueue::QueueError;

/// Result alias for the frontend.
pub type Result<T> = std::result::Result<T, FrontendError>;

/// Something the frontend could not do; each vhost-user step has its own variant so a failing
/// test names the message the backend rejected.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    #[error("connecting to {path:?}: {source}")]
    Connect { path: PathBuf, source: io::Error },
    #[error("accepting the backend's connection: {0}")]
    Accept(#[source] io::Error),
    #[error("guest memory: {0}")]
    Memory(#[from] MemoryError),
    #[error("setting up queue {queue}: {source}")]
    QueueSetup { queue: u16, source: io::Error },
    #[error("GET_FEATURES: {0}")]
    GetFeatures(#[source] vhost::Error),
    #[error("GET_PROTOCOL_FEATURES: {0}")]
    GetProtocolFeatures(#[source] vhost::Error),
    #[error("SET_PROTOCOL_FEATURES: {0}")]
    SetProtocolFeatures(#[source] vhost::Error),
    #[error("GET_QUEUE_NUM: {0}")]
    GetQueueNum(#[source] io::Error),
    #[error("backend supports {available} queues, {pairs} queue pairs requested")]
    TooFewQueues { available: u64, pairs: u16 },
    #[error("{pairs} queue pairs need MQ, which was not negotiated")]
    NoMultiQueue { pairs: u16 },
    #[error("SET_OWNER: {0}")]
    SetOwner(#[source] vhost::Error),
    #[error("SET_FEATURES: {0}")]
    SetFeatures(#[source] vhost::Error),
    #[error("SET_MEM_TABLE: {0}")]
    SetMemTable(#[source] vhost::Error),
    #[error("dirty log memfd: {0}")]
    DirtyLogFile(#[source] io::Error),
    #[error("SET_LOG_BASE: {0}")]
    SetLogBase(#[source] vhost::Error),
    #[error("SET_VRING_NUM({queue}): {source}")]
    SetVringNum { queue: u16, source: vhost::Error },
    #[error("SET_VRING_ADDR({queue}): {source}")]
    SetVringAddr { queue: u16, source: vhost::Error },
    #[error("SET_VRING_BASE({queue}): {source}")]
    SetVringBase { queue: u16, source: vhost::Error },
    #[error("SET_VRING_CALL({queue}): {source}")]
    SetVringCall { queue: u16, source: vhost::Error },
    #[error("SET_VRING_KICK({queue}): {source}")]
    SetVringKick { queue: u16, source: vhost::Error },
    #[error("SET_VRING_ENABLE({queue}): {source}")]
    SetVringEnable { queue: u16, source: vhost::Error },
    #[error("early SET_VRING_ENABLE({queue}) (QEMU order, written raw): {source}")]
    EarlyEnable { queue: u16, source: io::Error },
    #[error("early SET_VRING_ENABLE({queue}) was refused with status {status}")]
    EarlyEnableNack { queue: u16, status: u64 },
    #[error("GET_CONFIG: {0}")]
    GetConfig(#[source] vhost::Error),
    #[error("GET_VRING_BASE({queue}): {source}")]
    GetVringBase { queue: u16, source: vhost::Error },
    #[error("queue pair {pair} does not exist ({pairs} configured)")]
    NoSuchPair { pair: u16, pairs: u16 },
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("kicking queue {queue}: {source}")]
    Kick { queue: u16, source: io::Error },
    #[error("frame of {len} bytes (with header) exceeds the {max}-byte buffer")]
    FrameTooLarge { len: usize, max: usize },
    #[error("TX chains need {needed} segments, indirect tables hold {max}")]
    TooManySegments { needed: usize, max: usize },
    #[error("INDIRECT_DESC was not negotiated")]
    IndirectNotNegotiated,
    #[error("device returned bad used entry on queue {queue}: id {id} len {len}")]
    BadUsed { queue: u16, id: u32, len: u32 },
    #[error("device announced {num_buffers} buffers for a frame on queue {queue} but returned only {got}")]
    MissingMergedBuffers { queue: u16, num_buffers: u16, got: u16 },
}
