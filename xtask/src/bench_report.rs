//! `cargo xtask bench-report [RECORDS] [STACKS] [BOOTS] [RUNS]`: the report of a big capture
//! log, timed, with its peak memory.
//!
//! Builds kdpilot-report's `bench_report` example in release mode, writes a synthetic log of
//! RECORDS hits (default 1,000,000) over STACKS unique stacks (200) and BOOTS boots (20) into a
//! temporary directory, then reports it RUNS times (3), each in a fresh process, and prints
//! each run's JSON line: the time to read the log, to render each form, and the process's peak
//! resident memory (VmHWM). The numbers go into docs/benchmarks.md by hand. Not a test: the
//! times depend on the machine.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// One line for `cargo xtask help`.
pub const ABOUT: &str =
    "time a report of a synthetic 1M-record log and measure its peak memory (docs/benchmarks.md)";

/// Runs the subcommand.
pub fn run(args: &[String]) -> Result<()> {
    let number = |i: usize, default: u64| -> Result<u64> {
        match args.get(i) {
            Some(s) => s
                .replace('_', "")
                .parse()
                .with_context(|| format!("`{s}` is not a number")),
            None => Ok(default),
        }
    };
    let records = number(0, 1_000_000)?;
    let stacks = number(1, 200)?;
    let boots = number(2, 20)?;
    let runs = number(3, 3)?;

    let root = crate::workspace_root();
    let status = Command::new("cargo")
        .args([
            "build",
            "--release",
            "--quiet",
            "-p",
            "kdpilot-report",
            "--example",
            "bench_report",
        ])
        .current_dir(&root)
        .status()?;
    if !status.success() {
        bail!("building the bench_report example failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let exe = target.join("release/examples/bench_report");

    let dir = std::env::temp_dir().join(format!("kdpilot-bench-report-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let log = dir.join("bench.jsonl");
    let result = (|| -> Result<()> {
        let status = Command::new(&exe)
            .arg("generate")
            .arg(&log)
            .args([records, stacks, boots].map(|n| n.to_string()))
            .status()?;
        if !status.success() {
            bail!("generating {} failed", log.display());
        }
        for run in 1..=runs {
            let out = Command::new(&exe).arg("report").arg(&log).output()?;
            if !out.status.success() {
                bail!(
                    "report run {run} failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            print!("run {run}: {}", String::from_utf8_lossy(&out.stdout));
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}
