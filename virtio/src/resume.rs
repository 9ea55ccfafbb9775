//! Where a (re)started backend resumes a split ring: the frontend's SET_VRING_BASE against the
//! used index the guest already sees.
//!
//! vutap completes chains in order and puts back what it cannot finish, so whenever it stops a
//! ring cleanly the used index equals the next available one, and a frontend that restores the
//! base it got from GET_VRING_BASE (QEMU, migration) gives that same value. A backend that was
//! killed had no GET_VRING_BASE: QEMU then restores the used index as the base, but
//! cloud-hypervisor sends the ring's current *available* index, skipping every chain the dead
//! backend had not completed. For the RX ring that is every buffer the guest posted, and its
//! NIC would never receive again. Chains made available but not used were never finished, so
//! the backend resumes at the used index and takes them again (as DPDK's vhost library does):
//! RX buffers are refilled, and TX frames that may already have gone out are sent once more.

/// The ring positions a backend resumes from: both are the same index, by the reasoning above.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resume {
    pub next_avail: u16,
    pub next_used: u16,
    /// Chains between the used index and the frontend's base that will be taken again.
    pub retaken: u16,
}

/// Resumes at the used index when the frontend's `base` is ahead of it by at most the ring
/// `size` (chains left unfinished by a previous backend). Anything else (base equal to or
/// behind the used index, or an impossible gap) keeps the frontend's base for `next_avail` and
/// the used index for `next_used`, as before. Without a readable used index, both are `base`.
pub fn resume_position(base: u16, used: Option<u16>, size: u16) -> Resume {
    let Some(used) = used else {
        return Resume { next_avail: base, next_used: base, retaken: 0 };
    };
    let gap = base.wrapping_sub(used);
    if gap > 0 && gap <= size {
        Resume { next_avail: used, next_used: used, retaken: gap }
    } else {
        Resume { next_avail: base, next_used: used, retaken: 0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_resume_position_clean_stop_keeps_base() {
        assert_eq!(resume_position(40, Some(40), 256), Resume { next_avail: 40, next_used: 40, retaken: 0 });
        assert_eq!(resume_position(0, Some(0), 256), Resume { next_avail: 0, next_used: 0, retaken: 0 });
    }

    #[test]
    fn test_resume_position_takes_back_unfinished_chains() {
        // cloud-hypervisor after a backend was killed: base = avail index, 256 RX buffers posted.
        assert_eq!(resume_position(1256, Some(1000), 256), Resume { next_avail: 1000, next_used: 1000, retaken: 256 });
        assert_eq!(resume_position(3, Some(65533), 256), Resume { next_avail: 65533, next_used: 65533, retaken: 6 });
    }

    #[test]
    fn test_resume_position_ignores_impossible_gaps() {
        // More than a ring's worth, or the used index ahead of the base: not ours to fix.
        assert_eq!(resume_position(1000, Some(700), 256), Resume { next_avail: 1000, next_used: 700, retaken: 0 });
        assert_eq!(resume_position(10, Some(12), 256), Resume { next_avail: 10, next_used: 12, retaken: 0 });
    }

    #[test]
    fn test_resume_position_without_used_index() {
        assert_eq!(resume_position(77, None, 256), Resume { next_avail: 77, next_used: 77, retaken: 0 });
    }
}
