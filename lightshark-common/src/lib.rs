//! Types shared by the kernel program and the agent.
//!
//! Every struct here crosses the kernel/user boundary byte for byte (map keys,
//! map values, ring-buffer records, load-time configuration), so each is
//! `#[repr(C)]` with explicit padding: both sides must agree on the layout and
//! no byte may be left uninitialised, or hash-map keys would not compare equal.
#![no_std]

/// Address family tag in [`FlowKey::family`]: the address is the first 4 bytes.
pub const FAMILY_IPV4: u8 = 4;
/// Address family tag in [`FlowKey::family`]: the address uses all 16 bytes.
pub const FAMILY_IPV6: u8 = 6;

/// [`Sample::direction`] of a packet seen by the ingress hook.
pub const DIRECTION_INGRESS: u8 = 0;
/// [`Sample::direction`] of a packet seen by the egress hook.
pub const DIRECTION_EGRESS: u8 = 1;

/// Key of the non-IP counters for 802.3 frames whose type field is a length
/// (below 0x0600): LLC, STP, CDP. Real ethertypes start at 0x0600.
pub const NONIP_LLC: u16 = 0;
/// Key of the non-IP counters for frames too short to hold a link-layer type
/// or whose IP header cannot be read at all.
pub const NONIP_RUNT: u16 = 1;
/// Key of the non-IP counters for ethertypes that found the map full; the
/// agent creates it at load, so the breakdown always adds up to the total.
pub const NONIP_OTHER: u16 = 2;

/// Name of the per-flow hash map in the kernel object.
pub const MAP_FLOWS: &str = "FLOWS";
/// Name of the per-CPU totals array in the kernel object.
pub const MAP_TOTALS: &str = "TOTALS";
/// Name of the per-CPU non-IP counters keyed by ethertype.
pub const MAP_NONIP: &str = "NONIP";
/// Name of the per-CPU packet and byte counters by direction and IP
/// protocol number (see [`protocol_slot`]).
pub const MAP_PROTOCOLS: &str = "PROTOCOLS";
/// Name of the sample ring buffer in the kernel object.
pub const MAP_SAMPLES: &str = "SAMPLES";

/// Program names in the kernel object, one per hook and link type: frames on
/// Ethernet-like interfaces start with a MAC header, those on tun/WireGuard
/// interfaces start at the IP header.
pub const PROG_ETH_INGRESS: &str = "ls_eth_ingress";
/// See [`PROG_ETH_INGRESS`].
pub const PROG_ETH_EGRESS: &str = "ls_eth_egress";
/// See [`PROG_ETH_INGRESS`].
pub const PROG_RAW_INGRESS: &str = "ls_raw_ingress";
/// See [`PROG_ETH_INGRESS`].
pub const PROG_RAW_EGRESS: &str = "ls_raw_egress";

/// The directional 5-tuple a packet is counted under, plus the interface it
/// was seen on (so the same tuple on two interfaces stays two flows).
///
/// Ports are in host byte order and 0 where the protocol has none or the
/// packet carries none (ICMP, a later fragment, a cut-short header).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    pub src_port: u16,
    pub dst_port: u16,
    pub ifindex: u32,
    pub protocol: u8,
    pub family: u8,
    // Padding as integers, not byte arrays: zeroing an array makes the
    // compiler emit a memset whose pointer arithmetic the verifier only
    // allows with CAP_PERFMON.
    pub _pad: u16,
}

/// What the kernel has counted for one flow since the entry was created.
///
/// `packets` counts wire segments (a GSO packet of n segments adds n) and
/// `bytes` the bytes those segments carry on the link.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowStats {
    pub packets: u64,
    pub bytes: u64,
    pub first_seen_ns: u64,
    pub last_seen_ns: u64,
    /// `FLOW_*` bits, set once when the entry is created.
    pub flags: u32,
    pub _pad: u32,
}

/// [`FlowStats::flags`] bit: the first packet of the flow the program saw
/// was a TCP SYN without ACK, so its source opened the connection.
pub const FLOW_OPENED_BY_SYN: u32 = 1;

