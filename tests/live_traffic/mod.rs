//! Traffic whose every reply and every 100 ms interval carries the host's clock, so a short
//! event (a live upgrade, a restart) can be matched to what the guest's traffic saw around it:
//! a 10 ms ping from the peer namespace, an `iperf3 --bidir` client in the peer namespace
//! against a server in the guest, and the frame counters on both ends of the path.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vutap_testbed::{Guest, Topology};

/// Lines of a child's stdout, each stamped with the host time it arrived (busybox ping and
/// `iperf3 --forceflush` flush every line, so the stamp is when the event happened, give or take
/// the pipe).
struct StampedLines {
    child: Child,
    reader: JoinHandle<Vec<(Instant, String)>>,
    /// Lines read so far that contain `counted`.
    seen: Arc<AtomicUsize>,
}

impl StampedLines {
    fn spawn(netns: &str, args: &[&str], counted: &'static str) -> StampedLines {
        let mut child = Command::new("ip")
            .args(["netns", "exec", netns])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {args:?}: {e}"));
        let out = child.stdout.take().expect("piped stdout");
        let seen = Arc::new(AtomicUsize::new(0));
        let counter = seen.clone();
        let reader = std::thread::spawn(move || {
            BufReader::new(out)
                .lines()
                .map_while(|l| l.ok())
                .inspect(|l| {
                    if l.contains(counted) {
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                })
                .map(|l| (Instant::now(), l))
                .collect()
        });
        StampedLines { child, reader, seen }
    }

    /// Sends SIGINT (ping then prints its summary) and collects every line.
    fn interrupt(self) -> Vec<(Instant, String)> {
        // SAFETY: kill(2) on our own child (`ip netns exec` execs the tool in place), not yet
        // reaped, so the pid cannot have been reused.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
        self.finish()
    }

    fn finish(mut self) -> Vec<(Instant, String)> {
        let _ = self.child.wait();
        self.reader.join().expect("line reader")
    }
}

/// `busybox ping -i 0.01` from the peer namespace, until [`Pinger::stop`].
pub struct Pinger(StampedLines);

/// The replies of a ping run: (sequence number, host arrival time).
#[derive(Debug, Clone)]
pub struct PingRun {
    pub replies: Vec<(u32, Instant)>,
}

impl Pinger {
    pub fn start(topo: &Topology, target: &str) -> Pinger {
        Pinger(StampedLines::spawn(&topo.netns, &["busybox", "ping", "-i", "0.01", "-W", "1", target], "seq="))
    }

    pub fn stop(self) -> PingRun {
        let replies = self
            .0
            .interrupt()
            .into_iter()
            .filter_map(|(at, l)| {
                let seq = l.split("seq=").nth(1)?.split_whitespace().next()?;
                Some((seq.parse().ok()?, at))
            })
            .collect();
        PingRun { replies }
    }
}

impl PingRun {
    /// Requests with no reply between the first and the last answered one (the run is ended by
    /// SIGINT, so the few still in flight then are not counted as lost).
    pub fn lost(&self) -> u32 {
        let (Some(first), Some(last)) = (self.replies.first(), self.replies.last()) else {
            return 0;
        };
        let mut seqs: Vec<u32> = self.replies.iter().map(|r| r.0).collect();
        seqs.sort_unstable();
        seqs.dedup();
        (last.0 - first.0 + 1).saturating_sub(seqs.len() as u32)
    }

    /// The longest time between two consecutive replies whose gap overlaps `window` (all gaps
    /// when `window` is `None`).
    pub fn longest_gap(&self, window: Option<(Instant, Instant)>) -> Duration {
        self.replies
            .windows(2)
            .filter(|w| window.is_none_or(|win| overlaps((w[0].1, w[1].1), win)))
            .map(|w| w[1].1 - w[0].1)
            .max()
            .unwrap_or_default()
    }

