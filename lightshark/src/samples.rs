//! Draining the kernel's sample ring buffer into batches for the store.
//!
//! The kernel submits records without waking anyone (a wakeup per record was
//! measured here to cost 0.58 of the packet rate), so this thread drains on a
//! short timer. It never waits on the database: batches go to the store's
//! queue, and when that queue already holds [`MAX_QUEUED`] samples the batch
//! is dropped and counted as writer backlog instead of stalling the ring.

use std::{
    mem, ptr,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc::Sender,
        Arc,
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use lightshark_common::Sample;

use crate::{clock::WallClock, ledger::Tally};

/// Samples allowed to wait for the writer (64 bytes each in memory).
pub const MAX_QUEUED: u64 = 262_144;
/// Pause after the ring has been drained dry. At 200k packets/s this leaves
/// about 200 records per wake, far below the ring's size.
const DRAIN_PERIOD: Duration = Duration::from_millis(1);
/// Largest batch handed over at once, so the writer can start early.
const MAX_BATCH: usize = 8192;

/// Samples taken from the ring, with the clock to date them by.
pub struct Batch {
    pub clock: WallClock,
    pub samples: Vec<Sample>,
    /// The captured bytes of every sample, one after the other: each
    /// sample's `captured` says how many are its own.
    pub bytes: Vec<u8>,
}

impl Batch {
    fn new(clock: WallClock) -> Batch {
        Batch {
            clock,
            samples: Vec::new(),
            bytes: Vec::new(),
        }
    }

    /// Each sample with its captured bytes.
    pub fn iter(&self) -> impl Iterator<Item = (&Sample, &[u8])> {
        let mut at = 0;
        self.samples.iter().map(move |s| {
            let end = at + usize::from(s.captured);
            let bytes = &self.bytes[at..end];
            at = end;
            (s, bytes)
        })
    }
}

/// What the reader has seen, for the loss ledger in `/api/stats`.
#[derive(Default)]
pub struct ReaderStats {
    /// Records taken out of the ring buffer.
    pub received: Tally,
    /// Dropped because the writer was too far behind.
    pub backlog_dropped: Tally,
    /// Handed to the store and not yet taken by it (the store subtracts).
    pub queued: Tally,
}

/// Wire segments of a run of samples.
pub fn segments_of<'a>(samples: impl IntoIterator<Item = &'a Sample>) -> u64 {
    samples.into_iter().map(|s| u64::from(s.segments)).sum()
}

/// The running reader thread.
pub struct Reader {
    stop: Arc<AtomicBool>,
    stats: Arc<ReaderStats>,
    thread: JoinHandle<(RingBuf<MapData>, Sender<Batch>)>,
}

impl Reader {
    /// Starts draining `ring` into `out`.
    pub fn spawn(ring: RingBuf<MapData>, out: Sender<Batch>, stats: Arc<ReaderStats>) -> Reader {
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = stop.clone();
        let thread_stats = stats.clone();
        let thread = thread::Builder::new()
            .name("ring-reader".into())
            .spawn(move || {
                crate::priority::background();
                run(ring, out, &thread_stats, &stop_flag)
            })
            .expect("spawning the ring reader thread");
        Reader {
            stop,
            stats,
            thread,
        }
    }

    /// Drains what is left and ends. Call after the program is detached, so
    /// that "left" is everything the kernel will ever emit. The last drain
    /// runs on the calling thread: the reader's own runs at idle priority,
    /// and on a saturated node it would wait long for the CPU (measured: a
    /// SIGTERM took 32 s, past Kubernetes' 30 s grace period).
    pub fn finish(self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Ok((mut ring, out)) = self.thread.join() {
            drain(&mut ring, &out, &self.stats, None);
        }
    }
}

/// Drains on a timer until `stop` is set, then hands the ring back.
fn run(
    mut ring: RingBuf<MapData>,
    out: Sender<Batch>,
    stats: &ReaderStats,
    stop: &AtomicBool,
) -> (RingBuf<MapData>, Sender<Batch>) {
    while !stop.load(Ordering::SeqCst) {
        drain(&mut ring, &out, stats, Some(stop));
        thread::sleep(DRAIN_PERIOD);
    }
    (ring, out)
}

/// Takes every record out of the ring into batches for the store, or stops
/// early once `stop` is set.
fn drain(
    ring: &mut RingBuf<MapData>,
    out: &Sender<Batch>,
    stats: &ReaderStats,
    stop: Option<&AtomicBool>,
) {
    let clock = WallClock::now();
    let mut batch = Batch::new(clock);
    while let Some(item) = ring.next() {
        if let Some(sample) = parse_record(&item) {
            let start = mem::size_of::<Sample>();
            batch
                .bytes
                .extend_from_slice(&item[start..start + usize::from(sample.captured)]);
            batch.samples.push(sample);
            if batch.samples.len() >= MAX_BATCH {
                hand_over(out, stats, mem::replace(&mut batch, Batch::new(clock)));
            }
        }
        if stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
            break;
        }
    }
    hand_over(out, stats, batch);
}

/// The sample at the start of a ring record, with `captured` trimmed to the
/// bytes the record really holds; None for a record too short to be one.
fn parse_record(item: &[u8]) -> Option<Sample> {
    let start = mem::size_of::<Sample>();
    if item.len() < start {
        return None;
    }
    // SAFETY: the record is at least one Sample long, Sample is plain data,
    // and the read tolerates any alignment.
    let mut sample = unsafe { ptr::read_unaligned(item.as_ptr().cast::<Sample>()) };
    sample.captured = sample.captured.min((item.len() - start) as u16);
    Some(sample)
}

fn hand_over(out: &Sender<Batch>, stats: &ReaderStats, batch: Batch) {
    if batch.samples.is_empty() {
        return;
    }
    let n = batch.samples.len() as u64;
    let segments = segments_of(&batch.samples);
    stats.received.add(n, segments);
    if stats.queued.samples() + n > MAX_QUEUED {
        stats.backlog_dropped.add(n, segments);
        return;
    }
    stats.queued.add(n, segments);
    if out.send(batch).is_err() {
        // The store is gone (it failed for good); count, do not panic.
        stats.queued.sub(n, segments);
        stats.backlog_dropped.add(n, segments);
    }
}
