//! The benchmark behind `cargo xtask bench`: every figure measured in one
//! run, side by side, on veths in namespaces it creates, as ratios against
//! the same traffic with no monitor; written to BENCHMARKS.md.
//!
//! `--tiny` runs every part on a small size, for the test that checks the
//! command end to end; its figures mean nothing.

use std::{
    fmt::Write as _,
    fs,
    io::Write as _,
    net::UdpSocket,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _};
use lightshark::{
    clock::WallClock,
    samples::{Batch, ReaderStats},
    store::{SampleStore, Writer, WriterSetup, WriterStats},
};
use lightshark_common::{FlowKey, Sample, FAMILY_IPV4};
use lightshark_tests::*;
use serde_json::Value;

mod profile;
use profile::{is_agent_thread, is_classifier, Profile};

/// How big a run is.
struct Size {
    reps: usize,
    tcp_seconds: u32,
    small_frames: u64,
    sustained_pps: u64,
    sustained_seconds: u64,
    flows: u32,
    store_rows: u64,
    latency_seconds: u32,
}

const FULL: Size = Size {
    reps: 10,
    tcp_seconds: 10,
    small_frames: 2_000_000,
    sustained_pps: 200_000,
    sustained_seconds: 10,
    flows: 100_000,
    store_rows: 10_000_000,
    latency_seconds: 10,
};

const TINY: Size = Size {
    reps: 1,
    tcp_seconds: 1,
    small_frames: 20_000,
    sustained_pps: 20_000,
    sustained_seconds: 1,
    flows: 1_000,
    store_rows: 50_000,
    latency_seconds: 1,
};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let tiny = args.iter().any(|a| a == "--tiny");
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("BENCHMARKS.md"));
    let size = if tiny { &TINY } else { &FULL };
    let work = TempDir::new("bench")?;
    let started = Instant::now();
    let mut report = Report::default();
    eprintln!("bench: TCP throughput");
    tcp_throughput(size, &mut report)?;
    eprintln!("bench: small packets");
    small_packets(size, &work, &mut report)?;
    eprintln!("bench: flow scale");
    flow_scale(size, &work, &mut report)?;
    eprintln!("bench: storage");
    storage(size, &work, &mut report)?;
    eprintln!("bench: API under load");
    api_under_load(size, &mut report)?;
    let text = report.render(tiny, started.elapsed());
    fs::write(&out, text).with_context(|| format!("writing {}", out.display()))?;
    eprintln!(
        "bench: wrote {} in {:.0?}",
        out.display(),
        started.elapsed()
    );
    Ok(())
}

/// The sections of BENCHMARKS.md, filled as the parts run.
#[derive(Default)]
struct Report {
    sections: Vec<String>,
    verdicts: Vec<(String, bool, String)>,
}

impl Report {
    fn section(&mut self, title: &str, body: String) {
        self.sections.push(format!("## {title}\n\n{body}"));
    }

    fn target(&mut self, what: &str, met: bool, detail: String) {
        self.verdicts.push((what.to_owned(), met, detail));
    }

    fn render(&self, tiny: bool, took: Duration) -> String {
        let mut s = String::from("# Benchmarks\n\n");
        if tiny {
            s.push_str(
                "**Tiny run (`--tiny`): a check that the benchmark runs, not a measurement.**\n\n",
            );
        }
        let _ = writeln!(
            s,
            "One run of `cargo xtask bench` ({:.0} s), on this machine: {} cores, kernel {}. \
             Every ratio divides a median by the median of the same traffic with no monitor, \
             measured in the same run with the configurations interleaved. Traffic runs between \
             two network namespaces over a veth pair; the monitor watches the receiving end.\n",
            took.as_secs_f64(),
            thread::available_parallelism().map_or(0, |n| n.get()),
            fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
        );
        s.push_str("## Targets\n\n| target | met | measured |\n|---|---|---|\n");
        for (what, met, detail) in &self.verdicts {
            let _ = writeln!(
                s,
                "| {what} | {} | {detail} |",
                if *met { "yes" } else { "**no**" }
            );
        }
        s.push('\n');
        for sec in &self.sections {
            s.push_str(sec);
            s.push('\n');
        }
        s
    }
}

/// Median and range of a set of measurements.
fn spread(v: &[f64]) -> (f64, f64, f64) {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let median = if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    (median, v[0], v[v.len() - 1])
}

/// The monitor on the receiving veth during one measurement.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Monitor {
    None,
    LightShark,
    /// History of about 1 packet in [`SAMPLE_RATE`]: what the kernel
    /// program and the agent cost when storage is not the limit.
    Sampled,
    /// The agent started and then stopped with SIGSTOP: the kernel program
    /// still counts every packet and fills the ring, and nothing in user
    /// space runs, so this is what the kernel side alone costs.
    KernelOnly,
    Tcpdump,
}

/// `--sample-rate` of [`Monitor::Sampled`].
const SAMPLE_RATE: &str = "100";

impl Monitor {
    const ALL: [Monitor; 5] = [
        Monitor::None,
        Monitor::LightShark,
        Monitor::Sampled,
        Monitor::KernelOnly,
        Monitor::Tcpdump,
    ];

    fn label(self) -> &'static str {
        match self {
            Monitor::None => "none",
            Monitor::LightShark => "LightShark (`lightshark-mini -i vb`, history on)",
            Monitor::Sampled => "LightShark sampling (`lightshark-mini -i vb --sample-rate 100`)",
            Monitor::KernelOnly => {
                "LightShark's kernel program alone (the agent above, stopped with SIGSTOP; control)"
            }
            Monitor::Tcpdump => "tcpdump (`tcpdump -i vb -n -w /dev/null`)",
        }
    }
}

