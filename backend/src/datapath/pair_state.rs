//! What each direction of a queue pair is waiting for, and why a pair stopped: the worker's
//! epoll events and batch outcomes move these, and they alone decide whether a pass runs, whether
//! the worker may sleep, and which tap events it polls for.

use vmm_sys_util::epoll::EventSet;

/// The TX direction: guest frames to the tap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxState {
    /// Frames may be waiting: run a pass.
    Pending,
    /// The ring was empty with kicks enabled: wait for a kick.
    Idle,
    /// The tap is full, with frames left: wait for it to take more (EPOLLOUT).
    Blocked,
    /// The ring is broken: nothing moves until the frontend resets it.
    Broken,
}

impl TxState {
    /// The guest kicked: a blocked or broken ring still waits for its own event.
    pub fn on_kick(&mut self) {
        if *self == TxState::Idle {
            *self = TxState::Pending;
        }
    }

    /// The tap can take frames again.
    pub fn on_tap_writable(&mut self) {
        if *self != TxState::Broken {
            *self = TxState::Pending;
        }
    }

    pub fn wants_pass(self) -> bool {
        self == TxState::Pending
    }

    /// The tap events this direction waits for.
    pub fn tap_interest(self) -> EventSet {
        if self == TxState::Blocked {
            EventSet::OUT
        } else {
            EventSet::empty()
        }
    }
}

/// The RX direction: tap frames to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxState {
    /// Frames may be waiting on the tap: run a pass.
    Pending,
    /// The tap had nothing more: wait for it to become readable.
    Idle,
    /// Too few guest buffers for the largest frame, with kicks enabled: wait for a kick (the
    /// tap is not polled meanwhile, so a readable tap does not spin the loop).
    WaitingBuffers,
    /// The ring is broken: nothing moves until the frontend resets it.
    Broken,
}

impl RxState {
    /// The guest kicked: it posted buffers.
    pub fn on_kick(&mut self) {
        if *self != RxState::Broken {
            *self = RxState::Pending;
        }
    }

    /// The tap has frames (or an error to report).
    pub fn on_tap_readable(&mut self) {
        if *self == RxState::Idle {
            *self = RxState::Pending;
        }
    }

    pub fn wants_pass(self) -> bool {
        self == RxState::Pending
    }

    /// The tap events this direction waits for.
    pub fn tap_interest(self) -> EventSet {
        match self {
            RxState::Pending | RxState::Idle => EventSet::IN,
            RxState::WaitingBuffers | RxState::Broken => EventSet::empty(),
        }
    }
}

/// Why a pair stopped moving frames for good (until its connection closes). Each reason is
/// recorded, and reported, once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Halt {
    tap_gone: bool,
    memory_lost: bool,
}

impl Halt {
    pub fn is_halted(self) -> bool {
        self.tap_gone || self.memory_lost
    }

    pub fn memory_lost(self) -> bool {
        self.memory_lost
    }

    /// Records that the tap failed for good; true the first time.
    pub fn set_tap_gone(&mut self) -> bool {
        !std::mem::replace(&mut self.tap_gone, true)
    }

    /// Records that the guest memory was lost; true the first time.
    pub fn set_memory_lost(&mut self) -> bool {
        !std::mem::replace(&mut self.memory_lost, true)
    }
}

/// Both directions and the halt: the whole of a pair's scheduling state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PairState {
    pub tx: TxState,
    pub rx: RxState,
    pub halt: Halt,
}

impl PairState {
    /// A new pair looks at both rings once: the guest may have queued frames and buffers before
    /// it started.
    pub fn new() -> Self {
        PairState { tx: TxState::Pending, rx: RxState::Pending, halt: Halt::default() }
    }

    pub fn tx_wants_pass(&self) -> bool {
        self.tx.wants_pass() && !self.halt.is_halted()
    }

    pub fn rx_wants_pass(&self) -> bool {
        self.rx.wants_pass() && !self.halt.is_halted()
    }

    /// Whether a pass is due now, so the worker must not sleep.
    pub fn has_pending_work(&self) -> bool {
        self.tx_wants_pass() || self.rx_wants_pass()
    }

