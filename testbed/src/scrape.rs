//! Reading a running vutap from outside, as an operator's tools do: its Prometheus text over
//! HTTP, `vutap stats`, and the backend request channel a frontend set up.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use super::Vutap;

/// `GET path` on 127.0.0.1:`port`; the whole response, headers included.
pub fn http_get(port: u16, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to the metrics endpoint");
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").expect("send the request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read the response");
    out
}

/// The value of the sample `name{labels}` in Prometheus text, e.g.
/// `metric(t, "vutap_link_up", "device=\"a\"")`.
pub fn metric(text: &str, name: &str, labels: &str) -> Option<u64> {
    let key = format!("{name}{{{labels}}} ");
    text.lines().find_map(|l| l.strip_prefix(&key)).and_then(|v| v.trim().parse().ok())
}

/// The sum of the samples of `name` whose labels contain `labels`.
pub fn metric_sum(text: &str, name: &str, labels: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(labels))
        .filter_map(|l| l.rsplit_once(' ')?.1.trim().parse::<u64>().ok())
        .sum()
}

/// `vutap stats ENDPOINT`: exit code and everything it printed.
pub fn vutap_stats(endpoint: &str) -> (i32, String) {
    let out = Command::new(Vutap::binary().expect("vutap binary")).args(["stats", endpoint]).output().expect("run vutap stats");
    (out.status.code().unwrap_or(-1), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// Reads one backend request header (request, flags, size) from the channel, within `timeout`.
pub fn read_backend_req(ch: &mut UnixStream, timeout: Duration) -> Option<(u32, u32, u32)> {
    ch.set_read_timeout(Some(timeout)).ok()?;
    let mut h = [0u8; 12];
    ch.read_exact(&mut h).ok()?;
    let u = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().expect("4 bytes"));
    Some((u(0), u(4), u(8)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_metric_and_metric_sum_read_prometheus_samples() {
        let t = "# TYPE vutap_tx_frames_total counter\nvutap_tx_frames_total{device=\"a\",queue_pair=\"0\"} 5\n\
                 vutap_tx_frames_total{device=\"a\",queue_pair=\"1\"} 7\nvutap_tx_frames_total{device=\"b\",queue_pair=\"0\"} 1\n";
        assert_eq!(metric(t, "vutap_tx_frames_total", "device=\"a\",queue_pair=\"1\""), Some(7));
        assert_eq!(metric(t, "vutap_tx_frames_total", "device=\"c\",queue_pair=\"0\""), None);
        assert_eq!(metric_sum(t, "vutap_tx_frames_total", "device=\"a\""), 12);
    }
}
