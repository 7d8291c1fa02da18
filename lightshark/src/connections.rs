//! Two-way connections: the two directional flows of one connection (same
//! protocol and interface, addresses and ports swapped) paired up, with the
//! client and the server told apart. Worked out by the poller, once per
//! snapshot, so `/api/live?group=connection` only reads the result.
//!
//! The client is the side that sent the first SYN, when the kernel saw the
//! connection start (a TCP flow whose first packet was a SYN without ACK).
//! Otherwise (the start was missed, UDP, ICMP, ...) the side with the higher
//! port is the client, ephemeral ports being the high ones; with equal ports
//! the lower address is.

use std::cmp::Ordering;

use lightshark_common::FlowKey;

use crate::flow::Flow;

/// How a connection's client and server were told apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoleFrom {
    /// The kernel saw the client's SYN.
    Syn,
    /// Higher port (then lower address) is the client.
    PortRule,
}

impl RoleFrom {
    /// The API's name for it.
    pub fn name(self) -> &'static str {
        match self {
            RoleFrom::Syn => "syn",
            RoleFrom::PortRule => "port_rule",
        }
    }
}

/// One connection, as positions in the snapshot's flows (u32, so that 100k
/// connections take 2 MB); at least one of the two directions is there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Connection {
    /// The client-to-server flow.
    pub sent: Option<u32>,
    /// The server-to-client flow.
    pub received: Option<u32>,
    pub role_from: RoleFrom,
}

impl Connection {
    /// The client-to-server flow's position.
    pub fn sent(self) -> Option<usize> {
        self.sent.map(|i| i as usize)
    }

    /// The server-to-client flow's position.
    pub fn received(self) -> Option<usize> {
        self.received.map(|i| i as usize)
    }

    /// Either of its flows (to read what both share: protocol, interface,
    /// endpoints).
    pub fn any_flow(self) -> usize {
        self.sent()
            .or(self.received())
            .expect("a connection has a flow")
    }
}

/// The key of the other direction of the same connection.
pub fn reverse(key: &FlowKey) -> FlowKey {
    FlowKey {
        src_addr: key.dst_addr,
        dst_addr: key.src_addr,
        src_port: key.dst_port,
        dst_port: key.src_port,
        ..*key
    }
}

/// Pairs every flow with its reverse (found through `position`, the index of
/// a key in `flows`) and orders the connections by total packets, then
/// total bytes, most first.
pub fn group(flows: &[Flow], position: impl Fn(&FlowKey) -> Option<usize>) -> Vec<Connection> {
    let mut paired = vec![false; flows.len()];
    let mut out = Vec::with_capacity(flows.len());
    for (i, flow) in flows.iter().enumerate() {
        if paired[i] {
            continue;
        }
        paired[i] = true;
        let other = position(&reverse(&flow.key)).filter(|&j| j != i);
        if let Some(j) = other {
            paired[j] = true;
        }
        out.push(roles(flows, i, other));
    }
    let total = |c: &Connection| {
        [c.sent(), c.received()]
            .into_iter()
            .flatten()
            .fold((0, 0), |(p, b), i| {
                (p + flows[i].packets, b + flows[i].bytes)
            })
    };
    out.sort_by_key(|c| std::cmp::Reverse(total(c)));
    out
}

/// Which of flow `a` and its reverse `b` goes from the client to the server.
fn roles(flows: &[Flow], a: usize, b: Option<usize>) -> Connection {
    let at = |i: usize| i as u32;
    let as_sent = |sent: usize, received: Option<usize>, role_from| Connection {
        sent: Some(at(sent)),
        received: received.map(at),
        role_from,
    };
    let as_received = |received: usize, sent: Option<usize>, role_from| Connection {
        sent: sent.map(at),
        received: Some(at(received)),
        role_from,
    };
    let fa = &flows[a];
    match b.map(|b| (b, &flows[b])) {
        // Both opened by a SYN (a simultaneous open): the earlier one.
        Some((b, fb))
            if fb.opened_by_syn && (!fa.opened_by_syn || fb.first_seen_ms < fa.first_seen_ms) =>
        {
            as_sent(b, Some(a), RoleFrom::Syn)
        }
        _ if fa.opened_by_syn => as_sent(a, b, RoleFrom::Syn),
        _ if source_is_client_by_ports(&fa.key) => as_sent(a, b, RoleFrom::PortRule),
        _ => as_received(a, b, RoleFrom::PortRule),
    }
}

/// The port rule: the higher port is the client's; with equal ports, the
/// lower address (compared byte by byte, which is numeric order).
fn source_is_client_by_ports(key: &FlowKey) -> bool {
    match key.src_port.cmp(&key.dst_port) {
        Ordering::Greater => true,
        Ordering::Less => false,
        Ordering::Equal => key.src_addr <= key.dst_addr,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn flow(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, packets: u64, syn: bool) -> Flow {
        let mut key = FlowKey {
            src_port: sport,
            dst_port: dport,
            protocol: 6,
            family: lightshark_common::FAMILY_IPV4,
            ifindex: 2,
            ..FlowKey::default()
        };
        key.src_addr[..4].copy_from_slice(&src);
        key.dst_addr[..4].copy_from_slice(&dst);
        Flow {
            key,
            packets,
            bytes: packets * 60,
            first_seen_ms: 0,
            last_seen_ms: 0,
            packets_per_second: 0.0,
            bytes_per_second: 0.0,
            opened_by_syn: syn,
        }
    }

    fn grouped(flows: &[Flow]) -> Vec<Connection> {
        let at: HashMap<FlowKey, usize> =
            flows.iter().enumerate().map(|(i, f)| (f.key, i)).collect();
        group(flows, |k| at.get(k).copied())
    }

    const A: [u8; 4] = [10, 0, 0, 1];
    const B: [u8; 4] = [10, 0, 0, 2];

    #[test]
    fn the_syn_decides_even_against_the_port_rule() {
        // B connected from port 1000 to A's port 60000.
        let flows = [
            flow(A, 60000, B, 1000, 9, false),
            flow(B, 1000, A, 60000, 5, true),
        ];
        assert_eq!(
            grouped(&flows),
            [Connection {
                sent: Some(1),
                received: Some(0),
                role_from: RoleFrom::Syn
            }]
        );
    }

    #[test]
    fn without_a_syn_the_higher_port_then_the_lower_address_is_the_client() {
        let flows = [
            flow(B, 53, A, 40000, 7, false),
            flow(A, 40000, B, 53, 6, false),
            flow(B, 7000, A, 7000, 2, false),
            flow(A, 7000, B, 7000, 1, false),
            // Seen one way only: from the server.
            flow(A, 80, B, 50000, 1, false),
        ];
        let got = grouped(&flows);
        assert_eq!(
            got,
            [
                Connection {
                    sent: Some(1),
                    received: Some(0),
                    role_from: RoleFrom::PortRule
                },
                Connection {
                    sent: Some(3),
                    received: Some(2),
                    role_from: RoleFrom::PortRule
                },
                Connection {
                    sent: None,
                    received: Some(4),
                    role_from: RoleFrom::PortRule
                },
            ]
        );
    }

    #[test]
    fn a_flow_that_is_its_own_reverse_is_one_connection() {
        let flows = [flow(A, 5000, A, 5000, 3, false)];
        assert_eq!(grouped(&flows).len(), 1);
        assert_eq!(grouped(&flows)[0].sent, Some(0));
    }
}
