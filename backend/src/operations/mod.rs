//! Running vutap as a service: several devices in one process, signals, privileges, seccomp,
//! the metrics endpoint, periodic stats and live upgrade.
//!
//! - [`daemon`]: several devices, one process; [`signals`]: SIGTERM/SIGINT.
//! - [`metrics_server`] and [`metrics_http`]: the Prometheus endpoint; [`stats`]: `vutap stats`
//!   and the periodic log summaries.
//! - [`privilege`]: `--user`; [`sandbox`]: seccomp allow-lists per thread.
//! - [`upgrade`]: live upgrade (every fd and the ring state handed to a new binary).

pub mod daemon;
pub mod metrics_http;
pub(crate) mod metrics_server;
pub(crate) mod privilege;
pub mod sandbox;
pub(crate) mod signals;
pub mod stats;
pub mod upgrade;
