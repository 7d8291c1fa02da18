//! Faults: kills during floods, vanished interfaces, full disks, size caps,
//! and proof that the program never alters or hides a packet.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream, UdpSocket},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _};
use lightshark_tests::*;

/// The samples the agent's last log line says it stored.
fn stored_in_log(log: &str) -> anyhow::Result<u64> {
    log.lines()
        .rev()
        .find_map(|l| l.split("stopped; ").nth(1)?.split(' ').next()?.parse().ok())
        .context("no 'stopped; N samples stored' line")
}

fn integrity(db: &std::path::Path) -> anyhow::Result<(String, u64)> {
    let conn = rusqlite::Connection::open(db)?;
    let check: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
    let rows: i64 = conn.query_row("SELECT count(*) FROM samples", [], |r| r.get(0))?;
    Ok((check, rows as u64))
}

#[test]
fn sigkill_during_a_flood_never_corrupts_or_loses_acknowledged_samples() -> anyhow::Result<()> {
    let pair = VethPair::new(false)?;
    let dir = TempDir::new("kill")?;
    let _sink = pair.b.enter(|| UdpSocket::bind((B4, 7600)))??;
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for round in 0..20 {
        let mut agent = Agent::start(&pair.b, "vb", &dir, &[])?;
        let flood = {
            let a = &pair.a;
            thread::scope(|s| -> anyhow::Result<(u64, u64)> {
                let sender =
                    s.spawn(|| udp_steady(a, A4, B4, 7600, 50_000, Duration::from_millis(2500)));
                // A pseudo-random moment between 0.5 and 2 s into the flood.
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                thread::sleep(Duration::from_millis(500 + seed % 1500));
                let acknowledged = stat(
                    &agent.get_ok(&pair.b, "/api/stats")?,
                    &["samples", "stored"],
                );
                let exit = agent.stop(libc::SIGKILL)?;
                ensure!(
                    exit.code.is_none(),
                    "round {round}: agent exited by itself: {}",
                    exit.log
                );
                sender
                    .join()
                    .map_err(|_| anyhow::anyhow!("sender panicked"))??;
                Ok((acknowledged, 0))
            })?
        };
        let (check, rows) = integrity(&agent.db_path)?;
        ensure!(check == "ok", "round {round}: integrity_check says {check}");
        ensure!(
            rows >= flood.0,
            "round {round}: {rows} rows in the database, but {} were reported stored before the kill",
            flood.0
        );
        // The next start attaches cleanly (TCX links died with the process).
        let _ = fs::remove_file(&agent.db_path);
    }
    Ok(())
}

#[test]
fn sigterm_during_a_flood_stores_every_sample_counted() -> anyhow::Result<()> {
    let pair = VethPair::new(false)?;
    let dir = TempDir::new("term")?;
    let _sink = pair.b.enter(|| UdpSocket::bind((B4, 7601)))??;
    let mut agent = Agent::start(&pair.b, "vb", &dir, &[])?;
    let a = &pair.a;
    thread::scope(|s| -> anyhow::Result<()> {
        let sender = s.spawn(|| udp_steady(a, A4, B4, 7601, 50_000, Duration::from_secs(3)));
        thread::sleep(Duration::from_millis(1500));
        let exit = agent.stop(libc::SIGTERM)?;
        ensure!(exit.code == Some(0), "exit {:?}: {}", exit.code, exit.log);
        sender
            .join()
            .map_err(|_| anyhow::anyhow!("sender panicked"))??;
        // The log's last line reports what was stored; every one of them
        // must be in the file, and nothing may have been dropped.
        let stored = stored_in_log(&exit.log)?;
        let (check, rows) = integrity(&agent.db_path)?;
        ensure!(
            check == "ok" && rows == stored && rows > 10_000,
            "{rows} rows, {stored} reported stored"
        );
        Ok(())
    })
}

