//! The RARP frame a migrated guest is announced with, so switches learn its MAC on the new port
//! (the frame QEMU's own `announce_self` sends; vutap sends it for VHOST_USER_SEND_RARP).

/// Ethertype of RARP.
pub const ETH_P_RARP: u16 = 0x8035;
/// A minimum-size Ethernet frame (without FCS).
pub const RARP_FRAME_LEN: usize = 60;

/// A broadcast RARP "request reverse" frame from `mac`, padded to 60 bytes.
pub fn rarp_frame(mac: [u8; 6]) -> [u8; RARP_FRAME_LEN] {
    let mut f = [0u8; RARP_FRAME_LEN];
    f[0..6].copy_from_slice(&[0xff; 6]); // destination: broadcast
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ETH_P_RARP.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // hardware type: Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol type: IPv4
    f[18] = 6; // hardware address length
    f[19] = 4; // protocol address length
    f[20..22].copy_from_slice(&3u16.to_be_bytes()); // opcode: request reverse
    f[22..28].copy_from_slice(&mac); // sender hardware address (sender IP stays 0)
    f[32..38].copy_from_slice(&mac); // target hardware address (target IP stays 0)
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_rarp_frame_layout() {
        let mac = [0x52, 0x54, 0, 1, 2, 3];
        let f = rarp_frame(mac);
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &mac);
        assert_eq!(&f[12..14], &[0x80, 0x35]);
        assert_eq!(&f[14..22], &[0, 1, 8, 0, 6, 4, 0, 3]);
        assert_eq!(&f[22..28], &mac);
        assert_eq!(&f[28..32], &[0; 4]);
        assert_eq!(&f[32..38], &mac);
        assert!(f[38..].iter().all(|&b| b == 0));
    }
}
