//! Counting samples on their way from the ring buffer to SQLite, so that
//! `stored + dropped + pending == emitted` can be checked at any moment.

use std::sync::atomic::{AtomicU64, Ordering};

/// A number of samples and of the wire segments they stand for (a GSO
/// packet is one sample of several segments), updated together.
#[derive(Default)]
pub struct Tally {
    samples: AtomicU64,
    segments: AtomicU64,
}

impl Tally {
    pub fn add(&self, samples: u64, segments: u64) {
        self.samples.fetch_add(samples, Ordering::Relaxed);
        self.segments.fetch_add(segments, Ordering::Relaxed);
    }

    pub fn sub(&self, samples: u64, segments: u64) {
        self.samples.fetch_sub(samples, Ordering::Relaxed);
        self.segments.fetch_sub(segments, Ordering::Relaxed);
    }

    pub fn samples(&self) -> u64 {
        self.samples.load(Ordering::Relaxed)
    }

    pub fn segments(&self) -> u64 {
        self.segments.load(Ordering::Relaxed)
    }
}
