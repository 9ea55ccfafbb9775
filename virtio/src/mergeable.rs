//! How a received frame spreads over mergeable RX buffers (VIRTIO_NET_F_MRG_RXBUF): the device
//! fills posted chains in order, each up to its capacity, and tells the guest in `num_buffers`
//! how many it used.

/// The number of chains a `frame_len`-byte frame fills and the bytes written into the last one,
/// given the chains' capacities in order; `None` if they cannot hold it (or it is empty).
pub fn chains_needed(frame_len: usize, capacities: impl IntoIterator<Item = usize>) -> Option<(usize, usize)> {
    if frame_len == 0 {
        return None;
    }
    let mut left = frame_len;
    for (i, cap) in capacities.into_iter().enumerate() {
        if left <= cap {
            return Some((i + 1, left));
        }
        left -= cap;
    }
    None
}

/// The bytes written into chain `index` of a frame spread as [`chains_needed`] said.
pub fn used_len(index: usize, chains: usize, last_len: usize, capacity: usize) -> usize {
    if index + 1 == chains {
        last_len
    } else {
        capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_chains_needed_single_chain() {
        assert_eq!(chains_needed(60, [1526, 1526]), Some((1, 60)));
        assert_eq!(chains_needed(1526, [1526]), Some((1, 1526)));
    }

    #[test]
    fn test_chains_needed_spans_chains() {
        assert_eq!(chains_needed(1527, [1526, 1526]), Some((2, 1)));
        assert_eq!(chains_needed(65562, std::iter::repeat_n(4096, 17)), Some((17, 65562 - 16 * 4096)));
    }

    #[test]
    fn test_chains_needed_not_enough_room() {
        assert_eq!(chains_needed(3000, [1000, 1000]), None);
        assert_eq!(chains_needed(0, [1000]), None);
        assert_eq!(chains_needed(10, []), None);
    }

    #[test]
    fn test_used_len_full_then_last() {
        let (n, last) = chains_needed(2500, [1000, 1000, 1000]).unwrap();
        let lens: Vec<_> = (0..n).map(|i| used_len(i, n, last, 1000)).collect();
        assert_eq!(lens, vec![1000, 1000, 500]);
    }
}
