//! Errors as the user sees them: which exit code, and how the cause chain is printed.
//!
//! Subcommands return `anyhow::Result<()>`. An error that is not marked exits with
//! [`ErrorKind::Runtime`] (1). To pick another exit code, a subcommand wraps the error in a
//! [`CliError`], directly or through [`ResultExt`]:
//!
//! ```ignore
//! let tag = parse_arg(arg, false).usage_err()?;                      // exit 2
//! let link = open(&endpoint).await.context("opening COM1").target_err()?; // exit 3
//! let endpoint: Endpoint = text.parse().map_err(CliError::usage)?;     // exit 2
//! return Err(CliError::target(anyhow!("the target stopped answering")).into()); // exit 3
//! ```
//!
//! The marker is transparent: it prints exactly like the error it wraps, and it is found anywhere
//! in the chain, so adding `.context(..)` on top of a marked error keeps its kind. When several
//! markers are stacked, the outermost one wins.

use std::error::Error as StdError;
use std::fmt;
use std::io::{self, Write};
use std::process::ExitCode;

/// What kind of failure ended the program; each kind has its own exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The command failed while running (a file could not be written, ...). Exit code 1.
    Runtime,
    /// The command line or an argument's value is invalid, found before anything was done.
    /// Exit code 2, the same code clap uses for its own parse errors.
    Usage,
    /// The debug target could not be reached or did not answer (connection refused, no port,
    /// timeout, link lost). Exit code 3.
    Target,
}

impl ErrorKind {
    /// The process exit code for this kind of failure.
    pub const fn exit_code(self) -> u8 {
        match self {
            ErrorKind::Runtime => 1,
            ErrorKind::Usage => 2,
            ErrorKind::Target => 3,
        }
    }
}

/// An error marked with the [`ErrorKind`] that decides the exit code.
///
/// Displays as the wrapped error and reports the wrapped error's sources as its own, so the
/// printed cause chain is unchanged by the marking.
pub struct CliError {
    kind: ErrorKind,
    source: anyhow::Error,
}

impl CliError {
    /// Marks `error` with `kind`.
    pub fn new(kind: ErrorKind, error: impl Into<anyhow::Error>) -> Self {
        Self {
            kind,
            source: error.into(),
        }
    }

    /// Marks `error` as a usage error (exit code 2): invalid user input.
    pub fn usage(error: impl Into<anyhow::Error>) -> Self {
        Self::new(ErrorKind::Usage, error)
    }

    /// Marks `error` as a target or link error (exit code 3).
    pub fn target(error: impl Into<anyhow::Error>) -> Self {
        Self::new(ErrorKind::Target, error)
    }

    /// The kind of failure this error reports.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `{}` of an anyhow::Error is its outermost message only; the rest comes from `source()`.
        fmt::Display::fmt(&self.source, f)
    }
}

impl fmt::Debug for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CliError")
            .field("kind", &self.kind)
            .field("source", &self.source)
            .finish()
    }
}

impl StdError for CliError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source.source()
    }
}

/// Marks the error of a `Result` with an [`ErrorKind`].
pub trait ResultExt<T> {
    /// Marks the error as a usage error (exit code 2).
    fn usage_err(self) -> anyhow::Result<T>;
    /// Marks the error as a target or link error (exit code 3).
    fn target_err(self) -> anyhow::Result<T>;
}

impl<T, E: Into<anyhow::Error>> ResultExt<T> for Result<T, E> {
    fn usage_err(self) -> anyhow::Result<T> {
        self.map_err(|e| CliError::usage(e).into())
    }

    fn target_err(self) -> anyhow::Result<T> {
        self.map_err(|e| CliError::target(e).into())
    }
}

/// The kind of an error that reached `main`: the outermost [`CliError`] in its chain, else
/// [`ErrorKind::Runtime`].
pub fn kind_of(error: &anyhow::Error) -> ErrorKind {
    error
        .chain()
        .find_map(|e| e.downcast_ref::<CliError>())
        .map_or(ErrorKind::Runtime, CliError::kind)
}

