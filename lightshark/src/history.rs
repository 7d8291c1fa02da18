//! Read queries over the stored samples: `/api/history` and its pcap form,
//! and `/api/top`. Filters on addresses, ports and protocol use the chunk
//! index to read only the chunks that may match; every condition is then
//! checked exactly on the rows, with bound parameters only.

use std::{collections::HashMap, net::IpAddr};

use rusqlite::{types::Value, Connection, Row};
use serde::Serialize;

use crate::{
    chunks::{self, Key},
    pcap, wire,
};

/// Which stored samples a query wants; `None` fields do not filter.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selection {
    /// Unix ms, inclusive.
    pub since: Option<i64>,
    /// Unix ms, exclusive.
    pub until: Option<i64>,
    /// Either address.
    pub ip: Option<IpAddr>,
    pub src_ip: Option<IpAddr>,
    pub dst_ip: Option<IpAddr>,
    /// Either port.
    pub port: Option<u16>,
    pub protocol: Option<u8>,
    /// Only rows older than the row with this id (the cursor of the
    /// previous page).
    pub before: Option<i64>,
}

/// One stored sample as the API returns it.
#[derive(Debug, Serialize)]
pub struct HistoryRow {
    /// Arrival order; pass the last one as `before` for the next page.
    pub id: i64,
    pub timestamp: i64,
    pub src_ip: String,
    pub dst_ip: String,
    pub src_port: u16,
    pub dst_port: u16,
    pub protocol: String,
    pub length: u32,
    pub segments: u32,
    pub direction: &'static str,
    pub interface: String,
}

/// The newest `limit` matching samples, newest first (by arrival).
pub fn history(conn: &Connection, sel: &Selection, limit: u32) -> anyhow::Result<Vec<HistoryRow>> {
    let mut names = InterfaceNames::default();
    let mut out = Vec::new();
    walk(
        conn,
        sel,
        limit,
        "id, ts_ms, src_ip, dst_ip, src_port, dst_port, protocol, length, segments, direction, ifindex",
        |r| {
            out.push(HistoryRow {
                id: r.get(0)?,
                timestamp: r.get(1)?,
                src_ip: ip_text(&r.get::<_, Vec<u8>>(2)?),
                dst_ip: ip_text(&r.get::<_, Vec<u8>>(3)?),
                src_port: r.get(4)?,
                dst_port: r.get(5)?,
                protocol: wire::protocol_name(r.get(6)?),
                length: r.get(7)?,
                segments: r.get(8)?,
                direction: wire::direction_name(r.get(9)?),
                interface: names.get(r.get(10)?),
            });
            Ok(())
        },
    )?;
    Ok(out)
}

/// The newest `limit` matching samples as a pcap file, oldest first, and
/// how many of them had no captured bytes (stored by an older version or
/// with `--capture-bytes 0`) and were left out.
pub fn pcap(conn: &Connection, sel: &Selection, limit: u32) -> anyhow::Result<(Vec<u8>, u64)> {
    let mut packets = Vec::new();
    let mut uncaptured = 0;
    walk(conn, sel, limit, "ts_ms, length, header", |r| {
        match r.get::<_, Option<Vec<u8>>>(2)? {
            Some(bytes) if !bytes.is_empty() => packets.push((r.get(0)?, r.get(1)?, bytes)),
            _ => uncaptured += 1,
        }
        Ok(())
    })?;
    let mut file = pcap::Writer::start();
    for (ts, length, bytes) in packets.iter().rev() {
        file.packet(*ts, *length, bytes);
    }
    Ok((file.finish(), uncaptured))
}

