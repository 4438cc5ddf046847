//! Reports of kdpilot capture logs: which code path leaks.
//!
//! [`read_logs`] streams one or more JSON-lines logs (docs/capture-log.md) into a [`Report`]:
//! totals, every unique stack with its hits, bytes, first and last hit and hits per boot, the
//! driver responsible for each stack, and a summary per driver. The renderers turn a report into
//! what people read:
//!
//! - [`render_text`]: for a terminal, 80 to 120 columns;
//! - [`render_json`]: for programs;
//! - [`render_folded`]: `frame;frame;frame count` lines, outermost frame first, the input of
//!   flame graph tools;
//! - [`render_flamegraph`]: a flame graph SVG (inferno; feature `flamegraph`, on by default);
//! - [`render_html`]: one self-contained page (no network) with all of it and a plot of hits
//!   over time of the top stacks; [`write_html_report`] (re)writes it atomically, for a capture
//!   that refreshes the page while it runs.
//!
//! [`read_outstanding`] pairs hits with the `allocated` and `free` records of a capture with
//! `--track-frees` into an [`Outstanding`]: the allocations never freed, by stack
//! ([`render_outstanding_text`], [`render_outstanding_json`], [`render_outstanding_flamegraph`];
//! its `report` renders with the forms above).
//!
//! Rules (docs/report.md):
//! - **Grouping.** Two hits have the same stack when their frames have the same
//!   `module!function+offset`, in the same order: addresses move with every boot (KASLR) and do
//!   not count. A frame without a function is `module+offset` (from the module's base), one
//!   outside every module its address.
//! - **Driver.** The responsible driver of a stack is the module of its first frame (innermost
//!   first) that is in a named module other than the kernel and the HAL (`nt`, `hal`,
//!   `ntoskrnl`, `ntkrnlmp`, `ntkrnlpa`, `ntkrpamp`, ...).
//! - **Boots.** Boot numbers restart with each capture; the report numbers boots from 1
//!   across captures and files, so two nights never share a boot.
//! - **Bad input.** A line that is not a record is skipped with a [`Warning`] naming the file
//!   and line; an incomplete last line (a capture killed or still writing) likewise; records of
//!   a kind this version does not know are skipped and counted; a file with lines but not one
//!   record is an error ([`ReportError::NotALog`]), and so is a file that cannot be read.
//! - **Memory** grows with the number of unique frames and stacks, not with hits: names are
//!   stored once, a stack is a list of frame numbers, and each stack's timeline has at most
//!   [`timeline::MAX_BUCKETS`] buckets ([`read_outstanding`] also keeps each hit until it is
//!   freed).
#![cfg_attr(
    not(test),
    warn(
        clippy::indexing_slicing,
        clippy::unwrap_used,
        clippy::panic,
        clippy::expect_used
    )
)]

mod aggregate;
mod chart;
pub mod driver;
mod error;
#[cfg(feature = "flamegraph")]
mod flamegraph;
mod folded;
pub mod format;
mod html;
pub mod lines;
mod model;
mod outstanding;
mod pipeline;
pub mod synth;
mod text;
pub mod timeline;

#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, SystemTime};

pub use error::{ReportError, Warning};
pub use folded::render_folded;
pub use html::render_html;
pub use model::{
    BootCount, BootInfo, DriverInfo, EndedBoot, FileInfo, Note, Outstanding, Pairing, Report,
    StackInfo, Summary, MAX_NOTES,
};
pub use outstanding::{age, render_outstanding_json, render_outstanding_text};
pub use text::render_text;

/// How a report is rendered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReportOptions {
    /// Stacks listed by the text, JSON and HTML forms; 0 lists every stack. The folded form
    /// and the flame graph always have every stack.
    pub top: usize,
    /// Stacks drawn in the HTML page's plot of hits over time.
    pub chart_stacks: usize,
    /// The HTML page reloads itself this often: for a page that a capture rewrites while it
    /// runs (`kdpilot capture --report`). `None` for a finished report.
    pub refresh: Option<Duration>,
    /// When the report was made, shown on the HTML page (`None`: not shown).
    pub generated_at: Option<SystemTime>,
}

impl Default for ReportOptions {
    fn default() -> Self {
        ReportOptions {
            top: 10,
            chart_stacks: 5,
            refresh: None,
            generated_at: None,
        }
    }
}

impl ReportOptions {
    /// The number of stacks to list out of `n`.
    pub fn listed(&self, n: usize) -> usize {
        if self.top == 0 {
            n
        } else {
            self.top.min(n)
        }
    }
}

/// Reads the logs, in the order given, into a report (see the crate documentation for the
/// rules). A path given twice is read once, with a warning.
pub fn read_logs<P: AsRef<Path>>(inputs: &[P]) -> Result<Report, ReportError> {
    let mut aggregator = aggregate::Aggregator::default();
    let mut seen = HashSet::new();
    for path in inputs {
        let path = path.as_ref();
        let identity = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        if !seen.insert(identity) {
            aggregator.duplicate(path);
            continue;
        }
        aggregator.read_file(path)?;
    }
    Ok(aggregator.finish())
}