/// Whether the error comes from writing to a closed pipe (`kdpilot ... | head -1`).
///
/// Rust ignores SIGPIPE, so a write to a closed stdout fails with `BrokenPipe`; like other Unix
/// tools, kdpilot then stops quietly with exit code 0.
pub fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|e| {
        e.downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
    })
}

/// Prints `error` on stderr as `kdpilot: error: ...` plus one `  caused by: ...` line per source,
/// and returns the exit code for it.
pub fn report(error: &anyhow::Error) -> ExitCode {
    if is_broken_pipe(error) {
        return ExitCode::SUCCESS;
    }
    let mut stderr = io::stderr().lock();
    // If stderr itself is gone there is nobody left to tell.
    let _ = write_chain(&mut stderr, error);
    ExitCode::from(kind_of(error).exit_code())
}

/// Writes the error message and its cause chain.
fn write_chain(out: &mut impl Write, error: &anyhow::Error) -> io::Result<()> {
    let safe = |s: String| crate::output::terminal_safe(&s).into_owned();
    writeln!(out, "kdpilot: error: {}", safe(error.to_string()))?;
    for cause in error.chain().skip(1) {
        writeln!(out, "  caused by: {}", safe(cause.to_string()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::{anyhow, Context};

    fn printed(error: &anyhow::Error) -> String {
        let mut out = Vec::new();
        write_chain(&mut out, error).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn unmarked_errors_are_runtime_errors() {
        let error = anyhow!("disk full").context("writing setup.cmd");
        assert_eq!(kind_of(&error), ErrorKind::Runtime);
        assert_eq!(ErrorKind::Runtime.exit_code(), 1);
    }

    #[test]
    fn marker_survives_added_context() {
        let error: anyhow::Error = CliError::new(ErrorKind::Target, anyhow!("timed out")).into();
        let error = error.context("probing com:port=COM1");
        assert_eq!(kind_of(&error), ErrorKind::Target);
        assert_eq!(kind_of(&error).exit_code(), 3);
    }

    #[test]
    fn result_ext_marks_errors() {
        let result: Result<(), io::Error> = Err(io::Error::other("bad tag"));
        let error = result.usage_err().unwrap_err();
        assert_eq!(kind_of(&error), ErrorKind::Usage);
        assert_eq!(kind_of(&error).exit_code(), 2);
    }

    #[test]
    fn outermost_marker_wins() {
        let inner: anyhow::Error = CliError::usage(anyhow!("inner")).into();
        let outer: anyhow::Error = CliError::new(ErrorKind::Target, inner).into();
        assert_eq!(kind_of(&outer), ErrorKind::Target);
    }

    #[test]
    fn marker_is_invisible_in_the_printed_chain() {
        let root = io::Error::new(io::ErrorKind::NotFound, "no such port");
        let marked: anyhow::Error = CliError::new(
            ErrorKind::Target,
            anyhow::Error::new(root).context("opening COM1"),
        )
        .into();
        let error = marked.context("probe failed");
        assert_eq!(
            printed(&error),
            "kdpilot: error: probe failed\n  caused by: opening COM1\n  caused by: no such port\n"
        );
    }

    #[test]
    fn broken_pipe_is_recognised_through_context() {
        let error = anyhow::Error::new(io::Error::from(io::ErrorKind::BrokenPipe))
            .context("writing to stdout");
        assert!(is_broken_pipe(&error));
        assert!(!is_broken_pipe(&anyhow!("other")));
    }

    #[test]
    fn result_context_keeps_marker() {
        let result: anyhow::Result<()> = Err(CliError::usage(anyhow!("bad")).into());
        let error = result.context("parsing TAG").unwrap_err();
        assert_eq!(kind_of(&error), ErrorKind::Usage);
    }
}
