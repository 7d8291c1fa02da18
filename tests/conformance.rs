//! Every shared capture replayed onto a veth, and the agent's answer compared
//! flow by flow with the oracle (tshark's dissection, in
//! ../shared/corpus/oracle), under the counting rules of
//! ../shared/corpus/README.md.
//!
//! Where the oracle and the rules differ, the expected values follow the
//! rules and the frames are listed: the oracle digs through MPLS to an inner
//! IP header, the rules count a frame whose link layer carries MPLS as non-IP
//! under its ethertype. Frames no veth can carry (over 65535 bytes) are left
//! out with the reason logged.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{bail, ensure, Context as _};
use lightshark_tests::*;

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/corpus")
}

/// Frames of a classic little-endian pcap file.
fn pcap_frames(path: &Path) -> anyhow::Result<Vec<Vec<u8>>> {
    let data = fs::read(path)?;
    ensure!(
        data.len() >= 24 && data[..4] == [0xd4, 0xc3, 0xb2, 0xa1],
        "{} is not a little-endian pcap",
        path.display()
    );
    let mut frames = Vec::new();
    let mut at = 24;
    while at + 16 <= data.len() {
        let caplen = u32::from_le_bytes(data[at + 8..at + 12].try_into()?) as usize;
        at += 16;
        ensure!(at + caplen <= data.len(), "{} is cut short", path.display());
        frames.push(data[at..at + caplen].to_vec());
        at += caplen;
    }
    Ok(frames)
}

/// The ethertype after any 802.1Q / 802.1ad tags.
fn inner_ethertype(frame: &[u8]) -> Option<u16> {
    let mut off = 12;
    loop {
        let t = u16::from_be_bytes([*frame.get(off)?, *frame.get(off + 1)?]);
        if t != 0x8100 && t != 0x88a8 {
            return Some(t);
        }
        off += 4;
    }
}

/// What the agent must report for one capture.
#[derive(Default)]
struct Expected {
    flows: FlowCounts,
    non_ip: BTreeMap<String, (u64, u64)>,
    packets: u64,
    bytes: u64,
    /// Frames counted as non-IP by the rules although the oracle keys them
    /// as IP (MPLS on the link layer).
    mpls_frames: Vec<u64>,
    /// Frames left out, with why.
    skipped: Vec<String>,
}

fn expected(name: &str) -> anyhow::Result<Expected> {
    let frames = pcap_frames(&corpus().join("pcaps").join(name))?;
    let csv = fs::read_to_string(corpus().join("oracle").join(format!("{name}.packets.csv")))?;
    let mut lines = csv.lines();
    let header: Vec<&str> = lines
        .next()
        .context("empty packets.csv")?
        .split(',')
        .collect();
    let col = |n: &str| {
        header
            .iter()
            .position(|h| *h == n)
            .with_context(|| format!("no column {n}"))
    };
    let (c_frame, c_cap, c_cls, c_src, c_dst, c_sp, c_dp, c_proto, c_chain) = (
        col("frame")?,
        col("cap_len")?,
        col("cls")?,
        col("src")?,
        col("dst")?,
        col("sport")?,
        col("dport")?,
        col("proto")?,
        col("protocols")?,
    );
    let mut e = Expected::default();
    for line in lines {
        let f: Vec<&str> = line.split(',').collect();
        let number: u64 = f[c_frame].parse()?;
        let cap: u64 = f[c_cap].parse()?;
        let frame = frames
            .get(number as usize - 1)
            .context("frame missing from the pcap")?;
        ensure!(
            frame.len() as u64 == cap,
            "{name} frame {number}: oracle and pcap disagree on length"
        );
        if cap > 65535 {
            e.skipped.push(format!(
                "frame {number}: {cap} bytes, over what a veth carries (EMSGSIZE)"
            ));
            continue;
        }
        e.packets += 1;
        e.bytes += cap;
        let link = f[c_chain]
            .split(':')
            .find(|p| !matches!(*p, "eth" | "ethertype" | "vlan" | "ieee8021ad"))
            .unwrap_or("");
        let slot = if link == "mpls" {
            e.mpls_frames.push(number);
            let t = inner_ethertype(frame).context("MPLS frame without an ethertype")?;
            e.non_ip.entry(format!("0x{t:04x}")).or_default()
        } else if f[c_cls] == "nonip" {
            e.non_ip.entry(f[c_proto].to_owned()).or_default()
        } else if f[c_cls] == "ip" {
            let port = |p: &str| {
                if p.is_empty() {
                    "0".to_owned()
                } else {
                    p.to_owned()
                }
            };
            e.flows
                .entry(flow_id(
                    f[c_proto],
                    f[c_src],
                    &port(f[c_sp]),
                    f[c_dst],
                    &port(f[c_dp]),
                ))
                .or_default()
        } else {
            bail!("{name} frame {number}: unknown class {}", f[c_cls]);
        };
        slot.0 += 1;
        slot.1 += cap;
    }
    Ok(e)
}

/// One row of the printed table.
struct Row {
    file: String,
    flows_expected: usize,
    flows_matched: usize,
    packets: (u64, u64),
    bytes: (u64, u64),
    problems: Vec<String>,
}

