//! Finding the interface to watch in this network namespace and what its
//! frames start with.
//!
//! Everything is asked of the kernel through sockets and `/proc/self/net`,
//! which always describe the caller's own namespace (sysfs may not, when it
//! was mounted for another one).

use std::{ffi::CStr, fs, io, mem};

use anyhow::{bail, Context as _};

/// What the first byte of a frame on this interface is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkKind {
    /// A 14-byte MAC header (Ethernet, veth, loopback).
    Ethernet,
    /// The IP header itself (tun, WireGuard, IP-in-IP and similar).
    RawIp,
}

/// An interface chosen to be watched.
#[derive(Clone, Debug)]
pub struct Interface {
    pub name: String,
    pub index: u32,
    pub kind: LinkKind,
    /// Loopback: every packet passes both its hooks (it leaves and enters
    /// the same device), so only one is attached.
    pub loopback: bool,
}

const ARPHRD_ETHER: u16 = 1;
const ARPHRD_IEEE802: u16 = 6;
const ARPHRD_PPP: u16 = 512;
const ARPHRD_RAWIP: u16 = 519;
const ARPHRD_TUNNEL: u16 = 768;
const ARPHRD_TUNNEL6: u16 = 769;
const ARPHRD_LOOPBACK: u16 = 772;
const ARPHRD_SIT: u16 = 776;
const ARPHRD_IPGRE: u16 = 778;
const ARPHRD_NONE: u16 = 0xfffe;

/// Resolves the requested interfaces (each must exist), or with none
/// requested picks one: the default-route interface, else the first up
/// non-loopback one. Says which it picked.
pub fn resolve_all(requested: &[String]) -> anyhow::Result<Vec<Interface>> {
    let all = list()?;
    if requested.is_empty() {
        return Ok(vec![resolve(&all, None)?]);
    }
    requested
        .iter()
        .map(|name| resolve(&all, Some(name)))
        .collect()
}

fn resolve(all: &[(u32, String)], requested: Option<&str>) -> anyhow::Result<Interface> {
    let name = match requested {
        Some(name) => {
            if !all.iter().any(|(_, n)| n == name) {
                bail!(
                    "interface {name:?} does not exist in this network namespace; \
                     the interfaces here are: {}",
                    names(all)
                );
            }
            name.to_owned()
        }
        None => {
            let name = default_route_interface()
                .or_else(|| first_up_non_loopback(all))
                .with_context(|| {
                    format!(
                        "no interface given and none to choose (no default route and no \
                         interface that is up besides loopback); the interfaces here are: {}; \
                         pick one with --interface",
                        names(all)
                    )
                })?;
            log::info!("no --interface given; watching {name}");
            name
        }
    };
    let index = all
        .iter()
        .find(|(_, n)| *n == name)
        .map(|(i, _)| *i)
        .unwrap_or(0);
    let link_type = link_type(&name)?;
    let kind = match link_type {
        ARPHRD_ETHER | ARPHRD_IEEE802 | ARPHRD_LOOPBACK => LinkKind::Ethernet,
        ARPHRD_NONE | ARPHRD_PPP | ARPHRD_RAWIP | ARPHRD_TUNNEL | ARPHRD_TUNNEL6 | ARPHRD_SIT
        | ARPHRD_IPGRE => LinkKind::RawIp,
        other => {
            log::warn!("interface {name} has link type {other}; parsing its frames as Ethernet");
            LinkKind::Ethernet
        }
    };
    Ok(Interface {
        name,
        index,
        kind,
        loopback: link_type == ARPHRD_LOOPBACK,
    })
}

/// Whether the interface still exists with the same name and index (a
/// new interface of the same name is another device, without our hooks).
/// Only a definite answer counts: a lookup that fails for want of a file
/// descriptor says nothing about the interface.
pub fn still_there(iface: &Interface) -> bool {
    let Ok(name) = std::ffi::CString::new(iface.name.as_str()) else {
        return false;
    };
    // SAFETY: if_nametoindex reads a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index != 0 {
        return index == iface.index;
    }
    let err = io::Error::last_os_error().raw_os_error();
    !matches!(err, Some(libc::ENODEV | libc::ENXIO | libc::ENOENT))
}

