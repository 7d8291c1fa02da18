//! How kernel values are written in the API: protocol names, addresses,
//! endpoints and directions. One place, so live, history and stats agree.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lightshark_common::{
    FlowKey, DIRECTION_INGRESS, FAMILY_IPV4, NONIP_LLC, NONIP_OTHER, NONIP_RUNT,
};

/// The API's name for an IP protocol number: the common ones by name, any
/// other as its decimal number.
pub fn protocol_name(protocol: u8) -> String {
    match protocol {
        1 => "ICMP".into(),
        6 => "TCP".into(),
        17 => "UDP".into(),
        47 => "GRE".into(),
        50 => "ESP".into(),
        51 => "AH".into(),
        58 => "ICMPv6".into(),
        132 => "SCTP".into(),
        other => other.to_string(),
    }
}

/// The name of a non-IP counter key: `0x0806` for an ethertype, or `llc`,
/// `runt`, `other` for the keys that are not one.
pub fn ethertype_name(key: u16) -> String {
    match key {
        NONIP_LLC => "llc".to_owned(),
        NONIP_RUNT => "runt".to_owned(),
        NONIP_OTHER => "other".to_owned(),
        t => format!("0x{t:04x}"),
    }
}

/// "ingress" or "egress".
pub fn direction_name(direction: u8) -> &'static str {
    if direction == DIRECTION_INGRESS {
        "ingress"
    } else {
        "egress"
    }
}

/// Bytes of the address in a key of this family (4 or 16).
pub fn address_width(family: u8) -> usize {
    if family == FAMILY_IPV4 {
        4
    } else {
        16
    }
}

/// An address from its stored bytes (4 or 16 of them).
pub fn ip_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::new(
            bytes[0], bytes[1], bytes[2], bytes[3],
        ))),
        16 => Some(IpAddr::V6(Ipv6Addr::from(
            <[u8; 16]>::try_from(bytes).ok()?,
        ))),
        _ => None,
    }
}

/// Source and destination address of a flow key.
pub fn addresses(key: &FlowKey) -> (IpAddr, IpAddr) {
    let width = address_width(key.family);
    let src = ip_from_bytes(&key.src_addr[..width]).expect("4 or 16 bytes");
    let dst = ip_from_bytes(&key.dst_addr[..width]).expect("4 or 16 bytes");
    (src, dst)
}

/// `addr:port`, with IPv6 addresses in brackets (`[2001:db8::1]:443`).
/// Rust writes addresses in RFC 5952 form: lowercase, shortest.
pub fn endpoint(addr: IpAddr, port: u16) -> String {
    match addr {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

/// The `connection` text of a flow: `src:port -> dst:port`.
pub fn connection(key: &FlowKey) -> String {
    let (src, dst) = addresses(key);
    format!(
        "{} -> {}",
        endpoint(src, key.src_port),
        endpoint(dst, key.dst_port)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use lightshark_common::FAMILY_IPV6;

    #[test]
    fn names_known_protocols_and_numbers_the_rest() {
        assert_eq!(protocol_name(6), "TCP");
        assert_eq!(protocol_name(58), "ICMPv6");
        assert_eq!(protocol_name(136), "136");
    }

    #[test]
    fn writes_ipv6_connections_in_brackets_and_rfc5952() {
        let mut key = FlowKey {
            family: FAMILY_IPV6,
            src_port: 443,
            dst_port: 50000,
            ..FlowKey::default()
        };
        key.src_addr = "2001:DB8:0:0:0:0:0:1".parse::<Ipv6Addr>().unwrap().octets();
        key.dst_addr = "fe80::1".parse::<Ipv6Addr>().unwrap().octets();
        assert_eq!(connection(&key), "[2001:db8::1]:443 -> [fe80::1]:50000");
    }

    #[test]
    fn writes_ipv4_connections_with_zero_ports() {
        let mut key = FlowKey {
            family: FAMILY_IPV4,
            ..FlowKey::default()
        };
        key.src_addr[..4].copy_from_slice(&[10, 0, 0, 1]);
        key.dst_addr[..4].copy_from_slice(&[10, 0, 0, 2]);
        assert_eq!(connection(&key), "10.0.0.1:0 -> 10.0.0.2:0");
    }
}
