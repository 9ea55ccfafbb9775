//! Test frames and the checksums they carry, built and parsed independently of the backend:
//! plain Ethernet test frames (our ethertype, a magic, a sequence number), Ethernet/IPv4/UDP and
//! Ethernet/IPv4/TCP frames with real checksums, and MAC address parsing.

/// IEEE local experimental ethertype of the plain test frames: nothing else on a test interface
/// uses it, so kernel chatter (IPv6 ND, etc.) is told apart from test frames.
pub const ETHERTYPE: u16 = 0x88b5;
/// Magic right after the Ethernet header of a plain test frame.
pub const MAGIC: &[u8; 8] = b"VUTAPIT!";

pub const IP_TCP: u8 = 6;
pub const IP_UDP: u8 = 17;

const ETH_HLEN: usize = 14;
const IPV4_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];

/// Parses `aa:bb:cc:dd:ee:ff` (surrounding whitespace allowed, as read from sysfs).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.trim().split(':');
    for byte in &mut mac {
        let p = parts.next()?;
        if p.is_empty() || p.len() > 2 {
            return None;
        }
        *byte = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

fn pattern(out: &mut Vec<u8>, len: usize, seed: u32) {
    let mut x = seed.wrapping_mul(2_654_435_761) | 1;
    while out.len() < len {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        out.push((x >> 16) as u8);
    }
    out.truncate(len);
}

/// Pseudo-random payload bytes, the same for the same `seed`.
pub fn payload(len: usize, seed: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    pattern(&mut v, len, seed);
    v
}

fn eth_header(f: &mut Vec<u8>, dst: [u8; 6], src: [u8; 6], ethertype: [u8; 2]) {
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype);
}

/// A `len`-byte Ethernet frame with [`ETHERTYPE`], [`MAGIC`], `seq` and a pseudo-random pattern.
pub fn test_frame(dst: [u8; 6], src: [u8; 6], len: usize, seq: u32) -> Vec<u8> {
    let mut f = Vec::with_capacity(len);
    eth_header(&mut f, dst, src, ETHERTYPE.to_be_bytes());
    f.extend_from_slice(MAGIC);
    f.extend_from_slice(&seq.to_be_bytes());
    pattern(&mut f, len, seq);
    f
}

/// Whether `f` is a frame made by [`test_frame`].
pub fn is_test_frame(f: &[u8]) -> bool {
    f.len() >= 26 && f[12..14] == ETHERTYPE.to_be_bytes() && &f[14..22] == MAGIC
}

/// The sequence number of a frame made by [`test_frame`] (check [`is_test_frame`] first).
pub fn seq_of(f: &[u8]) -> u32 {
    u32::from_be_bytes([f[22], f[23], f[24], f[25]])
}

/// Internet checksum (ones' complement sum) of `data`, folded, not inverted, starting at `init`.
pub fn csum_add(init: u32, data: &[u8]) -> u32 {
    let mut s = init;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        s += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [b] = chunks.remainder() {
        s += u32::from(*b) << 8;
    }
    s
}

pub fn csum_fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// Pseudo-header sum for `proto` over `len` bytes of L4 (unfolded).
pub fn pseudo_sum(src: [u8; 4], dst: [u8; 4], proto: u8, len: usize) -> u32 {
    csum_add(0, &[src[0], src[1], src[2], src[3], dst[0], dst[1], dst[2], dst[3], 0, proto, (len >> 8) as u8, len as u8])
}

/// An IPv4 header (no options, DF, TTL 64) with its checksum, for `l4_len` bytes of `proto`.
pub fn ipv4_header(src: [u8; 4], dst: [u8; 4], proto: u8, l4_len: usize, id: u16) -> [u8; 20] {
    let total = (IPV4_HLEN + l4_len) as u16;
    let mut h = [0u8; IPV4_HLEN];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&total.to_be_bytes());
    h[4..6].copy_from_slice(&id.to_be_bytes());
    h[6] = 0x40; // DF
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(&src);
    h[16..20].copy_from_slice(&dst);
    let c = !csum_fold(csum_add(0, &h));
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h
}

/// The UDP checksum of `udp` (header + payload, checksum field included as it is), ready to
/// store: 0 is sent as 0xffff, since 0 means "no checksum".
fn udp_csum(src: [u8; 4], dst: [u8; 4], udp: &[u8]) -> u16 {
    let c = !csum_fold(csum_add(pseudo_sum(src, dst, IP_UDP, udp.len()), udp));
    if c == 0 {
        0xffff
    } else {
        c
    }
}

