//! The capabilities loading and attaching need, checked (and raised) before
//! anything is tried, so that a missing one is named instead of surfacing as
//! an opaque EPERM from the kernel.
//!
//! The container image gives the binary these capabilities as *permitted*
//! file capabilities, so a non-root user can run it; they only become
//! effective here, and only when the runtime granted them (its bounding set).

use std::io;

use anyhow::{bail, Context as _};

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit words per set.
const CAP_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct Header {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Data {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// This thread's (effective, permitted) sets as 64-bit masks.
fn get() -> io::Result<(u64, u64, [Data; 2])> {
    let mut header = Header {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget with a v3 header writes exactly two Data structs.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let join = |lo: u32, hi: u32| u64::from(lo) | (u64::from(hi) << 32);
    Ok((
        join(data[0].effective, data[1].effective),
        join(data[0].permitted, data[1].permitted),
        data,
    ))
}

fn bit(cap: u32) -> u64 {
    1u64 << cap
}

/// Makes CAP_BPF and CAP_NET_ADMIN effective if they are permitted, then
/// fails naming each one that is still missing.
pub fn ensure() -> anyhow::Result<()> {
    let wanted = bit(CAP_BPF) | bit(CAP_NET_ADMIN);
    let (effective, permitted, mut data) = get().context("reading this process's capabilities")?;
    let raise = permitted & wanted & !effective;
    if raise != 0 {
        data[0].effective |= raise as u32;
        data[1].effective |= (raise >> 32) as u32;
        let mut header = Header {
            version: CAP_VERSION_3,
            pid: 0,
        };
        // SAFETY: capset with a v3 header reads two Data structs; raising
        // effective bits within the permitted set is always allowed. The
        // threads started later inherit the result.
        let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
        if rc != 0 {
            return Err(io::Error::last_os_error()).context("raising CAP_BPF / CAP_NET_ADMIN");
        }
    }
    let (effective, _, _) = get().context("reading this process's capabilities")?;
    let has = |cap: u32| effective & bit(cap) != 0;
    let mut missing = Vec::new();
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF (to load the program and create its maps)");
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN (to attach it to the interface)");
    }
    if !missing.is_empty() {
        bail!(
            "missing capabilities: {}; grant them to the container (see README, Capabilities)",
            missing.join(", ")
        );
    }
    Ok(())
}