    /// The longest time between two consecutive replies whose gap overlaps none of `windows`:
    /// what the traffic alone does to the ping on this host.
    pub fn longest_gap_outside(&self, windows: &[(Instant, Instant)]) -> Duration {
        self.replies
            .windows(2)
            .filter(|w| !windows.iter().any(|&win| overlaps((w[0].1, w[1].1), win)))
            .map(|w| w[1].1 - w[0].1)
            .max()
            .unwrap_or_default()
    }
}

fn overlaps(a: (Instant, Instant), b: (Instant, Instant)) -> bool {
    a.1 >= b.0 && a.0 <= b.1
}

/// One 100 ms iperf3 interval of one direction: host time the line arrived and its rate.
#[derive(Debug, Clone, Copy)]
pub struct Interval {
    pub at: Instant,
    pub kbps: f64,
}

/// `iperf3 --bidir -i 0.1` from the peer (client) to the guest (server), both directions at once.
pub struct Iperf(StampedLines);

/// The intervals of an iperf3 run: `to_guest` (peer → guest, the client's TX-C lines) and
/// `from_guest` (guest → peer, RX-C).
#[derive(Debug, Clone, Default)]
pub struct IperfRun {
    pub to_guest: Vec<Interval>,
    pub from_guest: Vec<Interval>,
    pub text: String,
}

impl Iperf {
    pub fn start(topo: &Topology, server: &str, port: u16, secs: u32) -> Iperf {
        let (port, secs) = (port.to_string(), secs.to_string());
        Iperf(StampedLines::spawn(
            &topo.netns,
            &[
                "iperf3",
                "-c",
                server,
                "-p",
                &port,
                "-t",
                &secs,
                "-i",
                "0.1",
                "--bidir",
                "--forceflush",
                "-f",
                "k",
                "--connect-timeout",
                "5000",
            ],
            "Kbits/sec",
        ))
    }

    /// Waits until `n` 100 ms intervals (both directions counted) have been reported: the
    /// connection is up and data flows, so events can start.
    pub fn wait_intervals(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.0.seen.load(Ordering::Relaxed) < n {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// Waits for the run to end (`-t` seconds after it started).
    pub fn finish(self) -> IperfRun {
        let lines = self.0.finish();
        let mut run = IperfRun::default();
        for (at, l) in &lines {
            run.text.push_str(l);
            run.text.push('\n');
            // "[  5][TX-C]   0.10-0.20   sec   128 KBytes  10484 Kbits/sec    0   1.12 MBytes"
            let Some(kbps) = rate_kbps(l) else { continue };
            // The summary lines ("0.00-5.00 sec ... sender") cover the whole run: skip them.
            if l.contains("sender") || l.contains("receiver") {
                continue;
            }
            let iv = Interval { at: *at, kbps };
            if l.contains("[TX-C]") {
                run.to_guest.push(iv);
            } else if l.contains("[RX-C]") {
                run.from_guest.push(iv);
            }
        }
        run
    }
}

fn rate_kbps(line: &str) -> Option<f64> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let i = words.iter().position(|w| *w == "Kbits/sec")?;
    words.get(i.checked_sub(1)?)?.parse().ok()
}

/// The median rate of `ivs` (after the first half second of TCP slow start) and the worst
/// interval overlapping `window`, in kbit/s.
pub fn dip(ivs: &[Interval], window: (Instant, Instant)) -> Option<(f64, f64)> {
    let median = median_kbps(ivs)?;
    let step = Duration::from_millis(100);
    let worst = ivs.iter().filter(|i| i.at >= window.0 && i.at - step <= window.1).map(|i| i.kbps).min_by(f64::total_cmp)?;
    Some((median, worst))
}

/// The median rate of `ivs` after the first half second (TCP slow start), in kbit/s.
pub fn median_kbps(ivs: &[Interval]) -> Option<f64> {
    let mut steady: Vec<f64> = ivs.iter().skip(5).map(|i| i.kbps).collect();
    steady.sort_by(f64::total_cmp);
    steady.get(steady.len() / 2).copied()
}

/// The worst interval (after slow start) overlapping none of `windows`, in kbit/s: how far the
/// rate swings on this host without any event.
pub fn worst_outside(ivs: &[Interval], windows: &[(Instant, Instant)]) -> Option<f64> {
    let step = Duration::from_millis(100);
    ivs.iter().skip(5).filter(|i| !windows.iter().any(|&w| overlaps((i.at - step, i.at), w))).map(|i| i.kbps).min_by(f64::total_cmp)
}

/// Frame counters of both ends and the drop/error counters of the host devices in between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathCounters {
    pub guest_rx: u64,
    pub guest_tx: u64,
    pub guest_carrier_changes: u64,
    pub peer_rx: u64,
    pub peer_tx: u64,
    /// rx/tx dropped + errors of the macvtap and the lower (a macvtap counts a frame it cannot
    /// queue for its reader as an rx error).
    pub host_drops: u64,
}

fn sysfs_u64(ifname: &str, stat: &str) -> u64 {
    let path = format!("/sys/class/net/{ifname}/statistics/{stat}");
    std::fs::read_to_string(&path).ok().and_then(|s| s.trim().parse().ok()).unwrap_or_else(|| panic!("read {path}"))
}

fn peer_counts(topo: &Topology) -> (u64, u64) {
    let p = &topo.peer;
    let out = topo
        .exec_ok(&["cat", &format!("/sys/class/net/{p}/statistics/rx_packets"), &format!("/sys/class/net/{p}/statistics/tx_packets")])
        .unwrap();
    let v: Vec<u64> = out.split_whitespace().filter_map(|t| t.parse().ok()).collect();
    assert_eq!(v.len(), 2, "peer counters: {out:?}");
    (v[0], v[1])
}

fn guest_counts(g: &mut Guest) -> (u64, u64, u64) {
    let s = "/sys/class/net/eth0";
    let out = g
        .run_ok(
            &format!("echo C $(cat {s}/statistics/rx_packets) $(cat {s}/statistics/tx_packets) $(cat {s}/carrier_changes)"),
            Duration::from_secs(20),
        )
        .unwrap();
    out.lines()
        .find_map(|l| {
            // The shell's prompt may precede the output on the same line.
            let v: Vec<u64> = l.rsplit_once("C ")?.1.split_whitespace().map(|t| t.parse().ok()).collect::<Option<_>>()?;
            (v.len() == 3).then(|| (v[0], v[1], v[2]))
        })
        .unwrap_or_else(|| panic!("guest counters: {out:?}"))
}

impl PathCounters {
    /// Reads the counters once nothing is on the way: the peer's counters must not move while
    /// the guest's are read (any frame the guest sent before its read would reach the peer
    /// within that time), so sent and received can be compared exactly.
    pub fn read_quiet(topo: &Topology, g: &mut Guest) -> PathCounters {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let before = peer_counts(topo);
            let (guest_rx, guest_tx, guest_carrier_changes) = guest_counts(g);
            let after = peer_counts(topo);
            if before == after || Instant::now() > deadline {
                assert_eq!(before, after, "the path never went quiet");
                let mut host_drops = 0;
                for dev in [topo.taps[0].ifname.as_str(), topo.lower.as_str()] {
                    for stat in ["rx_dropped", "tx_dropped", "rx_errors", "tx_errors"] {
                        host_drops += sysfs_u64(dev, stat);
                    }
                }
                return PathCounters { guest_rx, guest_tx, guest_carrier_changes, peer_rx: after.0, peer_tx: after.1, host_drops };
            }
        }
    }

