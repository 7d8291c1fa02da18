//! `GET /metrics`: the agent's counters in the Prometheus text exposition
//! format (version 0.0.4), so that a fleet of sidecars can be scraped and
//! graphed. Rendered from the same state the JSON API reads, so both always
//! tell the same story.
//!
//! Every label has a small fixed set of values (direction, protocol class,
//! drop cause, deletion reason) or a bounded one (ethertype: at most 1,024
//! keys, the rest fold into "other"); nothing is labelled per flow.
//! Counters come from the kernel's per-CPU counters and the ledgers, never
//! from the flow table (flows are deleted when stale) or the samples (which
//! can be dropped), so they are exact and only ever grow while the agent
//! runs.

use std::fmt::{Display, Write as _};

use http_body_util::Full;
use hyper::{body::Bytes, header, Response};
use lightshark_common::{Counter, PROTOCOL_CLASS_NAMES};

use crate::{state::ApiState, wire};

/// The exposition format's media type, as Prometheus asks for it.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The 200 answer to a scrape.
pub fn reply(state: &ApiState) -> Response<Full<Bytes>> {
    let mut reply = Response::new(Full::new(Bytes::from(render(state))));
    reply.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(CONTENT_TYPE),
    );
    reply
}

/// The labels of one packet and byte counter pair, and the pair.
type Series<'a> = (Vec<(&'a str, &'a str)>, &'a Counter);

const COUNTER: &str = "counter";
const GAUGE: &str = "gauge";

/// Writes every metric family of the agent.
pub fn render(state: &ApiState) -> String {
    let snap = state.live.get();
    let t = &snap.totals;
    let (r, w) = (&state.reader, &state.writer);
    let mut m = Exposition::default();

    let classes: Vec<Series> = snap
        .by_class
        .iter()
        .enumerate()
        .flat_map(|(direction, classes)| {
            PROTOCOL_CLASS_NAMES
                .iter()
                .zip(classes)
                .map(move |(class, c)| {
                    let direction = wire::direction_name(direction as u8);
                    (vec![("direction", direction), ("protocol", *class)], c)
                })
        })
        .collect();
    m.counts(
        [
            "lightshark_packets_total",
            "Packets seen (wire segments), by direction and protocol class.",
        ],
        [
            "lightshark_bytes_total",
            "Bytes on the link, by direction and protocol class.",
        ],
        &classes,
    );
    let ethertypes: Vec<(String, &Counter)> = snap
        .nonip
        .iter()
        .map(|(key, c)| (wire::ethertype_name(*key), c))
        .collect();
    let non_ip: Vec<Series> = ethertypes
        .iter()
        .map(|(name, c)| (vec![("ethertype", name.as_str())], *c))
        .collect();
    m.counts(
        [
            "lightshark_non_ip_packets_total",
            "Frames without a readable IP header, by ethertype (llc, runt, other).",
        ],
        [
            "lightshark_non_ip_bytes_total",
            "Bytes of frames without a readable IP header, by ethertype.",
        ],
        &non_ip,
    );

    let flows = snap.flows.len();
    m.single(
        "lightshark_active_connections",
        GAUGE,
        "Directional flows with a packet within --connection-timeout.",
        flows,
    );
    m.single(
        "lightshark_flow_map_entries",
        GAUGE,
        "Entries in the kernel flow map after the last poll removed stale ones.",
        flows,
    );
    m.single(
        "lightshark_flow_map_capacity",
        GAUGE,
        "Entries the kernel flow map can hold (--flow-map-size).",
        state.flow_map_capacity,
    );
    m.single(
        "lightshark_flow_map_full_packets_total",
        COUNTER,
        "Packets whose flow found the flow map full; they are in every other total.",
        t.flow_map_full,
    );
    m.single(
        "lightshark_filtered_out_packets_total",
        COUNTER,
        "Packets a filter left out; they are in no other counter.",
        t.filtered_out,
    );

    m.single(
        "lightshark_sampled_out_packets_total",
        COUNTER,
        "IP packets --sample-rate left without a sample; they are in every other total.",
        t.sampled_out,
    );
    m.single(
        "lightshark_samples_emitted_total",
        COUNTER,
        "Samples the kernel emitted, one per kernel packet of an IP flow.",
        t.samples,
    );
    m.single(
        "lightshark_samples_stored_total",
        COUNTER,
        "Samples committed to the database.",
        w.stored.samples(),
    );
    let dropped = "lightshark_samples_dropped_total";
    m.family(dropped, COUNTER, "Samples not stored, by cause.");
    for (cause, n) in [
        ("ring_buffer_full", t.ringbuf_drops),
        ("writer_backlog", r.backlog_dropped.samples()),
        ("storage_error", w.storage_dropped.samples()),
    ] {
        m.sample(dropped, &[("cause", cause)], n);
    }
    m.single(
        "lightshark_samples_pending",
        GAUGE,
        "Samples read from the ring buffer and not yet committed (writer lag).",
        r.queued.samples() + w.in_flight.samples(),
    );
    let deleted = "lightshark_history_rows_deleted_total";
    m.family(
        deleted,
        COUNTER,
        "Stored samples deleted later, by --data-retention and by --max-db-size.",
    );
    for (reason, n) in [
        ("retention", &w.deleted_by_retention),
        ("size_cap", &w.deleted_by_size_cap),
    ] {
        m.sample(
            deleted,
            &[("reason", reason)],
            n.load(std::sync::atomic::Ordering::Relaxed),
        );
    }

    m.single(
        "lightshark_database_size_bytes",
        GAUGE,
        "Bytes of the history on disk: the database file and its -wal.",
        state.store.disk_bytes(),
    );
    m.single(
        "lightshark_uptime_seconds",
        GAUGE,
        "Seconds since the agent started.",
        state.started.elapsed().as_secs_f64(),
    );
    let info = "lightshark_build_info";
    m.family(info, GAUGE, "Always 1; the version is in the label.");
    m.sample(info, &[("version", env!("CARGO_PKG_VERSION"))], 1);
    m.out
}

