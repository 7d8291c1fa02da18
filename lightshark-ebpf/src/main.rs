//! The TC classifier: counts every frame on an interface and emits one sample
//! per kernel packet of an IP flow. It never drops or alters a packet and
//! always lets the programs after it run.
//!
//! Every header read goes through `bpf_skb_load_bytes`, which works on
//! non-linear packets (over about 4 KB only the MAC header is in the linear
//! part), and every walk stops at the smaller of the IP header's own length
//! field and the bytes present, so a cut-short frame yields what can be read
//! and nothing invented.
#![no_std]
#![no_main]
// core's AtomicU64 has no fetch_add on the BPF target; the intrinsic compiles
// to the BPF atomic add instruction.
#![feature(core_intrinsics)]
#![allow(internal_features)]

use core::intrinsics::{atomic_xadd, AtomicOrdering};

use aya_ebpf::{
    bindings::{BPF_NOEXIST, BPF_RB_NO_WAKEUP, TC_ACT_UNSPEC},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_skb_load_bytes},
    macros::{classifier, map},
    maps::{HashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::TcContext,
};
use lightshark_common::{
    protocol_slot, Captured, Counter, Filter, FlowKey, FlowStats, Sample, Snap, Totals,
    DIRECTION_EGRESS, DIRECTION_INGRESS, FAMILY_IPV4, FAMILY_IPV6, FILTER_ADDR, FILTER_PORT,
    FILTER_PROTOCOL, FLOW_OPENED_BY_SYN, MAX_CAPTURE, NONIP_LLC, NONIP_OTHER, NONIP_RUNT,
    NON_IP_SLOT, PROTOCOL_SLOTS, SAMPLE_RAW_IP,
};

/// Sizes here are defaults; the agent sets the real ones at load time.
#[map]
static FLOWS: HashMap<FlowKey, FlowStats> = HashMap::with_max_entries(131_072, 0);
#[map]
static TOTALS: PerCpuArray<Totals> = PerCpuArray::with_max_entries(1, 0);
#[map]
static NONIP: PerCpuHashMap<u16, Counter> = PerCpuHashMap::with_max_entries(1024, 0);
#[map]
static PROTOCOLS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(2 * PROTOCOL_SLOTS, 0);
#[map]
static SAMPLES: RingBuf = RingBuf::with_byte_size(8 << 20, 0);

/// Set by the agent at load time (aya rewrites this global); all zero, the
/// default, counts everything.
#[unsafe(no_mangle)]
static FILTER: Filter = Filter {
    flags: 0,
    port: 0,
    protocol: 0,
    family: 0,
    addr: [0; 16],
};

/// Set by the agent at load time like [`FILTER`]; all zero captures nothing.
#[unsafe(no_mangle)]
static SNAP: Snap = Snap {
    max_bytes: 0,
    headers_only: 0,
};

/// Set by the agent at load time like [`FILTER`]: sample each IP packet with
/// probability 1/N; 0 and 1 sample every one.
#[unsafe(no_mangle)]
static SAMPLE_RATE: u32 = 0;

/// The smaller record size for captured bytes; anything longer takes a
/// [`MAX_CAPTURE`] record. Most header stacks (Ethernet, IP, TCP with
/// options) fit the smaller one.
const SMALL_CAPTURE: u32 = 128;

const ETH_HLEN: u32 = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
/// Type fields below this are 802.3 lengths, not ethertypes.
const ETH_P_802_3_MIN: u16 = 0x0600;
/// Tags beyond this many are left unwalked (the frame then counts as non-IP
/// under the tag's ethertype); real networks stack two, rarely three.
const MAX_VLAN_TAGS: usize = 6;
/// IPv6 extension headers walked before giving up on finding the protocol.
const MAX_IPV6_EXT: usize = 8;

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_DSTOPTS: u8 = 60;
const IPPROTO_SCTP: u8 = 132;
const IPPROTO_UDPLITE: u8 = 136;
/// TCP header flag bits (byte 13 of the header).
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// TCX_NEXT on a TCX link and TC_ACT_UNSPEC on a legacy filter are the same
/// value: "no verdict, run whatever comes next".
const PASS: i32 = TC_ACT_UNSPEC;

