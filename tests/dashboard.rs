//! The dashboard at `/`, as a person sees it: Debian's headless Chromium,
//! driven by Playwright (`dashboard/check.mjs`), runs inside the agent's
//! namespace against the real agent while the test sends UDP at a known
//! rate; what the page shows is judged against what was sent. Also the
//! stream's `?token=` (browsers cannot set headers on a WebSocket).

use std::{
    io::{BufRead as _, BufReader, Read as _},
    net::{TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::Stdio,
    thread,
    time::Duration,
};

use anyhow::{ensure, Context as _};
use lightshark_tests::*;
use serde_json::Value;

const TOKEN: &str = "dash-s3cret";
/// Datagrams per second the test sends while the page is watched.
const RATE: u32 = 200;
/// Long enough for the page to load, connect and be watched for 6 s.
const TRAFFIC: Duration = Duration::from_secs(30);

fn script_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboard")
}

/// check.mjs's arguments: the page, the test's port, the screenshot's
/// name under target/test-artifacts, and the token when the agent has one.
fn page_args(port: u16, shot: &str, token: Option<&str>, restart: bool) -> anyhow::Result<Value> {
    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
    std::fs::create_dir_all(&artifacts)?;
    let screenshot = artifacts.canonicalize()?.join(shot);
    println!("screenshot: {}", screenshot.display());
    let mut args = serde_json::json!({
        "url": format!("http://127.0.0.1:{API_PORT}/"),
        "port": port,
        "screenshot": screenshot,
        "restart": restart,
    });
    if let Some(token) = token {
        args["token"] = token.into();
        args["wrongToken"] = "not-the-token".into();
    }
    Ok(args)
}

