//! Loading the kernel program and hooking it onto interfaces, both ways.
//!
//! [`Capture`] owns the loaded object and its hooks; one object serves every
//! watched interface, so all of them count into the same maps, which are
//! handed out once as [`KernelMaps`] to the modules that read them. Stopping
//! (or dropping) the capture detaches every hook and removes each clsact
//! qdisc this process added, so nothing of ours stays on any interface.

use std::{io, mem, net::IpAddr};

use anyhow::{bail, Context as _};
use aya::{
    maps::{HashMap, MapData, MapType, PerCpuArray, PerCpuHashMap, PerCpuValues, RingBuf},
    programs::{
        tc::{self, NlOptions, TcAttachOptions},
        LinkOrder, ProgramType, SchedClassifier, TcAttachType,
    },
    sys::{is_map_supported, is_program_supported},
    util::KernelVersion,
    Ebpf, EbpfLoader,
};
use lightshark_common::{
    Counter, Filter, FlowKey, FlowStats, Snap, Totals, FAMILY_IPV4, FAMILY_IPV6, FILTER_ADDR,
    FILTER_PORT, FILTER_PROTOCOL, GLOBAL_FILTER, GLOBAL_SAMPLE_RATE, GLOBAL_SNAP, MAP_FLOWS,
    MAP_NONIP, MAP_PROTOCOLS, MAP_SAMPLES, MAP_TOTALS, MAX_CAPTURE, NONIP_OTHER, PROG_ETH_EGRESS,
    PROG_ETH_INGRESS, PROG_RAW_EGRESS, PROG_RAW_INGRESS,
};

use crate::{
    config::{self, AttachMode, CaptureBytes},
    interface::{Interface, LinkKind},
};

/// The kernel object built by build.rs; empty when built with AYA_BUILD_SKIP.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lightshark"));

/// The maps of the loaded program, each taken by the module that reads it.
pub struct KernelMaps {
    pub flows: HashMap<MapData, FlowKey, FlowStats>,
    pub totals: PerCpuArray<MapData, Totals>,
    pub nonip: PerCpuHashMap<MapData, u16, Counter>,
    pub protocols: PerCpuArray<MapData, Counter>,
    pub samples: RingBuf<MapData>,
}

/// The program, loaded once and attached to every watched interface: on
/// ingress and egress, or on ingress alone on loopback.
pub struct Capture {
    ebpf: Option<Ebpf>,
    /// Interfaces whose clsact qdisc we created and so must remove.
    added_qdiscs: Vec<Interface>,
}

/// The hooks attached on an interface: a loopback packet passes both (it
/// leaves and enters the same device), so there ingress alone counts each
/// packet once, and only what the device delivered.
fn hooks(interface: &Interface) -> &'static [TcAttachType] {
    if interface.loopback {
        &[TcAttachType::Ingress]
    } else {
        &[TcAttachType::Ingress, TcAttachType::Egress]
    }
}

impl Capture {
    /// Checks the kernel, loads the program and attaches it to each of
    /// `interfaces` in the configured mode. Needs the capabilities
    /// `caps::ensure` makes effective.
    pub fn start(
        interfaces: &[Interface],
        config: &config::Config,
    ) -> anyhow::Result<(Capture, KernelMaps)> {
        let mode = config.attach_mode;
        if OBJECT.is_empty() {
            bail!(
                "this binary holds no kernel program (it was built with AYA_BUILD_SKIP=1); \
                 rebuild without it"
            );
        }
        let tcx = match mode {
            AttachMode::Tcx => true,
            AttachMode::Tc => false,
            AttachMode::Auto => tcx_supported(),
        };
        check_kernel(tcx)?;

        let filter = kernel_filter(&config.filter);
        let snap = kernel_snap(config.capture_bytes);
        let ebpf = EbpfLoader::new()
            .override_global(GLOBAL_FILTER, &filter, true)
            .override_global(GLOBAL_SNAP, &snap, true)
            .override_global(GLOBAL_SAMPLE_RATE, &config.sample_rate, true)
            .map_max_entries(MAP_FLOWS, config.flow_map_size)
            .map_max_entries(MAP_SAMPLES, config.ring_buffer_size)
            .load(OBJECT)
            .context("loading the kernel program's maps")?;
        // Owned by the capture from here on, so that a failure on any
        // interface detaches what was already attached on the others.
        let mut capture = Capture {
            ebpf: Some(ebpf),
            added_qdiscs: Vec::new(),
        };
        let mut loaded = Vec::new();
        for interface in interfaces {
            capture.attach(interface, tcx, &mut loaded)?;
        }
        log::info!(
            "watching {} with {}",
            interfaces
                .iter()
                .map(|i| {
                    let hooks = if i.loopback {
                        "ingress only: loopback"
                    } else {
                        "ingress and egress"
                    };
                    format!("{} ({hooks})", i.name)
                })
                .collect::<Vec<_>>()
                .join(", "),
            if tcx { "TCX links" } else { "clsact filters" }
        );
        let ebpf = capture.ebpf.as_mut().expect("set above");
        let mut nonip: PerCpuHashMap<MapData, u16, Counter> =
            PerCpuHashMap::try_from(take(ebpf, MAP_NONIP)?)?;
        let cpus = aya::util::nr_cpus()
            .map_err(|(_, e)| e)
            .context("counting CPUs")?;
        nonip
            .insert(
                NONIP_OTHER,
                PerCpuValues::try_from(vec![Counter::default(); cpus])?,
                0,
            )
            .context("creating the non-IP \"other\" counter")?;
        let maps = KernelMaps {
            flows: HashMap::try_from(take(ebpf, MAP_FLOWS)?)?,
            totals: PerCpuArray::try_from(take(ebpf, MAP_TOTALS)?)?,
            nonip,
            protocols: PerCpuArray::try_from(take(ebpf, MAP_PROTOCOLS)?)?,
            samples: RingBuf::try_from(take(ebpf, MAP_SAMPLES)?)?,
        };
        Ok((capture, maps))
    }