/// On a core something else keeps busy the agent's own threads, at idle
/// priority, barely run; a SIGTERM must still store every sample well
/// within Kubernetes' 30 s grace period.
#[test]
fn sigterm_on_a_saturated_core_stores_every_sample_in_time() -> anyhow::Result<()> {
    let pair = VethPair::new(false)?;
    let dir = TempDir::new("busy")?;
    let _sink = pair.b.enter(|| UdpSocket::bind((B4, 7604)))??;
    let mut agent = Agent::start(&pair.b, "vb", &dir, &[])?;
    let pid = agent.pid().context("agent pid")?.to_string();
    let cpu = (thread::available_parallelism()?.get() - 1).to_string();
    run("taskset", &["-a", "-p", "-c", &cpu, &pid])?;
    // A normal-priority busy loop on the agent's core, ended by its PID.
    let mut hog = Command::new("taskset")
        .args(["-c", &cpu, "sh", "-c", "while :; do :; done"])
        .spawn()?;
    let result = (|| -> anyhow::Result<()> {
        udp_steady(&pair.a, A4, B4, 7604, 50_000, Duration::from_secs(2))?;
        let (stats, _) = quiet_stats(&agent, &pair.b, "vb")?;
        let started = Instant::now();
        let exit = agent.stop(libc::SIGTERM)?;
        let took = started.elapsed();
        ensure!(exit.code == Some(0), "exit {:?}: {}", exit.code, exit.log);
        ensure!(
            took < Duration::from_secs(15),
            "SIGTERM took {took:?} on a busy core"
        );
        let stored = stored_in_log(&exit.log)?;
        let (check, rows) = integrity(&agent.db_path)?;
        let emitted = stat(&stats, &["samples", "emitted"]);
        let ring_full = stat(&stats, &["samples", "dropped", "ring_buffer_full"]);
        ensure!(
            check == "ok" && rows == stored && rows + ring_full == emitted && rows > 10_000,
            "{rows} rows, {stored} reported stored, {emitted} emitted, {ring_full} ring-full"
        );
        Ok(())
    })();
    // SAFETY: SIGKILL to the busy loop this test spawned.
    unsafe { libc::kill(hog.id() as i32, libc::SIGKILL) };
    let _ = hog.wait();
    result
}

#[test]
fn a_deleted_interface_ends_the_agent_cleanly_and_says_so() -> anyhow::Result<()> {
    let pair = VethPair::new(false)?;
    let dir = TempDir::new("gone")?;
    let mut agent = Agent::start(&pair.b, "vb", &dir, &[])?;
    pair.a.exec("ping", &["-c", "3", "-i", "0.05", B4])?;
    let started = Instant::now();
    pair.b.exec("ip", &["link", "del", "vb"])?;
    let deadline = Instant::now() + Duration::from_secs(5);
    // Wait for it to exit on its own; stop() would signal it.
    while agent
        .pid()
        .is_some_and(|p| fs::metadata(format!("/proc/{p}")).is_ok() && !zombie(p))
    {
        ensure!(
            Instant::now() < deadline,
            "agent still running 5 s after its interface went away"
        );
        thread::sleep(Duration::from_millis(100));
    }
    let exit = agent.stop(0)?;
    ensure!(
        exit.code == Some(1),
        "exit {:?} after the interface vanished:\n{}",
        exit.code,
        exit.log
    );
    ensure!(
        exit.log.contains("interface vb") && exit.log.contains("is gone"),
        "no clear log line:\n{}",
        exit.log
    );
    ensure!(!exit.log.contains("panicked"), "{}", exit.log);
    let (check, rows) = integrity(&agent.db_path)?;
    ensure!(
        check == "ok" && rows >= 6,
        "{check}, {rows} rows after {:?}",
        started.elapsed()
    );
    Ok(())
}

