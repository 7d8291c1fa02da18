//! The WebSocket stream: one message a second, the same to every client.
//!
//! A ticker makes the message once and publishes it on a broadcast channel;
//! each client has its own task and reads its own copy. A client that falls
//! [`QUEUE`] messages behind (counting what still sits unsent in its socket),
//! or whose socket takes longer than [`SEND_TIMEOUT`] to accept one, is
//! dropped, so a stuck client never delays the others or the agent.

use std::{
    os::fd::{AsRawFd as _, RawFd},
    time::Duration,
};

use futures_util::{SinkExt as _, StreamExt as _};
use hyper::{
    body::{Bytes, Incoming},
    header::{self, HeaderMap, HeaderValue},
    Request, StatusCode,
};
use hyper_util::rt::TokioIo;
use tokio::{
    net::TcpStream,
    sync::broadcast::{self, error::RecvError},
};
use tokio_tungstenite::{
    tungstenite::{
        handshake::derive_accept_key,
        protocol::{frame::coding::CloseCode, CloseFrame, Role, WebSocketConfig},
        Message, Utf8Bytes,
    },
    WebSocketStream,
};

/// Messages a client may fall behind before it is dropped.
const QUEUE: usize = 8;
/// Longest a client's socket may take to accept one message.
const SEND_TIMEOUT: Duration = Duration::from_secs(2);
/// Clients only send pings and closes: their frames stay small.
const MAX_CLIENT_MESSAGE: usize = 64 << 10;

/// The publishing side: what the ticker sends and clients subscribe to.
#[derive(Clone)]
pub struct Feed {
    tx: broadcast::Sender<Utf8Bytes>,
}

impl Default for Feed {
    fn default() -> Feed {
        Feed {
            tx: broadcast::channel(QUEUE).0,
        }
    }
}

impl Feed {
    /// Publishes `make()` every `period` until the runtime stops.
    pub fn run_ticker(&self, period: Duration, make: impl Fn() -> String + Send + 'static) {
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                // No subscribers is not an error: nobody is listening yet.
                if tx.receiver_count() > 0 {
                    let _ = tx.send(Utf8Bytes::from(make()));
                }
            }
        });
    }
}

/// Why a request could not become a WebSocket.
pub struct NotWebSocket(pub String);

/// Answers a WebSocket upgrade request with 101 and serves the client on
/// the upgraded connection from then on.
pub fn upgrade(
    req: Request<Incoming>,
    feed: &Feed,
) -> Result<hyper::Response<http_body_util::Full<hyper::body::Bytes>>, NotWebSocket> {
    if req.version() != hyper::Version::HTTP_11 {
        return Err(NotWebSocket("a WebSocket upgrade needs HTTP/1.1".into()));
    }
    let accept = accept_key(req.headers())?;
    let updates = feed.tx.subscribe();
    tokio::spawn(async move {
        let upgraded = match hyper::upgrade::on(req).await {
            Ok(u) => u,
            Err(e) => return log::debug!("WebSocket upgrade failed: {e}"),
        };
        // The API serves plain TCP, so the upgraded connection is one.
        match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => serve_client(parts.io.into_inner(), parts.read_buf, updates).await,
            Err(_) => log::warn!("WebSocket upgrade on a connection that is not TCP"),
        }
    });
    let mut reply = hyper::Response::new(http_body_util::Full::default());
    *reply.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = reply.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).expect("base64 is a valid header value"),
    );
    Ok(reply)
}

/// Checks the handshake headers (RFC 6455 4.2.1) and derives the accept key.
fn accept_key(h: &HeaderMap) -> Result<String, NotWebSocket> {
    let has = |name: header::HeaderName, token: &str| {
        h.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if !has(header::UPGRADE, "websocket") || !has(header::CONNECTION, "upgrade") {
        return Err(NotWebSocket(
            "/api/stream is a WebSocket: connect with a WebSocket client \
             (websocat ws://HOST:PORT/api/stream)"
                .into(),
        ));
    }
    if h.get(header::SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) != Some(b"13") {
        return Err(NotWebSocket(
            "only WebSocket version 13 is supported".into(),
        ));
    }
    let key = h
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or_else(|| NotWebSocket("the Sec-WebSocket-Key header is missing".into()))?;
    Ok(derive_accept_key(key.as_bytes()))
}

/// Bytes written to the socket that the client has not yet acknowledged.
fn unsent(fd: RawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ writes one int; `fd` is the client's socket, open for
    // as long as its WebSocketStream lives, which outlives every call here.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n) };
    if rc == 0 {
        n.max(0) as usize
    } else {
        0
    }
}

async fn serve_client(
    tcp: TcpStream,
    read_ahead: Bytes,
    mut updates: broadcast::Receiver<Utf8Bytes>,
) {
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_CLIENT_MESSAGE))
        .max_frame_size(Some(MAX_CLIENT_MESSAGE));
    let fd = tcp.as_raw_fd();
    let ws =
        WebSocketStream::from_partially_read(tcp, read_ahead.to_vec(), Role::Server, Some(config))
            .await;
    let (mut sink, mut incoming) = ws.split();
    loop {
        tokio::select! {
            update = updates.recv() => match update {
                Ok(text) => {
                    // The kernel's send buffer is part of the queue: a client
                    // that stopped reading shows up here long before a send
                    // would block.
                    if unsent(fd) > QUEUE * text.len() {
                        log::debug!("dropping a WebSocket client {QUEUE} messages behind");
                        return;
                    }
                    let sent = tokio::time::timeout(SEND_TIMEOUT, sink.send(Message::Text(text))).await;
                    if !matches!(sent, Ok(Ok(()))) {
                        log::debug!("dropping a WebSocket client that stopped reading");
                        return;
                    }
                }
                Err(RecvError::Lagged(_)) => {
                    log::debug!("dropping a WebSocket client {QUEUE} messages behind");
                    let close = Message::Close(Some(CloseFrame {
                        code: CloseCode::Policy,
                        reason: "too slow: fell behind the stream".into(),
                    }));
                    let _ = tokio::time::timeout(SEND_TIMEOUT, sink.send(close)).await;
                    return;
                }
                Err(RecvError::Closed) => return,
            },
            frame = incoming.next() => match frame {
                // tungstenite queues the pong or the close reply itself;
                // flushing sends it now rather than with the next update.
                Some(Ok(Message::Ping(_))) => {
                    if tokio::time::timeout(SEND_TIMEOUT, sink.flush()).await.is_err() {
                        return;
                    }
                }
                Some(Ok(Message::Close(_))) => {
                    let _ = tokio::time::timeout(SEND_TIMEOUT, sink.flush()).await;
                    return;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return,
            },
        }
    }
}
