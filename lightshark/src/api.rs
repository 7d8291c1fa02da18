//! The JSON HTTP API: a short route table over hyper, reading the live
//! snapshot and the sample store. Every answer, errors included, is JSON.

use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use http_body_util::Full;
use hyper::{
    body::{Bytes, Incoming},
    header, Method, Request, Response, StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Value};
use tokio::{net::TcpListener, sync::watch};

use crate::{
    clock::WallClock,
    dashboard,
    history::{self, TopBy},
    ledger::Tally,
    live_view, metrics, openapi,
    params::{query_pairs, Params},
    reply::{bad_request, error, json_bytes, json_reply, Handled, Reply},
    state::ApiState,
    stream::{self, NotWebSocket},
    wire,
};

/// `/api/history` without `limit`, and the largest `limit` allowed.
const HISTORY_DEFAULT: u32 = 100;
const HISTORY_MAX: u32 = 10_000;
/// `/api/history.pcap` without `limit`, and the most packets in one file.
const PCAP_DEFAULT: u32 = 10_000;
const PCAP_MAX: u32 = 100_000;
/// `/api/top` without `limit`, its largest `limit`, and the range it
/// covers without `since` (the last hour).
const TOP_DEFAULT: u32 = 10;
const TOP_MAX: u32 = 1_000;
const TOP_RANGE_MS: i64 = 3_600_000;
/// What the history endpoints select by.
const SELECTION: &[&str] = &[
    "limit", "since", "until", "ip", "src_ip", "dst_ip", "port", "protocol", "before",
];
/// API connections served at once, WebSocket clients included.
const MAX_CONNECTIONS: usize = 1024;
/// How often `/api/stream` pushes the stats.
const STREAM_PERIOD: Duration = Duration::from_secs(1);

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

