//! Heavy load while traffic flows: many HTTP clients on every read endpoint,
//! and hundreds of WebSocket clients, some of which never read.

use std::{
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
    let load = api_load(&pair, &dir, 30)?;
    eprintln!("{}", load.report);
    ensure!(!load.errors, "errors under load:\n{}", load.report);
    ensure!(
        load.requests > 1000,
        "only {} requests in 30 s",
        load.requests
    );
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