/// Runs check.mjs in `ns` with `args`, hands every line it prints before
/// its report to `on_line`, and returns the report.
fn run_check(
    ns: &Netns,
    args: &Value,
    mut on_line: impl FnMut(&str) -> anyhow::Result<()>,
) -> anyhow::Result<Value> {
    let dir = script_dir();
    ensure!(
        dir.join("node_modules/playwright-core").is_dir(),
        "{} has no node_modules: run `cargo xtask setup --test-tools`",
        dir.display()
    );
    let mut child = ns
        .command("node")
        .arg(dir.join("check.mjs"))
        .arg(args.to_string())
        .current_dir(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running node (cargo xtask setup --test-tools)")?;
    let mut stderr = child.stderr.take().context("stderr")?;
    let errors = thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let mut last = String::new();
    for line in BufReader::new(child.stdout.take().context("stdout")?).lines() {
        let line = line?;
        if let Err(e) = on_line(&line) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        last = line;
    }
    let status = child.wait()?;
    let errors = errors.join().unwrap_or_default();
    ensure!(
        status.success(),
        "check.mjs failed ({status}): {errors}\n{last}"
    );
    serde_json::from_str(&last).with_context(|| format!("check.mjs report: {last}"))
}

/// Runs check.mjs watching the traffic on `port`.
fn watch_page(ns: &Netns, port: u16, shot: &str, token: Option<&str>) -> anyhow::Result<Value> {
    run_check(ns, &page_args(port, shot, token, false)?, |_| Ok(()))
}

/// Sends UDP from A to a socket bound on B at [`RATE`] while `watch` runs;
/// returns its result and the number of datagrams sent.
fn with_traffic<T: Send>(
    pair: &VethPair,
    port: u16,
    watch: impl FnOnce() -> anyhow::Result<T> + Send,
) -> anyhow::Result<(T, u64)> {
    // A bound receiver: no ICMP port-unreachable mixes into the counts.
    let _receiver = pair.b.enter(|| UdpSocket::bind((B4, port)))??;
    thread::scope(|s| {
        let sender = s.spawn(|| udp_steady(&pair.a, A4, B4, port, RATE, TRAFFIC));
        // Let the agent's 5 s rate window fill before the page reads it.
        thread::sleep(Duration::from_secs(3));
        let watched = watch();
        let sent = sender
            .join()
            .map_err(|_| anyhow::anyhow!("sender panicked"))??;
        Ok((watched?, sent))
    })
}

/// Fails naming what the page saw when the report's list `kind` (errors,
/// failed requests) is not empty.
fn none_in(report: &Value, kind: &str) -> anyhow::Result<()> {
    ensure!(
        report[kind].as_array().is_some_and(Vec::is_empty),
        "{kind}: {}",
        report[kind]
    );
    Ok(())
}

/// What every run of the page must show, whatever the token: the chart
/// growing and near the rate sent, the test's flow in the table with a
/// growing count never above what was sent, and nothing loaded from
/// anywhere but the agent.
fn check_page(report: &Value, port: u16, sent: u64) -> anyhow::Result<()> {
    ensure!(
        report["pageStatus"] == 200,
        "GET / answered {}",
        report["pageStatus"]
    );
    let content_type = report["pageHeaders"]["content-type"].as_str().unwrap_or("");
    ensure!(
        content_type.starts_with("text/html"),
        "content-type {content_type}"
    );
    let origin = format!("http://127.0.0.1:{API_PORT}/");
    let ws_origin = format!("ws://127.0.0.1:{API_PORT}/");
    for url in report["requests"].as_array().context("requests")? {
        let url = url.as_str().unwrap_or("");
        ensure!(
            [origin.as_str(), ws_origin.as_str(), "data:"]
                .iter()
                .any(|o| url.starts_with(o)),
            "the page fetched {url} from outside the agent"
        );
    }
    none_in(report, "pageErrors")?;
    none_in(report, "failedRequests")?;
    ensure!(
        report["finalState"] == "connected",
        "final state {}",
        report["finalState"]
    );

    let chart = report["chart"].as_array().context("chart readings")?;
    let points: Vec<u64> = chart.iter().filter_map(|c| c["points"].as_u64()).collect();
    ensure!(
        points.len() == chart.len() && points.last() > points.first(),
        "the packets/s chart did not grow: {points:?}"
    );
    // The agent's packets/s is over its last 5 s; the traffic has run
    // longer than that by now, so it is the rate sent, give or take.
    let last = chart.last().and_then(|c| c["last"].as_f64()).unwrap_or(0.0);
    let rate = f64::from(RATE);
    ensure!(
        (last - rate).abs() <= rate * 0.15,
        "the chart's last packets/s is {last}, the test sends {rate}/s"
    );
    let shown: f64 = report["shown"]["pps"]
        .as_str()
        .and_then(|s| s.trim().parse().ok())
        .context("packets/s card")?;
    ensure!(
        (shown - rate).abs() <= rate * 0.15,
        "the packets/s card shows {shown}, the test sends {rate}/s"
    );

    let flow = report["flow"].as_array().context("flow readings")?;
    let counts: Vec<u64> = flow.iter().filter_map(|f| f["packets"].as_u64()).collect();
    ensure!(
        counts.len() == flow.len() && counts.last() > counts.first(),
        "the table's count for port {port} did not grow: {counts:?}"
    );
    ensure!(
        counts.iter().all(|&c| c > 0 && c <= sent),
        "the table shows {counts:?} packets, the test sent {sent}"
    );
    // Between the first and the last reading the count grows at RATE/s;
    // the table follows the agent's 1 s snapshots, so allow two seconds'
    // worth either way.
    let grown = counts.last().unwrap_or(&0) - counts.first().unwrap_or(&0);
    let at = |i: usize| flow.get(i).and_then(|f| f["at"].as_u64()).unwrap_or(0);
    let span_ms = at(flow.len() - 1) - at(0);
    let expected = span_ms * u64::from(RATE) / 1000;
    ensure!(
        grown.abs_diff(expected) <= 2 * u64::from(RATE),
        "the table's count grew by {grown} in {span_ms} ms at {RATE}/s"
    );
    // The table's own packets/s for the flow, over its last 5 s.
    let flow_rate = flow.last().and_then(|f| f["rate"].as_f64()).unwrap_or(0.0);
    ensure!(
        (flow_rate - rate).abs() <= rate * 0.15,
        "the table shows {flow_rate} packets/s for the flow, the test sends {rate}/s"
    );
    println!(
        "flow rate {flow_rate}; chart points {points:?}, last {last} pkt/s, card {shown}; table {counts:?} over {span_ms} ms; sent {sent} at {RATE}/s"
    );
    ensure!(
        flow.iter().all(|f| f["protocol"] == "UDP"),
        "{}",
        report["flow"]
    );
    ensure!(
        report["websockets"]
            .as_array()
            .is_some_and(|w| w.iter().any(|w| w["frames"].as_u64() > Some(3))),
        "no stream messages reached the page: {}",
        report["websockets"]
    );
    Ok(())
}

#[test]
fn the_dashboard_shows_the_traffic_as_it_flows() -> anyhow::Result<()> {
    let pair = VethPair::new(false)?;
    let dir = TempDir::new("dashboard")?;
    let _agent = Agent::start(&pair.b, "vb", &dir, &[])?;
    let port = 47_001;
    let (report, sent) = with_traffic(&pair, port, || {
        watch_page(&pair.b, port, "dashboard.png", None)
    })?;
    check_page(&report, port, sent)?;
    none_in(&report, "consoleErrors")?;
    none_in(&report, "errorResponses")?;
    for id in ["ringBufferDrops", "flowMapFull", "sampledOut"] {
        ensure!(report["shown"][id] == "0", "{id}: {}", report["shown"][id]);
    }
    ensure!(
        report["shown"]["sampleRate"] == "every packet",
        "sample rate shown as {}",
        report["shown"]["sampleRate"]
    );
    Ok(())
}

#[test]
fn the_dashboard_asks_for_the_token_once() -> anyhow::Result<()> {
    let pair = VethPair::new(false)?;
    let dir = TempDir::new("dashboard-token")?;
    let _agent = Agent::start(&pair.b, "vb", &dir, &["--api-token", TOKEN])?;
    let port = 47_002;
    let (report, sent) = with_traffic(&pair, port, || {
        watch_page(&pair.b, port, "dashboard-token.png", Some(TOKEN))
    })?;
    check_page(&report, port, sent)?;
    ensure!(
        report["formShown"] == true && report["errorShownBeforeAnyToken"] == false,
        "the token form was not shown, or showed an error before any try: {report}"
    );
    let wrong = &report["wrongToken"];
    ensure!(
        wrong["state"] == "needs-token"
            && wrong["formShown"] == true
            && wrong["errorText"]
                .as_str()
                .is_some_and(|t| t.contains("refused")),
        "a wrong token did not show the error state: {wrong}"
    );
    ensure!(
        report["formShownWhenConnected"] == false && report["formShownAfterReload"] == false,
        "the page asked for the token again: {report}"
    );
    // The only errors are the agent's 401s before the right token: the
    // first load and the wrong try, both on /api/live.
    let refused = report["errorResponses"]
        .as_array()
        .context("errorResponses")?;
    ensure!(
        refused.len() == 2
            && refused.iter().all(|r| r["status"] == 401
                && r["url"].as_str().is_some_and(|u| u.ends_with("/api/live"))),
        "unexpected error responses: {}",
        report["errorResponses"]
    );
    let console = report["consoleErrors"]
        .as_array()
        .context("consoleErrors")?;
    ensure!(
        console.len() == refused.len()
            && console
                .iter()
                .all(|c| c["text"].as_str().is_some_and(|t| t.contains("401"))),
        "console errors other than the 401s: {}",
        report["consoleErrors"]
    );
    // Every stream the page opened carried the token in its query.
    let sockets = report["websockets"].as_array().context("websockets")?;
    ensure!(
        !sockets.is_empty()
            && sockets.iter().all(|w| w["url"]
                .as_str()
                .is_some_and(|u| u.ends_with(&format!("/api/stream?token={TOKEN}")))),
        "streams opened: {}",
        report["websockets"]
    );
    Ok(())
}

#[test]
fn the_dashboard_reconnects_when_the_agent_comes_back() -> anyhow::Result<()> {
    let pair = VethPair::new(false)?;
    let dir = TempDir::new("dashboard-restart")?;
    let mut agent = Agent::start(&pair.b, "vb", &dir, &[])?;
    let args = page_args(0, "dashboard-reconnect.png", None, true)?;
    let report = run_check(&pair.b, &args, |line| {
        match line {
            "connected" => {
                let exit = agent.stop(libc::SIGTERM)?;
                ensure!(exit.code == Some(0), "agent exit: {exit:?}");
            }
            "reconnecting" => agent = Agent::start(&pair.b, "vb", &dir, &[])?,
            _ => {}
        }
        Ok(())
    })?;
    none_in(&report, "pageErrors")?;
    ensure!(
        report["finalState"] == "connected",
        "final state {}",
        report["finalState"]
    );
    let after = &report["afterReconnect"];
    ensure!(
        after[1]["points"].as_u64() > after[0]["points"].as_u64()
            && after[0]["points"].as_u64() >= report["beforeRestart"]["points"].as_u64(),
        "the chart stood still after the reconnect: {after}"
    );
    // While the agent was away the page only probed /api/live (no
    // WebSocket storm), and it opened a new stream when the agent was back.
    ensure!(
        report["failedRequests"].as_array().is_some_and(|f| f
            .iter()
            .all(|r| r["url"].as_str().is_some_and(|u| u.ends_with("/api/live")))),
        "failed requests: {}",
        report["failedRequests"]
    );
    println!(
        "after the reconnect: {after}; streams {}; failed while away: {}",
        report["websockets"], report["failedRequests"]
    );
    let sockets = report["websockets"].as_array().context("websockets")?;
    ensure!(
        sockets.len() == 2 && sockets[1]["frames"].as_u64() > Some(0),
        "streams opened: {}",
        report["websockets"]
    );
    Ok(())
}

/// The status a WebSocket handshake on `path` gets: 101, or the refusal.
fn handshake(ns: &Netns, path: &str, bearer: Option<&str>) -> anyhow::Result<u16> {
    let stream = ns.enter(|| TcpStream::connect(("127.0.0.1", API_PORT)))??;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut req = tungstenite::client::IntoClientRequest::into_client_request(
        format!("ws://127.0.0.1:{API_PORT}{path}").as_str(),
    )?;
    if let Some(token) = bearer {
        req.headers_mut()
            .insert("Authorization", format!("Bearer {token}").parse()?);
    }
    match tungstenite::client(req, stream) {
        Ok((mut ws, response)) => {
            ensure!(ws.read()?.is_text(), "no stats message on {path}");
            Ok(response.status().as_u16())
        }
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp))) => {
            Ok(resp.status().as_u16())
        }
        Err(e) => Err(anyhow::anyhow!("handshake on {path}: {e}")),
    }
}