fn names(all: &[(u32, String)]) -> String {
    all.iter()
        .map(|(_, n)| n.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Every interface of this namespace as (index, name).
fn list() -> anyhow::Result<Vec<(u32, String)>> {
    // SAFETY: if_nameindex returns a list terminated by a zero entry, which we
    // walk and then hand back to if_freenameindex exactly once.
    unsafe {
        let head = libc::if_nameindex();
        if head.is_null() {
            return Err(io::Error::last_os_error()).context("listing network interfaces");
        }
        let mut out = Vec::new();
        let mut cur = head;
        while (*cur).if_index != 0 {
            let name = CStr::from_ptr((*cur).if_name)
                .to_string_lossy()
                .into_owned();
            out.push(((*cur).if_index, name));
            cur = cur.add(1);
        }
        libc::if_freenameindex(head);
        Ok(out)
    }
}

/// An interface request for the SIOCGIF* ioctls.
fn ifreq(name: &str) -> anyhow::Result<libc::ifreq> {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { mem::zeroed() };
    if name.len() >= req.ifr_name.len() {
        bail!("interface name {name:?} is too long");
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

fn ioctl(name: &str, request: libc::Ioctl) -> anyhow::Result<libc::ifreq> {
    let mut req = ifreq(name)?;
    // SAFETY: a datagram socket is only used for these interface ioctls and
    // closed right after; `req` is a valid ifreq for the duration.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error()).context("opening a socket to query interfaces");
        }
        let rc = libc::ioctl(fd, request, &mut req);
        let err = io::Error::last_os_error();
        libc::close(fd);
        if rc < 0 {
            return Err(err).with_context(|| format!("querying interface {name}"));
        }
    }
    Ok(req)
}

/// The ARPHRD_* type of the interface, which tells what its frames start with.
fn link_type(name: &str) -> anyhow::Result<u16> {
    let req = ioctl(name, libc::SIOCGIFHWADDR)?;
    // SAFETY: SIOCGIFHWADDR fills the hwaddr member of the union.
    Ok(unsafe { req.ifr_ifru.ifru_hwaddr.sa_family })
}

fn is_up_non_loopback(name: &str) -> bool {
    match ioctl(name, libc::SIOCGIFFLAGS) {
        // SAFETY: SIOCGIFFLAGS fills the flags member of the union.
        Ok(req) => {
            let flags = i32::from(unsafe { req.ifr_ifru.ifru_flags });
            flags & libc::IFF_UP != 0 && flags & libc::IFF_LOOPBACK == 0
        }
        Err(_) => false,
    }
}

fn first_up_non_loopback(all: &[(u32, String)]) -> Option<String> {
    all.iter()
        .map(|(_, n)| n)
        .find(|n| is_up_non_loopback(n))
        .cloned()
}

/// The interface of the IPv4 default route, else of the IPv6 one.
fn default_route_interface() -> Option<String> {
    if let Ok(table) = fs::read_to_string("/proc/self/net/route") {
        // Columns: Iface Destination Gateway Flags ... Mask ...
        for line in table.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() > 7 && cols[1] == "00000000" && cols[7] == "00000000" {
                return Some(cols[0].to_owned());
            }
        }
    }
    if let Ok(table) = fs::read_to_string("/proc/self/net/ipv6_route") {
        // Columns: dest prefixlen src srcprefixlen nexthop metric ref use flags iface
        for line in table.lines() {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() == 10
                && cols[0].bytes().all(|b| b == b'0')
                && cols[1] == "00"
                && cols[9] != "lo"
            {
                return Some(cols[9].to_owned());
            }
        }
    }
    None
}

/// The name of the interface with this index in the agent's namespace, or
/// the index itself (`"if7"`) once the interface is gone.
pub fn name_of(index: u32) -> String {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: if_indextoname writes at most IF_NAMESIZE bytes, NUL included.
    let named = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if named.is_null() {
        return format!("if{index}");
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}