    /// The tap events to poll: readable only while RX can take frames, writable only while TX
    /// is blocked on it, so a level-triggered tap never makes the loop spin; none once halted.
    pub fn tap_interest(&self) -> EventSet {
        if self.halt.is_halted() {
            EventSet::empty()
        } else {
            self.tx.tap_interest() | self.rx.tap_interest()
        }
    }
}

impl Default for PairState {
    fn default() -> Self {
        PairState::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TX_ALL: [TxState; 4] = [TxState::Pending, TxState::Idle, TxState::Blocked, TxState::Broken];
    const RX_ALL: [RxState; 4] = [RxState::Pending, RxState::Idle, RxState::WaitingBuffers, RxState::Broken];

    fn after(mut s: TxState, event: fn(&mut TxState)) -> TxState {
        event(&mut s);
        s
    }

    fn after_rx(mut s: RxState, event: fn(&mut RxState)) -> RxState {
        event(&mut s);
        s
    }

    #[test]
    fn test_tx_state_events() {
        let kicked: Vec<_> = TX_ALL.iter().map(|&s| after(s, TxState::on_kick)).collect();
        assert_eq!(kicked, [TxState::Pending, TxState::Pending, TxState::Blocked, TxState::Broken], "a kick does not unblock the tap");
        let writable: Vec<_> = TX_ALL.iter().map(|&s| after(s, TxState::on_tap_writable)).collect();
        assert_eq!(writable, [TxState::Pending, TxState::Pending, TxState::Pending, TxState::Broken]);
        let passes: Vec<_> = TX_ALL.iter().map(|s| s.wants_pass()).collect();
        assert_eq!(passes, [true, false, false, false]);
        let interest: Vec<_> = TX_ALL.iter().map(|s| s.tap_interest()).collect();
        assert_eq!(interest, [EventSet::empty(), EventSet::empty(), EventSet::OUT, EventSet::empty()]);
    }

    #[test]
    fn test_rx_state_events() {
        let kicked: Vec<_> = RX_ALL.iter().map(|&s| after_rx(s, RxState::on_kick)).collect();
        assert_eq!(kicked, [RxState::Pending, RxState::Pending, RxState::Pending, RxState::Broken]);
        let readable: Vec<_> = RX_ALL.iter().map(|&s| after_rx(s, RxState::on_tap_readable)).collect();
        assert_eq!(
            readable,
            [RxState::Pending, RxState::Pending, RxState::WaitingBuffers, RxState::Broken],
            "frames on the tap do not help a ring without buffers"
        );
        let passes: Vec<_> = RX_ALL.iter().map(|s| s.wants_pass()).collect();
        assert_eq!(passes, [true, false, false, false]);
        let interest: Vec<_> = RX_ALL.iter().map(|s| s.tap_interest()).collect();
        assert_eq!(interest, [EventSet::IN, EventSet::IN, EventSet::empty(), EventSet::empty()]);
    }

    #[test]
    fn test_halt_reports_each_reason_once() {
        let mut halt = Halt::default();
        assert!(!halt.is_halted());
        assert!(halt.set_tap_gone());
        assert!(!halt.set_tap_gone());
        assert!(halt.is_halted() && !halt.memory_lost());
        assert!(halt.set_memory_lost());
        assert!(!halt.set_memory_lost());
        assert!(halt.memory_lost());
    }

    #[test]
    fn test_pair_state_starts_pending_and_a_halt_stops_everything() {
        let mut s = PairState::new();
        assert!(s.tx_wants_pass() && s.rx_wants_pass() && s.has_pending_work());
        assert_eq!(s.tap_interest(), EventSet::IN);
        s.tx = TxState::Blocked;
        s.rx = RxState::Idle;
        assert!(!s.has_pending_work(), "both wait for the tap");
        assert_eq!(s.tap_interest(), EventSet::IN | EventSet::OUT);
        s.rx = RxState::WaitingBuffers;
        assert_eq!(s.tap_interest(), EventSet::OUT);
        s.tx = TxState::Pending;
        s.rx = RxState::Pending;
        s.halt.set_memory_lost();
        assert!(!s.tx_wants_pass() && !s.rx_wants_pass() && !s.has_pending_work());
        assert_eq!(s.tap_interest(), EventSet::empty());
    }
}
