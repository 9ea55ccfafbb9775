//! One thread per queue pair: an epoll loop over the tap fd, the two kick eventfds and a stop
//! eventfd, running the TX and RX batch loops in turn.
//!
//! On each wake it drains each direction until the ring is empty, the tap would block, or the
//! batch budget runs out (frames, and for RX also chains popped, so a guest that never stops
//! posting, even bad chains, cannot keep the thread from its stop eventfd); does one used-ring
//! update per batch; signals the guest at most once per batch; then re-enables notifications
//! and re-checks before sleeping. Work left when a budget runs out stays pending, so the next
//! epoll_wait does not sleep. A polling worker (`--busy-poll-us`, `--adaptive-poll-us`) leaves
//! the guest's TX kicks off while its poll window is open and looks at the TX ring itself, as
//! vhost-net's busyloop does: the guest then sends without a system call per frame. It looks at
//! the tap by reading it, which takes a waiting frame in one system call where epoll_wait and a
//! read take two; one look in five still goes through epoll_wait, for the stop request and the
//! rest.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use log::{debug, error, warn};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vutap_virtio::Features;

use crate::cli::Policy;
use crate::control::memory::GuestMem;
use crate::control::memory_guard::{FaultWatch, RangeGuard};
use crate::datapath::dirty_log::DirtyLog;
use crate::datapath::flat_mem::FlatMem;
use crate::datapath::pair_state::{PairState, RxState, TxState};
use crate::datapath::poll_window::{PollPolicy, PollWindow};
use crate::datapath::rx::{RxLoop, RxOutcome};
use crate::datapath::tap_io::TapControl;
use crate::datapath::tx::{TxLoop, TxOutcome};
use crate::datapath::used_ring::log_used_ring;
use crate::metrics::{PairCounts, PairMetrics};
use crate::operations::sandbox::ThreadKind;

/// Exit status for `--exit-on-tap-loss` (EX_TEMPFAIL: a supervisor should restart vutap).
pub const EXIT_TAP_LOST: i32 = 75;

/// Frames per direction per batch: enough to amortise the used-ring update and the interrupt
/// (waking a sleeping guest thread costs ~10 us of this thread's CPU on a VM host: at 64 it was
/// 200-280 ns per RX frame, at 128 120-190), small enough that RX and TX take turns often (a
/// full RX batch of 1500 B frames is ~0.3 ms).
pub const BATCH_BUDGET: usize = 128;

/// While a worker polls, how many of its looks at the tap are reads for each one through
/// epoll_wait (which also sees the stop request, the kicks and a tap that takes frames again):
/// a read takes the frame that is there with the one system call epoll_wait would spend saying
/// so. Four keep a stop request waiting a couple of microseconds at most.
const READ_LOOKS_PER_EPOLL: u32 = 4;

const TOKEN_STOP: u64 = 1;
const TOKEN_RX_KICK: u64 = 2;
const TOKEN_TX_KICK: u64 = 3;
const TOKEN_TAP: u64 = 4;

/// The call eventfd of a ring; the frontend may replace it while the ring runs.
pub type CallFd = Arc<Mutex<Option<EventFd>>>;

pub struct RingSetup {
    pub queue: Queue,
    pub kick: EventFd,
    pub call: CallFd,
}

pub struct WorkerSetup<T: TapControl> {
    pub pair: usize,
    pub tap: Arc<T>,
    pub mem: GuestMem,
    pub features: Features,
    pub mtu: u16,
    pub rx: RingSetup,
    pub tx: RingSetup,
    pub metrics: Arc<PairMetrics>,
    /// The thread's seccomp filter, and whether a lost tap ends the process (`--exit-on-tap-loss`).
    pub policy: Policy,
    /// The migration dirty log, while the frontend has VHOST_F_LOG_ALL on.
    pub log: Option<Arc<DirtyLog>>,
    /// Tells whether the device's guest memory was lost (an fd shrank under the mapping).
    pub faults: FaultWatch,
    /// Keeps `mem`'s ranges guarded against SIGBUS until this worker let go of `mem` (fields
    /// drop in declaration order: keep this one last).
    pub mem_guards: Arc<Vec<RangeGuard>>,
}

/// What a stopped worker hands back: the rings' positions (for GET_VRING_BASE) and kick fds.
pub struct StoppedPair {
    pub rx: Queue,
    pub tx: Queue,
    pub rx_kick: EventFd,
    pub tx_kick: EventFd,
}