/// An Ethernet/IPv4/UDP frame carrying `payload`, with valid IP and UDP checksums.
pub fn udp_frame_with(dst: [u8; 6], src: [u8; 6], ips: ([u8; 4], [u8; 4]), ports: (u16, u16), payload: &[u8], ip_id: u16) -> Vec<u8> {
    let l4_len = UDP_HLEN + payload.len();
    let mut udp = Vec::with_capacity(l4_len);
    udp.extend_from_slice(&ports.0.to_be_bytes());
    udp.extend_from_slice(&ports.1.to_be_bytes());
    udp.extend_from_slice(&(l4_len as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let c = udp_csum(ips.0, ips.1, &udp);
    udp[6..8].copy_from_slice(&c.to_be_bytes());
    let mut f = Vec::with_capacity(ETH_HLEN + IPV4_HLEN + l4_len);
    eth_header(&mut f, dst, src, ETHERTYPE_IPV4);
    f.extend_from_slice(&ipv4_header(ips.0, ips.1, IP_UDP, l4_len, ip_id));
    f.extend_from_slice(&udp);
    f
}

/// An Ethernet/IPv4/UDP frame (valid IP and UDP checksums) whose payload is `seq` followed by a
/// pseudo-random pattern, `payload_len` bytes in all (at least 4).
pub fn udp_frame(dst: [u8; 6], src: [u8; 6], ips: ([u8; 4], [u8; 4]), ports: (u16, u16), payload_len: usize, seq: u32) -> Vec<u8> {
    let mut payload = seq.to_be_bytes().to_vec();
    pattern(&mut payload, payload_len.max(4), seq);
    udp_frame_with(dst, src, ips, ports, &payload, seq as u16)
}

/// UDP ports of an Ethernet/IPv4/UDP frame, if it is one.
pub fn udp_ports(f: &[u8]) -> Option<(u16, u16)> {
    (f.len() >= 42 && f[12..14] == ETHERTYPE_IPV4 && f[23] == IP_UDP)
        .then(|| (u16::from_be_bytes([f[34], f[35]]), u16::from_be_bytes([f[36], f[37]])))
}

/// Sets the UDP source port of an Ethernet/IPv4/UDP frame (no IP options) and recomputes its
/// UDP checksum; false if `f` is not such a frame.
pub fn set_udp_sport(f: &mut [u8], sport: u16) -> bool {
    if udp_ports(f).is_none() || f[14] != 0x45 {
        return false;
    }
    let l4 = ETH_HLEN + IPV4_HLEN;
    let (src, dst) = ([f[26], f[27], f[28], f[29]], [f[30], f[31], f[32], f[33]]);
    f[l4..l4 + 2].copy_from_slice(&sport.to_be_bytes());
    f[l4 + 6..l4 + 8].fill(0);
    let c = udp_csum(src, dst, &f[l4..]);
    f[l4 + 6..l4 + 8].copy_from_slice(&c.to_be_bytes());
    true
}

/// The TCP segment description of [`tcp_frame`].
#[derive(Clone, Copy, Debug)]
pub struct TcpFlow {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src_ip: [u8; 4],
    pub dst_ip: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
}

/// An Ethernet/IPv4/TCP frame (20-byte TCP header, ACK|PSH) carrying `payload`. The TCP
/// checksum field holds the folded pseudo-header sum (what a driver leaves for a NEEDS_CSUM
/// frame), or the full checksum if `full_csum`.
pub fn tcp_frame(fl: &TcpFlow, payload: &[u8], full_csum: bool) -> Vec<u8> {
    let l4_len = 20 + payload.len();
    let mut f = Vec::with_capacity(ETH_HLEN + IPV4_HLEN + l4_len);
    eth_header(&mut f, fl.dst_mac, fl.src_mac, ETHERTYPE_IPV4);
    f.extend_from_slice(&ipv4_header(fl.src_ip, fl.dst_ip, IP_TCP, l4_len, 0x1234));
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&fl.sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&fl.dport.to_be_bytes());
    tcp[4..8].copy_from_slice(&fl.seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&1u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x18; // ACK | PSH
    tcp[14..16].copy_from_slice(&0xffffu16.to_be_bytes());
    let pseudo = pseudo_sum(fl.src_ip, fl.dst_ip, IP_TCP, l4_len);
    let c = if full_csum { !csum_fold(csum_add(csum_add(pseudo, &tcp), payload)) } else { csum_fold(pseudo) };
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&tcp);
    f.extend_from_slice(payload);
    f
}

/// A parsed Ethernet/IPv4/TCP frame.
pub struct TcpSeg<'a> {
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub payload: &'a [u8],
    pub ip_csum_ok: bool,
    pub tcp_csum_ok: bool,
}

