//! Settings of an interface a test or benchmark made, on the host or inside a namespace.

use super::cmd::run;
use super::{io_err, Result};

/// Turns IPv6 off on `ifname` in the host's namespace, so no router solicitation or MLD
/// report ends up among the frames a test counts.
pub fn disable_ipv6(ifname: &str) -> Result<()> {
    let knob = format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6");
    std::fs::write(&knob, "1").map_err(io_err(format!("write {knob}")))
}

/// Sets the MTU of `ifname` (inside `netns` when given) and brings it up.
pub fn set_mtu(netns: Option<&str>, ifname: &str, mtu: u32) -> Result<()> {
    let mtu = mtu.to_string();
    let link = ["link", "set", ifname, "mtu", &mtu, "up"];
    match netns {
        Some(ns) => run("ip", &[&["-n", ns][..], &link[..]].concat()),
        None => run("ip", &link),
    }
    .map(drop)
}
