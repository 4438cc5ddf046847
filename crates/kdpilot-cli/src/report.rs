//! `kdpilot report`: what a night of capture found. Reads JSON-lines logs with kdpilot-report
//! and prints text, JSON or folded stacks; writes a flame graph and an HTML page on request.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::anyhow;
use clap::{Args, ValueEnum};
use kdpilot_report::{
    read_logs, read_outstanding, render_flamegraph, render_folded, render_html, render_json,
    render_outstanding_flamegraph, render_outstanding_json, render_outstanding_text, render_text,
    write_atomically, ReportError, ReportOptions,
};

use crate::error::CliError;
use crate::output;

const AFTER_HELP: &str = "\
Stacks are grouped by module!function+offset: the same code path in another boot (another
kernel base) is the same stack. The driver of a stack is its first frame outside nt and hal.
Boots are numbered across captures and files. Lines that are not records, and an incomplete
last line (a capture killed or still writing), are skipped with a warning on stderr.

--outstanding (a capture with `kdpilot capture --track-frees`): only the allocations that were
never freed, by stack, with their ages at the end of the log; the last boot of each capture
in the main table, what a reboot ended in a section per boot; --format, --svg and --top apply
to them (the flame graph is the leak picture).

Examples:
  kdpilot report night.jsonl
  kdpilot report night1.jsonl night2.jsonl --top 20
  kdpilot report night.jsonl --html night.html --svg night.svg
  kdpilot report night.jsonl --format folded | inferno-flamegraph > night.svg
  kdpilot report night.jsonl --outstanding --svg leaks.svg";

/// What `kdpilot report` prints on stdout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// For people: totals, drivers, the top stacks with their frames, boots
    Text,
    /// For programs: the whole report as one JSON document
    Json,
    /// For flame graph tools: `frame;frame;frame count`, outermost frame first
    Folded,
}

/// Arguments of `kdpilot report`.
#[derive(Debug, Args)]
#[command(after_help = AFTER_HELP)]
pub struct ReportArgs {
    /// JSON-lines logs written by `kdpilot capture` (several make one report)
    #[arg(value_name = "FILE.jsonl", required = true)]
    files: Vec<PathBuf>,

    /// What to print on stdout
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,

    /// Also write a flame graph of every stack (SVG) to FILE
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,

    /// Also write one self-contained HTML page (summary, top stacks, flame graph, hits over
    /// time) to FILE
    #[arg(long, value_name = "FILE")]
    html: Option<PathBuf>,

    /// How many stacks to list, most hits first (0: all)
    #[arg(long, value_name = "N", default_value_t = 10)]
    top: usize,

    /// Only the allocations never freed (needs logs of `kdpilot capture --track-frees`): by
    /// stack, with their count, bytes and age at the end of the log
    #[arg(long)]
    outstanding: bool,
}

/// The same file, as far as the file system can tell.
fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// Refuses outputs that would overwrite an input or each other.
fn check_outputs(args: &ReportArgs) -> anyhow::Result<()> {
    let outputs = [("--svg", &args.svg), ("--html", &args.html)];
    for (option, out) in outputs {
        let Some(out) = out else { continue };
        if let Some(input) = args.files.iter().find(|f| same_file(f, out)) {
            return Err(CliError::usage(anyhow!(
                "{option} {} is also an input log: give the report another file name",
                input.display()
            ))
            .into());
        }
    }
    if let (Some(svg), Some(html)) = (&args.svg, &args.html) {
        if same_file(svg, html) {
            return Err(CliError::usage(anyhow!(
                "--svg and --html name the same file {}: give each its own",
                svg.display()
            ))
            .into());
        }
    }
    if args.outstanding && args.html.is_some() {
        return Err(CliError::usage(anyhow!(
            "--html does not show --outstanding yet: use --svg FILE for the flame graph of the \
             outstanding allocations, or leave out --outstanding for the page of every hit"
        ))
        .into());
    }
    if args.svg.is_some() && !kdpilot_report::HAS_FLAMEGRAPH {
        return Err(CliError::usage(ReportError::NoFlameGraph).into());
    }
    Ok(())
}

/// A report error with the exit code it deserves: bad input is a usage error (2).
fn classify(e: ReportError) -> anyhow::Error {
    if e.is_input_error() {
        CliError::usage(e).into()
    } else {
        e.into()
    }
}

/// `kdpilot report --outstanding`: the allocations never freed.
fn run_outstanding(args: &ReportArgs) -> anyhow::Result<()> {
    let outstanding = read_outstanding(&args.files).map_err(classify)?;
    for warning in &outstanding.report.warnings {
        tracing::warn!("{warning}");
    }
    let options = ReportOptions {
        top: args.top,
        generated_at: Some(SystemTime::now()),
        ..ReportOptions::default()
    };
    if let Some(path) = &args.svg {
        let svg = render_outstanding_flamegraph(&outstanding).map_err(classify)?;
        write_atomically(path, svg.as_bytes())?;
        tracing::info!(
            "wrote the flame graph of the outstanding allocations to {}",
            path.display()
        );
    }
    let text = match args.format {
        Format::Text => render_outstanding_text(&outstanding, &options),
        Format::Json => render_outstanding_json(&outstanding, &options),
        Format::Folded => render_folded(&outstanding.report),
    };
    output::print(&text)
}

/// Runs `kdpilot report`.
pub fn run(args: ReportArgs) -> anyhow::Result<()> {
    check_outputs(&args)?;
    if args.outstanding {
        return run_outstanding(&args);
    }
    let report = read_logs(&args.files).map_err(classify)?;
    for warning in &report.warnings {
        tracing::warn!("{warning}");
    }
    let options = ReportOptions {
        top: args.top,
        generated_at: Some(SystemTime::now()),
        ..ReportOptions::default()
    };
    if let Some(path) = &args.svg {
        let svg = render_flamegraph(&report).map_err(classify)?;
        write_atomically(path, svg.as_bytes())?;
        tracing::info!("wrote the flame graph to {}", path.display());
    }
    if let Some(path) = &args.html {
        write_atomically(path, render_html(&report, &options).as_bytes())?;
        tracing::info!("wrote the HTML report to {}", path.display());
    }
    let text = match args.format {
        Format::Text => render_text(&report, &options),
        Format::Json => render_json(&report, &options),
        Format::Folded => render_folded(&report),
    };
    output::print(&text)
}
