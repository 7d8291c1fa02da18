//! `GET /metrics` scraped from the real agent, read with a real parser
//! (prometheus-client's `text_string_to_metric_families`) and linted with
//! `promtool check metrics`; every counter checked against a count made
//! without the agent (the veth's own counters, what the test sent). And the
//! shipped Prometheus scrape config and Grafana dashboard checked against
//! what a running agent really serves.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::Write as _,
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _};
use lightshark_tests::*;
use serde_json::{json, Value};

/// What the agent must answer a scrape with.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// The protocol classes the README documents, each a `protocol` label.
const CLASSES: [&str; 7] = ["tcp", "udp", "icmp", "icmpv6", "sctp", "other_ip", "non_ip"];
const PACKETS: &str = "lightshark_packets_total";
const BYTES: &str = "lightshark_bytes_total";

/// prometheus-client's parser: each sample of the exposition on stdin as
/// one JSON object.
const PARSER: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        out.append({"type": family.type, "name": s.name, "labels": s.labels, "value": s.value})
json.dump(out, sys.stdout)
"#;

/// One sample of a scrape.
#[derive(Debug)]
struct Sample {
    kind: String,
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

impl Sample {
    /// `name{label="value",...}`, a key that names one series.
    fn series(&self) -> String {
        let labels: Vec<String> = self
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v:?}"))
            .collect();
        format!("{}{{{}}}", self.name, labels.join(","))
    }
}

/// A scrape: its text and its samples as the parser read them.
struct Scrape {
    text: String,
    samples: Vec<Sample>,
}

impl Scrape {
    fn parse(text: String) -> anyhow::Result<Scrape> {
        let out = pipe("python3", &["-c", PARSER], &text)?;
        let parsed: Vec<Value> = serde_json::from_slice(&out.stdout)?;
        let samples = parsed
            .into_iter()
            .map(|s| -> anyhow::Result<Sample> {
                Ok(Sample {
                    kind: s["type"].as_str().context("type")?.to_owned(),
                    name: s["name"].as_str().context("name")?.to_owned(),
                    labels: serde_json::from_value(s["labels"].clone())?,
                    value: s["value"].as_f64().context("value")?,
                })
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Scrape { text, samples })
    }

    /// The samples of `name` whose labels include `labels`.
    fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&str, &str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// The value of the one sample `name` with exactly `labels`.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
        let found: Vec<&Sample> = self
            .matching(name, labels)
            .filter(|s| s.labels.len() == labels.len())
            .collect();
        ensure!(
            found.len() == 1,
            "{name} {labels:?}: {} samples in\n{}",
            found.len(),
            self.text
        );
        Ok(found[0].value)
    }

    /// The sum of the samples of `name` whose labels include `labels` (0
    /// when there are none).
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    /// How much the one sample `name{labels}` grew since `earlier` (where
    /// a series that was not there yet counts 0).
    fn delta(&self, earlier: &Scrape, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<u64> {
        let grown = self.get(name, labels)? - earlier.sum(name, labels);
        ensure!(grown >= 0.0, "{name} {labels:?} went down by {}", -grown);
        Ok(grown as u64)
    }
}

/// Runs `program` with `input` on its stdin; fails with its stderr.
fn pipe(program: &str, args: &[&str], input: &str) -> anyhow::Result<Output> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {program} (`cargo xtask setup --test-tools`)"))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "{program} {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out)
}