/// Calls `each` on up to `limit` matching rows, newest first, with the
/// given columns selected.
fn walk(
    conn: &Connection,
    sel: &Selection,
    limit: u32,
    columns: &str,
    mut each: impl FnMut(&Row) -> rusqlite::Result<()>,
) -> anyhow::Result<()> {
    let (conditions, mut params) = conditions(sel);
    let before = sel.before.unwrap_or(i64::MAX);
    let mut left = i64::from(limit);
    if !sel.narrows() {
        let sql = format!(
            "SELECT {columns} FROM samples WHERE id < ?{} ORDER BY id DESC LIMIT ?{}",
            params.len() + 1,
            params.len() + 2
        );
        params.extend([Value::Integer(before), Value::Integer(left)]);
        let mut stmt = conn.prepare_cached(&sql)?;
        let mut rows = stmt.query(rusqlite::params_from_iter(&params))?;
        while let Some(r) = rows.next()? {
            each(r)?;
        }
        return Ok(());
    }
    let addrs: Vec<Vec<u8>> = [sel.ip, sel.src_ip, sel.dst_ip]
        .iter()
        .flatten()
        .map(chunks::addr_bytes)
        .collect();
    let mut keys: Vec<Key> = addrs.iter().map(|a| Key::Addr(a)).collect();
    keys.extend(sel.port.map(Key::Port));
    keys.extend(sel.protocol.map(Key::Protocol));

    let mut candidates = conn.prepare_cached(
        "SELECT chunk, bloom FROM chunks
         WHERE chunk <= ?1 AND max_ts >= ?2 AND min_ts < ?3 ORDER BY chunk DESC",
    )?;
    let mut chunk_rows = candidates.query(rusqlite::params![
        chunks::chunk_of(before.saturating_sub(1)),
        sel.since.unwrap_or(i64::MIN),
        sel.until.unwrap_or(i64::MAX),
    ])?;
    let n = params.len();
    let sql = format!(
        "SELECT {columns} FROM samples
         WHERE id BETWEEN ?{} AND ?{} {conditions} ORDER BY id DESC LIMIT ?{}",
        n + 1,
        n + 2,
        n + 3
    );
    let mut rows_of_chunk = conn.prepare_cached(&sql)?;
    while left > 0 {
        let Some(c) = chunk_rows.next()? else {
            break;
        };
        let bloom: Vec<u8> = c.get(1)?;
        if !chunks::may_contain(&bloom, &keys) {
            continue;
        }
        let (first, last) = chunks::id_range(c.get(0)?);
        params.truncate(n);
        params.extend([
            Value::Integer(first),
            Value::Integer(last.min(before - 1)),
            Value::Integer(left),
        ]);
        let mut rows = rows_of_chunk.query(rusqlite::params_from_iter(&params))?;
        while let Some(r) = rows.next()? {
            each(r)?;
            left -= 1;
        }
    }
    Ok(())
}

impl Selection {
    /// Whether anything beyond the cursor narrows the rows.
    fn narrows(&self) -> bool {
        Selection {
            before: None,
            ..self.clone()
        } != Selection::default()
    }
}

/// The exact row conditions of a selection (each starting with AND), and
/// their parameters, numbered from 1.
fn conditions(sel: &Selection) -> (String, Vec<Value>) {
    let mut sql = String::new();
    let mut params: Vec<Value> = Vec::new();
    // Each `?` of a clause takes the next value, numbered in order.
    let mut add = |clause: &str, values: &[Value]| {
        sql.push_str(" AND ");
        let mut values = values.iter();
        for c in clause.chars() {
            sql.push(c);
            if c == '?' {
                params.extend(values.next().cloned());
                sql.push_str(&params.len().to_string());
            }
        }
    };
    let blob = |ip: &IpAddr| Value::Blob(chunks::addr_bytes(ip));
    if let Some(t) = sel.since {
        add("ts_ms >= ?", &[Value::Integer(t)]);
    }
    if let Some(t) = sel.until {
        add("ts_ms < ?", &[Value::Integer(t)]);
    }
    if let Some(ip) = &sel.ip {
        add("(src_ip = ? OR dst_ip = ?)", &[blob(ip), blob(ip)]);
    }
    if let Some(ip) = &sel.src_ip {
        add("src_ip = ?", &[blob(ip)]);
    }
    if let Some(ip) = &sel.dst_ip {
        add("dst_ip = ?", &[blob(ip)]);
    }
    if let Some(p) = sel.port {
        let p = Value::Integer(p.into());
        add("(src_port = ? OR dst_port = ?)", &[p.clone(), p]);
    }
    if let Some(p) = sel.protocol {
        add("protocol = ?", &[Value::Integer(p.into())]);
    }
    (sql, params)
}

/// What `/api/top` groups by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopBy {
    Ip,
    Port,
    Connection,
}

/// One `/api/top` entry: an address or port with what it sent and
/// received, or a directional connection with what it carried.
#[derive(Debug, Default, Serialize)]
pub struct TopEntry {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    pub packets: i64,
    pub bytes: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packets_sent: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_sent: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packets_received: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_received: Option<i64>,
}

