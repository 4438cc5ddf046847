//! The live status of `kdpilot capture`: one indicatif line at the bottom of a terminal (link
//! state, target, boot, hits, unique stacks, hits per minute, line bytes per second, last
//! event) with the events printed above it; with `--quiet` or when stderr is not a terminal,
//! plain lines, and a summary line once a minute.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kdpilot_capture::engine::{CaptureEvent, LinkState};
use kdpilot_capture::log::format_event_text;
use kdpilot_capture::record::{EventRecord, HitRecord};

/// What the status line shows.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// `waiting`, `up`.
    pub link: &'static str,
    /// `Windows build 19041 x64, 2 CPUs`.
    pub target: String,
    /// The boot in progress.
    pub boot: u64,
    /// Hits recorded.
    pub hits: u64,
    /// Distinct stacks (by module!function+offset).
    pub unique_stacks: usize,
    /// Hits in the last minute (or since the start, scaled, in the first minute).
    pub hits_per_minute: f64,
    /// Bytes per second on the line, both directions, over the last few seconds.
    pub bytes_per_second: f64,
    /// The last event, short.
    pub last_event: String,
    /// `--track-frees`: blocks learnt and not freed yet in this boot (`None` without it).
    pub outstanding: Option<u64>,
}

/// One status line: `up | build 19041 x64, 2 CPUs | boot 2 | 57 hits, 3 stacks | 12.0/min |
/// 1.2 KB/s | hit 57: leakydrv!Foo+0x1c`.
pub fn render(s: &Snapshot) -> String {
    let target = if s.target.is_empty() {
        "target not identified"
    } else {
        &s.target
    };
    let outstanding = s
        .outstanding
        .map(|n| format!(", {n} outstanding"))
        .unwrap_or_default();
    format!(
        "{} | {target} | boot {} | {} hits, {} stacks{outstanding} | {:.1} hits/min | {} | {}",
        s.link,
        s.boot,
        s.hits,
        s.unique_stacks,
        s.hits_per_minute,
        rate(s.bytes_per_second),
        s.last_event
    )
}

fn rate(bps: f64) -> String {
    if bps >= 1024.0 {
        format!("{:.1} KB/s", bps / 1024.0)
    } else {
        format!("{bps:.0} B/s")
    }
}

/// The stack's identity for counting: its frames' call sites.
pub fn stack_key(h: &HitRecord) -> String {
    h.frames
        .iter()
        .map(|f| f.call_site())
        .collect::<Vec<_>>()
        .join(";")
}

/// Keeps the snapshot up to date from the capture's events and draws it.
pub struct StatusView {
    bar: Option<ProgressBar>,
    snap: Snapshot,
    stacks: HashSet<u64>,
    recent_hits: VecDeque<Instant>,
    bytes: VecDeque<(Instant, u64)>,
    started: Instant,
    last_summary: Instant,
}

impl StatusView {
    /// A live line on stderr when it is a terminal and `plain` is false; plain lines
    /// otherwise.
    pub fn new(plain: bool) -> Self {
        let bar = (!plain && std::io::IsTerminal::is_terminal(&std::io::stderr())).then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("{spinner} {wide_msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Self {
            bar,
            snap: Snapshot {
                link: "waiting",
                ..Snapshot::default()
            },
            stacks: HashSet::new(),
            recent_hits: VecDeque::new(),
            bytes: VecDeque::new(),
            started: Instant::now(),
            last_summary: Instant::now(),
        }
    }

    /// The current snapshot.
    #[cfg(test)]
    pub fn snapshot(&self) -> &Snapshot {
        &self.snap
    }

    /// Prints a line above the status line (or as a plain line).
    pub fn println(&self, line: &str) {
        let line = crate::output::terminal_safe(line);
        match &self.bar {
            Some(bar) => bar.println(format!("kdpilot: {line}")),
            None => eprintln!("kdpilot: {line}"),
        }
    }

