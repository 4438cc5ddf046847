//! `kdpilot capture`: the whole workflow in one command: connect, choose where to break, arm,
//! write every hit's stack to a text log and a JSON-lines log, follow reboots, and on
//! `--max-hits`, `--duration` or Ctrl-C remove everything and leave the target running.
//!
//! A lost link (a vanished pipe or socket, a port that went away, a target that stopped
//! answering) is reopened for as long as it takes. A failed log write (a full disk) stops the
//! capture cleanly, and the records that could not be written are printed to stderr.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use clap::Args;
use kdpilot_capture::engine::{
    Capture, CaptureEvent, CaptureOptions, ConnectError, Connector, Guards, OnExhaustion,
};
use kdpilot_capture::log::{format_hit_text, resolve_log_paths, LogOptions, LogSink};
use kdpilot_capture::record::{EventRecord, HitRecord};
use kdpilot_capture::strategy::StrategyChoice;
use kdpilot_kd::client::{ClientConfig, Connection, Stopped};
use kdpilot_transport::{open, Endpoint, Link};

use crate::error::{CliError, ResultExt as _};
use crate::session::{client_config, no_answer, open_endpoint, TargetArgs};
use crate::status::StatusView;

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

    /// Break with an int3 (WinDbg's bp: a single step and a re-plant per hit) instead of a
    /// debug register (ba e1), which is used where the target accepts it
    #[arg(long)]
    pub software_breakpoint: bool,

    /// Keep an HTML report of the JSON log up to date (rewritten every minute and at the end)
    #[arg(long, value_name = "FILE.html")]
    pub report: Option<PathBuf>,

    /// Also learn each allocation's address (a one-shot breakpoint where the allocator
    /// returns) and catch its free, for `kdpilot report --outstanding` (the leaks). Costs one
    /// more stop per allocation and one per free of a captured block
    #[arg(long)]
    pub track_frees: bool,

    /// Longest time the target may stay frozen in the debugger per minute (e.g. 20s); above
    /// it only 1 hit in N is recorded (N doubles while over the budget, halves when well
    /// under), and the log says so. `off`: record every hit whatever it costs
    #[arg(long, value_name = "DURATION|off", default_value = "30s", value_parser = parse_budget)]
    pub frozen_budget: Budget,

    /// After N hits with one stack, further hits with it are only counted (written without
    /// their frames, as `same stack as hit K`). 0: no cap
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub stack_cap: u64,

    /// When the special-pool breakpoint goes quiet, check with nt!PoolHitTag whether the tag
    /// is still allocated (special pool exhausted): warn, follow the tag with pool-hit-tag for
    /// the rest of the boot, or do not check
    #[arg(long, value_enum, value_name = "ACTION", default_value = "warn")]
    pub on_exhaustion: ExhaustionArg,

    /// How long special pool must serve no hit (and at least 10 times the usual interval)
    /// before that check
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = parse_duration)]
    pub exhaustion_quiet: Duration,
}

/// `--frozen-budget`: a duration per minute, or none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget(pub Option<Duration>);

fn parse_budget(s: &str) -> Result<Budget, String> {
    match s.trim() {
        "off" | "none" | "0" => Ok(Budget(None)),
        other => {
            let d = parse_duration(other)?;
            if d > Duration::from_secs(60) {
                return Err(format!(
                    "--frozen-budget {other} is more than the minute it is measured over: use at most 60s, or off"
                ));
            }
            Ok(Budget(Some(d)))
        }
    }
}

/// `--on-exhaustion`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExhaustionArg {
    /// Check, and warn in the logs
    Warn,
    /// Check, warn, and follow the tag with nt!PoolHitTag for the rest of the boot
    PoolHitTag,
    /// Do not check
    Off,
}

/// Rewrites the HTML report of the JSON log once a minute, off the capture's loop.
struct Reporter {
    out: PathBuf,
    json: PathBuf,
    busy: Arc<AtomicBool>,
    last: Option<std::time::Instant>,
}

impl Reporter {
    const EVERY: Duration = Duration::from_secs(60);

    fn options(final_page: bool) -> kdpilot_report::ReportOptions {
        kdpilot_report::ReportOptions {
            refresh: (!final_page).then_some(Self::EVERY),
            generated_at: Some(SystemTime::now()),
            ..kdpilot_report::ReportOptions::default()
        }
    }

