//! vutap's own counters over a measured window, scraped from its `--metrics-unix` endpoint before
//! and after: how many frames each batch, kick, interrupt and worker wake-up carried.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use vutap::operations::stats;

use super::error::{LoadgenError, Result};
use super::Dir;

/// Per-pair counters of every device, summed over the pairs, by name (`rx_frames`, `kicks`...).
pub type Totals = BTreeMap<String, u64>;

/// Reads vutap's metrics endpoint at `socket` and sums each per-pair counter over the pairs.
pub fn scrape(socket: &Path) -> Result<Totals> {
    let text =
        stats::fetch(&socket.display().to_string()).map_err(|e| LoadgenError::Metrics { socket: socket.to_path_buf(), source: e })?;
    Ok(sum_pairs(&stats::parse(&text)))
}

fn sum_pairs(samples: &[stats::Sample]) -> Totals {
    let mut t = Totals::new();
    for s in samples.iter().filter(|s| s.labels.contains_key("queue_pair")) {
        *t.entry(s.name.clone()).or_default() += s.value;
    }
    t
}

/// vutap's counters over one cell's window. `frames` and `batches` are of the cell's direction
/// (vutap's own count of the frames it moved); kicks, interrupts and wake-ups cover both rings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BackendCounters {
    pub frames: u64,
    pub batches: u64,
    pub kicks: u64,
    pub interrupts: u64,
    pub wakeups: u64,
    pub rx_no_buffers: u64,
    pub tx_eagain: u64,
    pub frames_per_batch: f64,
    pub kicks_per_frame: f64,
    pub interrupts_per_frame: f64,
    pub wakeups_per_frame: f64,
    /// RX stops for lack of guest buffers, per 1000 frames.
    pub rx_no_buffers_per_1k: f64,
    /// TX waits for a full tap (EAGAIN), per 1000 frames.
    pub tx_eagain_per_1k: f64,
}

impl BackendCounters {
    /// The difference `after - before` for a cell in direction `dir`.
    pub fn between(before: &Totals, after: &Totals, dir: Dir) -> BackendCounters {
        let d = |name: &str| after.get(name).copied().unwrap_or(0).saturating_sub(before.get(name).copied().unwrap_or(0));
        let (frames, batches) = match dir {
            Dir::Tx => (d("tx_frames"), d("tx_batches")),
            Dir::Rx => (d("rx_frames"), d("rx_batches")),
        };
        let per = |n: u64, of: u64| if of > 0 { n as f64 / of as f64 } else { 0.0 };
        let (kicks, interrupts, wakeups, rx_no_buffers, tx_eagain) =
            (d("kicks"), d("interrupts"), d("wakeups"), d("rx_no_buffers"), d("tx_eagain"));
        BackendCounters {
            frames,
            batches,
            kicks,
            interrupts,
            wakeups,
            rx_no_buffers,
            tx_eagain,
            frames_per_batch: per(frames, batches),
            kicks_per_frame: per(kicks, frames),
            interrupts_per_frame: per(interrupts, frames),
            wakeups_per_frame: per(wakeups, frames),
            rx_no_buffers_per_1k: 1000.0 * per(rx_no_buffers, frames),
            tx_eagain_per_1k: 1000.0 * per(tx_eagain, frames),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# TYPE vutap_rx_frames_total counter\n\
        vutap_rx_frames_total{device=\"d\",queue_pair=\"0\"} 3000\n\
        vutap_rx_frames_total{device=\"d\",queue_pair=\"1\"} 1000\n\
        vutap_rx_batches_total{device=\"d\",queue_pair=\"0\"} 100\n\
        vutap_kicks_total{device=\"d\",queue_pair=\"0\"} 40\n\
        vutap_interrupts_total{device=\"d\",queue_pair=\"0\"} 200\n\
        vutap_wakeups_total{device=\"d\",queue_pair=\"0\"} 400\n\
        vutap_rx_no_buffers_total{device=\"d\",queue_pair=\"0\"} 8\n\
        vutap_tx_frames_total{device=\"d\",queue_pair=\"0\"} 77\n\
        vutap_device_connections_total{device=\"d\"} 5\n";

    #[test]
    fn test_sum_pairs_adds_the_pairs_and_skips_device_counters() {
        let t = sum_pairs(&stats::parse(TEXT));
        assert_eq!(t.get("rx_frames"), Some(&4000));
        assert_eq!(t.get("device_connections"), None);
    }

    #[test]
    fn test_between_gives_per_frame_figures_of_the_cell_direction() {
        let before = Totals::from([("rx_frames".to_string(), 0), ("kicks".to_string(), 10)]);
        let after = sum_pairs(&stats::parse(TEXT));
        let c = BackendCounters::between(&before, &after, Dir::Rx);
        assert_eq!((c.frames, c.batches, c.kicks, c.interrupts, c.wakeups, c.rx_no_buffers), (4000, 100, 30, 200, 400, 8));
        assert_eq!(c.frames_per_batch, 40.0);
        assert_eq!(c.kicks_per_frame, 30.0 / 4000.0);
        assert_eq!(c.interrupts_per_frame, 0.05);
        assert_eq!(c.wakeups_per_frame, 0.1);
        assert_eq!(c.rx_no_buffers_per_1k, 2.0);
        assert_eq!(c.tx_eagain_per_1k, 0.0);
        let tx = BackendCounters::between(&Totals::new(), &after, Dir::Tx);
        assert_eq!((tx.frames, tx.frames_per_batch), (77, 0.0));
    }
}
