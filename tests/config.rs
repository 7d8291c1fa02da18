//! Flags and the YAML file, through the real binary: how they combine, and
//! that every bad value stops the agent with a message naming it.

use std::{fs, process::Output};

use anyhow::{ensure, Context as _};
use lightshark_tests::*;

fn run_agent(ns: &Netns, args: &[&str]) -> anyhow::Result<Output> {
    Ok(ns
        .command(agent_binary().to_str().context("path")?)
        .args(args)
        .output()?)
}

#[test]
fn file_settings_apply_and_flags_win_over_them() -> anyhow::Result<()> {
    let pair = VethPair::new(false)?;
    let dir = TempDir::new("yaml")?;
    let file = dir.path.join("lightshark.yaml");
    // The file asks for port 4000, only UDP, and a missing interface; the
    // flags Agent::start passes (--port 3000, --interface vb) must win, the
    // protocol filter from the file must still apply.
    fs::write(
        &file,
        "interface: nosuch0\nport: 4000\nfilter_protocol: udp\nquiet: true\n",
    )?;
    let agent = Agent::start(
        &pair.b,
        "vb",
        &dir,
        &["--config", file.to_str().context("path")?],
    )?;
    let (stats0, _) = quiet_stats(&agent, &pair.b, "vb")?;
    ensure!(
        udp_burst(&pair.a, &pair.b, A4, B4, 7000, 25, 10)? == 25,
        "udp lost"
    );
    pair.a.exec("ping", &["-c", "3", "-i", "0.05", B4])?;
    let (stats, _) = quiet_stats(&agent, &pair.b, "vb")?;
    let grown = stats["total_packets"].as_u64().unwrap_or(0)
        - stats0["total_packets"].as_u64().unwrap_or(0);
    ensure!(
        grown == 25,
        "the file's UDP filter should leave the 25 datagrams only, got {grown}"
    );
    // quiet: true from the file: no info lines in the log.
    ensure!(
        !agent.log().contains("INFO"),
        "quiet from the file was ignored:\n{}",
        agent.log()
    );
    Ok(())
}

#[test]
fn every_bad_setting_stops_the_agent_naming_it() -> anyhow::Result<()> {
    let pair = VethPair::new(false)?;
    let dir = TempDir::new("badcfg")?;
    let yaml = |name: &str, text: &str| -> anyhow::Result<String> {
        let path = dir.path.join(name);
        fs::write(&path, text)?;
        Ok(path.to_str().context("path")?.to_owned())
    };
    let cases: Vec<(Vec<String>, Vec<&str>)> = vec![
        (
            vec!["-c".into(), yaml("a.yaml", "port: 70000\n")?],
            vec!["port", "70000"],
        ),
        (
            vec!["-c".into(), yaml("b.yaml", "filter_ip: 10.1.1\n")?],
            vec!["filter_ip", "10.1.1"],
        ),
        (
            vec!["-c".into(), yaml("c.yaml", "filter_protocol: tcpp\n")?],
            vec!["filter_protocol", "tcpp"],
        ),
        (
            vec!["-c".into(), yaml("d.yaml", "connection_timout: 5\n")?],
            vec!["connection_timout"],
        ),
        (
            vec!["-c".into(), yaml("e.yaml", "quiet: 3\n")?],
            vec!["quiet", "3"],
        ),
        (
            vec!["-c".into(), yaml("f.yaml", "port: [1, 2]\n")?],
            vec!["port", "list"],
        ),
        (
            vec!["-c".into(), yaml("g.yaml", "port: 3000\n  bad: indent\n")?],
            vec!["YAML"],
        ),
        (
            vec![
                "-c".into(),
                dir.path.join("missing.yaml").to_str().context("p")?.into(),
            ],
            vec!["missing.yaml"],
        ),
        (
            vec!["--port".into(), "65536".into()],
            vec!["--port", "65536"],
        ),
        (
            vec!["--filter-ip".into(), "fe80::zz".into()],
            vec!["--filter-ip", "fe80::zz"],
        ),
        (
            vec!["--filter-protocol".into(), "ipx".into()],
            vec!["--filter-protocol", "ipx"],
        ),
        (
            vec!["--filter-port".into(), "0".into()],
            vec!["--filter-port", "0"],
        ),
        (
            vec!["--connection-timeout".into(), "soon".into()],
            vec!["--connection-timeout", "soon"],
        ),
        (
            vec!["--data-retention".into(), "-5".into()],
            vec!["--data-retention"],
        ),
        (vec!["--bogus".into()], vec!["--bogus"]),
        // A device reports no size; the limit must hold all the same.
        (
            vec!["-c".into(), "/dev/zero".into()],
            vec!["/dev/zero", "65536"],
        ),
        (
            vec!["--api-token".into(), "".into()],
            vec!["--api-token", "visible ASCII"],
        ),
        (
            vec!["--sample-rate".into(), "0".into()],
            vec!["--sample-rate", "0"],
        ),
    ];
    for (args, words) in cases {
        let mut full: Vec<&str> = vec!["--interface", "vb", "--db-path"];
        let db = dir.path.join("never.db");
        full.push(db.to_str().context("path")?);
        full.extend(args.iter().map(String::as_str));
        let out = run_agent(&pair.b, &full)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.code() == Some(2),
            "{args:?}: exit {:?}, stderr {stderr}",
            out.status.code()
        );
        for w in words {
            ensure!(
                stderr.contains(w),
                "{args:?}: the error does not name {w:?}: {stderr}"
            );
        }
        ensure!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        ensure!(
            !db.exists(),
            "{args:?}: the agent created its database before failing"
        );
    }
    let qdiscs = pair.b.exec("tc", &["qdisc", "show", "dev", "vb"])?;
    ensure!(
        !String::from_utf8_lossy(&qdiscs.stdout).contains("clsact"),
        "left a qdisc behind"
    );
    Ok(())
}

#[test]
fn help_documents_every_flag_and_the_file_keys() -> anyhow::Result<()> {
    let out = std::process::Command::new(agent_binary())
        .arg("--help")
        .output()?;
    let help = String::from_utf8_lossy(&out.stdout);
    for word in [
        "--interface",
        "--port",
        "--db-path",
        "--filter-port",
        "--filter-ip",
        "--filter-protocol",
        "--connection-timeout",
        "--data-retention",
        "--config",
        "--quiet",
        "--attach-mode",
        "data_retention_seconds:",
        "filter_protocol:",
        "Non-IP frames",
        "never matches --filter-port",
    ] {
        ensure!(help.contains(word), "--help does not mention {word}");
    }
    Ok(())
}
