//! Every setting, from flags and from a YAML file, gathered into one typed
//! [`Config`] that the rest of the agent reads. Nothing else parses input.
//!
//! A flag given on the command line wins over the file, the file wins over
//! the default. Each YAML key is the flag's long name with underscores
//! (`--db-path` is `db_path`), except `data_retention_seconds`.

use std::{fs, io::Read as _, net::IpAddr, path::PathBuf, time::Duration};

use anyhow::{bail, Context as _};
use clap::{Parser, ValueEnum};
use serde_yaml::Value;

/// How the classifier is hooked onto the interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AttachMode {
    /// TCX links where the kernel has them (6.6 and later), else clsact.
    Auto,
    /// TCX links only: they go away with the process, nothing is left behind.
    Tcx,
    /// The legacy clsact qdisc with a netlink filter per direction.
    Tc,
}

const AFTER_HELP: &str = "\
Filters run in the kernel: filtered-out packets take no ring-buffer slot, no
history row and no flow entry, and totals, live, history and stats all describe
the matching traffic only. Filters combine with AND. Non-IP frames (ARP, LLDP,
...) never match a filter, and a later IP fragment, which carries no ports,
never matches --filter-port.

Config file (-c): YAML with the same settings, keyed by each flag's long name
with underscores; a flag given on the command line wins over the file:
  interface: [eth0, lo]
  bind: 0.0.0.0
  api_token: s3cret
  max_db_size: 1073741824
  port: 3000
  db_path: /data/traffic.db
  filter_port: 80
  filter_ip: 10.0.0.5
  filter_protocol: TCP
  connection_timeout: 120
  data_retention_seconds: 86400
  attach_mode: auto
  ring_buffer_size: 8388608
  flow_map_size: 131072
  capture_bytes: headers
  sample_rate: 1
  quiet: true";

/// LightShark-mini: counts a network interface's traffic per 5-tuple in the
/// kernel (eBPF), keeps one sample per packet in SQLite, and serves both over
/// a JSON API and a WebSocket stream.
#[derive(Debug, Default, Parser)]
#[command(name = "lightshark-mini", version, about, long_about = None, after_help = AFTER_HELP)]
#[command(allow_negative_numbers = true)]
struct Cli {
    /// Network interfaces to watch, comma-separated (`eth0,lo`) [default:
    /// the default-route interface, else the first up non-loopback one]
    #[arg(short, long, value_name = "NAME[,NAME...]", value_parser = parse_interfaces)]
    interface: Option<InterfaceList>,

    /// Address the API listens on [default: all addresses, IPv6 and IPv4]
    #[arg(long, value_name = "ADDR", value_parser = parse_bind)]
    bind: Option<IpAddr>,

