//! History queries against the real agent: filters, time ranges and cursor
//! pages of `/api/history`, `/api/top`, and `/api/history.pcap` read back by
//! tshark; each compared with tshark's dissection of a tcpdump capture or
//! with what the test sent. Also the migration of a schema-1 database.

use std::{
    thread,
    time::{Duration, SystemTime, UNIX_EPOCH},
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

/// Rows of `/api/history` for a query (limit 10000, so all of them here).
fn rows(agent: &Agent, ns: &Netns, query: &str) -> anyhow::Result<Vec<Value>> {
    let body = agent.get_ok(ns, &format!("/api/history?limit=10000&{query}"))?;
    Ok(body.as_array().context("history is an array")?.clone())
}

/// Packets (wire segments) and bytes of history rows.
fn totals(rows: &[Value]) -> (u64, u64) {
    rows.iter().fold((0, 0), |(p, b), r| {
        (
            p + r["segments"].as_u64().unwrap(),
            b + r["length"].as_u64().unwrap(),
        )
    })
}

/// Packets and bytes of the captured flows whose key passes `keep`
/// (`[proto, src, sport, dst, dport]`).
fn expected(flows: &FlowCounts, keep: impl Fn(&[&str]) -> bool) -> (u64, u64) {
    flows
        .iter()
        .filter(|(id, _)| keep(&id.split(' ').collect::<Vec<_>>()))
        .fold((0, 0), |(p, b), (_, (fp, fb))| (p + fp, b + fb))
}

/// Waits until the history holds `want` rows for `query`.
fn wait_rows(agent: &Agent, ns: &Netns, query: &str, want: usize) -> anyhow::Result<()> {
    for _ in 0..50 {
        if rows(agent, ns, query)?.len() >= want {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(100));
    }
    anyhow::bail!("history never reached {want} rows for {query}")
}

/// tshark's fields of every packet in a pcap file, one line each.
fn tshark_fields(
    file: &std::path::Path,
    filter: &str,
    fields: &[&str],
) -> anyhow::Result<Vec<String>> {
    let mut args = vec!["-n", "-r", file.to_str().context("path")?, "-T", "fields"];
    if !filter.is_empty() {
        args.extend(["-Y", filter]);
    }
    for f in fields {
        args.extend(["-e", f]);
    }
    let out = run("tshark", &args)?;
    ensure!(
        out.status.success(),
        "tshark could not read {}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect())
}

#[test]
fn filters_time_ranges_cursors_top_and_pcap_match_the_capture() -> anyhow::Result<()> {
    let pair = VethPair::new(false)?;
    let dir = TempDir::new("history")?;
    let agent = Agent::start(&pair.b, "vb", &dir, &[])?;
    quiet_stats(&agent, &pair.b, "vb")?;
    let capture = Capture::start(&pair.b, "vb", &dir)?;
    let started = now_ms();

    // Before the midpoint: 30 datagrams to port 5001 over IPv4, 20 to 5002
    // over IPv6. After it: 25 more to 5001, and 10 the other way to 5003.
    ensure!(udp_burst(&pair.a, &pair.b, A4, B4, 5001, 30, 100)? == 30);
    ensure!(udp_burst(&pair.a, &pair.b, A6, B6, 5002, 20, 80)? == 20);
    thread::sleep(Duration::from_millis(300));
    let mid = now_ms();
    thread::sleep(Duration::from_millis(300));
    ensure!(udp_burst(&pair.a, &pair.b, A4, B4, 5001, 25, 100)? == 25);
    ensure!(udp_burst(&pair.b, &pair.a, B4, A4, 5003, 10, 60)? == 10);
    // A quiet link also means tcpdump has had its buffer timeout and
    // written every packet.
    quiet_stats(&agent, &pair.b, "vb")?;
    let flows = capture.finish()?;
    wait_rows(&agent, &pair.b, "protocol=udp", 85)?;

    // Every filter leaves exactly what tshark counts for it.
    let port = |k: &[&str], p: &str| k[2] == p || k[4] == p;
    let cases: Vec<(&str, (u64, u64))> = vec![
        ("port=5001", expected(&flows, |k| port(k, "5001"))),
        ("port=5003", expected(&flows, |k| port(k, "5003"))),
        (
            "ip=fd00:201::1",
            expected(&flows, |k| k[1] == A6 || k[3] == A6),
        ),
        ("src_ip=10.201.0.2", expected(&flows, |k| k[1] == B4)),
        ("dst_ip=10.201.0.2", expected(&flows, |k| k[3] == B4)),
        ("protocol=UDP", expected(&flows, |k| k[0] == "17")),
        (
            "protocol=udp&dst_ip=10.201.0.1&port=5003",
            expected(&flows, |k| k[0] == "17" && k[3] == A4 && port(k, "5003")),
        ),
    ];
    for (query, want) in &cases {
        let got = totals(&rows(&agent, &pair.b, query)?);
        ensure!(
            got == *want,
            "{query}: history has {got:?} (packets, bytes), tshark {want:?}"
        );
        ensure!(want.0 > 0, "{query}: the capture has nothing to compare");
    }
    println!("filters: {cases:?}");

    // Time ranges split the two bursts to port 5001 exactly.
    let before_mid = rows(
        &agent,
        &pair.b,
        &format!("port=5001&since={started}&until={mid}"),
    )?;
    let after_mid = rows(&agent, &pair.b, &format!("port=5001&since={mid}"))?;
    ensure!(
        (before_mid.len(), after_mid.len()) == (30, 25),
        "port 5001 before/after the midpoint: {} / {}, sent 30 / 25",
        before_mid.len(),
        after_mid.len()
    );
    ensure!(rows(&agent, &pair.b, &format!("since={}", now_ms() + 60_000))?.is_empty());

    // Pages through the UDP rows with `before`: every row once, newest first.
    let mut ids = Vec::new();
    let mut cursor = String::new();
    loop {
        let page = agent.get_ok(
            &pair.b,
            &format!("/api/history?protocol=udp&limit=7{cursor}"),
        )?;
        let page = page.as_array().context("a page is an array")?;
        ensure!(page.len() <= 7, "a page of {} rows", page.len());
        let Some(last) = page.last() else { break };
        ids.extend(page.iter().map(|r| r["id"].as_i64().unwrap()));
        cursor = format!("&before={}", last["id"]);
    }
    let udp = expected(&flows, |k| k[0] == "17").0 as usize;
    ensure!(
        ids.len() == udp,
        "paging found {} rows, tshark {udp} UDP packets",
        ids.len()
    );
    ensure!(
        ids.windows(2).all(|w| w[0] > w[1]),
        "ids not strictly decreasing: {ids:?}"
    );
    let row = &rows(&agent, &pair.b, "port=5002")?[0];
    ensure!(
        row["interface"] == "vb",
        "row names interface {}",
        row["interface"]
    );

    // /api/top over the test's time range.
    let top = |by: &str| -> anyhow::Result<Vec<Value>> {
        let body = agent.get_ok(
            &pair.b,
            &format!("/api/top?by={by}&since={started}&limit=1000"),
        )?;
        Ok(body["entries"].as_array().context("entries")?.clone())
    };
    let ports = top("port")?;
    let p5001 = ports
        .iter()
        .find(|e| e["port"] == 5001)
        .context("port 5001 in /api/top?by=port")?;
    let want = expected(&flows, |k| k[4] == "5001");
    ensure!(
        (
            stat(p5001, &["packets_received"]),
            stat(p5001, &["bytes_received"])
        ) == want,
        "top port 5001 received {p5001}, tshark {want:?}"
    );
    let ips = top("ip")?;
    let b4 = ips
        .iter()
        .find(|e| e["ip"] == B4)
        .context("B4 in /api/top?by=ip")?;
    let (sent, received) = (
        expected(&flows, |k| k[1] == B4),
        expected(&flows, |k| k[3] == B4),
    );
    ensure!(
        (stat(b4, &["packets_sent"]), stat(b4, &["bytes_sent"])) == sent
            && (
                stat(b4, &["packets_received"]),
                stat(b4, &["bytes_received"])
            ) == received,
        "top ip {B4}: {b4}, tshark sent {sent:?} received {received:?}"
    );
    let biggest = &top("connection")?[0];
    let (id, counts) = flows
        .iter()
        .max_by_key(|(_, (_, b))| *b)
        .context("captured flows")?;
    ensure!(
        (stat(biggest, &["packets"]), stat(biggest, &["bytes"])) == *counts,
        "biggest connection {biggest}, tshark's biggest flow {id} {counts:?}"
    );

    // The pcap of port 5001 holds the same packets as tcpdump's capture:
    // same IP ids and checksums, same lengths, headers only (42 bytes).
    let (status, uncaptured, body) = agent.get_bytes(
        &pair.b,
        "/api/history.pcap?port=5001",
        "x-lightshark-uncaptured",
    )?;
    ensure!(status == 200, "history.pcap answered {status}");
    ensure!(
        uncaptured.as_deref() == Some("0"),
        "uncaptured: {uncaptured:?}"
    );
    let file = dir.path.join("history.pcap");
    std::fs::write(&file, &body)?;
    let fields = [
        "ip.id",
        "ip.checksum",
        "udp.srcport",
        "udp.dstport",
        "frame.len",
    ];
    let mut ours = tshark_fields(&file, "", &fields)?;
    let mut theirs = tshark_fields(&capture_file(&dir), "udp.port == 5001", &fields)?;
    ours.sort();
    theirs.sort();
    ensure!(
        ours.len() == 55,
        "the pcap holds {} packets, sent 55",
        ours.len()
    );
    ensure!(
        ours == theirs,
        "pcap packets differ from tcpdump's:\n{ours:?}\n{theirs:?}"
    );
    let caplens = tshark_fields(&file, "", &["frame.cap_len"])?;
    ensure!(
        caplens.iter().all(|c| c == "42"),
        "captured lengths {caplens:?}"
    );
    Ok(())
}

fn capture_file(dir: &TempDir) -> std::path::PathBuf {
    dir.path.join("vb.pcap")
}

#[test]
fn bad_history_queries_are_400s_naming_the_parameter() -> anyhow::Result<()> {
    let pair = VethPair::new(false)?;
    let dir = TempDir::new("history-400")?;
    let agent = Agent::start(&pair.b, "vb", &dir, &[])?;
    for (path, names) in [
        ("/api/history?ip=10.0.0", "ip"),
        ("/api/history?port=70000", "port"),
        ("/api/history?since=abc", "since"),
        ("/api/history?since=10&until=5", "since"),
        ("/api/history?protocol=nope", "protocol"),
        ("/api/history?before=-3", "before"),
        ("/api/history.pcap?limit=100001", "limit"),
        ("/api/history.pcap?colour=red", "colour"),
        ("/api/top?by=mac", "by"),
        ("/api/top?ip=10.0.0.1", "ip"),
    ] {
        let (status, body) = agent.get(&pair.b, path)?;
        let message = body["error"].as_str().unwrap_or_default();
        ensure!(
            status == 400 && message.contains(names),
            "{path}: {status} {body}"
        );
    }
    Ok(())
}

#[test]
fn capture_bytes_sets_what_the_pcap_holds() -> anyhow::Result<()> {
    for (flag, want_caplen, want_in_file) in [("200", "200", 12), ("0", "", 0)] {
        let pair = VethPair::new(false)?;
        let dir = TempDir::new("capture-bytes")?;
        let agent = Agent::start(&pair.b, "vb", &dir, &["--capture-bytes", flag])?;
        ensure!(udp_burst(&pair.a, &pair.b, A4, B4, 6001, 12, 500)? == 12);
        wait_rows(&agent, &pair.b, "port=6001", 12)?;
        let (status, uncaptured, body) = agent.get_bytes(
            &pair.b,
            "/api/history.pcap?port=6001",
            "x-lightshark-uncaptured",
        )?;
        ensure!(status == 200, "history.pcap answered {status}");
        let file = dir.path.join("capture.pcap");
        std::fs::write(&file, &body)?;
        let lens = tshark_fields(&file, "", &["frame.cap_len", "frame.len"])?;
        ensure!(
            lens.len() == want_in_file,
            "--capture-bytes {flag}: {} packets in the pcap, want {want_in_file}",
            lens.len()
        );
        ensure!(
            lens.iter().all(|l| *l == format!("{want_caplen}\t542")),
            "--capture-bytes {flag}: (captured, frame) lengths {lens:?}"
        );
        let missing = (12 - want_in_file).to_string();
        ensure!(
            uncaptured.as_deref() == Some(missing.as_str()),
            "--capture-bytes {flag}: uncaptured {uncaptured:?}"
        );
    }
    Ok(())
}

/// Schema version 1 exactly as the first release wrote it.
const SCHEMA_V1: &str = "
    CREATE TABLE samples (
        id        INTEGER PRIMARY KEY,
        ts_ms     INTEGER NOT NULL,
        src_ip    BLOB    NOT NULL,
        dst_ip    BLOB    NOT NULL,
        src_port  INTEGER NOT NULL,
        dst_port  INTEGER NOT NULL,
        protocol  INTEGER NOT NULL,
        length    INTEGER NOT NULL,
        segments  INTEGER NOT NULL,
        direction INTEGER NOT NULL,
        ifindex   INTEGER NOT NULL
    );
    CREATE INDEX samples_ts ON samples (ts_ms);
    PRAGMA user_version = 1;";

#[test]
fn a_schema_1_database_is_migrated_with_its_history() -> anyhow::Result<()> {
    let pair = VethPair::new(false)?;
    let dir = TempDir::new("migrate")?;
    let db = dir.path.join("old.db");
    let old_rows = 5000i64;
    let base = now_ms() - 3_600_000;
    {
        let conn = rusqlite::Connection::open(&db)?;
        conn.execute_batch(SCHEMA_V1)?;
        let tx = conn.unchecked_transaction()?;
        for i in 0..old_rows {
            tx.execute(
                "INSERT INTO samples (ts_ms, src_ip, dst_ip, src_port, dst_port, protocol,
                                      length, segments, direction, ifindex)
                 VALUES (?1, ?2, ?3, ?4, 7777, 17, ?5, 1, 0, 99)",
                rusqlite::params![
                    base + i,
                    [10u8, 9, (i >> 8) as u8, i as u8].as_slice(),
                    [10u8, 9, 0, 1].as_slice(),
                    40_000 + i,
                    60 + i % 7
                ],
            )?;
        }
        tx.commit()?;
    }
    let old_bytes: i64 = (0..old_rows).map(|i| 60 + i % 7).sum();

    let mut agent = Agent::start_with_db(&pair.b, "vb", &dir, &db, &[])?;
    ensure!(
        agent
            .log()
            .contains("migrated the history (5000 samples) from schema version 1 to 2"),
        "no migration logged: {}",
        agent.log()
    );
    // The old rows are all there, and the chunk index finds them by port,
    // by address and by time.
    let old = rows(&agent, &pair.b, "port=7777")?;
    ensure!(
        totals(&old) == (old_rows as u64, old_bytes as u64),
        "old rows {:?}",
        totals(&old)
    );
    let one = rows(&agent, &pair.b, "ip=10.9.1.44")?;
    ensure!(
        one.len() == 1 && one[0]["src_port"] == 40_000 + 256 + 44,
        "{one:?}"
    );
    let window = rows(
        &agent,
        &pair.b,
        &format!("since={}&until={}", base + 100, base + 200),
    )?;
    ensure!(
        window.len() == 100,
        "{} rows in a 100 ms window of the old history",
        window.len()
    );
    let (_, uncaptured, _) = agent.get_bytes(
        &pair.b,
        "/api/history.pcap?port=7777",
        "x-lightshark-uncaptured",
    )?;
    ensure!(
        uncaptured.as_deref() == Some("5000"),
        "uncaptured {uncaptured:?}"
    );

    // New traffic lands after the old rows, with its headers.
    ensure!(udp_burst(&pair.a, &pair.b, A4, B4, 6100, 5, 10)? == 5);
    wait_rows(&agent, &pair.b, "port=6100", 5)?;
    let new = rows(&agent, &pair.b, "port=6100")?;
    ensure!(
        new.iter().all(|r| r["id"].as_i64().unwrap() > old_rows),
        "{new:?}"
    );
    let (_, uncaptured, _) = agent.get_bytes(
        &pair.b,
        "/api/history.pcap?port=6100",
        "x-lightshark-uncaptured",
    )?;
    ensure!(
        uncaptured.as_deref() == Some("0"),
        "uncaptured {uncaptured:?}"
    );
    ensure!(agent.stop(libc::SIGTERM)?.code == Some(0));

    let conn = rusqlite::Connection::open(&db)?;
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let kept: i64 = conn.query_row(
        "SELECT count(*) FROM samples WHERE dst_port = 7777",
        [],
        |r| r.get(0),
    )?;
    let check: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
    ensure!(
        (version, kept, check.as_str()) == (2, old_rows, "ok"),
        "{version} {kept} {check}"
    );
    Ok(())
}
