//! The forms of `kdpilot report --outstanding`: the allocations never freed, by stack, with
//! their ages, then what the reboots ended, for a terminal ([`render_outstanding_text`]) and
//! for programs ([`render_outstanding_json`]).

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use crate::format::{bytes, clean, duration, fit, percent, span, thousands, time};
use crate::text::{notes, plural, WIDTH};
use crate::{Outstanding, ReportOptions, StackInfo};

/// A duration the short way the outstanding tables show ages: `42s`, `12m05s`, `3h12m`,
/// `2d04h`.
pub fn age(d: Duration) -> String {
    let s = d.as_secs();
    let (days, hours, minutes, seconds) = (s / 86400, s / 3600 % 24, s / 60 % 60, s % 60);
    if days > 0 {
        format!("{days}d{hours:02}h")
    } else if hours > 0 {
        format!("{hours}h{minutes:02}m")
    } else if minutes > 0 {
        format!("{minutes}m{seconds:02}s")
    } else {
        format!("{seconds}s")
    }
}

/// The age of an allocation made at `t`, at `end`.
fn age_at(t: SystemTime, end: Option<SystemTime>) -> String {
    end.map_or_else(|| "-".into(), |end| age(span(t, end)))
}

/// The outstanding allocations as text for a terminal: what was paired and what could not be,
/// the drivers and stacks of the allocations never freed in the boots still running at the end
/// of the logs (oldest and newest age of each), then per boot that a reboot ended, what was
/// outstanding when it ended. Ends with a newline.
pub fn render_outstanding_text(o: &Outstanding, options: &ReportOptions) -> String {
    let mut out = String::new();
    header(&mut out, o);
    notes(&mut out, &o.report);
    if o.report.stacks.is_empty() {
        out.push_str("\nNo allocation of the boots still running is outstanding.\n");
    } else {
        drivers(&mut out, o);
        table(&mut out, o, options);
        for s in o
            .report
            .stacks
            .iter()
            .take(options.listed(o.report.stacks.len()))
        {
            stack(&mut out, o, s);
        }
    }
    for b in &o.ended_boots {
        ended_boot(&mut out, o, b, options);
    }
    let mut trimmed = String::with_capacity(out.len());
    for line in out.lines() {
        trimmed.push_str(line.trim_end());
        trimmed.push('\n');
    }
    trimmed
}