/// Reads the logs and pairs each hit with its `allocated` and `free` records (a capture with
/// `kdpilot capture --track-frees`): the allocations never freed, by stack (docs/report.md,
/// "Outstanding allocations").
///
/// A hit is outstanding when an `allocated` record gave its address (not 0) and no `free`
/// record for it follows in the same capture. Those of boots that a reboot ended are in
/// [`Outstanding::ended_boots`], the rest (the last boot of each capture, still running at
/// the end of the logs) in [`Outstanding::report`]. Hits without a learnt address, and frees
/// and `allocated` records whose hit is not in the logs, are counted in
/// [`Outstanding::pairing`]. Memory grows with the hits not freed.
///
/// Errors as [`read_logs`], and [`ReportError::NoAllocations`] when the logs have no
/// `allocated` record at all.
pub fn read_outstanding<P: AsRef<Path>>(inputs: &[P]) -> Result<Outstanding, ReportError> {
    let mut aggregator = aggregate::Aggregator::default();
    aggregator.track_frees();
    let mut seen = HashSet::new();
    for path in inputs {
        let path = path.as_ref();
        let identity = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        if !seen.insert(identity) {
            aggregator.duplicate(path);
            continue;
        }
        aggregator.read_file(path)?;
    }
    aggregator
        .finish_outstanding()
        .ok_or(ReportError::NoAllocations)
}

/// The report as pretty-printed JSON: [`Report`]'s fields, with `stacks` cut to
/// [`ReportOptions::top`] (`summary.unique_stacks` has the full count), times as RFC 3339
/// UTC strings and addresses as `"0x..."` strings. Ends with a newline.
pub fn render_json(report: &Report, options: &ReportOptions) -> String {
    /// [`Report`] by reference, with the stacks cut (no copy of the report).
    #[derive(serde::Serialize)]
    struct View<'a> {
        summary: &'a Summary,
        files: &'a [FileInfo],
        boots: &'a [BootInfo],
        drivers: &'a [DriverInfo],
        stacks: &'a [StackInfo],
        stacks_by_bytes: &'a [usize],
        ignored: &'a std::collections::BTreeMap<String, u64>,
        warnings: &'a [Warning],
        notes: &'a [Note],
    }
    let listed = options.listed(report.stacks.len());
    let view = View {
        summary: &report.summary,
        files: &report.files,
        boots: &report.boots,
        drivers: &report.drivers,
        stacks: report.stacks.get(..listed).unwrap_or(&report.stacks),
        stacks_by_bytes: report
            .stacks_by_bytes
            .get(..listed)
            .unwrap_or(&report.stacks_by_bytes),
        ignored: &report.ignored,
        warnings: &report.warnings,
        notes: &report.notes,
    };
    let mut out = serde_json::to_string_pretty(&view).unwrap_or_default();
    out.push('\n');
    out
}

/// The flame graph of every stack, by hits, as an SVG document (inferno), with its own
/// JavaScript for zooming and searching.
pub fn render_flamegraph(report: &Report) -> Result<String, ReportError> {
    #[cfg(feature = "flamegraph")]
    {
        flamegraph::render(report)
    }
    #[cfg(not(feature = "flamegraph"))]
    {
        let _ = report;
        Err(ReportError::NoFlameGraph)
    }
}

/// The flame graph of the outstanding allocations of [`read_outstanding`] (the boots still
/// running at the end of the logs), width: allocations never freed. This is the leak picture.
pub fn render_outstanding_flamegraph(outstanding: &Outstanding) -> Result<String, ReportError> {
    #[cfg(feature = "flamegraph")]
    {
        flamegraph::render_outstanding(outstanding)
    }
    #[cfg(not(feature = "flamegraph"))]
    {
        let _ = outstanding;
        Err(ReportError::NoFlameGraph)
    }
}

/// Whether this build draws flame graphs (feature `flamegraph`).
pub const HAS_FLAMEGRAPH: bool = cfg!(feature = "flamegraph");

/// Writes `bytes` to `path` atomically: to a temporary file in the same directory, synced,
/// then renamed over `path`. A reader (a browser reloading the page) sees the old file or the
/// new one, never half of one.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), ReportError> {
    let err = |source| ReportError::Write {
        path: path.to_path_buf(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".kdpilot-report-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(err)?;
    tmp.write_all(bytes).map_err(err)?;
    tmp.as_file().sync_data().map_err(err)?;
    tmp.persist(path).map_err(|e| err(e.error))?;
    Ok(())
}

/// Reads the logs and (re)writes the HTML page `out` atomically ([`write_atomically`]); returns
/// the totals.
///
/// Made for a capture that keeps a page up to date while it runs (`kdpilot capture --report
/// FILE.html`, every minute): give it the capture's JSON log (an incomplete last line, the
/// record being written, is a warning on the page, not an error) and
/// [`ReportOptions::refresh`] so that an open browser reloads the page. Each call reads the
/// logs from the start (a million records take a few seconds; run it off the capture's
/// loop, e.g. with `spawn_blocking`). Without the `flamegraph` feature the page has no flame
/// graph and says so.
pub fn write_html_report<P: AsRef<Path>>(
    inputs: &[P],
    out: &Path,
    options: &ReportOptions,
) -> Result<Summary, ReportError> {
    let report = read_logs(inputs)?;
    let page = render_html(&report, options);
    write_atomically(out, page.as_bytes())?;
    Ok(report.summary)
}
