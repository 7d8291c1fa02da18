//! Counting that stays exact where monitors usually are not: GSO packets
//! that stand for many wire segments, interfaces without an Ethernet header,
//! and floods that overflow the ring buffer and the flow map.

use std::{
    fs::OpenOptions,
    io::{Read as _, Write as _},
    net::UdpSocket,
    os::fd::AsRawFd,
    process::Stdio,
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _};
use lightshark_tests::*;

/// The sending namespace's own count of TCP segments sent.
fn tcp_out_segs(ns: &Netns) -> anyhow::Result<u64> {
    let out = ns.exec("nstat", &["-asz", "TcpOutSegs"])?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("TcpOutSegs"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .context("nstat printed no TcpOutSegs")
}

/// A rate-limited iperf3 transfer from A to B; returns the data-direction
/// (A to B) packets and bytes the agent counted, the sender's segment count,
/// and the largest `segments` of a history row.
fn paced_transfer(offload: bool) -> anyhow::Result<(u64, u64, u64, u64)> {
    let pair = VethPair::new(offload)?;
    let dir = TempDir::new("gso")?;
    let agent = Agent::start(&pair.b, "vb", &dir, &[])?;
    let mut server = pair
        .b
        .command("iperf3")
        .args(["-s", "-1", "-B", B4, "-p", "5201"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    wait_listening(&pair.b, 5201)?;
    let (stats0, _) = quiet_stats(&agent, &pair.b, "vb")?;
    let live0 = live_flows(&agent.get_ok(&pair.b, "/api/live?limit=10000")?)?;
    let segs0 = tcp_out_segs(&pair.a)?;
    pair.a.exec(
        "iperf3",
        &["-c", B4, "-p", "5201", "-b", "200M", "-t", "3", "-l", "64K"],
    )?;
    server.wait()?;
    let segs = tcp_out_segs(&pair.a)? - segs0;
    let (stats, _) = quiet_stats(&agent, &pair.b, "vb")?;
    ensure!(
        stat(&stats, &["ring_buffer_drops"]) == stat(&stats0, &["ring_buffer_drops"]),
        "samples dropped"
    );
    let live = live_flows(&agent.get_ok(&pair.b, "/api/live?limit=10000")?)?;
    let (mut packets, mut bytes) = (0, 0);
    for (id, (p, b)) in &live {
        if id.starts_with(&format!("6 {A4} ")) && id.ends_with(&format!("{B4} 5201")) {
            let (p0, b0) = live0.get(id).copied().unwrap_or_default();
            packets += p - p0;
            bytes += b - b0;
        }
    }
    let rows = agent.get_ok(&pair.b, "/api/history?limit=10000")?;
    let max_segments = rows
        .as_array()
        .context("history")?
        .iter()
        .filter(|r| r["dst_port"] == 5201)
        .filter_map(|r| r["segments"].as_u64())
        .max()
        .unwrap_or(0);
    Ok((packets, bytes, segs, max_segments))
}

fn within_1_percent(a: u64, b: u64) -> bool {
    a.abs_diff(b) * 100 <= a.max(b)
}

#[test]
fn gso_packets_count_as_their_wire_segments() -> anyhow::Result<()> {
    let (p_on, b_on, segs_on, max_on) = paced_transfer(true)?;
    let (p_off, b_off, segs_off, max_off) = paced_transfer(false)?;
    eprintln!(
        "offload on: {p_on} packets {b_on} bytes, sender {segs_on} segments, up to {max_on} per row; \
         off: {p_off} packets {b_off} bytes, sender {segs_off} segments, up to {max_off} per row"
    );
    ensure!(
        max_on > 1,
        "offload on produced no GSO packet: the test exercised nothing"
    );
    ensure!(
        max_off == 1,
        "offload off still delivered GSO packets ({max_off} segments)"
    );
    ensure!(p_on > 10_000, "too little traffic: {p_on}");
    ensure!(
        within_1_percent(p_on, segs_on),
        "offload on: {p_on} packets counted, sender sent {segs_on} segments"
    );
    ensure!(
        within_1_percent(p_off, segs_off),
        "offload off: {p_off} packets counted, sender sent {segs_off} segments"
    );
    ensure!(
        within_1_percent(p_on, p_off),
        "packets with offload on {p_on} vs off {p_off}"
    );
    ensure!(
        within_1_percent(b_on, b_off),
        "bytes with offload on {b_on} vs off {b_off}"
    );
    Ok(())
}

/// The Internet checksum of `data`.
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 ICMP echo request with `payload` bytes of data.
fn echo_request(src: [u8; 4], dst: [u8; 4], seq: u16, payload: usize) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0, 0x12, 0x34];
    icmp.extend_from_slice(&seq.to_be_bytes());
    icmp.extend(std::iter::repeat_n(0x61, payload));
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let total = (20 + icmp.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0x40, 0, 64, 1, 0, 0]);
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    ip.extend(icmp);
    ip
}

