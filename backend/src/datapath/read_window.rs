//! How many bytes of held RX buffers one `readv` should cover.
//!
//! With mergeable buffers a guest that negotiated GSO may receive 64 KiB frames, so vutap holds
//! buffers for one. Handing all of them to every read costs the kernel on every frame: past 8
//! iovecs it allocates an array and copies and checks each one (a Linux guest's ~1.5-4 KiB
//! buffers make 17-44 of them). Most frames are far smaller, so a read covers what the recent
//! frames needed; a bigger frame runs into the spill tail behind the window and is completed
//! from there by a copy (see `RxLoop::deliver`), never lost, and widens the window for the next.

/// Frames per period: the window follows the largest frame of the current and the previous
/// period, so it shrinks a period or two after big frames stop.
const PERIOD: u32 = 256;

#[derive(Debug, Default)]
pub struct ReadWindow {
    current_max: usize,
    previous_max: usize,
    seen: u32,
    /// A whole period has been seen: until then every read covers the largest frame.
    warm: bool,
}

impl ReadWindow {
    /// Records a frame of `len` bytes (virtio_net_hdr included).
    #[inline]
    pub fn observe(&mut self, len: usize) {
        self.current_max = self.current_max.max(len);
        self.seen += 1;
        if self.seen == PERIOD {
            self.previous_max = self.current_max;
            self.current_max = 0;
            self.seen = 0;
            self.warm = true;
        }
    }

    /// Bytes the next read should have room for, at most `largest` (the largest frame the
    /// device can receive).
    #[inline]
    pub fn bytes(&self, largest: usize) -> usize {
        if !self.warm {
            return largest;
        }
        self.current_max.max(self.previous_max).clamp(1, largest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_read_window_covers_the_largest_frame_until_warm() {
        let mut w = ReadWindow::default();
        for _ in 0..PERIOD - 1 {
            w.observe(100);
        }
        assert_eq!(w.bytes(65_562), 65_562);
        w.observe(100);
        assert_eq!(w.bytes(65_562), 100);
    }

    #[test]
    fn test_read_window_widens_at_once_and_shrinks_two_periods_later() {
        let mut w = ReadWindow::default();
        for _ in 0..PERIOD {
            w.observe(1526);
        }
        assert_eq!(w.bytes(65_562), 1526);
        w.observe(65_000);
        assert_eq!(w.bytes(65_562), 65_000, "a big frame widens the window for the next read");
        for _ in 0..PERIOD - 1 {
            w.observe(1526);
        }
        assert_eq!(w.bytes(65_562), 65_000, "the period that saw it is still the previous one");
        for _ in 0..PERIOD {
            w.observe(1526);
        }
        assert_eq!(w.bytes(65_562), 1526);
    }

    #[test]
    fn test_read_window_never_exceeds_the_largest_frame() {
        let mut w = ReadWindow::default();
        for _ in 0..PERIOD {
            w.observe(9000);
        }
        assert_eq!(w.bytes(1526), 1526);
    }
}
