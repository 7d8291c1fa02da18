//! The JSON HTTP API: a short route table over hyper, reading the live
//! snapshot and the sample store. Every answer, errors included, is JSON.

use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use http_body_util::Full;
use hyper::{
    body::{Bytes, Incoming},
    header, Method, Request, Response, StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use lightshark_common::{NONIP_LLC, NONIP_OTHER, NONIP_RUNT};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::{net::TcpListener, sync::watch};

use crate::{
    flows::LiveState,
    ledger::Tally,
    live_view,
    samples::ReaderStats,
    store::{SampleStore, WriterStats},
    stream::{self, Feed, NotWebSocket},
};

/// `/api/history` without `limit`, and the largest `limit` allowed.
const HISTORY_DEFAULT: u32 = 100;
const HISTORY_MAX: u32 = 10_000;
/// API connections served at once, WebSocket clients included.
const MAX_CONNECTIONS: usize = 1024;
/// How often `/api/stream` pushes the stats.
const STREAM_PERIOD: Duration = Duration::from_secs(1);

/// What the handlers read.
pub struct ApiState {
    pub live: Arc<LiveState>,
    pub store: Arc<SampleStore>,
    pub reader: Arc<ReaderStats>,
    pub writer: Arc<WriterStats>,
    pub started: Instant,
    /// Where `/api/stream` clients get their messages.
    pub feed: Feed,
    /// The default `/api/live` bodies and the snapshots they were written from.
    pub live_cache: live_view::LiveCache,
    /// `--api-token`: when set, every endpoint but /api/health wants it.
    pub token: Option<String>,
}

/// Listens on `bind`, or on all addresses: IPv6 and IPv4 together where the
/// host has IPv6 (the usual pod), IPv4 alone where it has not.
pub async fn listen(bind: Option<IpAddr>, port: u16) -> anyhow::Result<TcpListener> {
    let named = |addr: SocketAddr, e: std::io::Error| {
        anyhow::Error::new(e).context(format!("cannot listen on {addr} (--bind, --port)"))
    };
    if let Some(ip) = bind {
        let addr = SocketAddr::new(ip, port);
        return TcpListener::bind(addr).await.map_err(|e| named(addr, e));
    }
    let any6 = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port));
    match TcpListener::bind(any6).await {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(named(any6, e)),
        Err(_) => {
            let any4 = SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, port));
            TcpListener::bind(any4).await.map_err(|e| named(any4, e))
        }
    }
}

