//! `vutap stats`: fetch the metrics endpoint and print one table row per device and queue pair;
//! and the optional periodic one-line summary in the log (`--stats-interval SECS`).

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use crate::control::device::Device;
use crate::metrics::PairCounts;

#[derive(Debug, Error)]
pub enum StatsError {
    #[error("cannot reach the metrics endpoint {what}: {source}")]
    Connect {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("metrics endpoint {0} answered: {1}")]
    Http(String, String),
    #[error("no vutap metrics in the answer of {0}")]
    Empty(String),
}

/// Fetches the text from `--metrics-addr HOST:PORT` (HTTP) or a `--metrics-unix` socket path.
pub fn fetch(endpoint: &str) -> Result<String, StatsError> {
    let err = |source| StatsError::Connect { what: endpoint.to_string(), source };
    let mut text = String::new();
    if endpoint.starts_with('/') || endpoint.starts_with('.') {
        let mut s = UnixStream::connect(Path::new(endpoint)).map_err(err)?;
        s.set_read_timeout(Some(Duration::from_secs(5))).map_err(err)?;
        s.read_to_string(&mut text).map_err(err)?;
        return Ok(text);
    }
    let mut s = TcpStream::connect(endpoint).map_err(err)?;
    s.set_read_timeout(Some(Duration::from_secs(5))).map_err(err)?;
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {endpoint}\r\nConnection: close\r\n\r\n").map_err(err)?;
    s.read_to_string(&mut text).map_err(err)?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.lines().next().unwrap_or("");
    if !status.contains(" 200 ") {
        return Err(StatsError::Http(endpoint.to_string(), status.to_string()));
    }
    Ok(body.to_string())
}

/// One sample: metric name without `vutap_`/`_total`, its labels, its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: u64,
}

/// Parses the subset of the text format vutap writes.
pub fn parse(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let Some((lhs, value)) = line.rsplit_once(' ') else { continue };
        let Ok(value) = value.trim().parse::<u64>() else { continue };
        let (name, labels) = match lhs.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (lhs, ""),
        };
        let Some(name) = name.strip_prefix("vutap_") else { continue };
        let name = name.strip_suffix("_total").unwrap_or(name).to_string();
        let labels = labels
            .split("\",")
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                Some((k.trim().to_string(), v.trim_matches('"').replace("\\\"", "\"").replace("\\\\", "\\")))
            })
            .collect();
        out.push(Sample { name, labels, value });
    }
    out
}

/// The columns of the table, each a sum of counters.
const COLUMNS: &[(&str, &[&str])] = &[
    ("rx_frames", &["rx_frames"]),
    ("rx_bytes", &["rx_bytes"]),
    ("tx_frames", &["tx_frames"]),
    ("tx_bytes", &["tx_bytes"]),
    ("drops", &["rx_dropped", "tx_dropped"]),
    ("errors", &["rx_bad_chains", "tx_bad_chains", "rx_too_many_segments", "tx_too_many_segments", "tap_errors"]),
    ("no_rx_buf", &["rx_no_buffers"]),
    ("eagain", &["tx_eagain"]),
    ("batches", &["rx_batches", "tx_batches"]),
    ("kicks", &["kicks"]),
    ("irqs", &["interrupts"]),
];

/// A table with one row per (device, queue pair), then per device: link and connections.
pub fn table(samples: &[Sample]) -> String {
    let mut rows: BTreeMap<(String, u32), BTreeMap<&str, u64>> = BTreeMap::new();
    let mut devs: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for s in samples {
        let dev = s.labels.get("device").cloned().unwrap_or_default();
        if let Some(pair) = s.labels.get("queue_pair").and_then(|p| p.parse::<u32>().ok()) {
            let row = rows.entry((dev, pair)).or_default();
            for (col, parts) in COLUMNS {
                if parts.contains(&s.name.as_str()) {
                    *row.entry(col).or_default() += s.value;
                }
            }
        } else if s.name == "link_up" {
            devs.entry(dev).or_default().0 = s.value;
        } else if s.name == "device_connections" {
            devs.entry(dev).or_default().1 = s.value;
        }
    }
    let mut out = format!("{:<16} {:>2}", "device", "qp");
    for (c, _) in COLUMNS {
        out.push_str(&format!(" {c:>12}"));
    }
    out.push('\n');
    for ((dev, pair), row) in &rows {
        out.push_str(&format!("{dev:<16} {pair:>2}"));
        for (c, _) in COLUMNS {
            out.push_str(&format!(" {:>12}", row.get(c).copied().unwrap_or(0)));
        }
        out.push('\n');
    }
    for (dev, (link, conns)) in &devs {
        out.push_str(&format!("{dev}: link {}, {conns} connection(s)\n", if *link == 1 { "up" } else { "down" }));
    }
    out
}

