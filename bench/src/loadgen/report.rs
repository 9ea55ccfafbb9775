//! The report: markdown tables, JSON, and a hand-written SVG bar chart.

use std::fmt::Write as _;

use super::{Arrangement, Backend, CaseResult, Dir, Report, TSO_SIZE};

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

fn ratio(a: Option<&CaseResult>, b: Option<&CaseResult>, pct: bool) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b.gbps > 0.0 && a.gbps > 0.0 => {
            if pct {
                format!("{:.0}%", 100.0 * a.gbps / b.gbps)
            } else {
                format!("{:.2}x", a.gbps / b.gbps)
            }
        }
        _ => "–".into(),
    }
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

pub fn markdown(rep: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# vutap-bench ({})\n", rep.host);
    let _ = writeln!(s, "Cells are `Gbit/s / Mpps` delivered and verified at the receiving end; CPU = backend process (or raw-loop threads) CPU ns per delivered frame; drops = offered − delivered.\n");
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
        head += " ceiling | ceiling CPU ns/f | vutap % ceiling |";
        sep += "---|---|---|";
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
            let _ = write!(line, " {} | {} | {} |", cell(c), cpu(c), ratio(v, c, true));
            if dpdk {
                let _ = write!(line, " {} |", ratio(v, d, false));
            }
            let _ = writeln!(s, "{line}");
        }
        let _ = writeln!(s);
    }
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
                "| {:?} | {:?} | {:.1} | {:.1} | {}{} |",
                l.arrangement,
                l.backend,
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

/// Grouped bars: one panel per direction, groups = frame sizes (1 pair, mergeable RX), bars =
/// each (arrangement, backend) series.
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
    let get = |a, b, d, size| {
        let rx = if b == Backend::Ceiling || d == Dir::Tx { "-" } else { "mrg" };
        rep.find(a, b, d, size, 1, rx).map(|c| c.gbps).unwrap_or(0.0)
    };
    let (pw, ph, top, left) = (460.0f64, 300.0f64, 50.0f64, 60.0f64);
    let width = left + 2.0 * (pw + 40.0);
    let height = top + ph + 110.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="20" font-size="15" text-anchor="middle">vutap-bench: throughput per frame size, 1 queue pair (Gbit/s)</text>"#,
        width / 2.0
    );
    for (pi, dir) in [Dir::Tx, Dir::Rx].into_iter().enumerate() {
        let x0 = left + pi as f64 * (pw + 40.0);
        let dsizes: Vec<u32> = sizes.iter().copied().filter(|&z| !(dir == Dir::Rx && z == TSO_SIZE)).collect();
        let max = dsizes
            .iter()
            .flat_map(|&z| series.iter().map(move |&(a, b, _, _)| (a, b, z)))
            .map(|(a, b, z)| get(a, b, dir, z))
            .fold(0.0f64, f64::max)
            .max(0.1);
        let max = nice(max);
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" font-size="13" text-anchor="middle">{}</text>"#,
            x0 + pw / 2.0,
            top - 10.0,
            if dir == Dir::Tx { "TX (bench → backend → tap → far side)" } else { "RX (far side → tap → backend → bench)" }
        );
        let _ = writeln!(s, r#"<line x1="{x0}" y1="{}" x2="{}" y2="{}" stroke="black"/>"#, top + ph, x0 + pw, top + ph);
        let _ = writeln!(s, r#"<line x1="{x0}" y1="{top}" x2="{x0}" y2="{}" stroke="black"/>"#, top + ph);
        for t in 0..=4 {
            let v = max * t as f64 / 4.0;
            let y = top + ph - ph * t as f64 / 4.0;
            let _ = writeln!(
                s,
                r##"<line x1="{x0}" y1="{y}" x2="{}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{v:.1}</text>"##,
                x0 + pw,
                x0 - 4.0,
                y + 4.0
            );
        }
        let gw = pw / dsizes.len().max(1) as f64;
        let bw = (gw - 10.0) / series.len() as f64;
        for (gi, &z) in dsizes.iter().enumerate() {
            let gx = x0 + gi as f64 * gw + 5.0;
            for (si, &(a, b, _, color)) in series.iter().enumerate() {
                let v = get(a, b, dir, z);
                let h = ph * v / max;
                let _ = writeln!(
                    s,
                    r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{color}"><title>{v:.2} Gbit/s</title></rect>"#,
                    gx + si as f64 * bw,
                    top + ph - h,
                    bw - 1.0,
                    h
                );
            }
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
                gx + gw / 2.0 - 5.0,
                top + ph + 16.0,
                size_label(z)
            );
        }
    }
    for (i, &(_, _, label, color)) in series.iter().enumerate() {
        let x = left + (i % 3) as f64 * 220.0;
        let y = top + ph + 45.0 + (i / 3) as f64 * 20.0;
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

fn nice(v: f64) -> f64 {
    let p = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if m * p >= v {
            return m * p;
        }
    }
    10.0 * p
}