    /// Takes an event into the snapshot; returns the line to print for it, if any.
    pub fn event(&mut self, ev: &CaptureEvent) {
        let now = Instant::now();
        let line = match ev {
            CaptureEvent::Waiting { what } => {
                self.snap.link = "waiting";
                self.snap.last_event = what.clone();
                Some(what.clone())
            }
            CaptureEvent::Connected {
                build,
                arch,
                kern_base,
                processors,
            } => {
                self.snap.link = "up";
                self.snap.target = format!("build {build} {arch}, {processors} CPUs");
                self.snap.last_event = "connected".into();
                Some(format!(
                    "connected: Windows build {build} {arch}, {processors} CPUs, kernel at {kern_base:#x}"
                ))
            }
            CaptureEvent::Boot {
                boot, kern_base, ..
            } => {
                self.snap.boot = *boot;
                // A reboot frees everything.
                if let Some(n) = self.snap.outstanding.as_mut() {
                    *n = 0;
                }
                self.snap.last_event = format!("boot {boot}");
                Some(format!("boot {boot}: kernel at {kern_base:#x}"))
            }
            CaptureEvent::Armed { target, why, .. } => {
                self.snap.last_event = format!("armed {target}");
                Some(format!("armed {target}: {why}"))
            }
            CaptureEvent::Deferred { target, module, .. } => {
                self.snap.last_event = format!("waiting for {module} to load");
                Some(format!(
                    "{module} is not loaded: {target} will be planted when it loads (like bu)"
                ))
            }
            CaptureEvent::Hit(h) => {
                self.snap.hits = h.hit.max(self.snap.hits);
                if h.same_stack_as.is_none() {
                    self.stacks.insert(hash(&stack_key(h)));
                }
                self.snap.unique_stacks = self.stacks.len();
                self.recent_hits.push_back(now);
                let top = h
                    .frames
                    .iter()
                    .find(|f| f.module.as_deref() != Some("nt"))
                    .map(|f| f.call_site())
                    .unwrap_or_default();
                self.snap.last_event = format!("hit {}: {top}", h.hit);
                Some(format!(
                    "hit {} (boot {}): {} bytes, {}",
                    h.hit, h.boot, h.size, top
                ))
            }
            CaptureEvent::Reboot { boot, reason } => {
                self.snap.last_event = format!("reboot after boot {boot}");
                Some(format!(
                    "the target is rebooting (end of boot {boot}: {reason})"
                ))
            }
            CaptureEvent::LinkLost { reason, .. } => {
                self.snap.link = "lost";
                self.snap.last_event = "link lost".into();
                // The KD client's reason often starts with the same words.
                let reason = reason.strip_prefix("link lost: ").unwrap_or(reason);
                Some(format!("link lost: {reason}; reconnecting"))
            }
            CaptureEvent::Status(s) => {
                self.snap.link = match s.link {
                    LinkState::Waiting => "waiting",
                    LinkState::Up => "up",
                };
                self.snap.hits = s.hits;
                self.snap.boot = s.boot;
                self.bytes
                    .push_back((now, s.stats.bytes_tx + s.stats.bytes_rx));
                None
            }
            CaptureEvent::HitCost(_) => None,
            CaptureEvent::Record(r) => match &**r {
                EventRecord::Allocated { address, .. } => {
                    if *address != 0 {
                        *self.snap.outstanding.get_or_insert(0) += 1;
                    }
                    None
                }
                EventRecord::Free { hit, .. } => {
                    self.snap.last_event = format!("free of hit {hit}");
                    if let Some(n) = self.snap.outstanding.as_mut() {
                        *n = n.saturating_sub(1);
                    }
                    None
                }
                EventRecord::Sampled { .. } | EventRecord::SpecialPoolExhausted { .. } => {
                    self.snap.last_event = r.kind().replace('_', " ");
                    let text = format_event_text(r);
                    // Without the text log's time stamp.
                    let text = text.split_once("] ").map_or(text.as_str(), |(_, t)| t);
                    Some(text.trim_end().to_string())
                }
                _ => None,
            },
            CaptureEvent::Warning(w) => {
                self.snap.last_event = "warning".into();
                Some(format!("warning: {w}"))
            }
            CaptureEvent::Detached {
                hits,
                clean,
                left_planted,
                reason,
            } => {
                self.snap.last_event = "detached".into();
                Some(if *clean {
                    format!("detached after {hits} hits ({reason}); the target is running")
                } else {
                    format!(
                        "detached after {hits} hits ({reason}) WITHOUT cleaning up: {}",
                        left_planted.join("; ")
                    )
                })
            }
        };
        self.update_rates(now);
        if let Some(line) = line {
            self.println(&line);
        }
        self.draw(now);
    }

