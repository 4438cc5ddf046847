//! Running the binary.

use std::process::Output;

/// The `kdpilot` command with a predictable environment.
pub fn kdpilot() -> assert_cmd::Command {
    let mut cmd = assert_cmd::Command::new(env!("CARGO_BIN_EXE_kdpilot"));
    for var in ["KDPILOT_LOG", "RUST_LOG", "CLICOLOR_FORCE", "NO_COLOR"] {
        cmd.env_remove(var);
    }
    cmd
}

/// What one run of the binary produced.
pub struct Run {
    /// The exit code.
    pub code: i32,
    /// Stdout as text.
    pub stdout: String,
    /// Stderr as text.
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(output: Output) -> Self {
        Run {
            code: output.status.code().expect("exited, not killed"),
            stdout: String::from_utf8(output.stdout).expect("stdout is UTF-8"),
            stderr: String::from_utf8(output.stderr).expect("stderr is UTF-8"),
        }
    }
}

/// Runs `kdpilot ARGS...` to completion.
pub fn run(args: &[&str]) -> Run {
    kdpilot().args(args).output().expect("kdpilot runs").into()
}

/// Runs `kdpilot ARGS...` in `dir`.
pub fn run_in(dir: &std::path::Path, args: &[&str]) -> Run {
    kdpilot()
        .current_dir(dir)
        .args(args)
        .output()
        .expect("kdpilot runs")
        .into()
}
