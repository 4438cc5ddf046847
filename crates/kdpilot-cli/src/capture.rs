//! `kdpilot capture`: the whole workflow in one command: connect, choose where to break, arm,
//! write every hit's stack to a text log and a JSON-lines log, follow reboots, and on
//! `--max-hits`, `--duration` or Ctrl-C remove everything and leave the target running.
//!
//! Status: one link (a lost link ends the capture; reopening comes next); progress is printed
//! as plain lines (the live status display comes next).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use clap::Args;
use kdpilot_capture::engine::{Capture, CaptureEvent, CaptureOptions};
use kdpilot_capture::log::{resolve_log_paths, LogOptions, LogSink};
use kdpilot_capture::record::{EventRecord, HitRecord};
use kdpilot_capture::strategy::StrategyChoice;

use crate::error::{CliError, ResultExt as _};
use crate::session::{self, TargetArgs};

/// Arguments of `kdpilot capture`.
#[derive(Debug, Args)]
pub struct CaptureArgs {
    #[command(flatten)]
    pub target: TargetArgs,

    /// The pool tag to capture: text (Leak, Ddk) or its PoolTag value (0x6b61654c)
    #[arg(long, value_name = "TAG")]
    pub tag: String,

    /// Where to break: auto, special-pool, pool-hit-tag, or breakpoint=MODULE!FUNCTION
    #[arg(long, value_name = "STRATEGY", default_value = "auto")]
    pub strategy: String,

    /// Text log (appended, never truncated); default: _NT_DEBUG_LOG_FILE_APPEND,
    /// _NT_DEBUG_LOG_FILE_OPEN, else kdpilot-YYYYMMDD-HHMMSS.log
    #[arg(long, value_name = "FILE")]
    pub log: Option<PathBuf>,

    /// JSON-lines log (appended); default: the text log's name with .jsonl
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,

    /// Stop after N hits
    #[arg(long, value_name = "N")]
    pub max_hits: Option<u64>,

    /// Stop after this long: 90s, 30m, 8h
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub duration: Option<Duration>,
}

/// `90s`, `30m`, `8h`, `2d`, or plain seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration: use 90s, 30m, 8h or 2d"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => return Err(format!("`{s}` is not a duration: use 90s, 30m, 8h or 2d")),
    };
    Ok(Duration::from_secs(secs))
}

/// Runs `kdpilot capture`.
pub async fn run(args: CaptureArgs) -> anyhow::Result<()> {
    let tag = crate::pooltag::parse_tag_value(&args.tag)
        .map_err(|e| CliError::usage(anyhow::anyhow!("--tag: {e}")))?;
    let strategy: StrategyChoice = args.strategy.parse().map_err(CliError::usage)?;
    let (log_path, json_path) = resolve_log_paths(args.log.clone(), args.json.clone());
    let mut sink =
        LogSink::open(&log_path, &json_path, &LogOptions::default()).map_err(CliError::usage)?;
    eprintln!(
        "kdpilot: logging to {} and {}",
        log_path.display(),
        json_path.display()
    );
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("kdpilot: stopping: removing breakpoints and resuming the target (Ctrl-C again to quit at once)");
                stop.store(true, Ordering::Relaxed);
                if tokio::signal::ctrl_c().await.is_ok() {
                    eprintln!("kdpilot: quit at once: the target may be left with a breakpoint planted or stopped");
                    std::process::exit(130);
                }
            }
        });
    }
    let stopped = session::connect(&args.target).await?;
    let now = SystemTime::now;
    let _ = sink.write_event(&EventRecord::Connected {
        time: now(),
        target: args.target.target.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
    });
    let options = CaptureOptions {
        tag,
        strategy,
        symbols: args.target.symbols.clone().unwrap_or_default(),
        offline: args.target.offline,
        max_hits: args.max_hits,
        duration: args.duration,
    };
    let mut write_error: Option<anyhow::Error> = None;
    let mut arch = kdpilot_capture::record::Arch::X64;
    let mut capture = Capture::new(options, |ev| {
        let (record, line): (Option<EventRecord>, String) = match ev {
            CaptureEvent::Connected { build, arch: a, kern_base, processors } => {
                arch = (*a).into();
                (None, format!("connected: Windows build {build} {a}, {processors} CPUs, kernel at {kern_base:#x}"))
            }
            CaptureEvent::Boot { boot, kern_base, build } => (
                Some(EventRecord::Boot {
                    time: now(),
                    boot: *boot,
                    build: u32::from(*build),
                    arch,
                    kernel_base: *kern_base,
                    kaslr: true,
                }),
                format!("boot {boot}: kernel at {kern_base:#x}"),
            ),
            CaptureEvent::Armed { boot, target, address, why } => (
                Some(EventRecord::Armed {
                    time: now(),
                    boot: *boot,
                    breakpoint: target.clone(),
                    address: *address,
                    strategy: args.strategy.clone(),
                    reason: why.clone(),
                }),
                format!("armed {target}: {why}"),
            ),
            CaptureEvent::Reboot { boot } => (
                Some(EventRecord::Reboot { time: now(), boot: *boot, reason: "unload all symbols".into() }),
                format!("the target is rebooting (end of boot {boot})"),
            ),
            CaptureEvent::Warning(w) => (
                Some(EventRecord::Warning { time: now(), boot: None, message: w.clone() }),
                format!("warning: {w}"),
            ),
            CaptureEvent::Detached { hits, clean } => (
                Some(EventRecord::Detached {
                    time: now(),
                    reason: "capture ended".into(),
                    hits: *hits,
                    clean: *clean,
                    left_planted: Vec::new(),
                }),
                format!("detached after {hits} hits; target running{}", if *clean { "" } else { " (cleanup incomplete)" }),
            ),
            CaptureEvent::Hit(h) => {
                let h: &HitRecord = h;
                if let Err(e) = sink.write_hit(h) {
                    write_error.get_or_insert(e.into());
                }
                let top = h.frames.iter().find(|f| f.module.as_deref() != Some("nt")).map(|f| f.call_site()).unwrap_or_default();
                (None, format!("hit {} (boot {}): {} bytes, {}", h.hit, h.boot, h.size, top))
            }
        };
        if let Some(r) = record {
            if let Err(e) = sink.write_event(&r) {
                write_error.get_or_insert(e.into());
            }
        }
        eprintln!("kdpilot: {line}");
    })
    .map_err(CliError::usage)?;
    let hits = capture
        .run(stopped, &stop)
        .await
        .context("capture")
        .target_err()?;
    drop(capture);
    if let Some(e) = write_error {
        return Err(e).context("writing the logs (the target was detached)");
    }
    crate::output::print(&format!(
        "{hits} hits captured; logs: {} and {}\n",
        log_path.display(),
        json_path.display()
    ))
}
