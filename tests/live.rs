//! The live view: per-flow rates against a sender of known rate, several
//! interfaces at once (a veth and loopback) against their own counters and
//! tshark, and two-way connections against the directional flows and the
//! capture, with the client known from who connected.

use std::{
    net::SocketAddr,
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _};
use lightshark_tests::*;
use serde_json::Value;

/// How far a measured rate may be from the sent one. The sender keeps its
/// rate to a datagram or two over the agent's 5 s window; the rest is room
/// for a loaded machine.
const RATE_TOLERANCE: f64 = 0.10;

/// Frame bytes of an IPv4 UDP datagram: Ethernet 14 + IP 20 + UDP 8 + payload.
fn udp4_frame(payload: u64) -> u64 {
    14 + 20 + 8 + payload
}

/// The `/api/live` entries (limit 10000) matching `pick`.
fn entries(live: &Value, pick: impl Fn(&Value) -> bool) -> Vec<&Value> {
    live["connections"]
        .as_array()
        .map(|a| a.iter().filter(|e| pick(e)).collect())
        .unwrap_or_default()
}

/// The one entry matching `pick`, or an error showing them all.
fn only<'a>(
    live: &'a Value,
    what: &str,
    pick: impl Fn(&Value) -> bool,
) -> anyhow::Result<&'a Value> {
    let found = entries(live, pick);
    ensure!(
        found.len() == 1,
        "{} entries for {what} in {live}",
        found.len()
    );
    Ok(found[0])
}

fn f64_of(v: &Value, field: &str) -> anyhow::Result<f64> {
    v[field]
        .as_f64()
        .with_context(|| format!("no {field} in {v}"))
}

fn expect_rate(got: f64, want: f64, what: &str) -> anyhow::Result<()> {
    ensure!(
        (got - want).abs() <= want * RATE_TOLERANCE,
        "{what}: {got:.1}, sent at {want:.1} (tolerance {}%)",
        RATE_TOLERANCE * 100.0
    );
    Ok(())
}

#[test]
fn per_flow_rates_follow_a_steady_two_way_sender() -> anyhow::Result<()> {
    let pair = VethPair::new(false)?;
    let dir = TempDir::new("rates")?;
    let agent = Agent::start(&pair.b, "vb", &dir, &[])?;
    // One UDP conversation: A4:45000 -> B4:5400 at 100/s and back at 250/s,
    // 64-byte payloads; neither port is the other's ephemeral one.
    let (a, b): (SocketAddr, SocketAddr) = (
        format!("{A4}:45000").parse()?,
        format!("{B4}:5400").parse()?,
    );
    let (up, down) = (100, 250);
    let run = Duration::from_secs(9);
    let (live, grouped) = thread::scope(|s| -> anyhow::Result<(Value, Value)> {
        let t_up = s.spawn(|| udp_steady_between(&pair.a, a, b, up, run));
        let t_down = s.spawn(|| udp_steady_between(&pair.b, b, a, down, run));
        // Past the 5 s window (and a poll), while both still send.
        thread::sleep(Duration::from_millis(7000));
        let live = agent.get_ok(&pair.b, "/api/live?limit=10000")?;
        let grouped = agent.get_ok(&pair.b, "/api/live?group=connection&limit=10000")?;
        for t in [t_up, t_down] {
            t.join().map_err(|_| anyhow::anyhow!("sender panicked"))??;
        }
        Ok((live, grouped))
    })?;
    let frame = udp4_frame(64) as f64;
    for (src, dst, rate) in [(a, b, up), (b, a, down)] {
        let flow = only(&live, &format!("{src} -> {dst}"), |e| {
            e["connection"] == format!("{src} -> {dst}").as_str()
        })?;
        expect_rate(
            f64_of(flow, "packets_per_second")?,
            rate.into(),
            &format!("{src} -> {dst} packets/s"),
        )?;
        expect_rate(
            f64_of(flow, "bytes_per_second")?,
            f64::from(rate) * frame,
            &format!("{src} -> {dst} bytes/s"),
        )?;
    }
    let conn = only(&grouped, "the conversation", |e| e["protocol"] == "UDP")?;
    ensure!(
        conn["client"]["port"] == 45000 && conn["server"]["port"] == 5400,
        "the higher port is the client: {conn}"
    );
    expect_rate(
        f64_of(conn, "sent_packets_per_second")?,
        up.into(),
        "sent packets/s",
    )?;
    expect_rate(
        f64_of(conn, "received_packets_per_second")?,
        down.into(),
        "received packets/s",
    )?;
    expect_rate(
        f64_of(conn, "sent_bytes_per_second")?,
        f64::from(up) * frame,
        "sent bytes/s",
    )?;
    expect_rate(
        f64_of(conn, "received_bytes_per_second")?,
        f64::from(down) * frame,
        "received bytes/s",
    )?;

    // Silent for longer than the window: the rates fall to zero while the
    // counters stay.
    thread::sleep(Duration::from_secs(7));
    let live = agent.get_ok(&pair.b, "/api/live?limit=10000")?;
    let flow = only(&live, "A -> B after the traffic", |e| {
        e["connection"] == format!("{a} -> {b}").as_str()
    })?;
    ensure!(
        f64_of(flow, "packets_per_second")? == 0.0 && f64_of(flow, "bytes_per_second")? == 0.0,
        "rates after 7 s of silence: {flow}"
    );
    ensure!(
        flow["stats"]["packets_count"].as_u64() > Some(800),
        "{flow}"
    );
    Ok(())
}

