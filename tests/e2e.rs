//! The main path end to end: the real agent on a veth in a namespace, real
//! UDP, ICMP and TCP from the other side, and every number compared with a
//! count made without the agent.

use std::{
    net::IpAddr,
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{ensure, Context as _};
use lightshark_tests::*;
use serde_json::Value;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Frame bytes of a UDP datagram: Ethernet 14 + IP header + UDP 8 + payload.
fn udp_frame(ipv6: bool, payload: u64) -> u64 {
    14 + if ipv6 { 40 } else { 20 } + 8 + payload
}

/// History rows from the database file itself, summed per flow id.
fn database_flows(db: &std::path::Path) -> anyhow::Result<(u64, FlowCounts)> {
    let conn = rusqlite::Connection::open(db)?;
    let rows: i64 = conn.query_row("SELECT count(*) FROM samples", [], |r| r.get(0))?;
    let mut stmt = conn.prepare(
        "SELECT protocol, src_ip, src_port, dst_ip, dst_port, sum(segments), sum(length)
         FROM samples GROUP BY protocol, src_ip, src_port, dst_ip, dst_port",
    )?;
    let ip = |b: Vec<u8>| -> String {
        match b.len() {
            4 => IpAddr::from(<[u8; 4]>::try_from(b).unwrap()).to_string(),
            _ => IpAddr::from(<[u8; 16]>::try_from(b).unwrap()).to_string(),
        }
    };
    let mut out = FlowCounts::new();
    let mut q = stmt.query([])?;
    while let Some(r) = q.next()? {
        let proto: u8 = r.get(0)?;
        let id = flow_id(
            &proto.to_string(),
            &ip(r.get(1)?),
            &r.get::<_, u16>(2)?.to_string(),
            &ip(r.get(3)?),
            &r.get::<_, u16>(4)?.to_string(),
        );
        out.insert(id, (r.get::<_, i64>(5)? as u64, r.get::<_, i64>(6)? as u64));
    }
    Ok((rows as u64, out))
}

fn expect_flow(flows: &FlowCounts, id: &str, want: (u64, u64), what: &str) -> anyhow::Result<()> {
    let got = flows.get(id).copied();
    ensure!(
        got == Some(want),
        "{what}: flow {id} has (packets, bytes) {got:?}, the independent count is {want:?}"
    );
    Ok(())
}

/// The acceptance scenario of the end-to-end issue, in one attach mode.
fn full_scenario(mode: &str) -> anyhow::Result<()> {
    let pair = VethPair::new(false)?;
    let dir = TempDir::new("e2e")?;
    let started_ms = now_ms();
    let mut agent = Agent::start(&pair.b, "vb", &dir, &["--attach-mode", mode])?;
    // Start from a quiet link, so that the agent's totals and the
    // interface's counters are read at the same point of its traffic.
    let (stats0, baseline) = quiet_stats(&agent, &pair.b, "vb")?;
    let capture = Capture::start(&pair.b, "vb", &dir)?;

    // UDP: 1000 datagrams each way, IPv4 towards the agent's side (ingress)
    // and IPv6 away from it (egress).
    let sent = 1000;
    let got4 = udp_burst(&pair.a, &pair.b, A4, B4, 5353, sent, 100)?;
    ensure!(got4 == sent, "only {got4} of {sent} IPv4 datagrams arrived");
    let got6 = udp_burst(&pair.b, &pair.a, B6, A6, 5354, sent, 200)?;
    ensure!(got6 == sent, "only {got6} of {sent} IPv6 datagrams arrived");

    // ICMP: 10 echo requests and their replies, over IPv4 and over IPv6.
    for target in [B4, B6] {
        let out = pair.a.exec(
            "ping",
            &["-c", "10", "-i", "0.05", "-W", "2", "-s", "56", target],
        )?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(text.contains("10 received"), "ping {target}: {text}");
    }

    // TCP: 1 MB each way, IPv4 from A and IPv6 from B.
    let mb = 1 << 20;
    ensure!(
        tcp_transfer(&pair.a, &pair.b, B4, 5001, mb)? == mb,
        "IPv4 TCP transfer short"
    );
    ensure!(
        tcp_transfer(&pair.b, &pair.a, A6, 5002, mb)? == mb,
        "IPv6 TCP transfer short"
    );

    let (stats, counters) = quiet_stats(&agent, &pair.b, "vb")?;
    let on_wire = capture.finish()?;
    let link = counters.since(&baseline);

    // Totals against the interface's own counters (every frame, ARP and
    // neighbour discovery included) over the same stretch of traffic.
    let delta = |path: &[&str]| -> anyhow::Result<u64> {
        let pick = |v: &Value| path.iter().fold(v.clone(), |v, k| v[*k].clone()).as_u64();
        let (now, then) = (pick(&stats), pick(&stats0));
        Ok(now.with_context(|| format!("stats {path:?}"))? - then.unwrap_or(0))
    };
    let checks = [
        (
            delta(&["total_packets"])?,
            link.rx_packets + link.tx_packets,
            "total_packets vs rx+tx packets",
        ),
        (
            delta(&["total_bytes"])?,
            link.rx_bytes + link.tx_bytes,
            "total_bytes vs rx+tx bytes",
        ),
        (
            delta(&["ingress", "packets"])?,
            link.rx_packets,
            "ingress packets vs rx_packets",
        ),
        (
            delta(&["ingress", "bytes"])?,
            link.rx_bytes,
            "ingress bytes vs rx_bytes",
        ),
        (
            delta(&["egress", "packets"])?,
            link.tx_packets,
            "egress packets vs tx_packets",
        ),
        (
            delta(&["egress", "bytes"])?,
            link.tx_bytes,
            "egress bytes vs tx_bytes",
        ),
    ];
    for (ours, theirs, what) in checks {
        ensure!(ours == theirs, "{what}: {ours} vs {theirs}; stats {stats}");
    }
    let get = |v: &Value, k: &str| v[k].as_u64().with_context(|| format!("stats.{k}"));
    ensure!(stats["ring_buffer_drops"] == 0, "samples dropped: {stats}");
    ensure!(
        stats["packets_per_second"].is_f64(),
        "packets_per_second is not a float: {stats}"
    );

    // Every flow against what the test sent, and against tshark.
    let live = agent.get_ok(&pair.b, "/api/live")?;
    ensure!(
        live["total_packets"] == stats["total_packets"]
            && live["total_bytes"] == stats["total_bytes"],
        "/api/live totals differ from /api/stats"
    );
    let live_flows = live_flows(&live)?;
    let n = sent as u64;
    let expected_sent = [
        (
            flow_id("17", A4, &udp_sport(&on_wire, A4, B4)?, B4, "5353"),
            (n, n * udp_frame(false, 100)),
        ),
        (
            flow_id("17", B6, &udp_sport(&on_wire, B6, A6)?, A6, "5354"),
            (n, n * udp_frame(true, 200)),
        ),
        (
            flow_id("1", A4, "0", B4, "0"),
            (10, 10 * (14 + 20 + 8 + 56)),
        ),
        (
            flow_id("1", B4, "0", A4, "0"),
            (10, 10 * (14 + 20 + 8 + 56)),
        ),
        (
            flow_id("58", A6, "0", B6, "0"),
            (10, 10 * (14 + 40 + 8 + 56)),
        ),
        (
            flow_id("58", B6, "0", A6, "0"),
            (10, 10 * (14 + 40 + 8 + 56)),
        ),
    ];
    for (id, want) in &expected_sent {
        expect_flow(&live_flows, id, *want, "/api/live vs what the test sent")?;
        expect_flow(&on_wire, id, *want, "tshark vs what the test sent")?;
    }
    let tcp: Vec<(&String, &(u64, u64))> = on_wire
        .iter()
        .filter(|(k, _)| k.starts_with("6 "))
        .collect();
    ensure!(
        tcp.len() == 4,
        "expected 4 directional TCP flows in the capture: {on_wire:?}"
    );
    for (id, want) in &tcp {
        expect_flow(&live_flows, id, **want, "/api/live TCP vs tshark")?;
    }
    ensure!(
        tcp.iter().any(|(_, (_, bytes))| *bytes > mb as u64),
        "no TCP flow carried the megabyte: {tcp:?}"
    );

    // History: one row per packet, fields as sent.
    // Locally sent TCP may leave as GSO packets, segmented after the hook:
    // one sample then stands for several wire segments.
    let emitted = get(&stats["samples"], "emitted")?;
    let emitted_segments = get(&stats["sample_segments"], "emitted")?;
    let ip_packets = get(&stats, "total_packets")? - non_ip_packets(&stats);
    ensure!(
        emitted_segments == ip_packets,
        "{emitted_segments} segments sampled for {ip_packets} IP packets"
    );
    let rows = agent.get_ok(&pair.b, "/api/history?limit=10000")?;
    let rows = rows.as_array().context("history is an array")?.clone();
    ensure!(
        rows.len() as u64 == emitted,
        "{} history rows for {emitted} samples",
        rows.len()
    );
    let ended_ms = now_ms();
    for pair_of in rows.windows(2) {
        ensure!(
            pair_of[0]["timestamp"].as_i64() >= pair_of[1]["timestamp"].as_i64(),
            "history is not newest first"
        );
    }
    let udp_row = rows
        .iter()
        .find(|r| r["dst_port"] == 5353 && r["protocol"] == "UDP")
        .context("no UDP row in history")?;
    ensure!(
        udp_row["src_ip"] == A4 && udp_row["dst_ip"] == B4,
        "UDP row addresses: {udp_row}"
    );
    ensure!(
        udp_row["length"] == udp_frame(false, 100),
        "UDP row length: {udp_row}"
    );
    ensure!(
        udp_row["direction"] == "ingress" && udp_row["segments"] == 1,
        "UDP row: {udp_row}"
    );
    let ts = udp_row["timestamp"].as_i64().context("timestamp")?;
    ensure!(
        (started_ms..=ended_ms).contains(&ts),
        "timestamp {ts} outside the test's run"
    );
    let history = history_flows(&rows)?;
    ensure!(
        history == live_flows,
        "history summed per flow differs from /api/live"
    );
    let five = agent.get_ok(&pair.b, "/api/history?limit=5")?;
    ensure!(
        five.as_array().map(Vec::len) == Some(5),
        "limit=5 gave {five}"
    );

    // SIGTERM: exit 0, every sample in the database file.
    let exit = agent.stop(libc::SIGTERM)?;
    ensure!(
        exit.code == Some(0),
        "exit {:?} after SIGTERM:\n{}",
        exit.code,
        exit.log
    );
    let (db_rows, db_flows) = database_flows(&agent.db_path)?;
    ensure!(
        db_rows == emitted,
        "{db_rows} rows in the database for {emitted} samples"
    );
    for (id, want) in expected_sent
        .iter()
        .map(|(i, w)| (i, *w))
        .chain(tcp.iter().map(|(i, w)| (*i, **w)))
    {
        expect_flow(&db_flows, id, want, "database vs independent count")?;
    }

    // Nothing of ours stays on the interface.
    let qdiscs = pair.b.exec("tc", &["qdisc", "show", "dev", "vb"])?;
    let qdiscs = String::from_utf8_lossy(&qdiscs.stdout);
    ensure!(!qdiscs.contains("clsact"), "clsact left behind: {qdiscs}");
    let links = pair.b.exec("bpftool", &["-j", "link", "show"])?;
    ensure!(
        !String::from_utf8_lossy(&links.stdout).contains("\"tcx\""),
        "TCX link left behind"
    );
    Ok(())
}

/// The source port the kernel picked for the UDP socket, read from the
/// capture (the test bound port 0).
fn udp_sport(on_wire: &FlowCounts, src: &str, dst: &str) -> anyhow::Result<String> {
    on_wire
        .keys()
        .find_map(|k| {
            let f: Vec<&str> = k.split(' ').collect();
            (f[0] == "17" && f[1] == src && f[3] == dst).then(|| f[2].to_owned())
        })
        .with_context(|| format!("no UDP flow {src} -> {dst} in the capture"))
}

fn non_ip_packets(stats: &Value) -> u64 {
    stats["non_ip"]
        .as_object()
        .map(|m| m.values().filter_map(|c| c["packets"].as_u64()).sum())
        .unwrap_or(0)
}

#[test]
fn udp_icmp_and_tcp_counted_exactly_over_tcx() -> anyhow::Result<()> {
    full_scenario("tcx")
}

#[test]
fn udp_icmp_and_tcp_counted_exactly_over_legacy_tc() -> anyhow::Result<()> {
    full_scenario("tc")
}

#[test]
fn missing_interface_is_a_clear_error() -> anyhow::Result<()> {
    let pair = VethPair::new(false)?;
    let dir = TempDir::new("noif")?;
    let out = pair
        .b
        .command(agent_binary().to_str().context("path")?)
        .args(["--interface", "eth9", "--db-path"])
        .arg(dir.path.join("t.db"))
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "started without its interface");
    ensure!(
        stderr.contains("\"eth9\" does not exist") && stderr.contains("lo, vb"),
        "the error should name eth9 and list lo, vb: {stderr}"
    );
    ensure!(!stderr.contains("panicked"), "{stderr}");
    Ok(())
}

#[test]
fn history_limit_outside_1_to_10000_is_a_400() -> anyhow::Result<()> {
    let pair = VethPair::new(false)?;
    let dir = TempDir::new("limit")?;
    let agent = Agent::start(&pair.b, "vb", &dir, &[])?;
    for bad in ["0", "10001", "-3", "ten", "1.5", ""] {
        let (status, body) = agent.get(&pair.b, &format!("/api/history?limit={bad}"))?;
        ensure!(status == 400, "limit={bad} answered {status}");
        let msg = body["error"].as_str().unwrap_or_default();
        ensure!(msg.contains("1 to 10000"), "limit={bad}: {body}");
    }
    let (status, body) = agent.get(&pair.b, "/api/nope")?;
    ensure!(
        status == 404 && body["error"].is_string(),
        "unknown path: {status} {body}"
    );
    Ok(())
}
