//! The live flow table: the kernel's counters read once per poll into an
//! immutable [`Snapshot`] that the API serves, so a request never walks a
//! kernel map.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, RwLock,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use std::os::fd::AsFd as _;

use aya::maps::{HashMap, MapData, PerCpuArray, PerCpuHashMap};
use lightshark_common::{
    protocol_class, protocol_slot, Counter, FlowKey, FlowStats, Totals, FLOW_OPENED_BY_SYN,
    PROTOCOL_CLASSES, PROTOCOL_SLOTS,
};

use crate::{
    clock::WallClock,
    connections::{self, Connection},
    flow::Flow,
    flow_rates::FlowRates,
    interface::Interface,
};

/// How often the kernel's counters are read; the API's numbers lag the
/// kernel by at most this much.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Window of the packets and bytes per second rates.
const RATE_WINDOW: Duration = Duration::from_secs(5);

/// Everything the kernel had counted at one poll.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub totals: Totals,
    /// Packets and bytes by direction and protocol class, indexed
    /// `[direction][class]` (see lightshark_common::CLASS_*).
    pub by_class: [[Counter; PROTOCOL_CLASSES]; 2],
    /// Non-IP frames by ethertype key (see lightshark_common::NONIP_*).
    pub nonip: Vec<(u16, Counter)>,
    /// All flows in the kernel map, most packets first.
    pub flows: Vec<Flow>,
    /// The same flows paired into two-way connections, most packets first.
    pub connections: Vec<Connection>,
    pub packets_per_second: f64,
    pub bytes_per_second: f64,
}

/// The latest snapshot, swapped whole at each poll.
pub struct LiveState {
    current: RwLock<Arc<Snapshot>>,
    /// (index, name) of each watched interface.
    interfaces: Vec<(u32, String)>,
}

impl LiveState {
    /// An empty state for flows seen on `interfaces`.
    pub fn new(interfaces: &[Interface]) -> LiveState {
        LiveState {
            current: RwLock::default(),
            interfaces: interfaces
                .iter()
                .map(|i| (i.index, i.name.clone()))
                .collect(),
        }
    }

    /// The name of the watched interface with this index (a flow key's
    /// `ifindex`).
    pub fn interface_name(&self, ifindex: u32) -> &str {
        self.interfaces
            .iter()
            .find(|(i, _)| *i == ifindex)
            .map_or("", |(_, name)| name.as_str())
    }

    /// The snapshot of the latest poll.
    pub fn get(&self) -> Arc<Snapshot> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set(&self, snapshot: Snapshot) {
        let new = Arc::new(snapshot);
        let old = std::mem::replace(
            &mut *self.current.write().unwrap_or_else(|e| e.into_inner()),
            new,
        );
        // The old snapshot (100k flows at scale) is freed here, after the
        // lock is released: the poller runs at SCHED_IDLE, and freeing it
        // under the lock let every API request wait for an idle thread.
        drop(old);
    }
}

/// The kernel maps this module reads.
pub struct FlowMaps {
    pub flows: HashMap<MapData, FlowKey, FlowStats>,
    pub totals: PerCpuArray<MapData, Totals>,
    pub nonip: PerCpuHashMap<MapData, u16, Counter>,
    pub protocols: PerCpuArray<MapData, Counter>,
}

/// The running poller thread.
pub struct Poller {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl Poller {
    /// Reads the maps now and then every [`POLL_INTERVAL`] into `live`,
    /// deleting flows that have been idle for `timeout` from the kernel map.
    pub fn spawn(mut maps: FlowMaps, live: Arc<LiveState>, timeout: Duration) -> Poller {
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = stop.clone();
        let mut rates = Rates::new();
        let mut flow_rates = FlowRates::default();
        let timeout_ns = timeout.as_nanos() as u64;
        live.set(read(&mut maps, &mut rates, &mut flow_rates, timeout_ns));
        let thread = thread::Builder::new()
            .name("flow-poller".into())
            .spawn(move || {
                crate::priority::background();
                while !stop_flag.load(Ordering::Relaxed) {
                    thread::park_timeout(POLL_INTERVAL);
                    live.set(read(&mut maps, &mut rates, &mut flow_rates, timeout_ns));
                }
            })
            .expect("spawning the flow poller thread");
        Poller { stop, thread }
    }