    /// Starts a rewrite if a minute has passed and none is running.
    fn tick(&mut self) {
        if self.last.is_some_and(|t| t.elapsed() < Self::EVERY) || self.busy.load(Ordering::Relaxed)
        {
            return;
        }
        self.last = Some(std::time::Instant::now());
        self.busy.store(true, Ordering::Relaxed);
        let (out, json, busy) = (self.out.clone(), self.json.clone(), self.busy.clone());
        tokio::task::spawn_blocking(move || {
            if let Err(e) = kdpilot_report::write_html_report(&[&json], &out, &Self::options(false))
            {
                tracing::warn!("report {}: {e}", out.display());
            }
            busy.store(false, Ordering::Relaxed);
        });
    }

    /// The final page, after the capture.
    async fn finish(self) -> Result<(), String> {
        let Reporter { out, json, .. } = self;
        let shown = out.display().to_string();
        tokio::task::spawn_blocking(move || {
            kdpilot_report::write_html_report(&[&json], &out, &Self::options(true))
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| format!("{shown}: {e}"))?
    }
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

/// Opens the endpoint and synchronises; after a link loss, waits for the endpoint to come
/// back (a VM that recreates its pipe or socket, a USB serial adapter plugged in again).
struct CliConnector {
    endpoint: Endpoint,
    timeout: Duration,
    config: ClientConfig,
}

impl Connector for CliConnector {
    type Link = Link;

    async fn connect(&mut self, reconnect: bool) -> Result<Stopped<Link>, ConnectError> {
        let what = self.endpoint.description();
        let link = if reconnect {
            // Reopen for as long as it takes: the engine gives up when the capture ends.
            let mut delay = Duration::from_millis(100);
            loop {
                match open(&self.endpoint).await {
                    Ok(link) => break link,
                    Err(e) => tracing::debug!("reopening {what}: {e}"),
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        } else {
            open_endpoint(&self.endpoint, self.timeout)
                .await
                .map_err(|e| ConnectError {
                    message: format!("{e:#}"),
                    retry: false,
                })?
        };
        Connection::new(link, self.config.clone())
            .connect(self.timeout)
            .await
            .map_err(|e| ConnectError {
                message: no_answer(&self.endpoint, self.timeout, &e),
                retry: true,
            })
    }

    fn describe(&self) -> String {
        self.endpoint.description()
    }
}

/// Why the CLI asked the capture to stop (Ctrl-C, SIGTERM, a log that cannot be written).
type StopReason = Arc<Mutex<Option<String>>>;

fn request_stop(stop: &AtomicBool, reason: &StopReason, why: &str) {
    if let Ok(mut r) = reason.lock() {
        r.get_or_insert_with(|| why.to_string());
    }
    stop.store(true, Ordering::Relaxed);
}

/// Ctrl-C and SIGTERM stop the capture cleanly; a second one quits at once. SIGXFSZ (a file
/// size limit) is caught so that the write fails and is reported like a full disk.
fn watch_signals(stop: Arc<AtomicBool>, reason: StopReason) {
    tokio::spawn(async move {
        let mut count = 0;
        loop {
            let why = next_signal().await;
            count += 1;
            if count == 1 {
                eprintln!("kdpilot: {why}: removing the breakpoints and resuming the target (Ctrl-C again to quit at once)");
                request_stop(&stop, &reason, why);
            } else {
                eprintln!("kdpilot: quit at once: the target may be left stopped or with a breakpoint planted; \
                           connect kd or WinDbg, then `bc *` and `g`");
                std::process::exit(130);
            }
        }
    });
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        // Keep the handler for the life of the process: with it, exceeding `ulimit -f` makes
        // the write fail with EFBIG instead of killing kdpilot with the target stopped.
        if let Ok(mut xfsz) = signal(SignalKind::from_raw(25)) {
            tokio::spawn(async move { while xfsz.recv().await.is_some() {} });
        }
    }
}

#[cfg(unix)]
async fn next_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return "interrupted";
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "interrupted",
        _ = term.recv() => "terminated",
    }
}

#[cfg(not(unix))]
async fn next_signal() -> &'static str {
    let _ = tokio::signal::ctrl_c().await;
    "interrupted"
}