fn header(out: &mut String, o: &Outstanding) {
    let r = &o.report;
    let s = &r.summary;
    let p = &o.pairing;
    let tags: Vec<String> = s.tags.keys().map(|t| clean(t)).collect();
    let tag = match tags.len() {
        0 => String::new(),
        1 => format!(" of tag {}", tags.join("")),
        _ => format!(" of tags {}", tags.join(", ")),
    };
    let _ = writeln!(
        out,
        "kdpilot report --outstanding: {}{tag} never freed, {} ({})",
        plural(p.outstanding, "allocation", "allocations"),
        bytes(s.bytes),
        plural(s.unique_stacks as u64, "stack", "stacks"),
    );
    let _ = writeln!(
        out,
        "  what             allocations with a learnt address and no free, in the last boot of each capture"
    );
    let _ = writeln!(
        out,
        "                   (still running at the end of the log); boots that a reboot ended are listed after"
    );
    if let Some(end) = o.end {
        let _ = writeln!(
            out,
            "  end of the log   {} (its last record: ages are measured to it)",
            time(end)
        );
    }
    if let (Some(first), Some(last)) = (s.first, s.last) {
        let _ = writeln!(
            out,
            "  logs             {}, {}, {}; {} .. {} ({})",
            plural(s.files as u64, "file", "files"),
            plural(s.captures as u64, "capture", "captures"),
            plural(s.boots as u64, "boot", "boots"),
            time(first),
            time(last),
            duration(span(first, last))
        );
    }
    let mut paired = vec![
        format!("{} freed", thousands(p.freed)),
        format!("{} outstanding", thousands(p.outstanding)),
    ];
    if p.outstanding_in_ended_boots > 0 {
        paired.push(format!(
            "{} outstanding when their boot ended",
            thousands(p.outstanding_in_ended_boots)
        ));
    }
    if p.failed > 0 {
        paired.push(format!("{} failed (NULL)", thousands(p.failed)));
    }
    let _ = writeln!(
        out,
        "  paired           {} with a learnt address: {}",
        plural(p.with_address, "hit", "hits"),
        paired.join(", ")
    );
    if p.unpaired > 0 {
        let _ = writeln!(
            out,
            "  not paired       {} without a learnt address {} not in this report (captured without --track-frees, \
             sampled out, or the capture ended before the allocator returned)",
            plural(p.unpaired, "hit", "hits"),
            if p.unpaired == 1 { "is" } else { "are" }
        );
    }
    if p.unknown_frees > 0 || p.unknown_allocated > 0 {
        let mut parts = Vec::new();
        if p.unknown_frees > 0 {
            parts.push(format!(
                "{} whose hit is not in the log",
                plural(p.unknown_frees, "free record", "free records")
            ));
        }
        if p.unknown_allocated > 0 {
            parts.push(format!(
                "{} whose hit is not in the log",
                plural(p.unknown_allocated, "allocated record", "allocated records")
            ));
        }
        let _ = writeln!(out, "  ignored          {}", parts.join("; "));
    }
    if s.bad_lines > 0 || s.ignored_records > 0 {
        let _ = writeln!(
            out,
            "  skipped          {} that are not records, {} of kinds this report does not use",
            plural(s.bad_lines, "line", "lines"),
            plural(s.ignored_records, "record", "records")
        );
    }
}

fn drivers(out: &mut String, o: &Outstanding) {
    let total = o.report.summary.hits;
    let _ = writeln!(
        out,
        "\nDrivers (responsible for a stack: its first frame outside nt and hal)"
    );
    let _ = writeln!(
        out,
        "  {:<24} {:>11} {:>6} {:>10} {:>7}",
        "driver", "outstanding", "%", "bytes", "stacks"
    );
    for d in &o.report.drivers {
        let _ = writeln!(
            out,
            "  {:<24} {:>11} {:>6} {:>10} {:>7}",
            fit(&clean(&d.name), 24),
            thousands(d.hits),
            percent(d.hits, total),
            bytes(d.bytes),
            thousands(d.stacks as u64)
        );
    }
}

fn driver_frame(s: &StackInfo) -> &str {
    s.driver_frame
        .and_then(|i| s.frames.get(i))
        .or(s.frames.first())
        .map_or("", String::as_str)
}

fn table(out: &mut String, o: &Outstanding, options: &ReportOptions) {
    let r = &o.report;
    let listed = options.listed(r.stacks.len());
    let _ = writeln!(
        out,
        "\nTop {listed} stacks by outstanding allocations (of {}; age: to the end of the log)",
        thousands(r.stacks.len() as u64)
    );
    let _ = writeln!(
        out,
        "  {:<6} {:>11} {:>10} {:>7} {:>7}  {:<20}  the driver's frame",
        "stack", "outstanding", "bytes", "oldest", "newest", "driver"
    );
    for s in r.stacks.iter().take(listed) {
        let _ = writeln!(
            out,
            "  {:<6} {:>11} {:>10} {:>7} {:>7}  {:<20}  {}",
            format!("#{}", s.rank),
            thousands(s.hits),
            bytes(s.bytes),
            age_at(s.first_seen, o.end),
            age_at(s.last_seen, o.end),
            fit(&clean(&s.driver), 20),
            fit(&clean(driver_frame(s)), WIDTH - 71)
        );
    }
}

fn sizes(s: &StackInfo) -> String {
    if s.min_size == s.max_size {
        format!("{} each", bytes(s.min_size))
    } else {
        format!("{}..{} each", bytes(s.min_size), bytes(s.max_size))
    }
}

