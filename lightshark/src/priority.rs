//! The agent's own work runs at the lowest CPU priority, so that on a busy
//! node the service being watched always comes first. Measured here: with
//! the history writer at normal priority, iperf3 through the watched veth
//! lost about half its throughput on a 2-core machine; at SCHED_IDLE it
//! kept its rate and no sample was dropped, since idle CPU was left over.
//! Samples that cannot be written in time are counted as dropped, never lost
//! silently.

/// Puts the calling thread in SCHED_IDLE: it runs only on CPU time nothing
/// else wants. For every thread of the agent's own work (ring reader,
/// history writer, map poller); the API threads keep normal priority so
/// that health probes answer on a busy node.
pub fn background() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler on the calling thread (pid 0) with a valid
    // parameter; failure leaves the thread at normal priority.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
    if rc != 0 {
        log::debug!(
            "could not lower this thread's priority: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Asks the scheduler for short time slices on the calling thread (an API
/// worker): the thread is then picked sooner when a request arrives, and
/// its share of the CPU stays what it was (EEVDF custom slices, Linux 6.12
/// and later; older kernels keep the default). With 32 clients hammering
/// `/api/live` the tail latency was scheduling, not work: a request that
/// arrives while both cores run something else waits for a slice to end.
pub fn short_slices() {
    /// The kernel's smallest slice, 0.1 ms.
    const SLICE_NS: u64 = 100_000;
    #[repr(C)]
    struct SchedAttr {
        size: u32,
        policy: u32,
        flags: u64,
        nice: i32,
        priority: u32,
        runtime: u64,
        deadline: u64,
        period: u64,
    }
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        policy: libc::SCHED_OTHER as u32,
        flags: 0,
        nice: 0,
        priority: 0,
        runtime: SLICE_NS,
        deadline: 0,
        period: 0,
    };
    // SAFETY: sched_setattr on the calling thread with a complete struct of
    // the size it declares; failure leaves the default slice.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr, 0) };
    if rc != 0 {
        log::debug!(
            "could not shorten this thread's time slices: {}",
            std::io::Error::last_os_error()
        );
    }
}