    /// Hooks the loaded program onto one interface. `loaded` lists the
    /// programs already loaded into the kernel: each is loaded once and
    /// attached to every interface of its link kind.
    fn attach(
        &mut self,
        interface: &Interface,
        tcx: bool,
        loaded: &mut Vec<&'static str>,
    ) -> anyhow::Result<()> {
        let (ingress, egress) = match interface.kind {
            LinkKind::Ethernet => (PROG_ETH_INGRESS, PROG_ETH_EGRESS),
            LinkKind::RawIp => (PROG_RAW_INGRESS, PROG_RAW_EGRESS),
        };
        if !tcx {
            let added = match tc::qdisc_add_clsact(&interface.name) {
                Ok(()) => true,
                // An existing qdisc may hold filters of an earlier agent that
                // was killed; once they are removed, the qdisc is ours to
                // remove too.
                Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {
                    remove_orphans(interface) > 0
                }
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("adding the clsact qdisc to {}", interface.name))
                }
            };
            if added {
                self.added_qdiscs.push(interface.clone());
            }
        }
        let ebpf = self.ebpf.as_mut().expect("attached before stopping");
        for &hook in hooks(interface) {
            let name = if hook == TcAttachType::Ingress {
                ingress
            } else {
                egress
            };
            let program: &mut SchedClassifier = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from the kernel object"))?
                .try_into()?;
            if !loaded.contains(&name) {
                program
                    .load()
                    .with_context(|| format!("the kernel rejected program {name}"))?;
                loaded.push(name);
            }
            let options = if tcx {
                TcAttachOptions::TcxOrder(LinkOrder::default())
            } else {
                TcAttachOptions::Netlink(NlOptions::default())
            };
            program
                .attach_with_options(&interface.name, hook, options)
                .with_context(|| {
                    format!(
                        "attaching to {} {hook:?} with {}",
                        interface.name,
                        if tcx { "a TCX link" } else { "a clsact filter" }
                    )
                })?;
        }
        Ok(())
    }

    /// Detaches every hook and removes the qdiscs we added. After this the
    /// kernel emits no more samples, so the ring buffer can be drained dry.
    pub fn stop(mut self) {
        self.detach();
    }

    fn detach(&mut self) {
        // Dropping the object detaches its links and filters.
        if self.ebpf.take().is_none() {
            return;
        }
        for interface in self.added_qdiscs.drain(..) {
            // A deleted interface took the qdisc with it.
            if let Err(e) = delete_clsact(interface.index).or_else(|e| {
                if e.raw_os_error() == Some(libc::ENODEV) {
                    Ok(())
                } else {
                    Err(e)
                }
            }) {
                log::warn!(
                    "could not remove the clsact qdisc from {}: {e}",
                    interface.name
                );
            }
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.detach();
    }
}

/// Removes the clsact filters an earlier agent left on the interface when
/// it was killed (SIGKILL gives it no chance to detach), unless another
/// agent runs in this network namespace and they may be its. Returns how
/// many were removed.
fn remove_orphans(interface: &Interface) -> usize {
    if another_agent_here() {
        return 0;
    }
    let mut removed = 0;
    // Both hooks: an agent killed before may have attached either.
    for hook in [TcAttachType::Ingress, TcAttachType::Egress] {
        for name in [
            PROG_ETH_INGRESS,
            PROG_ETH_EGRESS,
            PROG_RAW_INGRESS,
            PROG_RAW_EGRESS,
        ] {
            match tc::qdisc_detach_program(&interface.name, hook, name) {
                Ok(()) => removed += 1,
                Err(tc::TcError::IoError(e)) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => log::warn!("could not remove a leftover {name} filter: {e}"),
            }
        }
    }
    if removed > 0 {
        log::warn!(
            "removed {removed} clsact filter(s) left on {} by an earlier agent that did not exit cleanly",
            interface.name
        );
    }
    removed
}

/// Whether another lightshark-mini process shares this network namespace.
fn another_agent_here() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let ns = |pid: &str| {
        std::fs::metadata(format!("/proc/{pid}/ns/net"))
            .map(|m| m.ino())
            .ok()
    };
    let Some(ours) = ns("self") else {
        return true;
    };
    let me = std::process::id().to_string();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return true;
    };
    procs.filter_map(Result::ok).any(|p| {
        let pid = p.file_name().to_string_lossy().into_owned();
        pid != me
            && pid.bytes().all(|b| b.is_ascii_digit())
            && std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "lightshark-mini")
            && ns(&pid) == Some(ours)
    })
}