    fn update_rates(&mut self, now: Instant) {
        let minute = Duration::from_secs(60);
        while self
            .recent_hits
            .front()
            .is_some_and(|t| now.duration_since(*t) > minute)
        {
            self.recent_hits.pop_front();
        }
        let elapsed = now.duration_since(self.started).min(minute).as_secs_f64();
        self.snap.hits_per_minute = if elapsed >= 1.0 {
            self.recent_hits.len() as f64 * 60.0 / elapsed
        } else {
            0.0
        };
        while self.bytes.len() > 2
            && self
                .bytes
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) > Duration::from_secs(5))
        {
            self.bytes.pop_front();
        }
        self.snap.bytes_per_second = match (self.bytes.front(), self.bytes.back()) {
            (Some((t0, b0)), Some((t1, b1))) if t1 > t0 => {
                b1.saturating_sub(*b0) as f64 / t1.duration_since(*t0).as_secs_f64()
            }
            _ => 0.0,
        };
    }

    fn draw(&mut self, now: Instant) {
        match &self.bar {
            Some(bar) => {
                bar.set_message(crate::output::terminal_safe(&render(&self.snap)).into_owned())
            }
            None => {
                if now.duration_since(self.last_summary) >= Duration::from_secs(60) {
                    self.last_summary = now;
                    eprintln!(
                        "kdpilot: status: {}",
                        crate::output::terminal_safe(&render(&self.snap))
                    );
                }
            }
        }
    }

    /// A sink for symbol lookups and downloads: shown on the live line (downloads as lines
    /// of their own when they start, finish or fail).
    pub fn symbol_progress(&self) -> std::sync::Arc<dyn kdpilot_symbols::ProgressSink> {
        std::sync::Arc::new(SymbolProgress(self.bar.clone()))
    }

    /// Removes the live line.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Symbol progress on the live line, or as plain lines.
struct SymbolProgress(Option<ProgressBar>);

/// A symbol lookup or download in words, and whether it deserves a line of its own (a download
/// starting, finishing or failing) rather than a status update.
pub fn progress_text(event: &kdpilot_symbols::ProgressEvent) -> (String, bool) {
    use kdpilot_symbols::ProgressEvent as E;
    match event {
        E::Lookup { file, key } => (format!("looking for {file} ({key})"), false),
        E::DownloadStarted { url, .. } => (format!("downloading {url}"), true),
        E::DownloadProgress { bytes, total, .. } => (
            match total {
                Some(t) => format!(
                    "downloading [{}] {} of {} KiB",
                    bar(*bytes, *t, 20),
                    bytes / 1024,
                    t / 1024
                ),
                None => format!("downloading: {} KiB", bytes / 1024),
            },
            false,
        ),
        E::DownloadFinished { bytes, elapsed, .. } => (
            format!(
                "downloaded {} KiB in {:.1} s",
                bytes / 1024,
                elapsed.as_secs_f64()
            ),
            true,
        ),
        E::DownloadFailed { url, reason, .. } => (format!("{url}: {reason}"), true),
        E::Extracting { path } => (format!("extracting {}", path.display()), false),
        E::Found { file, path } => (format!("{file}: {}", path.display()), false),
    }
}

