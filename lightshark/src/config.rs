//! Command-line flags, gathered into one typed [`Config`] that the rest of the
//! agent reads. Nothing else parses arguments.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

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

/// LightShark-mini: counts a network interface's traffic per 5-tuple in the
/// kernel (eBPF), keeps one sample per packet in SQLite, and serves both over
/// a JSON API.
#[derive(Debug, Parser)]
#[command(name = "lightshark-mini", version, about, long_about = None)]
struct Cli {
    /// Network interface to watch [default: the default-route interface,
    /// else the first up non-loopback one]
    #[arg(short, long, value_name = "NAME")]
    interface: Option<String>,

    /// TCP port of the HTTP API
    #[arg(short, long, value_name = "PORT", default_value_t = 3000)]
    port: u16,

    /// SQLite file that keeps the per-packet history
    #[arg(long, value_name = "PATH", default_value = "traffic.db")]
    db_path: PathBuf,

    /// How to hook the classifier: TCX links or the legacy clsact qdisc
    #[arg(long, value_enum, default_value_t = AttachMode::Auto)]
    attach_mode: AttachMode,

    /// Log warnings and errors only
    #[arg(short, long)]
    quiet: bool,
}

/// Everything the agent was asked to do, validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// None: choose one at start (see `interface::resolve`).
    pub interface: Option<String>,
    pub port: u16,
    pub db_path: PathBuf,
    pub attach_mode: AttachMode,
    pub quiet: bool,
}

impl Config {
    /// Parses the process arguments; on bad input clap prints the error
    /// naming the flag and exits with status 2.
    pub fn from_args() -> Config {
        let cli = Cli::parse();
        Config {
            interface: cli.interface,
            port: cli.port,
            db_path: cli.db_path,
            attach_mode: cli.attach_mode,
            quiet: cli.quiet,
        }
    }
}
