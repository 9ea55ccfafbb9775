//! The report: markdown tables, JSON, and a hand-written SVG bar chart.

use std::fmt::Write as _;

use super::profile::Bucket;
use super::wake_cost::WakeCost;
use super::{paired_ratio, Arrangement, Backend, CaseResult, Dir, LatencyResult, Report, TSO_SIZE};

fn size_label(s: u32) -> String {
    if s == TSO_SIZE {
        "64K TSO".into()
    } else {
        format!("{s}")
    }
}

fn cell(c: Option<&CaseResult>) -> String {
    match c {
        None => "–".into(),
        Some(c) if c.error.is_some() && c.gbps == 0.0 => "err".into(),
        Some(c) => format!("{:.2} / {:.3}", c.gbps, c.mpps),
    }
}

fn cpu(c: Option<&CaseResult>) -> String {
    c.filter(|c| c.mpps > 0.0).map(|c| format!("{:.0}", c.cpu_ns_per_frame)).unwrap_or("–".into())
}

fn drops(c: Option<&CaseResult>) -> String {
    c.filter(|c| c.mpps > 0.0 || c.offered_mpps > 0.0).map(|c| format!("{:.1}%", c.drop_pct)).unwrap_or("–".into())
}

/// `a`'s throughput over `b`'s, round by round ([`paired_ratio`]).
fn ratio(a: Option<&CaseResult>, b: Option<&CaseResult>, pct: bool) -> String {
    match a.zip(b).and_then(|(a, b)| paired_ratio(a, b, |r| r.gbps)) {
        Some(r) if pct => format!("{:.0}%", 100.0 * r),
        Some(r) => format!("{r:.2}x"),
        None => "–".into(),
    }
}

/// `a`'s CPU per frame over `b`'s, round by round ([`paired_ratio`]).
fn cpu_ratio(a: Option<&CaseResult>, b: Option<&CaseResult>) -> String {
    a.zip(b).and_then(|(a, b)| paired_ratio(a, b, |r| r.cpu_ns_per_frame)).map_or("–".into(), |r| format!("{r:.2}"))
}

/// vutap's counters: frames per batch, kicks, interrupts and wake-ups per frame, RX no-buffer
/// stops and TX EAGAIN waits per 1000 frames.
fn counters(c: Option<&CaseResult>) -> String {
    match c.and_then(|c| c.counters) {
        Some(k) if k.frames > 0 => format!(
            "{:.1} | {:.3} | {:.3} | {:.3} | {:.2} | {:.2}",
            k.frames_per_batch, k.kicks_per_frame, k.interrupts_per_frame, k.wakeups_per_frame, k.rx_no_buffers_per_1k, k.tx_eagain_per_1k
        ),
        _ => "– | – | – | – | – | –".into(),
    }
}

/// The most vutap's interrupts can have cost per frame on this host: each one waking a
/// frontend asleep on the other CPU. One-pair cells only: there the frontend runs on the load
/// CPUs, away from vutap's; multi-pair cells run unpinned, where a wake-up may stay on one CPU.
fn interrupt_cost(c: Option<&CaseResult>, wake: &WakeCost) -> String {
    match c.filter(|c| c.pairs == 1).and_then(|c| c.counters) {
        Some(k) if k.frames > 0 => format!("{:.0}", wake.interrupts_ns_per_frame(k.interrupts_per_frame)),
        _ => "–".into(),
    }
}

/// Offered → delivered Mpps.
fn offered(c: Option<&CaseResult>) -> String {
    c.filter(|c| c.error.is_none() || c.mpps > 0.0).map(|c| format!("{:.3} → {:.3}", c.offered_mpps, c.mpps)).unwrap_or("–".into())
}

/// Backend cores / load cores busy (busiest load thread), flagged when the load side was the limit.
fn sides(c: Option<&CaseResult>) -> String {
    match c.filter(|c| c.secs > 0.0) {
        None => "–".into(),
        // A report from before the load side was measured.
        Some(c) if c.load_cpus == 0 => format!("{:.2} / –", c.cpu_cores),
        Some(c) => format!(
            "{:.2} / {:.2} ({:.2}){}",
            c.cpu_cores,
            c.load.cores,
            c.load.busiest_thread,
            if c.load_limited { " **load-limited**" } else { "" }
        ),
    }
}

