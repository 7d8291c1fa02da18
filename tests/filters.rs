//! In-kernel filters: for each filter, the same mixed traffic, and exactly
//! the matching packets in totals, live and history, checked against
//! tshark's dissection of a capture of the same link.

use anyhow::{ensure, Context as _};
use lightshark_tests::*;

/// An ethertype from the IEEE "local experimental" range: a non-IP frame
/// nothing else on the link sends.
const EXPERIMENTAL: u16 = 0x88b5;

/// One flow id split into (protocol, src, sport, dst, dport).
fn parts(id: &str) -> (String, String, u16, String, u16) {
    let f: Vec<&str> = id.split(' ').collect();
    (
        f[0].into(),
        f[1].into(),
        f[2].parse().unwrap(),
        f[3].into(),
        f[4].parse().unwrap(),
    )
}

/// Sends the mix: UDP to ports 5353 and 6000 and TCP to 5001 over IPv4,
/// UDP to 5353 and pings over IPv6, pings over IPv4, and raw non-IP frames.
fn mixed_traffic(pair: &VethPair) -> anyhow::Result<()> {
    ensure!(
        udp_burst(&pair.a, &pair.b, A4, B4, 5353, 50, 80)? == 50,
        "udp 5353 lost"
    );
    ensure!(
        udp_burst(&pair.a, &pair.b, A4, B4, 6000, 40, 80)? == 40,
        "udp 6000 lost"
    );
    ensure!(
        udp_burst(&pair.b, &pair.a, B6, A6, 5353, 30, 120)? == 30,
        "udp6 lost"
    );
    ensure!(
        tcp_transfer(&pair.a, &pair.b, B4, 5001, 64 << 10)? == 64 << 10,
        "tcp short"
    );
    for target in [B4, B6] {
        pair.a
            .exec("ping", &["-c", "5", "-i", "0.05", "-W", "2", target])?;
    }
    send_raw_frames(&pair.a, "va", EXPERIMENTAL, 7, 60)
}

/// Runs the mix under `flags` and checks the agent against the capture
/// filtered by `keep`.
fn check_filter(flags: &[&str], keep: impl Fn(&str) -> bool) -> anyhow::Result<()> {
    let pair = VethPair::new(false)?;
    let dir = TempDir::new("filter")?;
    let agent = Agent::start(&pair.b, "vb", &dir, flags)?;
    let (stats0, _) = quiet_stats(&agent, &pair.b, "vb")?;
    let live0 = live_flows(&agent.get_ok(&pair.b, "/api/live")?)?;
    let capture = Capture::start(&pair.b, "vb", &dir)?;
    mixed_traffic(&pair)?;
    let (stats, _) = quiet_stats(&agent, &pair.b, "vb")?;
    let on_wire = capture.finish()?;
    let expected: FlowCounts = on_wire
        .iter()
        .filter(|(id, _)| keep(id))
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    ensure!(
        !expected.is_empty(),
        "{flags:?}: the mix has no matching traffic at all"
    );
    ensure!(
        expected.len() < on_wire.len(),
        "{flags:?}: the filter keeps everything"
    );

    // Live: what arrived since the quiet start, flow by flow.
    let live = live_flows(&agent.get_ok(&pair.b, "/api/live")?)?;
    let mut grown = FlowCounts::new();
    for (id, (p, b)) in &live {
        let (p0, b0) = live0.get(id).copied().unwrap_or_default();
        if (*p, *b) != (p0, b0) {
            grown.insert(id.clone(), (p - p0, b - b0));
        }
    }
    ensure!(
        grown == expected,
        "{flags:?}: live {grown:?}\nexpected {expected:?}"
    );
    for id in live.keys() {
        ensure!(
            keep(id),
            "{flags:?}: /api/live lists {id}, which the filter excludes"
        );
    }

    // Totals: exactly the matching packets; the rest counted as filtered.
    let (want_p, want_b) = expected
        .values()
        .fold((0, 0), |a, v| (a.0 + v.0, a.1 + v.1));
    ensure!(
        stat(&stats, &["total_packets"]) - stat(&stats0, &["total_packets"]) == want_p
            && stat(&stats, &["total_bytes"]) - stat(&stats0, &["total_bytes"]) == want_b,
        "{flags:?}: totals {stats} for expected {want_p} packets {want_b} bytes"
    );
    ensure!(
        stats["non_ip"].as_object().is_some_and(|m| m.is_empty()),
        "{flags:?}: non-IP counted: {stats}"
    );
    let all: u64 = on_wire.values().map(|v| v.0).sum::<u64>() + 7;
    let filtered =
        stat(&stats, &["filtered_out_packets"]) - stat(&stats0, &["filtered_out_packets"]);
    ensure!(
        filtered == all - want_p,
        "{flags:?}: {filtered} filtered out, expected {}",
        all - want_p
    );

    // History: only matching rows, as many as the kernel counted.
    let rows = agent.get_ok(&pair.b, "/api/history?limit=10000")?;
    let rows = rows.as_array().context("history array")?;
    let history = history_flows(rows)?;
    for id in history.keys() {
        ensure!(
            keep(id),
            "{flags:?}: history has {id}, which the filter excludes"
        );
    }
    ensure!(
        history == live,
        "{flags:?}: history per flow differs from live"
    );
    Ok(())
}

#[test]
fn port_filter_keeps_only_that_port() -> anyhow::Result<()> {
    check_filter(&["--filter-port", "5353"], |id| {
        let (_, _, sp, _, dp) = parts(id);
        sp == 5353 || dp == 5353
    })
}

#[test]
fn ipv4_address_filter_keeps_only_that_address() -> anyhow::Result<()> {
    check_filter(&["--filter-ip", A4], |id| {
        let (_, s, _, d, _) = parts(id);
        s == A4 || d == A4
    })
}

#[test]
fn ipv6_address_filter_keeps_only_that_address() -> anyhow::Result<()> {
    check_filter(&["--filter-ip", A6], |id| {
        let (_, s, _, d, _) = parts(id);
        s == A6 || d == A6
    })
}

#[test]
fn icmp_filter_excludes_icmpv6() -> anyhow::Result<()> {
    check_filter(&["--filter-protocol", "icmp"], |id| parts(id).0 == "1")
}

#[test]
fn protocol_and_address_filters_combine_with_and() -> anyhow::Result<()> {
    check_filter(&["--filter-protocol", "UDP", "--filter-ip", B6], |id| {
        let (p, s, _, d, _) = parts(id);
        p == "17" && (s == B6 || d == B6)
    })
}

#[test]
fn protocol_and_port_filters_combine_with_and() -> anyhow::Result<()> {
    check_filter(
        &["--filter-protocol", "tcp", "--filter-port", "5001"],
        |id| {
            let (p, _, sp, _, dp) = parts(id);
            p == "6" && (sp == 5001 || dp == 5001)
        },
    )
}