/// A third namespace on its own veth to the agent's, not watched by it, to
/// reach the API from: the requests then cross neither interface the test
/// counts (the veth pair's or loopback), so those stay quiet around them.
struct ApiPath {
    client: Netns,
}

/// The agent's address on the API path.
const API_HOST: &str = "10.202.0.1";

impl ApiPath {
    fn new(agent_ns: &Netns) -> anyhow::Result<ApiPath> {
        let client = Netns::new("api")?;
        agent_ns.exec(
            "ip",
            &[
                "link",
                "add",
                "lsapi0",
                "type",
                "veth",
                "peer",
                "name",
                "lsapi1",
                "netns",
                &client.name,
            ],
        )?;
        for (ns, dev, addr) in [
            (agent_ns, "lsapi0", "10.202.0.1/24"),
            (&client, "lsapi1", "10.202.0.2/24"),
        ] {
            ns.exec("ip", &["addr", "add", addr, "dev", dev])?;
            ns.exec("ip", &["link", "set", dev, "up"])?;
        }
        Ok(ApiPath { client })
    }

    fn get(&self, agent: &Agent, path: &str) -> anyhow::Result<Value> {
        let (status, body) = agent.get_via(&self.client, API_HOST, path)?;
        ensure!(status == 200, "{path} answered {status}: {body}");
        Ok(body)
    }

    /// Stats, live flows and each device's counters, taken when none of
    /// `devs` carried a packet for longer than a poll around the requests:
    /// then the agent's numbers and the counters describe the same traffic.
    fn quiet_view(
        &self,
        agent: &Agent,
        ns: &Netns,
        devs: &[&str],
    ) -> anyhow::Result<(Value, Value, Vec<LinkCounters>)> {
        let read = || {
            devs.iter()
                .map(|d| LinkCounters::read(ns, d))
                .collect::<anyhow::Result<Vec<_>>>()
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let before = read()?;
            thread::sleep(Duration::from_millis(1500));
            let stats = self.get(agent, "/api/stats")?;
            let live = self.get(agent, "/api/live?limit=10000")?;
            let after = read()?;
            if before == after {
                return Ok((stats, live, after));
            }
            ensure!(
                Instant::now() < deadline,
                "{devs:?} never went quiet for 1.5 s"
            );
        }
    }
}

