//! `/api/live`: the flows of the latest snapshot, one entry per direction,
//! or with `group=connection` one entry per two-way connection. Everything
//! is worked out by the poller; a request only picks and writes entries.

use std::sync::{Arc, Mutex, Weak};

use hyper::body::Bytes;
use serde::Serialize;

use crate::{
    connections::Connection,
    flow::Flow,
    flows::{LiveState, Snapshot},
    params::Params,
    reply::{bad_request, json_bytes, Handled},
    wire,
};

/// Entries listed without `limit`, and the most `limit` allows.
const LIVE_DEFAULT: u32 = 50;
const LIVE_MAX: u32 = 10_000;

/// The view asked for with `group`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum View {
    /// One entry per directional flow (no `group`).
    Flows,
    /// `group=connection`: both directions of a connection in one entry.
    Connections,
}

/// `limit` (1 to [`LIVE_MAX`]) and `group` (only `connection`), each at
/// most once; anything else is an error naming it.
fn params(path: &str, query: &str) -> Result<(u32, View), String> {
    let p = Params::parse(path, query, &["limit", "group"])?;
    let view = match p.text("group") {
        None => View::Flows,
        Some("connection") => View::Connections,
        Some(other) => {
            return Err(format!(
                "group {other:?} is not a grouping; the only one is \"connection\""
            ))
        }
    };
    Ok((p.limit(LIVE_DEFAULT, LIVE_MAX)?, view))
}

/// The bodies of both views at the default limit, each with the snapshot
/// it was written from. Held weakly: an old snapshot's flows are freed when
/// the poller replaces it, while the allocation that tells it apart stays.
#[derive(Default)]
pub struct LiveCache(Mutex<[Option<Cached>; 2]>);

/// A written body and the snapshot it shows.
type Cached = (Weak<Snapshot>, Bytes);

/// Answers `/api/live?query`. At the default limit each view is written
/// once per snapshot and then served as is, since dashboards and probes
/// poll it far more often than the snapshot changes.
pub fn answer(live: &LiveState, cache: &LiveCache, path: &str, query: &str) -> Handled {
    let (limit, view) = params(path, query).map_err(bad_request)?;
    let snap = live.get();
    let render = || match view {
        View::Flows => flows(live, &snap, limit),
        View::Connections => connections(live, &snap, limit),
    };
    if limit != LIVE_DEFAULT {
        return Ok(render());
    }
    let cached = || cache.0.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((cached, body)) = &cached()[view as usize] {
        if std::ptr::eq(cached.as_ptr(), Arc::as_ptr(&snap)) {
            return Ok(body.clone());
        }
    }
    let body = render();
    cached()[view as usize] = Some((Arc::downgrade(&snap), body.clone()));
    Ok(body)
}

/// The answer's frame, whichever the view.
#[derive(Serialize)]
struct Live<T> {
    connections: Vec<T>,
    total_packets: u64,
    total_bytes: u64,
}

/// One directional flow.
#[derive(Serialize)]
struct LiveFlow<'a> {
    connection: String,
    protocol: String,
    interface: &'a str,
    src_ip: String,
    dst_ip: String,
    src_port: u16,
    dst_port: u16,
    first_seen: i64,
    last_seen: i64,
    packets_per_second: f64,
    bytes_per_second: f64,
    stats: LiveStats,
}

#[derive(Serialize)]
struct LiveStats {
    bytes_sent: u64,
    packets_count: u64,
}

fn flows(live: &LiveState, snap: &Snapshot, limit: u32) -> Bytes {
    let entries = snap.flows.iter().map(|f| {
        let (src, dst) = wire::addresses(&f.key);
        LiveFlow {
            connection: wire::connection(&f.key),
            protocol: wire::protocol_name(f.key.protocol),
            interface: live.interface_name(f.key.ifindex),
            src_ip: src.to_string(),
            dst_ip: dst.to_string(),
            src_port: f.key.src_port,
            dst_port: f.key.dst_port,
            first_seen: f.first_seen_ms,
            last_seen: f.last_seen_ms,
            packets_per_second: f.packets_per_second,
            bytes_per_second: f.bytes_per_second,
            stats: LiveStats {
                bytes_sent: f.bytes,
                packets_count: f.packets,
            },
        }
    });
    frame(snap, limit, entries)
}