/// The agent's filter in the kernel program's layout.
fn kernel_filter(filter: &config::Filter) -> Filter {
    let mut out = Filter::default();
    if let Some(port) = filter.port {
        out.flags |= FILTER_PORT;
        out.port = port;
    }
    if let Some(protocol) = filter.protocol {
        out.flags |= FILTER_PROTOCOL;
        out.protocol = protocol;
    }
    match filter.ip {
        Some(IpAddr::V4(a)) => {
            out.flags |= FILTER_ADDR;
            out.family = FAMILY_IPV4;
            out.addr[..4].copy_from_slice(&a.octets());
        }
        Some(IpAddr::V6(a)) => {
            out.flags |= FILTER_ADDR;
            out.family = FAMILY_IPV6;
            out.addr = a.octets();
        }
        None => {}
    }
    out
}

fn kernel_snap(capture: CaptureBytes) -> Snap {
    match capture {
        CaptureBytes::Headers => Snap {
            max_bytes: MAX_CAPTURE,
            headers_only: 1,
        },
        CaptureBytes::First(n) => Snap {
            max_bytes: n,
            headers_only: 0,
        },
    }
}

fn take(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<aya::maps::Map> {
    ebpf.take_map(name)
        .with_context(|| format!("map {name} missing from the kernel object"))
}

fn tcx_supported() -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}

/// Names every kernel feature the agent needs that this kernel lacks.
fn check_kernel(tcx: bool) -> anyhow::Result<()> {
    let mut missing = Vec::new();
    if !is_program_supported(ProgramType::SchedClassifier).unwrap_or(false) {
        missing.push("BPF programs of type sched_cls (CONFIG_NET_CLS_BPF)".to_owned());
    }
    for (map, what) in [
        (MapType::Hash, "BPF hash maps"),
        (MapType::PerCpuArray, "BPF per-CPU arrays"),
        (MapType::PerCpuHash, "BPF per-CPU hash maps"),
        (MapType::RingBuf, "BPF ring buffers (Linux 5.8 or later)"),
    ] {
        if !is_map_supported(map).unwrap_or(false) {
            missing.push(what.to_owned());
        }
    }
    if tcx && !tcx_supported() {
        missing.push(format!(
            "TCX links (Linux 6.6 or later; this is {}); use --attach-mode tc",
            KernelVersion::current().map_or("unknown".to_owned(), |v| v.to_string())
        ));
    }
    if !missing.is_empty() {
        bail!(
            "this kernel lacks what the monitor needs: {}",
            missing.join("; ")
        );
    }
    Ok(())
}

/// Removes the clsact qdisc (and with it any filter left on it) over
/// rtnetlink; aya can add one but not remove it.
fn delete_clsact(ifindex: u32) -> io::Result<()> {
    #[repr(C)]
    struct Request {
        header: libc::nlmsghdr,
        // struct tcmsg
        family: u8,
        pad: [u8; 3],
        ifindex: i32,
        handle: u32,
        parent: u32,
        info: u32,
        // one rtattr: TCA_KIND = "clsact\0", padded to 4 bytes
        attr_len: u16,
        attr_type: u16,
        kind: [u8; 8],
    }
    const TCA_KIND: u16 = 1;
    const TC_H_CLSACT: u32 = 0xffff_fff1;
    let req = Request {
        header: libc::nlmsghdr {
            nlmsg_len: mem::size_of::<Request>() as u32,
            nlmsg_type: libc::RTM_DELQDISC,
            nlmsg_flags: (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16,
            nlmsg_seq: 1,
            nlmsg_pid: 0,
        },
        family: libc::AF_UNSPEC as u8,
        pad: [0; 3],
        ifindex: ifindex as i32,
        handle: 0xffff_0000,
        parent: TC_H_CLSACT,
        info: 0,
        attr_len: 4 + 7,
        attr_type: TCA_KIND,
        kind: *b"clsact\0\0",
    };
    // SAFETY: a fresh netlink socket is used for one request and its ack and
    // closed on every path; the buffers outlive the calls that use them.
    unsafe {
        let fd = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        );
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let result = (|| {
            let sent = libc::send(fd, (&raw const req).cast(), mem::size_of::<Request>(), 0);
            if sent < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut buf = [0u8; 1024];
            let n = libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0);
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let hdr_len = mem::size_of::<libc::nlmsghdr>();
            if (n as usize) >= hdr_len + 4 {
                let msg_type = u16::from_ne_bytes([buf[4], buf[5]]);
                let code = i32::from_ne_bytes(buf[hdr_len..hdr_len + 4].try_into().unwrap());
                if msg_type == libc::NLMSG_ERROR as u16 && code != 0 {
                    return Err(io::Error::from_raw_os_error(-code));
                }
            }
            Ok(())
        })();
        libc::close(fd);
        result
    }
}