/// Whether the request carries the token (`Authorization: Bearer ...`),
/// compared in constant time so the answer's timing tells nothing about it.
fn authorized(state: &ApiState, headers: &header::HeaderMap) -> bool {
    let Some(token) = &state.token else {
        return true;
    };
    // The scheme name is case-insensitive (RFC 9110 11.1).
    headers
        .get_all(header::AUTHORIZATION)
        .iter()
        .filter_map(|v| {
            let v = v.as_bytes();
            (v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ")).then(|| &v[7..])
        })
        .any(|given| constant_time_eq(given, token.as_bytes()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    // Only the length can differ in time, and it is not the secret.
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

type Reply = Response<Full<Bytes>>;

/// Serves connections from `listener` until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    state: Arc<ApiState>,
    mut shutdown: watch::Receiver<bool>,
) {
    let connections = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let ticker_state = state.clone();
    state
        .feed
        .run_ticker(STREAM_PERIOD, move || stats(&ticker_state).to_string());
    loop {
        let (stream, _peer): (_, SocketAddr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    log::warn!("accepting an API connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        // Past the cap a new connection is closed at once: the clients
        // already connected keep being served, and file descriptors stay
        // available for the database.
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, req).await) }
            });
            // Bounded requests: 32 headers and a 64 KiB head at most (a GET
            // of this API needs a fraction of either); a query value up to
            // that size still gets a JSON 400 from the handler.
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .max_headers(32)
                .max_buf_size(64 << 10)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}

/// Every endpoint; each answers GET only.
const ROUTES: &[&str] = &[
    "/api/health",
    "/api/live",
    "/api/stats",
    "/api/history",
    "/api/stream",
];

/// Dispatches a request to its handler, after the checks every route shares.
async fn route(state: &ApiState, req: Request<Incoming>) -> Reply {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    if !ROUTES.contains(&path.as_str()) {
        return error(StatusCode::NOT_FOUND, format!("no such endpoint: {path}"));
    }
    if path != "/api/health" && !authorized(state, req.headers()) {
        let mut reply = error(
            StatusCode::UNAUTHORIZED,
            "this endpoint needs the API token: Authorization: Bearer <token>".into(),
        );
        reply.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        return reply;
    }
    if req.method() != Method::GET {
        let mut reply = error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{path} only answers GET, not {}", req.method()),
        );
        reply
            .headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET"));
        return reply;
    }
    let result = match path.as_str() {
        "/api/health" => no_query(&query).map(|()| json_bytes(&health(state))),
        "/api/live" => live_view::answer(state, &query),
        "/api/stats" => no_query(&query).map(|()| json_bytes(&stats(state))),
        "/api/history" => history(state, &query).await,
        _ => {
            return match no_query(&query) {
                Ok(()) => stream::upgrade(req, &state.feed).unwrap_or_else(|NotWebSocket(why)| {
                    let mut reply = error(StatusCode::UPGRADE_REQUIRED, why);
                    reply.headers_mut().insert(
                        header::SEC_WEBSOCKET_VERSION,
                        header::HeaderValue::from_static("13"),
                    );
                    reply
                }),
                Err((status, message)) => error(status, message),
            }
        }
    };
    match result {
        Ok(body) => json_reply(StatusCode::OK, body),
        Err((status, message)) => error(status, message),
    }
}

/// A handler's answer: a JSON body, or a status and an error message.
pub(crate) type Handled = Result<Bytes, (StatusCode, String)>;

/// A 400 with `message`.
pub(crate) fn bad_request(message: String) -> (StatusCode, String) {
    (StatusCode::BAD_REQUEST, message)
}

fn no_query(query: &str) -> Result<(), (StatusCode, String)> {
    match query_pairs(query).next() {
        None => Ok(()),
        Some((name, _)) => Err(bad_request(format!(
            "unknown query parameter {name:?}; this endpoint takes none"
        ))),
    }
}

/// `name=value` pairs of a query string, percent-decoded (`+` is a space);
/// empty pieces (`a=1&&b=2`) skipped.
pub(crate) fn query_pairs(query: &str) -> impl Iterator<Item = (String, String)> + '_ {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .map(|(n, v)| (percent_decode(n), percent_decode(v)))
}

