//! How long an idle worker polls its TX ring, kicks and tap before it sleeps.
//!
//! A sleeping worker costs each frame that wakes it a wake-up (an inter-processor interrupt, ~10
//! µs on a VM host); under request/response traffic that is two per round trip. Polling a little
//! while after a pass catches the next event awake, at the price of the CPU spent polling.
//!
//! - [`PollPolicy::Fixed`] (`--busy-poll-us`): the same window after every pass that moved
//!   frames, like vhost-net's busyloop.
//! - [`PollPolicy::Adaptive`] (`--adaptive-poll-us`): the rule of KVM's halt polling. The window
//!   grows (doubling from [`GROW_START`]) while the idle gaps after passes are longer than it but
//!   no longer than the maximum, stays while the gaps fit in it, and halves (to nothing below
//!   [`GROW_START`]) after a gap longer than the maximum. Traffic whose next event comes soon
//!   gets polled; sparse traffic, and none, is not polled at all.

use std::time::Duration;

/// Where an adaptive window starts when it first grows (KVM's `halt_poll_ns_grow_start`).
pub const GROW_START: Duration = Duration::from_micros(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PollPolicy {
    /// Sleep as soon as there is no work.
    #[default]
    Off,
    /// Poll this long after every pass that moved frames.
    Fixed(Duration),
    /// Poll for a window that follows the idle gaps, never longer than `max`.
    Adaptive { max: Duration },
}

impl PollPolicy {
    /// `--busy-poll-us` wins over `--adaptive-poll-us`; zero turns either off.
    pub fn from_micros(busy_poll_us: u32, adaptive_max_us: u32) -> PollPolicy {
        let us = |v: u32| Duration::from_micros(u64::from(v));
        match (busy_poll_us, adaptive_max_us) {
            (0, 0) => PollPolicy::Off,
            (0, max) => PollPolicy::Adaptive { max: us(max) },
            (fixed, _) => PollPolicy::Fixed(us(fixed)),
        }
    }
}

/// One worker's poll window.
#[derive(Debug, Clone)]
pub struct PollWindow {
    policy: PollPolicy,
    current: Duration,
}

impl PollWindow {
    pub fn new(policy: PollPolicy) -> PollWindow {
        let current = match policy {
            PollPolicy::Fixed(window) => window,
            PollPolicy::Off | PollPolicy::Adaptive { .. } => Duration::ZERO,
        };
        PollWindow { policy, current }
    }

    /// Whether the worker ever polls (if not, it need not time its idle gaps).
    pub fn is_off(&self) -> bool {
        self.policy == PollPolicy::Off
    }

    /// How long to poll after a pass that moved frames (zero: sleep at once).
    pub fn window(&self) -> Duration {
        self.current
    }

    /// The worker was idle for `gap` between the end of a pass that moved frames and its next
    /// event (polled, or woken from sleep).
    pub fn record_gap(&mut self, gap: Duration) {
        let PollPolicy::Adaptive { max } = self.policy else {
            return;
        };
        if gap <= self.current {
            return;
        }
        self.current = if gap <= max {
            (self.current * 2).max(GROW_START).min(max)
        } else if self.current / 2 < GROW_START {
            Duration::ZERO
        } else {
            self.current / 2
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(v: u64) -> Duration {
        Duration::from_micros(v)
    }

    #[test]
    fn test_policy_from_flags() {
        assert_eq!(PollPolicy::from_micros(0, 0), PollPolicy::Off);
        assert_eq!(PollPolicy::from_micros(0, 50), PollPolicy::Adaptive { max: us(50) });
        assert_eq!(PollPolicy::from_micros(20, 50), PollPolicy::Fixed(us(20)));
        assert_eq!(PollPolicy::from_micros(20, 0), PollPolicy::Fixed(us(20)));
    }

    #[test]
    fn test_off_and_fixed_windows_never_change() {
        let mut off = PollWindow::new(PollPolicy::Off);
        let mut fixed = PollWindow::new(PollPolicy::Fixed(us(30)));
        assert!(off.is_off() && !fixed.is_off());
        for gap in [1, 5, 25, 40, 1000, 3] {
            off.record_gap(us(gap));
            fixed.record_gap(us(gap));
            assert_eq!(off.window(), Duration::ZERO);
            assert_eq!(fixed.window(), us(30));
        }
    }

    #[test]
    fn test_adaptive_starts_asleep_and_grows_to_catch_short_gaps() {
        let mut w = PollWindow::new(PollPolicy::Adaptive { max: us(50) });
        assert_eq!(w.window(), Duration::ZERO, "no history: sleep at once");
        let mut seen = Vec::new();
        for _ in 0..5 {
            w.record_gap(us(30));
            seen.push(w.window());
        }
        // 0 -> 10 -> 20 -> 40 catches a 30 us gap; it stays there while gaps fit.
        assert_eq!(seen, vec![us(10), us(20), us(40), us(40), us(40)]);
    }

    #[test]
    fn test_adaptive_never_exceeds_its_maximum() {
        let mut w = PollWindow::new(PollPolicy::Adaptive { max: us(50) });
        for _ in 0..10 {
            w.record_gap(us(50));
        }
        assert_eq!(w.window(), us(50));
    }

    #[test]
    fn test_adaptive_shrinks_to_nothing_after_long_gaps() {
        let mut w = PollWindow::new(PollPolicy::Adaptive { max: us(200) });
        for _ in 0..6 {
            w.record_gap(us(150));
        }
        assert_eq!(w.window(), us(160));
        let mut seen = Vec::new();
        for _ in 0..5 {
            w.record_gap(Duration::from_millis(5));
            seen.push(w.window());
        }
        assert_eq!(seen, vec![us(80), us(40), us(20), us(10), Duration::ZERO]);
    }

    #[test]
    fn test_adaptive_gap_inside_the_window_keeps_it() {
        let mut w = PollWindow::new(PollPolicy::Adaptive { max: us(50) });
        w.record_gap(us(40));
        w.record_gap(us(40));
        assert_eq!(w.window(), us(20));
        for gap in [1, 19, 20] {
            w.record_gap(us(gap));
            assert_eq!(w.window(), us(20), "a gap of {gap} us was caught by the poll");
        }
    }
}
