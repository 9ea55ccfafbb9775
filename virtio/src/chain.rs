//! Checks on a descriptor chain as the backend walks it: every descriptor must point the right
//! way, the chain must not be longer than the queue allows, and its byte count must neither
//! overflow nor exceed what one frame can be. The walker feeds descriptors one at a time so the
//! hot path needs no allocation.

use thiserror::Error;

/// Which way data flows in a chain, from the device's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// TX: the guest wrote a frame, the device only reads.
    DeviceReads,
    /// RX: the guest posted empty buffers, the device only writes.
    DeviceWrites,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainLimits {
    /// At most this many descriptors (the queue size, as the spec bounds a chain by it).
    pub max_descriptors: usize,
    /// At most this many bytes in all.
    pub max_bytes: u32,
    /// At least this many bytes in all (the virtio_net_hdr).
    pub min_bytes: u32,
}

#[derive(Debug, Error, PartialEq, Eq, Clone, Copy)]
pub enum ChainError {
    #[error("empty descriptor chain")]
    Empty,
    #[error("descriptor {index} is {found} where the chain must be device-{expected}")]
    WrongDirection { index: usize, found: &'static str, expected: &'static str },
    #[error("chain has more than {max} descriptors")]
    TooManyDescriptors { max: usize },
    #[error("chain length overflows u32")]
    LengthOverflow,
    #[error("chain holds {len} bytes, more than the {max} a frame can have")]
    TooLong { len: u64, max: u32 },
    #[error("chain holds {len} bytes, fewer than the {min} the header needs")]
    TooShort { len: u32, min: u32 },
}

fn direction_name(device_writable: bool) -> &'static str {
    if device_writable {
        "writable"
    } else {
        "readable"
    }
}

/// Accumulates one chain's descriptors and validates them.
#[derive(Debug, Clone)]
pub struct ChainCheck {
    direction: Direction,
    limits: ChainLimits,
    count: usize,
    total: u32,
}

impl ChainCheck {
    pub fn new(direction: Direction, limits: ChainLimits) -> Self {
        ChainCheck { direction, limits, count: 0, total: 0 }
    }

    /// Accounts one descriptor of `len` bytes.
    pub fn push(&mut self, len: u32, device_writable: bool) -> Result<(), ChainError> {
        let want_writable = self.direction == Direction::DeviceWrites;
        if device_writable != want_writable {
            return Err(ChainError::WrongDirection {
                index: self.count,
                found: direction_name(device_writable),
                expected: direction_name(want_writable),
            });
        }
        if self.count >= self.limits.max_descriptors {
            return Err(ChainError::TooManyDescriptors { max: self.limits.max_descriptors });
        }
        self.count += 1;
        self.total = self.total.checked_add(len).ok_or(ChainError::LengthOverflow)?;
        if self.total > self.limits.max_bytes {
            return Err(ChainError::TooLong { len: self.total as u64, max: self.limits.max_bytes });
        }
        Ok(())
    }

    /// The chain's total byte count, once it is complete.
    pub fn finish(self) -> Result<u32, ChainError> {
        if self.count == 0 {
            return Err(ChainError::Empty);
        }
        if self.total < self.limits.min_bytes {
            return Err(ChainError::TooShort { len: self.total, min: self.limits.min_bytes });
        }
        Ok(self.total)
    }
}

/// Checks a whole chain given as `(len, device_writable)` pairs; returns its byte count.
pub fn check_chain(
    direction: Direction,
    limits: ChainLimits,
    descriptors: impl IntoIterator<Item = (u32, bool)>,
) -> Result<u32, ChainError> {
    let mut check = ChainCheck::new(direction, limits);
    for (len, writable) in descriptors {
        check.push(len, writable)?;
    }
    check.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: ChainLimits = ChainLimits { max_descriptors: 4, max_bytes: 65562, min_bytes: 12 };

    #[test]
    fn test_check_chain_tx_sums_lengths() {
        assert_eq!(check_chain(Direction::DeviceReads, LIMITS, [(12, false), (1502, false)]), Ok(1514));
    }

    #[test]
    fn test_check_chain_rejects_wrong_direction() {
        let e = check_chain(Direction::DeviceReads, LIMITS, [(12, false), (100, true)]).unwrap_err();
        assert_eq!(e, ChainError::WrongDirection { index: 1, found: "writable", expected: "readable" });
        let e = check_chain(Direction::DeviceWrites, LIMITS, [(1526, false)]).unwrap_err();
        assert!(matches!(e, ChainError::WrongDirection { index: 0, .. }));
    }

    #[test]
    fn test_check_chain_rejects_overflow_and_too_long() {
        let limits = ChainLimits { max_bytes: u32::MAX, ..LIMITS };
        assert_eq!(check_chain(Direction::DeviceReads, limits, [(u32::MAX, false), (1, false)]), Err(ChainError::LengthOverflow));
        assert!(matches!(check_chain(Direction::DeviceReads, LIMITS, [(65563, false)]), Err(ChainError::TooLong { .. })));
    }

    #[test]
    fn test_check_chain_rejects_too_many_descriptors() {
        let descs = std::iter::repeat_n((20, false), 5);
        assert_eq!(check_chain(Direction::DeviceReads, LIMITS, descs), Err(ChainError::TooManyDescriptors { max: 4 }));
    }

    #[test]
    fn test_check_chain_rejects_empty_and_short() {
        assert_eq!(check_chain(Direction::DeviceReads, LIMITS, []), Err(ChainError::Empty));
        assert_eq!(check_chain(Direction::DeviceReads, LIMITS, [(11, false)]), Err(ChainError::TooShort { len: 11, min: 12 }));
        // Zero-length descriptors are legal as long as the total is enough.
        assert_eq!(check_chain(Direction::DeviceReads, LIMITS, [(0, false), (12, false)]), Ok(12));
    }
}