pub struct Worker {
    stop: EventFd,
    thread: JoinHandle<StoppedPair>,
}

impl Worker {
    pub fn spawn<T: TapControl>(setup: WorkerSetup<T>) -> io::Result<Worker> {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let stop_for_thread = stop.try_clone()?;
        let pair = setup.pair;
        let thread = std::thread::Builder::new().name(format!("vutap-q{pair}")).spawn(move || {
            setup.policy.seccomp.enter(ThreadKind::Worker);
            PairLoop::new(setup, stop_for_thread).run()
        })?;
        Ok(Worker { stop, thread })
    }

    /// Stops the thread and takes the rings back. Held RX chains are returned to the ring first.
    pub fn stop(self) -> Option<StoppedPair> {
        if let Err(e) = self.stop.write(1) {
            error!("cannot signal worker to stop: {e}");
        }
        match self.thread.join() {
            Ok(stopped) => Some(stopped),
            Err(_) => {
                error!("queue worker panicked; its ring positions are lost");
                None
            }
        }
    }
}

fn epoll_add(epoll: &Epoll, fd: &impl AsRawFd, token: u64, events: EventSet) -> io::Result<()> {
    epoll.ctl(ControlOperation::Add, fd.as_raw_fd(), EpollEvent::new(events, token))
}

fn signal(call: &CallFd, counts: &mut PairCounts) {
    let guard = call.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(fd) = guard.as_ref() {
        if let Err(e) = fd.write(1) {
            debug!("call eventfd write failed: {e}");
        } else {
            counts.interrupts += 1;
        }
    }
}

struct PairLoop<T: TapControl> {
    // The loops come first so they drop first: the RX loop's held chains keep a handle on the
    // guest memory, which must be unmapped before `setup` lets go of its SIGBUS guards.
    tx: TxLoop,
    rx: RxLoop,
    /// `setup.mem` as the loops read it.
    mem: FlatMem,
    setup: WorkerSetup<T>,
    stop: EventFd,
    counts: PairCounts,
    state: PairState,
    tap_interest: Option<EventSet>,
    /// Whether the worker polls: it then leaves the guest's TX kicks off after a pass and looks
    /// at the TX ring itself while its poll window is open, as vhost-net's busyloop does.
    polls: bool,
    /// TX kicks are off (left so after a pass): they must be asked for again before sleeping.
    tx_kicks_off: bool,
}

impl<T: TapControl> PairLoop<T> {
    fn new(setup: WorkerSetup<T>, stop: EventFd) -> Self {
        let tx = TxLoop::new(BATCH_BUDGET, setup.tx.queue.size(), setup.features.hdr_len())
            .with_log(setup.log.clone())
            .with_fault_watch(Some(setup.faults));
        let mem = FlatMem::new(setup.mem.clone());
        let polls = setup.policy.poll != PollPolicy::Off;
        let rx = RxLoop::new(BATCH_BUDGET, setup.rx.queue.size(), setup.features, setup.mtu, &mem)
            .with_log(setup.log.clone())
            .with_fault_watch(Some(setup.faults))
            .publishing_first_frame(polls);
        PairLoop {
            tx,
            rx,
            mem,
            setup,
            stop,
            counts: PairCounts::default(),
            state: PairState::new(),
            tap_interest: None,
            polls,
            tx_kicks_off: false,
        }
    }

    fn run(mut self) -> StoppedPair {
        if let Err(e) = self.event_loop() {
            error!("queue pair {}: event loop failed: {e}", self.setup.pair);
        }
        let mem = &self.mem;
        if self.rx.return_held(&mut self.setup.rx.queue, mem) {
            signal(&self.setup.rx.call, &mut self.counts);
        }
        self.setup.metrics.add(&self.counts);
        StoppedPair { rx: self.setup.rx.queue, tx: self.setup.tx.queue, rx_kick: self.setup.rx.kick, tx_kick: self.setup.tx.kick }
    }