/// Parses an Ethernet/IPv4/TCP frame (no IP options), checking both checksums.
pub fn parse_tcp(f: &[u8]) -> Option<TcpSeg<'_>> {
    if f.len() < 54 || f[12..14] != ETHERTYPE_IPV4 || f[14] != 0x45 || f[23] != IP_TCP {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([f[16], f[17]]));
    let ip = &f[14..34];
    let l4 = f.get(34..14 + total)?;
    let doff = usize::from(l4[12] >> 4) * 4;
    let src = [ip[12], ip[13], ip[14], ip[15]];
    let dst = [ip[16], ip[17], ip[18], ip[19]];
    Some(TcpSeg {
        sport: u16::from_be_bytes([l4[0], l4[1]]),
        dport: u16::from_be_bytes([l4[2], l4[3]]),
        seq: u32::from_be_bytes([l4[4], l4[5], l4[6], l4[7]]),
        payload: l4.get(doff..)?,
        ip_csum_ok: csum_fold(csum_add(0, ip)) == 0xffff,
        tcp_csum_ok: csum_fold(csum_add(pseudo_sum(src, dst, IP_TCP, l4.len()), l4)) == 0xffff,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: [u8; 6] = [0x02, 0, 0, 0, 0, 0xaa];
    const B: [u8; 6] = [0x02, 0, 0, 0, 0, 0xbb];
    const IPS: ([u8; 4], [u8; 4]) = ([10, 0, 0, 1], [10, 0, 0, 2]);

    fn udp_csum_ok(f: &[u8]) -> bool {
        let udp = &f[34..];
        csum_fold(csum_add(pseudo_sum(IPS.0, IPS.1, IP_UDP, udp.len()), udp)) == 0xffff
    }

    #[test]
    fn parse_mac_takes_sysfs_form_only() {
        assert_eq!(parse_mac("02:aB:00:1:ff:10\n"), Some([2, 0xab, 0, 1, 0xff, 0x10]));
        assert_eq!(parse_mac("02:ab:00:01:ff"), None);
        assert_eq!(parse_mac("02:ab:00:01:ff:10:11"), None);
        assert_eq!(parse_mac("02:ab::01:ff:10"), None);
        assert_eq!(parse_mac("02:ab:100:01:ff:10"), None);
        assert_eq!(parse_mac("02:ab:zz:01:ff:10"), None);
    }

    #[test]
    fn ipv4_header_checksum_matches_a_known_header() {
        // The header of RFC 1071-style worked examples: 192.168.0.1 -> 192.168.0.199, UDP,
        // total length 0x73, DF, TTL 64, checksum 0xb861.
        let h = ipv4_header([192, 168, 0, 1], [192, 168, 0, 199], IP_UDP, 0x73 - 20, 0);
        assert_eq!(h[10..12], [0xb8, 0x61]);
    }

    #[test]
    fn test_frames_carry_magic_and_seq() {
        let f = test_frame(A, B, 100, 7);
        assert_eq!(f.len(), 100);
        assert!(is_test_frame(&f));
        assert_eq!(seq_of(&f), 7);
        assert_ne!(test_frame(A, B, 100, 8)[26..], f[26..], "the pattern depends on seq");
        assert!(!is_test_frame(&f[..25]));
    }

    #[test]
    fn udp_frames_have_valid_checksums_and_survive_a_port_change() {
        let mut f = udp_frame(A, B, IPS, (1000, 2000), 33, 5);
        assert_eq!(f.len(), 14 + 20 + 8 + 33);
        assert_eq!(csum_fold(csum_add(0, &f[14..34])), 0xffff);
        assert!(udp_csum_ok(&f));
        assert_eq!(udp_ports(&f), Some((1000, 2000)));
        assert_eq!(f[42..46], 5u32.to_be_bytes());
        assert!(set_udp_sport(&mut f, 4321));
        assert_eq!(udp_ports(&f), Some((4321, 2000)));
        assert!(udp_csum_ok(&f));
        assert!(!set_udp_sport(&mut test_frame(A, B, 60, 0), 1));
    }

    #[test]
    fn tcp_frames_parse_back_with_full_or_partial_checksum() {
        let fl = TcpFlow { src_mac: A, dst_mac: B, src_ip: IPS.0, dst_ip: IPS.1, sport: 40000, dport: 5001, seq: 9 };
        let data = payload(1000, 3);
        let full = tcp_frame(&fl, &data, true);
        let seg = parse_tcp(&full).expect("parses");
        assert_eq!((seg.sport, seg.dport, seg.seq, seg.payload), (40000, 5001, 9, &data[..]));
        assert!(seg.ip_csum_ok && seg.tcp_csum_ok);
        let partial = tcp_frame(&fl, &data, false);
        let seg = parse_tcp(&partial).expect("parses");
        assert!(seg.ip_csum_ok && !seg.tcp_csum_ok);
        let pseudo = csum_fold(pseudo_sum(IPS.0, IPS.1, IP_TCP, 20 + data.len()));
        assert_eq!(partial[50..52], pseudo.to_be_bytes());
        assert!(parse_tcp(&full[..53]).is_none());
    }
}