#[classifier]
pub fn ls_eth_ingress(ctx: TcContext) -> i32 {
    observe::<true>(&ctx, DIRECTION_INGRESS);
    PASS
}

#[classifier]
pub fn ls_eth_egress(ctx: TcContext) -> i32 {
    observe::<true>(&ctx, DIRECTION_EGRESS);
    PASS
}

#[classifier]
pub fn ls_raw_ingress(ctx: TcContext) -> i32 {
    observe::<false>(&ctx, DIRECTION_INGRESS);
    PASS
}

#[classifier]
pub fn ls_raw_egress(ctx: TcContext) -> i32 {
    observe::<false>(&ctx, DIRECTION_EGRESS);
    PASS
}

/// What the parser found in one frame.
enum Parsed {
    /// An IP packet: its flow key, where its L4 header starts, whether
    /// that header is there (its ports were read), and whether it is a TCP
    /// SYN without ACK.
    Ip {
        key: FlowKey,
        l4: u32,
        has_l4: bool,
        syn_only: bool,
    },
    /// Anything without a readable IP header, by ethertype (or
    /// [`NONIP_LLC`] / [`NONIP_RUNT`]).
    NonIp(u16),
}

#[inline(always)]
fn observe<const ETHERNET: bool>(ctx: &TcContext, direction: u8) {
    let skb = unsafe { &*ctx.skb.skb };
    let len = skb.len;
    // On receive the kernel moves the outer VLAN tag out of the packet before
    // TC runs; it was on the wire, so it is counted back in every segment.
    let tag = if skb.vlan_present != 0 { 4 } else { 0 };
    let segments = if skb.gso_segs > 1 { skb.gso_segs } else { 1 };

    let parsed = if ETHERNET {
        parse_ethernet(ctx, len)
    } else {
        parse_raw(ctx, len, skb.protocol)
    };

    // Read through volatile loads so the compiler cannot fold the load-time
    // values of the globals into constants.
    let snap = unsafe { core::ptr::read_volatile(&raw const SNAP) };
    // Where the headers end: each extra GSO segment repeats them, and a
    // headers-only capture stops there. Only then is the L4 header's
    // length worth a read.
    let need_l4_len = segments > 1 || snap.headers_only != 0;
    let headers_end = match &parsed {
        Parsed::Ip {
            key, l4, has_l4, ..
        } if need_l4_len && *has_l4 => *l4 + l4_header_len(ctx, key.protocol, *l4),
        Parsed::Ip { key, l4, .. }
            if need_l4_len && (key.protocol == IPPROTO_ICMP || key.protocol == IPPROTO_ICMPV6) =>
        {
            *l4 + 8
        }
        Parsed::Ip { l4, .. } => *l4,
        Parsed::NonIp(_) => 0,
    };
    let wire = len as u64 + tag + (segments as u64 - 1) * (headers_end as u64 + tag);
    let segs = segments as u64;

    let Some(totals) = TOTALS.get_ptr_mut(0) else {
        return;
    };
    let totals = unsafe { &mut *totals };
    let filter = unsafe { core::ptr::read_volatile(&raw const FILTER) };
    if filter.flags != 0 && !matches_filter(&filter, &parsed) {
        totals.filtered_out += segs;
        return;
    }
    totals.packets += segs;
    totals.bytes += wire;
    if direction == DIRECTION_INGRESS {
        totals.ingress_packets += segs;
        totals.ingress_bytes += wire;
    } else {
        totals.egress_packets += segs;
        totals.egress_bytes += wire;
    }

    match parsed {
        Parsed::NonIp(ethertype) => {
            totals.nonip_packets += segs;
            totals.nonip_bytes += wire;
            count_protocol(direction, NON_IP_SLOT, segs, wire);
            count_nonip(ethertype, segs, wire);
        }
        Parsed::Ip {
            mut key, syn_only, ..
        } => {
            let protocol = untraced(&mut totals.protocol_scratch, key.protocol);
            count_protocol(direction, protocol, segs, wire);
            key.ifindex = skb.ifindex;
            let now = unsafe { bpf_ktime_get_ns() };
            if !count_flow(&key, segs, wire, now, syn_only) {
                totals.flow_map_full += segs;
            }
            // Random, not every Nth: a fixed stride would lock onto traffic
            // with a period (request, reply, ack) and sample one kind only.
            let rate = unsafe { core::ptr::read_volatile(&raw const SAMPLE_RATE) };
            if rate > 1 && unsafe { bpf_get_prandom_u32() } % rate != 0 {
                totals.sampled_out += 1;
                totals.sampled_out_segments += segs;
                return;
            }
            totals.samples += 1;
            totals.sample_segments += segs;
            let sample = Sample {
                timestamp_ns: now,
                key,
                wire_len: wire as u32,
                segments: segments as u16,
                direction,
                flags: if ETHERNET { 0 } else { SAMPLE_RAW_IP },
                captured: 0,
                _pad2: 0,
            };
            let want = if snap.headers_only != 0 {
                min(headers_end, snap.max_bytes)
            } else {
                snap.max_bytes
            };
            let want = min(want, len);
            let emitted = if want == 0 {
                emit_plain(sample)
            } else if want <= SMALL_CAPTURE {
                emit_captured::<{ SMALL_CAPTURE as usize }>(ctx, sample, want)
            } else {
                emit_captured::<{ MAX_CAPTURE as usize }>(ctx, sample, want)
            };
            if !emitted {
                totals.ringbuf_drops += 1;
                totals.ringbuf_drop_segments += segs;
            }
        }
    }
}

