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