/// vutap with `--io-uring` against the default `writev`/`readv` path, cell by cell (same run,
/// turn by turn).
fn io_uring_table(s: &mut String, rep: &Report) {
    let cells: Vec<&CaseResult> = rep.cases.iter().filter(|c| c.backend == Backend::VutapIoUring).collect();
    if cells.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "## Through io_uring (`--io-uring`: one `io_uring_enter` per batch of writes or reads) vs one `writev`/`readv` per frame\n\n\
         | arrangement | dir | size | rx bufs | plain Gbit/s / Mpps | io_uring Gbit/s / Mpps | plain CPU ns/f | io_uring CPU ns/f | \
         io_uring / plain CPU | ceiling CPU ns/f | wake-ups/f plain → io_uring |\n\
         |---|---|---|---|---|---|---|---|---|---|---|"
    );
    for u in cells {
        let v = rep.find(u.arrangement, Backend::Vutap, u.dir, u.size, u.pairs, u.rxbuf);
        let c = rep.find(u.arrangement, Backend::Ceiling, u.dir, u.size, u.pairs, "-");
        let per_frame = cpu_ratio(Some(u), v);
        let wakeups =
            |c: Option<&CaseResult>| c.and_then(|c| c.counters).map(|k| format!("{:.3}", k.wakeups_per_frame)).unwrap_or("–".into());
        let _ = writeln!(
            s,
            "| {:?} | {:?} | {} | {} | {} | {} | {} | {} | {per_frame} | {} | {} → {} |",
            u.arrangement,
            u.dir,
            size_label(u.size),
            u.rxbuf,
            cell(v),
            cell(Some(u)),
            cpu(v),
            cpu(Some(u)),
            cpu(c),
            wakeups(v),
            wakeups(Some(u))
        );
    }
    let _ = writeln!(s);
}

/// A latency row's vutap polling option, if it ran with one.
fn poll_label(l: &LatencyResult) -> String {
    match (l.busy_poll_us, l.adaptive_poll_us) {
        (0, 0) => String::new(),
        (0, max) => format!(" (--adaptive-poll-us {max})"),
        (fixed, _) => format!(" (--busy-poll-us {fixed})"),
    }
}

fn backend_label(b: Backend) -> &'static str {
    match b {
        Backend::Vutap => "vutap",
        Backend::VutapIoUring => "vutap --io-uring",
        Backend::Dpdk => "DPDK testpmd",
        Backend::Ceiling => "raw loop",
    }
}

/// With `--profile`: each backend's CPU per frame split by where `perf` saw it go.
fn profile_table(s: &mut String, rep: &Report) {
    let cells: Vec<&CaseResult> = rep.cases.iter().filter(|c| c.profile.is_some()).collect();
    if cells.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "## Where the backend's CPU goes (`--profile`: perf samples every {} µs of its CPU, ns per delivered frame)\n\n\
         tap copy = copying frame bytes inside the tap's read/write; tap path = the rest of that read/write, including the \
         host stack's receive run in the writer's context; syscall entry + VFS = entering and leaving every system call and \
         the VFS around the tap's (fd lookup, iovec import); seccomp = the filter on each call; own code / libc = user \
         space; epoll/poll = sleeping and waking; eventfd = kicks and interrupts; other kernel = interrupts, softirqs, \
         faults outside a system call. kernel I/O = tap copy + tap path + syscall entry + io_uring, what any program moving \
         these frames through the tap pays; backend's own = own code + libc + seccomp + epoll/poll + eventfd, what the \
         backend adds. Both come from the same window, so their ratio does not move with the host's drift the way \
         CPU per frame of two windows does. Sampling adds a little CPU, so totals run slightly above the unprofiled tables'.\n",
        super::profile::PERIOD_NS / 1000
    );
    let mut head = "| arrangement | dir | size | pairs | rx bufs | backend | CPU ns/f | kernel I/O | backend's own (share) |".to_string();
    let mut sep = "|---|---|---|---|---|---|---|---|---|".to_string();
    for b in Bucket::ALL {
        head += &format!(" {} |", b.label());
        sep += "---|";
    }
    let _ = writeln!(s, "{head}\n{sep}");
    for c in cells {
        let p = c.profile.as_ref().expect("filtered");
        let total: f64 = p.values().sum();
        let sum = |pick: fn(Bucket) -> bool| p.iter().filter(|(b, _)| pick(**b)).fold(0.0, |acc, (_, v)| acc + v);
        let (io, own) = (sum(Bucket::is_kernel_io), sum(Bucket::is_backends_own));
        let share = if total > 0.0 { 100.0 * own / total } else { 0.0 };
        let mut row = format!(
            "| {:?} | {:?} | {} | {} | {} | {} | {total:.0} | {io:.0} | {own:.0} ({share:.0} %) |",
            c.arrangement,
            c.dir,
            size_label(c.size),
            c.pairs,
            c.rxbuf,
            backend_label(c.backend)
        );
        for b in Bucket::ALL {
            row += &format!(" {:.0} |", p.get(&b).copied().unwrap_or(0.0));
        }
        let _ = writeln!(s, "{row}");
    }
    let _ = writeln!(s);
}