/// A text progress bar of `width` cells: `done` of `total`.
fn bar(done: u64, total: u64, width: usize) -> String {
    let filled = if total == 0 {
        width
    } else {
        ((done.min(total) as u128 * width as u128) / total as u128) as usize
    };
    format!("{}{}", "#".repeat(filled), "-".repeat(width - filled))
}

impl kdpilot_symbols::ProgressSink for SymbolProgress {
    fn event(&self, event: &kdpilot_symbols::ProgressEvent) {
        let (text, line) = progress_text(event);
        match &self.0 {
            Some(bar) if line => bar.println(format!("kdpilot: symbols: {text}")),
            Some(bar) => bar.set_message(format!("symbols: {text}")),
            None if line => eprintln!("kdpilot: symbols: {text}"),
            None => tracing::info!("symbols: {text}"),
        }
    }
}

fn hash(s: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downloads_draw_a_progress_bar() {
        let (text, line) = progress_text(&kdpilot_symbols::ProgressEvent::DownloadProgress {
            id: 1,
            bytes: 5 * 1024 * 1024,
            total: Some(10 * 1024 * 1024),
        });
        assert_eq!(text, "downloading [##########----------] 5120 of 10240 KiB");
        assert!(!line);
        assert_eq!(bar(20, 10, 4), "####", "never more than full");
        assert_eq!(bar(0, 0, 3), "###");
    }

    #[test]
    fn renders_every_field() {
        let s = Snapshot {
            link: "up",
            target: "build 19041 x64, 2 CPUs".into(),
            boot: 2,
            hits: 57,
            unique_stacks: 3,
            hits_per_minute: 12.04,
            bytes_per_second: 1300.0,
            last_event: "hit 57: leakydrv!Foo+0x1c".into(),
            outstanding: None,
        };
        assert_eq!(
            render(&s),
            "up | build 19041 x64, 2 CPUs | boot 2 | 57 hits, 3 stacks | 12.0 hits/min | 1.3 KB/s | hit 57: leakydrv!Foo+0x1c"
        );
        let s = Snapshot {
            outstanding: Some(9),
            ..s
        };
        assert!(render(&s).contains("| 57 hits, 3 stacks, 9 outstanding |"));
        assert_eq!(rate(512.4), "512 B/s");
    }

    #[test]
    fn counts_hits_stacks_and_bytes() {
        use kdpilot_capture::engine::Status;
        use kdpilot_kd::client::LinkStats;
        let mut v = StatusView::new(true);
        v.started -= Duration::from_secs(120);
        let hit = |n: u64, f: &str| {
            let mut h: HitRecord = serde_json::from_str(&format!(
                r#"{{"hit":{n},"boot":1,"time":"2026-11-22T04:00:00.000Z","tag":"Leak","size":16,"pool_type":0,"processor":0,"thread":"0x1","breakpoint":"nt!X","frames":[]}}"#
            ))
            .unwrap();
            h.frames.push(kdpilot_capture::record::FrameRecord {
                address: 0x1000,
                module: Some("leakydrv".into()),
                function: Some(f.into()),
                offset: 4,
                child_sp: 0,
                return_address: 0,
                frame_pointer: None,
                args: Vec::new(),
                trust: String::new(),
            });
            CaptureEvent::Hit(Box::new(h))
        };
        v.event(&hit(1, "A"));
        v.event(&hit(2, "B"));
        v.event(&hit(3, "A"));
        assert_eq!(v.snapshot().hits, 3);
        assert_eq!(v.snapshot().unique_stacks, 2);
        assert!((v.snapshot().hits_per_minute - 3.0).abs() < 1e-9);
        let status = |bytes: u64| {
            CaptureEvent::Status(Status {
                link: LinkState::Up,
                stats: LinkStats {
                    bytes_tx: bytes,
                    ..LinkStats::default()
                },
                hits: 3,
                boot: 1,
            })
        };
        v.event(&status(0));
        v.bytes.front_mut().unwrap().0 -= Duration::from_secs(2);
        v.event(&status(4000));
        let bps = v.snapshot().bytes_per_second;
        assert!((1900.0..2100.0).contains(&bps), "{bps}");
    }
}
