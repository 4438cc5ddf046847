//! `cargo xtask windows-check`: the Windows build, checked from a Linux machine.
//!
//! 1. `cargo check --target x86_64-pc-windows-msvc` of [`WINDOWS_CRATES`] (all targets), which
//!    type-checks every `#[cfg(windows)]` path of the crates without C dependencies. Skipped
//!    when that target is not installed.
//! 2. With mingw-w64 and wine present: build for `x86_64-pc-windows-gnu` (linker from
//!    `CARGO_TARGET_X86_64_PC_WINDOWS_GNU_LINKER`, default `x86_64-w64-mingw32-gcc`) and run
//!    [`WINE_EXAMPLES`] and the test suites of [`WINE_TEST_CRATES`] under wine, in a private
//!    prefix under `target/wine/`, with `WINEDEBUG=-all`. Wine 8.0 lacks `ProcessPrng` (which
//!    Rust's std imports from `bcryptprimitives.dll`), so a shim DLL built from
//!    `xtask/wine/shim.c` is put next to each executable. Skipped when a tool is missing.
//!
//! Options: `--no-wine` (step 1 only), `--no-check` (step 2 only).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// One line for `cargo xtask help`.
pub const ABOUT: &str =
    "cargo check for Windows (msvc), then run the named-pipe transport under wine (windows-gnu)";

/// Crates type-checked for x86_64-pc-windows-msvc. kdpilot-symbols and kdpilot-cli are not
/// here: their TLS stack (ring, for symbol-server downloads) compiles C for the target, and
/// an -msvc build needs the MSVC C headers and lib.exe, which a Linux machine lacks. They are
/// built for x86_64-pc-windows-gnu in step 2 instead (same `cfg(windows)` code; only the C
/// toolchain differs) and `kdpilot.exe demo` runs under wine.
const WINDOWS_CRATES: &[&str] = &["kdpilot-transport", "kdpilot-kd", "kdpilot-sim"];

/// Examples run under wine: (package, example, arguments). Each must exit 0.
const WINE_EXAMPLES: &[(&str, &str, &[&str])] = &[("kdpilot-transport", "pipe_echo", &[])];

/// Binaries run under wine: (package, binary, arguments). Each must exit 0. `kdpilot demo`
/// serves the simulated target on a named pipe and probes it through `com:pipe,port=...`.
const WINE_BINARIES: &[(&str, &str, &[&str])] = &[("kdpilot-cli", "kdpilot", &["demo"])];

/// Packages whose test suites run under wine.
const WINE_TEST_CRATES: &[&str] = &["kdpilot-transport"];

const MSVC: &str = "x86_64-pc-windows-msvc";
const GNU: &str = "x86_64-pc-windows-gnu";
const GNU_LINKER_VAR: &str = "CARGO_TARGET_X86_64_PC_WINDOWS_GNU_LINKER";
const GNU_RUNNER_VAR: &str = "CARGO_TARGET_X86_64_PC_WINDOWS_GNU_RUNNER";
const MINGW_GCC: &str = "x86_64-w64-mingw32-gcc";
/// Longest a single wine run may take (the first one also creates the prefix, about 10-20 s).
const WINE_TIMEOUT: Duration = Duration::from_secs(300);

/// Entry point for `cargo xtask windows-check [--no-wine] [--no-check]`.
pub fn run(args: &[String]) -> Result<()> {
    let mut check = true;
    let mut wine = true;
    for arg in args {
        match arg.as_str() {
            "--no-wine" => wine = false,
            "--no-check" => check = false,
            other => bail!("unknown argument `{other}` (accepted: --no-wine, --no-check)"),
        }
    }
    let started = Instant::now();
    let root = crate::workspace_root();
    if check {
        check_msvc(&root)?;
    }
    if wine {
        run_under_wine(&root)?;
    }
    say(&format!("done in {:.1} s", started.elapsed().as_secs_f64()));
    Ok(())
}

fn say(message: &str) {
    println!("[windows-check] {message}");
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Whether rustup (or the toolchain) has the standard library for `target`.
fn target_installed(target: &str) -> bool {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let Ok(out) = Command::new(rustc)
        .args(["--print", "target-libdir", "--target", target])
        .output()
    else {
        return false;
    };
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    out.status.success()
        && std::fs::read_dir(dir).is_ok_and(|entries| {
            entries
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("libstd-"))
        })
}