    /// Require `Authorization: Bearer TOKEN` on every endpoint but
    /// /api/health (also from the environment)
    #[arg(
        long,
        value_name = "TOKEN",
        env = "LIGHTSHARK_API_TOKEN",
        hide_env_values = true,
        value_parser = parse_token
    )]
    api_token: Option<String>,

    /// Largest size of the database file in bytes; the oldest history is
    /// deleted beyond it; 0 turns the cap off [default: 1073741824]
    #[arg(long, value_name = "BYTES")]
    max_db_size: Option<u64>,

    /// TCP port of the HTTP API [default: 3000]
    #[arg(short, long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    port: Option<u16>,

    /// SQLite file that keeps the per-packet history [default: traffic.db]
    #[arg(long, value_name = "PATH", value_parser = parse_db_path)]
    db_path: Option<PathBuf>,

    /// Only traffic with this port as source or destination
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    filter_port: Option<u16>,

    /// Only traffic with this IPv4 or IPv6 address as source or destination
    #[arg(long, value_name = "ADDR")]
    filter_ip: Option<IpAddr>,

    /// Only this protocol: TCP, UDP, ICMP, ICMPv6, SCTP (any case) or an IP
    /// protocol number; ICMP does not include ICMPv6
    #[arg(long, value_name = "PROTO", value_parser = parse_protocol)]
    filter_protocol: Option<u8>,

    /// Seconds without packets before a connection is stale and removed
    /// [default: 60]
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..=MAX_SECONDS))]
    connection_timeout: Option<u64>,

    /// Delete history older than this many seconds [default: keep all]
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..=MAX_SECONDS))]
    data_retention: Option<u64>,

    /// How to hook the classifier: TCX links or the legacy clsact qdisc
    /// [default: auto]
    #[arg(long, value_enum, ignore_case = true)]
    attach_mode: Option<AttachMode>,

    /// Bytes of the kernel's sample ring buffer: a power of two from 4096
    /// to 1073741824 [default: 8388608]
    #[arg(long, value_name = "BYTES", value_parser = parse_ring_size)]
    ring_buffer_size: Option<u32>,

    /// Flows the kernel map can hold; packets of flows beyond it still count
    /// in every total [default: 131072]
    #[arg(long, value_name = "FLOWS", value_parser = clap::value_parser!(u32).range(1..=16_777_216))]
    flow_map_size: Option<u32>,

    /// How much of each packet history keeps (for /api/history.pcap):
    /// `headers` (link, IP and L4 headers), or the first N bytes, 0 to 256;
    /// 0 keeps none [default: headers]
    #[arg(long, value_name = "headers|N", value_parser = parse_capture)]
    capture_bytes: Option<CaptureBytes>,

    /// Keep a sample of about 1 in N packets, chosen at random, for rates
    /// beyond what storage holds; counters and totals stay exact
    /// [default: 1, every packet]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=MAX_SAMPLE_RATE as i64))]
    sample_rate: Option<u32>,

    /// YAML config file with the same settings (see below)
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,

    /// Log warnings and errors only
    #[arg(short, long)]
    quiet: bool,
}

/// The interfaces asked for, in order, each named once.
#[derive(Clone, Debug, PartialEq, Eq)]
struct InterfaceList(Vec<String>);

/// How much of each packet a sample carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaptureBytes {
    /// The headers up to the end of L4, at most `MAX_CAPTURE` bytes.
    Headers,
    /// The first N bytes (0 to `MAX_CAPTURE`).
    First(u32),
}

/// Which packets the kernel program counts; all `None` counts everything.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    pub port: Option<u16>,
    pub ip: Option<IpAddr>,
    pub protocol: Option<u8>,
}

/// Everything the agent was asked to do, validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// Empty: choose one at start (see `interface::resolve_all`).
    pub interfaces: Vec<String>,
    /// None: all addresses (IPv6 and IPv4 where the host has IPv6).
    pub bind: Option<IpAddr>,
    pub api_token: Option<String>,
    /// None: no cap.
    pub max_db_size: Option<u64>,
    pub port: u16,
    pub db_path: PathBuf,
    pub filter: Filter,
    pub connection_timeout: Duration,
    pub data_retention: Option<Duration>,
    pub attach_mode: AttachMode,
    pub ring_buffer_size: u32,
    pub flow_map_size: u32,
    pub capture_bytes: CaptureBytes,
    /// 1 keeps a sample of every packet.
    pub sample_rate: u32,
    pub quiet: bool,
}

impl Config {
    /// Reads the flags and the config file they name. Bad flags make clap
    /// print the error and exit with status 2; a bad file is an error here.
    pub fn load() -> anyhow::Result<Config> {
        let cli = Cli::parse();
        let file = match &cli.config {
            Some(path) => read_file(path)?,
            None => Cli::default(),
        };
        Ok(merge(cli, file))
    }
}