/// Whether the request carries the token (`Authorization: Bearer ...`, or
/// `query_token` where the route takes one), compared in constant time so
/// the answer's timing tells nothing about it.
fn authorized(state: &ApiState, headers: &header::HeaderMap, query_token: Option<&str>) -> bool {
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
        .chain(query_token.map(str::as_bytes))
        .any(|given| constant_time_eq(given, token.as_bytes()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    // Only the length can differ in time, and it is not the secret.
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

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
pub(crate) const ROUTES: &[&str] = &[
    dashboard::PATH,
    openapi::PATH,
    "/api/health",
    "/api/live",
    "/api/stats",
    "/api/history",
    "/api/history.pcap",
    "/api/top",
    "/api/stream",
    "/metrics",
];

/// Served without the token: the health probe, and the dashboard page and
/// the API document, which hold no data.
const OPEN: &[&str] = &["/api/health", dashboard::PATH, openapi::PATH];

/// Dispatches a request to its handler, after the checks every route shares.
async fn route(state: &ApiState, req: Request<Incoming>) -> Reply {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    if !ROUTES.contains(&path.as_str()) {
        return error(StatusCode::NOT_FOUND, format!("no such endpoint: {path}"));
    }
    // Browsers cannot set headers on a WebSocket: the stream also takes the
    // token as a query parameter.
    let query_token = (path == "/api/stream")
        .then(|| query_pairs(&query).find(|(name, _)| name == "token"))
        .flatten()
        .map(|(_, value)| value);
    if !OPEN.contains(&path.as_str()) && !authorized(state, req.headers(), query_token.as_deref()) {
        let mut reply = error(
            StatusCode::UNAUTHORIZED,
            "this endpoint needs the API token: Authorization: Bearer <token> \
             (the WebSocket /api/stream also takes ?token=<token>)"
                .into(),
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
        "/api/health" => no_query(&path, &query).map(|()| json_bytes(&health(state))),
        "/api/live" => live_view::answer(&state.live, &state.live_cache, &path, &query),
        "/api/stats" => no_query(&path, &query).map(|()| json_bytes(&stats(state))),
        "/api/history" => history(state, &path, &query).await,
        "/api/history.pcap" => return history_pcap(state, &path, &query).await,
        "/api/top" => top(state, &path, &query).await,
        dashboard::PATH => return without_query(&path, &query, dashboard::page),
        openapi::PATH => return without_query(&path, &query, openapi::document),
        "/metrics" => return without_query(&path, &query, || metrics::reply(state)),
        _ => {
            return match Params::parse(&path, &query, &["token"]) {
                Ok(_) => stream::upgrade(req, &state.feed).unwrap_or_else(|NotWebSocket(why)| {
                    let mut reply = error(StatusCode::UPGRADE_REQUIRED, why);
                    reply.headers_mut().insert(
                        header::SEC_WEBSOCKET_VERSION,
                        header::HeaderValue::from_static("13"),
                    );
                    reply
                }),
                Err(message) => error(StatusCode::BAD_REQUEST, message),
            }
        }
    };
    match result {
        Ok(body) => json_reply(StatusCode::OK, body),
        Err((status, message)) => error(status, message),
    }
}

fn no_query(path: &str, query: &str) -> Result<(), (StatusCode, String)> {
    Params::parse(path, query, &[])
        .map(|_| ())
        .map_err(bad_request)
}

/// `answer()` when the request has no query parameters; a 400 otherwise.
fn without_query(path: &str, query: &str, answer: impl FnOnce() -> Reply) -> Reply {
    match no_query(path, query) {
        Ok(()) => answer(),
        Err((status, message)) => error(status, message),
    }
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
            (
                wire::ethertype_name(*k),
                json!({ "packets": c.packets, "bytes": c.bytes }),
            )
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
        "sample_rate": state.sample_rate,
        "samples": ledger(
            state,
            Tally::samples,
            [t.samples, t.sampled_out, t.ringbuf_drops]
        ),
        // The same ledger in wire segments: a GSO packet is one sample of
        // several segments, and packet counters count segments.
        "sample_segments": ledger(
            state,
            Tally::segments,
            [
                t.sample_segments,
                t.sampled_out_segments,
                t.ringbuf_drop_segments
            ]
        ),
    })
}

/// Where the samples the kernel emitted are now, counted by `unit`, beside
/// the IP packets `--sample-rate` left without one. `kernel` is what the
/// kernel counted: emitted, sampled out, and dropped for a full ring.
fn ledger(state: &ApiState, unit: fn(&Tally) -> u64, kernel: [u64; 3]) -> Value {
    let (r, w) = (&state.reader, &state.writer);
    let [emitted, sampled_out, ring_full] = kernel;
    json!({
        "emitted": emitted,
        "sampled_out": sampled_out,
        "stored": unit(&w.stored),
        "pending": unit(&r.queued) + unit(&w.in_flight),
        "dropped": {
            "ring_buffer_full": ring_full,
            "writer_backlog": unit(&r.backlog_dropped),
            "storage_error": unit(&w.storage_dropped),
        },
    })
}

async fn history(state: &ApiState, path: &str, query: &str) -> Handled {
    let params = Params::parse(path, query, SELECTION).map_err(bad_request)?;
    let limit = params
        .limit(HISTORY_DEFAULT, HISTORY_MAX)
        .map_err(bad_request)?;
    let sel = params.selection().map_err(bad_request)?;
    let rows = read(state, move |c| history::history(c, &sel, limit)).await?;
    Ok(json_bytes(&rows))
}

/// `/api/history.pcap`: the same selection as `/api/history`, as a pcap
/// file, oldest packet first. How many selected samples had no captured
/// bytes (and are not in the file) is in `X-Lightshark-Uncaptured`.
async fn history_pcap(state: &ApiState, path: &str, query: &str) -> Reply {
    let selected = Params::parse(path, query, SELECTION)
        .and_then(|p| Ok((p.limit(PCAP_DEFAULT, PCAP_MAX)?, p.selection()?)));
    let (limit, sel) = match selected {
        Ok(s) => s,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    match read(state, move |c| history::pcap(c, &sel, limit)).await {
        Ok((file, uncaptured)) => {
            let mut reply = Response::new(Full::new(Bytes::from(file)));
            let headers = reply.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/vnd.tcpdump.pcap"),
            );
            headers.insert(
                header::CONTENT_DISPOSITION,
                header::HeaderValue::from_static("attachment; filename=\"lightshark.pcap\""),
            );
            headers.insert("x-lightshark-uncaptured", uncaptured.into());
            reply
        }
        Err((status, message)) => error(status, message),
    }
}

/// `/api/top`: the biggest talkers over a time range of the history.
async fn top(state: &ApiState, path: &str, query: &str) -> Handled {
    let params =
        Params::parse(path, query, &["since", "until", "by", "limit"]).map_err(bad_request)?;
    let limit = params.limit(TOP_DEFAULT, TOP_MAX).map_err(bad_request)?;
    let until = params
        .unix_ms("until")
        .map_err(bad_request)?
        .unwrap_or_else(|| WallClock::now_unix_ms() + 1);
    let since = params
        .unix_ms("since")
        .map_err(bad_request)?
        .unwrap_or(until - TOP_RANGE_MS);
    if since >= until {
        return Err(bad_request(format!(
            "since ({since}) must be before until ({until})"
        )));
    }
    let (by, by_name) = match params.text("by").unwrap_or("ip") {
        "ip" => (TopBy::Ip, "ip"),
        "port" => (TopBy::Port, "port"),
        "connection" => (TopBy::Connection, "connection"),
        other => {
            return Err(bad_request(format!(
                "by must be ip, port or connection, not {other:?}"
            )))
        }
    };
    let entries = read(state, move |c| history::top(c, since, until, by, limit)).await?;
    Ok(json_bytes(&json!({
        "since": since,
        "until": until,
        "by": by_name,
        "entries": entries,
    })))
}

/// Runs a query on a pooled read connection, off the async threads.
async fn read<T: Send + 'static>(
    state: &ApiState,
    query: impl FnOnce(&rusqlite::Connection) -> anyhow::Result<T> + Send + 'static,
) -> Result<T, (StatusCode, String)> {
    let store = state.store.clone();
    let failed = |e: String| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("history query failed: {e}"),
        )
    };
    tokio::task::spawn_blocking(move || store.read(query))
        .await
        .map_err(|e| failed(e.to_string()))?
        .map_err(|e| failed(format!("{e:#}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_equal_only_when_identical() {
        assert!(constant_time_eq(b"s3cret", b"s3cret"));
        assert!(!constant_time_eq(b"s3cret", b"s3creT"));
        assert!(!constant_time_eq(b"s3cret", b"s3cre"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
