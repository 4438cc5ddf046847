//! `cargo xtask bench`: the capture's line cost against the simulator at 19200 and 115200 baud
//! (per hit, connect-to-armed, reboot-to-re-armed, the protocol's lower bound and the ratio),
//! and the `kdpilot` binary's CPU and memory while it waits for hits and after a long run.
//! Release builds; the figures and the method are in docs/benchmarks.md.

use std::process::Command;

use anyhow::{bail, Context};

/// One line for `cargo xtask help`.
pub const ABOUT: &str = "capture cost on a 19200/115200-baud line vs the protocol's lower bound; \
                         idle CPU and memory [--quick] [--hits N] [--idle SECS]";

/// Runs the benchmark.
pub fn run(args: &[String]) -> anyhow::Result<()> {
    let root = crate::workspace_root();
    let quick = args.iter().any(|a| a == "--quick");
    let mut pass: Vec<String> = args.to_vec();
    if !pass.iter().any(|a| a == "--idle") {
        pass.push("--idle".into());
        pass.push(if quick { "10" } else { "60" }.into());
    }
    let status = Command::new(env!("CARGO"))
        .current_dir(&root)
        .args([
            "build",
            "--release",
            "-q",
            "-p",
            "kdpilot-cli",
            "-p",
            "kdpilot-e2e",
        ])
        .args(["--bin", "kdpilot", "--example", "bench_capture"])
        .status()
        .context("cargo build")?;
    if !status.success() {
        bail!("the release build failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let kdpilot = target.join("release/kdpilot");
    let status = Command::new(target.join("release/examples/bench_capture"))
        .current_dir(&root)
        .args(&pass)
        .arg("--kdpilot")
        .arg(&kdpilot)
        .status()
        .context("bench_capture")?;
    if !status.success() {
        bail!("the benchmark failed");
    }
    Ok(())
}