/// A running monitor; stopped on drop.
enum Running {
    None,
    Agent(Box<Agent>),
    /// Stopped with SIGSTOP; dropping the agent kills it all the same.
    Stopped {
        _agent: Box<Agent>,
    },
    Tcpdump(Child),
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Running::Tcpdump(child) = self {
            // SAFETY: SIGINT to the tcpdump we spawned.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            let _ = child.wait();
        }
    }
}

fn start(
    monitor: Monitor,
    pair: &VethPair,
    dir: &TempDir,
    extra: &[&str],
) -> anyhow::Result<Running> {
    Ok(match monitor {
        Monitor::None => Running::None,
        Monitor::LightShark | Monitor::Sampled | Monitor::KernelOnly => {
            let _ = fs::remove_file(dir.path.join("traffic.db"));
            let mut args = extra.to_vec();
            if monitor == Monitor::Sampled {
                args.extend(["--sample-rate", SAMPLE_RATE]);
            }
            let agent = Box::new(Agent::start(&pair.b, "vb", dir, &args)?);
            if monitor == Monitor::KernelOnly {
                let pid = agent.pid().context("agent pid")?;
                // SAFETY: SIGSTOP to the agent we started.
                ensure!(
                    unsafe { libc::kill(pid as i32, libc::SIGSTOP) } == 0,
                    "stopping the agent"
                );
                Running::Stopped { _agent: agent }
            } else {
                Running::Agent(agent)
            }
        }
        Monitor::Tcpdump => {
            let mut child = pair
                .b
                .command("tcpdump")
                .args(["-i", "vb", "-n", "-w", "/dev/null"])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()?;
            let mut err = child.stderr.take().context("tcpdump stderr")?;
            let mut seen = Vec::new();
            let mut b = [0u8; 1];
            while !String::from_utf8_lossy(&seen).contains("listening on") {
                ensure!(std::io::Read::read(&mut err, &mut b)? == 1, "tcpdump ended");
                seen.push(b[0]);
            }
            thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
            Running::Tcpdump(child)
        }
    })
}

fn tcp_throughput(size: &Size, report: &mut Report) -> anyhow::Result<()> {
    let pair = VethPair::new(true)?;
    let dir = TempDir::new("tcp")?;
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); Monitor::ALL.len()];
    // For the LightShark runs: the agent's share of one core, its dropped
    // samples, and iperf3's own CPU figures (sender, receiver).
    let mut agent_cpu = Vec::new();
    let mut dropped = 0;
    let mut iperf_cpu = Vec::new();
    for _ in 0..size.reps {
        for (i, m) in Monitor::ALL.into_iter().enumerate() {
            let running = start(m, &pair, &dir, &["--quiet"])?;
            let agent = match &running {
                Running::Agent(a) if m == Monitor::LightShark => Some((a.pid().context("pid")?, a)),
                _ => None,
            };
            let cpu0 = agent.map(|(pid, _)| cpu_seconds(pid)).transpose()?;
            let (gbps, v) = iperf(&pair, size.tcp_seconds)?;
            results[i].push(gbps);
            if let (Some((pid, a)), Some(c0)) = (agent, cpu0) {
                agent_cpu.push((cpu_seconds(pid)? - c0) / f64::from(size.tcp_seconds) * 100.0);
                let (stats, _) = quiet_stats(a, &pair.b, "vb")?;
                dropped += ledger_dropped(&stats["samples"]);
                let cpu = &v["end"]["cpu_utilization_percent"];
                iperf_cpu.push((
                    cpu["host_total"].as_f64().unwrap_or(0.0),
                    cpu["remote_total"].as_f64().unwrap_or(0.0),
                ));
            }
        }
    }
    let none = spread(&results[0]).0;
    let mut body = format!(
        "`iperf3 -c B -t {} -P 4` over a veth with segmentation offload on (the default), {} repetitions \
         of each configuration, interleaved.\n\n| monitor on the receiving veth | Gbit/s median [min-max] | ratio |\n|---|---|---|\n",
        size.tcp_seconds, size.reps
    );
    let (mut lightshark_ratio, mut sampled_ratio, mut kernel_ratio) = (0.0, 0.0, 0.0);
    for (i, m) in Monitor::ALL.into_iter().enumerate() {
        let (med, lo, hi) = spread(&results[i]);
        let ratio = med / none;
        match m {
            Monitor::LightShark => lightshark_ratio = ratio,
            Monitor::Sampled => sampled_ratio = ratio,
            Monitor::KernelOnly => kernel_ratio = ratio,
            _ => {}
        }
        let _ = writeln!(
            body,
            "| {} | {med:.1} [{lo:.1}-{hi:.1}] | {ratio:.2} |",
            m.label()
        );
    }
    let (_, lo, hi) = spread(&results[0]);
    let _ = writeln!(
        body,
        "\nThe no-monitor runs alone span {:.0}% of their median. The sampling row runs the same \
         kernel program with the same exact counters and keeps about 1 sample in {SAMPLE_RATE}: \
         its {sampled_ratio:.2} against history-on's {lightshark_ratio:.2} is what storing every \
         packet costs. The control row keeps the kernel program attached and stops the agent: \
         its {kernel_ratio:.2} is what the kernel side costs, and the distance from it to \
         history-on is the agent's user-space work.",
        (hi - lo) / none * 100.0
    );
    let (cpu_med, cpu_lo, cpu_hi) = spread(&agent_cpu);
    let sender = spread(&iperf_cpu.iter().map(|c| c.0).collect::<Vec<_>>()).0;
    let receiver = spread(&iperf_cpu.iter().map(|c| c.1).collect::<Vec<_>>()).0;
    let _ = writeln!(
        body,
        "\n**Where the time goes.** In the LightShark runs the agent used {cpu_med:.0}% of one core \
         (median, [{cpu_lo:.0}-{cpu_hi:.0}]; it runs at SCHED_IDLE) and dropped {dropped} samples in \
         all; iperf3 reports its sender at {sender:.0}% and its receiver at {receiver:.0}% CPU. \
         The kernel program runs once per GSO packet (about 45 wire segments), so its own cost is \
         small here: on this 2-core machine the sender, the receiver and the softirq work already \
         compete for both cores, and whatever the agent takes, even at idle priority (wakeups, \
         cache), comes out of the same two cores."
    );
    tcp_profile(size, &pair, &dir, &mut body)?;
    report.target(
        "TCP throughput with LightShark >= 0.97 of none",
        lightshark_ratio >= 0.97,
        format!("{lightshark_ratio:.2}"),
    );
    report.section("1. TCP throughput", body);
    Ok(())
}