/// Flags over file over defaults.
fn merge(flags: Cli, file: Cli) -> Config {
    Config {
        interfaces: flags
            .interface
            .or(file.interface)
            .map_or(Vec::new(), |l| l.0),
        bind: flags.bind.or(file.bind),
        api_token: flags.api_token.or(file.api_token),
        max_db_size: match flags.max_db_size.or(file.max_db_size) {
            Some(0) => None,
            Some(n) => Some(n),
            None => Some(DEFAULT_MAX_DB_SIZE),
        },
        port: flags.port.or(file.port).unwrap_or(3000),
        db_path: flags
            .db_path
            .or(file.db_path)
            .unwrap_or_else(|| PathBuf::from("traffic.db")),
        filter: Filter {
            port: flags.filter_port.or(file.filter_port),
            ip: flags.filter_ip.or(file.filter_ip),
            protocol: flags.filter_protocol.or(file.filter_protocol),
        },
        connection_timeout: Duration::from_secs(
            flags
                .connection_timeout
                .or(file.connection_timeout)
                .unwrap_or(60),
        ),
        data_retention: flags
            .data_retention
            .or(file.data_retention)
            .map(Duration::from_secs),
        attach_mode: flags
            .attach_mode
            .or(file.attach_mode)
            .unwrap_or(AttachMode::Auto),
        ring_buffer_size: flags
            .ring_buffer_size
            .or(file.ring_buffer_size)
            .unwrap_or(DEFAULT_RING_BUFFER),
        flow_map_size: flags
            .flow_map_size
            .or(file.flow_map_size)
            .unwrap_or(DEFAULT_FLOW_MAP),
        capture_bytes: flags
            .capture_bytes
            .or(file.capture_bytes)
            .unwrap_or(CaptureBytes::Headers),
        sample_rate: flags.sample_rate.or(file.sample_rate).unwrap_or(1),
        quiet: flags.quiet || file.quiet,
    }
}

/// The YAML keys, in the order `--help` lists them.
const KEYS: &[&str] = &[
    "interface",
    "bind",
    "api_token",
    "max_db_size",
    "port",
    "db_path",
    "filter_port",
    "filter_ip",
    "filter_protocol",
    "connection_timeout",
    "data_retention_seconds",
    "attach_mode",
    "ring_buffer_size",
    "flow_map_size",
    "capture_bytes",
    "sample_rate",
    "quiet",
];

/// A config file is a dozen lines; anything far bigger is a mistake (and
/// deeply nested YAML costs the parser time out of proportion to its size).
const MAX_CONFIG_BYTES: u64 = 64 << 10;

fn read_file(path: &std::path::Path) -> anyhow::Result<Cli> {
    let unreadable = || format!("cannot read config file {} (-c/--config)", path.display());
    // Read at most one byte past the limit rather than trusting the size the
    // file reports: devices (/dev/zero) and pipes report none.
    let mut bytes = Vec::new();
    fs::File::open(path)
        .and_then(|f| f.take(MAX_CONFIG_BYTES + 1).read_to_end(&mut bytes))
        .with_context(unreadable)?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        bail!(
            "config file {} is more than {MAX_CONFIG_BYTES} bytes, far more than a config file",
            path.display()
        );
    }
    let text = String::from_utf8(bytes)
        .map_err(|_| anyhow::anyhow!("config file {} is not UTF-8 text", path.display()))?;
    parse_yaml(&text).with_context(|| format!("config file {}", path.display()))
}

