//! Helpers shared by the migration tests (`e2e_migration.rs`) and the migration investigation
//! tools (`e2e_migration_baseline.rs`): HMP output fields, the peer pinger, iperf3 intervals.

#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::thread::JoinHandle;

pub use vutap_testbed::free_port;

/// The text a test's panic carried (`panic!` with a format gives a String, a literal a &str).
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic.downcast_ref::<String>().map(String::as_str).or_else(|| panic.downcast_ref::<&str>().copied()).unwrap_or("")
}

/// `"total time: 1305 ms"` (QEMU 7.2: `total time: 1305 milliseconds`) → 1305.
pub fn field_ms(info: &str, key: &str) -> Option<u64> {
    let line = info.lines().find(|l| l.trim_start().to_lowercase().starts_with(key))?;
    line.split(':').nth(1)?.split_whitespace().next()?.parse().ok()
}

/// `busybox ping` from the peer namespace toward the guest, `count` probes every `interval_ms`.
pub fn peer_pinger(netns: &str, ip: Ipv4Addr, count: u32, interval_ms: u64) -> JoinHandle<String> {
    let (ns, ip) = (netns.to_string(), ip.to_string());
    let interval = format!("{}", interval_ms as f64 / 1000.0);
    std::thread::spawn(move || {
        let o = std::process::Command::new("ip")
            .args(["netns", "exec", &ns, "busybox", "ping", "-i", &interval, "-c", &count.to_string(), "-W", "1", &ip])
            .output()
            .unwrap();
        format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
    })
}

/// One per-second sum of an `iperf3 -J` report.
#[derive(Debug)]
pub struct Interval {
    pub start: f64,
    pub end: f64,
    pub mbps: f64,
}

/// Per-second sums of an `iperf3 -J` report (`intervals[].sum`); empty if there is none.
pub fn iperf_intervals(text: &str) -> Vec<Interval> {
    let (Some(s), Some(e)) = (text.find('{'), text.rfind('}')) else {
        return Vec::new();
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text[s..=e]) else {
        return Vec::new();
    };
    v["intervals"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|i| {
                    let sum = &i["sum"];
                    Some(Interval {
                        start: sum["start"].as_f64()?,
                        end: sum["end"].as_f64()?,
                        mbps: sum["bits_per_second"].as_f64()? / 1e6,
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}
