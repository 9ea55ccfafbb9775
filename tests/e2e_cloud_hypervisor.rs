//! cloud-hypervisor for real, nested: KVM is not usable on the host, but QEMU's TCG emulates
//! AMD SVM, so an L1 guest (QEMU 10, TCG) loads kvm-amd and runs cloud-hypervisor v54 with an
//! L2 guest whose NIC is served by vutap on a macvtap inside L1.
//!
//! L1's init (scripts/l1-init, packed by scripts/build-l1.sh) runs every scenario unattended
//! and prints `CH_RESULT <scenario> ...` lines on its serial console; this test boots L1,
//! parses them and asserts. Scenarios: one queue pair (ping + iperf3 both ways), a second L2
//! boot on the same vutap, vutap upgraded live 5 times under a running L2 pinged every 10 ms
//! from the peer and then SIGKILLed and restarted under it, two queue pairs,
//! and the same-run baselines: CH's `vhost_user_net` on a tap, CH's built-in virtio-net on a tap
//! and on the macvtap's `/dev/tapN` (`fd=`).
//!
//! Needs root, `.deps/qemu10` and `.deps/guest` (scripts/install-deps.sh, build-guest.sh), a
//! release `vutap`, and the peer binaries in `$VUTAP_PEERS_DIR`, else `<repo>/../shared/peers`:
//! without them the test fails. `VUTAP_CH_SECS` sets iperf3's seconds per direction (default
//! 3), `VUTAP_CH_REPS` the rounds whose medians count (default 1); `VUTAP_CH_RESULTS=DIR`
//! writes `ch.json` and `ch.md` there (scripts/ch-bench.sh). `VUTAP_L1_DIR` puts the L1
//! initramfs elsewhere than `.deps/l1` (scripts/build-l1.sh reads it too).
//!
//! TCG's nested SVM sometimes fails under L1 or L2, not through anything vutap does: L1's kernel
//! crashes or locks up (`softlockup_panic=1` makes a lockup a crash), L1 resets (QEMU exits
//! before L1 printed `CH_DONE`) or L1 hangs without a word (L1 prints `CH_BEAT` every 5 s; the
//! test ends an L1 whose console is silent for a minute: CI once saw an L1 hang through the
//! rest of its 11-minute deadline), an L2's vCPU stops running (its console heartbeat falls
//! silent and L1 reports `l2_stalled`), or an L2 triple-faults (cloud-hypervisor: "Guest likely
//! triple-faulted", L1 reports `l2_resets`; seen under CH's built-in virtio-net as under vutap,
//! most often with two vCPUs) and the L2 that CH reboots does not then pass its traffic checks.
//! The scenario groups such a failure cut short (each baseline is a group of its own) run again
//! in a fresh L1, up to five times while the L1 runs so far took under 9 minutes (CI once met a
//! stall, a triple fault and a kernel crash in a row), and every L1 ends within 14 minutes of
//! the first's start; a failure past that fails the test. `VUTAP_CH_CRASH_L1=GROUP` crashes the
//! first L1 as GROUP starts, `VUTAP_CH_HANG_L1=GROUP` silences it there for good, and
//! `VUTAP_CH_STALL_L2=SCENARIO` freezes that scenario's cloud-hypervisor, to exercise those paths.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vutap_virtio::features::bit;

const VIRTIO_NET_F_CTRL_VQ: u32 = 17;
const VIRTIO_NET_F_MQ: u32 = 22;

/// The whole nested run (seven L2 boots) takes ~4 minutes on a quiet 2-core host.
const L1_DEADLINE: Duration = Duration::from_secs(11 * 60);

/// L1 prints `CH_BEAT` every 5 s (scripts/l1-init): a console silent this long is an L1 that hung.
const L1_SILENCE: Duration = Duration::from_secs(60);

/// What the test appends to the console of an L1 it ended: silent for [`L1_SILENCE`] (a hang of
/// nested SVM, rerun), or still running at its deadline (a failure).
const L1_HUNG: &str = "TEST: L1 hung, its console silent for";
const L1_TIMED_OUT: &str = "TEST: L1 still running at its deadline of";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests crate lives inside the workspace").to_path_buf()
}

fn peers_dir() -> PathBuf {
    std::env::var_os("VUTAP_PEERS_DIR").map(PathBuf::from).unwrap_or_else(|| repo_root().join("../shared/peers"))
}

/// QEMU 10 killed when the test ends, however it ends.
struct L1(Child);