    fn event_loop(&mut self) -> io::Result<()> {
        let epoll = Epoll::new()?;
        epoll_add(&epoll, &self.stop, TOKEN_STOP, EventSet::IN)?;
        epoll_add(&epoll, &self.setup.rx.kick, TOKEN_RX_KICK, EventSet::IN)?;
        epoll_add(&epoll, &self.setup.tx.kick, TOKEN_TX_KICK, EventSet::IN)?;
        self.update_tap_interest(&epoll)?;
        // RX kicks only matter when we run out of buffers; suppress them until then.
        let _ = self.setup.rx.queue.disable_notification(&self.mem);
        let mut events = vec![EpollEvent::default(); 8];
        let mut poll = PollWindow::new(self.setup.policy.poll);
        // Since when the worker has been idle after a pass that moved frames, and until when it
        // keeps polling instead of sleeping.
        let mut idle_since: Option<Instant> = None;
        let mut poll_until: Option<Instant> = None;
        let mut looks: u32 = 0;
        loop {
            let polling = poll_until.is_some_and(|t| Instant::now() < t);
            if !polling && self.tx_kicks_off {
                self.resume_tx_kicks();
            }
            looks = looks.wrapping_add(1);
            let read_look = polling && !looks.is_multiple_of(READ_LOOKS_PER_EPOLL + 1) && self.can_read_ahead();
            let timeout = if self.state.has_pending_work() || polling { 0 } else { -1 };
            let n = if read_look && !self.state.has_pending_work() {
                0
            } else {
                match epoll.wait(timeout, &mut events) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            };
            // Looked at the TX ring first: a frame the guest sent goes out before one is read.
            let found = n == 0 && polling && (self.tx_frame_posted() || (read_look && self.read_ahead()));
            if n == 0 && polling && !self.state.has_pending_work() && !found {
                continue;
            }
            if let Some(since) = idle_since.take() {
                if n > 0 || found {
                    poll.record_gap(since.elapsed());
                }
            }
            self.counts.wakeups += 1;
            self.counts.poll_finds += u64::from(found);
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_STOP => return Ok(()),
                    TOKEN_RX_KICK => {
                        let _ = self.setup.rx.kick.read();
                        self.counts.kicks += 1;
                        self.state.rx.on_kick();
                        let _ = self.setup.rx.queue.disable_notification(&self.mem);
                    }
                    TOKEN_TX_KICK => {
                        let _ = self.setup.tx.kick.read();
                        self.counts.kicks += 1;
                        self.state.tx.on_kick();
                    }
                    TOKEN_TAP => {
                        let set = ev.event_set();
                        if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
                            self.state.rx.on_tap_readable();
                        }
                        if set.contains(EventSet::OUT) {
                            self.state.tx.on_tap_writable();
                        }
                    }
                    _ => {}
                }
            }
            if !self.state.halt.memory_lost() && self.setup.faults.lost() {
                self.mark_memory_lost();
            }
            self.run_tx();
            self.run_rx();
            self.update_tap_interest(&epoll)?;
            if !poll.is_off() && self.counts.tx_frames + self.counts.rx_frames > 0 {
                let now = Instant::now();
                idle_since = Some(now);
                let window = poll.window();
                poll_until = (!window.is_zero()).then(|| now + window);
            }
            self.setup.metrics.add(&self.counts);
            self.counts = PairCounts::default();
        }
    }

    fn run_tx(&mut self) {
        if !self.state.tx_wants_pass() {
            return;
        }
        let mem = &self.mem;
        let queue = &mut self.setup.tx.queue;
        let _ = queue.disable_notification(mem);
        let (outcome, notify) = self.tx.process(queue, mem, &*self.setup.tap, &mut self.counts);
        if notify {
            signal(&self.setup.tx.call, &mut self.counts);
        }
        match outcome {
            TxOutcome::Idle if self.polls => {
                // The poll loop looks at the ring; kicks come back before the worker sleeps.
                self.tx_kicks_off = true;
                self.state.tx = TxState::Idle;
            }
            TxOutcome::Idle => {
                self.state.tx = TxState::Idle;
                self.resume_tx_kicks();
            }
            TxOutcome::MoreWork => self.state.tx = TxState::Pending,
            TxOutcome::Blocked => self.state.tx = TxState::Blocked,
            TxOutcome::TapGone(e) => self.mark_tap_gone(&e),
            TxOutcome::MemoryLost => self.mark_memory_lost(),
            TxOutcome::RingBroken(why) => {
                error!("queue pair {}: TX ring broken, stopping it until the frontend resets it: {why}", self.setup.pair);
                self.state.tx = TxState::Broken;
                self.counts.rings_broken += 1;
            }
        }
    }

    /// Re-enables TX kicks, then looks again: the guest may have added a frame between the last
    /// look and the enable.
    fn resume_tx_kicks(&mut self) {
        self.tx_kicks_off = false;
        if self.state.halt.is_halted() {
            return;
        }
        let queue = &mut self.setup.tx.queue;
        let more = queue.enable_notification(&self.mem).unwrap_or(false);
        if let Some(log) = &self.setup.log {
            log_used_ring(queue, log);
        }
        if more {
            self.state.tx.on_kick();
        }
    }

    /// While TX kicks are off: whether the guest has posted a frame since the last pass (then
    /// a pass is due, as if it had kicked).
    fn tx_frame_posted(&mut self) -> bool {
        if !self.tx_kicks_off || self.state.halt.is_halted() {
            return false;
        }
        let queue = &self.setup.tx.queue;
        let posted = queue.avail_idx(&self.mem, Ordering::Acquire).is_ok_and(|idx| idx.0 != queue.next_avail());
        if posted {
            self.state.tx.on_kick();
        }
        posted && self.state.tx_wants_pass()
    }

    /// Whether a poll look at the tap may be a read: RX waits only for the tap, and holds room
    /// for a frame (so an empty read changes nothing).
    fn can_read_ahead(&self) -> bool {
        self.state.rx == RxState::Idle && !self.state.halt.is_halted() && self.rx.has_room()
    }

    /// A poll look at the tap that is a read: an RX pass as if epoll had said the tap is
    /// readable. Whether it found anything (a frame, or a state that needs the loop).
    fn read_ahead(&mut self) -> bool {
        let seen = (self.counts.rx_frames, self.counts.rx_dropped);
        self.state.rx.on_tap_readable();
        self.run_rx();
        self.state.rx != RxState::Idle || (self.counts.rx_frames, self.counts.rx_dropped) != seen
    }

    fn run_rx(&mut self) {
        if !self.state.rx_wants_pass() {
            return;
        }
        let mem = &self.mem;
        let queue = &mut self.setup.rx.queue;
        let (outcome, notify) = self.rx.process(queue, mem, &*self.setup.tap, &mut self.counts);
        if notify {
            signal(&self.setup.rx.call, &mut self.counts);
        }
        match outcome {
            RxOutcome::Idle => self.state.rx = RxState::Idle,
            RxOutcome::MoreWork => self.state.rx = RxState::Pending,
            RxOutcome::NoBuffers => {
                // Ask for a kick when buffers come, then re-check for ones that raced the enable.
                let more = queue.enable_notification(mem).unwrap_or(false);
                if let Some(log) = &self.setup.log {
                    log_used_ring(queue, log);
                }
                self.state.rx = if more { RxState::Pending } else { RxState::WaitingBuffers };
            }
            RxOutcome::TapGone(e) => self.mark_tap_gone(&e),
            RxOutcome::MemoryLost => self.mark_memory_lost(),
            RxOutcome::RingBroken(why) => {
                error!("queue pair {}: RX ring broken, stopping it until the frontend resets it: {why}", self.setup.pair);
                self.state.rx = RxState::Broken;
                self.counts.rings_broken += 1;
            }
        }
    }

    fn mark_tap_gone(&mut self, e: &io::Error) {
        if self.setup.policy.exit_on_tap_loss {
            error!("queue pair {}: tap failed ({e}); exiting with status {EXIT_TAP_LOST} (--exit-on-tap-loss)", self.setup.pair);
            log::logger().flush();
            std::process::exit(EXIT_TAP_LOST);
        }
        if self.state.halt.set_tap_gone() {
            warn!("queue pair {}: tap failed ({e}); this queue pair stops moving frames", self.setup.pair);
        }
    }

    /// Stops the pair: its guest memory now reads as zeros. The device's serving thread was
    /// woken by the SIGBUS guard and closes the connection, which stops this worker.
    fn mark_memory_lost(&mut self) {
        if self.state.halt.set_memory_lost() {
            error!(
                "queue pair {}: guest memory lost (an fd shrank under the mapping); this queue pair stops until the connection closes",
                self.setup.pair
            );
        }
    }

    /// Polls the tap for what the pair's state waits for (see [`PairState::tap_interest`]).
    fn update_tap_interest(&mut self, epoll: &Epoll) -> io::Result<()> {
        let want = self.state.tap_interest();
        let fd = self.setup.tap.as_raw_fd();
        match (self.tap_interest, want.is_empty()) {
            (Some(cur), false) if cur == want => {}
            (Some(_), false) => epoll.ctl(ControlOperation::Modify, fd, EpollEvent::new(want, TOKEN_TAP))?,
            (None, false) => epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(want, TOKEN_TAP))?,
            (Some(_), true) => epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default())?,
            (None, true) => {}
        }
        self.tap_interest = if want.is_empty() { None } else { Some(want) };
        Ok(())
    }
}