/// One iperf3 run from A to B: Gbit/s received and iperf3's JSON report.
fn iperf(pair: &VethPair, seconds: u32) -> anyhow::Result<(f64, Value)> {
    let mut server = pair
        .b
        .command("iperf3")
        .args(["-s", "-1", "-B", B4])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    wait_listening(&pair.b, 5201)?;
    let t = seconds.to_string();
    let out = pair
        .a
        .exec("iperf3", &["-c", B4, "-t", &t, "-P", "4", "-J"])?;
    server.wait()?;
    let v: Value = serde_json::from_slice(&out.stdout)?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 JSON")?;
    Ok((bps / 1e9, v))
}

/// One more TCP run with no monitor and one with LightShark, each under
/// perf: where both cores' time went.
fn tcp_profile(
    size: &Size,
    pair: &VethPair,
    dir: &TempDir,
    body: &mut String,
) -> anyhow::Result<()> {
    let ((none_gbps, _), none) =
        Profile::record(&dir.path, "tcp-none", || iperf(pair, size.tcp_seconds))?;
    let running = start(Monitor::LightShark, pair, dir, &["--quiet"])?;
    let ((ls_gbps, _), ls) = Profile::record(&dir.path, "tcp-lightshark", || {
        iperf(pair, size.tcp_seconds)
    })?;
    let Running::Agent(agent) = &running else {
        bail!("no agent")
    };
    let (stats, _) = quiet_stats(agent, &pair.b, "vb")?;
    let samples = stat(&stats, &["samples", "emitted"]);
    drop(running);
    let secs = f64::from(size.tcp_seconds);
    let share = |p: &Profile, f: &dyn Fn(&str) -> bool| p.thread(f) / secs * 100.0;
    let iperf3 = |c: &str| c == "iperf3";
    let idle = |c: &str| c == "swapper";
    let _ = writeln!(
        body,
        "\n**Profile** (`perf record -a -g -F 999` over one more run of each, both cores; \
         shares of one core, 200% in all): with no monitor ({none_gbps:.1} Gbit/s) iperf3 and \
         the softirq work in its threads took {:.0}% and the cores were idle {:.0}%; with \
         LightShark ({ls_gbps:.1} Gbit/s) iperf3 took {:.0}%, the cores were idle {:.0}%, and \
         the agent's threads took {:.0}% ({:.0}% of it the SQLite writer) for {samples} samples, \
         about {:.1} us of agent CPU per sample. The classifier itself took {:.1}% of a core. \
         Here, unlike the small-packet case, both cores carry the traffic (sender and receiver \
         with their softirq work), so the agent's user-space work, mostly SQLite inserts, is \
         the cost: it runs at idle priority, but it is CPU time and cache the same two cores \
         would otherwise give iperf3.",
        share(&none, &iperf3),
        share(&none, &idle),
        share(&ls, &iperf3),
        share(&ls, &idle),
        share(&ls, &is_agent_thread),
        ls.thread(|c| c == "sqlite-writer") / ls.thread(is_agent_thread).max(1e-9) * 100.0,
        ls.thread(is_agent_thread) / samples.max(1) as f64 * 1e6,
        ls.below(is_classifier) / secs * 100.0,
    );
    Ok(())
}