/// A tmpfs mounted for one test; unmounted on drop, even on failure.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &std::path::Path, options: &str) -> anyhow::Result<Tmpfs> {
        fs::create_dir_all(at)?;
        run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                options,
                "lstest",
                at.to_str().context("path")?,
            ],
        )?;
        Ok(Tmpfs(at.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

fn zombie(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
}

#[test]
fn bad_database_paths_are_clear_errors_at_start() -> anyhow::Result<()> {
    let pair = VethPair::new(false)?;
    let dir = TempDir::new("dbpath")?;
    let ro = dir.path.join("readonly");
    let _tmpfs = Tmpfs::mount(&ro, "ro,size=1m")?;
    for (db, words) in [
        (dir.path.join("no/such/dir/t.db"), vec!["no/such/dir/t.db"]),
        (ro.join("t.db"), vec!["readonly/t.db"]),
        (dir.path.clone(), vec![dir.path.to_str().context("p")?]),
    ] {
        let out = pair
            .b
            .command(agent_binary().to_str().context("p")?)
            .args(["-i", "vb", "--db-path"])
            .arg(&db)
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success(), "{}: started", db.display());
        for w in words {
            ensure!(
                err.contains(w),
                "{}: the error does not name the path: {err}",
                db.display()
            );
        }
    }
    Ok(())
}

#[test]
fn a_full_disk_keeps_counting_and_storage_resumes_when_space_returns() -> anyhow::Result<()> {
    let pair = VethPair::new(false)?;
    let dir = TempDir::new("full")?;
    let mnt = dir.path.join("small");
    let _tmpfs = Tmpfs::mount(&mnt, "size=2m")?;
    let ballast = mnt.join("ballast");
    let db = mnt.join("traffic.db");
    let agent = Agent::start_with_db(&pair.b, "vb", &dir, &db, &[])?;
    // Fill the rest of the disk.
    let mut f = fs::File::create(&ballast)?;
    let chunk = vec![0u8; 64 << 10];
    while f.write_all(&chunk).is_ok() {}
    drop(f);
    let (stats0, base) = quiet_stats(&agent, &pair.b, "vb")?;
    ensure!(
        udp_burst(&pair.a, &pair.b, A4, B4, 7602, 20_000, 400)? > 0,
        "no traffic"
    );
    let (stats, link) = quiet_stats(&agent, &pair.b, "vb")?;
    let link = link.since(&base);
    let total = stat(&stats, &["total_packets"]) - stat(&stats0, &["total_packets"]);
    ensure!(
        total == link.rx_packets + link.tx_packets,
        "counting stopped with the disk full: {stats}"
    );
    let failed = stat(&stats, &["samples", "dropped", "storage_error"]);
    ensure!(failed > 0, "a full disk dropped nothing? {stats}");
    let l = &stats["samples"];
    ensure!(
        stat(l, &["stored"]) + stat(l, &["pending"]) + ledger_dropped(l) == stat(l, &["emitted"]),
        "ledger does not balance: {l}"
    );
    let health = agent.get_ok(&pair.b, "/api/health")?;
    ensure!(health["status"] == "ok", "{health}");

    // Space returns: storing resumes.
    fs::remove_file(&ballast)?;
    let stored_before = stat(&stats, &["samples", "stored"]);
    ensure!(
        udp_burst(&pair.a, &pair.b, A4, B4, 7602, 200, 400)? > 0,
        "no traffic"
    );
    let (after, _) = quiet_stats(&agent, &pair.b, "vb")?;
    ensure!(
        stat(&after, &["samples", "stored"]) >= stored_before + 200,
        "storing did not resume: {after}"
    );
    ensure!(
        stat(&after, &["samples", "dropped", "storage_error"]) == failed,
        "still failing: {after}"
    );
    Ok(())
}

#[test]
fn the_size_cap_deletes_the_oldest_history_and_counts_it() -> anyhow::Result<()> {
    let pair = VethPair::new(false)?;
    let dir = TempDir::new("cap")?;
    let _sink = pair.b.enter(|| UdpSocket::bind((B4, 7603)))??;
    let cap: u64 = 1 << 20;
    let mut agent = Agent::start(&pair.b, "vb", &dir, &["--max-db-size", &cap.to_string()])?;
    let sent = udp_steady(&pair.a, A4, B4, 7603, 20_000, Duration::from_secs(4))?;
    let (stats, _) = quiet_stats(&agent, &pair.b, "vb")?;
    let deleted = stat(&stats, &["history_deleted", "size_cap"]);
    ensure!(
        deleted > 0,
        "a 1 MB cap deleted nothing after {sent} packets: {stats}"
    );
    let stored = stat(&stats, &["samples", "stored"]);
    let exit = agent.stop(libc::SIGTERM)?;
    ensure!(exit.code == Some(0), "{}", exit.log);
    let conn = rusqlite::Connection::open(&agent.db_path)?;
    let rows: i64 = conn.query_row("SELECT count(*) FROM samples", [], |r| r.get(0))?;
    ensure!(
        rows as u64 + deleted == stored,
        "{rows} rows + {deleted} deleted != {stored} stored"
    );
    let pages: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
    let free: i64 = conn.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
    let size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    ensure!(
        ((pages - free) * size) as u64 <= cap + cap / 4,
        "{} bytes in use over a {cap} cap",
        (pages - free) * size
    );
    // The oldest went first: what is left is the newest.
    let oldest: i64 = conn.query_row("SELECT min(ts_ms) FROM samples", [], |r| r.get(0))?;
    let newest: i64 = conn.query_row("SELECT max(ts_ms) FROM samples", [], |r| r.get(0))?;
    ensure!(
        newest - oldest < 4_000,
        "kept rows span {} ms: not the newest",
        newest - oldest
    );

    // A restart keeps that history.
    let agent2 = Agent::start(&pair.b, "vb", &dir, &["--max-db-size", &cap.to_string()])?;
    let rows2 = agent2.get_ok(&pair.b, "/api/history?limit=10000")?;
    ensure!(
        rows2.as_array().map_or(0, Vec::len) as i64 == rows.min(10_000),
        "history lost on restart"
    );
    Ok(())
}

#[test]
fn transfers_arrive_identical_and_a_later_tc_program_sees_every_packet() -> anyhow::Result<()> {
    let pair = VethPair::new(false)?;
    let dir1 = TempDir::new("first")?;
    let dir2 = TempDir::new("second")?;
    // Two agents on the same hooks: the second attaches after the first, so
    // it only counts what the first let through.
    let first = Agent::start(&pair.b, "vb", &dir1, &[])?;
    let second = Agent::start_on(
        &pair.b,
        "vb",
        &dir2,
        &dir2.path.join("traffic.db"),
        3001,
        &[],
    )?;
    let (s1_0, base) = quiet_stats(&first, &pair.b, "vb")?;
    let s2_0 = second.get_ok(&pair.b, "/api/stats")?;

    // 4 MB of patterned data, checked byte for byte on arrival.
    let data: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let listener = pair.b.enter(|| TcpListener::bind((B4, 5003)))??;
    let reader = thread::spawn(move || -> anyhow::Result<Vec<u8>> {
        let (mut c, _) = listener.accept()?;
        let mut got = Vec::new();
        c.read_to_end(&mut got)?;
        Ok(got)
    });
    let mut stream = pair.a.enter(|| TcpStream::connect((B4, 5003)))??;
    stream.write_all(&data)?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let got = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))??;
    ensure!(
        got == data,
        "the transfer arrived altered ({} of {} bytes)",
        got.len(),
        data.len()
    );

    let (s1, link) = quiet_stats(&first, &pair.b, "vb")?;
    let s2 = second.get_ok(&pair.b, "/api/stats")?;
    let link = link.since(&base);
    let want = link.rx_packets + link.tx_packets;
    let d1 = stat(&s1, &["total_packets"]) - stat(&s1_0, &["total_packets"]);
    let d2 = stat(&s2, &["total_packets"]) - stat(&s2_0, &["total_packets"]);
    ensure!(
        d1 == want && d2 == want,
        "first counted {d1}, second {d2}, the link carried {want}"
    );
    Ok(())
}