/// `method` on `path` with `headers`: status, Content-Type and body text.
fn fetch(
    agent: &Agent,
    ns: &Netns,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<(u16, String, String)> {
    let (status, kind, body) = agent.request_bytes(ns, method, path, headers, "content-type")?;
    Ok((
        status,
        kind.unwrap_or_default(),
        String::from_utf8(body).context("a body that is not UTF-8")?,
    ))
}

/// GET /metrics with `headers`; must answer 200 in the exposition format.
fn scrape_as(agent: &Agent, ns: &Netns, headers: &[(&str, &str)]) -> anyhow::Result<Scrape> {
    let (status, kind, text) = fetch(agent, ns, "GET", "/metrics", headers)?;
    ensure!(status == 200, "/metrics answered {status}: {text}");
    ensure!(kind == CONTENT_TYPE, "/metrics Content-Type {kind:?}");
    Scrape::parse(text)
}

fn scrape(agent: &Agent, ns: &Netns) -> anyhow::Result<Scrape> {
    scrape_as(agent, ns, &[])
}

/// Every counter of `earlier` is in `later`, and not smaller.
fn monotonic(earlier: &Scrape, later: &Scrape, what: &str) -> anyhow::Result<usize> {
    let after: BTreeMap<String, f64> = later
        .samples
        .iter()
        .map(|s| (s.series(), s.value))
        .collect();
    let mut checked = 0;
    for s in earlier.samples.iter().filter(|s| s.kind == "counter") {
        let key = s.series();
        let now = after
            .get(&key)
            .with_context(|| format!("{what}: {key} gone"))?;
        ensure!(
            *now >= s.value,
            "{what}: {key} went from {} to {now}",
            s.value
        );
        checked += 1;
    }
    Ok(checked)
}

/// Bytes of the database file and its -wal, as the filesystem has them.
fn disk_bytes(db: &Path) -> u64 {
    let wal = PathBuf::from(format!("{}-wal", db.display()));
    [db, wal.as_path()]
        .iter()
        .filter_map(|p| fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

/// A raw IPv4 socket of `protocol`, opened in `ns`.
fn raw_socket(ns: &Netns, protocol: i32) -> anyhow::Result<OwnedFd> {
    let fd = ns.enter(|| unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, protocol) })?;
    ensure!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
    // SAFETY: a descriptor just returned by socket(), owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sends `count` IPv4 packets of `payload` bytes on a raw socket; the
/// kernel writes a 20-byte IP header.
fn send_raw_ip(sock: &OwnedFd, dst: Ipv4Addr, count: usize, payload: usize) -> anyhow::Result<()> {
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(dst).to_be(),
        },
        sin_zero: [0; 8],
    };
    let data = vec![0x3cu8; payload];
    for _ in 0..count {
        // SAFETY: sendto on a socket we own, from a buffer and address that
        // outlive the call.
        let n = unsafe {
            libc::sendto(
                sock.as_raw_fd(),
                data.as_ptr().cast(),
                data.len(),
                0,
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            )
        };
        ensure!(n >= 0, "raw send: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Ten echo requests from `ns` to `target` (56 data bytes), all answered.
fn ping10(ns: &Netns, target: &str) -> anyhow::Result<()> {
    let out = ns.exec(
        "ping",
        &["-c", "10", "-i", "0.05", "-W", "2", "-s", "56", target],
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(text.contains("10 received"), "ping {target}: {text}");
    Ok(())
}

#[test]
fn metrics_match_the_link_counters_and_the_traffic_sent() -> anyhow::Result<()> {
    let pair = VethPair::new(false)?;
    let dir = TempDir::new("metrics")?;
    let started = Instant::now();
    let agent = Agent::start(&pair.b, "vb", &dir, &["--flow-map-size", "4096"])?;
    // A second agent on the same link that keeps UDP only, and deletes its
    // history after a second: its filter and retention counters have an
    // independent count too.
    let udp_db = dir.path.join("udp.db");
    let udp_only = Agent::start_on(
        &pair.b,
        "vb",
        &dir,
        &udp_db,
        API_PORT + 1,
        &["--filter-protocol", "UDP", "--data-retention", "1"],
    )?;
    let ((m0, u0), base) = quiet_read(&pair.b, "vb", || {
        Ok((scrape(&agent, &pair.b)?, scrape(&udp_only, &pair.b)?))
    })?;

    // Known traffic, each kind with its frame size: UDP both ways, ICMP
    // and ICMPv6 echoes, an unassigned IP protocol (253) that a raw socket
    // in B absorbs (so no "protocol unreachable" answers), raw non-IP
    // frames, and a TCP transfer whose packets only the link counts.
    let (n_in, n_out) = (400u64, 250u64);
    ensure!(udp_burst(&pair.a, &pair.b, A4, B4, 5353, n_in as usize, 100)? == n_in as usize);
    ensure!(udp_burst(&pair.b, &pair.a, B6, A6, 5354, n_out as usize, 200)? == n_out as usize);
    ping10(&pair.a, B4)?;
    ping10(&pair.a, B6)?;
    let _absorb = raw_socket(&pair.b, 253)?;
    send_raw_ip(&raw_socket(&pair.a, 253)?, B4.parse()?, 20, 40)?;
    let ethertype = 0x88b5;
    send_raw_frames(&pair.a, "va", ethertype, 25, 60)?;
    let tcp_bytes = 256 << 10;
    ensure!(tcp_transfer(&pair.a, &pair.b, B4, 5001, tcp_bytes)? == tcp_bytes);

    let ((m1, u1), after) = quiet_read(&pair.b, "vb", || {
        Ok((scrape(&agent, &pair.b)?, scrape(&udp_only, &pair.b)?))
    })?;
    let link = after.since(&base);
    pipe("promtool", &["check", "metrics"], &m1.text)?;

    // Each direction: the protocol classes add up to the link's count.
    for (direction, packets, bytes) in [
        ("ingress", link.rx_packets, link.rx_bytes),
        ("egress", link.tx_packets, link.tx_bytes),
    ] {
        let (mut p, mut b) = (0, 0);
        for class in CLASSES {
            let labels = [("direction", direction), ("protocol", class)];
            p += m1.delta(&m0, PACKETS, &labels)?;
            b += m1.delta(&m0, BYTES, &labels)?;
        }
        ensure!(
            (p, b) == (packets, bytes),
            "{direction}: classes add up to {p} packets {b} bytes, the link counted {packets} / {bytes}"
        );
    }
    for name in [PACKETS, BYTES] {
        let n = m1.matching(name, &[]).count();
        ensure!(n == 2 * CLASSES.len(), "{name} has {n} series");
    }

    // Each class against what was sent: frame = Ethernet 14 + IP + L4 + data.
    let icmp = 14 + 20 + 8 + 56;
    let icmp6 = 14 + 40 + 8 + 56;
    for (direction, class, packets, bytes) in [
        ("ingress", "udp", n_in, n_in * (14 + 20 + 8 + 100)),
        ("egress", "udp", n_out, n_out * (14 + 40 + 8 + 200)),
        ("ingress", "icmp", 10, 10 * icmp),
        ("egress", "icmp", 10, 10 * icmp),
        ("ingress", "icmpv6", 10, 10 * icmp6),
        ("egress", "icmpv6", 10, 10 * icmp6),
        ("ingress", "other_ip", 20, 20 * (14 + 20 + 40)),
        ("egress", "other_ip", 0, 0),
        ("ingress", "non_ip", 25, 25 * 60),
        ("egress", "non_ip", 0, 0),
        ("ingress", "sctp", 0, 0),
        ("egress", "sctp", 0, 0),
    ] {
        let labels = [("direction", direction), ("protocol", class)];
        let got = (
            m1.delta(&m0, PACKETS, &labels)?,
            m1.delta(&m0, BYTES, &labels)?,
        );
        ensure!(
            got == (packets, bytes),
            "{direction} {class}: (packets, bytes) {got:?}, sent {:?}",
            (packets, bytes)
        );
    }
    let tcp_in = m1.delta(&m0, BYTES, &[("direction", "ingress"), ("protocol", "tcp")])?;
    ensure!(
        tcp_in > tcp_bytes as u64,
        "ingress TCP bytes {tcp_in} < the {tcp_bytes} B transferred"
    );
    ensure!(
        m1.delta(
            &m0,
            PACKETS,
            &[("direction", "egress"), ("protocol", "tcp")]
        )? > 0
    );

    // Non-IP by ethertype: the frames sent, and the breakdown adds up.
    let et = format!("0x{ethertype:04x}");
    let non_ip = [
        m1.delta(
            &m0,
            "lightshark_non_ip_packets_total",
            &[("ethertype", &et)],
        )?,
        m1.delta(&m0, "lightshark_non_ip_bytes_total", &[("ethertype", &et)])?,
    ];
    ensure!(non_ip == [25, 25 * 60], "non-IP {et}: {non_ip:?}");
    let breakdown = m1.sum("lightshark_non_ip_packets_total", &[]);
    let classed = m1.sum(PACKETS, &[("protocol", "non_ip")]);
    ensure!(
        breakdown == classed,
        "non-IP by ethertype {breakdown} != non_ip class {classed}"
    );

    // The sample ledger: one sample per IP packet, all stored.
    let ip_packets = link.rx_packets + link.tx_packets - 25;
    let emitted = m1.delta(&m0, "lightshark_samples_emitted_total", &[])?;
    ensure!(
        emitted == ip_packets,
        "{emitted} samples emitted, {ip_packets} IP packets on the link"
    );
    let stored = m1.get("lightshark_samples_stored_total", &[])?;
    ensure!(stored == m1.get("lightshark_samples_emitted_total", &[])?);
    for cause in ["ring_buffer_full", "writer_backlog", "storage_error"] {
        ensure!(m1.get("lightshark_samples_dropped_total", &[("cause", cause)])? == 0.0);
    }
    ensure!(m1.get("lightshark_samples_pending", &[])? == 0.0);
    for reason in ["retention", "size_cap"] {
        let deleted = m1.get(
            "lightshark_history_rows_deleted_total",
            &[("reason", reason)],
        )?;
        ensure!(deleted == 0.0, "{reason} deleted {deleted} rows");
    }

    // Flows: the nine directional flows sent (UDP 2, ICMP 2, ICMPv6 2,
    // TCP 2, protocol 253 1), none refused with room for 4096.
    let active = m1.get("lightshark_active_connections", &[])?;
    ensure!(active >= 9.0, "{active} active connections");
    ensure!(m1.get("lightshark_flow_map_entries", &[])? == active);
    ensure!(m1.get("lightshark_flow_map_capacity", &[])? == 4096.0);
    ensure!(m1.get("lightshark_flow_map_full_packets_total", &[])? == 0.0);
    ensure!(m1.get("lightshark_filtered_out_packets_total", &[])? == 0.0);

    // The UDP-only agent counted the UDP sent and filtered out the rest.
    let mut udp_counted = 0;
    for s in u1.matching(PACKETS, &[]) {
        let grown = u1.delta(
            &u0,
            PACKETS,
            &[
                ("direction", &s.labels["direction"]),
                ("protocol", &s.labels["protocol"]),
            ],
        )?;
        if s.labels["protocol"] != "udp" {
            ensure!(grown == 0, "UDP-only agent counted {s:?}");
        }
        udp_counted += grown;
    }
    ensure!(
        udp_counted == n_in + n_out,
        "UDP-only agent: {udp_counted} packets"
    );
    let left_out = u1.delta(&u0, "lightshark_filtered_out_packets_total", &[])?;
    ensure!(
        left_out == link.rx_packets + link.tx_packets - udp_counted,
        "filtered out {left_out}, the link carried {} besides the UDP",
        link.rx_packets + link.tx_packets - udp_counted
    );
    ensure!(u1.delta(&u0, "lightshark_samples_emitted_total", &[])? == n_in + n_out);
    // Its retention empties the table; every stored row is then counted
    // as deleted by retention.
    let deadline = Instant::now() + Duration::from_secs(15);
    let rows = || -> anyhow::Result<i64> {
        let conn = rusqlite::Connection::open(&udp_db)?;
        Ok(conn.query_row("SELECT count(*) FROM samples", [], |r| r.get(0))?)
    };
    while rows()? > 0 {
        ensure!(Instant::now() < deadline, "retention left {} rows", rows()?);
        thread::sleep(Duration::from_millis(200));
    }
    thread::sleep(Duration::from_millis(100));
    let u2 = scrape(&udp_only, &pair.b)?;
    let u_stored = u2.get("lightshark_samples_stored_total", &[])?;
    let u_deleted = u2.get(
        "lightshark_history_rows_deleted_total",
        &[("reason", "retention")],
    )?;
    ensure!(
        u_stored >= (n_in + n_out) as f64 && u_deleted == u_stored,
        "UDP-only agent stored {u_stored} rows, retention deleted {u_deleted}, the table is empty"
    );

    // More traffic, a third scrape: every counter only grew.
    udp_burst(&pair.a, &pair.b, A4, B4, 5355, 50, 10)?;
    let (before, m2, disk_after) = {
        let before = disk_bytes(&agent.db_path);
        thread::sleep(Duration::from_millis(1500));
        let m2 = scrape(&agent, &pair.b)?;
        (before, m2, disk_bytes(&agent.db_path))
    };
    let checked = monotonic(&m0, &m1, "first to second scrape")?
        + monotonic(&m1, &m2, "second to third scrape")?
        + monotonic(&u0, &u1, "UDP-only agent")?
        + monotonic(&u1, &u2, "UDP-only agent, later")?;
    ensure!(
        m2.delta(
            &m1,
            PACKETS,
            &[("direction", "ingress"), ("protocol", "udp")]
        )? == 50
    );
    eprintln!(
        "link: rx {} / {} B, tx {} / {} B; {checked} counter series monotonic",
        link.rx_packets, link.rx_bytes, link.tx_packets, link.tx_bytes
    );

    // Gauges: database size as the filesystem has it, uptime, version.
    let size = m2.get("lightshark_database_size_bytes", &[])? as u64;
    ensure!(
        (before.min(disk_after)..=before.max(disk_after)).contains(&size) && size > 0,
        "database size {size}, the files measure {before} .. {disk_after}"
    );
    let (up1, up2) = (
        m1.get("lightshark_uptime_seconds", &[])?,
        m2.get("lightshark_uptime_seconds", &[])?,
    );
    ensure!(
        0.0 < up1 && up1 < up2 && up2 <= started.elapsed().as_secs_f64(),
        "uptime {up1} then {up2}, the test has run {:?}",
        started.elapsed()
    );
    let version = run(agent_binary().to_str().context("path")?, &["--version"])?;
    let version = String::from_utf8_lossy(&version.stdout);
    let version = version.split_whitespace().nth(1).context("version")?;
    ensure!(m2.get("lightshark_build_info", &[("version", version)])? == 1.0);
    Ok(())
}

#[test]
fn metrics_want_the_token_a_get_and_no_query() -> anyhow::Result<()> {
    let pair = VethPair::new(false)?;
    let dir = TempDir::new("metrics-auth")?;
    let agent = Agent::start(&pair.b, "vb", &dir, &["--api-token", "s3cret"])?;
    let good = [("Authorization", "Bearer s3cret")];
    for (method, path, headers, want, what) in [
        ("GET", "/metrics", &[][..], 401, "no token"),
        (
            "GET",
            "/metrics",
            &[("Authorization", "Bearer s3creT")][..],
            401,
            "a wrong token",
        ),
        ("POST", "/metrics", &good[..], 405, "POST"),
        ("DELETE", "/metrics", &good[..], 405, "DELETE"),
        (
            "GET",
            "/metrics?format=json",
            &good[..],
            400,
            "a query parameter",
        ),
    ] {
        let (status, kind, body) = fetch(&agent, &pair.b, method, path, headers)?;
        ensure!(status == want, "{what}: {status} {body}");
        ensure!(kind == "application/json", "{what}: Content-Type {kind}");
        let body: Value = serde_json::from_str(&body)?;
        let message = body["error"].as_str().unwrap_or_default();
        ensure!(!message.is_empty(), "{what}: {body}");
        if want == 400 {
            ensure!(
                message.contains("format"),
                "the 400 should name the parameter: {message}"
            );
        }
    }
    let m = scrape_as(&agent, &pair.b, &good)?;
    ensure!(m.get("lightshark_flow_map_capacity", &[])? == 131_072.0);
    let (status, _) = agent.get(&pair.b, "/api/health")?;
    ensure!(
        status == 200,
        "/api/health wants no token, answered {status}"
    );
    Ok(())
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_owned()
}

/// A YAML file as JSON, read by PyYAML.
fn yaml(path: &Path) -> anyhow::Result<Value> {
    let out = run(
        "python3",
        &[
            "-c",
            "import json, sys, yaml; json.dump(yaml.safe_load(open(sys.argv[1])), sys.stdout)",
            path.to_str().context("path")?,
        ],
    )?;
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// The agent's default API port, from its own `--help`.
fn default_port() -> anyhow::Result<u16> {
    let help = run(agent_binary().to_str().context("path")?, &["--help"])?;
    let help = String::from_utf8_lossy(&help.stdout);
    let after = help.split("--port").nth(1).context("no --port in --help")?;
    let value = after.split("[default: ").nth(1).context("no default")?;
    Ok(value.split(']').next().context("default")?.parse()?)
}

/// What `promtool check service-discovery` makes of `job` in `config`:
/// the labels of each target it keeps after relabelling.
fn discovered(config: &Path, job: &str) -> anyhow::Result<Vec<Value>> {
    let out = run(
        "promtool",
        &[
            "check",
            "service-discovery",
            // Static targets arrive at once; it would wait 30 s otherwise.
            "--timeout=2s",
            config.to_str().context("path")?,
            job,
        ],
    )?;
    let targets: Vec<Value> = serde_json::from_slice(&out.stdout)?;
    Ok(targets
        .into_iter()
        .map(|t| t["labels"].clone())
        .filter(|l| l.as_object().is_some_and(|o| !o.is_empty()))
        .collect())
}

/// promql-parser's reading of each expression: the metric names it
/// selects and the label names it matches or groups by.
const PROMQL_NAMES: &str = r#"
import json, sys
import promql_parser
def walk(node, metrics, labels):
    kind = type(node).__name__
    if kind == "VectorSelector":
        if node.name:
            metrics.add(node.name)
        groups = [node.matchers.matchers] + list(node.matchers.or_matchers or [])
        for m in (m for g in groups for m in g):
            if m.name == "__name__":
                metrics.add(m.value)
            else:
                labels.add(m.name)
        return
    for attr in ("lhs", "rhs", "expr", "vector_selector", "param"):
        child = getattr(node, attr, None)
        if child is not None:
            walk(child, metrics, labels)
    for arg in getattr(node, "args", None) or []:
        walk(arg, metrics, labels)
    modifier = getattr(node, "modifier", None)
    if kind == "AggregateExpr" and modifier is not None:
        labels.update(modifier.labels)
    if kind == "BinaryExpr" and modifier is not None:
        if modifier.matching is not None:
            labels.update(modifier.matching.labels)
        labels.update(modifier.group_labels or [])
out = {}
for expr in json.load(sys.stdin):
    metrics, labels = set(), set()
    walk(promql_parser.parse(expr), metrics, labels)
    out[expr] = {"metrics": sorted(metrics), "labels": sorted(labels)}
json.dump(out, sys.stdout)
"#;

/// `promtool check config FILE` or `promtool check rules FILE`.
fn promtool_check(what: &str, file: &Path) -> anyhow::Result<()> {
    run("promtool", &["check", what, file.to_str().context("path")?])?;
    Ok(())
}

/// Grafana's interval variables, as a fixed range PromQL parsers take.
fn without_grafana_intervals(expr: &str) -> String {
    ["$__rate_interval", "$__interval", "$__range"]
        .iter()
        .fold(expr.to_owned(), |e, v| e.replace(v, "5m"))
}

/// Every PromQL query of a Grafana dashboard: panel targets (rows
/// included) and `label_values(...)` template queries (as their selector).
fn dashboard_queries(dashboard: &Value) -> anyhow::Result<Vec<String>> {
    fn panels(list: &Value, out: &mut Vec<String>) {
        for p in list.as_array().into_iter().flatten() {
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(e) = t["expr"].as_str() {
                    out.push(without_grafana_intervals(e));
                }
            }
            panels(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    panels(&dashboard["panels"], &mut out);
    for v in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if v["type"] == "query" {
            let q = v["query"]["query"].as_str().context("template query")?;
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|r| r.rsplit_once(','))
                .with_context(|| format!("template query {q}"))?;
            out.push(inner.0.to_owned());
        }
    }
    Ok(out)
}

#[test]
fn shipped_scrape_config_and_dashboard_fit_the_agent() -> anyhow::Result<()> {
    let dir = TempDir::new("metrics-deploy")?;
    let config = yaml(&repo().join("deploy/prometheus/prometheus.yml"))?;
    let deployment = yaml(&repo().join("deploy/kubernetes/deployment.yaml"))?;
    let port = default_port()?;

    // Debian's promtool is built without Kubernetes discovery, so the pod
    // job's discovery is replaced by the targets Kubernetes would hand it
    // for the sidecar pod of deployment.yaml (one per container port, its
    // annotations as meta labels) and for a pod without annotations;
    // Prometheus's own relabelling then decides what is scraped.
    let pod = &deployment["spec"]["template"];
    let mut meta = serde_json::Map::new();
    for (k, v) in pod["metadata"]["annotations"]
        .as_object()
        .into_iter()
        .flatten()
    {
        let name: String = k
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        meta.insert(
            format!("__meta_kubernetes_pod_annotation_{name}"),
            v.clone(),
        );
    }
    meta.insert("__meta_kubernetes_namespace".into(), json!("default"));
    meta.insert("__meta_kubernetes_pod_name".into(), json!("my-api-0"));
    let ports: Vec<String> = pod["spec"]["containers"]
        .as_array()
        .context("containers")?
        .iter()
        .flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default())
        .map(|p| format!("10.244.0.7:{}", p["containerPort"]))
        .collect();
    let sidecar = pod["spec"]["containers"]
        .as_array()
        .context("containers")?
        .iter()
        .find(|c| c["name"] == "lightshark")
        .context("no lightshark container")?;
    ensure!(
        sidecar["ports"][0]["containerPort"] == port,
        "the sidecar declares port {}, the agent serves {port}",
        sidecar["ports"][0]["containerPort"]
    );
    let mut derived = config.clone();
    let jobs = derived["scrape_configs"]
        .as_array_mut()
        .context("scrape_configs")?;
    let pods = jobs
        .iter_mut()
        .find(|j| j.get("kubernetes_sd_configs").is_some())
        .context("no Kubernetes job")?;
    ensure!(pods["kubernetes_sd_configs"] == json!([{"role": "pod"}]));
    let pods_job = pods["job_name"].as_str().context("job_name")?.to_owned();
    let pods = pods.as_object_mut().context("job")?;
    pods.remove("kubernetes_sd_configs");
    pods.insert(
        "static_configs".into(),
        json!([
            {"targets": ports, "labels": meta},
            {"targets": ["10.244.0.8:8080"], "labels": {"__meta_kubernetes_pod_name": "other"}},
        ]),
    );
    let derived_path = dir.path.join("prometheus.json");
    fs::write(&derived_path, serde_json::to_vec_pretty(&derived)?)?;
    promtool_check("config", &derived_path)?;

    let mut scraped = Vec::new();
    let mut target_labels = BTreeSet::new();
    for job in config["scrape_configs"]
        .as_array()
        .context("scrape_configs")?
    {
        let name = job["job_name"].as_str().context("job_name")?;
        let targets = discovered(&derived_path, name)?;
        ensure!(
            targets.len() == 1,
            "job {name} keeps {} targets, want the one agent: {targets:?}",
            targets.len()
        );
        let t = &targets[0];
        let addr = t["__address__"].as_str().context("address")?;
        ensure!(
            addr.rsplit(':').next() == Some(&port.to_string()),
            "job {name} scrapes {addr}, the agent listens on {port}"
        );
        scraped.push(t["__metrics_path__"].as_str().context("path")?.to_owned());
        target_labels.extend(
            t.as_object()
                .into_iter()
                .flatten()
                .map(|(k, _)| k.clone())
                .filter(|k| !k.starts_with("__")),
        );
        if name == pods_job {
            ensure!(t["pod"] == "my-api-0", "the pod job kept {t}");
        }
    }

    // A running agent on that port, with some traffic so that every family
    // has samples, scraped at the path Prometheus would use.
    let pair = VethPair::new(false)?;
    let agent = Agent::start_on(&pair.b, "vb", &dir, &dir.path.join("t.db"), port, &[])?;
    ping10(&pair.a, B4)?;
    send_raw_frames(&pair.a, "va", 0x88b5, 3, 60)?;
    let (m, _) = quiet_read(&pair.b, "vb", || scrape(&agent, &pair.b))?;
    for path in &scraped {
        let (status, kind, _) = fetch(&agent, &pair.b, "GET", path, &[])?;
        ensure!(
            status == 200 && kind == CONTENT_TYPE,
            "the scrape path {path} answered {status} {kind}"
        );
    }
    let mut served: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for s in &m.samples {
        served
            .entry(&s.name)
            .or_default()
            .extend(s.labels.keys().map(String::as_str));
    }

    // The dashboard: every query parses (promql-parser, and promtool as a
    // rule) and uses only metrics the agent serves, with their labels or
    // the target labels Prometheus adds.
    let dashboard: Value = serde_json::from_str(&fs::read_to_string(
        repo().join("deploy/grafana/lightshark.json"),
    )?)?;
    let queries = dashboard_queries(&dashboard)?;
    ensure!(queries.len() >= 10, "{} queries", queries.len());
    let names: Value = serde_json::from_slice(
        &pipe(
            "python3",
            &["-c", PROMQL_NAMES],
            &serde_json::to_string(&queries)?,
        )?
        .stdout,
    )?;
    let mut used = BTreeSet::new();
    for (expr, found) in names.as_object().context("parsed")? {
        let metrics: Vec<&str> = found["metrics"]
            .as_array()
            .context("metrics")?
            .iter()
            .filter_map(Value::as_str)
            .collect();
        ensure!(!metrics.is_empty(), "{expr} selects no metric");
        let mut allowed: BTreeSet<&str> = target_labels.iter().map(String::as_str).collect();
        for metric in &metrics {
            let labels = served
                .get(metric)
                .with_context(|| format!("{expr}: the agent serves no {metric}"))?;
            allowed.extend(labels);
            used.insert(metric.to_string());
        }
        for label in found["labels"].as_array().context("labels")? {
            let label = label.as_str().context("label")?;
            ensure!(
                allowed.contains(label),
                "{expr}: label {label} is on none of {metrics:?} nor a target label"
            );
        }
    }
    let rules = json!({"groups": [{
        "name": "dashboard",
        "rules": queries
            .iter()
            .enumerate()
            .map(|(i, q)| json!({"record": format!("dashboard:query{i}"), "expr": q}))
            .collect::<Vec<_>>(),
    }]});
    let rules_path = dir.path.join("rules.json");
    fs::write(&rules_path, serde_json::to_vec(&rules)?)?;
    promtool_check("rules", &rules_path)?;
    // What the dashboard is for: rates by direction and protocol, drops,
    // flow map fill, database size, writer lag.
    for metric in [
        PACKETS,
        BYTES,
        "lightshark_samples_dropped_total",
        "lightshark_flow_map_full_packets_total",
        "lightshark_flow_map_entries",
        "lightshark_flow_map_capacity",
        "lightshark_database_size_bytes",
        "lightshark_samples_pending",
    ] {
        ensure!(used.contains(metric), "the dashboard shows no {metric}");
    }
    // Every panel queries the data source the user picks.
    ensure!(
        dashboard["templating"]["list"][0]["type"] == "datasource"
            && dashboard["templating"]["list"][0]["query"] == "prometheus"
    );
    for p in dashboard["panels"].as_array().context("panels")? {
        ensure!(
            p["datasource"]["uid"] == "${datasource}",
            "panel {} has its own data source",
            p["title"]
        );
    }
    Ok(())
}