/// One ring-buffer record per kernel packet of an IP flow.
///
/// `wire_len` is the bytes on the link of all `segments` the packet stands
/// for, so the sum of `wire_len` equals the flow's byte counter.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sample {
    pub timestamp_ns: u64,
    pub key: FlowKey,
    pub wire_len: u32,
    pub segments: u16,
    pub direction: u8,
    /// [`SAMPLE_RAW_IP`] when the captured bytes start at the IP header.
    pub flags: u8,
    /// Bytes of the packet's start that follow this record in the ring
    /// (in [`Captured::bytes`]); 0 when capture is off.
    pub captured: u16,
    pub _pad2: u16,
}

/// [`Sample::flags`] bit: the interface has no link-layer header (tun,
/// WireGuard), so the captured bytes start with the IP header.
pub const SAMPLE_RAW_IP: u8 = 1;

/// A sample followed by the first bytes of its packet. The kernel reserves
/// one of a few fixed sizes (the ring wants a constant size) and says in
/// [`Sample::captured`] how many of `bytes` hold data.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Captured<const N: usize> {
    pub sample: Sample,
    pub bytes: [u8; N],
}

/// Most bytes of a packet a sample can carry.
pub const MAX_CAPTURE: u32 = 256;

/// How much of each packet to capture, set as global data at load time.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Snap {
    /// Bytes at most (0 turns capture off, at most [`MAX_CAPTURE`]).
    pub max_bytes: u32,
    /// Non-zero: stop at the end of the L4 header (or the IP header when
    /// there is no L4 header to read), within `max_bytes`.
    pub headers_only: u32,
}

/// Name of the global that holds the [`Snap`] in the kernel object.
pub const GLOBAL_SNAP: &str = "SNAP";

/// Name of the `u32` global that holds `--sample-rate` N in the kernel
/// object: each IP packet is sampled with probability 1/N (0 and 1 sample
/// every packet).
pub const GLOBAL_SAMPLE_RATE: &str = "SAMPLE_RATE";

/// Totals kept per CPU in a one-entry array, apart from the flow map, so that
/// deleting or failing to create a flow entry never loses a count.
///
/// Packet fields count wire segments, byte fields bytes on the link.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Every frame either hook saw, IP or not.
    pub packets: u64,
    pub bytes: u64,
    pub ingress_packets: u64,
    pub ingress_bytes: u64,
    pub egress_packets: u64,
    pub egress_bytes: u64,
    /// Frames that carry no readable IP header (also counted per ethertype).
    pub nonip_packets: u64,
    pub nonip_bytes: u64,
    /// Kernel packets of IP flows for which a sample was due, and the segments
    /// they stand for: every one of them is either in the ring buffer or
    /// counted in `ringbuf_drops`.
    pub samples: u64,
    pub sample_segments: u64,
    /// Samples the ring buffer had no room for.
    pub ringbuf_drops: u64,
    pub ringbuf_drop_segments: u64,
    /// Segments of IP packets whose flow had no map entry and could not get
    /// one (map full); they are still in every other total.
    pub flow_map_full: u64,
    /// Frames a filter left out; they are in no other counter.
    pub filtered_out: u64,
    /// Kernel packets of IP flows that `--sample-rate` chose not to sample,
    /// and the segments they stand for: with `samples` and
    /// `sample_segments` they add up to every IP packet counted. They are
    /// in every other total and flow counter.
    pub sampled_out: u64,
    pub sampled_out_segments: u64,
    /// Not a counter: where the kernel program parks a packet's protocol
    /// number before using it as a [`MAP_PROTOCOLS`] key, so that the
    /// verifier does not tie the key to the parsing paths (it would walk
    /// each of them apart, past its instruction limit).
    pub protocol_scratch: u64,
}

/// Slots per direction in [`MAP_PROTOCOLS`]: one per IP protocol number,
/// and [`NON_IP_SLOT`]. Every frame a direction's total counts is in
/// exactly one of them.
pub const PROTOCOL_SLOTS: u32 = 257;
/// The [`MAP_PROTOCOLS`] slot of frames without a readable IP header.
pub const NON_IP_SLOT: u32 = 256;

