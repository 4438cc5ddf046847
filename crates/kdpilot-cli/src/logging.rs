//! Diagnostics on stderr through `tracing`.
//!
//! The level comes from `-q`/`-v`; a filter in `KDPILOT_LOG` (or, if that is unset, `RUST_LOG`)
//! overrides it, with the usual `tracing_subscriber::EnvFilter` syntax
//! (`KDPILOT_LOG=kdpilot_kd=trace`). Stdout stays reserved for the command's output.

use std::fmt;
use std::io::IsTerminal;

use tracing::level_filters::LevelFilter;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// The environment variable with kdpilot's own log filter; it takes precedence over `RUST_LOG`.
pub const LOG_ENV: &str = "KDPILOT_LOG";

/// The level used when no filter is given in the environment.
pub fn default_level(verbose: u8, quiet: bool) -> LevelFilter {
    match (quiet, verbose) {
        (true, _) => LevelFilter::WARN,
        (false, 0) => LevelFilter::INFO,
        (false, 1) => LevelFilter::DEBUG,
        (false, _) => LevelFilter::TRACE,
    }
}

/// Installs the global subscriber writing to stderr. Call once, before anything logs.
///
/// At the default levels, events print like errors do: `kdpilot: warning: ...`,
/// `kdpilot: ...` for info. With `-v` or a filter from the environment, events carry their
/// level and target, for whoever is debugging kdpilot itself.
pub fn init(verbose: u8, quiet: bool) {
    let level = default_level(verbose, quiet);
    let env_var = [LOG_ENV, EnvFilter::DEFAULT_ENV]
        .into_iter()
        .find(|var| std::env::var_os(var).is_some());
    let filter = EnvFilter::builder()
        .with_default_directive(level.into())
        .with_env_var(env_var.unwrap_or(LOG_ENV))
        .from_env_lossy();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // Colours only on a terminal: in a log file (`2> night.err`, nohup) the field styling of
    // an event with fields came out as raw escape sequences (found by `cargo xtask soak`).
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = builder.with_ansi(ansi);
    // A second init (only possible in tests) keeps the first subscriber.
    if level >= LevelFilter::DEBUG || env_var.is_some() {
        let _ = builder.without_time().try_init();
    } else {
        let _ = builder.event_format(CliFormat).try_init();
    }
}

/// `kdpilot: warning: message`: events in the same shape as the error report.
struct CliFormat;

impl<S, N> FormatEvent<S, N> for CliFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write!(
            writer,
            "kdpilot: {}",
            level_prefix(*event.metadata().level())
        )?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// The word after `kdpilot: `; none for plain information.
fn level_prefix(level: Level) -> &'static str {
    match level {
        Level::ERROR => "error: ",
        Level::WARN => "warning: ",
        Level::INFO => "",
        Level::DEBUG => "debug: ",
        Level::TRACE => "trace: ",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbosity_maps_to_levels() {
        assert_eq!(default_level(0, true), LevelFilter::WARN);
        assert_eq!(default_level(0, false), LevelFilter::INFO);
        assert_eq!(default_level(1, false), LevelFilter::DEBUG);
        assert_eq!(default_level(2, false), LevelFilter::TRACE);
        assert_eq!(default_level(5, false), LevelFilter::TRACE);
    }

    #[test]
    fn warnings_look_like_errors() {
        assert_eq!(level_prefix(Level::WARN), "warning: ");
        assert_eq!(level_prefix(Level::INFO), "");
    }
}
