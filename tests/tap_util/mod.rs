//! Taps made the way a user or QEMU's tap backend would (`ip tuntap add ...`), and a check that
//! a `vutap` process serves one: frames both ways between the test frontend and an AF_PACKET
//! socket on the tap, compared byte for byte.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::{is_test_frame, no_ipv6, seq_of, test_frame, unique, PacketSocket};
use vutap_frontend::{FrontendOptions, NetFrontend, VirtioNetHdr};

const WAIT: Duration = Duration::from_secs(5);

/// A persistent tap created with `ip tuntap add dev NAME mode tap EXTRA...`, deleted on drop.
pub struct UserTap {
    pub name: String,
}

impl UserTap {
    /// `extra`: `multi_queue`, `vnet_hdr`, `user U`, ... as `ip tuntap` takes them.
    pub fn create(extra: &[&str]) -> UserTap {
        let name = format!("vpk{}", unique());
        assert!(name.len() < 16, "{name}");
        let out = Command::new("ip").args(["tuntap", "add", "dev", &name, "mode", "tap"]).args(extra).output().unwrap();
        assert!(out.status.success(), "ip tuntap add {name} {extra:?}: {}", String::from_utf8_lossy(&out.stderr));
        // No router solicitations or MLD reports: only the test's frames cross the tap.
        no_ipv6(&name);
        UserTap { name }
    }

    /// The tap's `tun_flags` from sysfs (IFF_MULTI_QUEUE 0x100, IFF_VNET_HDR 0x4000).
    pub fn flags(&self) -> u32 {
        let s = std::fs::read_to_string(format!("/sys/class/net/{}/tun_flags", self.name)).unwrap();
        u32::from_str_radix(s.trim().trim_start_matches("0x"), 16).unwrap()
    }
}

impl Drop for UserTap {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.name]).status();
    }
}

/// Connects the test frontend to the vutap serving `socket` on tap `tap`, then sends a frame
/// each way and checks both arrive unchanged.
pub fn check_frames_both_ways(socket: &Path, tap: &str) {
    let mut fe = NetFrontend::connect(socket, FrontendOptions::default()).expect("frontend connects");
    let ok = Command::new("ip").args(["link", "set", tap, "up"]).status().unwrap();
    assert!(ok.success(), "ip link set {tap} up");
    let far = PacketSocket::bind(tap);
    let guest_mac = fe.config().unwrap().expect("config space").mac;
    let far_mac = [0x02, 0x77, 0, 0, 0, 9];

    let out = test_frame(far_mac, guest_mac, 300, 7001);
    fe.send_frame(0, &VirtioNetHdr::default(), &out).expect("send_frame");
    let got = far.recv_matching(WAIT, |g| is_test_frame(g) && seq_of(g) == 7001).expect("guest frame reaches the tap");
    assert!(got == out, "guest -> tap frame changed: {} B sent, {} B seen", out.len(), got.len());

    let back = test_frame(guest_mac, far_mac, 900, 7002);
    far.send(&back);
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.checked_duration_since(Instant::now()).expect("tap frame reaches the guest");
        let Some(fr) = fe.recv_frame(0, left).expect("recv_frame") else {
            continue;
        };
        if is_test_frame(&fr.payload) && seq_of(&fr.payload) == 7002 {
            assert!(fr.payload == back, "tap -> guest frame changed: {} B sent, {} B seen", back.len(), fr.payload.len());
            break;
        }
    }
}