/// Decodes `%XX` escapes and `+`; a malformed escape stays as written, and
/// bytes that are not UTF-8 become U+FFFD (no parameter takes them).
fn percent_decode(text: &str) -> String {
    let b = text.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let escaped = (b[i] == b'%' && i + 2 < b.len())
            .then(|| Some(hex(b[i + 1])? * 16 + hex(b[i + 2])?))
            .flatten();
        match (escaped, b[i]) {
            (Some(byte), _) => {
                out.push(byte);
                i += 3;
            }
            (None, b'+') => {
                out.push(b' ');
                i += 1;
            }
            (None, c) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn health(state: &ApiState) -> Value {
    let snap = state.live.get();
    json!({
        "status": "ok",
        "active_connections": snap.flows.len(),
        "total_packets": snap.totals.packets,
        "samples_dropped": dropped(state, &snap.totals),
    })
}

fn dropped(state: &ApiState, totals: &lightshark_common::Totals) -> u64 {
    totals.ringbuf_drops
        + state.reader.backlog_dropped.samples()
        + state.writer.storage_dropped.samples()
}

fn stats(state: &ApiState) -> Value {
    let snap = state.live.get();
    let t = &snap.totals;
    let non_ip: serde_json::Map<String, Value> = snap
        .nonip
        .iter()
        .map(|(k, c)| {
            let name = match *k {
                NONIP_LLC => "llc".to_owned(),
                NONIP_RUNT => "runt".to_owned(),
                NONIP_OTHER => "other".to_owned(),
                t => format!("0x{t:04x}"),
            };
            (name, json!({ "packets": c.packets, "bytes": c.bytes }))
        })
        .collect();
    json!({
        "uptime_seconds": state.started.elapsed().as_secs(),
        "total_packets": t.packets,
        "total_bytes": t.bytes,
        "active_connections": snap.flows.len(),
        "packets_per_second": snap.packets_per_second,
        "bytes_per_second": snap.bytes_per_second,
        "ring_buffer_drops": t.ringbuf_drops,
        "ingress": { "packets": t.ingress_packets, "bytes": t.ingress_bytes },
        "egress": { "packets": t.egress_packets, "bytes": t.egress_bytes },
        "non_ip": non_ip,
        "non_ip_packets": t.nonip_packets,
        "non_ip_bytes": t.nonip_bytes,
        "flow_map_full_packets": t.flow_map_full,
        "history_deleted": {
            "retention": state.writer.deleted_by_retention.load(Ordering::Relaxed),
            "size_cap": state.writer.deleted_by_size_cap.load(Ordering::Relaxed),
        },
        "filtered_out_packets": t.filtered_out,
        "samples": ledger(state, Tally::samples, t.samples, t.ringbuf_drops),
        // The same ledger in wire segments: a GSO packet is one sample of
        // several segments, and packet counters count segments.
        "sample_segments": ledger(
            state,
            Tally::segments,
            t.sample_segments,
            t.ringbuf_drop_segments
        ),
    })
}

/// Where the samples the kernel emitted are now, counted by `unit`.
fn ledger(state: &ApiState, unit: fn(&Tally) -> u64, emitted: u64, ring_full: u64) -> Value {
    let (r, w) = (&state.reader, &state.writer);
    json!({
        "emitted": emitted,
        "stored": unit(&w.stored),
        "pending": unit(&r.queued) + unit(&w.in_flight),
        "dropped": {
            "ring_buffer_full": ring_full,
            "writer_backlog": unit(&r.backlog_dropped),
            "storage_error": unit(&w.storage_dropped),
        },
    })
}

async fn history(state: &ApiState, query: &str) -> Handled {
    let limit = limit_param("/api/history", query, HISTORY_DEFAULT, HISTORY_MAX)?;
    let store = state.store.clone();
    let rows = tokio::task::spawn_blocking(move || store.history(limit))
        .await
        .map_err(|e| {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("history query failed: {e}"),
            )
        })?
        .map_err(|e| {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("history query failed: {e:#}"),
            )
        })?;
    Ok(json_bytes(&rows))
}

/// The only query parameter of `path`: `limit`, a whole number from 1 to
/// `max`, or `default` when absent.
fn limit_param(
    path: &str,
    query: &str,
    default: u32,
    max: u32,
) -> Result<u32, (StatusCode, String)> {
    let mut limit = None;
    for (name, value) in query_pairs(query) {
        if name != "limit" {
            return Err(bad_request(format!(
                "unknown query parameter {name:?}; {path} takes: limit"
            )));
        }
        if limit.is_some() {
            return Err(bad_request("limit is given more than once".into()));
        }
        limit = Some(parse_limit(&value, max)?);
    }
    let limit = limit.unwrap_or(default);
    Ok(limit)
}

/// A `limit` value: a whole number from 1 to `max`.
pub(crate) fn parse_limit(value: &str, max: u32) -> Result<u32, (StatusCode, String)> {
    let invalid = || {
        bad_request(format!(
            "limit must be a whole number from 1 to {max}, not {value:?}"
        ))
    };
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    match value.parse::<u32>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(invalid()),
    }
}