#[test]
fn tun_interface_without_ethernet_header_is_counted_exactly() -> anyhow::Result<()> {
    let ns = Netns::new("tun")?;
    ns.exec("sysctl", &["-qw", "net.ipv6.conf.all.disable_ipv6=1"])?;
    let tun = ns.enter(|| -> anyhow::Result<std::fs::File> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")?;
        // SAFETY: TUNSETIFF reads one ifreq naming the device and its flags.
        unsafe {
            let mut req: libc::ifreq = std::mem::zeroed();
            for (d, s) in req.ifr_name.iter_mut().zip(b"lstun0") {
                *d = *s as libc::c_char;
            }
            req.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
            let rc = libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &req);
            ensure!(rc == 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
        }
        Ok(file)
    })??;
    ns.exec("ip", &["addr", "add", "10.9.0.1/24", "dev", "lstun0"])?;
    ns.exec("ip", &["link", "set", "lstun0", "up"])?;
    let dir = TempDir::new("tun")?;
    let agent = Agent::start(&ns, "lstun0", &dir, &[])?;
    let (stats0, base) = quiet_stats(&agent, &ns, "lstun0")?;

    // 20 echo requests written into the tun device arrive on lstun0; the
    // kernel's 20 replies leave through it and are read back here.
    let count = 20;
    let mut tun = tun;
    for seq in 0..count {
        tun.write_all(&echo_request([10, 9, 0, 2], [10, 9, 0, 1], seq, 64))?;
    }
    let mut replies = 0;
    let mut buf = [0u8; 2048];
    let deadline = Instant::now() + Duration::from_secs(5);
    // SAFETY: O_NONBLOCK on the tun fd we own, so reads cannot hang.
    unsafe { libc::fcntl(tun.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    while replies < count && Instant::now() < deadline {
        match tun.read(&mut buf) {
            Ok(n) if n == 92 && buf[9] == 1 && buf[20] == 0 => replies += 1,
            Ok(_) => {}
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
    ensure!(
        replies == count,
        "the kernel answered {replies} of {count} echo requests"
    );

    let (stats, link) = quiet_stats(&agent, &ns, "lstun0")?;
    let link = link.since(&base);
    ensure!(
        stat(&stats, &["total_packets"]) - stat(&stats0, &["total_packets"])
            == u64::from(count) * 2,
        "{stats}"
    );
    ensure!(
        stat(&stats, &["total_bytes"]) - stat(&stats0, &["total_bytes"])
            == link.rx_bytes + link.tx_bytes,
        "bytes {stats} vs the interface's {link:?}"
    );
    let live = live_flows(&agent.get_ok(&ns, "/api/live")?)?;
    let n = u64::from(count);
    for id in [
        flow_id("1", "10.9.0.2", "0", "10.9.0.1", "0"),
        flow_id("1", "10.9.0.1", "0", "10.9.0.2", "0"),
    ] {
        // 92 bytes: the IP packet is all there is on a tun link.
        ensure!(
            live.get(&id) == Some(&(n, n * 92)),
            "flow {id}: {:?}",
            live.get(&id)
        );
    }
    ensure!(
        stats["non_ip"].as_object().is_some_and(|m| m.is_empty()),
        "{stats}"
    );
    Ok(())
}

#[test]
fn flooding_tiny_buffers_loses_no_sample_silently() -> anyhow::Result<()> {
    let pair = VethPair::new(false)?;
    let dir = TempDir::new("flood")?;
    let mut agent = Agent::start(
        &pair.b,
        "vb",
        &dir,
        &["--ring-buffer-size", "4096", "--flow-map-size", "8"],
    )?;
    let (stats0, base) = quiet_stats(&agent, &pair.b, "vb")?;
    // A bound receiver that is never read: the datagrams arrive and are
    // dropped by its full buffer, without ICMP errors.
    let _sink = pair.b.enter(|| UdpSocket::bind((B4, 7400)))??;
    let senders: Vec<UdpSocket> = (0..64)
        .map(|_| pair.a.enter(|| UdpSocket::bind((A4, 0))))
        .collect::<Result<Result<_, _>, _>>()??;
    let payload = [0u8; 18];
    for _ in 0..1500 {
        for s in &senders {
            s.send_to(&payload, (B4, 7400))?;
        }
    }
    let (stats, link) = quiet_stats(&agent, &pair.b, "vb")?;
    let link = link.since(&base);

    // Every packet is in the totals, with or without a flow entry.
    let total = stat(&stats, &["total_packets"]) - stat(&stats0, &["total_packets"]);
    ensure!(
        total == link.rx_packets + link.tx_packets,
        "{total} counted, vb saw {link:?}"
    );
    ensure!(total >= 96_000, "the flood sent only {total} packets");
    ensure!(
        stat(&stats, &["ring_buffer_drops"]) > 0,
        "the ring never overflowed: {stats}"
    );
    ensure!(
        stat(&stats, &["flow_map_full_packets"]) > 0,
        "the map never filled: {stats}"
    );

    ledgers_balance(&stats)?;
    let health = agent.get_ok(&pair.b, "/api/health")?;
    ensure!(
        health["samples_dropped"].as_u64().unwrap_or(0) > 0,
        "health hides the drops: {health}"
    );

    let stored = stat(&stats, &["samples", "stored"]);
    let exit = agent.stop(libc::SIGTERM)?;
    ensure!(exit.code == Some(0), "exit {:?}", exit.code);
    let conn = rusqlite::Connection::open(&agent.db_path)?;
    let rows: i64 = conn.query_row("SELECT count(*) FROM samples", [], |r| r.get(0))?;
    ensure!(
        rows as u64 == stored,
        "{rows} rows in the database, {stored} reported stored"
    );
    Ok(())
}

/// Every sample the kernel emitted is stored or counted as dropped (nothing
/// is pending on a quiet link), in samples and in segments, and the samples
/// emitted and sampled out together are every IP packet counted.
fn ledgers_balance(stats: &serde_json::Value) -> anyhow::Result<()> {
    for ledger in ["samples", "sample_segments"] {
        let l = &stats[ledger];
        let accounted = stat(l, &["stored"]) + stat(l, &["pending"]) + ledger_dropped(l);
        ensure!(
            accounted == stat(l, &["emitted"]),
            "{ledger} do not balance: {l}"
        );
        ensure!(
            stat(l, &["pending"]) == 0,
            "{ledger} still pending when quiet: {l}"
        );
    }
    let non_ip: u64 = stats["non_ip"].as_object().map_or(0, |m| {
        m.values().map(|c| c["packets"].as_u64().unwrap_or(0)).sum()
    });
    let segments = &stats["sample_segments"];
    ensure!(
        stat(segments, &["emitted"]) + stat(segments, &["sampled_out"])
            == stat(stats, &["total_packets"]) - non_ip,
        "segments sampled and sampled out differ from IP packets counted: {stats}"
    );
    Ok(())
}

/// `--sample-rate 10` stores about a tenth of the packets, while every
/// total and flow counter still matches what the interface carried.
#[test]
fn sample_rate_keeps_about_one_in_n_and_counts_exactly() -> anyhow::Result<()> {
    const RATE: u64 = 10;
    const SENT: usize = 20_000;
    const PORT: u16 = 7402;
    let pair = VethPair::new(false)?;
    let dir = TempDir::new("sampling")?;
    let mut agent = Agent::start(&pair.b, "vb", &dir, &["--sample-rate", &RATE.to_string()])?;
    let (stats0, base) = quiet_stats(&agent, &pair.b, "vb")?;
    let got = udp_burst(&pair.a, &pair.b, A4, B4, PORT, SENT, 32)? as u64;
    ensure!(got == SENT as u64, "only {got} of {SENT} datagrams arrived");
    let (stats, link) = quiet_stats(&agent, &pair.b, "vb")?;
    let link = link.since(&base);

    ensure!(stat(&stats, &["sample_rate"]) == RATE, "{stats}");
    let total = stat(&stats, &["total_packets"]) - stat(&stats0, &["total_packets"]);
    ensure!(
        total == link.rx_packets + link.tx_packets,
        "{total} counted, vb saw {link:?}"
    );
    let live = live_flows(&agent.get_ok(&pair.b, "/api/live?limit=10000")?)?;
    let flow = live
        .iter()
        .find(|(id, _)| {
            id.starts_with(&format!("17 {A4} ")) && id.ends_with(&format!("{B4} {PORT}"))
        })
        .map(|(_, counts)| *counts)
        .context("the UDP flow is not live")?;
    ensure!(
        flow.0 == got,
        "the flow counted {} packets of {got}",
        flow.0
    );
    ledgers_balance(&stats)?;
    ensure!(
        stat(&stats, &["samples", "sampled_out"]) > 0,
        "nothing was sampled out: {stats}"
    );

    let exit = agent.stop(libc::SIGTERM)?;
    ensure!(exit.code == Some(0), "exit {:?}", exit.code);
    let conn = rusqlite::Connection::open(&agent.db_path)?;
    let rows: i64 = conn.query_row(
        "SELECT count(*) FROM samples WHERE protocol = 17 AND dst_port = ?1",
        [PORT],
        |r| r.get(0),
    )?;
    // Binomial(20000, 0.1): mean 2000, standard deviation 42; six of them
    // either way fails by chance about once in a billion runs.
    let (mean, spread) = (got / RATE, 6 * 42);
    ensure!(
        (rows as u64).abs_diff(mean) <= spread,
        "{rows} rows stored for {got} packets at 1 in {RATE}"
    );
    Ok(())
}
