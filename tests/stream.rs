//! `/api/stream`: a real WebSocket client against the real agent.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _};
use lightshark_tests::*;
use serde_json::Value;
use tungstenite::Message;

/// Reads stats messages for `span`, returning when each arrived.
fn read_for(
    ws: &mut tungstenite::WebSocket<TcpStream>,
    span: Duration,
) -> anyhow::Result<Vec<Instant>> {
    let start = Instant::now();
    let mut arrivals = Vec::new();
    while start.elapsed() < span {
        match ws.read()? {
            Message::Text(text) => {
                let v: Value = serde_json::from_str(&text)?;
                for key in [
                    "uptime_seconds",
                    "total_packets",
                    "total_bytes",
                    "packets_per_second",
                ] {
                    ensure!(!v[key].is_null(), "stream message lacks {key}: {v}");
                }
                arrivals.push(Instant::now());
            }
            other => ensure!(
                other.is_ping() || other.is_pong(),
                "unexpected frame {other:?}"
            ),
        }
    }
    Ok(arrivals)
}

/// A client that completes the handshake and then never reads, with a tiny
/// receive buffer so the server's sends back up quickly.
fn stalled_client(ns: &Netns) -> anyhow::Result<TcpStream> {
    let stream = ns.enter(|| -> anyhow::Result<TcpStream> {
        // SAFETY: socket options on a socket created and owned here, before
        // it connects, so the small window is advertised from the start.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
            let size: libc::c_int = 1024;
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&raw const size).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            );
            let mut addr: libc::sockaddr_in = std::mem::zeroed();
            addr.sin_family = libc::AF_INET as u16;
            addr.sin_port = API_PORT.to_be();
            addr.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
            let rc = libc::connect(
                fd,
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            );
            ensure!(rc == 0, "connect: {}", std::io::Error::last_os_error());
            Ok(<TcpStream as std::os::fd::FromRawFd>::from_raw_fd(fd))
        }
    })??;
    let mut s = stream;
    s.write_all(
        b"GET /api/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        ensure!(
            s.read(&mut byte)? == 1,
            "connection closed during the handshake"
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    ensure!(
        head.starts_with("HTTP/1.1 101"),
        "handshake answered: {head}"
    );
    ensure!(
        head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "wrong Sec-WebSocket-Accept: {head}"
    );
    Ok(s)
}

/// Whether the agent still holds an established connection to this port.
fn server_holds(ns: &Netns, client_port: u16) -> anyhow::Result<bool> {
    let out = ns.exec(
        "ss",
        &["-Htn", "state", "established", "sport", "=", ":3000"],
    )?;
    let peer = format!(":{client_port}");
    Ok(String::from_utf8_lossy(&out.stdout).lines().any(|l| {
        l.split_whitespace()
            .nth(3)
            .is_some_and(|p| p.ends_with(&peer))
    }))
}

#[test]
fn one_message_a_second_to_every_client_while_a_stalled_one_is_dropped() -> anyhow::Result<()> {
    let pair = VethPair::new(false)?;
    let dir = TempDir::new("stream")?;
    let agent = Agent::start(&pair.b, "vb", &dir, &[])?;
    let stalled = stalled_client(&pair.b)?;
    let stalled_port = stalled.local_addr()?.port();
    ensure!(
        server_holds(&pair.b, stalled_port)?,
        "the agent does not hold the stalled client"
    );

    // One client reads through the whole stall; two more read for a while.
    let mut steady = ws_connect(&pair.b)?;
    let mut others = [ws_connect(&pair.b)?, ws_connect(&pair.b)?];
    let short = thread::scope(|s| -> anyhow::Result<Vec<Vec<Instant>>> {
        let handles: Vec<_> = others
            .iter_mut()
            .map(|ws| s.spawn(|| read_for(ws, Duration::from_secs(6))))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow::anyhow!("reader panicked"))?)
            .collect()
    })?;
    for arrivals in &short {
        ensure!(
            (5..=7).contains(&arrivals.len()),
            "{} messages in 6 s instead of about 6",
            arrivals.len()
        );
    }

    // Keep reading on the steady client until the agent has dropped the
    // stalled one; the steady one must never wait much over a second.
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut last = Instant::now();
    let mut gaps = Vec::new();
    while server_holds(&pair.b, stalled_port)? {
        ensure!(
            Instant::now() < deadline,
            "the stalled client was never dropped"
        );
        for t in read_for(&mut steady, Duration::from_secs(2))? {
            gaps.push(t - last);
            last = t;
        }
    }
    let worst = gaps.iter().max().copied().unwrap_or_default();
    ensure!(
        worst < Duration::from_millis(1600),
        "a reading client waited {worst:?} for a message while another stalled"
    );
    drop(stalled);
    let health = agent.get_ok(&pair.b, "/api/health")?;
    ensure!(health["status"] == "ok", "{health}");
    Ok(())
}

#[test]
fn pings_are_answered_and_closes_are_acknowledged() -> anyhow::Result<()> {
    let pair = VethPair::new(false)?;
    let dir = TempDir::new("wsping")?;
    let agent = Agent::start(&pair.b, "vb", &dir, &[])?;
    let mut ws = ws_connect(&pair.b)?;
    ws.send(Message::Ping("lightshark".into()))?;
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        ensure!(Instant::now() < deadline, "no pong within 3 s");
        if let Message::Pong(payload) = ws.read()? {
            ensure!(&payload[..] == b"lightshark", "pong carried {payload:?}");
            break;
        }
    }
    ws.close(None)?;
    loop {
        match ws.read() {
            Ok(Message::Close(_)) | Err(tungstenite::Error::ConnectionClosed) => break,
            Ok(_) => {}
            Err(e) => anyhow::bail!("after close: {e}"),
        }
    }

    // A plain GET is told to use a WebSocket, in JSON.
    let (status, body) = agent.get(&pair.b, "/api/stream")?;
    ensure!(status == 426, "plain GET /api/stream answered {status}");
    ensure!(
        body["error"]
            .as_str()
            .context("error")?
            .contains("WebSocket"),
        "{body}"
    );
    Ok(())
}
