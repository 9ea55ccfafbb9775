//! Benchmarks of vutap, built on the test frontend (`vutap_frontend`) and the test bed
//! (`vutap_testbed`).
//!
//! - [`loadgen`]: the vhost-user load generator behind `vutap-bench`, with its reports.
//! - [`seed`]: the seed experiment behind `vutap-vm seed` (internal/external paths, vutap vs
//!   QEMU's tap backend, the VEPA check).

pub mod loadgen;
pub mod seed;