/// Writes a pcap of `count` 60-byte UDP frames to B (B's MAC and address),
/// cycling through `flows` source ports and addresses.
fn write_udp_pcap(path: &Path, pair: &VethPair, count: u64, flows: u32) -> anyhow::Result<()> {
    let mac = |ns: &Netns, dev: &str| -> anyhow::Result<[u8; 6]> {
        let text = mac_address(ns, dev)?;
        let mut m = [0u8; 6];
        for (d, p) in m.iter_mut().zip(text.split(':')) {
            *d = u8::from_str_radix(p, 16)?;
        }
        Ok(m)
    };
    let (src_mac, dst_mac) = (mac(&pair.a, "va")?, mac(&pair.b, "vb")?);
    let dst: std::net::Ipv4Addr = B4.parse()?;
    let mut out = std::io::BufWriter::new(fs::File::create(path)?);
    out.write_all(&[
        0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0, 1, 0, 0, 0,
    ])?;
    for i in 0..count {
        let flow = (i % u64::from(flows)) as u32;
        // Source 10.201.<hi>.<lo> style addresses from a /16 and ports from
        // 1024 up give `flows` distinct 5-tuples.
        let src = [10, 202, (flow >> 16) as u8, (flow >> 8) as u8];
        let sport = 1024 + (flow & 0xff) as u16 * 250 + ((flow >> 8) & 0xff) as u16 % 250;
        let mut f = Vec::with_capacity(60);
        f.extend_from_slice(&dst_mac);
        f.extend_from_slice(&src_mac);
        f.extend_from_slice(&[0x08, 0x00]);
        let ip_start = f.len();
        f.extend_from_slice(&[0x45, 0, 0, 46, 0, 0, 0x40, 0, 64, 17, 0, 0]);
        f.extend_from_slice(&src);
        f.extend_from_slice(&dst.octets());
        let mut sum: u32 = f[ip_start..ip_start + 20]
            .chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        let c = !(sum as u16);
        f[ip_start + 10..ip_start + 12].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&sport.to_be_bytes());
        f.extend_from_slice(&7500u16.to_be_bytes());
        f.extend_from_slice(&[0, 26, 0, 0]);
        f.resize(60, 0);
        out.write_all(&0u32.to_le_bytes())?;
        out.write_all(&0u32.to_le_bytes())?;
        out.write_all(&60u32.to_le_bytes())?;
        out.write_all(&60u32.to_le_bytes())?;
        out.write_all(&f)?;
    }
    out.flush()?;
    Ok(())
}

/// Replays `pcap` from memory on `va`; returns (frames sent, packets/s).
fn replay(pair: &VethPair, pcap: &Path, rate: Option<u64>) -> anyhow::Result<(u64, f64)> {
    let speed = rate.map_or("--topspeed".to_owned(), |r| format!("--pps={r}"));
    let out = pair.a.exec_status(
        "tcpreplay",
        &["-K", &speed, "-i", "va", pcap.to_str().context("path")?],
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    let sent = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Successful packets:"))
        .context("tcpreplay printed no count")?
        .trim()
        .parse()?;
    // "Rated: 4411584.3 Bps, 35.29 Mbps, 73526.40 pps"
    let pps = text
        .lines()
        .find(|l| l.trim().starts_with("Rated:"))
        .and_then(|l| l.split(',').find(|p| p.trim().ends_with("pps")))
        .and_then(|p| p.trim().trim_end_matches("pps").trim().parse().ok())
        .context("tcpreplay printed no rate")?;
    Ok((sent, pps))
}

/// CPU seconds (user + system) a process has used.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = &stat[stat.rfind(')').context("stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line (11, 12 here).
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    // SAFETY: sysconf has no preconditions.
    Ok(ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64)
}