// Records are written straight into the ring (no copy through the stack),
// and submitted without a wakeup: the agent drains on a timer. Waking the
// reader per record was measured here at 0.42 of the unmonitored packet rate.

/// A sample without packet bytes; false when the ring is full.
#[inline(always)]
fn emit_plain(sample: Sample) -> bool {
    match SAMPLES.reserve::<Sample>(0) {
        Some(mut entry) => {
            entry.write(sample);
            entry.submit(BPF_RB_NO_WAKEUP as u64);
            true
        }
        None => false,
    }
}

/// A sample followed by the packet's first `want` bytes (1 to `N`); false
/// when the ring is full.
#[inline(always)]
fn emit_captured<const N: usize>(ctx: &TcContext, mut sample: Sample, want: u32) -> bool {
    let Some(mut entry) = SAMPLES.reserve::<Captured<N>>(0) else {
        return false;
    };
    let record = entry.as_mut_ptr();
    // 1 to N bytes, in the form the verifier can follow: the caller's
    // checks are on another register once compiled, and the compiler would
    // drop a plain clamp as redundant, so the value is hidden from it and
    // masked (N is a power of two; `want` is already 1 to N, so the mask
    // changes nothing).
    let n = core::hint::black_box(want as u64);
    let n = (n.wrapping_sub(1) & (N as u64 - 1)) + 1;
    // SAFETY: `bytes` is N bytes of the reserved record and n <= N.
    let rc = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb as *const _,
            0,
            (&raw mut (*record).bytes).cast(),
            n as u32,
        )
    };
    if rc == 0 {
        sample.captured = n as u16;
    }
    // SAFETY: the record is ours until submitted.
    unsafe { (&raw mut (*record).sample).write(sample) };
    entry.submit(BPF_RB_NO_WAKEUP as u64);
    true
}

/// Whether a packet passes every filter that is set. Non-IP frames never do.
#[inline(always)]
fn matches_filter(filter: &Filter, parsed: &Parsed) -> bool {
    let Parsed::Ip { key, .. } = parsed else {
        return false;
    };
    if filter.flags & FILTER_PROTOCOL != 0 && key.protocol != filter.protocol {
        return false;
    }
    // Ports are 0 where a packet carries none, and the agent never asks
    // for port 0, so later fragments and ICMP never match a port filter.
    if filter.flags & FILTER_PORT != 0 && key.src_port != filter.port && key.dst_port != filter.port
    {
        return false;
    }
    if filter.flags & FILTER_ADDR != 0
        && (key.family != filter.family
            || (!same_addr(&key.src_addr, &filter.addr) && !same_addr(&key.dst_addr, &filter.addr)))
    {
        return false;
    }
    true
}

/// Compares addresses as one integer: an array comparison may become a
/// memcmp call, which BPF does not have.
#[inline(always)]
fn same_addr(a: &[u8; 16], b: &[u8; 16]) -> bool {
    u128::from_ne_bytes(*a) == u128::from_ne_bytes(*b)
}

