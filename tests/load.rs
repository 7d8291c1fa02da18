//! Heavy load while traffic flows: many HTTP clients on every read endpoint,
//! and hundreds of WebSocket clients, some of which never read.

use std::{
    fs,
    net::UdpSocket,
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _};
use lightshark_tests::*;

/// The memory the agent may use under this load: the sidecar's limit in
/// deploy/kubernetes/deployment.yaml.
const RSS_CAP_MB: f64 = 256.0;

#[test]
fn sixty_four_http_clients_for_30_s_get_no_errors() -> anyhow::Result<()> {
    let pair = VethPair::new(false)?;
    let dir = TempDir::new("load")?;
    let agent = Agent::start(&pair.b, "vb", &dir, &[])?;
    let _sink = pair.b.enter(|| UdpSocket::bind((B4, 7700)))??;
    // wrk cycles through the three read endpoints.
    let script = dir.path.join("paths.lua");
    fs::write(
        &script,
        "local paths = {'/api/live', '/api/stats', '/api/history?limit=1000'}\n\
         local i = 0\n\
         request = function() i = i % 3 + 1; return wrk.format('GET', paths[i]) end\n",
    )?;
    let out = thread::scope(|s| -> anyhow::Result<String> {
        let traffic = s.spawn(|| udp_steady(&pair.a, A4, B4, 7700, 5_000, Duration::from_secs(30)));
        let out = pair.b.exec(
            "wrk",
            &[
                "-t2",
                "-c64",
                "-d30s",
                "-s",
                script.to_str().context("path")?,
                &format!("http://127.0.0.1:{API_PORT}"),
            ],
        )?;
        traffic
            .join()
            .map_err(|_| anyhow::anyhow!("sender panicked"))??;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    })?;
    eprintln!("{out}");
    ensure!(
        !out.contains("Non-2xx") && !out.contains("Socket errors"),
        "errors under load:\n{out}"
    );
    let requests: u64 = out
        .lines()
        .find_map(|l| {
            l.trim()
                .split_once(" requests in ")
                .map(|(n, _)| n.trim().parse().ok())
        })
        .flatten()
        .context("wrk printed no request count")?;
    ensure!(requests > 1000, "only {requests} requests in 30 s");
    let rss = status_mb(agent.pid().context("pid")?, "VmHWM:")?;
    eprintln!("peak RSS under load: {rss:.1} MB");
    ensure!(
        rss < RSS_CAP_MB,
        "peak RSS {rss:.1} MB over the {RSS_CAP_MB} MB cap"
    );
    let stats = agent.get_ok(&pair.b, "/api/stats")?;
    ensure!(
        stats["total_packets"].as_u64().unwrap_or(0) > 100_000,
        "traffic did not flow: {stats}"
    );
    Ok(())
}

#[test]
fn five_hundred_websocket_clients_and_stuck_ones_never_delay_the_readers() -> anyhow::Result<()> {
    let pair = VethPair::new(false)?;
    let dir = TempDir::new("ws500")?;
    let agent = Agent::start(&pair.b, "vb", &dir, &[])?;
    // 50 clients that never read a byte after the handshake (that they are
    // cut off once their backlog is full is shown in stream.rs, with a small
    // receive buffer that fills in seconds).
    let stuck: Vec<_> = (0..50)
        .map(|_| ws_connect(&pair.b))
        .collect::<Result<_, _>>()?;
    let readers: Vec<_> = (0..450)
        .map(|_| ws_connect(&pair.b))
        .collect::<Result<_, _>>()?;
    let start = Instant::now();
    let counts: Vec<usize> = thread::scope(|s| {
        let handles: Vec<_> = readers
            .into_iter()
            .map(|mut ws| {
                s.spawn(move || {
                    let mut n = 0;
                    while start.elapsed() < Duration::from_secs(5) {
                        match ws.read() {
                            Ok(m) if m.is_text() => n += 1,
                            Ok(_) => {}
                            Err(_) => break,
                        }
                    }
                    n
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or(0)).collect()
    });
    let starved = counts.iter().filter(|&&n| n < 4).count();
    ensure!(
        starved == 0,
        "{starved} of 450 reading clients got fewer than 4 messages in 5 s: {counts:?}"
    );
    ensure!(
        agent.get_ok(&pair.b, "/api/health")?["status"] == "ok",
        "API stopped answering"
    );
    drop(stuck);
    Ok(())
}