/// Packets and bytes of the live entries seen on `iface`.
fn interface_sum(live: &Value, iface: &str) -> (u64, u64) {
    entries(live, |e| e["interface"] == iface)
        .iter()
        .fold((0, 0), |(p, b), e| {
            (
                p + e["stats"]["packets_count"].as_u64().unwrap_or(0),
                b + e["stats"]["bytes_sent"].as_u64().unwrap_or(0),
            )
        })
}

#[test]
fn a_veth_and_loopback_together_each_packet_once_under_its_interface() -> anyhow::Result<()> {
    let pair = VethPair::new(false)?;
    let api = ApiPath::new(&pair.b)?;
    let dir = TempDir::new("multi")?;
    let agent = Agent::start(&pair.b, "vb,lo", &dir, &[])?;
    let devs = ["vb", "lo"];
    let (stats0, live0, base) = api.quiet_view(&agent, &pair.b, &devs)?;
    let capture = Capture::start(&pair.b, "lo", &dir)?;

    let (veth_sent, lo_sent) = (300, 500);
    ensure!(
        udp_burst(&pair.a, &pair.b, A4, B4, 5353, veth_sent, 100)? == veth_sent,
        "veth datagrams lost"
    );
    ensure!(
        udp_burst(
            &pair.b,
            &pair.b,
            "127.0.0.1",
            "127.0.0.1",
            5454,
            lo_sent,
            200
        )? == lo_sent,
        "loopback datagrams lost"
    );
    let (stats, live, now) = api.quiet_view(&agent, &pair.b, &devs)?;
    let on_lo = capture.finish()?;
    let (vb, lo) = (now[0].since(&base[0]), now[1].since(&base[1]));

    // Each flow under the interface it crossed, each loopback packet once.
    let veth_flow = only(&live, "the veth burst", |e| e["dst_port"] == 5353)?;
    ensure!(
        veth_flow["interface"] == "vb" && veth_flow["stats"]["packets_count"] == veth_sent,
        "veth flow: {veth_flow}"
    );
    let lo_flow = only(&live, "the loopback burst", |e| e["dst_port"] == 5454)?;
    let lo_id = flow_id(
        "17",
        "127.0.0.1",
        &lo_flow["src_port"].to_string(),
        "127.0.0.1",
        "5454",
    );
    let (lo_packets, lo_bytes) = on_lo
        .get(&lo_id)
        .copied()
        .with_context(|| format!("{lo_id} not captured"))?;
    ensure!(
        lo_flow["interface"] == "lo"
            && lo_flow["stats"]["packets_count"] == lo_sent
            && lo_flow["stats"]["packets_count"] == lo_packets
            && lo_flow["stats"]["bytes_sent"] == lo_bytes,
        "loopback flow {lo_flow}: sent {lo_sent}, tshark saw {lo_packets} packets, {lo_bytes} bytes"
    );

    // Everything on lo (the test's health checks included) against lo's own
    // counters. lo counts a packet once, as received, and its byte counter
    // leaves out the 14-byte Ethernet header the kernel puts on loopback
    // frames, which tcpdump, like the agent, counts.
    let ((p0, b0), (p1, b1)) = (interface_sum(&live0, "lo"), interface_sum(&live, "lo"));
    ensure!(
        (p1 - p0, b1 - b0) == (lo.rx_packets, lo.rx_bytes + 14 * lo.rx_packets),
        "loopback flows grew by {} packets, {} bytes; lo counted {lo:?}",
        p1 - p0,
        b1 - b0
    );
    ensure!(lo.tx_packets == lo.rx_packets, "lo: {lo:?}");

    // The totals cover both interfaces.
    let delta = |path: &[&str]| stat(&stats, path) - stat(&stats0, path);
    let lo_bytes_on_wire = lo.rx_bytes + 14 * lo.rx_packets;
    for (got, want, what) in [
        (
            delta(&["total_packets"]),
            vb.rx_packets + vb.tx_packets + lo.rx_packets,
            "total packets",
        ),
        (
            delta(&["total_bytes"]),
            vb.rx_bytes + vb.tx_bytes + lo_bytes_on_wire,
            "total bytes",
        ),
        (
            delta(&["ingress", "packets"]),
            vb.rx_packets + lo.rx_packets,
            "ingress packets",
        ),
        (
            delta(&["ingress", "bytes"]),
            vb.rx_bytes + lo_bytes_on_wire,
            "ingress bytes",
        ),
        (
            delta(&["egress", "packets"]),
            vb.tx_packets,
            "egress packets",
        ),
        (delta(&["egress", "bytes"]), vb.tx_bytes, "egress bytes"),
    ] {
        ensure!(
            got == want,
            "{what}: {got}, the interfaces counted {want} (vb {vb:?}, lo {lo:?})"
        );
    }
    ensure!(
        vb.rx_packets >= veth_sent as u64 && lo.rx_packets >= lo_sent as u64,
        "{vb:?} {lo:?}"
    );
    Ok(())
}