/// Adds to the flow's entry, creating it if needed (marked as opened by a
/// SYN when this first packet is one). Returns false when the map is full
/// and the flow has no entry.
#[inline(always)]
fn count_flow(key: &FlowKey, segs: u64, wire: u64, now: u64, syn_only: bool) -> bool {
    if add_to_flow(key, segs, wire, now) {
        return true;
    }
    let fresh = FlowStats {
        packets: segs,
        bytes: wire,
        first_seen_ns: now,
        last_seen_ns: now,
        flags: if syn_only { FLOW_OPENED_BY_SYN } else { 0 },
        _pad: 0,
    };
    match FLOWS.insert(key, &fresh, BPF_NOEXIST as u64) {
        Ok(()) => true,
        // Another CPU created it between our lookup and insert.
        Err(_) => add_to_flow(key, segs, wire, now),
    }
}

#[inline(always)]
fn add_to_flow(key: &FlowKey, segs: u64, wire: u64, now: u64) -> bool {
    let Some(stats) = FLOWS.get_ptr_mut(key) else {
        return false;
    };
    // The flow map is shared by all CPUs, so counters are added atomically.
    unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*stats).packets, segs);
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*stats).bytes, wire);
        (*stats).last_seen_ns = now;
    }
    true
}

/// Adds to the counter of a direction and IP protocol number (or
/// [`NON_IP_SLOT`]). A map of its own, not an array in Totals: an index
/// into map memory is pointer arithmetic that, without CAP_PERFMON, makes
/// the verifier compare states more strictly everywhere (past its
/// instruction limit); a lookup returns the slot's address.
#[inline(always)]
fn count_protocol(direction: u8, protocol: u32, segs: u64, wire: u64) {
    if let Some(c) = PROTOCOLS.get_ptr_mut(protocol_slot(direction, protocol)) {
        add_to(unsafe { &mut *c }, segs, wire);
    }
}

/// The protocol number as a value the verifier does not trace back: it
/// goes through `scratch` (map memory, which the verifier does not track).
/// Used straight from the parser as a key, it would make the verifier tell
/// apart every parsing path that knows a different protocol, and the
/// program went past its million-instruction limit.
#[inline(always)]
fn untraced(scratch: &mut u64, protocol: u8) -> u32 {
    // SAFETY: a per-CPU field of ours; volatile so that the value is not
    // forwarded from the register.
    unsafe {
        core::ptr::write_volatile(scratch, protocol as u64);
        core::ptr::read_volatile(scratch) as u8 as u32
    }
}

#[inline(always)]
fn count_nonip(ethertype: u16, segs: u64, wire: u64) {
    if add_to_nonip(ethertype, segs, wire) {
        return;
    }
    let fresh = Counter {
        packets: segs,
        bytes: wire,
    };
    if NONIP.insert(ethertype, &fresh, BPF_NOEXIST as u64).is_ok() {
        return;
    }
    // The map is full (over a thousand distinct ethertypes): count the frame
    // under "other", which the agent created at load.
    add_to_nonip(NONIP_OTHER, segs, wire);
}

/// Adds to this CPU's counter of `key`; false when it has no entry.
#[inline(always)]
fn add_to_nonip(key: u16, segs: u64, wire: u64) -> bool {
    let Some(c) = NONIP.get_ptr_mut(key) else {
        return false;
    };
    add_to(unsafe { &mut *c }, segs, wire);
    true
}

/// Adds to a per-CPU counter (no other CPU writes it: no atomics needed).
#[inline(always)]
fn add_to(c: &mut Counter, segs: u64, wire: u64) {
    c.packets += segs;
    c.bytes += wire;
}

#[inline(always)]
fn load_u8(ctx: &TcContext, off: u32) -> Option<u8> {
    ctx.load::<u8>(off as usize).ok()
}

#[inline(always)]
fn load_be16(ctx: &TcContext, off: u32) -> Option<u16> {
    ctx.load::<[u8; 2]>(off as usize)
        .ok()
        .map(u16::from_be_bytes)
}

