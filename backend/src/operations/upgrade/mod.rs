//! Live upgrade: replace the running vutap binary without the frontends noticing.
//!
//! Everything a connection needs is file descriptors plus a little ring state, so the running
//! process starts the new binary and hands it every fd (taps, vhost-user sockets, guest memory,
//! eventfds, dirty log, backend channel, metrics and control listeners) with SCM_RIGHTS, plus a
//! versioned JSON state ([`state`]). The tap queues stay attached throughout and the frontend's
//! socket stays the same connection, so neither the kernel nor the guest sees a change; the
//! queue pairs pause from the moment they are halted until the new process started them.
//!
//! - [`coordinator`]: the running process (control socket, start, park, hand over, exit or resume);
//! - [`port`]: how a device's serving thread parks at a message boundary;
//! - [`wire`]: the hand-over socket; [`state`]: what is sent besides the fds;
//! - [`resume`]: the new process (rebuild devices and sessions, resume the request parser).

pub mod coordinator;
pub mod port;
pub mod resume;
pub mod state;
pub mod wire;
