//! Which IP addresses are not on the public internet.
//!
//! The browser may reach such an address only when the mandate lists it in
//! `egress.private_networks`. The test is deliberately wide: anything that is not plainly a
//! routable public unicast address counts as non-public, so an unusual encoding of a local
//! address (mapped, translated, tunnelled) cannot pass as public.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// IPv4 ranges that are not public unicast destinations (IANA special-purpose registry).
const NON_PUBLIC_V4: &[(u32, u32)] = &[
    (0x0000_0000, 8),  // 0.0.0.0/8 "this network", includes 0.0.0.0
    (0x0a00_0000, 8),  // 10.0.0.0/8 private
    (0x6440_0000, 10), // 100.64.0.0/10 carrier-grade NAT
    (0x7f00_0000, 8),  // 127.0.0.0/8 loopback
    (0xa9fe_0000, 16), // 169.254.0.0/16 link-local (cloud metadata lives here)
    (0xac10_0000, 12), // 172.16.0.0/12 private
    (0xc000_0000, 24), // 192.0.0.0/24 IETF protocol assignments
    (0xc000_0200, 24), // 192.0.2.0/24 documentation
    (0xc058_6300, 24), // 192.88.99.0/24 6to4 relay anycast
    (0xc0a8_0000, 16), // 192.168.0.0/16 private
    (0xc612_0000, 15), // 198.18.0.0/15 benchmarking
    (0xc633_6400, 24), // 198.51.100.0/24 documentation
    (0xcb00_7100, 24), // 203.0.113.0/24 documentation
    (0xe000_0000, 4),  // 224.0.0.0/4 multicast
    (0xf000_0000, 4),  // 240.0.0.0/4 reserved, includes 255.255.255.255 broadcast
];

/// IPv6 ranges inside global unicast 2000::/3 that are still not public destinations.
const NON_PUBLIC_V6_IN_GLOBAL: &[(u128, u32)] = &[
    (0x2001_0000 << 96, 23), // 2001::/23 IETF protocol assignments, includes Teredo
    (0x2001_0db8 << 96, 32), // 2001:db8::/32 documentation
    (0x3fff_0000 << 96, 20), // 3fff::/20 documentation
];

/// 64:ff9b::/96, the well-known NAT64 prefix: the gateway connects to the IPv4 address in the
/// low 32 bits.
const NAT64_WELL_KNOWN: (u128, u32) = (0x0064_ff9b << 96, 96);
/// 2002::/16, 6to4: the IPv4 address of the tunnel end sits in bits 16..48.
const SIX_TO_FOUR: (u128, u32) = (0x2002 << 112, 16);
/// 2000::/3, the only IPv6 space allocated for global unicast.
const GLOBAL_UNICAST: (u128, u32) = (0x2 << 124, 3);

/// True for every address the browser must not reach unless the mandate lists it in
/// `private_networks`: loopback, private, link-local, unique-local, CGNAT, unspecified,
/// multicast, broadcast, documentation and benchmarking ranges, `0.0.0.0/8`, and IPv6 forms
/// that carry such an IPv4 address (mapped `::ffff:a.b.c.d`, NAT64 `64:ff9b::/96`, 6to4
/// `2002::/16`). IPv6 outside global unicast `2000::/3` is non-public as a whole, which covers
/// `::/96` (IPv4-compatible), `fc00::/7`, `fe80::/10`, `fec0::/10`, `ff00::/8` and the
/// local-use NAT64 prefix `64:ff9b:1::/48`.
pub fn is_non_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => is_non_public_v4(a),
        IpAddr::V6(a) => is_non_public_v6(a),
    }
}

fn is_non_public_v4(a: Ipv4Addr) -> bool {
    let bits = u32::from(a);
    NON_PUBLIC_V4
        .iter()
        .any(|&(net, len)| (bits ^ net).checked_shr(32 - len).unwrap_or(0) == 0)
}

fn is_non_public_v6(a: Ipv6Addr) -> bool {
    if let Some(v4) = a.to_ipv4_mapped() {
        return is_non_public_v4(v4);
    }
    let bits = u128::from(a);
    if in_v6(bits, NAT64_WELL_KNOWN) {
        // Truncation keeps exactly the embedded IPv4 address.
        return is_non_public_v4(Ipv4Addr::from(bits as u32));
    }
    if in_v6(bits, SIX_TO_FOUR) {
        return is_non_public_v4(Ipv4Addr::from((bits >> 80) as u32));
    }
    if !in_v6(bits, GLOBAL_UNICAST) {
        return true;
    }
    NON_PUBLIC_V6_IN_GLOBAL
        .iter()
        .any(|&range| in_v6(bits, range))
}

fn in_v6(bits: u128, (net, len): (u128, u32)) -> bool {
    (bits ^ net).checked_shr(128 - len).unwrap_or(0) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_addresses() {
        let non_public = [
            "0.0.0.0",
            "0.1.2.3",
            "10.0.0.1",
            "10.255.255.255",
            "100.64.0.1",
            "100.127.255.255",
            "127.0.0.1",
            "127.255.0.9",
            "169.254.169.254",
            "172.16.0.1",
            "172.31.255.255",
            "192.0.0.8",
            "192.0.2.1",
            "192.88.99.1",
            "192.168.1.1",
            "198.18.0.1",
            "198.19.255.255",
            "198.51.100.7",
            "203.0.113.9",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:10.1.2.3",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "::8.8.8.8",
            "64:ff9b::10.0.0.1",
            "64:ff9b::127.0.0.1",
            "64:ff9b::169.254.169.254",
            "64:ff9b:1::8.8.8.8",
            "100::1",
            "2001::1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "2001:db8::1",
            "2002:7f00:1::1",
            "2002:a00:1::",
            "3fff::1",
            "5f00::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "febf::1",
            "fec0::1",
            "ff02::1",
            "ff0e::1",
        ];
        let public = [
            "1.1.1.1",
            "8.8.8.8",
            "9.255.255.255",
            "11.0.0.0",
            "100.63.255.255",
            "100.128.0.0",
            "126.255.255.255",
            "128.0.0.0",
            "169.253.255.255",
            "172.15.255.255",
            "172.32.0.0",
            "192.0.1.0",
            "192.167.255.255",
            "192.169.0.0",
            "198.17.255.255",
            "198.20.0.0",
            "223.255.255.255",
            "2606:4700:4700::1111",
            "2001:4860:4860::8888",
            "2001:200::1",
            "2a00:1450:4001::1",
            "::ffff:8.8.8.8",
            "64:ff9b::8.8.8.8",
            "2002:808:808::1",
        ];
        for s in non_public {
            let ip: IpAddr = s.parse().unwrap();
            assert!(is_non_public(ip), "{s} should be non-public");
        }
        for s in public {
            let ip: IpAddr = s.parse().unwrap();
            assert!(!is_non_public(ip), "{s} should be public");
        }
    }
}