    /// Takes a last reading and ends.
    pub fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.thread().unpark();
        let _ = self.thread.join();
    }
}

fn read(
    maps: &mut FlowMaps,
    rates: &mut Rates,
    flow_rates: &mut FlowRates,
    timeout_ns: u64,
) -> Snapshot {
    let clock = WallClock::now();
    let now_ns = WallClock::kernel_now_ns();
    let idle = |s: &FlowStats| now_ns.saturating_sub(s.last_seen_ns) >= timeout_ns;
    let totals = sum_totals(maps);
    let by_class = sum_classes(&maps.protocols);
    let mut nonip: Vec<(u16, Counter)> = maps
        .nonip
        .iter()
        .filter_map(Result::ok)
        .map(|(k, per_cpu)| (k, sum(per_cpu.iter())))
        // The "other" entry exists from the start; listed once it counts.
        .filter(|(_, c)| c.packets > 0)
        .collect();
    nonip.sort_by_key(|(k, _)| *k);
    let mut stale = Vec::new();
    let entries = read_all(&maps.flows).unwrap_or_else(|e| {
        log::debug!("batch lookup unavailable ({e}); walking the flow map key by key");
        maps.flows.iter().filter_map(Result::ok).collect()
    });
    let mut flows: Vec<Flow> = entries
        .into_iter()
        .filter(|(key, s)| {
            if idle(s) {
                stale.push(*key);
            }
            !idle(s)
        })
        .map(|(key, s)| Flow {
            key,
            packets: s.packets,
            bytes: s.bytes,
            first_seen_ms: clock.unix_ms(s.first_seen_ns),
            last_seen_ms: clock.unix_ms(s.last_seen_ns),
            packets_per_second: 0.0,
            bytes_per_second: 0.0,
            opened_by_syn: s.flags & FLOW_OPENED_BY_SYN != 0,
        })
        .collect();
    for key in stale {
        // Look again right before deleting: a packet may have arrived since
        // the walk. The totals keep what the flow counted either way.
        if maps.flows.get(&key, 0).is_ok_and(|s| idle(&s)) {
            let _ = maps.flows.remove(&key);
        }
    }
    flows.sort_by(|a, b| b.packets.cmp(&a.packets).then(b.bytes.cmp(&a.bytes)));
    flow_rates.update(now_ns, clock.unix_ms(now_ns), &mut flows);
    let connections = connections::group(&flows, |key| flow_rates.position(key));
    let (packets_per_second, bytes_per_second) = rates.update(totals.packets, totals.bytes);
    Snapshot {
        totals,
        by_class,
        nonip,
        flows,
        connections,
        packets_per_second,
        bytes_per_second,
    }
}

/// Entries per BPF_MAP_LOOKUP_BATCH call; also bounds the largest hash
/// bucket the kernel can return at once (it answers ENOSPC otherwise).
const BATCH: usize = 4096;

/// Every entry of the flow map in a few BPF_MAP_LOOKUP_BATCH calls, instead
/// of two syscalls per flow (100k flows would cost 200k syscalls a poll).
/// aya 0.14 has no batch operations, so this is the raw syscall.
fn read_all(
    map: &HashMap<MapData, FlowKey, FlowStats>,
) -> std::io::Result<Vec<(FlowKey, FlowStats)>> {
    use std::os::fd::AsRawFd as _;
    const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
    #[repr(C)]
    #[derive(Default)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    let fd = aya::maps::IterableMap::map(map).fd().as_fd().as_raw_fd();
    let mut keys = vec![FlowKey::default(); BATCH];
    let mut values = vec![FlowStats::default(); BATCH];
    // The batch tokens are opaque to user space; the kernel writes at most
    // a key's worth.
    let mut tokens = [[0u8; std::mem::size_of::<FlowKey>()]; 2];
    let mut out = Vec::new();
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { tokens[0].as_ptr() as u64 },
            out_batch: tokens[1].as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH as u32,
            map_fd: fd as u32,
            ..BatchAttr::default()
        };
        // SAFETY: the kernel writes at most `count` keys and values into
        // buffers of that many elements, and one token into `tokens[1]`.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr,
                std::mem::size_of::<BatchAttr>(),
            )
        };
        let err = std::io::Error::last_os_error();
        let n = attr.count as usize;
        if rc == 0 || err.raw_os_error() == Some(libc::ENOENT) {
            out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
        }
        if rc != 0 {
            return match err.raw_os_error() {
                // ENOENT: the walk is complete.
                Some(libc::ENOENT) => Ok(out),
                _ => Err(err),
            };
        }
        tokens[0] = tokens[1];
        first = false;
    }
}