/// One two-way connection: "sent" is client to server, "received" server
/// to client.
#[derive(Serialize)]
struct LiveConnection<'a> {
    protocol: String,
    interface: &'a str,
    client: Endpoint,
    server: Endpoint,
    role_from: &'static str,
    bytes_sent: u64,
    packets_sent: u64,
    bytes_received: u64,
    packets_received: u64,
    sent_packets_per_second: f64,
    sent_bytes_per_second: f64,
    received_packets_per_second: f64,
    received_bytes_per_second: f64,
    first_seen: i64,
    last_seen: i64,
}

#[derive(Serialize)]
struct Endpoint {
    ip: String,
    port: u16,
}

fn connections(live: &LiveState, snap: &Snapshot, limit: u32) -> Bytes {
    let entries = snap
        .connections
        .iter()
        .map(|&c| connection(live, &snap.flows, c));
    frame(snap, limit, entries)
}

fn connection<'a>(live: &'a LiveState, flows: &[Flow], c: Connection) -> LiveConnection<'a> {
    let sent = c.sent().map(|i| &flows[i]);
    let received = c.received().map(|i| &flows[i]);
    let any = &flows[c.any_flow()];
    let (src, dst) = wire::addresses(&any.key);
    let (src, dst) = (
        Endpoint {
            ip: src.to_string(),
            port: any.key.src_port,
        },
        Endpoint {
            ip: dst.to_string(),
            port: any.key.dst_port,
        },
    );
    let (client, server) = if c.sent.is_some() {
        (src, dst)
    } else {
        (dst, src)
    };
    let count = |f: Option<&Flow>, what: fn(&Flow) -> u64| f.map_or(0, what);
    let rate = |f: Option<&Flow>, what: fn(&Flow) -> f64| f.map_or(0.0, what);
    let both = [sent, received];
    LiveConnection {
        protocol: wire::protocol_name(any.key.protocol),
        interface: live.interface_name(any.key.ifindex),
        client,
        server,
        role_from: c.role_from.name(),
        bytes_sent: count(sent, |f| f.bytes),
        packets_sent: count(sent, |f| f.packets),
        bytes_received: count(received, |f| f.bytes),
        packets_received: count(received, |f| f.packets),
        sent_packets_per_second: rate(sent, |f| f.packets_per_second),
        sent_bytes_per_second: rate(sent, |f| f.bytes_per_second),
        received_packets_per_second: rate(received, |f| f.packets_per_second),
        received_bytes_per_second: rate(received, |f| f.bytes_per_second),
        first_seen: both
            .iter()
            .flatten()
            .map(|f| f.first_seen_ms)
            .min()
            .unwrap_or(0),
        last_seen: both
            .iter()
            .flatten()
            .map(|f| f.last_seen_ms)
            .max()
            .unwrap_or(0),
    }
}

/// The first `limit` of `entries` with the snapshot's totals.
fn frame<T: Serialize>(snap: &Snapshot, limit: u32, entries: impl Iterator<Item = T>) -> Bytes {
    json_bytes(&Live {
        connections: entries.take(limit as usize).collect(),
        total_packets: snap.totals.packets,
        total_bytes: snap.totals.bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_takes_only_connection_and_names_what_is_wrong() {
        let params = |q| params("/api/live", q);
        assert_eq!(params(""), Ok((50, View::Flows)));
        assert_eq!(
            params("group=connection&limit=7"),
            Ok((7, View::Connections))
        );
        for (query, words) in [
            ("group=flow", &["group", "\"flow\"", "connection"][..]),
            ("group=", &["group", "\"\""]),
            (
                "group=connection&group=connection",
                &["group", "more than once"],
            ),
            ("limit=0&group=connection", &["limit", "1 to 10000"]),
            ("sort=bytes", &["\"sort\"", "limit, group"]),
        ] {
            let message = params(query).unwrap_err();
            for w in words {
                assert!(message.contains(w), "{query}: {message:?} lacks {w:?}");
            }
        }
    }
}