#[test]
fn interface_lists_are_checked_and_every_interface_is_left_clean() -> anyhow::Result<()> {
    let pair = VethPair::new(false)?;
    let dir = TempDir::new("iflist")?;
    let run = |iface: &str| {
        pair.b
            .command(agent_binary().to_str().context("path")?)
            .args(["--interface", iface, "--db-path"])
            .arg(dir.path.join("t.db"))
            .output()
            .context("running the agent")
    };
    let out = run("vb,nosuch0")?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(1) && err.contains("\"nosuch0\" does not exist"),
        "{:?}: {err}",
        out.status
    );
    let out = run("vb,lo,vb")?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(2) && err.contains("\"vb\" is listed twice"),
        "{:?}: {err}",
        out.status
    );

    // Legacy clsact on three interfaces; one vanishes: the agent names it,
    // exits 1 and leaves nothing on the two that remain.
    pair.b.exec(
        "ip",
        &[
            "link", "add", "lsgone0", "type", "veth", "peer", "name", "lsgone1",
        ],
    )?;
    pair.b.exec("ip", &["link", "set", "lsgone0", "up"])?;
    let mut agent = Agent::start(&pair.b, "vb,lo,lsgone0", &dir, &["--attach-mode", "tc"])?;
    for dev in ["vb", "lo", "lsgone0"] {
        let q = pair.b.exec("tc", &["qdisc", "show", "dev", dev])?;
        ensure!(
            String::from_utf8_lossy(&q.stdout).contains("clsact"),
            "no clsact on {dev}"
        );
    }
    pair.b.exec("ip", &["link", "del", "lsgone0"])?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !agent.log().contains("stopped;") {
        ensure!(
            Instant::now() < deadline,
            "agent still running after lsgone0 went:\n{}",
            agent.log()
        );
        thread::sleep(Duration::from_millis(100));
    }
    let exit = agent.stop(0)?;
    ensure!(
        exit.code == Some(1)
            && exit.log.contains("interface lsgone0")
            && exit.log.contains("is gone"),
        "exit {:?}:\n{}",
        exit.code,
        exit.log
    );
    for dev in ["vb", "lo"] {
        let q = pair.b.exec("tc", &["qdisc", "show", "dev", dev])?;
        ensure!(
            !String::from_utf8_lossy(&q.stdout).contains("clsact"),
            "clsact left on {dev}: {}",
            String::from_utf8_lossy(&q.stdout)
        );
    }
    Ok(())
}

/// The directional flow `src:sport -> dst:dport` as (packets, bytes), from
/// a live answer.
fn directional(
    live: &Value,
    src: &str,
    sport: u64,
    dst: &str,
    dport: u64,
) -> anyhow::Result<(u64, u64)> {
    let f = only(live, &format!("{src}:{sport} -> {dst}:{dport}"), |e| {
        e["src_ip"] == src && e["src_port"] == sport && e["dst_ip"] == dst && e["dst_port"] == dport
    })?;
    Ok((
        f["stats"]["packets_count"].as_u64().context("packets")?,
        f["stats"]["bytes_sent"].as_u64().context("bytes")?,
    ))
}