#[test]
fn filters_left_by_a_killed_legacy_agent_are_removed_on_the_next_start() -> anyhow::Result<()> {
    let pair = VethPair::new(false)?;
    let dir = TempDir::new("orphan")?;
    let filters = |hook: &str| -> anyhow::Result<usize> {
        let out = pair.b.exec("tc", &["filter", "show", "dev", "vb", hook])?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("ls_eth_"))
            .count())
    };
    let mut first = Agent::start(&pair.b, "vb", &dir, &["--attach-mode", "tc"])?;
    first.stop(libc::SIGKILL)?;
    ensure!(
        filters("ingress")? == 1 && filters("egress")? == 1,
        "SIGKILL left no filters to clean up"
    );

    let mut second = Agent::start(&pair.b, "vb", &dir, &["--attach-mode", "tc"])?;
    ensure!(
        filters("ingress")? == 1 && filters("egress")? == 1,
        "the old filters are still attached beside the new ones"
    );
    ensure!(
        second.log().contains("left on vb by an earlier agent"),
        "no log line: {}",
        second.log()
    );
    let exit = second.stop(libc::SIGTERM)?;
    ensure!(exit.code == Some(0), "{}", exit.log);
    let qdiscs = pair.b.exec("tc", &["qdisc", "show", "dev", "vb"])?;
    ensure!(
        !String::from_utf8_lossy(&qdiscs.stdout).contains("clsact"),
        "clsact left behind"
    );
    Ok(())
}

#[test]
fn sigterm_while_attaching_still_cleans_up() -> anyhow::Result<()> {
    let pair = VethPair::new(false)?;
    let dir = TempDir::new("early")?;
    for _ in 0..5 {
        let mut child = pair
            .b
            .command(agent_binary().to_str().context("path")?)
            .args(["-i", "vb", "--attach-mode", "tc", "--db-path"])
            .arg(dir.path.join("early.db"))
            .stderr(std::process::Stdio::null())
            .spawn()?;
        // Signal as soon as the qdisc appears, in the middle of attaching.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let q = pair.b.exec("tc", &["qdisc", "show", "dev", "vb"])?;
            if String::from_utf8_lossy(&q.stdout).contains("clsact") {
                break;
            }
            ensure!(Instant::now() < deadline, "the agent never added its qdisc");
        }
        // SAFETY: SIGTERM to the agent we spawned.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = child.wait()?;
        ensure!(
            status.code() == Some(0),
            "exit {status} when stopped while attaching"
        );
        let q = pair.b.exec("tc", &["qdisc", "show", "dev", "vb"])?;
        ensure!(
            !String::from_utf8_lossy(&q.stdout).contains("clsact"),
            "clsact left behind"
        );
    }
    Ok(())
}
