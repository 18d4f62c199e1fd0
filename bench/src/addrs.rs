//! Where load-generator sockets come from: source addresses spread over
//! 127.0.0.0/8 so that no one address runs out of ephemeral ports (~28k).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// Most source addresses one load-generator process spreads over.
pub const MAX_SOURCE_ADDRS: u32 = 250 * 250;

/// Source address of client `index` of load-generator process `process`:
/// clients go round-robin over `addrs` addresses of the process's own /16,
/// `127.<1 + process % 254>.<n / 250>.<2 + n % 250>`, so processes never
/// share a source address and none uses 127.0.0.x, where servers listen.
pub fn source_ip(process: u32, index: u64, addrs: u32) -> Ipv4Addr {
    let addrs = addrs.clamp(1, MAX_SOURCE_ADDRS);
    // n < 62,500: the two octets below stay within u8.
    let n = u32::try_from(index % u64::from(addrs)).unwrap_or(0);
    let octet = |v: u32| u8::try_from(v).unwrap_or(u8::MAX);
    Ipv4Addr::new(
        127,
        octet(1 + process % 254),
        octet(n / 250),
        octet(2 + n % 250),
    )
}

/// The same as a socket address with port 0 (the kernel picks the port).
pub fn source_addr(process: u32, index: u64, addrs: u32) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(source_ip(process, index, addrs)), 0)
}

/// Whether an address is one load may go to (127.0.0.0/8 or ::1).
pub fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback()
}

/// Whether a URL's host is loopback (127.0.0.0/8, ::1 or `localhost`).
pub fn is_loopback_url(url: &reqwest::Url) -> bool {
    match url.host_str() {
        Some("localhost") => true,
        Some(host) => host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback()),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn spreads_clients_evenly_over_loopback_addresses() {
        let mut per_addr: HashMap<Ipv4Addr, u32> = HashMap::new();
        for i in 0..15_000 {
            *per_addr.entry(source_ip(0, i, 16)).or_default() += 1;
        }
        assert_eq!(per_addr.len(), 16);
        assert!(
            per_addr
                .values()
                .all(|&n| n == 15_000 / 16 || n == 15_000 / 16 + 1)
        );
        assert!(
            per_addr
                .keys()
                .all(|ip| ip.is_loopback() && ip.octets()[1] == 1)
        );
    }

    #[test]
    fn processes_never_share_addresses_and_avoid_the_servers() {
        let a: Vec<_> = (0..1000).map(|i| source_ip(0, i, 300)).collect();
        let b: Vec<_> = (0..1000).map(|i| source_ip(1, i, 300)).collect();
        assert!(a.iter().all(|ip| !b.contains(ip)));
        for p in 0..600 {
            for i in [0, 249, 250, 62_499] {
                let ip = source_ip(p, i, MAX_SOURCE_ADDRS);
                assert!(ip.is_loopback());
                assert_ne!(ip.octets()[1], 0, "{ip}");
                assert!(ip.octets()[3] >= 2, "{ip}");
            }
        }
        assert_eq!(source_ip(0, 250, 1000), Ipv4Addr::new(127, 1, 1, 2));
        // Zero addresses is treated as one rather than dividing by zero.
        assert_eq!(source_ip(0, 7, 0), Ipv4Addr::new(127, 1, 0, 2));
    }

    #[test]
    fn accepts_only_loopback_targets() {
        assert!(is_loopback(&"127.0.0.1:3101".parse().unwrap()));
        assert!(is_loopback(&"[::1]:3101".parse().unwrap()));
        assert!(!is_loopback(&"10.0.0.1:3101".parse().unwrap()));
        let ok = |s: &str| is_loopback_url(&reqwest::Url::parse(s).unwrap());
        assert!(ok("http://127.9.0.1:3111"));
        assert!(ok("http://localhost:3111"));
        assert!(ok("http://[::1]:3111"));
        assert!(!ok("http://10.0.0.1:3111"));
        assert!(!ok("http://example.invalid:3111"));
    }
}
