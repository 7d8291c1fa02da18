//! What the API handlers read: the live snapshot, the sample store and the
//! ledgers of the parts upstream, gathered once by the agent at start.

use std::{sync::Arc, time::Instant};

use crate::{
    flows::LiveState,
    live_view::LiveCache,
    samples::ReaderStats,
    store::{SampleStore, WriterStats},
    stream::Feed,
};

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
    pub live_cache: LiveCache,
    /// `--api-token`: when set, every endpoint but /api/health wants it.
    pub token: Option<String>,
    /// `--flow-map-size`: the flows the kernel map can hold.
    pub flow_map_capacity: u32,
    /// `--sample-rate`: about 1 in this many IP packets has a sample.
    pub sample_rate: u32,
}