fn replay_one(name: &str) -> anyhow::Result<Row> {
    let want = expected(name)?;
    let pair = VethPair::bare()?;
    let dir = TempDir::new("replay")?;
    let agent = Agent::start(&pair.b, "vb", &dir, &[])?;
    let pcap = corpus().join("pcaps").join(name);
    let out = pair.a.exec_status(
        "tcpreplay",
        &["--pps=5000", "-i", "va", pcap.to_str().context("path")?],
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    let sent = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Successful packets:"))
        .map_or(Ok(0), |n| n.trim().parse::<u64>())?;
    ensure!(
        sent == want.packets,
        "{name}: tcpreplay did not send the {} frames expected:\n{text}{}",
        want.packets,
        String::from_utf8_lossy(&out.stderr)
    );
    let (stats, _) = quiet_stats(&agent, &pair.b, "vb")?;
    let live = live_flows(&agent.get_ok(&pair.b, "/api/live?limit=10000")?)?;
    let rows = agent.get_ok(&pair.b, "/api/history?limit=10000")?;
    let history = history_flows(rows.as_array().context("history array")?)?;

    let mut problems = Vec::new();
    let mut matched = 0;
    for (id, counts) in &want.flows {
        let (l, h) = (live.get(id), history.get(id));
        if l == Some(counts) && h == Some(counts) {
            matched += 1;
        } else {
            problems.push(format!(
                "flow {id}: expected {counts:?}, live {l:?}, history {h:?}"
            ));
        }
    }
    for id in live.keys().filter(|id| !want.flows.contains_key(*id)) {
        problems.push(format!(
            "flow {id} reported by /api/live is not in the capture"
        ));
    }
    for id in history.keys().filter(|id| !want.flows.contains_key(*id)) {
        problems.push(format!("flow {id} in history is not in the capture"));
    }
    let got_non_ip: BTreeMap<String, (u64, u64)> = stats["non_ip"]
        .as_object()
        .context("non_ip")?
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                (
                    v["packets"].as_u64().unwrap_or(0),
                    v["bytes"].as_u64().unwrap_or(0),
                ),
            )
        })
        .collect();
    if got_non_ip != want.non_ip {
        problems.push(format!(
            "non-IP: expected {:?}, reported {got_non_ip:?}",
            want.non_ip
        ));
    }
    let packets = (want.packets, stat(&stats, &["total_packets"]));
    let bytes = (want.bytes, stat(&stats, &["total_bytes"]));
    if packets.0 != packets.1 || bytes.0 != bytes.1 {
        problems.push(format!(
            "totals: expected {packets:?} packets, {bytes:?} bytes"
        ));
    }
    if !want.mpls_frames.is_empty() {
        eprintln!("{name}: frames {:?} carry MPLS on the link layer: counted as non-IP (the oracle keys them by the inner IP header)", want.mpls_frames);
    }
    for s in &want.skipped {
        eprintln!("{name}: left out {s}");
    }
    Ok(Row {
        file: name.to_owned(),
        flows_expected: want.flows.len(),
        flows_matched: matched,
        packets,
        bytes,
        problems,
    })
}

#[test]
fn every_shared_capture_matches_the_oracle_flow_by_flow() -> anyhow::Result<()> {
    let dir = corpus().join("pcaps");
    if !dir.is_dir() {
        eprintln!(
            "SKIPPED: {} is absent; the conformance test needs the shared corpus",
            dir.display()
        );
        return Ok(());
    }
    let mut names: Vec<String> = fs::read_dir(&dir)?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".pcap"))
        .collect();
    names.sort();
    let mut rows = Vec::new();
    for name in &names {
        rows.push(replay_one(name).with_context(|| format!("replaying {name}"))?);
    }
    println!(
        "\n{:<72} {:>5} {:>5} {:>15} {:>19}",
        "file", "flows", "match", "packets exp/got", "bytes exp/got"
    );
    let mut failed = Vec::new();
    for r in &rows {
        println!(
            "{:<72} {:>5} {:>5} {:>7}/{:<7} {:>9}/{:<9}{}",
            r.file,
            r.flows_expected,
            r.flows_matched,
            r.packets.0,
            r.packets.1,
            r.bytes.0,
            r.bytes.1,
            if r.problems.is_empty() {
                ""
            } else {
                "  MISMATCH"
            }
        );
        for p in &r.problems {
            failed.push(format!("{}: {p}", r.file));
        }
    }
    let sum = |f: fn(&Row) -> u64| rows.iter().map(f).sum::<u64>();
    println!(
        "{:<72} {:>5} {:>5} {:>7}/{:<7} {:>9}/{:<9}",
        "all files",
        rows.iter().map(|r| r.flows_expected).sum::<usize>(),
        rows.iter().map(|r| r.flows_matched).sum::<usize>(),
        sum(|r| r.packets.0),
        sum(|r| r.packets.1),
        sum(|r| r.bytes.0),
        sum(|r| r.bytes.1),
    );
    ensure!(failed.is_empty(), "mismatches:\n{}", failed.join("\n"));
    Ok(())
}