/// The [`MAP_PROTOCOLS`] slot of a direction ([`DIRECTION_INGRESS`] or
/// [`DIRECTION_EGRESS`]) and an IP protocol number or [`NON_IP_SLOT`].
#[inline(always)]
pub const fn protocol_slot(direction: u8, protocol: u32) -> u32 {
    direction as u32 * PROTOCOL_SLOTS + protocol
}

/// Protocol classes the agent folds the [`MAP_PROTOCOLS`] counters into: a
/// fixed, small set, so that metrics labelled by it stay bounded.
pub const CLASS_TCP: usize = 0;
/// See [`CLASS_TCP`].
pub const CLASS_UDP: usize = 1;
/// See [`CLASS_TCP`].
pub const CLASS_ICMP: usize = 2;
/// See [`CLASS_TCP`].
pub const CLASS_ICMPV6: usize = 3;
/// See [`CLASS_TCP`].
pub const CLASS_SCTP: usize = 4;
/// Any other IP protocol (UDP-Lite, GRE, ESP, ...).
pub const CLASS_OTHER_IP: usize = 5;
/// Frames without a readable IP header.
pub const CLASS_NON_IP: usize = 6;
/// Number of protocol classes.
pub const PROTOCOL_CLASSES: usize = 7;

/// The name of each class, by index, as metrics label it.
pub const PROTOCOL_CLASS_NAMES: [&str; PROTOCOL_CLASSES] =
    ["tcp", "udp", "icmp", "icmpv6", "sctp", "other_ip", "non_ip"];

/// The class of a [`MAP_PROTOCOLS`] slot's protocol: an IP protocol number
/// (the one the flow is keyed on, after IPv6 extension headers) or
/// [`NON_IP_SLOT`].
#[inline(always)]
pub const fn protocol_class(protocol: u32) -> usize {
    match protocol {
        NON_IP_SLOT => CLASS_NON_IP,
        6 => CLASS_TCP,
        17 => CLASS_UDP,
        1 => CLASS_ICMP,
        58 => CLASS_ICMPV6,
        132 => CLASS_SCTP,
        _ => CLASS_OTHER_IP,
    }
}

/// [`Filter::flags`] bit: only packets with [`Filter::port`] as either port.
pub const FILTER_PORT: u32 = 1;
/// [`Filter::flags`] bit: only packets with [`Filter::addr`] as either address.
pub const FILTER_ADDR: u32 = 2;
/// [`Filter::flags`] bit: only packets of IP protocol [`Filter::protocol`].
pub const FILTER_PROTOCOL: u32 = 4;

/// The packet filter, set as global data when the program is loaded, so a
/// filtered-out packet costs no ring-buffer slot, row or map entry. The set
/// bits of `flags` say which fields apply; they combine with AND.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    pub flags: u32,
    pub port: u16,
    pub protocol: u8,
    /// FAMILY_IPV4 or FAMILY_IPV6, the family of `addr`.
    pub family: u8,
    pub addr: [u8; 16],
}

/// Name of the global that holds the [`Filter`] in the kernel object.
pub const GLOBAL_FILTER: &str = "FILTER";

/// A packet and byte counter pair, the value of the non-IP map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), hold only integers and byte arrays,
    // and spell out their padding, so every bit pattern is a valid value.
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowStats {}
    unsafe impl aya::Pod for super::Sample {}
    unsafe impl aya::Pod for super::Totals {}
    unsafe impl aya::Pod for super::Counter {}
    unsafe impl aya::Pod for super::Filter {}
    unsafe impl aya::Pod for super::Snap {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(size_of::<FlowKey>(), 44);
        assert_eq!(size_of::<FlowStats>(), 40);
        assert_eq!(size_of::<Sample>(), 64);
        assert_eq!(size_of::<Totals>(), 17 * 8);
        assert_eq!(size_of::<Filter>(), 24);
        assert_eq!(size_of::<Snap>(), 8);
        assert_eq!(size_of::<Captured<128>>(), 64 + 128);
        assert_eq!(size_of::<Counter>(), 16);
    }
}
