//! Time-based behaviour: idle flows leaving the kernel map and the API,
//! and history retention keeping the database file from growing.

use std::{
    fs,
    net::UdpSocket,
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{ensure, Context as _};
use lightshark_tests::*;

/// The flow key bytes of an IPv4 flow as the kernel stores them: addresses
/// in 16-byte fields, ports in host order.
fn has_ipv4_flow(keys: &[Vec<u8>], src: &str, dst: &str, dport: u16) -> bool {
    let s: std::net::Ipv4Addr = src.parse().unwrap();
    let d: std::net::Ipv4Addr = dst.parse().unwrap();
    keys.iter().any(|k| {
        k.len() >= 36
            && k[..4] == s.octets()
            && k[16..20] == d.octets()
            && k[34..36] == dport.to_ne_bytes()
    })
}

fn live_packets(agent: &Agent, ns: &Netns, id_suffix: &str) -> anyhow::Result<Option<u64>> {
    let live = live_flows(&agent.get_ok(ns, "/api/live")?)?;
    Ok(live
        .iter()
        .find(|(id, _)| id.ends_with(id_suffix))
        .map(|(_, v)| v.0))
}

#[test]
fn idle_flows_leave_the_kernel_map_and_come_back_as_new() -> anyhow::Result<()> {
    let pair = VethPair::new(false)?;
    let dir = TempDir::new("stale")?;
    let agent = Agent::start(&pair.b, "vb", &dir, &["--connection-timeout", "2"])?;
    let (stats0, _) = quiet_stats(&agent, &pair.b, "vb")?;
    let suffix = format!("{B4} 7100");
    ensure!(
        udp_burst(&pair.a, &pair.b, A4, B4, 7100, 20, 10)? == 20,
        "udp lost"
    );
    thread::sleep(Duration::from_millis(1200));
    ensure!(
        live_packets(&agent, &pair.b, &suffix)? == Some(20),
        "flow not live after the burst"
    );
    ensure!(
        has_ipv4_flow(&agent.kernel_flow_keys()?, A4, B4, 7100),
        "flow not in the kernel map"
    );

    // Gone from the kernel map and the API within timeout + one poll.
    let sent_at = Instant::now();
    loop {
        let gone = live_packets(&agent, &pair.b, &suffix)?.is_none()
            && !has_ipv4_flow(&agent.kernel_flow_keys()?, A4, B4, 7100);
        if gone {
            break;
        }
        ensure!(
            sent_at.elapsed() < Duration::from_secs(6),
            "idle flow still present after 6 s"
        );
        thread::sleep(Duration::from_millis(200));
    }
    ensure!(
        sent_at.elapsed() >= Duration::from_millis(800),
        "flow removed before its timeout"
    );
    let stats = agent.get_ok(&pair.b, "/api/stats")?;
    ensure!(
        stat(&stats, &["total_packets"]) - stat(&stats0, &["total_packets"]) >= 20,
        "totals lost what the removed flow counted: {stats}"
    );
    ensure!(
        stat(&stats, &["active_connections"]) < stat(&stats0, &["active_connections"]) + 1,
        "{stats}"
    );

    // New traffic brings it back as a new flow, counted from zero.
    ensure!(
        udp_burst(&pair.a, &pair.b, A4, B4, 7100, 5, 10)? == 5,
        "udp lost"
    );
    thread::sleep(Duration::from_millis(1200));
    ensure!(
        live_packets(&agent, &pair.b, &suffix)? == Some(5),
        "flow did not come back with 5 packets"
    );
    Ok(())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[test]
fn retention_deletes_old_rows_and_the_file_stops_growing() -> anyhow::Result<()> {
    let pair = VethPair::new(false)?;
    let dir = TempDir::new("retain")?;
    let mut agent = Agent::start(&pair.b, "vb", &dir, &["--data-retention", "3"])?;
    // A bound receiver, so the datagrams draw no ICMP errors.
    let _sink = pair.b.enter(|| UdpSocket::bind((B4, 7200)))??;

    // Old rows: a burst, then enough time for it to age out.
    ensure!(
        udp_burst(&pair.a, &pair.b, A4, B4, 7300, 500, 10)? == 500,
        "udp lost"
    );
    let burst_done = now_ms();

    // Steady traffic for 24 s; the file size is sampled every second.
    let db = agent.db_path.clone();
    let sizes = thread::scope(|s| -> anyhow::Result<Vec<u64>> {
        let sender = s.spawn(|| udp_steady(&pair.a, A4, B4, 7200, 3000, Duration::from_secs(24)));
        let mut sizes = Vec::new();
        for _ in 0..24 {
            thread::sleep(Duration::from_secs(1));
            sizes.push(fs::metadata(&db)?.len());
        }
        let sent = sender
            .join()
            .map_err(|_| anyhow::anyhow!("sender panicked"))??;
        ensure!(sent > 60_000, "sent only {sent} datagrams");
        Ok(sizes)
    })?;

    let rows = agent.get_ok(&pair.b, "/api/history?limit=10000")?;
    let rows = rows.as_array().context("history array")?;
    let exit = agent.stop(libc::SIGTERM)?;
    ensure!(exit.code == Some(0), "exit {:?}:\n{}", exit.code, exit.log);

    let conn = rusqlite::Connection::open(&db)?;
    let old: i64 = conn.query_row(
        "SELECT count(*) FROM samples WHERE dst_port = 7300",
        [],
        |r| r.get(0),
    )?;
    ensure!(
        old == 0,
        "{old} rows of the burst {}s old are still stored",
        (now_ms() - burst_done) / 1000
    );
    let oldest: i64 = conn.query_row("SELECT min(ts_ms) FROM samples", [], |r| r.get(0))?;
    // Retention runs once a second in batches: allow 3 s of slack.
    ensure!(
        now_ms() - oldest < 6_000,
        "oldest row is {} ms old with 3 s retention",
        now_ms() - oldest
    );
    ensure!(!rows.is_empty(), "no history kept at all");

    eprintln!("database size each second: {sizes:?}");
    // After the first half, freed pages are reused: no new growth.
    let early = *sizes[..12].iter().max().context("sizes")?;
    let late = *sizes[12..].iter().max().context("sizes")?;
    ensure!(
        late <= early + early / 10,
        "the database kept growing under retention: {sizes:?}"
    );
    Ok(())
}