/// Runs `kdpilot capture`. `plain`: plain lines instead of the live status line.
pub async fn run(args: CaptureArgs, plain: bool) -> anyhow::Result<()> {
    let tag = crate::pooltag::parse_tag_value(&args.tag)
        .map_err(|e| CliError::usage(anyhow::anyhow!("--tag: {e}")))?;
    let strategy: StrategyChoice = args.strategy.parse().map_err(CliError::usage)?;
    let endpoint = args.target.endpoint()?;
    let (log_path, json_path) = resolve_log_paths(args.log.clone(), args.json.clone());
    let mut sink =
        LogSink::open(&log_path, &json_path, &LogOptions::default()).map_err(CliError::usage)?;
    let mut view = StatusView::new(plain);
    let progress = view.symbol_progress();
    view.println(&format!(
        "logging to {} and {}",
        log_path.display(),
        json_path.display()
    ));
    if let Some(cut) = sink.json().dropped_partial_line() {
        view.println(&format!(
            "{}: a previous capture was killed while writing; its last {cut} bytes (a partial line) were removed",
            json_path.display()
        ));
    }
    let unfinished = kdpilot_capture::log::unfinished_hit(&json_path);
    if let Some(r) = &args.report {
        if r == &json_path || r == &log_path {
            return Err(CliError::usage(anyhow::anyhow!(
                "--report {} is also a log; give the report another name (night.html)",
                r.display()
            ))
            .into());
        }
    }
    let mut reporter = args.report.clone().map(|out| Reporter {
        out,
        json: json_path.clone(),
        busy: Arc::new(AtomicBool::new(false)),
        last: None,
    });
    let stop = Arc::new(AtomicBool::new(false));
    let stop_reason: StopReason = Arc::new(Mutex::new(None));
    watch_signals(stop.clone(), stop_reason.clone());
    let mut connector = CliConnector {
        timeout: args.target.timeout(),
        config: client_config(&endpoint),
        endpoint,
    };
    let options = CaptureOptions {
        tag,
        strategy,
        symbols: args.target.symbols.clone().unwrap_or_default(),
        offline: args.target.offline,
        max_hits: args.max_hits,
        duration: args.duration,
        hardware_breakpoint: !args.software_breakpoint,
        measure: false,
        track_frees: args.track_frees,
        guards: Guards {
            frozen_budget: args.frozen_budget.0,
            stack_cap: (args.stack_cap > 0).then_some(args.stack_cap),
            on_exhaustion: match args.on_exhaustion {
                ExhaustionArg::Warn => OnExhaustion::Warn,
                ExhaustionArg::PoolHitTag => OnExhaustion::PoolHitTag,
                ExhaustionArg::Off => OnExhaustion::Off,
            },
            exhaustion_quiet: args.exhaustion_quiet,
            probe_window: args.exhaustion_quiet.min(Duration::from_secs(60)),
            ..Guards::default()
        },
    };
    let now = SystemTime::now;
    let mut write_error: Option<anyhow::Error> = None;
    let mut arch = kdpilot_capture::record::Arch::X64;
    let mut detached: Option<(bool, Vec<String>)> = None;
    let mut last_kernel_base: Option<u64> = None;
    let mut capture = Capture::new(options, |ev| {
        let record: Option<EventRecord> = match ev {
            CaptureEvent::Connected { arch: a, .. } => {
                arch = (*a).into();
                Some(EventRecord::Connected {
                    time: now(),
                    target: args.target.target.clone(),
                    version: env!("CARGO_PKG_VERSION").to_string(),
                })
            }
            CaptureEvent::Boot {
                boot,
                kern_base,
                build,
            } => Some(EventRecord::Boot {
                time: now(),
                boot: *boot,
                build: u32::from(*build),
                arch,
                kernel_base: *kern_base,
                // A new base since the boot before (the first boot seen counts as moved:
                // nothing says where it was before).
                kaslr: last_kernel_base.replace(*kern_base) != Some(*kern_base),
            }),
            CaptureEvent::Armed {
                boot,
                target,
                address,
                why,
            } => Some(EventRecord::Armed {
                time: now(),
                boot: *boot,
                breakpoint: target.clone(),
                address: *address,
                strategy: args.strategy.clone(),
                reason: why.clone(),
            }),
            CaptureEvent::Deferred {
                boot,
                target,
                module,
            } => Some(EventRecord::Warning {
                time: now(),
                boot: Some(*boot),
                message: format!("{module} is not loaded: {target} will be planted when it loads"),
            }),
            CaptureEvent::Reboot { boot, reason } => Some(EventRecord::Reboot {
                time: now(),
                boot: *boot,
                reason: reason.clone(),
            }),
            CaptureEvent::LinkLost { boot, reason } => Some(EventRecord::LinkLost {
                time: now(),
                boot: (*boot > 0).then_some(*boot),
                reason: reason.clone(),
            }),
            CaptureEvent::Warning(w) => Some(EventRecord::Warning {
                time: now(),
                boot: None,
                message: w.clone(),
            }),
            CaptureEvent::Detached {
                hits,
                reason,
                clean,
                left_planted,
            } => {
                detached = Some((*clean, left_planted.clone()));
                let reason = match stop_reason.lock().ok().and_then(|r| r.clone()) {
                    Some(r) if reason == "stop requested" => r,
                    _ => reason.clone(),
                };
                Some(EventRecord::Detached {
                    time: now(),
                    reason,
                    hits: *hits,
                    clean: *clean,
                    left_planted: left_planted.clone(),
                })
            }
            CaptureEvent::Hit(h) => {
                let h: &HitRecord = h;
                if let Err(e) = sink.write_hit(h) {
                    // Nothing captured is lost: the record goes to stderr, and the capture
                    // stops cleanly.
                    view.println(&format!(
                        "could not write hit {} to the logs ({e}); here it is:\n{}",
                        h.hit,
                        format_hit_text(h)
                    ));
                    if write_error.is_none() {
                        request_stop(&stop, &stop_reason, &format!("log write failed: {e}"));
                        write_error = Some(e.into());
                    }
                }
                None
            }
            CaptureEvent::Record(r) => Some((**r).clone()),
            CaptureEvent::Waiting { .. } | CaptureEvent::Status(_) | CaptureEvent::HitCost(_) => {
                None
            }
        };
        if let (Some(r), CaptureEvent::Status(_) | CaptureEvent::Hit(_)) = (reporter.as_mut(), ev) {
            r.tick();
        }
        if let Some(r) = record {
            if let Err(e) = sink.write_event(&r) {
                if write_error.is_none() {
                    view.println(&format!("could not write to the logs: {e}"));
                    request_stop(&stop, &stop_reason, &format!("log write failed: {e}"));
                    write_error = Some(e.into());
                }
            }
        }
        view.event(ev);
    })
    .map_err(CliError::usage)?;
    if let Some(h) = &unfinished {
        capture.set_unfinished_hit(h);
    }
    capture.set_progress(progress);
    let started = std::time::Instant::now();
    let result = capture.run_with(&mut connector, &stop).await;
    let hits = capture.hits();
    let stats = capture.stats();
    let elapsed = started.elapsed().as_secs_f64();
    drop(capture);
    view.finish();
    let hits_result = result.map_err(|e| match e {
        kdpilot_capture::engine::CaptureError::Connect(m) => {
            CliError::target(anyhow::anyhow!(m)).into()
        }
        e => anyhow::Error::from(e),
    });
    let report_result = match reporter {
        Some(r) => {
            let path = r.out.clone();
            Some(r.finish().await.map(|()| path))
        }
        None => None,
    };
    let _ = hits_result.target_err()?;
    match &report_result {
        Some(Ok(path)) => eprintln!("kdpilot: report: {}", path.display()),
        Some(Err(e)) => eprintln!("kdpilot: warning: the report could not be written: {e}"),
        None => {}
    }
    if let Some((false, left)) = &detached {
        eprintln!("kdpilot: WARNING: the target could not be cleaned up. It may still have:");
        for l in left {
            eprintln!("kdpilot:   - {l}");
        }
        eprintln!("kdpilot: connect kd or WinDbg to it and run `bc *`, `ed nt!PoolHitTag 0`, `g`");
    }
    if let Some(e) = write_error {
        return Err(e.context(format!(
            "writing the logs {} and {} (the capture stopped; the target was detached and left running)",
            log_path.display(),
            json_path.display()
        )));
    }
    crate::output::print(&format!(
        "{hits} hits captured in {elapsed:.0} s ({:.1} hits/min); line: {} bytes sent, {} received, \
         {} retransmits, {} damaged frames\nlogs: {} and {}\n",
        hits as f64 * 60.0 / elapsed.max(1.0),
        stats.bytes_tx,
        stats.bytes_rx,
        stats.retransmits,
        stats.frame_errors,
        log_path.display(),
        json_path.display()
    ))?;
    if let Some((false, _)) = detached {
        return Err(CliError::target(anyhow::anyhow!(
            "the capture ended without reaching the target to clean it up (see above)"
        ))
        .into());
    }
    Ok(())
}
