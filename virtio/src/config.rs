//! The virtio-net device config space, read by the frontend with GET_CONFIG.

use thiserror::Error;

/// Link up bit of `status`.
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;
/// The bytes vutap defines: mac[6], status, max_virtqueue_pairs, mtu.
pub const CONFIG_LEN: usize = 12;
/// vhost-user's upper bound on a config read (VHOST_USER_MAX_CONFIG_SIZE).
pub const MAX_CONFIG_READ: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetConfig {
    pub mac: [u8; 6],
    pub link_up: bool,
    pub max_queue_pairs: u16,
    pub mtu: u16,
}

#[derive(Debug, Error, PartialEq, Eq, Clone)]
pub enum ConfigError {
    #[error("config read of {size} bytes at offset {offset} is outside the {max}-byte config space")]
    OutOfRange { offset: u32, size: u32, max: usize },
}

impl NetConfig {
    pub fn to_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut b = [0u8; CONFIG_LEN];
        b[0..6].copy_from_slice(&self.mac);
        let status = if self.link_up { VIRTIO_NET_S_LINK_UP } else { 0 };
        b[6..8].copy_from_slice(&status.to_le_bytes());
        b[8..10].copy_from_slice(&self.max_queue_pairs.to_le_bytes());
        b[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        b
    }

    /// `size` bytes from `offset`. Fields vutap does not define (speed, duplex, RSS...) read as
    /// zero, since a frontend asks for the whole struct its own virtio-net version knows.
    pub fn read(&self, offset: u32, size: u32) -> Result<Vec<u8>, ConfigError> {
        let out_of_range = ConfigError::OutOfRange { offset, size, max: MAX_CONFIG_READ };
        let end = (offset as usize).checked_add(size as usize).ok_or(out_of_range.clone())?;
        if end > MAX_CONFIG_READ {
            return Err(out_of_range);
        }
        let mut space = [0u8; MAX_CONFIG_READ];
        space[..CONFIG_LEN].copy_from_slice(&self.to_bytes());
        Ok(space[offset as usize..end].to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: NetConfig = NetConfig { mac: [2, 0, 0, 0, 0, 1], link_up: true, max_queue_pairs: 4, mtu: 9000 };

    #[test]
    fn test_config_layout() {
        assert_eq!(CFG.to_bytes(), [2, 0, 0, 0, 0, 1, 1, 0, 4, 0, 0x28, 0x23]);
        let down = NetConfig { link_up: false, ..CFG };
        assert_eq!(&down.to_bytes()[6..8], &[0, 0]);
    }

    #[test]
    fn test_config_read_slices_and_pads() {
        assert_eq!(CFG.read(6, 2).unwrap(), vec![1, 0]);
        let whole = CFG.read(0, 24).unwrap();
        assert_eq!(&whole[..12], &CFG.to_bytes());
        assert!(whole[12..].iter().all(|&b| b == 0));
    }

    #[test]
    fn test_config_read_rejects_out_of_range() {
        assert!(CFG.read(250, 7).is_err());
        assert!(CFG.read(u32::MAX, 2).is_err());
        assert!(CFG.read(0, 256).is_ok());
    }
}