/// Parses the YAML settings; every error names the key and the value.
fn parse_yaml(text: &str) -> anyhow::Result<Cli> {
    let doc: Value = serde_yaml::from_str(text).context("not valid YAML")?;
    let map = match doc {
        Value::Mapping(m) => m,
        // An empty file sets nothing.
        Value::Null => return Ok(Cli::default()),
        other => bail!("expected a mapping of settings, found {}", describe(&other)),
    };
    let mut cli = Cli::default();
    for (key, value) in map {
        let Value::String(key) = key else {
            bail!("setting names must be text, found {}", describe(&key));
        };
        // `key:` with no value leaves the setting at its default.
        if value.is_null() {
            continue;
        }
        match key.as_str() {
            "interface" => cli.interface = Some(interfaces_value(&key, &value)?),
            "bind" => {
                let text = text_value(&key, &value)?;
                cli.bind = Some(parse_bind(&text).map_err(|e| anyhow::anyhow!("{key}: {e}"))?);
            }
            "api_token" => {
                cli.api_token = Some(
                    parse_token(&text_value(&key, &value)?)
                        .map_err(|e| anyhow::anyhow!("{key}: {e}"))?,
                )
            }
            "max_db_size" => {
                cli.max_db_size = Some(value.as_u64().with_context(|| {
                    format!(
                        "{key}: expected a number of bytes (0 for no cap), found {}",
                        describe(&value)
                    )
                })?)
            }
            "port" => cli.port = Some(port_value(&key, &value)?),
            "db_path" => {
                cli.db_path = Some(
                    parse_db_path(&text_value(&key, &value)?)
                        .map_err(|e| anyhow::anyhow!("{key}: {e}"))?,
                )
            }
            "filter_port" => cli.filter_port = Some(port_value(&key, &value)?),
            "filter_ip" => {
                let text = text_value(&key, &value)?;
                cli.filter_ip = Some(text.parse().map_err(|_| {
                    anyhow::anyhow!("{key}: {text:?} is not an IPv4 or IPv6 address")
                })?);
            }
            "filter_protocol" => {
                let text = match &value {
                    Value::Number(n) => n.to_string(),
                    _ => text_value(&key, &value)?,
                };
                cli.filter_protocol =
                    Some(parse_protocol(&text).map_err(|e| anyhow::anyhow!("{key}: {e}"))?);
            }
            "connection_timeout" => cli.connection_timeout = Some(seconds_value(&key, &value)?),
            "data_retention_seconds" => cli.data_retention = Some(seconds_value(&key, &value)?),
            "attach_mode" => {
                let text = text_value(&key, &value)?;
                cli.attach_mode =
                    Some(AttachMode::from_str(&text, true).map_err(|_| {
                        anyhow::anyhow!("{key}: {text:?} is not one of auto, tcx, tc")
                    })?);
            }
            "ring_buffer_size" => match value.as_u64() {
                Some(n) if ring_size_ok(n) => cli.ring_buffer_size = Some(n as u32),
                _ => bail!(
                    "{key}: expected a power of two from {MIN_RING} to {MAX_RING}, found {}",
                    describe(&value)
                ),
            },
            "flow_map_size" => match value.as_u64() {
                Some(n @ 1..=16_777_216) => cli.flow_map_size = Some(n as u32),
                _ => bail!(
                    "{key}: expected a whole number from 1 to 16777216, found {}",
                    describe(&value)
                ),
            },
            "capture_bytes" => {
                let text = match &value {
                    Value::Number(n) => n.to_string(),
                    _ => text_value(&key, &value)?,
                };
                cli.capture_bytes =
                    Some(parse_capture(&text).map_err(|e| anyhow::anyhow!("{key}: {e}"))?);
            }
            "sample_rate" => match value.as_u64() {
                Some(n @ 1..=MAX_SAMPLE_RATE) => cli.sample_rate = Some(n as u32),
                _ => bail!(
                    "{key}: expected a whole number from 1 to {MAX_SAMPLE_RATE}, found {}",
                    describe(&value)
                ),
            },
            "quiet" => {
                cli.quiet = value.as_bool().with_context(|| {
                    format!("{key}: expected true or false, found {}", describe(&value))
                })?
            }
            other => bail!(
                "unknown setting {other:?}; the settings are: {}",
                KEYS.join(", ")
            ),
        }
    }
    Ok(cli)
}