impl Drop for L1 {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Where scripts/build-l1.sh puts the L1 initramfs: `$VUTAP_L1_DIR`, else `.deps/l1`.
fn l1_dir() -> PathBuf {
    std::env::var_os("VUTAP_L1_DIR").map_or_else(|| repo_root().join(".deps/l1"), PathBuf::from)
}

/// Boots L1 and waits for it to power off, for its console to fall silent for [`L1_SILENCE`] or
/// for `deadline`, whichever comes first; returns its serial console, with [`L1_HUNG`] or
/// [`L1_TIMED_OUT`] appended when the test ended it, and how long it ran. `faults` goes on L1's
/// command line as is (`ch_crash_in=...`, `ch_hang_in=...`, `ch_stall_in=...`).
fn run_l1(log_dir: &Path, secs: u32, reps: u32, only: &str, faults: &str, deadline: Duration) -> (String, Duration) {
    let root = repo_root();
    let qemu = root.join(".deps/qemu10");
    let console = log_dir.join(if only.is_empty() { "l1-console.log".to_string() } else { format!("l1-console-{only}.log") });
    let _ = std::fs::remove_file(&console);
    let stderr = File::create(log_dir.join("qemu.log")).expect("create qemu.log");
    let child = Command::new(qemu.join("usr/bin/qemu-system-x86_64"))
        .env("QEMU_MODULE_DIR", qemu.join("usr/lib/x86_64-linux-gnu/qemu"))
        .args(["-L".as_ref(), qemu.join("usr/share/qemu").as_os_str()])
        .args(["-L", "/usr/share/seabios", "-L", "/usr/lib/ipxe/qemu"])
        .args(["-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2", "-m", "2048"])
        .args(["-display", "none", "-nodefaults", "-no-reboot", "-monitor", "none"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(root.join(".deps/guest/vmlinuz"))
        .arg("-initrd")
        .arg(l1_dir().join("initrd.img"))
        // A soft lockup panics L1 (panic=-1 reboots, -no-reboot ends QEMU): TCG's nested SVM once
        // left a CPU of L1 stuck in a kworker for minutes, which only the deadline ended.
        .args([
            "-append",
            &format!("console=ttyS0 loglevel=1 panic=-1 softlockup_panic=1 ch_secs={secs} ch_reps={reps} ch_only={only} {faults}"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("spawn QEMU 10 (.deps/qemu10: run scripts/install-deps.sh)");
    let mut l1 = L1(child);
    let start = Instant::now();
    let (mut printed, mut last_output) = (0, start);
    // Ok(QEMU's exit status), or Err(why the test ended L1).
    let ended = loop {
        if let Some(status) = l1.0.try_wait().expect("wait for QEMU") {
            break Ok(status);
        }
        let len = std::fs::metadata(&console).map_or(0, |m| m.len());
        if len != printed {
            (printed, last_output) = (len, Instant::now());
        }
        if last_output.elapsed() >= L1_SILENCE {
            break Err(format!("{L1_HUNG} {} s", last_output.elapsed().as_secs()));
        }
        if start.elapsed() >= deadline {
            break Err(format!("{L1_TIMED_OUT} {} s", deadline.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    drop(l1);
    let mut text = std::fs::read_to_string(&console).unwrap_or_default();
    let how = match ended {
        Ok(status) => status.to_string(),
        Err(why) => {
            text.push_str(&format!("\n{why}\n"));
            why
        }
    };
    eprintln!("L1 ran {:.0} s ({how}); console: {}", start.elapsed().as_secs_f64(), console.display());
    (text, start.elapsed())
}

/// The scenario groups of scripts/l1-init, each announced by `CH_GROUP_DONE <group>` when it ends.
/// Each baseline is a group of its own: a failure of nested SVM reruns only the boot it hit.
const GROUPS: &[&str] = &["1q", "restart", "2q", "ch-vhost-user-net", "ch-tap", "ch-fd"];

fn group_of(scenario: &str) -> Option<&'static str> {
    match scenario {
        "vutap-1q" | "vutap-reboot" => Some("1q"),
        "vutap-restart" => Some("restart"),
        "vutap-2q" => Some("2q"),
        s => GROUPS.iter().copied().find(|g| *g == s),
    }
}

/// Why a run of L1 did not finish every group it ran, when the cause is TCG's nested SVM:
/// L1's kernel crashed or L1 reset (QEMU exited before `CH_DONE`: seen in CI as a silent exit
/// 20 s into the first L2 boot, and as "stack guard page was hit" in cloud-hypervisor's vcpu
/// thread while CH's own backend served L2), L1 hung (the test ended it, [`L1_HUNG`]), or an L2
/// stalled (see scripts/l1-init `watch_l2`) or triple-faulted and did not finish cleanly after
/// CH rebooted it. None of these is anything running in L1 can cause; any other unfinished
/// group is a failure, and so is an L1 still running at its deadline ([`L1_TIMED_OUT`]).
fn nested_failure(console: &str) -> Option<String> {
    if let Some(hang) = console.lines().find(|l| l.starts_with(L1_HUNG)) {
        let last = console.lines().rfind(|l| l.starts_with("CH_") && !l.starts_with("CH_BEAT"));
        let beat = console.lines().rfind(|l| l.starts_with("CH_BEAT"));
        return Some(format!(
            "{} (last beat: {}; last line: {})",
            hang.trim_start_matches("TEST: "),
            beat.unwrap_or("none").trim_end(),
            last.unwrap_or("none").trim_end()
        ));
    }
    if console.contains(L1_TIMED_OUT) {
        return None;
    }
    if !console.contains("CH_DONE") {
        let oops: Vec<&str> = console.lines().filter(|l| is_kernel_crash_line(l)).take(3).collect();
        return Some(if oops.is_empty() {
            "L1 stopped without finishing or a kernel message (a reset)".to_string()
        } else {
            format!("L1's kernel crashed: {}", oops.join(" | "))
        });
    }
    let stalled = stalled_scenarios(console);
    let reset: Vec<String> = reset_scenarios(console).iter().map(|(s, why)| format!("{s} (after the reboot: {why})")).collect();
    match (stalled.is_empty(), reset.is_empty()) {
        (true, true) => None,
        (false, true) => Some(format!("L2 stalled (console silent) in {stalled:?}")),
        (true, false) => Some(format!("L2 triple-faulted in {}", reset.join(", "))),
        (false, false) => Some(format!("L2 stalled (console silent) in {stalled:?}, triple-faulted in {}", reset.join(", "))),
    }
}

/// A printk line (`[  253.74] ...`) that reports a crash of L1's kernel.
fn is_kernel_crash_line(line: &str) -> bool {
    line.starts_with('[') && ["Kernel panic", "BUG: ", "Oops: ", "general protection fault"].iter().any(|m| line.contains(m))
}

/// The scenarios whose L2 triple-faulted (`CH_RESULT <scenario> l2_resets=N`, N > 0) and that
/// the rebooted L2 did not then finish cleanly. CH reboots a triple-faulted L2 on a new
/// vhost-user connection and L2 runs its script again, so a reset is no failure when the
/// rebooted L2 passes every traffic check ([`traffic_problem`]). It is one when L2 never said
/// `done`, when its traffic then failed (the crash cut a measurement short and what it left
/// behind, such as the peer's half of a TCP test, can starve the next one: seen in CI as
/// `tx_mbps=0` after a reset, never without one), and always for the restart scenario, whose
/// upgrade-and-kill sequence belongs to a single boot. Each comes with why it does not count.
fn reset_scenarios(console: &str) -> Vec<(String, String)> {
    let r = Results::parse(console);
    let mut out: Vec<(String, String)> = Vec::new();
    for line in &r.0 {
        let reset = line.head.is_empty() && line.get("l2_resets").and_then(|n| n.parse::<u32>().ok()).is_some_and(|n| n > 0);
        let s = &line.scenario;
        if reset && !out.iter().any(|(seen, _)| seen == s) {
            if let Some(why) = unclean_reboot(&r, s) {
                out.push((s.clone(), why));
            }
        }
    }
    out
}

/// Why the run of `scenario` after CH rebooted its L2 does not count (see [`reset_scenarios`]).
fn unclean_reboot(r: &Results, scenario: &str) -> Option<String> {
    if scenario == "vutap-restart" {
        return Some("its sequence belongs to a single boot".to_string());
    }
    traffic_problem(r, scenario)
}

/// The scenarios an L2 failure of nested SVM cut short: stalled or triple-faulted.
fn cut_short_scenarios(console: &str) -> Vec<String> {
    let mut out = stalled_scenarios(console);
    for (s, _) in reset_scenarios(console) {
        if !out.contains(&s) {
            out.push(s);
        }
    }
    out
}

/// The scenarios whose L2 L1 reported stalled (`CH_RESULT <scenario> l2_stalled=1 ...`).
fn stalled_scenarios(console: &str) -> Vec<String> {
    console
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix("CH_RESULT "))
        .filter(|l| l.split_whitespace().any(|w| w == "l2_stalled=1"))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// How many L1 runs one test may take: the first, and a fresh one for each failure of nested SVM.
const L1_ATTEMPTS: u32 = 6;

/// A fresh L1 starts only while the L1 runs so far took less than this in all, which keeps the
/// test inside CI's time (a rerun of one group takes ~1-2 minutes, the whole set ~5).
const RERUN_BUDGET: Duration = Duration::from_secs(9 * 60);

/// All L1 runs of one test end within this: each L1's deadline is what is left of it, at most
/// [`L1_DEADLINE`]. CI's other tests take ~11 minutes of its 30.
const TIME_BUDGET: Duration = Duration::from_secs(14 * 60);

/// What [`run_groups`] gives: the kept console and the failures survived, or the test failure.
type Outcome = Result<(String, Vec<String>), String>;

/// Runs every scenario group; groups cut short by a failure of nested SVM (`nested_failure`)
/// run again in a fresh L1 while [`L1_ATTEMPTS`] and [`RERUN_BUDGET`] allow.
/// `boot(only, faults, deadline)` runs one L1 and returns its console and how long it ran.
/// Returns the `CH_*` lines of each group's finished run and the failures survived, or why a
/// group could not be finished.
fn run_groups(mut boot: impl FnMut(&str, &str, Duration) -> (String, Duration)) -> Outcome {
    let mut kept = String::new();
    let mut survived = Vec::new();
    let mut pending: Vec<&str> = GROUPS.to_vec();
    let mut spent = Duration::ZERO;
    for attempt in 0..L1_ATTEMPTS {
        let only = if attempt == 0 { String::new() } else { pending.join(",") };
        // The forced faults apply to the first L1 only: they show the rerun path works.
        let faults = if attempt == 0 {
            let var = |name| std::env::var(name).unwrap_or_default();
            format!(
                "ch_crash_in={} ch_hang_in={} ch_stall_in={}",
                var("VUTAP_CH_CRASH_L1"),
                var("VUTAP_CH_HANG_L1"),
                var("VUTAP_CH_STALL_L2")
            )
        } else {
            String::new()
        };
        let (console, took) = boot(&only, &faults, L1_DEADLINE.min(TIME_BUDGET.saturating_sub(spent)));
        spent += took;
        let cut_short = cut_short_scenarios(&console);
        let cut_short_group = |g: &str| cut_short.iter().any(|s| group_of(s) == Some(g));
        let done = |g: &str| console.lines().any(|l| l.trim_end() == format!("CH_GROUP_DONE {g}")) && !cut_short_group(g);
        let finished: Vec<&str> = pending.iter().copied().filter(|g| done(g)).collect();
        // Lines of finished groups (and of L1 itself, once) are kept; a cut-short group starts over.
        let take_l1 = !kept.contains("CH_RESULT l1 ");
        for line in console.lines().map(|l| l.trim_end_matches('\r')) {
            let scenario =
                line.strip_prefix("CH_RESULT ").or_else(|| line.strip_prefix("CH_LOG ")).and_then(|l| l.split_whitespace().next());
            let keep = match scenario {
                Some(s) => group_of(s).map_or(take_l1, |g| finished.contains(&g)),
                None => line.starts_with("CH_GROUP_DONE") && finished.iter().any(|g| line.trim_end() == format!("CH_GROUP_DONE {g}")),
            };
            if keep {
                kept.push_str(line);
                kept.push('\n');
            }
        }
        pending.retain(|g| !finished.contains(g));
        if pending.is_empty() {
            return Ok((kept, survived));
        }
        let may_rerun = attempt + 1 < L1_ATTEMPTS && spent < RERUN_BUDGET;
        match nested_failure(&console) {
            Some(failure) if may_rerun => {
                eprintln!("{failure}; running {pending:?} again in a fresh L1");
                survived.push(failure);
            }
            failure => {
                let console: String = console.lines().filter(|l| !l.starts_with("CH_BEAT")).map(|l| format!("{l}\n")).collect();
                return Err(format!(
                    "L1 did not finish its scenarios (unfinished groups: {pending:?}; {}; {} L1 run(s) in {:.0} s, \
                     failures survived before: {survived:?}); console:\n{console}",
                    failure.as_deref().unwrap_or("no crash, reset, stall or hang seen"),
                    attempt + 1,
                    spent.as_secs_f64()
                ));
            }
        }
    }
    unreachable!("the last attempt may not rerun, so it returns")
}

/// One `CH_RESULT <scenario> [head] key=value ...` line.
#[derive(Debug)]
struct Line {
    scenario: String,
    /// The first word when it is not `key=value` (`ping`, `iperf`, `stats`); else empty.
    head: String,
    fields: Vec<(String, String)>,
}

impl Line {
    fn get(&self, key: &str) -> Option<&str> {
        self.fields.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

struct Results(Vec<Line>);

impl Results {
    fn parse(console: &str) -> Results {
        let lines = console
            .lines()
            .filter_map(|l| l.trim_end_matches('\r').strip_prefix("CH_RESULT "))
            .filter_map(|l| {
                let mut words = l.split_whitespace();
                let scenario = words.next()?.to_string();
                let mut words = words.peekable();
                let head = match words.peek() {
                    Some(w) if !w.contains('=') => words.next().unwrap_or_default().to_string(),
                    _ => String::new(),
                };
                let fields = words.filter_map(|w| w.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect();
                Some(Line { scenario, head, fields })
            })
            .collect();
        Results(lines)
    }

    fn lines(&self, scenario: &str, head: &str) -> Vec<&Line> {
        self.0.iter().filter(|l| l.scenario == scenario && l.head == head).collect()
    }

    /// The last value of `key` on a `scenario` line with this `head`.
    fn get(&self, scenario: &str, head: &str, key: &str) -> Option<&str> {
        self.lines(scenario, head).into_iter().filter_map(|l| l.get(key)).next_back()
    }

    fn num(&self, scenario: &str, head: &str, key: &str) -> Option<f64> {
        self.get(scenario, head, key)?.parse().ok()
    }

    fn has(&self, scenario: &str, head: &str) -> bool {
        !self.lines(scenario, head).is_empty()
    }
}

/// The live-upgrade step of the restart scenario (scripts/l1-init `upgrade_under_ping`); returns
/// a one-line summary.
fn assert_live_upgrades(r: &Results, console: &str) -> String {
    let s = "vutap-restart";
    let n = r.num(s, "upgrades", "n").unwrap_or_else(|| panic!("no live upgrade step:\n{console}"));
    assert!(n >= 3.0, "only {n} upgrades ran:\n{console}");
    assert_eq!(r.num(s, "upgrades", "ok"), Some(n), "an upgrade failed:\n{console}");
    let pauses: Vec<f64> = r.lines(s, "upgrade").iter().filter_map(|l| l.get("pause_ms")?.parse().ok()).collect();
    assert_eq!(pauses.len() as f64, n, "pauses:\n{console}");
    let replies = r.num(s, "upgrades", "replies").unwrap_or(0.0);
    let lost = r.num(s, "upgrades", "lost").unwrap_or(f64::NAN);
    let gap = r.num(s, "upgrades", "largest_gap_ms").unwrap_or(f64::NAN);
    assert!(replies >= 100.0, "{replies} ping replies during the upgrades:\n{console}");
    assert_eq!(lost, 0.0, "ping replies lost during the upgrades:\n{console}");
    assert!(gap <= 500.0, "a {gap} ms gap between ping replies:\n{console}");
    assert_eq!(r.num(s, "upgrade_checks", "took_over"), Some(n), "vutap's log:\n{console}");
    assert_eq!(r.num(s, "upgrade_checks", "new_connections"), Some(0.0), "CH reconnected during an upgrade:\n{console}");
    assert_eq!(
        r.num(s, "upgrade_checks", "ch_connection_lines"),
        Some(0.0),
        "CH logged about its vhost-user connection during the upgrades:\n{console}"
    );
    let before = r.num(s, "ready_for_upgrade", "carrier_changes");
    let after = r.num(s, "upgraded", "carrier_changes");
    assert!(before.is_some() && before == after, "the L2 guest's carrier_changes went {before:?} -> {after:?}:\n{console}");
    format!(
        "{n} live upgrades of vutap under a running L2 guest pinged every 10 ms: {replies} replies, {lost} lost, \
         largest gap between replies {gap} ms, queue pairs paused {} ms, no reconnect, carrier_changes unchanged",
        pauses.iter().map(|p| format!("{p}")).collect::<Vec<_>>().join("/")
    )
}

/// Why the guest's traffic in `scenario` failed, if it did: it must get its NIC from CH, ping
/// the peer 3/3, move data both ways with iperf3 and finish. The last boot's lines count.
fn traffic_problem(r: &Results, scenario: &str) -> Option<String> {
    if r.get(scenario, "", "nic") != Some("eth0") {
        return Some(format!("no NIC in L2 ({:?})", r.get(scenario, "", "nic")));
    }
    if r.get(scenario, "ping", "received") != Some("3") {
        return Some(format!("ping received {:?} of 3", r.get(scenario, "ping", "received")));
    }
    for dir in ["tx_mbps", "rx_mbps"] {
        let v = r.num(scenario, "iperf", dir).unwrap_or(0.0);
        if v <= 0.0 {
            let why: Vec<String> = r.lines(scenario, "iperf_failed").iter().filter_map(|l| Some(l.get("last")?.to_string())).collect();
            return Some(format!("iperf3 {dir} = {v} (failed tries: {why:?})"));
        }
    }
    (!r.has(scenario, "done")).then(|| "L2 did not finish".to_string())
}

/// The guest got its NIC from CH, pinged the peer 3/3, and iperf3 moved data both ways.
fn assert_guest_traffic(r: &Results, scenario: &str, console: &str) {
    if let Some(problem) = traffic_problem(r, scenario) {
        panic!("{scenario}: {problem}; console:\n{console}");
    }
}

/// The guest's virtio feature bits as Linux shows them (`/sys/class/net/eth0/device/features`:
/// one character per bit, bit 0 first).
fn guest_has_feature(r: &Results, scenario: &str, feature: u32) -> bool {
    r.get(scenario, "", "features").and_then(|s| s.as_bytes().get(feature as usize)) == Some(&b'1')
}

#[derive(Debug)]
struct Row {
    backend: &'static str,
    scenario: &'static str,
    queue_pairs: u32,
    tx_mbps: Option<f64>,
    rx_mbps: Option<f64>,
    tx_all: Vec<f64>,
    rx_all: Vec<f64>,
}

const TABLE: &[(&str, &str, u32)] = &[
    ("vutap (vhost-user, macvtap)", "vutap-1q", 1),
    ("vutap, second boot", "vutap-reboot", 1),
    ("vutap (vhost-user, macvtap)", "vutap-2q", 2),
    ("CH vhost_user_net (vhost-user, tap in a bridge)", "ch-vhost-user-net", 1),
    ("CH virtio-net, tap= (tap in a bridge)", "ch-tap", 1),
    ("CH virtio-net, fd= (the macvtap's /dev/tapN)", "ch-fd", 1),
];

/// Every round's Mbit/s of one direction (`tx_all=a,b,c`).
fn all_rounds(r: &Results, scenario: &str, key: &str) -> Vec<f64> {
    r.get(scenario, "iperf", key).map_or_else(Vec::new, |v| v.split(',').filter_map(|x| x.parse().ok()).collect())
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    v.get(v.len().checked_sub(1)? / 2).copied()
}

/// `median (min–max)` of one direction's rounds.
fn cell(median: Option<f64>, all: &[f64]) -> String {
    let Some(m) = median else {
        return "n/a".to_string();
    };
    let (lo, hi) = all.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    if all.len() > 1 {
        format!("{m:.0} ({lo:.0}–{hi:.0})")
    } else {
        format!("{m:.0}")
    }
}

fn write_results(dir: &Path, r: &Results, secs: u32, reps: u32, restart: &str) {
    let rows: Vec<Row> = TABLE
        .iter()
        .map(|&(backend, scenario, queue_pairs)| Row {
            backend,
            scenario,
            queue_pairs,
            tx_mbps: r.num(scenario, "iperf", "tx_mbps"),
            rx_mbps: r.num(scenario, "iperf", "rx_mbps"),
            tx_all: all_rounds(r, scenario, "tx_all"),
            rx_all: all_rounds(r, scenario, "rx_all"),
        })
        .collect();
    // Host load while L1 ran: other work on the host moves TCG-in-TCG numbers a lot.
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
    let json = serde_json::json!({
        "setup": "L1: QEMU 10 TCG (-cpu max -smp 2 -m 2048); L2: cloud-hypervisor v54 on KVM in L1, 1 vCPU per queue pair, 512M shared memory",
        "iperf3_secs_per_direction": secs,
        "iperf3_rounds": reps,
        "mbps": "median over the rounds; *_all lists every round",
        "tx": "L2 guest -> peer netns in L1 (iperf3 -c, 2 streams per queue pair), receiver Mbit/s",
        "rx": "peer -> L2 guest (iperf3 -c -R), receiver Mbit/s",
        "host_loadavg_at_end": load,
        "backend_restart": restart,
        "rows": rows.iter().map(|x| serde_json::json!({
            "backend": x.backend, "scenario": x.scenario, "queue_pairs": x.queue_pairs,
            "tx_mbps": x.tx_mbps, "rx_mbps": x.rx_mbps, "tx_all": x.tx_all, "rx_all": x.rx_all,
        })).collect::<Vec<_>>(),
    });
    std::fs::create_dir_all(dir).expect("create results dir");
    std::fs::write(dir.join("ch.json"), serde_json::to_string_pretty(&json).expect("json") + "\n").expect("write ch.json");

    let mut md = "| backend | queue pairs | tx Mbit/s (guest → peer) | rx Mbit/s (peer → guest) |\n|---|---|---|---|\n".to_string();
    for row in &rows {
        md.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            row.backend,
            row.queue_pairs,
            cell(row.tx_mbps, &row.tx_all),
            cell(row.rx_mbps, &row.rx_all)
        ));
    }
    // vutap with one pair ran twice (two boots): pool both boots' rounds.
    let pooled = |f: fn(&Row) -> &Vec<f64>| {
        median(rows.iter().filter(|x| x.scenario == "vutap-1q" || x.scenario == "vutap-reboot").flat_map(|x| f(x).clone()).collect())
    };
    let (vt, vr) = (pooled(|x| &x.tx_all), pooled(|x| &x.rx_all));
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "n/a".to_string(),
    };
    md.push_str("\n| vutap, 1 pair (median of both boots' rounds) vs | tx | rx |\n|---|---|---|\n");
    for row in rows.iter().filter(|x| x.scenario.starts_with("ch-")) {
        md.push_str(&format!("| {} | {} | {} |\n", row.backend, ratio(vt, row.tx_mbps), ratio(vr, row.rx_mbps)));
    }
    md.push_str(&format!(
        "\nOne nested run (TCG-in-TCG, host load average {load} at the end), iperf3 {secs} s per direction, median (min–max) of {reps} round(s): compare rows with each other, not with other hosts.\n\nBackend restart: {restart}\n"
    ));
    std::fs::write(dir.join("ch.md"), md).expect("write ch.md");
}

#[test]
fn test_cloud_hypervisor_nested() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "needs root");
    let peers = peers_dir();
    for bin in ["cloud-hypervisor", "vhost_user_net"] {
        assert!(
            peers.join(bin).is_file(),
            "{} missing: the cloud-hypervisor peers live in <repo>/../shared/peers or $VUTAP_PEERS_DIR",
            peers.join(bin).display()
        );
    }
    let root = repo_root();
    let log_dir = root.join("results/tmp/e2e-cloud-hypervisor");
    std::fs::create_dir_all(&log_dir).expect("create log dir");
    for script in ["scripts/build-guest.sh", "scripts/build-l1.sh"] {
        let st = Command::new("bash").arg(root.join(script)).env("VUTAP_PEERS_DIR", &peers).status().expect("run bash");
        assert!(st.success(), "{script} failed: {st}");
    }
    let secs: u32 = std::env::var("VUTAP_CH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let reps: u32 = std::env::var("VUTAP_CH_REPS").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let (console, survived) =
        run_groups(|only, faults, deadline| run_l1(&log_dir, secs, reps, only, faults, deadline)).unwrap_or_else(|e| panic!("{e}"));
    let r = Results::parse(&console);
    for failure in &survived {
        eprintln!("survived by rerunning the groups it cut short (TCG's nested SVM): {failure}");
    }
    for l in console.lines().filter(|l| l.starts_with("CH_RESULT") || l.starts_with("CH_LOG")) {
        eprintln!("{l}");
    }

    assert_eq!(r.get("l1", "", "kvm"), Some("ok"), "no /dev/kvm in L1:\n{console}");
    assert_eq!(r.get("l1", "", "softlockup_panic"), Some("1"), "a hung L1 would not end before the deadline:\n{console}");

    // One pair: CH shows the guest MQ with CTRL_VQ (it runs the control queue), and sends
    // both in SET_FEATURES; vutap accepts them and serves 2 queues.
    assert_guest_traffic(&r, "vutap-1q", &console);
    assert!(guest_has_feature(&r, "vutap-1q", VIRTIO_NET_F_CTRL_VQ) && guest_has_feature(&r, "vutap-1q", VIRTIO_NET_F_MQ));
    let acked = r.get("vutap-1q", "", "vutap_set_features").and_then(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok());
    let acked = acked.unwrap_or_else(|| panic!("no SET_FEATURES in vutap's log:\n{console}"));
    assert_ne!(acked & bit(VIRTIO_NET_F_CTRL_VQ), 0, "CH acked {acked:#x}");
    assert_ne!(acked & bit(VIRTIO_NET_F_MQ), 0, "CH acked {acked:#x}");

    // A second boot of L2 on the same vutap process.
    assert_guest_traffic(&r, "vutap-reboot", &console);

    // Before the kill, vutap is upgraded live under the same running guest while the peer pings
    // it every 10 ms: no reply lost, no new vhost-user connection, nothing in CH's log about its
    // connection, the guest's carrier untouched.
    let upgrade = assert_live_upgrades(&r, &console);
    eprintln!("{upgrade}");

    // vutap SIGKILLed under a running guest and restarted: CH reconnects to the new vutap,
    // negotiates again, and the guest's NIC carries traffic again without a reboot.
    let s = "vutap-restart";
    assert!(r.has(s, "ready_for_kill") && r.has(s, "killed"), "restart scenario did not run:\n{console}");
    assert!(r.has(s, "down"), "the guest never lost the peer after vutap was killed:\n{console}");
    assert_eq!(r.get(s, "", "reconnected"), Some("1"), "CH did not reconnect to the restarted vutap:\n{console}");
    assert!(r.has(s, "recovered"), "the guest's NIC did not recover:\n{console}");
    assert_eq!(r.get(s, "ping_after", "received"), Some("3"), "ping after recovery:\n{console}");
    // L1's clock: SIGKILL, new vutap listening, CH's SET_FEATURES on it.
    let l1_time = |head: &str| r.num(s, head, "uptime").unwrap_or(f64::NAN);
    let killed = l1_time("killed");
    let restarted = l1_time("restarted") - killed;
    let reconnect_line = r.lines(s, "").into_iter().find(|l| l.get("reconnected").is_some());
    let renegotiated = reconnect_line.and_then(|l| l.get("uptime")?.parse::<f64>().ok()).unwrap_or(f64::NAN) - killed;
    // L2's clock: the first unanswered ping (it waits 1 s) to the first answered one.
    let outage = r.num(s, "recovered", "uptime").unwrap_or(f64::NAN) - r.num(s, "recovered", "down_at").unwrap_or(f64::NAN) + 1.0;
    let restart = format!(
        "SIGKILL of vutap under a running guest: cloud-hypervisor notices the hang-up, reconnects by itself to the new vutap \
         (started {restarted:.1} s after the kill) and negotiates again {renegotiated:.1} s after the kill; the guest's NIC recovers \
         without a reboot (about {outage:.1} s without answers in the guest) because vutap resumes each ring at its used index \
         (CH sends the available index as the base)"
    );
    eprintln!("{restart}");

    // Two pairs: the guest enabled both, and both carried frames (any distribution).
    assert_guest_traffic(&r, "vutap-2q", &console);
    assert_eq!(r.get("vutap-2q", "", "channels"), Some("2"), "ethtool -L combined 2:\n{console}");
    let pairs = r.lines("vutap-2q", "stats");
    assert_eq!(pairs.len(), 2, "vutap stats rows:\n{console}");
    for p in pairs {
        let frames: u64 = ["rx_frames", "tx_frames"].iter().filter_map(|k| p.get(k)?.parse::<u64>().ok()).sum();
        assert!(frames > 0, "pair {:?} carried no frames:\n{console}", p.get("pair"));
    }

    // vutap ends on SIGTERM: L1 sends SIGKILL only to what is still running 10 s later.
    for s in ["vutap-restart", "vutap-2q"] {
        assert_eq!(r.get(s, "", "vutap_stop_timeout"), None, "{s}: vutap outlived SIGTERM:\n{console}");
    }

    // Baselines ran in the same L1, so the comparison is fair.
    for s in ["ch-vhost-user-net", "ch-tap", "ch-fd"] {
        assert_guest_traffic(&r, s, &console);
    }
    if let Some(dir) = std::env::var_os("VUTAP_CH_RESULTS") {
        let restart = format!("{upgrade}. {restart}");
        write_results(Path::new(&dir), &r, secs, reps, &restart);
    }
}

#[test]
fn test_nested_failure_tells_nested_svm_from_a_backend_failure() {
    let finished = "CH_RESULT vutap-1q ping sent=3 received=3\nCH_GROUP_DONE 1q\nCH_DONE uptime=200.1\n";
    assert_eq!(nested_failure(finished), None, "an L1 that finished is no nested failure");

    let reset = "CH_RESULT l1 kvm=ok\nCH_RESULT vutap-1q ch_start uptime=5.77\n";
    assert!(nested_failure(reset).is_some_and(|f| f.contains("reset")));
    let crashed = format!("{reset}[  253.74] Kernel panic - not syncing: stack guard page was hit\n");
    assert!(nested_failure(&crashed).is_some_and(|f| f.contains("stack guard page")));
    // A CPU of L1 stuck in the kernel, as seen here, which softlockup_panic=1 turns into a panic.
    let lockup = format!(
        "{reset}[  140.707390] watchdog: BUG: soft lockup - CPU#1 stuck for 53s! [kworker/1:2:55]\n\
         [  140.71] Kernel panic - not syncing: softlockup: hung tasks\n"
    );
    assert!(nested_failure(&lockup).is_some_and(|f| f.contains("soft lockup") && f.contains("hung tasks")));

    let stall = "CH_RESULT vutap-2q ch_exit=137 uptime=90.2\r\nCH_RESULT vutap-2q l2_stalled=1 silent_s=90\nCH_RESULT vutap-1q iperf tx_mbps=0\nCH_DONE uptime=300\n";
    assert_eq!(cut_short_scenarios(stall), ["vutap-2q"]);
    assert!(nested_failure(stall).is_some_and(|f| f.contains("stalled") && f.contains("vutap-2q")));
    // An L2 that triple-faulted and never finished (CH could not reboot it), as seen in CI.
    let triple = "CH_RESULT ch-vhost-user-net ch_exit=1 uptime=200.39\nCH_RESULT ch-vhost-user-net l2_resets=1\n\
                  CH_RESULT ch-tap l2_resets=0\nCH_RESULT ch-tap done\nCH_GROUP_DONE ch-tap\nCH_DONE uptime=300\n";
    assert_eq!(cut_short_scenarios(triple), ["ch-vhost-user-net"]);
    assert!(nested_failure(triple).is_some_and(|f| f.contains("triple-faulted") && f.contains("ch-vhost-user-net")));
    // One CH rebooted and that then passed its traffic checks is no failure.
    let clean = "CH_RESULT vutap-1q nic=eth0\nCH_RESULT vutap-1q ping sent=3 received=3\n\
                 CH_RESULT vutap-1q iperf tx_mbps=283 rx_mbps=572\nCH_RESULT vutap-1q done\n";
    let rebooted = format!("CH_RESULT vutap-1q l2_resets=1\n{clean}CH_GROUP_DONE 1q\nCH_DONE uptime=300\n");
    assert_eq!((cut_short_scenarios(&rebooted), nested_failure(&rebooted)), (vec![], None));
    // One whose traffic then failed was cut short by the crash, as seen in CI (2 pairs, iperf3
    // TX 0 after CH rebooted L2); the failed tries' last words go into the reason.
    let starved = rebooted
        .replace("tx_mbps=283", "tx_mbps=0")
        .replace("CH_RESULT vutap-1q done", "CH_RESULT vutap-1q iperf_failed try=0 last=iperf3:_error_-_x\nCH_RESULT vutap-1q done");
    assert_eq!(cut_short_scenarios(&starved), ["vutap-1q"]);
    let why = nested_failure(&starved).expect("a nested failure");
    assert!(why.contains("vutap-1q") && why.contains("tx_mbps = 0") && why.contains("iperf3:_error_-_x"), "{why}");
    // The restart scenario's sequence belongs to one boot: any reset cuts it short.
    let restart = "CH_RESULT vutap-restart l2_resets=1\nCH_RESULT vutap-restart done\nCH_GROUP_DONE restart\nCH_DONE uptime=300\n";
    assert_eq!(cut_short_scenarios(restart), ["vutap-restart"]);
    // iperf3 that got nothing through a NIC that kept L2's heartbeat going is vutap's failure.
    let no_traffic = "CH_RESULT vutap-1q iperf tx_mbps=0 rx_mbps=0\nCH_GROUP_DONE 1q\nCH_DONE uptime=300\n";
    assert_eq!(nested_failure(no_traffic), None);
}

/// A console of an L1 that ran `groups` to the end, with `extra` lines after them.
fn finished_console(groups: &[&str], extra: &str, done: bool) -> String {
    let mut c = "CH_RESULT l1 kvm=ok\n".to_string();
    for g in groups {
        let scenario = match *g {
            "1q" => "vutap-1q",
            "restart" => "vutap-restart",
            "2q" => "vutap-2q",
            other => other,
        };
        c.push_str(&format!("CH_RESULT {scenario} l2_resets=0\nCH_RESULT {scenario} done\nCH_GROUP_DONE {g}\n"));
    }
    c.push_str(extra);
    if done {
        c.push_str("CH_DONE uptime=300\n");
    }
    c
}

/// Drives `run_groups` with scripted L1 consoles; returns what each L1 was asked to run, and the
/// outcome.
fn replay(consoles: Vec<String>, each: Duration) -> (Vec<String>, Outcome) {
    let (asked, _, outcome) = replay_with_deadlines(consoles, each);
    (asked, outcome)
}

/// [`replay`], also returning the deadline each L1 was given.
fn replay_with_deadlines(consoles: Vec<String>, each: Duration) -> (Vec<String>, Vec<Duration>, Outcome) {
    let (mut asked, mut deadlines) = (Vec::new(), Vec::new());
    let mut script = consoles.into_iter();
    let outcome = run_groups(|only, _, deadline| {
        asked.push(only.to_string());
        deadlines.push(deadline);
        (script.next().expect("an L1 more than the script has"), each)
    });
    (asked, deadlines, outcome)
}

#[test]
fn test_reruns_only_the_groups_nested_svm_cut_short() {
    // Modelled on the CI run that used up three L1s under CH's own backends (a stall, then a
    // triple fault in ch-vhost-user-net, then L1's kernel crashed in ch-fd), each rerun repeating
    // all three baselines then. Here the first L1 also left ch-fd undone: every rerun asks for
    // just the groups still pending, keeps what finished, and a fourth L1 ends it.
    let (vutap, stall) = (["1q", "restart", "2q"], "CH_RESULT ch-vhost-user-net l2_stalled=1 silent_s=90\n");
    let first = finished_console(&[&vutap[..], &["ch-tap"]].concat(), stall, true);
    let triple = "CH_RESULT ch-vhost-user-net ch_exit=1\nCH_RESULT ch-vhost-user-net l2_resets=1\n";
    let second = finished_console(&[], triple, true);
    let third = finished_console(&["ch-vhost-user-net"], "CH_RESULT ch-fd ch_start\n[ 82.48] BUG: TASK stack guard page was hit\n", false);
    let fourth = finished_console(&["ch-fd"], "", true);
    let (asked, outcome) = replay(vec![first, second, third, fourth], Duration::from_secs(120));
    assert_eq!(asked, ["", "ch-vhost-user-net,ch-fd", "ch-vhost-user-net,ch-fd", "ch-fd"]);
    let (kept, survived) = outcome.expect("four L1s finish every group");
    assert_eq!(survived.len(), 3, "{survived:?}");
    let r = Results::parse(&kept);
    for g in GROUPS {
        assert_eq!(kept.lines().filter(|l| *l == format!("CH_GROUP_DONE {g}")).count(), 1, "{g} in:\n{kept}");
    }
    for s in ["vutap-1q", "vutap-restart", "vutap-2q", "ch-vhost-user-net", "ch-tap", "ch-fd"] {
        assert!(r.has(s, "done"), "{s} in:\n{kept}");
    }
    // Lines of a cut-short run are not kept: the stall and the triple fault are gone.
    assert!(!kept.contains("l2_stalled") && !kept.contains("l2_resets=1"), "{kept}");
    assert_eq!(kept.matches("CH_RESULT l1 ").count(), 1);
}

#[test]
fn test_rerun_ends_at_the_time_budget_and_on_a_backend_failure() {
    // Every L1 crashes: the reruns stop once the L1 runs took RERUN_BUDGET, before L1_ATTEMPTS.
    let crash = finished_console(&["1q"], "[ 9.1] Kernel panic - not syncing: x\n", false);
    let (asked, outcome) = replay(vec![crash; L1_ATTEMPTS as usize], RERUN_BUDGET / 2);
    assert_eq!(asked.len(), 2, "{asked:?}");
    assert!(outcome.is_err_and(|m| m.contains("L1 did not finish") && m.contains("Kernel panic")));
    // Quick crashes get every attempt, and no more.
    let crash = finished_console(&[], "[ 9.1] Kernel panic - not syncing: x\n", false);
    let (asked, outcome) = replay(vec![crash; L1_ATTEMPTS as usize], Duration::from_secs(30));
    assert_eq!(asked.len(), L1_ATTEMPTS as usize);
    assert!(outcome.is_err());
    // A group that did not finish in an L1 that did, with no stall or reset: no rerun.
    let (asked, outcome) = replay(vec![finished_console(&["1q", "restart"], "", true)], Duration::from_secs(30));
    assert_eq!(asked, [""]);
    assert!(outcome.is_err_and(|m| m.contains("no crash, reset, stall or hang seen") && m.contains("2q")));
}

#[test]
fn test_a_hung_l1_is_rerun_and_an_l1_past_its_deadline_fails() {
    // Modelled on the CI run whose first L1 saw L2 stall in ch-vhost-user-net, and whose rerun of
    // that group hung until the deadline without a word.
    let stall = "CH_RESULT ch-vhost-user-net l2_stalled=1 silent_s=90\n";
    let first = finished_console(&["1q", "restart", "2q", "ch-tap", "ch-fd"], stall, true);
    let hung = format!(
        "CH_RESULT l1 kvm=ok\nCH_BEAT uptime=5.01\nCH_RESULT ch-vhost-user-net ch_start uptime=5.07\nCH_BEAT uptime=10.02\n\n{L1_HUNG} 60 s\n"
    );
    let why = nested_failure(&hung).expect("a hung L1 is a failure of nested SVM");
    assert!(why.contains("hung") && why.contains("uptime=10.02") && why.contains("ch_start uptime=5.07"), "{why}");
    let third = finished_console(&["ch-vhost-user-net"], "", true);
    let (asked, deadlines, outcome) = replay_with_deadlines(vec![first, hung, third], Duration::from_secs(4 * 60));
    assert_eq!(asked, ["", "ch-vhost-user-net", "ch-vhost-user-net"]);
    let (kept, survived) = outcome.expect("the third L1 finishes");
    assert!(survived.len() == 2 && survived[1].contains("hung"), "{survived:?}");
    assert!(!kept.contains("CH_BEAT"), "{kept}");
    // Each L1's deadline is what is left of the test's time budget, at most L1_DEADLINE.
    assert_eq!(deadlines, [L1_DEADLINE, TIME_BUDGET - Duration::from_secs(4 * 60), TIME_BUDGET - Duration::from_secs(8 * 60)]);

    // An L1 still printing at its deadline is stuck in its own scenarios: no rerun.
    let stuck = format!("{}{L1_TIMED_OUT} 660 s\n", finished_console(&["1q"], "CH_BEAT uptime=650.1\n", false));
    assert_eq!(nested_failure(&stuck), None);
    let (asked, outcome) = replay(vec![stuck], L1_DEADLINE);
    assert_eq!(asked, [""]);
    let err = outcome.expect_err("an L1 past its deadline fails the test");
    assert!(err.contains("still running at its deadline") && !err.contains("CH_BEAT"), "{err}");
}