/// `value` as JSON.
pub(crate) fn json_bytes(value: &impl Serialize) -> Bytes {
    // Serializing plain data (no maps with non-string keys) cannot fail.
    Bytes::from(serde_json::to_vec(value).unwrap_or_default())
}

fn json_reply(status: StatusCode, body: Bytes) -> Reply {
    let mut reply = Response::new(Full::new(body));
    *reply.status_mut() = status;
    reply.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    reply
}

fn error(status: StatusCode, message: String) -> Reply {
    json_reply(status, json_bytes(&json!({ "error": message })))
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Any query string either yields a limit in range or a 400 naming
        /// what is wrong; it never panics.
        #[test]
        fn any_query_gets_a_limit_or_a_400(query in ".{0,200}") {
            match limit_param("/api/history", &query, 100, 10_000) {
                Ok(n) => proptest::prop_assert!((1..=10_000).contains(&n)),
                Err((status, message)) => {
                    proptest::prop_assert_eq!(status, StatusCode::BAD_REQUEST);
                    proptest::prop_assert!(!message.is_empty());
                }
            }
        }

        /// Well-formed limits round-trip through percent-encoding.
        #[test]
        fn encoded_limits_decode(n in 1u32..=10_000) {
            let encoded: String = n.to_string().bytes().map(|b| format!("%{b:02X}")).collect();
            proptest::prop_assert_eq!(limit_param("/api/live", &format!("limit={encoded}"), 50, 10_000), Ok(n));
        }
    }

    /// Inputs that once broke or nearly broke parsing, kept as a corpus.
    #[test]
    fn query_corpus() {
        for (query, ok) in [
            ("limit=1&limit=2", false),
            ("limit=%31", true),
            ("limit=%", false),
            ("limit=%%31", false),
            ("limit=1%00", false),
            ("limit=%ff%fe", false),
            ("=&=&", false),
            ("limit", false),
            ("limit=10000", true),
            ("limit=010000", true),
            ("limit=4294967296", false),
            ("&&&", true),
        ] {
            assert_eq!(
                limit_param("/api/history", query, 100, 10_000).is_ok(),
                ok,
                "{query}"
            );
        }
    }

    #[test]
    fn query_values_are_percent_decoded() {
        let pairs: Vec<(String, String)> = query_pairs("limit=%31%30&a+b=c%2Bd&x=%zz&&y").collect();
        assert_eq!(
            pairs,
            [
                ("limit".into(), "10".into()),
                ("a b".into(), "c+d".into()),
                ("x".into(), "%zz".into()),
                ("y".into(), String::new()),
            ]
        );
        assert_eq!(percent_decode("%"), "%");
        assert_eq!(percent_decode("%4"), "%4");
        assert_eq!(percent_decode("%41"), "A");
    }

    #[test]
    fn tokens_compare_equal_only_when_identical() {
        assert!(constant_time_eq(b"s3cret", b"s3cret"));
        assert!(!constant_time_eq(b"s3cret", b"s3creT"));
        assert!(!constant_time_eq(b"s3cret", b"s3cre"));
        assert!(!constant_time_eq(b"", b"x"));
    }

    #[test]
    fn limit_takes_only_whole_numbers_in_range() {
        assert_eq!(parse_limit("1", 10_000).unwrap(), 1);
        assert_eq!(parse_limit("10000", 10_000).unwrap(), 10_000);
        for bad in [
            "",
            "0",
            "10001",
            "-1",
            "+5",
            "5.0",
            "1e3",
            "abc",
            "99999999999999999999",
        ] {
            let (status, message) = parse_limit(bad, 10_000).unwrap_err();
            assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
            assert!(message.contains("1 to 10000"), "{message}");
        }
    }
}