fn describe(value: &Value) -> String {
    match value {
        Value::Null => "nothing".into(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the text {s:?}"),
        Value::Sequence(_) => "a list".into(),
        Value::Mapping(_) => "a mapping".into(),
        Value::Tagged(_) => "a tagged value".into(),
    }
}

fn text_value(key: &str, value: &Value) -> anyhow::Result<String> {
    match value {
        Value::String(s) if !s.is_empty() => Ok(s.clone()),
        _ => bail!("{key}: expected text, found {}", describe(value)),
    }
}

/// `eth0`, `"eth0,lo"` or a list `[eth0, lo]`.
fn interfaces_value(key: &str, value: &Value) -> anyhow::Result<InterfaceList> {
    let text = match value {
        Value::Sequence(items) => items
            .iter()
            .map(|item| text_value(key, item))
            .collect::<anyhow::Result<Vec<_>>>()?
            .join(","),
        _ => text_value(key, value)?,
    };
    parse_interfaces(&text).map_err(|e| anyhow::anyhow!("{key}: {e}"))
}

fn port_value(key: &str, value: &Value) -> anyhow::Result<u16> {
    match value.as_u64() {
        Some(n) if (1..=65535).contains(&n) => Ok(n as u16),
        _ => bail!(
            "{key}: expected a port number from 1 to 65535, found {}",
            describe(value)
        ),
    }
}

/// Longest timeout or retention accepted: ten years, far beyond any use and
/// far from the limits of the clocks they are compared with.
const MAX_SECONDS: u64 = 10 * 365 * 86_400;

fn seconds_value(key: &str, value: &Value) -> anyhow::Result<u64> {
    match value.as_u64() {
        Some(n @ 1..=MAX_SECONDS) => Ok(n),
        _ => bail!(
            "{key}: expected a whole number of seconds from 1 to {MAX_SECONDS}, found {}",
            describe(value)
        ),
    }
}

/// Ring-buffer sizes the kernel accepts: a power of two and a whole number
/// of pages (taken as 4096 bytes), here up to 1 GiB.
const MIN_RING: u64 = 4096;
const MAX_RING: u64 = 1 << 30;
const DEFAULT_RING_BUFFER: u32 = 8 << 20;
const DEFAULT_FLOW_MAP: u32 = 131_072;
/// Sparser than one in a million keeps too few samples to be history.
const MAX_SAMPLE_RATE: u64 = 1_000_000;
/// 1 GiB: a month of a busy service's history at a few hundred packets a
/// second, and small next to a node's disk.
pub const DEFAULT_MAX_DB_SIZE: u64 = 1 << 30;

fn parse_capture(text: &str) -> Result<CaptureBytes, String> {
    let max = lightshark_common::MAX_CAPTURE;
    if text.eq_ignore_ascii_case("headers") {
        return Ok(CaptureBytes::Headers);
    }
    match text.parse::<u32>() {
        Ok(n) if n <= max => Ok(CaptureBytes::First(n)),
        _ => Err(format!(
            "{text:?} is neither `headers` nor a number of bytes from 0 to {max}"
        )),
    }
}

fn ring_size_ok(n: u64) -> bool {
    n.is_power_of_two() && (MIN_RING..=MAX_RING).contains(&n)
}

fn parse_ring_size(text: &str) -> Result<u32, String> {
    match text.parse::<u64>() {
        Ok(n) if ring_size_ok(n) => Ok(n as u32),
        _ => Err(format!(
            "{text:?} is not a power of two from {MIN_RING} to {MAX_RING}"
        )),
    }
}

/// Comma-separated interface names: none empty, none twice (it would be
/// attached, and its traffic counted, twice).
fn parse_interfaces(text: &str) -> Result<InterfaceList, String> {
    let mut names: Vec<String> = Vec::new();
    for name in text.split(',').map(str::trim) {
        if name.is_empty() {
            return Err(format!("{text:?} has an empty interface name"));
        }
        if names.iter().any(|n| n == name) {
            return Err(format!("interface {name:?} is listed twice in {text:?}"));
        }
        names.push(name.to_owned());
    }
    Ok(InterfaceList(names))
}

/// A database file path: not SQLite's special names, which would give each
/// connection its own private database.
fn parse_db_path(text: &str) -> Result<PathBuf, String> {
    if text.is_empty() || text == ":memory:" || text.starts_with("file:") {
        return Err(format!(
            "{text:?} is not a file path; the history must be in a file"
        ));
    }
    Ok(PathBuf::from(text))
}

/// An address a socket can listen on: any unicast address, or the
/// unspecified one; not a multicast group.
fn parse_bind(text: &str) -> Result<IpAddr, String> {
    match text.parse::<IpAddr>() {
        Ok(ip) if !ip.is_multicast() => Ok(ip),
        Ok(_) => Err(format!(
            "{text:?} is a multicast address; the API needs a local one"
        )),
        Err(_) => Err(format!("{text:?} is not an IPv4 or IPv6 address")),
    }
}

/// A token a client can send: visible characters only (a header value
/// loses surrounding blanks), at least one.
fn parse_token(text: &str) -> Result<String, String> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("the API token must be one or more visible ASCII characters, no spaces".into());
    }
    Ok(text.to_owned())
}

