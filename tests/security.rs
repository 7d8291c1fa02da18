//! Who gets in: the API token (header and WebSocket), the bind address, and
//! hostile requests that must get a JSON 4xx, never a 5xx or a crash.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    time::Duration,
};

use anyhow::ensure;
use lightshark_tests::*;

const TOKEN: &str = "s3cret-token";

#[test]
fn the_token_guards_every_endpoint_but_health() -> anyhow::Result<()> {
    let pair = VethPair::new(false)?;
    let dir = TempDir::new("token")?;
    // From the environment, as a Kubernetes secret would provide it.
    let agent =
        Agent::start_with_env(&pair.b, "vb", &dir, &[("LIGHTSHARK_API_TOKEN", TOKEN)], &[])?;
    let bearer = format!("Bearer {TOKEN}");
    for path in ["/api/live", "/api/stats", "/api/history?limit=1"] {
        let (status, body) = agent.get(&pair.b, path)?;
        ensure!(
            status == 401 && body["error"].is_string(),
            "{path} without the token: {status} {body}"
        );
        let (status, _) =
            agent.request(&pair.b, "GET", path, &[("Authorization", "Bearer wrong")])?;
        ensure!(status == 401, "{path} with a wrong token: {status}");
        let (status, _) = agent.request(&pair.b, "GET", path, &[("Authorization", &bearer)])?;
        ensure!(status == 200, "{path} with the token: {status}");
    }
    let (status, _) = agent.get(&pair.b, "/api/health")?;
    ensure!(status == 200, "health must stay open for probes: {status}");

    // The WebSocket upgrade is refused without the token.
    let stream = pair
        .b
        .enter(|| TcpStream::connect(("127.0.0.1", API_PORT)))??;
    match tungstenite::client(
        format!("ws://127.0.0.1:{API_PORT}/api/stream").as_str(),
        stream,
    ) {
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp))) => {
            ensure!(
                resp.status() == 401,
                "WebSocket without the token: {}",
                resp.status()
            );
        }
        other => anyhow::bail!(
            "WebSocket without the token was not refused: {:?}",
            other.map(|_| ())
        ),
    }
    let stream = pair
        .b
        .enter(|| TcpStream::connect(("127.0.0.1", API_PORT)))??;
    let mut req = tungstenite::client::IntoClientRequest::into_client_request(
        format!("ws://127.0.0.1:{API_PORT}/api/stream").as_str(),
    )?;
    req.headers_mut().insert("Authorization", bearer.parse()?);
    let (mut ws, _) = tungstenite::client(req, stream).map_err(|e| anyhow::anyhow!("{e}"))?;
    ensure!(ws.read()?.is_text(), "no stats message with the token");
    Ok(())
}

#[test]
fn bind_limits_where_the_api_answers() -> anyhow::Result<()> {
    let pair = VethPair::new(false)?;
    let dir = TempDir::new("bind")?;
    let agent = Agent::start(&pair.b, "vb", &dir, &["--bind", "127.0.0.1"])?;
    ensure!(
        agent.get(&pair.b, "/api/health")?.0 == 200,
        "not on loopback"
    );
    let from_a = pair.a.enter(|| {
        TcpStream::connect_timeout(
            &format!("{B4}:{API_PORT}").parse().unwrap(),
            Duration::from_secs(2),
        )
    })?;
    ensure!(
        from_a.is_err(),
        "the API answered on {B4} although bound to 127.0.0.1"
    );
    Ok(())
}

/// Sends raw bytes to the API and returns the status line and body.
fn raw(ns: &Netns, request: &[u8]) -> anyhow::Result<(String, String)> {
    let mut s = ns.enter(|| TcpStream::connect(("127.0.0.1", API_PORT)))??;
    s.set_read_timeout(Some(Duration::from_secs(15)))?;
    s.write_all(request)?;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.lines().next().unwrap_or("").to_owned();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    Ok((status, body))
}

#[test]
fn hostile_requests_get_json_4xx_and_the_agent_keeps_serving() -> anyhow::Result<()> {
    let pair = VethPair::new(false)?;
    let dir = TempDir::new("hostile")?;
    let agent = Agent::start(&pair.b, "vb", &dir, &[])?;
    let endpoints = [
        "/api/health",
        "/api/live",
        "/api/stats",
        "/api/history",
        "/api/stream",
    ];
    for path in endpoints {
        for method in ["POST", "PUT", "DELETE", "PATCH"] {
            let (status, body) = agent.request(&pair.b, method, path, &[])?;
            ensure!(
                status == 405 && body["error"].is_string(),
                "{method} {path}: {status} {body}"
            );
        }
    }
    let long = "9".repeat(30_000);
    for path in [
        "/nope".to_owned(),
        "/api".to_owned(),
        "/api/live/extra".to_owned(),
        "/API/LIVE".to_owned(),
    ] {
        let (status, body) = agent.get(&pair.b, &path)?;
        ensure!(
            status == 404 && body["error"].is_string(),
            "{path}: {status} {body}"
        );
    }
    for query in [
        "/api/history?limit=0".to_owned(),
        "/api/history?limit=1&limit=2".to_owned(),
        "/api/history?limit=%30".to_owned(),
        "/api/history?limit=1&limit=abc".to_owned(),
        "/api/history?limit=1e3".to_owned(),
        format!("/api/history?limit={long}"),
        "/api/history?since=yesterday".to_owned(),
        "/api/live?limit=100001".to_owned(),
        "/api/stats?x=1".to_owned(),
        "/api/health?%ff=%00".to_owned(),
    ] {
        let (status, body) = agent.get(&pair.b, &query)?;
        ensure!(
            status == 400 && body["error"].is_string(),
            "{}: {status} {body}",
            &query[..query.len().min(60)]
        );
    }
    // Malformed and oversized requests: a 4xx or a closed connection,
    // never a 5xx, and the agent answers normally afterwards.
    let many_headers: String = (0..200).map(|i| format!("X-H{i}: v\r\n")).collect();
    for req in [
        b"GARBAGE\r\n\r\n".to_vec(),
        b"GET /api/live HTTP/9.9\r\n\r\n".to_vec(),
        format!("GET /api/live HTTP/1.1\r\nHost: x\r\n{many_headers}\r\n").into_bytes(),
        format!(
            "GET /api/live?{} HTTP/1.1\r\nHost: x\r\n\r\n",
            "a".repeat(100_000)
        )
        .into_bytes(),
        b"GET /api/live HTTP/1.0\r\n\r\n".to_vec(),
    ] {
        let (status, _) = raw(&pair.b, &req)?;
        ensure!(
            !status.contains(" 5"),
            "{}: {status}",
            String::from_utf8_lossy(&req[..req.len().min(40)])
        );
    }
    let (status, body) = agent.get(&pair.b, "/api/stats")?;
    ensure!(
        status == 200 && body["total_packets"].is_u64(),
        "the agent stopped serving: {status}"
    );
    ensure!(!agent.log().contains("panicked"), "{}", agent.log());
    Ok(())
}
