//! Parsing `iperf3 -J` reports.

use serde::Serialize;

use super::{Error, Result};

/// Throughput of one iperf3 run, as seen by the sender and by the receiver.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct IperfResult {
    pub sent_gbps: f64,
    pub received_gbps: f64,
    /// TCP retransmissions counted by the sender (0 when iperf3 does not report them).
    pub retransmits: u64,
}

impl IperfResult {
    /// Parses the JSON report; `text` may carry other console lines around it.
    pub fn parse(text: &str) -> Result<IperfResult> {
        let bad = |detail: String| Error::Parse { what: "iperf3 JSON report".into(), detail };
        let (start, end) = match (text.find('{'), text.rfind('}')) {
            (Some(s), Some(e)) if s < e => (s, e),
            _ => return Err(bad(format!("no JSON object in: {}", text.trim()))),
        };
        let v: serde_json::Value = serde_json::from_str(&text[start..=end]).map_err(|e| bad(format!("{e}")))?;
        if let Some(err) = v.get("error").and_then(|e| e.as_str()) {
            return Err(bad(format!("iperf3 reported: {err}")));
        }
        let bps = |key: &str| v["end"][key]["bits_per_second"].as_f64().ok_or_else(|| bad(format!("missing end.{key}.bits_per_second")));
        Ok(IperfResult {
            sent_gbps: bps("sum_sent")? / 1e9,
            received_gbps: bps("sum_received")? / 1e9,
            retransmits: v["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sums_and_errors() {
        let ok = r#"noise {"start":{},"end":{"sum_sent":{"bits_per_second":2.5e9,"retransmits":3},
            "sum_received":{"bits_per_second":2.4e9}}} trailing"#;
        let r = IperfResult::parse(ok).unwrap();
        assert!((r.sent_gbps - 2.5).abs() < 1e-9 && (r.received_gbps - 2.4).abs() < 1e-9);
        assert_eq!(r.retransmits, 3);
        let err = r#"{"start":{},"end":{},"error":"unable to connect to server"}"#;
        assert!(IperfResult::parse(err).unwrap_err().to_string().contains("unable to connect"));
        assert!(IperfResult::parse("iperf3: not found").is_err());
    }
}
