//! Per-flow packets and bytes per second, worked out by the poller from the
//! counters of consecutive polls, so that `/api/live` only reads them.
//!
//! Each flow keeps its readings of the last [`WINDOW_POLLS`] polls; its rate
//! is what it counted since the oldest of them, over the time since that
//! poll. A flow younger than that has its rate over its life so far (since
//! its first packet, taken as at least [`MIN_LIFE_MS`] so that a single
//! packet is not an enormous rate).

use std::collections::HashMap;

use lightshark_common::FlowKey;

use crate::flow::Flow;

/// Polls a rate spans: five polls of one second, the same window as the
/// totals' rates.
pub const WINDOW_POLLS: usize = 5;
/// The shortest life a young flow's rate is taken over.
pub const MIN_LIFE_MS: i64 = 100;

/// What one flow counted at each of the last polls.
struct Track {
    /// Tells a flow apart from a later one under the same key (after the
    /// first was removed as stale).
    first_seen_ms: i64,
    /// Poll number of its first reading.
    first_poll: u32,
    /// Poll number of its latest reading; tracks not read at the latest
    /// poll are gone from the kernel map and dropped.
    seen_poll: u32,
    /// Its position in the flows of the latest poll.
    index: u32,
    /// (packets, bytes) read at poll n, at `readings[n % WINDOW_POLLS]`.
    readings: [(u64, u64); WINDOW_POLLS],
}

/// The readings of every flow over the last polls.
#[derive(Default)]
pub struct FlowRates {
    /// Number of the latest poll (one a second: u32 lasts a century);
    /// poll 0 is none.
    poll: u32,
    /// Monotonic time of poll n, at `times[n % WINDOW_POLLS]`.
    times: [u64; WINDOW_POLLS],
    /// foldhash, not SipHash: several times faster on these 44-byte keys,
    /// which matters at 100k flows a second, and still seeded at random per
    /// map, so crafted addresses cannot aim at collisions.
    tracks: HashMap<FlowKey, Track, foldhash::fast::RandomState>,
}

impl FlowRates {
    /// Takes this poll's readings (`flows`, read at monotonic `now_ns` and
    /// wall-clock `now_ms`) and sets each flow's rates.
    pub fn update(&mut self, now_ns: u64, now_ms: i64, flows: &mut [Flow]) {
        self.poll += 1;
        let poll = self.poll;
        let slot = poll as usize % WINDOW_POLLS;
        // The poll a full window back, if there was one.
        let base = poll
            .checked_sub(WINDOW_POLLS as u32)
            .filter(|&b| b > 0)
            .map(|b| (b, self.times[slot]));
        self.times[slot] = now_ns;
        for (index, flow) in flows.iter_mut().enumerate() {
            let track = self.tracks.entry(flow.key).or_insert(Track {
                first_seen_ms: flow.first_seen_ms,
                first_poll: poll,
                seen_poll: poll,
                index: index as u32,
                readings: [(0, 0); WINDOW_POLLS],
            });
            if track.first_seen_ms != flow.first_seen_ms {
                track.first_seen_ms = flow.first_seen_ms;
                track.first_poll = poll;
            }
            let (packets, bytes, secs) = match base {
                Some((base_poll, base_ns)) if track.first_poll <= base_poll => {
                    let (p0, b0) = track.readings[slot];
                    (
                        flow.packets.saturating_sub(p0),
                        flow.bytes.saturating_sub(b0),
                        now_ns.saturating_sub(base_ns) as f64 / 1e9,
                    )
                }
                _ => (
                    flow.packets,
                    flow.bytes,
                    (now_ms - flow.first_seen_ms).max(MIN_LIFE_MS) as f64 / 1e3,
                ),
            };
            flow.packets_per_second = packets as f64 / secs;
            flow.bytes_per_second = bytes as f64 / secs;
            track.readings[slot] = (flow.packets, flow.bytes);
            track.seen_poll = poll;
            track.index = index as u32;
        }
        self.tracks.retain(|_, t| t.seen_poll == poll);
    }

    /// Where the flow with `key` is in the flows of the latest
    /// [`FlowRates::update`], if it was among them.
    pub fn position(&self, key: &FlowKey) -> Option<usize> {
        self.tracks.get(key).map(|t| t.index as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(port: u16, packets: u64, first_seen_ms: i64) -> Flow {
        Flow {
            key: FlowKey {
                src_port: port,
                ..FlowKey::default()
            },
            packets,
            bytes: packets * 100,
            first_seen_ms,
            last_seen_ms: first_seen_ms,
            packets_per_second: 0.0,
            bytes_per_second: 0.0,
            opened_by_syn: false,
        }
    }

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn steady_flow_rate_is_its_count_over_the_window() {
        let mut rates = FlowRates::default();
        // 50 packets a second from t=0; polls at t=1..=12 s.
        for t in 1..=12u64 {
            let mut flows = [flow(1, 50 * t, 0)];
            rates.update(t * SEC, t as i64 * 1000, &mut flows);
            assert!(
                (flows[0].packets_per_second - 50.0).abs() < 1e-9,
                "t={t}: {}",
                flows[0].packets_per_second
            );
            assert!((flows[0].bytes_per_second - 5000.0).abs() < 1e-6);
        }
    }

    #[test]
    fn the_window_forgets_what_is_older_than_five_polls() {
        let mut rates = FlowRates::default();
        let mut counts = vec![0u64];
        // 100 packets a second for 10 s, then nothing.
        for t in 1..=20u64 {
            let total = 100 * t.min(10);
            counts.push(total);
            let mut flows = [flow(1, total, 0)];
            rates.update(t * SEC, t as i64 * 1000, &mut flows);
            let want = (total - counts[(t as usize).saturating_sub(5)]) as f64
                / if t > 5 { 5.0 } else { t as f64 };
            assert!(
                (flows[0].packets_per_second - want).abs() < 1e-9,
                "t={t}: {} vs {want}",
                flows[0].packets_per_second
            );
        }
    }

    #[test]
    fn a_young_flow_has_its_rate_over_its_life() {
        let mut rates = FlowRates::default();
        let mut old = [flow(1, 10, 0)];
        for t in 1..=6u64 {
            rates.update(t * SEC, t as i64 * 1000, &mut old);
        }
        // Appeared 400 ms before this poll with 8 packets: 20 a second.
        let mut flows = [flow(2, 8, 5600)];
        rates.update(7 * SEC, 6000, &mut flows);
        assert!((flows[0].packets_per_second - 20.0).abs() < 1e-9);
        // A single packet a moment ago is taken over 100 ms, not 1 ms.
        let mut flows = [flow(3, 1, 5999)];
        rates.update(8 * SEC, 6000, &mut flows);
        assert!((flows[0].packets_per_second - 10.0).abs() < 1e-9);
    }

    #[test]
    fn a_flow_started_again_under_the_same_key_starts_afresh() {
        let mut rates = FlowRates::default();
        for t in 1..=8u64 {
            let mut flows = [flow(1, 1000 * t, 0)];
            rates.update(t * SEC, t as i64 * 1000, &mut flows);
        }
        // Removed as stale, then back with 3 packets in its first 500 ms.
        let mut flows = [flow(1, 3, 8500)];
        rates.update(9 * SEC, 9000, &mut flows);
        assert!((flows[0].packets_per_second - 6.0).abs() < 1e-9);
        assert_eq!(rates.position(&flows[0].key), Some(0));
        rates.update(10 * SEC, 10_000, &mut []);
        assert_eq!(rates.position(&flows[0].key), None);
    }
}
