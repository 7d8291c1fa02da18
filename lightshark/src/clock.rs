//! Turning kernel timestamps (`bpf_ktime_get_ns`, CLOCK_MONOTONIC) into
//! wall-clock Unix milliseconds.

fn now_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec; both clocks always exist.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

/// The offset from the kernel's monotonic clock to the wall clock, read
/// afresh by each caller batch so that a wall-clock step (NTP) is followed.
#[derive(Clone, Copy, Debug)]
pub struct WallClock {
    offset_ns: i128,
}

impl WallClock {
    /// Reads both clocks now.
    pub fn now() -> WallClock {
        let mono = now_ns(libc::CLOCK_MONOTONIC);
        let real = now_ns(libc::CLOCK_REALTIME);
        WallClock {
            offset_ns: real - mono,
        }
    }

    /// Unix milliseconds of a kernel monotonic timestamp.
    pub fn unix_ms(&self, kernel_ns: u64) -> i64 {
        ((i128::from(kernel_ns) + self.offset_ns) / 1_000_000) as i64
    }

    /// Unix milliseconds of this moment.
    pub fn now_unix_ms() -> i64 {
        (now_ns(libc::CLOCK_REALTIME) / 1_000_000) as i64
    }

    /// The kernel's monotonic clock now, in the units of kernel timestamps.
    pub fn kernel_now_ns() -> u64 {
        now_ns(libc::CLOCK_MONOTONIC) as u64
    }
}
