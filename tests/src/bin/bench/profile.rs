//! Where the CPU time of one measurement went, from the kernel's own
//! sampler: `perf record -a -g` over both cores while the traffic runs. On
//! this VM perf has no hardware counters, so it samples on a timer; every
//! sample still names the thread (comm) and the call chain it interrupted.

use std::{
    collections::HashMap,
    path::Path,
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use anyhow::{ensure, Context as _};
use lightshark_tests::run;

/// Samples per second and core.
const FREQUENCY: f64 = 999.0;

/// A finished recording, summarised.
pub struct Profile {
    /// Samples in all, over both cores.
    total: f64,
    /// Share (percent) of the samples in each symbol or below it.
    children: HashMap<String, f64>,
    /// Share (percent) of the samples in each symbol itself.
    own: HashMap<String, f64>,
    /// Share (percent) of the samples by thread name.
    comms: HashMap<String, f64>,
}

impl Profile {
    /// Runs `work` while perf samples every core; `name` names the data
    /// file under `dir`.
    pub fn record<T>(
        dir: &Path,
        name: &str,
        work: impl FnOnce() -> anyhow::Result<T>,
    ) -> anyhow::Result<(T, Profile)> {
        let data = dir.join(format!("{name}.perf"));
        let mut perf = Command::new("perf")
            .args([
                "record",
                "-q",
                "-a",
                "-g",
                "-F",
                &format!("{FREQUENCY}"),
                "-o",
            ])
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting perf (is linux-perf installed? `cargo xtask setup --test-tools`)")?;
        // perf opens its events within a few milliseconds of starting.
        thread::sleep(Duration::from_millis(500));
        let result = work();
        // SAFETY: SIGINT to the perf we spawned; it then writes its file.
        unsafe { libc::kill(perf.id() as i32, libc::SIGINT) };
        let status = perf.wait()?;
        let out = result?;
        ensure!(data.is_file(), "perf record wrote no data ({status})");
        Ok((out, Profile::read(&data)?))
    }

    fn read(data: &Path) -> anyhow::Result<Profile> {
        let file = data.to_str().context("path")?;
        let report = |extra: &[&str]| -> anyhow::Result<String> {
            let mut args = vec!["report", "-i", file, "-q", "--stdio", "-g", "none"];
            args.extend_from_slice(extra);
            Ok(String::from_utf8_lossy(&run("perf", &args)?.stdout).into_owned())
        };
        let mut children = HashMap::new();
        let mut own = HashMap::new();
        // "    8.07%     2.33%  [k] bpf_prog_..._ls_eth_ingress"
        for line in report(&["--children", "--sort", "sym"])?.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if let [c, s, _, sym, ..] = f[..] {
                if let (Some(c), Some(s)) = (percent(c), percent(s)) {
                    *children.entry(sym.to_owned()).or_insert(0.0) += c;
                    *own.entry(sym.to_owned()).or_insert(0.0) += s;
                }
            }
        }
        // "    82.90%         12345  iperf3"
        let mut comms = HashMap::new();
        let mut total = 0.0;
        for line in report(&["--no-children", "-n", "--sort", "comm"])?.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if let [p, n, comm @ ..] = &f[..] {
                if let (Some(p), Ok(n)) = (percent(p), n.parse::<f64>()) {
                    comms.insert(comm.join(" "), p);
                    total += n;
                }
            }
        }
        ensure!(total > 0.0, "perf recorded no samples in {file}");
        Ok(Profile {
            total,
            children,
            own,
            comms,
        })
    }

    /// CPU seconds spent in the symbols `matches` picks, with what they call.
    pub fn below(&self, matches: impl Fn(&str) -> bool) -> f64 {
        self.seconds(&self.children, matches)
    }

    /// CPU seconds spent in the symbols `matches` picks themselves.
    pub fn within(&self, matches: impl Fn(&str) -> bool) -> f64 {
        self.seconds(&self.own, matches)
    }

    /// CPU seconds of the threads whose name `matches` picks.
    pub fn thread(&self, matches: impl Fn(&str) -> bool) -> f64 {
        self.seconds(&self.comms, matches)
    }

    fn seconds(&self, shares: &HashMap<String, f64>, matches: impl Fn(&str) -> bool) -> f64 {
        let share = shares
            .iter()
            .filter(|(k, _)| matches(k))
            .fold(0.0, |sum, (_, v)| sum + v);
        share / 100.0 * self.total / FREQUENCY
    }
}

fn percent(field: &str) -> Option<f64> {
    field.strip_suffix('%')?.parse().ok()
}

/// The classifier's symbol in a profile (the JIT names it after the
/// program).
pub fn is_classifier(symbol: &str) -> bool {
    symbol.starts_with("bpf_prog_") && symbol.contains("_ls_")
}

/// The agent's own threads.
pub fn is_agent_thread(comm: &str) -> bool {
    [
        "sqlite-writer",
        "ring-reader",
        "flow-poller",
        "tokio-rt-worker",
        "lightshark-mini",
    ]
    .contains(&comm)
}
