//! `kdpilot pooltag`: pool tags to `PoolTag` registry values and back, and the target set-up.

mod setup;
mod tag;

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context};
use clap::{value_parser, ArgGroup, Args};
use serde::Serialize;

use crate::error::ResultExt;
use setup::Setup;
use tag::{parse_arg, Notation, TagArg, PAGE_SIZE};

/// The `PoolTag` value of a tag argument (`Leak`, `0x6b61654c`), for other subcommands.
pub fn parse_tag_value(input: &str) -> Result<u32, String> {
    parse_arg(input, false)
        .map(|a| a.tag.value())
        .map_err(|e| e.to_string())
}

/// The long description in `kdpilot pooltag --help`.
pub const LONG_ABOUT: &str = "\
Convert pool tags to PoolTag registry values and back, and print the target set-up.

A TAG is 1 to 4 printable ASCII characters, padded with spaces to 4 (Ddk is \"Ddk \");
? and * are special pool wildcards. Its PoolTag value is the 4 bytes read as a
little-endian REG_DWORD: Ddk -> 0x206b6444.

A TAG written as 0x and hex digits, or 0n and decimal digits, is a PoolTag value and is
converted back to the tag. Bare digits such as 1234 are tag text, as in WinDbg; --text
reads every TAG as text. A value below 0x1000 (the page size) is not a tag: it tells
special pool to take allocations of that many bytes.";

const AFTER_HELP: &str = "\
Examples:
  kdpilot pooltag Ddk Fred 0x64657246
  kdpilot pooltag --setup Ddk
  kdpilot pooltag --setup --port 2 --baud 115200 --out enable-special-pool.cmd Ddk";

/// Arguments of `kdpilot pooltag`.
#[derive(Debug, Args)]
#[command(after_help = AFTER_HELP)]
#[command(group = ArgGroup::new("setup_mode").args(["setup", "out"]).multiple(true))]
pub struct PooltagArgs {
    /// Tags (Ddk) or PoolTag values (0x206b6444, 0n256) to convert
    #[arg(value_name = "TAG", required = true)]
    tags: Vec<String>,

    /// Read every TAG as tag text, even one that starts with 0x or 0n
    #[arg(long)]
    text: bool,

    /// Print the commands that set up the target for the first TAG
    #[arg(long)]
    setup: bool,

    /// Write the set-up as a Windows batch script (.cmd) to FILE, CRLF line endings
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,

    /// Replace the --out FILE if it exists
    #[arg(long, requires = "out")]
    force: bool,

    /// The target's COM port for the kernel debugger (1 = COM1)
    #[arg(
        long,
        value_name = "N",
        default_value_t = 1,
        value_parser = value_parser!(u8).range(1..),
        requires = "setup_mode"
    )]
    port: u8,

    /// Serial speed: 9600, 19200, 38400, 57600 or 115200
    #[arg(
        long,
        value_name = "BAUD",
        default_value_t = 19200,
        value_parser = setup::parse_baud,
        requires = "setup_mode"
    )]
    baud: u32,

    /// Print one JSON object per TAG (JSON Lines) instead of text
    #[arg(long, conflicts_with = "setup_mode")]
    json: bool,
}

/// Runs `kdpilot pooltag`.
pub fn run(args: PooltagArgs) -> anyhow::Result<()> {
    let parsed = args
        .tags
        .iter()
        .map(|t| parse_arg(t, args.text))
        .collect::<Result<Vec<_>, _>>()
        .usage_err()?;
    let mut stdout = io::stdout().lock();
    if args.setup || args.out.is_some() {
        let first = &parsed[0];
        if parsed.len() > 1 {
            tracing::warn!(
                "the set-up is for the first TAG only ({}): PoolTag holds a single value",
                first.input
            );
        }
        let setup = Setup {
            tag: first.tag,
            port: args.port,
            baud: args.baud,
        };
        match &args.out {
            None => stdout.write_all(setup.render_text().as_bytes())?,
            Some(path) => {
                write_script(path, &setup.render_batch(), args.force)?;
                writeln!(
                    stdout,
                    "wrote {}: run it on the target as Administrator and reboot; then, on the host:\n    {}",
                    path.display(),
                    setup.capture_command()
                )?;
            }
        }
    } else if args.json {
        for arg in &parsed {
            serde_json::to_writer(&mut stdout, &JsonConversion::new(arg))?;
            writeln!(stdout)?;
        }
    } else {
        stdout.write_all(render_conversions(&parsed).as_bytes())?;
    }
    stdout.flush()?;
    Ok(())
}

/// One line per argument: `INPUT -> RESULT  (NOTE)`, columns aligned.
fn render_conversions(args: &[TagArg]) -> String {
    let rows: Vec<(&str, String, String)> = args
        .iter()
        .map(|a| {
            let (result, note) = conversion(a);
            (a.input.as_str(), result, note)
        })
        .collect();
    let input_width = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    let result_width = rows.iter().map(|r| r.1.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(input, result, note)| {
            format!("{input:<input_width$} -> {result:<result_width$}  ({note})\n")
        })
        .collect()
}