/// `vutap stats ENDPOINT`: the table, or an error.
pub fn run(endpoint: &str) -> Result<String, StatsError> {
    let samples = parse(&fetch(endpoint)?);
    if samples.is_empty() {
        return Err(StatsError::Empty(endpoint.to_string()));
    }
    Ok(table(&samples))
}

/// One log line per device: frames and bytes each way, drops and errors since the last line.
pub fn summary_line(dev: &Device, last: &mut PairCounts) -> String {
    let mut now = PairCounts::default();
    for m in &dev.metrics {
        let c = m.snapshot();
        now.rx_frames += c.rx_frames;
        now.rx_bytes += c.rx_bytes;
        now.tx_frames += c.tx_frames;
        now.tx_bytes += c.tx_bytes;
        now.rx_dropped += c.rx_dropped;
        now.tx_dropped += c.tx_dropped;
        now.tap_errors += c.tap_errors + c.rx_bad_chains + c.tx_bad_chains + c.rx_too_many_segments + c.tx_too_many_segments;
    }
    let line = format!(
        "stats {}: rx {} frames {} B, tx {} frames {} B, drops {}, errors {}, link {}",
        dev.label,
        now.rx_frames - last.rx_frames,
        now.rx_bytes - last.rx_bytes,
        now.tx_frames - last.tx_frames,
        now.tx_bytes - last.tx_bytes,
        (now.rx_dropped + now.tx_dropped) - (last.rx_dropped + last.tx_dropped),
        now.tap_errors - last.tap_errors,
        if dev.link.is_up() { "up" } else { "down" },
    );
    *last = now;
    line
}

/// Logs [`summary_line`] for every device every `interval`.
pub fn spawn_summary(devices: Vec<Arc<Device>>, interval: Duration, seccomp: crate::operations::sandbox::Seccomp) -> io::Result<()> {
    std::thread::Builder::new().name("vutap-stats".into()).spawn(move || {
        seccomp.enter(crate::operations::sandbox::ThreadKind::StatsSummary);
        let mut last = vec![PairCounts::default(); devices.len()];
        loop {
            std::thread::sleep(interval);
            for (d, l) in devices.iter().zip(last.iter_mut()) {
                log::info!("{}", summary_line(d, l));
            }
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP vutap_rx_frames_total x\n# TYPE vutap_rx_frames_total counter\n\
        vutap_rx_frames_total{device=\"vm0\",queue_pair=\"0\"} 5\n\
        vutap_rx_frames_total{device=\"vm0\",queue_pair=\"1\"} 7\n\
        vutap_tx_dropped_total{device=\"vm0\",queue_pair=\"1\"} 2\n\
        vutap_rx_dropped_total{device=\"vm0\",queue_pair=\"1\"} 1\n\
        vutap_link_up{device=\"vm0\"} 0\n\
        vutap_device_connections_total{device=\"vm0\"} 3\n";

    #[test]
    fn test_parse_and_table() {
        let s = parse(TEXT);
        assert_eq!(s.len(), 6);
        assert_eq!(s[0].name, "rx_frames");
        assert_eq!(s[0].labels["device"], "vm0");
        assert_eq!(s[1].value, 7);
        let t = table(&s);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("device"), "{t}");
        let row1: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(&row1[..3], &["vm0", "1", "7"], "{t}");
        assert_eq!(row1[6], "3", "drops column sums rx+tx: {t}");
        assert!(t.contains("vm0: link down, 3 connection(s)"), "{t}");
    }
}