/// Text in the exposition format, one family after another.
#[derive(Default)]
struct Exposition {
    out: String,
}

impl Exposition {
    /// The HELP and TYPE lines that open a family. Help texts here hold no
    /// backslash or newline, the two characters the format would escape.
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    /// One sample. Label values are names chosen here, hex ethertypes and
    /// the crate version: none holds a character that needs escaping.
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) {
        self.out.push_str(name);
        for (i, (label, text)) in labels.iter().enumerate() {
            let open = if i == 0 { "{" } else { "," };
            let _ = write!(self.out, "{open}{label}=\"{text}\"");
        }
        if !labels.is_empty() {
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    /// A packets family and a bytes family (each `[name, help]`) over the
    /// same labelled counters.
    fn counts(&mut self, packets: [&str; 2], bytes: [&str; 2], series: &[Series]) {
        for ([name, help], of_packets) in [(packets, true), (bytes, false)] {
            self.family(name, COUNTER, help);
            for (labels, c) in series {
                self.sample(name, labels, if of_packets { c.packets } else { c.bytes });
            }
        }
    }

    /// A family of one unlabelled sample.
    fn single(&mut self, name: &str, kind: &str, help: &str, value: impl Display) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_families_and_labelled_samples_in_the_text_format() {
        let mut m = Exposition::default();
        m.family("x_total", COUNTER, "Things.");
        m.sample("x_total", &[("a", "1"), ("b", "two")], 7u64);
        m.single("y", GAUGE, "One.", 0.5);
        assert_eq!(
            m.out,
            "# HELP x_total Things.\n# TYPE x_total counter\nx_total{a=\"1\",b=\"two\"} 7\n\
             # HELP y One.\n# TYPE y gauge\ny 0.5\n"
        );
    }
}