/// The result and the explanatory note for one argument.
fn conversion(arg: &TagArg) -> (String, String) {
    let tag = arg.tag;
    let value = tag.value();
    let wildcards = if tag.has_wildcards() {
        "; ? and * are special pool wildcards"
    } else {
        ""
    };
    let dump = format!("dword dumps show it as {}", tag.dword_view());
    match arg.notation {
        Notation::Text => (
            format!("0x{value:08x}"),
            format!("tag {tag}{wildcards}; {dump}"),
        ),
        Notation::Hex | Notation::Decimal if tag.is_size() => (
            format!("{value} bytes"),
            format!(
                "below the {PAGE_SIZE}-byte page size: PoolTag 0x{value:08x} selects \
                 allocations of {value} bytes for special pool, not a tag"
            ),
        ),
        Notation::Hex | Notation::Decimal if tag.is_text() => (
            tag.quoted(),
            format!("PoolTag 0x{value:08x}{wildcards}; {dump}"),
        ),
        Notation::Hex | Notation::Decimal => (
            tag.quoted(),
            format!("PoolTag 0x{value:08x}; not printable ASCII, so not a tag that can be typed"),
        ),
    }
}

/// `--json` output for one argument.
#[derive(Serialize)]
struct JsonConversion<'a> {
    input: &'a str,
    /// The PoolTag value.
    value: u32,
    /// The PoolTag value as `0x` and 8 hex digits.
    hex: String,
    /// The four bytes in memory order.
    bytes: [u8; 4],
    /// `tag` (printable text), `size` (below the page size) or `bytes` (anything else).
    kind: &'static str,
    /// The tag with its padding, for kind `tag`.
    #[serde(skip_serializing_if = "Option::is_none")]
    tag: Option<String>,
    /// Whether the tag contains `?` or `*`.
    wildcards: bool,
}

impl<'a> JsonConversion<'a> {
    fn new(arg: &'a TagArg) -> Self {
        let tag = arg.tag;
        let kind = if tag.is_size() {
            "size"
        } else if tag.is_text() {
            "tag"
        } else {
            "bytes"
        };
        Self {
            input: &arg.input,
            value: tag.value(),
            hex: format!("0x{:08x}", tag.value()),
            bytes: tag.bytes(),
            kind,
            tag: (kind == "tag").then(|| String::from_utf8_lossy(&tag.bytes()).into_owned()),
            wildcards: tag.has_wildcards(),
        }
    }
}

/// Writes the batch script, refusing to replace an existing file unless `force`.
fn write_script(path: &Path, script: &str, force: bool) -> anyhow::Result<()> {
    let is_batch = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("cmd") || e.eq_ignore_ascii_case("bat"));
    if !is_batch {
        tracing::warn!(
            "{} does not end in .cmd or .bat: Windows will not run it as a batch script",
            path.display()
        );
    }
    let mut options = OpenOptions::new();
    if force {
        options.write(true).create(true).truncate(true);
    } else {
        // create_new checks and creates in one step: no window for another writer.
        options.write(true).create_new(true);
    }
    let mut file = options.open(path).map_err(|e| {
        if e.kind() == io::ErrorKind::AlreadyExists {
            // Not a usage error: the command line is fine, the file system is not as expected.
            anyhow!(
                "refusing to overwrite {}: the file exists (pass --force to replace it)",
                path.display()
            )
        } else {
            anyhow::Error::new(e).context(format!("could not create {}", path.display()))
        }
    })?;
    file.write_all(script.as_bytes())
        .with_context(|| format!("could not write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(inputs: &[&str]) -> String {
        let args: Vec<TagArg> = inputs
            .iter()
            .map(|i| parse_arg(i, false).unwrap())
            .collect();
        render_conversions(&args)
    }

    #[test]
    fn conversions_are_aligned() {
        assert_eq!(
            render(&["Ddk", "0x64657246"]),
            "Ddk        -> 0x206b6444  (tag \"Ddk \"; dword dumps show it as \" kdD\")\n\
             0x64657246 -> \"Fred\"      (PoolTag 0x64657246; dword dumps show it as \"derF\")\n"
        );
    }

    #[test]
    fn small_values_are_sizes() {
        let out = render(&["0x100"]);
        assert!(out.contains("256 bytes"), "{out}");
        assert!(out.contains("allocations of 256 bytes"), "{out}");
        assert!(out.contains("not a tag"), "{out}");
    }

    #[test]
    fn wildcards_are_mentioned() {
        let out = render(&["Fr?d"]);
        assert!(out.contains("? and * are special pool wildcards"), "{out}");
    }

    #[test]
    fn non_printable_values_are_escaped() {
        let out = render(&["0xff000041"]);
        assert!(out.contains("\"A\\x00\\x00\\xff\""), "{out}");
        assert!(out.contains("not printable ASCII"), "{out}");
    }

    #[test]
    fn json_lines() {
        let arg = parse_arg("Ddk", false).unwrap();
        let json = serde_json::to_string(&JsonConversion::new(&arg)).unwrap();
        assert_eq!(
            json,
            r#"{"input":"Ddk","value":543908932,"hex":"0x206b6444","bytes":[68,100,107,32],"kind":"tag","tag":"Ddk ","wildcards":false}"#
        );
        let arg = parse_arg("0x100", false).unwrap();
        let json = serde_json::to_string(&JsonConversion::new(&arg)).unwrap();
        assert!(json.contains(r#""kind":"size""#), "{json}");
        assert!(!json.contains(r#""tag""#), "{json}");
    }
}