fn sum_totals(maps: &FlowMaps) -> Totals {
    let Ok(per_cpu) = maps.totals.get(&0, 0) else {
        return Totals::default();
    };
    per_cpu.iter().fold(Totals::default(), |a, t| Totals {
        packets: a.packets + t.packets,
        bytes: a.bytes + t.bytes,
        ingress_packets: a.ingress_packets + t.ingress_packets,
        ingress_bytes: a.ingress_bytes + t.ingress_bytes,
        egress_packets: a.egress_packets + t.egress_packets,
        egress_bytes: a.egress_bytes + t.egress_bytes,
        nonip_packets: a.nonip_packets + t.nonip_packets,
        nonip_bytes: a.nonip_bytes + t.nonip_bytes,
        samples: a.samples + t.samples,
        sample_segments: a.sample_segments + t.sample_segments,
        ringbuf_drops: a.ringbuf_drops + t.ringbuf_drops,
        ringbuf_drop_segments: a.ringbuf_drop_segments + t.ringbuf_drop_segments,
        flow_map_full: a.flow_map_full + t.flow_map_full,
        filtered_out: a.filtered_out + t.filtered_out,
        sampled_out: a.sampled_out + t.sampled_out,
        sampled_out_segments: a.sampled_out_segments + t.sampled_out_segments,
        protocol_scratch: 0,
    })
}

/// The per-protocol counters folded into protocol classes, by direction.
fn sum_classes(protocols: &PerCpuArray<MapData, Counter>) -> [[Counter; PROTOCOL_CLASSES]; 2] {
    let mut out = [[Counter::default(); PROTOCOL_CLASSES]; 2];
    for (direction, classes) in out.iter_mut().enumerate() {
        for protocol in 0..PROTOCOL_SLOTS {
            let slot = protocol_slot(direction as u8, protocol);
            if let Ok(per_cpu) = protocols.get(&slot, 0) {
                let c = &mut classes[protocol_class(protocol)];
                *c = sum([*c].iter().chain(per_cpu.iter()));
            }
        }
    }
    out
}

/// One counter's per-CPU values added up.
fn sum<'a>(per_cpu: impl Iterator<Item = &'a Counter>) -> Counter {
    per_cpu.fold(Counter::default(), |a, c| Counter {
        packets: a.packets + c.packets,
        bytes: a.bytes + c.bytes,
    })
}

/// Packets and bytes per second over the last [`RATE_WINDOW`], or over the
/// uptime until that much has passed.
struct Rates {
    /// (when, packets, bytes), oldest first; starts with the zero at start.
    points: VecDeque<(Instant, u64, u64)>,
}

impl Rates {
    fn new() -> Rates {
        Rates {
            points: VecDeque::from([(Instant::now(), 0, 0)]),
        }
    }

    fn update(&mut self, packets: u64, bytes: u64) -> (f64, f64) {
        let now = Instant::now();
        // Keep the newest point that is at least a window old as the base.
        while self.points.len() > 1 && now.duration_since(self.points[1].0) >= RATE_WINDOW {
            self.points.pop_front();
        }
        let (since, p0, b0) = self.points[0];
        self.points.push_back((now, packets, bytes));
        let secs = now.duration_since(since).as_secs_f64();
        if secs <= 0.0 {
            return (0.0, 0.0);
        }
        (
            packets.saturating_sub(p0) as f64 / secs,
            bytes.saturating_sub(b0) as f64 / secs,
        )
    }
}