fn small_packets(size: &Size, work: &TempDir, report: &mut Report) -> anyhow::Result<()> {
    let pair = VethPair::new(true)?;
    let dir = TempDir::new("small")?;
    // A bound receiver that is never read: datagrams are delivered and then
    // dropped by its full buffer, with no ICMP errors coming back.
    let _sink = pair.b.enter(|| UdpSocket::bind((B4, 7500)))??;
    let pcap = work.path.join("small.pcap");
    write_udp_pcap(&pcap, &pair, size.small_frames, 256)?;
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); Monitor::ALL.len()];
    // The control: no monitor, and a busy loop at normal priority taking a
    // whole core, so the other core is left to the replay.
    let mut busy_rates = Vec::new();
    let mut exact = Vec::new();
    for _ in 0..size.reps {
        let busy = BusyLoop::start();
        busy_rates.push(replay(&pair, &pcap, None)?.1);
        drop(busy);
        for (i, m) in Monitor::ALL.into_iter().enumerate() {
            let running = start(m, &pair, &dir, &["--quiet"])?;
            let before = if let Running::Agent(a) = &running {
                Some(quiet_stats(a, &pair.b, "vb")?.0)
            } else {
                None
            };
            let (sent, pps) = replay(&pair, &pcap, None)?;
            rates[i].push(pps);
            if let (Running::Agent(a), Some(s0)) = (&running, before) {
                let (s, _) = quiet_stats(a, &pair.b, "vb")?;
                let counted = stat(&s, &["total_packets"]) - stat(&s0, &["total_packets"]);
                let drops = |v: &Value| ledger_dropped(&v["samples"]);
                let kept = |v: &Value| {
                    stat(v, &["samples", "stored"])
                        + drops(v)
                        + stat(v, &["samples", "sampled_out"])
                };
                exact.push(Kept {
                    monitor: m,
                    sent,
                    counted,
                    accounted: kept(&s) - kept(&s0),
                    drops: drops(&s) - drops(&s0),
                    sampled_out: stat(&s, &["samples", "sampled_out"])
                        - stat(&s0, &["samples", "sampled_out"]),
                });
            }
        }
    }
    let none = spread(&rates[0]).0;
    let mut body = format!(
        "`tcpreplay -K --topspeed -i va` of {} 60-byte UDP frames (256 flows) from memory, {} repetitions \
         of each configuration, interleaved; the rate is tcpreplay's.\n\n| monitor on the receiving veth | packets/s median [min-max] | ratio |\n|---|---|---|\n",
        size.small_frames, size.reps
    );
    let mut ls_ratio = 0.0;
    for (i, m) in Monitor::ALL.into_iter().enumerate() {
        let (med, lo, hi) = spread(&rates[i]);
        if m == Monitor::LightShark {
            ls_ratio = med / none;
        }
        let _ = writeln!(
            body,
            "| {} | {:.0} [{:.0}-{:.0}] | {:.2} |",
            m.label(),
            med,
            lo,
            hi,
            med / none
        );
    }
    let (med, lo, hi) = spread(&busy_rates);
    let busy_ratio = med / none;
    let _ = writeln!(
        body,
        "| none, with a busy loop taking one core (control) | {med:.0} [{lo:.0}-{hi:.0}] | {:.2} |",
        med / none
    );
    body.push_str(
        "\nWith the agent stopped its ring buffer fills after about 40,000 records and the \
         kernel program then counts each further sample as dropped without writing it, so that \
         row is the kernel side without most of the ring-buffer record's cost.\n",
    );
    body.push_str("\nLightShark's own count in each repetition (sent = tcpreplay's successful packets):\n\n| sample rate | sent | counted | history rows + counted drops + sampled out | of which drops | of which sampled out |\n|---|---|---|---|---|---|\n");
    let mut all_exact = true;
    for k in &exact {
        all_exact &= k.sent == k.counted && k.sent == k.accounted;
        let rate = if k.monitor == Monitor::Sampled {
            SAMPLE_RATE
        } else {
            "1"
        };
        let _ = writeln!(
            body,
            "| {rate} | {} | {} | {} | {} | {} |",
            k.sent, k.counted, k.accounted, k.drops, k.sampled_out
        );
    }
    report.target(
        "small-packet rate with LightShark >= 0.95 of none",
        ls_ratio >= 0.95,
        format!("{ls_ratio:.2}"),
    );
    report.target(
        "counted packets == sent, history rows + drops (+ sampled out) == sent",
        all_exact,
        format!("{} repetitions", exact.len()),
    );

    // Sustained rate: zero drops, and what the agent costs while it lasts.
    let frames = size.sustained_pps * size.sustained_seconds;
    let pcap_full = pcap;
    let pcap = work.path.join("sustained.pcap");
    write_udp_pcap(&pcap, &pair, frames, 256)?;
    let running = start(Monitor::LightShark, &pair, &dir, &["--quiet"])?;
    let Running::Agent(agent) = &running else {
        bail!("no agent")
    };
    let (s0, _) = quiet_stats(agent, &pair.b, "vb")?;
    let pid = agent.pid().context("agent pid")?;
    let cpu0 = cpu_seconds(pid)?;
    let (sent, pps) = replay(&pair, &pcap, Some(size.sustained_pps))?;
    let (s, _) = quiet_stats(agent, &pair.b, "vb")?;
    let cpu = cpu_seconds(pid)? - cpu0;
    let rss = status_mb(pid, "VmHWM:")?;
    let counted = stat(&s, &["total_packets"]) - stat(&s0, &["total_packets"]);
    let stored = stat(&s, &["samples", "stored"]) - stat(&s0, &["samples", "stored"]);
    let drops = ledger_dropped(&s["samples"]) - ledger_dropped(&s0["samples"]);
    let _ = writeln!(
        body,
        "\nSustained: `tcpreplay -K --pps={}` of {frames} frames with LightShark: achieved {pps:.0} packets/s, \
         sent {sent}, counted {counted}, stored {stored}, dropped {drops}.",
        size.sustained_pps
    );
    report.target(
        &format!(
            "zero samples dropped at {} packets/s for {} s",
            size.sustained_pps, size.sustained_seconds
        ),
        drops == 0 && stored == sent && counted == sent,
        format!("{drops} dropped of {sent}, {pps:.0} packets/s achieved"),
    );
    let (program_ns, ring_ns) = program_cost(pid, &work.path)?;
    drop(running);
    small_profile(&pair, &pcap_full, &dir, (none, busy_ratio), &mut body)?;
    let _ = writeln!(
        body,
        "\nRun alone on one of these frames with `bpftool prog run ... repeat 1000000` (the \
         kernel's own timing, caches warm, the ring buffer filling up), the classifier takes \
         {program_ns:.0} ns, of which {ring_ns:.0} ns are the flow-map update and the ring-buffer \
         record (a frame of an unknown ethertype takes that much less). This kernel runs with \
         `{}` (from /sys/devices/system/cpu/vulnerabilities/spec_rstack_overflow or retbleed), \
         which makes every kernel function return, and so every BPF helper and map call, \
         costlier than on bare metal.",
        mitigation()
    );
    report.section("2. Small-packet rate", body);

    let per_million = cpu / (counted.max(1) as f64 / 1e6);
    let agent_body = format!(
        "During the sustained run above ({:.0} packets/s for {} s): the agent used {cpu:.2} CPU seconds, \
         {per_million:.2} CPU seconds per million packets, and its peak RSS (VmHWM) was {rss:.1} MB.\n",
        pps, size.sustained_seconds
    );
    report.target(
        "agent peak RSS <= 64 MB at 200k packets/s",
        rss <= 64.0,
        format!("{rss:.1} MB"),
    );
    report.section("3. Agent cost", agent_body);
    Ok(())
}

/// LightShark's own account of one small-packet repetition.
struct Kept {
    monitor: Monitor,
    sent: u64,
    counted: u64,
    /// History rows, counted drops and sampled-out packets.
    accounted: u64,
    drops: u64,
    sampled_out: u64,
}

