//! Stored samples as a classic pcap file (what Wireshark, tshark and
//! tcpdump all open), for `/api/history.pcap`.
//!
//! Every stored header starts with an Ethernet header, so one file holds the
//! samples of every interface under one link type; samples of interfaces
//! without a link layer (tun, WireGuard) get a synthetic one when stored.

use lightshark_common::{Sample, SAMPLE_RAW_IP};

/// LINKTYPE_ETHERNET.
const LINKTYPE_ETHERNET: u32 = 1;
/// Microsecond-resolution pcap magic, written in our byte order (readers
/// detect the order from it).
const MAGIC_MICROSECONDS: u32 = 0xa1b2_c3d4;
/// The snapshot length the file declares: no record is longer than this.
const SNAPLEN: u32 = 65_535;

/// The captured bytes of `sample` as they are stored: as captured on an
/// Ethernet-like interface, behind a synthetic Ethernet header (zero
/// addresses, the IP version's ethertype) on a raw-IP one. None when
/// nothing was captured.
pub fn as_ethernet<'a>(
    sample: &Sample,
    bytes: &'a [u8],
    framed: &'a mut Vec<u8>,
) -> Option<&'a [u8]> {
    if bytes.is_empty() {
        return None;
    }
    if sample.flags & SAMPLE_RAW_IP == 0 {
        return Some(bytes);
    }
    let ethertype: u16 = if bytes[0] >> 4 == 6 { 0x86dd } else { 0x0800 };
    framed.clear();
    framed.extend_from_slice(&[0; 12]);
    framed.extend_from_slice(&ethertype.to_be_bytes());
    framed.extend_from_slice(bytes);
    Some(framed)
}

/// A pcap file being written in memory.
pub struct Writer {
    out: Vec<u8>,
}

impl Writer {
    /// A file with its global header.
    pub fn start() -> Writer {
        let mut out = Vec::with_capacity(1 << 16);
        out.extend_from_slice(&MAGIC_MICROSECONDS.to_ne_bytes());
        // Version 2.4, then the time zone offset and accuracy (both 0).
        out.extend_from_slice(&2u16.to_ne_bytes());
        out.extend_from_slice(&4u16.to_ne_bytes());
        out.extend_from_slice(&[0; 8]);
        out.extend_from_slice(&SNAPLEN.to_ne_bytes());
        out.extend_from_slice(&LINKTYPE_ETHERNET.to_ne_bytes());
        Writer { out }
    }

    /// Appends one packet record: its capture time in Unix milliseconds,
    /// its length on the wire, and the bytes kept of it.
    pub fn packet(&mut self, unix_ms: i64, wire_len: u32, bytes: &[u8]) {
        let bytes = &bytes[..bytes.len().min(SNAPLEN as usize)];
        let secs = unix_ms.div_euclid(1000) as u32;
        let micros = (unix_ms.rem_euclid(1000) * 1000) as u32;
        let kept = bytes.len() as u32;
        for word in [secs, micros, kept, wire_len.max(kept)] {
            self.out.extend_from_slice(&word.to_ne_bytes());
        }
        self.out.extend_from_slice(bytes);
    }

    /// The whole file.
    pub fn finish(self) -> Vec<u8> {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_ip_gets_an_ethernet_header_of_its_version() {
        let raw = Sample {
            flags: SAMPLE_RAW_IP,
            ..Sample::default()
        };
        let mut framed = Vec::new();
        let v6 = [0x60, 0, 0, 0];
        let out = as_ethernet(&raw, &v6, &mut framed).unwrap();
        assert_eq!(&out[12..14], &[0x86, 0xdd]);
        assert_eq!(&out[14..], &v6);
        let eth = Sample::default();
        assert_eq!(as_ethernet(&eth, &v6, &mut framed).unwrap(), &v6);
        assert!(as_ethernet(&eth, &[], &mut framed).is_none());
    }
}