#[test]
fn the_stream_takes_the_token_in_its_query() -> anyhow::Result<()> {
    let pair = VethPair::new(false)?;
    let dir = TempDir::new("stream-token")?;
    let agent = Agent::start(&pair.b, "vb", &dir, &["--api-token", TOKEN])?;
    let ns = &pair.b;
    for (path, bearer, want) in [
        (format!("/api/stream?token={TOKEN}"), None, 101),
        // Percent-encoded like a browser's URLSearchParams would.
        ("/api/stream?token=dash%2Ds3cret".to_owned(), None, 101),
        ("/api/stream?token=wrong".to_owned(), None, 401),
        (format!("/api/stream?token={TOKEN}x"), None, 401),
        ("/api/stream?token=".to_owned(), None, 401),
        ("/api/stream".to_owned(), None, 401),
        ("/api/stream?tokenx=dash-s3cret".to_owned(), None, 401),
        ("/api/stream".to_owned(), Some(TOKEN), 101),
        // Still no other parameter, and the token only once.
        (format!("/api/stream?token={TOKEN}&x=1"), None, 400),
        (
            format!("/api/stream?token={TOKEN}&token={TOKEN}"),
            None,
            400,
        ),
    ] {
        let status = handshake(ns, &path, bearer)?;
        ensure!(
            status == want,
            "{path} (bearer {bearer:?}): {status}, want {want}"
        );
    }
    // Only the stream takes it: the other endpoints still want the header.
    for path in ["/api/live", "/api/stats", "/api/history"] {
        let (status, _) = agent.get(ns, &format!("{path}?token={TOKEN}"))?;
        ensure!(status == 401, "{path}?token=: {status}");
    }
    // Without --api-token the parameter is accepted and changes nothing.
    drop(agent);
    let open = Agent::start(ns, "vb", &dir, &[])?;
    ensure!(handshake(ns, "/api/stream?token=anything", None)? == 101);
    let (status, body) = open.get(ns, "/api/stream?x=1")?;
    ensure!(
        status == 400 && body["error"].as_str().is_some_and(|e| e.contains("token")),
        "{status} {body}"
    );
    Ok(())
}