/// Checks one grouped connection against the two directional flows and the
/// capture; returns it.
fn check_connection<'a>(
    grouped: &'a Value,
    live: &Value,
    on_wire: &FlowCounts,
    client: (&str, u64),
    server: (&str, u64),
    role_from: &str,
) -> anyhow::Result<&'a Value> {
    let conn = only(grouped, &format!("{client:?} <-> {server:?}"), |e| {
        (e["client"]["port"] == client.1 && e["server"]["port"] == server.1)
            || (e["client"]["port"] == server.1 && e["server"]["port"] == client.1)
    })?;
    ensure!(
        conn["client"]["ip"] == client.0
            && conn["client"]["port"] == client.1
            && conn["server"]["ip"] == server.0
            && conn["server"]["port"] == server.1
            && conn["role_from"] == role_from
            && conn["interface"] == "vb",
        "want client {client:?}, server {server:?} by {role_from}: {conn}"
    );
    let proto = protocol_number(conn["protocol"].as_str().context("protocol")?);
    let sent = directional(live, client.0, client.1, server.0, server.1)?;
    let received = directional(live, server.0, server.1, client.0, client.1)?;
    let wire = |(s, sp): (&str, u64), (d, dp): (&str, u64)| {
        on_wire
            .get(&flow_id(&proto, s, &sp.to_string(), d, &dp.to_string()))
            .copied()
            .unwrap_or_default()
    };
    let pair_of = |p: &str, b: &str| (conn[p].as_u64().unwrap_or(0), conn[b].as_u64().unwrap_or(0));
    ensure!(
        pair_of("packets_sent", "bytes_sent") == sent && sent == wire(client, server),
        "sent: {conn} vs flow {sent:?} vs tshark {:?}",
        wire(client, server)
    );
    ensure!(
        pair_of("packets_received", "bytes_received") == received
            && received == wire(server, client),
        "received: {conn} vs flow {received:?} vs tshark {:?}",
        wire(server, client)
    );
    ensure!(sent.0 > 0 && received.0 > 0, "{conn}");
    ensure!(
        conn["first_seen"].as_i64() <= conn["last_seen"].as_i64()
            && conn["first_seen"].as_i64() > Some(0),
        "{conn}"
    );
    Ok(conn)
}