    /// What happened between `self` (earlier) and `later`.
    pub fn delta(&self, later: &PathCounters) -> PathDelta {
        PathDelta {
            peer_sent: later.peer_tx - self.peer_tx,
            guest_received: later.guest_rx - self.guest_rx,
            guest_sent: later.guest_tx - self.guest_tx,
            peer_received: later.peer_rx - self.peer_rx,
            carrier_changes: later.guest_carrier_changes - self.guest_carrier_changes,
            host_drops: later.host_drops - self.host_drops,
        }
    }
}

/// Frames each way over one quiet-to-quiet window.
#[derive(Debug, Clone, Copy)]
pub struct PathDelta {
    pub peer_sent: u64,
    pub guest_received: u64,
    pub guest_sent: u64,
    pub peer_received: u64,
    pub carrier_changes: u64,
    pub host_drops: u64,
}

impl PathDelta {
    /// Frames the peer sent that the guest never received.
    pub fn rx_lost(&self) -> i64 {
        self.peer_sent as i64 - self.guest_received as i64
    }

    /// Frames the guest sent that the peer never received.
    pub fn tx_lost(&self) -> i64 {
        self.guest_sent as i64 - self.peer_received as i64
    }
}

/// Disables IPv6 on the peer, the lower and the macvtap, so that nothing but the guest and the
/// peer puts frames on the path (the lower's own router solicitations or MLD reports would reach
/// the peer without the guest having sent them).
pub fn quiet_ipv6(topo: &Topology) {
    for dev in [topo.lower.as_str(), topo.taps[0].ifname.as_str()] {
        vutap_testbed::link::disable_ipv6(dev).unwrap_or_else(|e| panic!("disable IPv6 on {dev}: {e}"));
    }
    topo.exec_ok(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]).unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_rate_kbps_reads_interval_lines() {
        let l = "[  5][TX-C]   0.10-0.20   sec   128 KBytes  10484 Kbits/sec    0   1.12 MBytes";
        assert_eq!(rate_kbps(l), Some(10484.0));
        assert_eq!(rate_kbps("Connecting to host 10.0.0.2, port 5201"), None);
    }
}
