//! One directional flow as the poller read it from the kernel: the unit the
//! live view, the rates and the connection pairing all work on.

use lightshark_common::FlowKey;

/// One directional flow as last read from the kernel.
#[derive(Clone, Debug)]
pub struct Flow {
    pub key: FlowKey,
    pub packets: u64,
    pub bytes: u64,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    /// Current rates (see `flow_rates`).
    pub packets_per_second: f64,
    pub bytes_per_second: f64,
    /// The first packet the kernel saw of it was a TCP SYN without ACK.
    pub opened_by_syn: bool,
}
