//! What can go wrong reading logs and writing reports: [`ReportError`] ends the report,
//! a [`Warning`] is reported and the report goes on.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// A report could not be made or written. Each variant names the file and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// An input log could not be opened (missing, a directory, no permission).
    #[error("cannot open the log {}: {source} (check the path: give the .jsonl file that `kdpilot capture` wrote)", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// An input log could not be read after it was opened (a disk or network error).
    #[error("cannot read the log {} at line {line}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The line being read (from 1).
        line: u64,
        /// Why.
        source: io::Error,
    },
    /// An input has lines but not one of them is a record: not a JSON-lines capture log.
    #[error(
        "{} is not a JSON-lines capture log: none of its {lines} lines is a record{hint}",
        path.display(),
        hint = if is_text_log(path) {
            " (this looks like the text log: give the .jsonl file beside it)"
        } else {
            " (give the .jsonl file that `kdpilot capture --json` wrote)"
        }
    )]
    NotALog {
        /// The file.
        path: PathBuf,
        /// How many lines it has.
        lines: u64,
    },
    /// A report file could not be written.
    #[error("cannot write the report {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A flame graph was asked for, but this kdpilot was built without the `flamegraph`
    /// feature (the inferno crate).
    #[error("this kdpilot was built without flame graphs (cargo feature `flamegraph` of kdpilot-report): use --format folded and a flame graph tool such as inferno-flamegraph or flamegraph.pl")]
    NoFlameGraph,
    /// `--outstanding` was asked for, but the logs have no `allocated` record: the capture did
    /// not learn the addresses of its allocations, so none can be paired with a free.
    #[error("the logs have no `allocated` records, so no allocation can be paired with its free: capture with `kdpilot capture --track-frees` to report outstanding allocations")]
    NoAllocations,
    /// The flame graph could not be drawn.
    #[error("cannot draw the flame graph: {0}")]
    FlameGraph(io::Error),
}

impl ReportError {
    /// The error is about the user's input (a path that is not a log, a missing file) rather
    /// than a failure while running: a command line reports it as a usage error.
    pub fn is_input_error(&self) -> bool {
        matches!(
            self,
            ReportError::Open { .. }
                | ReportError::NotALog { .. }
                | ReportError::NoFlameGraph
                | ReportError::NoAllocations
        )
    }
}

fn is_text_log(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("log"))
}

/// Something worth knowing about the input that did not stop the report: a line that is not a
/// record, an incomplete last line, a file given twice.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Warning {
    /// The input file.
    pub file: PathBuf,
    /// The line (from 1), when the warning is about one line.
    pub line: Option<u64>,
    /// What happened and what was done about it.
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}: {}", self.file.display(), self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}
