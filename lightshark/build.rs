//! Builds the kernel program (`lightshark-ebpf`) for the BPF target and leaves
//! the object in OUT_DIR, where `capture.rs` embeds it.
//!
//! A missing toolchain piece otherwise shows up only after about 85 s of
//! building `core`, buried in warnings; the preflight names every missing
//! piece with its install command in half a second.

use std::{env, fs, path::PathBuf, process::Command};

use anyhow::{bail, Context as _};

const EBPF_PACKAGE: &str = "lightshark-ebpf";
/// Name of the bin target of the eBPF crate, which is the object file name.
const EBPF_BIN: &str = "lightshark";
/// Names the rustup toolchain that builds the eBPF crate (default `nightly`),
/// so an image can pin a dated nightly whose LLVM matches bpf-linker's.
const TOOLCHAIN_VAR: &str = "LIGHTSHARK_EBPF_TOOLCHAIN";

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    if env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        // The binary refuses to start without an object (see capture.rs), so
        // an empty placeholder keeps `include_bytes_aligned!` compiling.
        fs::write(out_dir.join(EBPF_BIN), []).context("writing the placeholder object")?;
        return Ok(());
    }
    println!("cargo:rerun-if-env-changed={TOOLCHAIN_VAR}");
    let toolchain = env::var(TOOLCHAIN_VAR).unwrap_or_else(|_| "nightly".into());
    preflight(&toolchain)?;
    let root = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").context("no manifest dir")?)
        .join("..")
        .join(EBPF_PACKAGE);
    let root = root.to_str().context("non-UTF-8 path to the eBPF crate")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: EBPF_PACKAGE,
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
}

fn preflight(toolchain: &str) -> anyhow::Result<()> {
    let mut missing = Vec::new();
    let nightly = Command::new("rustup")
        .args(["run", toolchain, "rustc", "--print", "sysroot"])
        .output();
    match nightly {
        Ok(out) if out.status.success() => {
            let sysroot = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if !sysroot.join("lib/rustlib/src/rust/library/core").exists() {
                missing.push(format!(
                    "rust-src for {toolchain}: rustup +{toolchain} component add rust-src"
                ));
            }
        }
        _ => missing.push(format!(
            "the {toolchain} toolchain: rustup toolchain install {toolchain}"
        )),
    }
    let linker_found = env::var_os("PATH")
        .map(|p| env::split_paths(&p).any(|d| d.join("bpf-linker").is_file()))
        .unwrap_or(false);
    if !linker_found {
        missing.push(
            "bpf-linker on PATH: apt-get install -y llvm-22-dev && LLVM_PREFIX=/usr/lib/llvm-22 \
             cargo install bpf-linker@0.13.0 --locked --no-default-features --features llvm-22"
                .to_owned(),
        );
    }
    if !missing.is_empty() {
        bail!(
            "cannot build the eBPF program; missing:\n  - {}\n(`cargo xtask setup` installs all of them)",
            missing.join("\n  - ")
        );
    }
    Ok(())
}
