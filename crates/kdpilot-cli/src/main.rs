//! `kdpilot`: drive Windows kernel debugging sessions over the KD protocol to hunt pool leaks.
//!
//! # Code map
//! - `main.rs`: the command line (clap), dispatch, the tokio runtime for async subcommands.
//! - `error.rs`: [`error::ErrorKind`] and [`error::CliError`], which choose the exit code, and the
//!   printing of the cause chain.
//! - `logging.rs`: tracing to stderr, `-v`/`-q`, `KDPILOT_LOG`/`RUST_LOG`.
//! - `output.rs`: stdout that tolerates a closed pipe.
//! - `session.rs`: connecting, modules and symbols, shared by the commands that talk to a target.
//! - one module per subcommand (`pooltag`, `probe`, `lm`, `stack`, `sim`, `demo`), each with an `...Args` struct (clap `Args`)
//!   and a `run` function: `fn run(args) -> anyhow::Result<()>`, or `async fn` when it talks to
//!   a target.
//!
//! Adding a subcommand: write `src/<name>.rs` with `<Name>Args` and `run`, add `mod <name>;`,
//! a [`Command`] variant and its arm in [`Command::run`] (wrap an async `run` in [`block_on`]).
//!
//! # Exit codes
//! - 0: success. Also when stdout is a closed pipe (`kdpilot ... | head -1`): output stops quietly.
//! - 1: error: the command failed while running.
//! - 2: usage error: invalid arguments, from clap or from a subcommand's own validation
//!   (an invalid pool tag, for example).
//! - 3: target error: could not connect to the target, or it did not answer.
//!
//! Errors print on stderr as `kdpilot: error: <message>`, then `  caused by: <source>` for each
//! source in the chain.

mod capture;
mod demo;
mod error;
mod lm;
mod logging;
mod output;
mod pooltag;
mod probe;
mod report;
mod session;
mod sim;
mod stack;
mod status;

use std::future::Future;
use std::process::ExitCode;

use anyhow::Context;
use clap::{ArgAction, Args, Parser, Subcommand};

const AFTER_HELP: &str = "\
Exit codes:
  0  success (also when stdout is closed early, as in `kdpilot ... | head -1`)
  1  error: the command failed while running
  2  usage error: invalid arguments or input
  3  target error: could not connect to the target, or it did not answer

Environment:
  KDPILOT_LOG  log filter for stderr, e.g. debug or kdpilot_kd=trace (overrides -v/-q)
  RUST_LOG     used when KDPILOT_LOG is not set";

/// The `kdpilot` command line.
#[derive(Debug, Parser)]
#[command(
    name = "kdpilot",
    bin_name = "kdpilot",
    version,
    about = "Drive Windows kernel debugging sessions over the KD protocol to hunt kernel pool leaks",
    after_help = AFTER_HELP,
    subcommand_required = true,
    arg_required_else_help = true
)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,

    #[command(subcommand)]
    command: Command,
}

/// The help heading of the options every subcommand accepts.
const GLOBAL: &str = "Global options";

/// Options shared by all subcommands.
#[derive(Debug, Args)]
struct GlobalArgs {
    /// More diagnostics on stderr: -v for debug, -vv for trace
    #[arg(short, long, action = ArgAction::Count, global = true, help_heading = GLOBAL)]
    verbose: u8,

    /// Fewer diagnostics on stderr: warnings and errors only
    #[arg(short, long, global = true, conflicts_with = "verbose", help_heading = GLOBAL)]
    quiet: bool,
}

/// The subcommands; each one lives in its own module.
#[derive(Debug, Subcommand)]
enum Command {
    /// Convert pool tags to PoolTag registry values and back; print the target set-up
    // A one-paragraph doc comment resets long_about, so the long text is set here.
    #[command(long_about = pooltag::LONG_ABOUT)]
    Pooltag(pooltag::PooltagArgs),
    /// Check that a target answers on a KD link: break in, identify it, resume it
    Probe(probe::ProbeArgs),
    /// Capture the stack of every allocation of a pool tag, unattended, to a text and a JSON log
    Capture(capture::CaptureArgs),
    /// Report what captures found: unique stacks, drivers, flame graphs, an HTML page
    Report(report::ReportArgs),
    /// List the target's loaded modules and their symbols, like WinDbg's lm
    Lm(lm::LmArgs),
    /// Show a stack like WinDbg's kb: where the break-in stopped, or at a breakpoint
    Stack(stack::StackArgs),
    /// Serve a simulated Windows target (pty, TCP or Unix socket) to try kdpilot without one
    #[command(after_help = sim::AFTER_HELP)]
    Sim(sim::SimArgs),
    /// Watch kdpilot work against the built-in simulator
    Demo(demo::DemoArgs),
}

impl Command {
    /// Runs the subcommand; async ones get a tokio runtime.
    fn run(self, quiet: bool) -> anyhow::Result<()> {
        match self {
            Command::Pooltag(args) => pooltag::run(args),
            Command::Probe(args) => block_on(probe::run(args)),
            Command::Capture(args) => block_on(capture::run(args, quiet)),
            Command::Report(args) => report::run(args),
            Command::Lm(args) => block_on(lm::run(args)),
            Command::Stack(args) => block_on(stack::run(args)),
            Command::Sim(args) => block_on(sim::run(args)),
            Command::Demo(args) => block_on(demo::run(args)),
        }
    }
}

/// Runs `future` to completion on a multi-threaded tokio runtime built for it.
///
/// Only async subcommands pay for the runtime. Two workers are plenty: the work is I/O on one
/// link plus the odd symbol download.
fn block_on<F>(future: F) -> anyhow::Result<()>
where
    F: Future<Output = anyhow::Result<()>>,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("kdpilot-worker")
        .enable_all()
        .build()
        .context("could not start the async runtime")?;
    runtime.block_on(future)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            // --help and --version arrive here too, with exit code 0. A closed stdout is ignored.
            let _ = err.print();
            return ExitCode::from(u8::try_from(err.exit_code()).unwrap_or(2));
        }
    };
    logging::init(cli.global.verbose, cli.global.quiet);
    match cli.command.run(cli.global.quiet) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => error::report(&err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn help_lists_every_exit_code() {
        for kind in [
            error::ErrorKind::Runtime,
            error::ErrorKind::Usage,
            error::ErrorKind::Target,
        ] {
            let line = format!("\n  {}  ", kind.exit_code());
            assert!(AFTER_HELP.contains(&line), "exit code {kind:?} missing");
        }
    }
}