/// The `limit` biggest talkers by bytes over `[since, until)`, from the
/// stored samples (packets are wire segments, as everywhere).
pub fn top(
    conn: &Connection,
    since: i64,
    until: i64,
    by: TopBy,
    limit: u32,
) -> anyhow::Result<Vec<TopEntry>> {
    // The id span of the chunks that overlap the range bounds the scan.
    let (first, last): (Option<i64>, Option<i64>) = conn.query_row(
        "SELECT min(chunk), max(chunk) FROM chunks WHERE max_ts >= ?1 AND min_ts < ?2",
        [since, until],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let (Some(first), Some(last)) = (first, last) else {
        return Ok(Vec::new());
    };
    let range = "FROM samples WHERE id BETWEEN ?1 AND ?2 AND ts_ms >= ?3 AND ts_ms < ?4";
    // Each packet counts for both of its ends: sent by one, received by the
    // other.
    let ends = |src: &str, dst: &str, extra: &str| {
        format!(
            "SELECT k, sum(ps), sum(bs), sum(pr), sum(br) FROM (
                 SELECT {src} AS k, sum(segments) AS ps, sum(length) AS bs, 0 AS pr, 0 AS br
                 {range} {extra} GROUP BY {src}
                 UNION ALL
                 SELECT {dst}, 0, 0, sum(segments), sum(length)
                 {range} {extra} GROUP BY {dst})
             GROUP BY k ORDER BY sum(bs) + sum(br) DESC, k LIMIT ?5"
        )
    };
    let sql = match by {
        TopBy::Ip => ends("src_ip", "dst_ip", ""),
        TopBy::Port => ends("src_port", "dst_port", "AND protocol IN (6, 17, 132, 136)"),
        TopBy::Connection => format!(
            "SELECT protocol, src_ip, src_port, dst_ip, dst_port, sum(segments), sum(length)
             {range} GROUP BY protocol, src_ip, src_port, dst_ip, dst_port
             ORDER BY sum(length) DESC, sum(segments) DESC LIMIT ?5"
        ),
    };
    let (lo, _) = chunks::id_range(first);
    let (_, hi) = chunks::id_range(last);
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(rusqlite::params![lo, hi, since, until, limit], |r| {
        Ok(match by {
            TopBy::Connection => {
                let (src, dst) = (
                    ip_of(&r.get::<_, Vec<u8>>(1)?),
                    ip_of(&r.get::<_, Vec<u8>>(3)?),
                );
                let (sport, dport): (u16, u16) = (r.get(2)?, r.get(4)?);
                TopEntry {
                    connection: Some(format!(
                        "{} -> {}",
                        endpoint(src, sport),
                        endpoint(dst, dport)
                    )),
                    protocol: Some(wire::protocol_name(r.get(0)?)),
                    packets: r.get(5)?,
                    bytes: r.get(6)?,
                    ..TopEntry::default()
                }
            }
            _ => {
                let (ps, bs, pr, br): (i64, i64, i64, i64) =
                    (r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?);
                let (ip, port) = match by {
                    TopBy::Ip => (Some(ip_text(&r.get::<_, Vec<u8>>(0)?)), None),
                    _ => (None, Some(r.get(0)?)),
                };
                TopEntry {
                    ip,
                    port,
                    packets: ps + pr,
                    bytes: bs + br,
                    packets_sent: Some(ps),
                    bytes_sent: Some(bs),
                    packets_received: Some(pr),
                    bytes_received: Some(br),
                    ..TopEntry::default()
                }
            }
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn ip_of(bytes: &[u8]) -> Option<IpAddr> {
    wire::ip_from_bytes(bytes)
}

fn ip_text(bytes: &[u8]) -> String {
    ip_of(bytes).map_or_else(String::new, |a| a.to_string())
}

fn endpoint(ip: Option<IpAddr>, port: u16) -> String {
    ip.map_or_else(|| format!("?:{port}"), |a| wire::endpoint(a, port))
}

/// Interface names by index, looked up once per query.
#[derive(Default)]
struct InterfaceNames(HashMap<u32, String>);

impl InterfaceNames {
    fn get(&mut self, ifindex: u32) -> String {
        self.0
            .entry(ifindex)
            .or_insert_with(|| crate::interface::name_of(ifindex))
            .clone()
    }
}
