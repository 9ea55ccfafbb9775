//! The control plane: the vhost-user connection and what it negotiates.
//!
//! - [`vhost_user`]: the socket, the request loop and QEMU's message-order quirk; [`wire`]: the
//!   vhost-user format of the messages vutap frames itself (early enable, acks, fds).
//! - [`session`]: one connection's state (features, memory, vrings, workers).
//! - [`device`]: a served device (tap queues, MAC, MTU, counters).
//! - [`memory`]: the guest memory table; [`mapped_fd`]: size and seal checks of the fds a
//!   frontend hands us; [`memory_guard`]: SIGBUS containment when such an fd shrinks.
//! - [`link_state`]: the tap's carrier as the device STATUS and config-change messages.

pub mod device;
pub mod link_state;
pub(crate) mod mapped_fd;
pub mod memory;
pub mod memory_guard;
pub(crate) mod session;
pub mod vhost_user;
pub mod wire;