#[test]
fn group_connection_pairs_both_directions_with_the_client_known() -> anyhow::Result<()> {
    let pair = VethPair::new(false)?;
    let dir = TempDir::new("group")?;
    let agent = Agent::start(&pair.b, "vb", &dir, &[])?;
    let capture = Capture::start(&pair.b, "vb", &dir)?;

    // TCP each way, to server ports above the ephemeral range, so that the
    // port rule would name the wrong side: only the SYN gets these right.
    ensure!(
        tcp_transfer(&pair.a, &pair.b, B4, 61001, 300_000)? == 300_000,
        "A->B transfer short"
    );
    ensure!(
        tcp_transfer(&pair.b, &pair.a, A4, 61002, 200_000)? == 200_000,
        "B->A transfer short"
    );
    // IPv6 takes the kernel program's other path to the TCP flags.
    ensure!(
        tcp_transfer(&pair.a, &pair.b, B6, 61003, 100_000)? == 100_000,
        "IPv6 A->B transfer short"
    );
    // UDP: B (port 5353) speaks first, A (port 40000) answers; the port rule
    // makes A the client all the same. Equal ports: the lower address is.
    // (from, to, source, destination, datagrams, payload)
    let exchanges = [
        (&pair.b, &pair.a, (B4, 5353), (A4, 40000), 30, 120),
        (&pair.a, &pair.b, (A4, 40000), (B4, 5353), 20, 80),
        (&pair.b, &pair.a, (B4, 7000), (A4, 7000), 5, 50),
        (&pair.a, &pair.b, (A4, 7000), (B4, 7000), 9, 50),
    ];
    for (from, to, (src, sport), (dst, dport), count, payload) in exchanges {
        let (src, dst) = (
            SocketAddr::new(src.parse()?, sport),
            SocketAddr::new(dst.parse()?, dport),
        );
        let got = udp_burst_between(from, to, src, dst, count, payload)?;
        ensure!(got == count, "{src} -> {dst}: {got} of {count} arrived");
    }
    let _ = quiet_stats(&agent, &pair.b, "vb")?;
    let on_wire = capture.finish()?;
    let live = agent.get_ok(&pair.b, "/api/live?limit=10000")?;
    let grouped = agent.get_ok(&pair.b, "/api/live?group=connection&limit=10000")?;

    let client_port = |server_port: u64| -> anyhow::Result<u64> {
        let f = only(&live, "the TCP client's flow", |e| {
            e["protocol"] == "TCP" && e["dst_port"] == server_port
        })?;
        f["src_port"].as_u64().context("port")
    };
    // (client, server, how the roles were decided, least client bytes)
    let cases = [
        ((A4, client_port(61001)?), (B4, 61001), "syn", 300_000),
        ((B4, client_port(61002)?), (A4, 61002), "syn", 200_000),
        ((A6, client_port(61003)?), (B6, 61003), "syn", 100_000),
        ((A4, 40000), (B4, 5353), "port_rule", 20 * 80),
        ((A4, 7000), (B4, 7000), "port_rule", 9 * 50),
    ];
    for (client, server, role_from, least) in cases {
        let conn = check_connection(&grouped, &live, &on_wire, client, server, role_from)?;
        ensure!(conn["bytes_sent"].as_u64() > Some(least), "{conn}");
    }
    let udp = only(&grouped, "the UDP exchange", |e| {
        e["server"]["port"] == 5353
    })?;
    ensure!(
        udp["packets_sent"] == 20 && udp["packets_received"] == 30,
        "{udp}"
    );
    // Ordered by total packets, and `limit` takes the first.
    let totals: Vec<u64> = entries(&grouped, |_| true)
        .iter()
        .map(|e| {
            e["packets_sent"].as_u64().unwrap_or(0) + e["packets_received"].as_u64().unwrap_or(0)
        })
        .collect();
    ensure!(
        totals.windows(2).all(|w| w[0] >= w[1]),
        "not by total packets: {totals:?}"
    );
    let one = agent.get_ok(&pair.b, "/api/live?group=connection&limit=1")?;
    let first = entries(&one, |_| true);
    ensure!(
        first.len() == 1 && first[0]["server"]["port"] == 61001,
        "limit=1 gave {one}"
    );
    ensure!(
        one["total_packets"].as_u64() > Some(0) && one["total_bytes"].as_u64() > Some(0),
        "totals missing from the grouped answer: {one}"
    );
    // Without limit (the body kept per snapshot): the same connections.
    for _ in 0..2 {
        let default = agent.get_ok(&pair.b, "/api/live?group=connection")?;
        let clients: Vec<&Value> = entries(&default, |_| true)
            .iter()
            .map(|e| &e["client"])
            .collect();
        let want: Vec<&Value> = entries(&grouped, |_| true)
            .iter()
            .take(50)
            .map(|e| &e["client"])
            .collect();
        ensure!(clients == want, "{default} vs {grouped}");
    }

    for bad in [
        "group=flow",
        "group=",
        "group=connection&group=connection",
        "group=CONNECTION",
    ] {
        let (status, body) = agent.get(&pair.b, &format!("/api/live?{bad}"))?;
        let msg = body["error"].as_str().unwrap_or_default();
        ensure!(
            status == 400 && msg.contains("group"),
            "{bad}: {status} {body}"
        );
    }
    Ok(())
}