fn frames(out: &mut String, s: &StackInfo) {
    for (i, frame) in s.frames.iter().enumerate() {
        let mark = if Some(i) == s.driver_frame { '>' } else { ' ' };
        let _ = writeln!(out, "   {mark} {}", fit(&clean(frame), WIDTH - 5));
    }
    if s.frames.is_empty() {
        let _ = writeln!(out, "     (no frames)");
    }
}

fn stack(out: &mut String, o: &Outstanding, s: &StackInfo) {
    let total = &o.report.summary;
    let _ = writeln!(
        out,
        "\n#{:<3} {} ({})  {} ({})  {}  driver {}",
        s.rank,
        plural(s.hits, "outstanding", "outstanding"),
        percent(s.hits, total.hits),
        bytes(s.bytes),
        percent(s.bytes, total.bytes),
        sizes(s),
        fit(&clean(&s.driver), 32)
    );
    let per_boot: Vec<String> = s
        .per_boot
        .iter()
        .map(|c| format!("{}:{}", c.boot, thousands(c.hits)))
        .collect();
    let _ = writeln!(
        out,
        "     age {} .. {} (allocated {} .. {}); per boot: {}",
        age_at(s.last_seen, o.end),
        age_at(s.first_seen, o.end),
        time(s.first_seen),
        time(s.last_seen),
        per_boot.join("  ")
    );
    frames(out, s);
}

fn ended_boot(out: &mut String, o: &Outstanding, b: &crate::EndedBoot, options: &ReportOptions) {
    let ended = b
        .ended
        .map(|t| format!(", ended {}", time(t)))
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "\nOutstanding when boot {} ended (log {}.{}{ended}): {}, {}",
        b.boot,
        b.capture,
        b.log_boot,
        plural(b.allocations, "allocation", "allocations"),
        bytes(b.bytes)
    );
    let _ = writeln!(
        out,
        "  they are gone with the reboot; a leak that repeats every boot shows in each"
    );
    let listed = options.listed(b.stacks.len());
    let _ = writeln!(
        out,
        "  {:<6} {:>11} {:>10}  {:<10}  {:<20}  the driver's frame",
        "stack", "outstanding", "bytes", "above", "driver"
    );
    let mut unseen = Vec::new();
    for s in b.stacks.iter().take(listed) {
        let above = o.report.stacks.iter().find(|m| m.frames == s.frames);
        if above.is_none() {
            unseen.push(s);
        }
        let _ = writeln!(
            out,
            "  {:<6} {:>11} {:>10}  {:<10}  {:<20}  {}",
            format!("#{}", s.rank),
            thousands(s.hits),
            bytes(s.bytes),
            above.map_or_else(|| "-".into(), |m| format!("= #{}", m.rank)),
            fit(&clean(&s.driver), 20),
            fit(&clean(driver_frame(s)), WIDTH - 67)
        );
    }
    if b.stacks.len() > listed {
        let _ = writeln!(
            out,
            "  ... {} more",
            plural((b.stacks.len() - listed) as u64, "stack", "stacks")
        );
    }
    for s in unseen {
        let _ = writeln!(
            out,
            "\n  boot {} #{}: not outstanding in a running boot; frames innermost first",
            b.boot, s.rank
        );
        frames(out, s);
    }
}

/// The outstanding allocations as pretty-printed JSON: [`Outstanding`]'s fields, with the
/// stacks of the report and of each ended boot cut to [`ReportOptions::top`]. Ends with a
/// newline.
pub fn render_outstanding_json(o: &Outstanding, options: &ReportOptions) -> String {
    let mut cut = o.clone();
    let listed = options.listed(cut.report.stacks.len());
    cut.report.stacks.truncate(listed);
    cut.report.stacks_by_bytes.truncate(listed);
    for b in &mut cut.ended_boots {
        let listed = options.listed(b.stacks.len());
        b.stacks.truncate(listed);
    }
    let mut out = serde_json::to_string_pretty(&cut).unwrap_or_default();
    out.push('\n');
    out
}