/// A thread spinning until dropped: user-space work on a core of its own.
struct BusyLoop {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl BusyLoop {
    fn start() -> BusyLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            let mut x = 0u64;
            while !flag.load(Ordering::Relaxed) {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
        });
        BusyLoop {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for BusyLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One more replay with no monitor and one with LightShark, each under perf:
/// what the monitor adds per packet on the core that sends and receives.
fn small_profile(
    pair: &VethPair,
    pcap: &Path,
    dir: &TempDir,
    (none_pps, busy_ratio): (f64, f64),
    body: &mut String,
) -> anyhow::Result<()> {
    let ((_, bare_pps), bare) =
        Profile::record(&dir.path, "small-none", || replay(pair, pcap, None))?;
    let running = start(Monitor::LightShark, pair, dir, &["--quiet"])?;
    let ((sent, pps), ls) =
        Profile::record(&dir.path, "small-lightshark", || replay(pair, pcap, None))?;
    drop(running);
    let per_packet = |secs: f64| secs / sent.max(1) as f64 * 1e9;
    let program = per_packet(ls.below(is_classifier));
    let hook = |p: &Profile| p.within(|s| s.starts_with("__netif_receive_skb_core"));
    let hook_extra = per_packet(hook(&ls) - hook(&bare)).max(0.0);
    let base = 1e9 / bare_pps;
    let predicted = base / (base + program + hook_extra);
    let _ = writeln!(
        body,
        "\n**Where the time goes.** Replay, tcpreplay and the whole receive path (softirq, TC \
         hook, classifier, UDP delivery) run on one core, so every nanosecond the kernel spends \
         per packet there comes off the rate. `perf record -a -g -F 999` over one more replay \
         with no monitor ({bare_pps:.0} packets/s, {base:.0} ns per packet) and one with \
         LightShark ({pps:.0} packets/s) gives, per packet: the classifier {program:.0} ns \
         (its own code {:.0}, flow-map lookup {:.0}, ring-buffer reserve and submit {:.0}, \
         clock {:.0}, header copy {:.0}) and the TC hook that calls it {hook_extra:.0} ns more \
         in `__netif_receive_skb_core` than with no monitor. Those alone predict a ratio of \
         {predicted:.2} (the profiled run itself: {:.2} of the no-monitor median, perf's own \
         sampling weighing on it). The agent's threads used {:.0} ns of CPU per \
         packet, at idle priority; work on the other core is not on this path, as the control \
         row above shows (a busy loop on a whole core: {:.2} of the rate). The 0.95 target \
         leaves {:.0} ns per packet for everything the monitor adds in the kernel.",
        per_packet(ls.within(is_classifier)),
        per_packet(ls.below(|s| s == "__htab_map_lookup_elem")),
        per_packet(ls.below(|s| s == "bpf_ringbuf_reserve" || s == "bpf_ringbuf_submit")),
        per_packet(ls.below(|s| s == "ktime_get_mono_fast_ns")),
        per_packet(ls.below(|s| s == "bpf_skb_load_bytes")),
        pps / none_pps,
        per_packet(ls.thread(is_agent_thread)),
        busy_ratio,
        base / 0.95 - base,
    );
    Ok(())
}

/// The kernel's return-stack mitigation, which sets the price of calls.
fn mitigation() -> String {
    ["spec_rstack_overflow", "retbleed"]
        .iter()
        .filter_map(|f| {
            fs::read_to_string(format!("/sys/devices/system/cpu/vulnerabilities/{f}")).ok()
        })
        .map(|s| s.trim().to_owned())
        .find(|s| !s.starts_with("Not affected"))
        .unwrap_or_else(|| "no return-stack mitigation".into())
}

/// Nanoseconds per run of the agent's ingress program on a 60-byte UDP
/// frame, as the kernel times `BPF_PROG_TEST_RUN`; and how much of that a
/// filtered-out frame saves (the flow-map update and the ring record).
fn program_cost(pid: u32, work: &Path) -> anyhow::Result<(f64, f64)> {
    let progs: Vec<String> = bpf_fds(pid)?
        .iter()
        .filter_map(|fd| fd.field("prog_id:"))
        .collect();
    let ingress = progs
        .iter()
        .find(|id| {
            run("bpftool", &["prog", "show", "id", id])
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("ls_eth_ingress"))
        })
        .context("the agent's ingress program")?;
    let time = |frame: &[u8]| -> anyhow::Result<f64> {
        let file = work.join("frame.bin");
        fs::write(&file, frame)?;
        let out = run(
            "bpftool",
            &[
                "prog",
                "run",
                "id",
                ingress,
                "data_in",
                file.to_str().context("path")?,
                "repeat",
                "1000000",
            ],
        )?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        text.split("duration (average): ")
            .nth(1)
            .and_then(|r| r.split("ns").next())
            .and_then(|n| n.trim().parse().ok())
            .with_context(|| format!("bpftool prog run printed: {text}"))
    };
    // The same frame as the replay's, to B; then one that no flow matches
    // (a frame of an unknown ethertype takes the parse and the totals only).
    let mut udp = vec![0u8; 60];
    udp[12..14].copy_from_slice(&[0x08, 0x00]);
    udp[14..34].copy_from_slice(&[
        0x45, 0, 0, 46, 0, 0, 0x40, 0, 64, 17, 0, 0, 10, 202, 0, 1, 10, 201, 0, 2,
    ]);
    udp[34..38].copy_from_slice(&[4, 0, 0x1d, 0x4c]);
    let full = time(&udp)?;
    let mut other = udp.clone();
    other[12..14].copy_from_slice(&[0x88, 0xb5]);
    let parse_only = time(&other)?;
    Ok((full, (full - parse_only).max(0.0)))
}

/// Memory the kernel charges for the agent's BPF maps, by map type.
fn map_memory(pid: u32) -> anyhow::Result<(f64, f64)> {
    let (mut flows, mut all) = (0.0, 0.0);
    for fd in bpf_fds(pid)? {
        if let Some(mem) = fd.field("memlock:").and_then(|m| m.parse::<f64>().ok()) {
            all += mem;
            if fd.field("map_type:").as_deref() == Some("1") {
                flows += mem;
            }
        }
    }
    Ok((flows / 1048576.0, all / 1048576.0))
}

/// wrk against `path` in `ns` with `connections` clients for `seconds`;
/// returns (p50 ms, p99 ms, requests/s, errors).
fn wrk(
    ns: &Netns,
    path: &str,
    connections: u32,
    seconds: u32,
) -> anyhow::Result<(f64, f64, f64, u64)> {
    let out = ns.exec(
        "wrk",
        &[
            "-t2",
            &format!("-c{connections}"),
            &format!("-d{seconds}s"),
            "--latency",
            &format!("http://127.0.0.1:{API_PORT}{path}"),
        ],
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    let ms = |pct: &str| -> anyhow::Result<f64> {
        let v = text
            .lines()
            .find_map(|l| l.trim().strip_prefix(pct))
            .with_context(|| format!("wrk printed no {pct}: {text}"))?
            .trim();
        let (num, unit) = v.split_at(v.find(|c: char| c.is_alphabetic()).unwrap_or(v.len()));
        let n: f64 = num.parse()?;
        Ok(match unit {
            "us" => n / 1000.0,
            "ms" => n,
            "s" => n * 1000.0,
            _ => bail!("unit {unit}"),
        })
    };
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    let errors = text
        .lines()
        .filter(|l| l.contains("Non-2xx") || l.contains("Socket errors"))
        .flat_map(|l| {
            l.split(|c: char| !c.is_ascii_digit())
                .filter_map(|n| n.parse::<u64>().ok())
        })
        .sum();
    Ok((ms("50%")?, ms("99%")?, rps, errors))
}

fn flow_scale(size: &Size, work: &TempDir, report: &mut Report) -> anyhow::Result<()> {
    let pair = VethPair::new(true)?;
    let dir = TempDir::new("flows")?;
    let _sink = pair.b.enter(|| UdpSocket::bind((B4, 7500)))??;
    let pcap = work.path.join("flows.pcap");
    write_udp_pcap(&pcap, &pair, u64::from(size.flows) * 2, size.flows)?;
    let running = start(
        Monitor::LightShark,
        &pair,
        &dir,
        &["--quiet", "--connection-timeout", "600"],
    )?;
    let Running::Agent(agent) = &running else {
        bail!("no agent")
    };
    replay(&pair, &pcap, Some(50_000))?;
    let (stats, _) = quiet_stats(agent, &pair.b, "vb")?;
    let active = stat(&stats, &["active_connections"]);
    let pid = agent.pid().context("pid")?;
    let (p50, p99, rps, errors) = wrk(&pair.b, "/api/live", 32, size.latency_seconds)?;
    let rss = status_mb(pid, "VmHWM:")?;
    let (flow_mem, all_mem) = map_memory(pid)?;
    let body = format!(
        "{} concurrent flows (distinct source address and port) replayed into the monitored veth; \
         the agent then held {active} active connections.\n\n| measure | value |\n|---|---|\n\
         | agent peak RSS (VmHWM) | {rss:.1} MB |\n| kernel flow map memory (memlock) | {flow_mem:.1} MB |\n\
         | all kernel maps (flow map, ring buffer, counters) | {all_mem:.1} MB |\n\
         | `/api/live` p50 / p99, `wrk -t2 -c32 -d{}s --latency` | {p50:.2} ms / {p99:.2} ms |\n\
         | `/api/live` requests/s, errors | {rps:.0}, {errors} |\n",
        size.flows, size.latency_seconds
    );
    report.target(
        "`/api/live` p99 <= 5 ms with 100k flows, 32 clients",
        p99 <= 5.0 && errors == 0,
        format!("{p99:.2} ms"),
    );
    report.section("4. Flow scale", body);
    Ok(())
}

fn storage(size: &Size, work: &TempDir, report: &mut Report) -> anyhow::Result<()> {
    let db = work.path.join("store.db");
    let (store, conn) = SampleStore::open(&db)?;
    drop(store);
    let queue = Arc::new(ReaderStats::default());
    let stats = Arc::new(WriterStats::default());
    let (tx, rx) = mpsc::channel();
    let writer = Writer::spawn(WriterSetup {
        conn,
        input: rx,
        queue: queue.clone(),
        stats: stats.clone(),
        retention: None,
        max_size: None,
    });
    let base_ns = WallClock::kernel_now_ns();
    let started = Instant::now();
    let mut made = 0u64;
    while made < size.store_rows {
        // Keep the queue within what the agent allows, like its reader does.
        while queue.queued.samples() > lightshark::samples::MAX_QUEUED / 2 {
            thread::sleep(Duration::from_micros(200));
        }
        let n = (size.store_rows - made).min(8192);
        // Each sample carries what the default `--capture-bytes headers`
        // keeps of a UDP datagram over IPv4 on Ethernet: 42 bytes.
        let bytes = vec![0x45u8; 42 * n as usize];
        let samples: Vec<Sample> = (made..made + n)
            .map(|i| {
                let mut key = FlowKey {
                    family: FAMILY_IPV4,
                    protocol: 17,
                    src_port: (i % 60000) as u16,
                    dst_port: 443,
                    ifindex: 2,
                    ..FlowKey::default()
                };
                key.src_addr[..4].copy_from_slice(&[10, 0, (i >> 8) as u8, i as u8]);
                key.dst_addr[..4].copy_from_slice(&[10, 1, 0, 1]);
                Sample {
                    timestamp_ns: base_ns + i * 1000,
                    key,
                    wire_len: 60,
                    segments: 1,
                    direction: 0,
                    flags: 0,
                    captured: 42,
                    _pad2: 0,
                }
            })
            .collect();
        queue.queued.add(n, n);
        tx.send(Batch {
            clock: WallClock::now(),
            samples,
            bytes,
        })?;
        made += n;
    }
    drop(tx);
    writer.finish();
    let secs = started.elapsed().as_secs_f64();
    let stored = stats.stored.samples();
    ensure!(
        stored == size.store_rows,
        "stored {stored} of {}",
        size.store_rows
    );
    let rate = stored as f64 / secs;
    {
        let c = rusqlite::Connection::open(&db)?;
        c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    }
    let bytes = fs::metadata(&db)?.len();
    let per_row = bytes as f64 / stored as f64;

    // /api/history?limit=1000 on that database, through the real agent.
    let pair = VethPair::new(true)?;
    let dir = TempDir::new("hist")?;
    let agent = Agent::start_with_db(&pair.b, "vb", &dir, &db, &["--quiet"])?;
    let (p50, p99, rps, errors) = wrk(&pair.b, "/api/history?limit=1000", 8, size.latency_seconds)?;
    // The filtered queries of the same history, each on its own.
    let (first_ts, last_ts): (i64, i64) = rusqlite::Connection::open(&db)?.query_row(
        "SELECT min(ts_ms), max(ts_ms) FROM samples",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let mid = first_ts + (last_ts - first_ts) / 2;
    let half = stored / 2;
    let queries = [
        (
            format!("/api/history?limit=1000&before={half}"),
            "a page from the middle (`before` cursor)",
        ),
        (
            format!("/api/history?limit=1000&since={mid}&until={}", mid + 50),
            "a 50 ms window in the middle",
        ),
        (
            "/api/history?limit=100&ip=10.0.3.7".to_owned(),
            "an address in 1 row of 65,536",
        ),
        (
            "/api/history?limit=100&port=12345".to_owned(),
            "a port in 1 row of 60,000",
        ),
        (
            "/api/history?limit=100&port=443&protocol=udp".to_owned(),
            "a port and protocol in every row",
        ),
        (
            format!("/api/top?by=ip&since={mid}&until={}", mid + 100),
            "`/api/top?by=ip` over 100 ms (about 100k rows)",
        ),
    ];
    let mut filtered = String::new();
    let seconds = (size.latency_seconds / 2).max(1);
    for (path, what) in &queries {
        let (q50, q99, qrps, qerr) = wrk(&pair.b, path, 8, seconds)?;
        filtered.push_str(&format!(
            "| {what}: `{path}` | {q50:.2} ms / {q99:.2} ms | {qrps:.0} | {qerr} |\n"
        ));
    }
    drop(agent);
    let body = format!(
        "The agent's own writer (`store::Writer`: one thread, prepared statement, batched transactions, \
         WAL) fed {stored} synthetic samples (each with the 42 header bytes `--capture-bytes headers` \
         keeps of a UDP datagram) as fast as it takes them.\n\n| measure | value |\n|---|---|\n\
         | sustained ingest | {rate:.0} rows/s ({secs:.1} s) |\n| bytes per stored sample (file size / rows, headers and chunk index included) | {per_row:.1} |\n\
         | `/api/history?limit=1000` p50 / p99 with {stored} rows, `wrk -t2 -c8 -d{}s --latency` | {p50:.2} ms / {p99:.2} ms |\n\
         | `/api/history?limit=1000` requests/s, errors | {rps:.0}, {errors} |\n\n\
         History queries on the same {stored} rows (`wrk -t2 -c8 -d{seconds}s --latency` each; the \
         synthetic rows span {:.1} s, one per microsecond):\n\n\
         | query | p50 / p99 | requests/s | errors |\n|---|---|---|---|\n{filtered}",
        size.latency_seconds,
        (last_ts - first_ts) as f64 / 1000.0
    );
    report.target(
        "SQLite ingest >= 300k rows/s",
        rate >= 300_000.0,
        format!("{rate:.0} rows/s"),
    );
    report.section("5. Storage", body);
    Ok(())
}

/// The API under the load of tests/load.rs, for its peak memory.
fn api_under_load(size: &Size, report: &mut Report) -> anyhow::Result<()> {
    let pair = VethPair::new(false)?;
    let dir = TempDir::new("load")?;
    let agent = Agent::start(&pair.b, "vb", &dir, &["--quiet"])?;
    let seconds = size.latency_seconds * 3;
    let load = api_load(&pair, &dir, seconds)?;
    let rss = status_mb(agent.pid().context("pid")?, "VmHWM:")?;
    let body = format!(
        "`wrk -t2 -c64 -d{seconds}s` cycling through `/api/live`, `/api/stats` and \
         `/api/history?limit=1000` while 5,000 UDP datagrams a second flow through the monitored \
         veth (the load of tests/load.rs, whose memory cap is 256 MB, the sidecar's limit in \
         deploy/kubernetes/deployment.yaml).\n\n| measure | value |\n|---|---|\n\
         | requests | {} ({:.0}/s) |\n| any non-2xx answer or socket error | {} |\n\
         | agent peak RSS (VmHWM) | {rss:.1} MB |\n",
        load.requests,
        load.requests as f64 / f64::from(seconds),
        if load.errors { "yes" } else { "no" },
    );
    report.target(
        "API load: no errors, peak RSS under 256 MB",
        !load.errors && rss < 256.0,
        format!("{rss:.1} MB"),
    );
    report.section("6. API under load", body);
    Ok(())
}
