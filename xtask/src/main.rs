//! cargo xtask: project automation (`cargo xtask help` lists the subcommands).
//!
//! To add a subcommand: write `xtask/src/NAME.rs` with `pub const ABOUT: &str` and
//! `pub fn run(args: &[String]) -> anyhow::Result<()>`, then add one line to [`COMMANDS`].

use std::process::ExitCode;

mod bench;
mod bench_report;
mod fixtures;
mod fuzz;
mod soak;
mod windows;

/// A subcommand: its name, a one-line description, and its entry point, which gets the
/// arguments after the name.
struct Command {
    name: &'static str,
    about: &'static str,
    run: fn(&[String]) -> anyhow::Result<()>,
}

/// Every subcommand, in `help` order.
const COMMANDS: &[Command] = &[
    Command {
        name: "bench",
        about: bench::ABOUT,
        run: bench::run,
    },
    Command {
        name: "bench-report",
        about: bench_report::ABOUT,
        run: bench_report::run,
    },
    Command {
        name: "fixtures",
        about: fixtures::ABOUT,
        run: fixtures::run,
    },
    Command {
        name: "fuzz",
        about: fuzz::ABOUT,
        run: fuzz::run,
    },
    Command {
        name: "soak",
        about: soak::ABOUT,
        run: soak::run,
    },
    Command {
        name: "windows-check",
        about: windows::ABOUT,
        run: windows::run,
    },
];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((name, rest)) = args.split_first() else {
        print_help();
        return ExitCode::SUCCESS;
    };
    if matches!(name.as_str(), "help" | "-h" | "--help") {
        print_help();
        return ExitCode::SUCCESS;
    }
    let Some(command) = COMMANDS.iter().find(|c| c.name == name) else {
        eprintln!("xtask: unknown subcommand `{name}`");
        print_help();
        return ExitCode::from(2);
    };
    match (command.run)(rest) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask {name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root (the parent of `xtask/`).
fn workspace_root() -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    dir.parent().unwrap_or(dir).to_path_buf()
}

fn print_help() {
    eprintln!("usage: cargo xtask <subcommand> [args]\n\nsubcommands:");
    let width = COMMANDS.iter().map(|c| c.name.len()).max().unwrap_or(0);
    for c in COMMANDS {
        eprintln!("  {:width$}  {}", c.name, c.about);
    }
}