/// Whether `program --version` runs.
fn tool_present(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn package_args(packages: &[&str]) -> Vec<String> {
    packages
        .iter()
        .flat_map(|p| ["-p".to_string(), p.to_string()])
        .collect()
}

fn check_msvc(root: &Path) -> Result<()> {
    if !target_installed(MSVC) {
        say(&format!(
            "SKIP cargo check: target {MSVC} is not installed (rustup target add {MSVC})"
        ));
        return Ok(());
    }
    // A crate listed before it exists (crates/NAME/Cargo.toml) is skipped, not an error.
    let (present, absent): (Vec<&str>, Vec<&str>) = WINDOWS_CRATES
        .iter()
        .partition(|name| root.join("crates").join(name).join("Cargo.toml").is_file());
    if !absent.is_empty() {
        say(&format!(
            "note: not in the workspace yet: {}",
            absent.join(", ")
        ));
    }
    say(&format!(
        "cargo check --target {MSVC} --all-targets: {}",
        present.join(", ")
    ));
    let started = Instant::now();
    let status = cargo()
        .current_dir(root)
        .args(["check", "--target", MSVC, "--all-targets"])
        .args(package_args(&present))
        .status()
        .context("running cargo check")?;
    if !status.success() {
        bail!("cargo check --target {MSVC} failed");
    }
    say(&format!(
        "ok   cargo check for {MSVC} ({:.1} s)",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

fn run_under_wine(root: &Path) -> Result<()> {
    let linker = std::env::var(GNU_LINKER_VAR).unwrap_or_else(|_| MINGW_GCC.to_string());
    let missing: Vec<String> = [
        (!target_installed(GNU)).then(|| format!("target {GNU} (rustup target add {GNU})")),
        (!tool_present(&linker)).then(|| format!("{linker} (apt-get install mingw-w64)")),
        (!tool_present(MINGW_GCC)).then(|| format!("{MINGW_GCC} (apt-get install mingw-w64)")),
        (!tool_present("wine")).then(|| "wine (apt-get install wine64)".to_string()),
    ]
    .into_iter()
    .flatten()
    .collect();
    if !missing.is_empty() {
        say(&format!("SKIP wine run: missing {}", missing.join(", ")));
        return Ok(());
    }

    let target_dir = target_directory(root)?;
    let wine_dir = target_dir.join("wine");
    std::fs::create_dir_all(&wine_dir)?;
    let shim = build_shim(root, &wine_dir)?;
    let wine_env = WineEnv {
        prefix: wine_dir.join("prefix"),
        linker,
    };

    for (package, example, args) in WINE_EXAMPLES {
        let exes = wine_env.build(root, &["build", "-p", package, "--example", example])?;
        let exe = exes
            .iter()
            .find(|e| e.file_stem().is_some_and(|s| s == *example))
            .with_context(|| format!("cargo did not report the {example} executable"))?;
        install_shim(&shim, exe)?;
        say(&format!("wine {}", exe.display()));
        let started = Instant::now();
        let mut command = wine_env.command("wine");
        command.arg(exe).args(*args);
        run_bounded(command, &format!("{package} example {example}"))?;
        say(&format!(
            "ok   {package} example {example} under wine ({:.1} s)",
            started.elapsed().as_secs_f64()
        ));
    }

    for (package, binary, args) in WINE_BINARIES {
        let exes = wine_env.build(root, &["build", "-p", package, "--bin", binary])?;
        let exe = exes
            .iter()
            .find(|e| e.file_stem().is_some_and(|s| s == *binary))
            .with_context(|| format!("cargo did not report the {binary} executable"))?;
        install_shim(&shim, exe)?;
        say(&format!("wine {} {}", exe.display(), args.join(" ")));
        let started = Instant::now();
        let mut command = wine_env.command("wine");
        command.arg(exe).args(*args);
        run_bounded(command, &format!("{binary} {}", args.join(" ")))?;
        say(&format!(
            "ok   {binary} {} under wine ({:.1} s)",
            args.join(" "),
            started.elapsed().as_secs_f64()
        ));
    }

    for package in WINE_TEST_CRATES {
        let exes = wine_env.build(root, &["test", "--no-run", "-p", package])?;
        for exe in &exes {
            install_shim(&shim, exe)?;
        }
        say(&format!(
            "cargo test -p {package} --target {GNU} (runner: wine)"
        ));
        let started = Instant::now();
        let mut command = wine_env.cargo(root);
        command
            .args(["test", "-p", package, "--target", GNU])
            .env(GNU_RUNNER_VAR, "wine");
        run_bounded(command, &format!("{package} tests"))?;
        say(&format!(
            "ok   {package} tests under wine ({:.1} s)",
            started.elapsed().as_secs_f64()
        ));
    }

    // The prefix's wineserver would linger for a few seconds; stop it now.
    let _ = wine_env
        .command("wineserver")
        .arg("-k")
        .stderr(Stdio::null())
        .status();
    Ok(())
}

/// Environment for building with mingw and running under wine.
struct WineEnv {
    prefix: PathBuf,
    linker: String,
}

impl WineEnv {
    fn apply<'c>(&self, command: &'c mut Command) -> &'c mut Command {
        command
            .env("WINEPREFIX", &self.prefix)
            .env("WINEDEBUG", "-all")
            // Do not offer to install Mono and Gecko when the prefix is created.
            .env("WINEDLLOVERRIDES", "mscoree,mshtml=")
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        self.apply(&mut command);
        command
    }

    fn cargo(&self, root: &Path) -> Command {
        let mut command = cargo();
        self.apply(&mut command)
            .current_dir(root)
            .env(GNU_LINKER_VAR, &self.linker);
        command
    }

    /// Runs `cargo <args> --target windows-gnu` and returns the executables it produced.
    fn build(&self, root: &Path, args: &[&str]) -> Result<Vec<PathBuf>> {
        say(&format!("cargo {} --target {GNU}", args.join(" ")));
        let output = self
            .cargo(root)
            .args(args)
            .args(["--target", GNU, "--message-format=json-render-diagnostics"])
            .stderr(Stdio::inherit())
            .output()
            .context("running cargo")?;
        if !output.status.success() {
            bail!("cargo {} --target {GNU} failed", args.join(" "));
        }
        Ok(String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter(|l| l.contains(r#""reason":"compiler-artifact""#))
            .filter_map(|l| json_string_field(l, "executable"))
            .map(PathBuf::from)
            .collect())
    }
}

/// Builds `bcryptprimitives.dll` from `xtask/wine/shim.c` unless it is up to date.
fn build_shim(root: &Path, wine_dir: &Path) -> Result<PathBuf> {
    let source = root.join("xtask/wine/shim.c");
    let dll = wine_dir.join("bcryptprimitives.dll");
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if modified(&dll).is_some() && modified(&dll) >= modified(&source) {
        return Ok(dll);
    }
    say(&format!(
        "{MINGW_GCC} -shared -O2 -o {} shim.c -ladvapi32",
        dll.display()
    ));
    let status = Command::new(MINGW_GCC)
        .args(["-shared", "-O2", "-o"])
        .arg(&dll)
        .arg(&source)
        .arg("-ladvapi32")
        .status()
        .context("running mingw gcc")?;
    if !status.success() {
        bail!("building the ProcessPrng shim failed");
    }
    Ok(dll)
}

/// Copies the shim next to `exe` (a DLL beside the executable wins over wine's own).
fn install_shim(shim: &Path, exe: &Path) -> Result<()> {
    let dir = exe.parent().context("executable has no directory")?;
    std::fs::copy(shim, dir.join("bcryptprimitives.dll"))
        .with_context(|| format!("copying the shim to {}", dir.display()))?;
    Ok(())
}

/// Runs `command`, printing its output, and fails if it exits non-zero or outlives
/// [`WINE_TIMEOUT`].
fn run_bounded(mut command: Command, what: &str) -> Result<()> {
    let mut child: Child = command
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let deadline = Instant::now() + WINE_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait()? {
            if status.success() {
                return Ok(());
            }
            bail!("{what} failed under wine ({status})");
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{what} did not finish within {} s under wine",
                WINE_TIMEOUT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The workspace's target directory, as cargo reports it.
fn target_directory(root: &Path) -> Result<PathBuf> {
    let output = cargo()
        .current_dir(root)
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo metadata")?;
    if !output.status.success() {
        bail!("cargo metadata failed");
    }
    let reader = BufReader::new(&output.stdout[..]);
    for line in reader.lines() {
        if let Some(dir) = json_string_field(&line?, "target_directory") {
            return Ok(PathBuf::from(dir));
        }
    }
    bail!("cargo metadata did not report a target directory")
}

/// The value of the first `"key":"..."` in a line of JSON, unescaped. Enough for cargo's
/// machine-readable output without a JSON dependency.
fn json_string_field(line: &str, key: &str) -> Option<String> {
    let start = line.find(&format!("\"{key}\":\""))? + key.len() + 4;
    let mut value = String::new();
    let mut chars = line[start..].chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(value),
            '\\' => match chars.next()? {
                'n' => value.push('\n'),
                't' => value.push('\t'),
                'u' => {
                    let hex: String = chars.by_ref().take(4).collect();
                    value.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?);
                }
                other => value.push(other),
            },
            c => value.push(c),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::json_string_field;

    #[test]
    fn json_field_extraction() {
        let line = r#"{"reason":"compiler-artifact","executable":"C:\\t\\a \"b\".exe","x":1}"#;
        assert_eq!(
            json_string_field(line, "executable").as_deref(),
            Some(r#"C:\t\a "b".exe"#)
        );
        assert_eq!(json_string_field(line, "missing"), None);
        assert_eq!(
            json_string_field(
                r#"{"executable":null,"target_directory":"/w/target"}"#,
                "target_directory"
            )
            .as_deref(),
            Some("/w/target")
        );
    }
}