/// A protocol by name (any case) or number, as `--filter-protocol` and the
/// API's `protocol` parameter take it.
pub fn parse_protocol(text: &str) -> Result<u8, String> {
    let number = match text.to_ascii_lowercase().as_str() {
        "icmp" => 1,
        "tcp" => 6,
        "udp" => 17,
        "icmpv6" => 58,
        "sctp" => 132,
        // Digits only: `u8::from_str` would also take a sign ("+6").
        other => other
            .bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| other.parse::<u8>().ok())
            .flatten()
            .ok_or_else(|| {
                format!(
                    "{text:?} is not a protocol: use TCP, UDP, ICMP, ICMPv6, SCTP or a number \
                     from 0 to 255"
                )
            })?,
    };
    Ok(number)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("lightshark-mini").chain(args.iter().copied()))
    }

    #[test]
    fn the_guide_example_parses_to_its_values() {
        let file = parse_yaml(
            "interface: eth0\nport: 3000\ndb_path: /data/traffic.db\nfilter_port: 80\n\
             filter_ip: 10.0.0.5\nfilter_protocol: TCP\nconnection_timeout: 120\n\
             data_retention_seconds: 86400\nquiet: true\n",
        )
        .unwrap();
        let c = merge(Cli::default(), file);
        assert_eq!(c.interfaces, ["eth0"]);
        assert_eq!(c.db_path, PathBuf::from("/data/traffic.db"));
        assert_eq!(c.filter.port, Some(80));
        assert_eq!(c.filter.ip, Some("10.0.0.5".parse().unwrap()));
        assert_eq!(c.filter.protocol, Some(6));
        assert_eq!(c.connection_timeout, Duration::from_secs(120));
        assert_eq!(c.data_retention, Some(Duration::from_secs(86400)));
        assert!(c.quiet);
    }

    #[test]
    fn flags_win_over_the_file_and_the_file_over_defaults() {
        let file = parse_yaml("port: 4000\ndb_path: /data/a.db\nconnection_timeout: 5\n").unwrap();
        let flags = parse(&["--port", "5000"]).unwrap();
        let c = merge(flags, file);
        assert_eq!(c.port, 5000);
        assert_eq!(c.db_path, PathBuf::from("/data/a.db"));
        assert_eq!(c.connection_timeout, Duration::from_secs(5));
        assert_eq!(c.attach_mode, AttachMode::Auto);
        assert_eq!(c.data_retention, None);
        assert_eq!(c.sample_rate, 1);
        let file = parse_yaml("sample_rate: 10\n").unwrap();
        assert_eq!(merge(Cli::default(), file).sample_rate, 10);
        let file = parse_yaml("sample_rate: 10\n").unwrap();
        let flags = parse(&["--sample-rate", "100"]).unwrap();
        assert_eq!(merge(flags, file).sample_rate, 100);
    }

    #[test]
    fn every_bad_value_names_its_key_and_value() {
        for (yaml, words) in [
            ("colour: blue", &["unknown setting", "colour"][..]),
            ("port: 70000", &["port", "70000"]),
            ("port: web", &["port", "web"]),
            ("filter_port: 0", &["filter_port", "0"]),
            ("filter_ip: 10.0.0.300", &["filter_ip", "10.0.0.300"]),
            ("filter_protocol: tcpp", &["filter_protocol", "tcpp"]),
            ("filter_protocol: 256", &["filter_protocol", "256"]),
            ("connection_timeout: -1", &["connection_timeout", "-1"]),
            (
                "data_retention_seconds: soon",
                &["data_retention_seconds", "soon"],
            ),
            ("quiet: maybe", &["quiet", "maybe"]),
            ("attach_mode: xdp", &["attach_mode", "xdp"]),
            ("sample_rate: 0", &["sample_rate", "0"]),
            ("sample_rate: 1000001", &["sample_rate", "1000001"]),
            ("sample_rate: half", &["sample_rate", "half"]),
            ("- port", &["mapping"]),
        ] {
            let err = format!("{:#}", parse_yaml(yaml).unwrap_err());
            for w in words {
                assert!(err.contains(w), "{yaml:?}: {err:?} lacks {w:?}");
            }
        }
    }

    proptest::proptest! {
        /// Any text as a config file is either settings or an error; it
        /// never panics.
        #[test]
        fn any_yaml_parses_or_errs(text in "(?s).{0,300}") {
            let _ = parse_yaml(&text);
        }

        /// Any value under any known key is accepted or refused by name.
        #[test]
        fn bad_values_name_their_key(key in proptest::sample::select(KEYS), value in "[ -~]{0,40}") {
            let yaml = format!("{key}: {value}\n");
            if let Err(e) = parse_yaml(&yaml) {
                let text = format!("{e:#}");
                proptest::prop_assert!(text.contains(key) || text.contains("YAML"), "{}", text);
            }
        }
    }

    /// Config files that once broke or nearly broke parsing, kept as a corpus.
    #[test]
    fn config_corpus() {
        for (yaml, ok) in [
            ("", true),
            ("# only a comment\n", true),
            ("port: 3000\nport: 3001\n", false),
            ("data_retention_seconds: 10000000000000000\n", false),
            ("connection_timeout: 18446744074\n", false),
            ("api_token: \" \"\n", false),
            ("bind: 224.0.0.1\n", false),
            ("db_path: \":memory:\"\n", false),
            ("attach_mode: TC\n", true),
            ("a: &x [1]\nb: *x\n", false),
            ("port: !!str 3000\n", false),
            ("? [a, b]\n: c\n", false),
            ("---\nport: 1\n---\nport: 2\n", false),
        ] {
            assert_eq!(parse_yaml(yaml).is_ok(), ok, "{yaml:?}");
        }
    }

    #[test]
    fn interfaces_as_a_comma_list_or_a_yaml_list() {
        let flags = parse(&["-i", "eth0,lo"]).unwrap();
        assert_eq!(merge(flags, Cli::default()).interfaces, ["eth0", "lo"]);
        for yaml in ["interface: [eth0, lo]\n", "interface: \"eth0, lo\"\n"] {
            let c = merge(Cli::default(), parse_yaml(yaml).unwrap());
            assert_eq!(c.interfaces, ["eth0", "lo"], "{yaml}");
        }
        assert!(merge(Cli::default(), Cli::default()).interfaces.is_empty());
        for (yaml, words) in [
            (
                "interface: [eth0, eth0]",
                &["interface", "\"eth0\" is listed twice"][..],
            ),
            ("interface: \"eth0,,lo\"", &["interface", "empty"]),
            ("interface: [eth0, 7]", &["interface", "number 7"]),
        ] {
            let err = format!("{:#}", parse_yaml(yaml).unwrap_err());
            for w in words {
                assert!(err.contains(w), "{yaml:?}: {err:?} lacks {w:?}");
            }
        }
        let err = parse(&["-i", "lo,vb,lo"]).unwrap_err().to_string();
        assert!(
            err.contains("--interface") && err.contains("\"lo\" is listed twice"),
            "{err}"
        );
    }

    #[test]
    fn protocols_by_name_in_any_case_or_number() {
        assert_eq!(parse_protocol("tcp"), Ok(6));
        assert_eq!(parse_protocol("ICMPv6"), Ok(58));
        assert_eq!(parse_protocol("Sctp"), Ok(132));
        assert_eq!(parse_protocol("47"), Ok(47));
        assert!(parse_protocol("ipx").is_err());
        assert!(parse_protocol("+6").is_err());
    }

    #[test]
    fn bad_flags_are_rejected_with_the_flag_named() {
        for args in [
            &["--port", "0"][..],
            &["--port", "65536"],
            &["--filter-ip", "nope"],
            &["--filter-protocol", "tcpx"],
            &["--connection-timeout", "0"],
            &["--attach-mode", "xdp"],
            &["--sample-rate", "0"],
            &["--sample-rate", "1000001"],
            &["--sample-rate", "-5"],
        ] {
            let err = parse(args).unwrap_err().to_string();
            assert!(err.contains(args[0]), "{args:?}: {err}");
        }
    }
}