/// Distinct (dir, size, pairs, rxbuf) rows of vhost backends in `arr`, in run order.
fn rows(rep: &Report, arr: Arrangement) -> Vec<(Dir, u32, u16, &'static str)> {
    let mut v: Vec<(Dir, u32, u16, &'static str)> = Vec::new();
    for c in rep.cases.iter().filter(|c| c.arrangement == arr && c.backend != Backend::Ceiling) {
        let k = (c.dir, c.size, c.pairs, c.rxbuf);
        if !v.contains(&k) {
            v.push(k);
        }
    }
    v.sort_by_key(|k| (k.0 as u8, k.2, k.1, k.3));
    v
}

/// Every one-pair cell in one table: vutap against the raw loop, DPDK and its own `--io-uring`
/// variant, ratios round by round (the README's benchmark table).
fn summary_table(s: &mut String, rep: &Report) {
    let mut cells: Vec<&CaseResult> = rep.cases.iter().filter(|c| c.backend == Backend::Vutap && c.pairs == 1).collect();
    if cells.is_empty() {
        return;
    }
    cells.sort_by_key(|c| (c.arrangement as u8, c.dir as u8, c.rxbuf, c.size));
    let _ = writeln!(
        s,
        "## One queue pair, every cell\n\n*ns/f* = the backend's CPU per delivered frame; *vutap CPU ÷ ceiling CPU* = the cost vutap adds \
         over a raw `write`/`read` loop (1.00 = none); *io_uring* = the `--io-uring` cell, its ns/f and its CPU ÷ the plain path's; \
         *load-limited* = the load generator, not vutap, was the limit.\n\n\
         | arrangement | dir | size | vutap Gbit/s | vutap ns/f | ceiling Gbit/s | ceiling ns/f | vutap CPU ÷ ceiling CPU | DPDK Gbit/s | \
         vutap / DPDK | io_uring ns/f (÷ plain) | load-limited |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    let gbps = |c: Option<&CaseResult>| c.filter(|c| c.gbps > 0.0).map_or("–".into(), |c| format!("{:.2}", c.gbps));
    for v in cells {
        let find = |b: Backend, rxbuf: &str| rep.find(v.arrangement, b, v.dir, v.size, 1, rxbuf);
        let (c, d, u) = (find(Backend::Ceiling, "-"), find(Backend::Dpdk, v.rxbuf), find(Backend::VutapIoUring, v.rxbuf));
        let dir = match v.dir {
            Dir::Tx => "TX".to_string(),
            Dir::Rx => format!("RX {}", v.rxbuf),
        };
        let uring = match u.filter(|u| u.mpps > 0.0) {
            Some(u) => format!("{} ({})", cpu(Some(u)), cpu_ratio(Some(u), Some(v))),
            None => "–".into(),
        };
        let _ = writeln!(
            s,
            "| {} | {dir} | {} | {} | {} | {} | {} | {} | {} | {} | {uring} | {} |",
            format!("{:?}", v.arrangement).to_lowercase(),
            size_label(v.size),
            gbps(Some(v)),
            cpu(Some(v)),
            gbps(c),
            cpu(c),
            cpu_ratio(Some(v), c),
            gbps(d),
            ratio(Some(v), d, false).replace('x', "×"),
            if v.load_limited { "yes" } else { "" }
        );
    }
    let _ = writeln!(s);
}

/// Why each cell ran at its speed: vutap's counters, offered vs delivered, and the CPU of both
/// sides (the load side is this process's frontend driver and far-end threads).
fn explain(s: &mut String, rep: &Report, arr: Arrangement, dpdk: bool) {
    if !rep.cases.iter().any(|c| c.arrangement == arr && (c.load_cpus > 0 || c.counters.is_some())) {
        return; // a report from before these were measured: nothing to explain with
    }
    let _ = writeln!(
        s,
        "What each cell did: vutap's counters over the window (per frame vutap moved; no-buf and EAGAIN per 1000 frames), \
         offered → delivered Mpps, and CPU as `backend cores / load cores (busiest load thread)`, the load side's busy time only \
         (the far-side sink or source polls its socket rather than sleep; the CPU it spends polling an empty one is left out); \
         **load-limited** = the load side was ≥ 90 % busy (a thread, or all its CPUs) while the backend was below 90 % of what \
         it could use.\n"
    );
    let mut head = "| dir | size | pairs | rx bufs | frames/batch | kicks/f | irqs/f | wake-ups/f | no-buf /1k | EAGAIN /1k |".to_string();
    let mut sep = "|---|---|---|---|---|---|---|---|---|---|".to_string();
    if rep.wake_cost.is_some() {
        head += " irqs ≤ ns/f |";
        sep += "---|";
    }
    head += " vutap Mpps offered → delivered | vutap CPU / load |";
    sep += "---|---|";
    if dpdk {
        head += " DPDK Mpps offered → delivered | DPDK CPU / load |";
        sep += "---|---|";
    }
    head += " ceiling Mpps offered → delivered | ceiling CPU / load |";
    sep += "---|---|";
    let _ = writeln!(s, "{head}\n{sep}");
    for (dir, size, pairs, rxbuf) in rows(rep, arr) {
        let v = rep.find(arr, Backend::Vutap, dir, size, pairs, rxbuf);
        let mut line =
            format!("| {} | {} | {pairs} | {rxbuf} | {} |", if dir == Dir::Tx { "TX" } else { "RX" }, size_label(size), counters(v));
        if let Some(w) = &rep.wake_cost {
            let _ = write!(line, " {} |", interrupt_cost(v, w));
        }
        let _ = write!(line, " {} | {} |", offered(v), sides(v));
        if dpdk {
            let d = rep.find(arr, Backend::Dpdk, dir, size, pairs, rxbuf);
            let _ = write!(line, " {} | {} |", offered(d), sides(d));
        }
        let c = (rxbuf != "nomrg").then(|| rep.find(arr, Backend::Ceiling, dir, size, pairs, "-")).flatten();
        let _ = write!(line, " {} | {} |", offered(c), sides(c));
        let _ = writeln!(s, "{line}");
    }
    let _ = writeln!(s);
}

pub fn markdown(rep: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# vutap-bench ({})\n", rep.host);
    let _ = writeln!(s, "Cells are `Gbit/s / Mpps` delivered and verified at the receiving end; CPU = backend process (or raw-loop threads) CPU ns per delivered frame; drops = offered − delivered. The backends of a case take turns, each round starting with the next one; cells are each backend's median round, ratios the median of the rounds' ratios (the two backends within seconds of each other).\n");
    if let Some(w) = &rep.wake_cost {
        let _ = writeln!(
            s,
            "This host's wake-up: an eventfd write that wakes a thread asleep on the other CPU costs its writer {:.1} µs of CPU, \
             one on the writer's own CPU {:.1} µs (median of {} each). Each interrupt vutap sends a frontend asleep on its call \
             eventfd is such a wake-up, so *irqs ≤ ns/f* = interrupts per frame × the cross-CPU figure: the most they cost per \
             frame here (an interrupt that finds the frontend awake costs far less), CPU the raw loop, which notifies nobody, \
             does not spend. One-pair cells only, whose frontend runs on the other CPU; multi-pair cells run unpinned.\n",
            w.cross_cpu_ns / 1e3,
            w.same_cpu_ns / 1e3,
            w.samples
        );
    }
    for arr in [Arrangement::Macvtap, Arrangement::Tap] {
        let r = rows(rep, arr);
        if r.is_empty() {
            continue;
        }
        let dpdk = arr == Arrangement::Tap && rep.cases.iter().any(|c| c.backend == Backend::Dpdk);
        match arr {
            Arrangement::Macvtap => {
                let _ = writeln!(s, "## macvtap (far side: veth peer in a netns)\n");
            }
            Arrangement::Tap => {
                let _ = writeln!(s, "## plain multi-queue tap (far side: AF_PACKET on the tap in the host)\n");
            }
        }
        let mut head = "| dir | size | pairs | rx bufs | vutap | vutap CPU ns/f | vutap drops |".to_string();
        let mut sep = "|---|---|---|---|---|---|---|".to_string();
        if dpdk {
            head += " DPDK | DPDK CPU ns/f | DPDK drops |";
            sep += "---|---|---|";
        }
        head += " ceiling | ceiling CPU ns/f | vutap % ceiling | vutap CPU ÷ ceiling CPU |";
        sep += "---|---|---|---|";
        if dpdk {
            head += " vutap / DPDK |";
            sep += "---|";
        }
        let _ = writeln!(s, "{head}\n{sep}");
        for (dir, size, pairs, rxbuf) in r {
            let v = rep.find(arr, Backend::Vutap, dir, size, pairs, rxbuf);
            let d = rep.find(arr, Backend::Dpdk, dir, size, pairs, rxbuf);
            let c = rep.find(arr, Backend::Ceiling, dir, size, pairs, "-");
            let mut line = format!(
                "| {} | {} | {pairs} | {rxbuf} | {} | {} | {} |",
                if dir == Dir::Tx { "TX" } else { "RX" },
                size_label(size),
                cell(v),
                cpu(v),
                drops(v)
            );
            if dpdk {
                let _ = write!(line, " {} | {} | {} |", cell(d), cpu(d), drops(d));
            }
            let _ = write!(line, " {} | {} | {} | {} |", cell(c), cpu(c), ratio(v, c, true), cpu_ratio(v, c));
            if dpdk {
                let _ = write!(line, " {} |", ratio(v, d, false));
            }
            let _ = writeln!(s, "{line}");
        }
        let _ = writeln!(s);
        explain(&mut s, rep, arr, dpdk);
    }
    summary_table(&mut s, rep);
    io_uring_table(&mut s, rep);
    profile_table(&mut s, rep);
    // Scaling: N pairs vs 1 pair.
    let mut sc = String::new();
    for c in rep.cases.iter().filter(|c| c.pairs > 1 && c.gbps > 0.0) {
        let rx = if c.backend == Backend::Ceiling { "-" } else { c.rxbuf };
        if let Some(one) = rep.find(c.arrangement, c.backend, c.dir, c.size, 1, rx).filter(|o| o.gbps > 0.0) {
            let _ = writeln!(
                sc,
                "| {:?} | {:?} | {:?} | {} | {} | {:.2}x |",
                c.arrangement,
                c.backend,
                c.dir,
                size_label(c.size),
                c.pairs,
                c.gbps / one.gbps
            );
        }
    }
    if !sc.is_empty() {
        let _ = writeln!(s, "## Scaling (throughput with N pairs / with 1 pair)\n\n| arrangement | backend | dir | size | pairs | speed-up |\n|---|---|---|---|---|---|\n{sc}");
    }
    if !rep.latency.is_empty() {
        let _ = writeln!(s, "## 64 B ping-pong round trip (bench → backend → far-side reflector → backend → bench)\n\n| arrangement | backend | p50 µs | p99 µs | samples |\n|---|---|---|---|---|");
        for l in &rep.latency {
            let _ = writeln!(
                s,
                "| {:?} | {:?}{} | {:.1} | {:.1} | {}{} |",
                l.arrangement,
                l.backend,
                poll_label(l),
                l.p50_us,
                l.p99_us,
                l.samples,
                l.error.as_deref().map(|e| format!(" ({e})")).unwrap_or_default()
            );
        }
        let _ = writeln!(s);
    }
    let errs: Vec<&CaseResult> = rep.cases.iter().filter(|c| c.error.is_some()).collect();
    if !errs.is_empty() || !rep.notes.is_empty() {
        let _ = writeln!(s, "## Notes\n");
        for n in &rep.notes {
            let _ = writeln!(s, "- {n}");
        }
        for c in errs {
            let _ = writeln!(
                s,
                "- {:?}/{:?} {:?} {} x{} {}: {}",
                c.arrangement,
                c.backend,
                c.dir,
                size_label(c.size),
                c.pairs,
                c.rxbuf,
                c.error.as_deref().unwrap_or("").lines().next().unwrap_or("")
            );
        }
    }
    s
}

/// One row of panels in the chart: a figure per (1 pair, mergeable RX) case.
struct Metric {
    title: &'static str,
    value: fn(&CaseResult) -> f64,
    /// Leave the TSO case and DPDK out of the axis range (their bars are clipped and
    /// labelled), so that the other bars stay readable: a TSO frame costs tens of times a 64 B
    /// one, and DPDK's polling lcore burns a whole core however few frames it moves.
    axis_without_outliers: bool,
}

const METRICS: [Metric; 3] = [
    Metric { title: "throughput, Gbit/s", value: |c| c.gbps, axis_without_outliers: false },
    Metric { title: "frame rate, Mpps", value: |c| c.mpps, axis_without_outliers: false },
    Metric {
        title: "backend CPU per delivered frame, ns",
        value: |c| if c.mpps > 0.0 { c.cpu_ns_per_frame } else { 0.0 },
        axis_without_outliers: true,
    },
];

/// Grouped bars: one row per metric (Gbit/s, Mpps, CPU ns/frame), one panel per direction,
/// groups = frame sizes (1 pair, mergeable RX), bars = each (arrangement, backend) series.
pub fn svg(rep: &Report) -> String {
    let series: [(Arrangement, Backend, &str, &str); 5] = [
        (Arrangement::Macvtap, Backend::Vutap, "vutap (macvtap)", "#1f77b4"),
        (Arrangement::Macvtap, Backend::Ceiling, "ceiling (macvtap)", "#aec7e8"),
        (Arrangement::Tap, Backend::Vutap, "vutap (tap)", "#2ca02c"),
        (Arrangement::Tap, Backend::Dpdk, "DPDK testpmd (tap)", "#d62728"),
        (Arrangement::Tap, Backend::Ceiling, "ceiling (tap)", "#98df8a"),
    ];
    let mut sizes: Vec<u32> = rep.cases.iter().map(|c| c.size).collect();
    sizes.sort_unstable();
    sizes.dedup();
    let get = |m: &Metric, a, b, d, size| {
        let rx = if b == Backend::Ceiling || d == Dir::Tx { "-" } else { "mrg" };
        rep.find(a, b, d, size, 1, rx).map(|c| (m.value)(c)).unwrap_or(0.0)
    };
    let (pw, ph, top, left, row_gap) = (460.0f64, 220.0f64, 50.0f64, 70.0f64, 70.0f64);
    let width = left + 2.0 * (pw + 40.0);
    let rows_h = METRICS.len() as f64 * (ph + row_gap);
    let height = top + rows_h + 30.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="20" font-size="15" text-anchor="middle">vutap-bench: per frame size, 1 queue pair (mergeable RX buffers)</text>"#,
        width / 2.0
    );
    for (ri, m) in METRICS.iter().enumerate() {
        let y_top = top + ri as f64 * (ph + row_gap);
        for (pi, dir) in [Dir::Tx, Dir::Rx].into_iter().enumerate() {
            let x0 = left + pi as f64 * (pw + 40.0);
            let dsizes: Vec<u32> = sizes.iter().copied().filter(|&z| !(dir == Dir::Rx && z == TSO_SIZE)).collect();
            let outlier = |b: Backend, z: u32| m.axis_without_outliers && (b == Backend::Dpdk || (z == TSO_SIZE && dsizes.len() > 1));
            let max = dsizes
                .iter()
                .flat_map(|&z| series.iter().map(move |&(a, b, _, _)| (a, b, z)))
                .filter(|&(_, b, z)| !outlier(b, z))
                .map(|(a, b, z)| get(m, a, b, dir, z))
                .fold(0.0f64, f64::max)
                .max(0.1);
            let max = nice(max);
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" font-size="13" text-anchor="middle">{}: {}</text>"#,
                x0 + pw / 2.0,
                y_top - 10.0,
                if dir == Dir::Tx { "TX (bench → backend → tap)" } else { "RX (tap → backend → bench)" },
                m.title
            );
            let base = y_top + ph;
            let _ = writeln!(s, r#"<line x1="{x0}" y1="{base}" x2="{}" y2="{base}" stroke="black"/>"#, x0 + pw);
            let _ = writeln!(s, r#"<line x1="{x0}" y1="{y_top}" x2="{x0}" y2="{base}" stroke="black"/>"#);
            for t in 0..=4 {
                let v = max * t as f64 / 4.0;
                let y = base - ph * t as f64 / 4.0;
                let _ = writeln!(
                    s,
                    r##"<line x1="{x0}" y1="{y}" x2="{}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{}</text>"##,
                    x0 + pw,
                    x0 - 4.0,
                    y + 4.0,
                    tick(v)
                );
            }
            let gw = pw / dsizes.len().max(1) as f64;
            let bw = (gw - 10.0) / series.len() as f64;
            for (gi, &z) in dsizes.iter().enumerate() {
                let gx = x0 + gi as f64 * gw + 5.0;
                for (si, &(a, b, _, color)) in series.iter().enumerate() {
                    let v = get(m, a, b, dir, z);
                    let h = ph * (v / max).min(1.0);
                    let x = gx + si as f64 * bw;
                    let _ = writeln!(
                        s,
                        r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="{color}"><title>{v:.3}</title></rect>"#,
                        base - h,
                        bw - 1.0,
                    );
                    if v > max {
                        // Off the axis: say how far.
                        let _ = writeln!(
                            s,
                            r#"<text transform="translate({:.1},{:.1}) rotate(-90)" text-anchor="end" font-size="10" fill="white">{v:.0}</text>"#,
                            x + bw / 2.0 + 3.0,
                            y_top + 4.0
                        );
                    }
                }
                let _ = writeln!(
                    s,
                    r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
                    gx + gw / 2.0 - 5.0,
                    base + 16.0,
                    size_label(z)
                );
            }
        }
    }
    for (i, &(_, _, label, color)) in series.iter().enumerate() {
        let x = left + i as f64 * 190.0;
        let y = top + rows_h + 10.0;
        let _ = writeln!(
            s,
            r#"<rect x="{x}" y="{}" width="12" height="12" fill="{color}"/><text x="{}" y="{}">{label}</text>"#,
            y - 10.0,
            x + 18.0,
            y
        );
    }
    let _ = writeln!(s, "</svg>");
    s
}

/// An axis tick (a quarter of a [`nice`] maximum): exact, without trailing zeros.
fn tick(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn nice(v: f64) -> f64 {
    let p = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if m * p >= v {
            return m * p;
        }
    }
    10.0 * p
}

#[cfg(test)]
mod tests {
    use super::super::backend_counters::BackendCounters;
    use super::super::load_cpu::LoadCpu;
    use super::super::RoundFigures;
    use super::*;

    fn case(backend: Backend, dir: Dir, size: u32, rxbuf: &'static str, mpps: f64) -> CaseResult {
        CaseResult {
            arrangement: Arrangement::Tap,
            backend,
            dir,
            size,
            frame_len: super::super::frame_len(size),
            pairs: 1,
            rxbuf,
            secs: 1.0,
            gbps: mpps * size as f64 * 8e-3,
            mpps,
            offered_mpps: mpps * 1.25,
            drops: 0,
            drop_pct: 20.0,
            bad: 0,
            cpu_ns_per_frame: 1000.0 / mpps,
            cpu_cores: 0.5,
            load: LoadCpu { cores: 0.97, busiest_thread: 0.95, polling: 0.0 },
            load_cpus: 1,
            load_limited: backend == Backend::Vutap,
            counters: (backend == Backend::Vutap).then(|| {
                let before = Default::default();
                let after =
                    [("rx_frames", 1000), ("rx_batches", 40), ("kicks", 5), ("interrupts", 20), ("wakeups", 50), ("rx_no_buffers", 3)]
                        .map(|(k, v)| (k.to_string(), v))
                        .into();
                BackendCounters::between(&before, &after, dir)
            }),
            rounds_gbps: Vec::new(),
            rounds: Vec::new(),
            profile: None,
            error: None,
        }
    }

    fn report() -> Report {
        let mut cases = Vec::new();
        for size in [64, 1500] {
            cases.push(case(Backend::Vutap, Dir::Rx, size, "mrg", 0.4));
            cases.push(case(Backend::Dpdk, Dir::Rx, size, "mrg", 0.05));
            cases.push(case(Backend::Ceiling, Dir::Rx, size, "-", 0.6));
        }
        Report { host: "test".into(), cases, ..Report::default() }
    }

    #[test]
    fn test_markdown_explains_each_cell_with_counters_and_both_sides_cpu() {
        let md = markdown(&report());
        let row = md.lines().find(|l| l.starts_with("| RX | 64 | 1 | mrg | 25.0 |")).unwrap_or_else(|| panic!("no counters row in\n{md}"));
        // frames/batch, kicks, irqs, wake-ups per frame, no-buf and EAGAIN per 1000 frames.
        assert!(row.contains("| 25.0 | 0.005 | 0.020 | 0.050 | 3.00 | 0.00 |"), "{row}");
        assert!(row.contains("0.500 → 0.400"), "offered → delivered: {row}");
        assert!(row.contains("0.50 / 0.97 (0.95) **load-limited**"), "{row}");
        assert!(row.contains("0.062 → 0.050 | 0.50 / 0.97 (0.95) |"), "DPDK cell, not flagged: {row}");
    }

    #[test]
    fn test_interrupts_are_priced_at_the_hosts_wake_up_only_when_it_was_measured() {
        let old = markdown(&report());
        assert!(!old.contains("irqs ≤ ns/f") && !old.contains("This host's wake-up"), "a report without the figure renders as before");
        let rep = Report { wake_cost: Some(WakeCost { cross_cpu_ns: 20_000.0, same_cpu_ns: 2_500.0, samples: 200 }), ..report() };
        let md = markdown(&rep);
        assert!(md.contains("costs its writer 20.0 µs of CPU, one on the writer's own CPU 2.5 µs (median of 200 each)"), "{md}");
        let row = md.lines().find(|l| l.starts_with("| RX | 64 | 1 | mrg | 25.0 |")).unwrap_or_else(|| panic!("no counters row in\n{md}"));
        // 0.020 interrupts per frame at 20 µs each: at most 400 ns per frame.
        assert!(row.contains("| 3.00 | 0.00 | 400 | 0.500 → 0.400 |"), "{row}");
        let mut two = report();
        two.wake_cost = rep.wake_cost;
        two.cases.iter_mut().for_each(|c| c.pairs = 2);
        let md2 = markdown(&two);
        let row2 =
            md2.lines().find(|l| l.starts_with("| RX | 64 | 2 | mrg | 25.0 |")).unwrap_or_else(|| panic!("no counters row in\n{md2}"));
        assert!(row2.contains("| 3.00 | 0.00 | – | 0.500 → 0.400 |"), "unpinned multi-pair cell, not priced: {row2}");
        let head = md.lines().find(|l| l.starts_with("| dir | size | pairs | rx bufs | frames/batch")).unwrap();
        assert_eq!(head.matches('|').count(), row.matches('|').count(), "one cell per column:\n{head}\n{row}");
    }

    #[test]
    fn test_svg_has_throughput_rate_and_cost_panels_for_both_directions() {
        let svg = svg(&report());
        for title in ["throughput, Gbit/s", "frame rate, Mpps", "backend CPU per delivered frame, ns"] {
            assert_eq!(svg.matches(title).count(), 2, "{title}");
        }
        // The 64 B RX bars are visible in the Mpps panel: 0.4 of a 0.5 axis.
        assert!(svg.contains("<title>0.400</title>"));
        assert!(svg.contains(">0.25</text>"), "exact ticks on a 0..1 axis");
        // DPDK's polling makes 20000 ns/frame: off the axis (set by vutap's 2500), labelled.
        assert!(svg.contains(">20000</text>"), "clipped DPDK bar labelled");
    }

    #[test]
    fn test_profile_table_has_a_row_per_profiled_backend_and_a_column_per_bucket() {
        let mut rep = report();
        assert!(!markdown(&rep).contains("Where the backend's CPU goes"), "no table without --profile");
        rep.cases[0].profile = Some([(Bucket::TapCopy, 120.4), (Bucket::TapPath, 800.0), (Bucket::Seccomp, 30.0)].into());
        rep.cases[2].profile = Some([(Bucket::TapCopy, 100.0), (Bucket::TapPath, 700.0)].into());
        let md = markdown(&rep);
        let head =
            md.lines().find(|l| l.starts_with("| arrangement | dir | size | pairs | rx bufs | backend | CPU ns/f |")).expect("header");
        assert_eq!(head.matches('|').count(), 10 + Bucket::ALL.len());
        assert!(md.contains("| Tap | Rx | 64 | 1 | mrg | vutap | 950 | 920 | 30 (3 %) | 120 | 800 | 0 | 30 | 0 |"), "{md}");
        assert!(md.contains("| Tap | Rx | 64 | 1 | - | raw loop | 800 | 800 | 0 (0 %) | 100 | 700 | 0 | 0 |"), "{md}");
        assert!(!md.contains("DPDK testpmd |"), "DPDK was not profiled");
    }

    #[test]
    fn test_ratios_compare_round_by_round() {
        let mut rep = report();
        let rounds = |v: &[(f64, f64)]| v.iter().map(|&(gbps, cpu_ns_per_frame)| Some(RoundFigures { gbps, cpu_ns_per_frame })).collect();
        // The host was slower in the second round, but each round says vutap costs 1.10x the
        // ceiling's CPU and moves 0.90x its frames, whatever the cells' own figures (their median
        // rounds: 2500 against 1667 ns here) would give.
        rep.cases[0].rounds = rounds(&[(0.45, 1100.0), (0.30, 1650.0), (0.40, 1320.0)]);
        rep.cases[2].rounds = rounds(&[(0.50, 1000.0), (0.333, 1500.0), (0.444, 1200.0)]);
        let md = markdown(&rep);
        let row = md.lines().find(|l| l.starts_with("| RX | 64 | 1 | mrg |")).expect("64 B row");
        assert!(row.ends_with("| 90% | 1.10 | 8.00x |"), "{row}");
    }

    #[test]
    fn test_summary_table_has_a_row_per_one_pair_vutap_cell() {
        let mut rep = report();
        let mut uring = case(Backend::VutapIoUring, Dir::Rx, 64, "mrg", 0.5);
        uring.cpu_ns_per_frame = 2000.0;
        rep.cases.push(uring);
        let md = markdown(&rep);
        assert!(md.contains("| arrangement | dir | size | vutap Gbit/s | vutap ns/f |"), "{md}");
        // vutap 2500 ns/f against the ceiling's 1667, 8x DPDK, io_uring 2000 ns/f = 0.80x plain.
        assert!(md.contains("| tap | RX mrg | 64 | 0.20 | 2500 | 0.31 | 1667 | 1.50 | 0.03 | 8.00× | 2000 (0.80) | yes |"), "{md}");
        assert!(md.contains("| tap | RX mrg | 1500 | 4.80 | 2500 | 7.20 | 1667 | 1.50 | 0.60 | 8.00× | – | yes |"), "{md}");
    }

    #[test]
    fn test_latency_rows_name_the_polling_option() {
        let mut rep = report();
        let row = |busy_poll_us, adaptive_poll_us, p50_us| LatencyResult {
            arrangement: Arrangement::Tap,
            backend: Backend::Vutap,
            samples: 2000,
            p50_us,
            p99_us: 2.0 * p50_us,
            error: None,
            busy_poll_us,
            adaptive_poll_us,
        };
        rep.latency = vec![row(0, 0, 80.0), row(50, 0, 25.0), row(0, 50, 27.5)];
        let md = markdown(&rep);
        assert!(md.contains("| Tap | Vutap | 80.0 | 160.0 | 2000 |"), "{md}");
        assert!(md.contains("| Tap | Vutap (--busy-poll-us 50) | 25.0 | 50.0 | 2000 |"), "{md}");
        assert!(md.contains("| Tap | Vutap (--adaptive-poll-us 50) | 27.5 | 55.0 | 2000 |"), "{md}");
        // A run from before the adaptive option reads as not using it.
        let old = r#"{"arrangement":"tap","backend":"vutap","samples":1,"p50_us":1.0,"p99_us":2.0,"error":null,"busy_poll_us":50}"#;
        let l: LatencyResult = serde_json::from_str(old).expect("old latency row");
        assert_eq!((l.busy_poll_us, l.adaptive_poll_us), (50, 0));
    }

    #[test]
    fn test_report_round_trips_through_json() {
        let mut rep = report();
        rep.cases[1].profile = Some([(Bucket::Eventfd, 12.0)].into());
        let back: Report = serde_json::from_str(&serde_json::to_string(&rep).expect("to json")).expect("from json");
        assert_eq!(markdown(&back), markdown(&rep));
        assert_eq!(svg(&back), svg(&rep));
    }
}