/// Untagged Ethernet, IPv4 without options and the first four L4 bytes:
/// the common frame, read in one helper call instead of three.
const FAST_IPV4_LEN: u32 = ETH_HLEN + 20 + 4;
/// The same frame up to its TCP flags byte (the 14th of the TCP header).
const FAST_TCP_LEN: u32 = ETH_HLEN + 20 + 14;

#[inline(always)]
fn parse_ethernet(ctx: &TcContext, len: u32) -> Parsed {
    // Read in place when the bytes are in the linear part (no helper call).
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + FAST_IPV4_LEN as usize <= end {
        // SAFETY: the check above is the bound the verifier wants: these
        // bytes are inside the packet.
        let h = unsafe { &*(data as *const [u8; FAST_IPV4_LEN as usize]) };
        if h[12] == 0x08 && h[13] == 0x00 && h[14] == 0x45 {
            let mut ip = [0u8; 20];
            ip.copy_from_slice(&h[14..34]);
            let (key, l4, limit, later) = ipv4_header(&ip, ETH_HLEN, len);
            let flags = if key.protocol == IPPROTO_TCP && data + FAST_TCP_LEN as usize <= end {
                // SAFETY: bounded by the check just made.
                Some(unsafe { *((data + FAST_TCP_LEN as usize - 1) as *const u8) })
            } else {
                None
            };
            return finish_l4(
                ctx,
                key,
                l4,
                limit,
                later,
                Some(([h[34], h[35], h[36], h[37]], flags)),
            );
        }
    }
    if len < ETH_HLEN {
        return Parsed::NonIp(NONIP_RUNT);
    }
    let Some(mut ethertype) = load_be16(ctx, 12) else {
        return Parsed::NonIp(NONIP_RUNT);
    };
    let mut off = ETH_HLEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        // The tag's own type field sits in its last two bytes.
        match load_be16(ctx, off + 2) {
            Some(t) if off + 4 <= len => {
                ethertype = t;
                off += 4;
            }
            _ => break,
        }
    }
    match ethertype {
        ETH_P_IP => parse_ipv4(ctx, off, len),
        ETH_P_IPV6 => parse_ipv6(ctx, off, len),
        t if t < ETH_P_802_3_MIN => Parsed::NonIp(NONIP_LLC),
        t => Parsed::NonIp(t),
    }
}

/// tun and WireGuard interfaces hand TC the IP header first; the kernel's
/// protocol field (network byte order in `__sk_buff`) says which.
#[inline(always)]
fn parse_raw(ctx: &TcContext, len: u32, protocol: u32) -> Parsed {
    match u16::from_be(protocol as u16) {
        ETH_P_IP => parse_ipv4(ctx, 0, len),
        ETH_P_IPV6 => parse_ipv6(ctx, 0, len),
        t if t < ETH_P_802_3_MIN => Parsed::NonIp(NONIP_LLC),
        t => Parsed::NonIp(t),
    }
}

#[inline(always)]
fn parse_ipv4(ctx: &TcContext, off: u32, len: u32) -> Parsed {
    let Ok(hdr) = ctx.load::<[u8; 20]>(off as usize) else {
        return Parsed::NonIp(ETH_P_IP);
    };
    let (key, l4, limit, later) = ipv4_header(&hdr, off, len);
    finish_l4(ctx, key, l4, limit, later, None)
}

/// The key of an IPv4 header at `off`, where its L4 header starts, the end
/// of what may be read (IP's own length, or the bytes present), and whether
/// it is a later fragment.
#[inline(always)]
fn ipv4_header(hdr: &[u8; 20], off: u32, len: u32) -> (FlowKey, u32, u32, bool) {
    let ihl = ((hdr[0] & 0x0f) as u32) * 4;
    let total = u16::from_be_bytes([hdr[2], hdr[3]]) as u32;
    // A zero total length is how BIG TCP marks packets over 64 KB; the
    // bytes present are then the only bound.
    let limit = if total == 0 {
        len
    } else {
        min(len, off + total)
    };
    let frag = u16::from_be_bytes([hdr[6], hdr[7]]);
    let mut key = FlowKey {
        protocol: hdr[9],
        family: FAMILY_IPV4,
        ..FlowKey::default()
    };
    key.src_addr[..4].copy_from_slice(&hdr[12..16]);
    key.dst_addr[..4].copy_from_slice(&hdr[16..20]);
    let l4 = off + if ihl < 20 { 20 } else { ihl };
    (key, l4, limit, frag & 0x1fff != 0)
}

