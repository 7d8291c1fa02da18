//! The benchmark command end to end on a tiny size: every part runs and the
//! report has every table. (A check that it works, not a timing.)

use std::{fs, process::Command};

use anyhow::ensure;
use lightshark_tests::TempDir;

#[test]
fn benchmark_runs_end_to_end_on_a_tiny_size() -> anyhow::Result<()> {
    let dir = TempDir::new("benchsmoke")?;
    let out = dir.path.join("BENCHMARKS.md");
    let status = Command::new(env!("CARGO_BIN_EXE_lightshark-bench"))
        .args(["--tiny", "--out"])
        .arg(&out)
        .status()?;
    ensure!(status.success(), "the benchmark failed: {status}");
    let report = fs::read_to_string(&out)?;
    for heading in [
        "## Targets",
        "## 1. TCP throughput",
        "## 2. Small-packet rate",
        "## 3. Agent cost",
        "## 4. Flow scale",
        "## 5. Storage",
        "## 6. API under load",
    ] {
        ensure!(
            report.contains(heading),
            "the report lacks {heading}:\n{report}"
        );
    }
    ensure!(
        report.matches("`perf record -a -g").count() == 2,
        "no profile of the TCP and small-packet runs:\n{report}"
    );
    ensure!(
        report
            .matches("| LightShark sampling (`lightshark-mini -i vb --sample-rate 100`) |")
            .count()
            == 2,
        "no sampling rows:\n{report}"
    );
    ensure!(
        report.matches("| none |").count() == 2,
        "no baseline rows:\n{report}"
    );
    Ok(())
}
