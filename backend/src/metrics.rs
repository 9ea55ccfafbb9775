//! Per-queue-pair counters. The workers count locally and add to these atomics once per batch.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($name:ident: $doc:literal),* $(,)?) => {
        /// Counters of one queue pair (monotonic for the life of the process).
        #[derive(Debug, Default)]
        pub struct PairMetrics { $(#[doc = $doc] pub $name: AtomicU64,)* }

        /// A plain copy of [`PairMetrics`], also used as the worker's local tally.
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
        pub struct PairCounts { $(pub $name: u64,)* }

        impl PairMetrics {
            pub fn add(&self, c: &PairCounts) {
                $(if c.$name != 0 { self.$name.fetch_add(c.$name, Ordering::Relaxed); })*
            }
            pub fn snapshot(&self) -> PairCounts {
                PairCounts { $($name: self.$name.load(Ordering::Relaxed),)* }
            }
        }

        impl PairCounts {
            /// Sets the counter called `name` (unknown names are ignored: a newer vutap's).
            pub fn set(&mut self, name: &str, value: u64) {
                match name {
                    $(stringify!($name) => self.$name = value,)*
                    _ => {}
                }
            }

            /// (name, value) pairs, for logs and exporters.
            pub fn fields(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name),)*]
            }

            /// (name, help text) of every counter, for exporters.
            pub const HELP: &'static [(&'static str, &'static str)] = &[$((stringify!($name), $doc),)*];
        }
    };
}

counters! {
    tx_frames: "frames written to the tap",
    tx_bytes: "bytes written to the tap (virtio_net_hdr included)",
    tx_dropped: "guest frames the tap refused (counted, chain returned)",
    tx_bad_chains: "malformed TX chains (returned with length 0)",
    tx_too_many_segments: "TX chains of more than IOV_MAX (1024) segments, which one writev cannot take (returned with length 0)",
    tx_eagain: "times the tap was full and TX waited for EPOLLOUT",
    tx_batches: "TX batches processed",
    rx_frames: "frames delivered to the guest",
    rx_bytes: "bytes delivered to the guest (virtio_net_hdr included)",
    rx_dropped: "frames read from the tap but not deliverable (too big, truncated)",
    rx_bad_chains: "malformed RX chains, and heads posted again while vutap still held them (returned with length 0)",
    rx_too_many_segments: "RX chains of more than IOV_MAX - 1 (1023) segments, which one readv cannot take with its spill tail (returned with length 0)",
    rx_flushed: "frames left on the tap queue when its pair stopped, read and dropped so their senders can retransmit",
    rx_no_buffers: "times RX stopped for lack of guest buffers",
    rx_window_copies: "frames larger than the recent ones, whose end was copied from the spill tail into the buffers behind the read window",
    rx_batches: "RX batches processed",
    kicks: "kick eventfd wake-ups (both rings)",
    interrupts: "call eventfd signals sent (both rings)",
    wakeups: "worker passes over both rings and the tap (epoll returns, and a polling worker's finds)",
    poll_finds: "passes a polling worker started on its own look: frames on the TX ring (no kick) or read from the tap (no epoll)",
    tap_errors: "hard tap errors (device gone or broken)",
    rings_broken: "rings stopped because the driver corrupted them (avail index jump, used ring unwritable)",
    guest_memory_faults: "tap reads/writes that failed (EFAULT) because the guest memory behind them was lost (its fd shrank)",
}

/// Counters of one device, across connections (monotonic for the life of the process).
#[derive(Debug, Default)]
pub struct DeviceMetrics {
    /// Frontend connections accepted (or made, with --client).
    pub connections: AtomicU64,
    /// Connections that ended with the frontend closing the socket.
    pub disconnects: AtomicU64,
    /// Connections closed by vutap because the frontend broke the protocol.
    pub protocol_errors: AtomicU64,
    /// Carrier changes seen on the tap (or the macvtap's lower).
    pub link_changes: AtomicU64,
    /// VHOST_USER_BACKEND_CONFIG_CHANGE_MSG sent to the frontend.
    pub config_change_msgs: AtomicU64,
    /// Connections closed because an fd to map (memory region, dirty log) was shorter than the
    /// range it was declared to hold.
    pub bad_memory_fds: AtomicU64,
    /// Connections closed because mapped guest memory (or the dirty log) was lost under vutap:
    /// its fd shrank, the access faulted and was contained.
    pub guest_memory_lost: AtomicU64,
    /// CONFIG_CHANGE_MSG not sent because the frontend was not reading its backend channel.
    pub config_change_dropped: AtomicU64,
}

impl DeviceMetrics {
    /// Adds counters a previous process exported with [`DeviceMetrics::fields`] (live upgrade).
    pub fn restore(&self, counters: &[(String, u64)]) {
        for (name, value) in counters {
            let field = match name.as_str() {
                "connections" => &self.connections,
                "disconnects" => &self.disconnects,
                "protocol_errors" => &self.protocol_errors,
                "link_changes" => &self.link_changes,
                "config_change_msgs" => &self.config_change_msgs,
                "bad_memory_fds" => &self.bad_memory_fds,
                "guest_memory_lost" => &self.guest_memory_lost,
                "config_change_dropped" => &self.config_change_dropped,
                _ => continue,
            };
            field.fetch_add(*value, Ordering::Relaxed);
        }
    }

    /// (name, help, value) of every device counter, for exporters.
    pub fn fields(&self) -> [(&'static str, &'static str, u64); 8] {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        [
            ("connections", "frontend connections accepted or made", l(&self.connections)),
            ("disconnects", "connections the frontend closed", l(&self.disconnects)),
            ("protocol_errors", "connections closed because the frontend broke the protocol", l(&self.protocol_errors)),
            ("link_changes", "carrier changes of the tap or macvtap lower", l(&self.link_changes)),
            ("config_change_msgs", "config-change messages sent over the backend request channel", l(&self.config_change_msgs)),
            (
                "bad_memory_fds",
                "connections closed because a memory or log fd was shorter than its declared mapping",
                l(&self.bad_memory_fds),
            ),
            (
                "guest_memory_lost",
                "connections closed because mapped guest memory or the log was truncated under vutap (fault contained)",
                l(&self.guest_memory_lost),
            ),
            (
                "config_change_dropped",
                "config-change messages dropped because the frontend was not reading its backend channel",
                l(&self.config_change_dropped),
            ),
        ]
    }
}