#[inline(always)]
fn parse_ipv6(ctx: &TcContext, off: u32, len: u32) -> Parsed {
    let Ok(hdr) = ctx.load::<[u8; 40]>(off as usize) else {
        return Parsed::NonIp(ETH_P_IPV6);
    };
    let payload = u16::from_be_bytes([hdr[4], hdr[5]]) as u32;
    let mut next = hdr[6];
    // A zero payload length behind a Hop-by-Hop header is a jumbogram (or
    // BIG TCP): its real length is in an option, the bytes present bound it.
    let limit = if payload == 0 && next == IPPROTO_HOPOPTS {
        len
    } else {
        min(len, off + 40 + payload)
    };
    let mut key = FlowKey {
        family: FAMILY_IPV6,
        ..FlowKey::default()
    };
    key.src_addr.copy_from_slice(&hdr[8..24]);
    key.dst_addr.copy_from_slice(&hdr[24..40]);

    let mut pos = off + 40;
    let mut later_fragment = false;
    for _ in 0..MAX_IPV6_EXT {
        let size = match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => 0,
            IPPROTO_FRAGMENT => 8,
            _ => break,
        };
        // A header that does not fit keys the packet under its own number.
        if pos + 8 > limit {
            break;
        }
        let Ok(ext) = ctx.load::<[u8; 4]>(pos as usize) else {
            break;
        };
        if size == 8 {
            later_fragment = u16::from_be_bytes([ext[2], ext[3]]) & 0xfff8 != 0;
            pos += 8;
        } else {
            pos += (ext[1] as u32 + 1) * 8;
        }
        next = ext[0];
    }
    key.protocol = next;
    finish_l4(ctx, key, pos, limit, later_fragment, None)
}

/// Adds the ports where the protocol has them, the first four L4 bytes are
/// within the packet, and the packet is not a later fragment; for TCP also
/// whether it is a SYN without ACK, when the flags byte is within the packet
/// too. `loaded` holds those four bytes, and the TCP flags if they were in
/// reach, when the caller already read them.
#[inline(always)]
fn finish_l4(
    ctx: &TcContext,
    mut key: FlowKey,
    l4: u32,
    limit: u32,
    later: bool,
    loaded: Option<([u8; 4], Option<u8>)>,
) -> Parsed {
    let has_ports = matches!(
        key.protocol,
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP | IPPROTO_UDPLITE
    );
    let mut has_l4 = false;
    let mut syn_only = false;
    if has_ports && !later && l4 + 4 <= limit {
        // The room is tested apart from `l4`, so that the verifier learns
        // nothing new about `l4` (which bounds the capture later) and prunes
        // states as before; TCP's flags come with the ports, in one read.
        let tcp = key.protocol == IPPROTO_TCP && limit.wrapping_sub(l4) >= 14;
        let read = match loaded {
            Some((p, flags)) => Some((p, flags.filter(|_| tcp))),
            None if tcp => ctx
                .load::<[u8; 14]>(l4 as usize)
                .ok()
                .map(|h| ([h[0], h[1], h[2], h[3]], Some(h[13]))),
            None => ctx.load::<[u8; 4]>(l4 as usize).ok().map(|p| (p, None)),
        };
        if let Some((p, flags)) = read {
            key.src_port = u16::from_be_bytes([p[0], p[1]]);
            key.dst_port = u16::from_be_bytes([p[2], p[3]]);
            has_l4 = true;
            syn_only = flags.is_some_and(|f| f & (TCP_SYN | TCP_ACK) == TCP_SYN);
        }
    }
    Parsed::Ip {
        key,
        l4,
        has_l4,
        syn_only,
    }
}

/// Bytes of the L4 header, as repeated in each GSO segment.
#[inline(always)]
fn l4_header_len(ctx: &TcContext, protocol: u8, l4: u32) -> u32 {
    match protocol {
        IPPROTO_TCP => load_u8(ctx, l4 + 12).map_or(20, |b| ((b >> 4) as u32) * 4),
        _ => 8,
    }
}

#[inline(always)]
fn min(a: u32, b: u32) -> u32 {
    if a < b {
        a
    } else {
        b
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
