//! The text form, for a terminal: the totals, the drivers, the top stacks by hits with their
//! frames, the top stacks by bytes, the boots. Lines stay within [`WIDTH`] columns (a frame
//! name longer than that is shortened in the middle).

use std::fmt::Write as _;

use crate::format::{bytes, clean, duration, fit, percent, short_time, span, thousands, time};
use crate::{Report, ReportOptions, StackInfo};

/// The widest line the text form writes.
pub const WIDTH: usize = 110;

/// The report as text for a terminal (see the module documentation). Ends with a newline.
pub fn render_text(report: &Report, options: &ReportOptions) -> String {
    let mut out = String::new();
    header(&mut out, report);
    notes(&mut out, report);
    if report.stacks.is_empty() {
        out.push_str("\nNo hits.\n");
    } else {
        drivers(&mut out, report);
        stacks_by_hits(&mut out, report, options);
        stacks_by_bytes(&mut out, report, options);
    }
    boots(&mut out, report);
    // Padded last columns leave spaces at line ends.
    let mut trimmed = String::with_capacity(out.len());
    for line in out.lines() {
        trimmed.push_str(line.trim_end());
        trimmed.push('\n');
    }
    trimmed
}

pub(crate) fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{} {}", thousands(n), if n == 1 { one } else { many })
}

fn header(out: &mut String, report: &Report) {
    let s = &report.summary;
    let tags: Vec<String> = s.tags.keys().map(|t| clean(t)).collect();
    let tag = match tags.len() {
        0 => String::new(),
        1 => format!(" of tag {}", tags.join("")),
        _ => format!(" of tags {}", tags.join(", ")),
    };
    let _ = writeln!(
        out,
        "kdpilot report: {}{tag} in {} ({}, {})",
        plural(s.hits, "hit", "hits"),
        plural(s.files as u64, "file", "files"),
        plural(s.captures as u64, "capture", "captures"),
        plural(s.boots as u64, "boot", "boots"),
    );
    let _ = writeln!(
        out,
        "  bytes requested  {} ({})",
        thousands(s.bytes),
        bytes(s.bytes)
    );
    if let (Some(first), Some(last)) = (s.first, s.last) {
        let _ = writeln!(
            out,
            "  time             {} .. {} ({})",
            time(first),
            time(last),
            duration(span(first, last))
        );
    }
    let _ = writeln!(
        out,
        "  unique stacks    {} (grouped by module!function+offset)",
        thousands(s.unique_stacks as u64)
    );
    let top: Vec<String> = report
        .drivers
        .iter()
        .take(3)
        .map(|d| format!("{} {}", fit(&clean(&d.name), 24), percent(d.hits, s.hits)))
        .collect();
    let more = if report.drivers.len() > 3 {
        ", ..."
    } else {
        ""
    };
    let _ = writeln!(
        out,
        "  drivers          {}{}{}",
        thousands(s.drivers as u64),
        if top.is_empty() {
            String::new()
        } else {
            format!(": {}", top.join(", "))
        },
        more
    );
    if s.bad_lines > 0 || s.ignored_records > 0 {
        let mut parts = Vec::new();
        if s.bad_lines > 0 {
            parts.push(format!(
                "{} that {} not records",
                plural(s.bad_lines, "line", "lines"),
                if s.bad_lines == 1 { "is" } else { "are" }
            ));
        }
        if s.ignored_records > 0 {
            let kinds: Vec<String> = report
                .ignored
                .iter()
                .map(|(k, n)| format!("{} {}", clean(k), thousands(*n)))
                .collect();
            parts.push(format!(
                "{} of kinds this report does not use ({})",
                plural(s.ignored_records, "record", "records"),
                kinds.join(", ")
            ));
        }
        let _ = writeln!(out, "  skipped          {}", parts.join("; "));
    }
}

/// The capture's own notes (sampling, special pool exhausted), which make the counts
/// incomplete.
pub(crate) fn notes(out: &mut String, report: &Report) {
    if report.notes.is_empty() {
        return;
    }
    let s = &report.summary;
    let mut why = Vec::new();
    if s.max_one_in > 1 || s.skipped_hits > 0 {
        why.push(format!(
            "sampled up to 1 hit in {}, {} resumed without a record",
            thousands(s.max_one_in),
            plural(s.skipped_hits, "hit", "hits")
        ));
    }
    if s.special_pool_exhausted > 0 {
        why.push(format!(
            "special pool exhausted {}",
            plural(s.special_pool_exhausted, "time", "times")
        ));
    }
    let _ = writeln!(out, "\nNotes: the counts are incomplete");
    if !why.is_empty() {
        let _ = writeln!(out, "  {}", why.join("; "));
    }
    for n in &report.notes {
        let boot = n.boot.map(|b| format!(" boot {b}")).unwrap_or_default();
        let line = format!("  {}{boot}: {}", time(n.time), clean(&n.message));
        let mut rest = line.as_str();
        let mut first = true;
        while !rest.is_empty() {
            let indent = if first { "" } else { "      " };
            let room = WIDTH - indent.len();
            let cut = if rest.chars().count() <= room {
                rest.len()
            } else {
                let limit = rest.char_indices().nth(room).map_or(rest.len(), |(i, _)| i);
                rest.get(..limit)
                    .and_then(|h| h.rfind(' '))
                    .filter(|&i| i > 0)
                    .unwrap_or(limit)
            };
            let (head, tail) = rest.split_at(cut);
            let _ = writeln!(out, "{indent}{}", head.trim_end());
            rest = tail.trim_start();
            first = false;
        }
    }
}

fn drivers(out: &mut String, report: &Report) {
    let total = report.summary.hits;
    let _ = writeln!(
        out,
        "\nDrivers (responsible for a stack: its first frame outside nt and hal)"
    );
    let _ = writeln!(
        out,
        "  {:<24} {:>11} {:>6} {:>10} {:>7}  {:<11}  {:<11}",
        "driver", "hits", "%", "bytes", "stacks", "first (UTC)", "last (UTC)"
    );
    for d in &report.drivers {
        let _ = writeln!(
            out,
            "  {:<24} {:>11} {:>6} {:>10} {:>7}  {:<11}  {:<11}",
            fit(&clean(&d.name), 24),
            thousands(d.hits),
            percent(d.hits, total),
            bytes(d.bytes),
            thousands(d.stacks as u64),
            short_time(d.first_seen),
            short_time(d.last_seen)
        );
    }
}

fn stacks_by_hits(out: &mut String, report: &Report, options: &ReportOptions) {
    let listed = options.listed(report.stacks.len());
    let _ = writeln!(
        out,
        "\nTop {listed} stacks by hits (of {}; frames innermost first, > the driver's frame)",
        thousands(report.stacks.len() as u64)
    );
    for s in report.stacks.iter().take(listed) {
        stack(out, report, s);
    }
}

fn sizes(s: &StackInfo) -> String {
    if s.min_size == s.max_size {
        format!("{} each", bytes(s.min_size))
    } else {
        format!("{}..{} each", bytes(s.min_size), bytes(s.max_size))
    }
}

fn stack(out: &mut String, report: &Report, s: &StackInfo) {
    let total = &report.summary;
    let _ = writeln!(
        out,
        "\n#{:<3} {} ({})  {} ({})  {}  driver {}",
        s.rank,
        plural(s.hits, "hit", "hits"),
        percent(s.hits, total.hits),
        bytes(s.bytes),
        percent(s.bytes, total.bytes),
        sizes(s),
        fit(&clean(&s.driver), 32)
    );
    let _ = writeln!(
        out,
        "     seen {} .. {}, in {} of {} boots",
        time(s.first_seen),
        time(s.last_seen),
        s.per_boot.len(),
        report.boots.len()
    );
    let mut line = String::from("     per boot:");
    for c in &s.per_boot {
        let item = format!("  {}:{}", c.boot, thousands(c.hits));
        if line.len() + item.len() > WIDTH {
            let _ = writeln!(out, "{line}");
            line = String::from("             ");
        }
        line.push_str(&item);
    }
    let _ = writeln!(out, "{line}");
    for (i, frame) in s.frames.iter().enumerate() {
        let mark = if Some(i) == s.driver_frame { '>' } else { ' ' };
        let _ = writeln!(out, "   {mark} {}", fit(&clean(frame), WIDTH - 5));
    }
    if s.frames.is_empty() {
        let _ = writeln!(out, "     (no frames)");
    }
}

fn stacks_by_bytes(out: &mut String, report: &Report, options: &ReportOptions) {
    let listed = options.listed(report.stacks.len());
    let total = report.summary.bytes;
    let _ = writeln!(out, "\nTop {listed} stacks by bytes");
    let _ = writeln!(
        out,
        "  {:<6} {:>10} {:>6} {:>11}  {:<24}  the driver's frame",
        "stack", "bytes", "%", "hits", "driver"
    );
    for rank in report.stacks_by_bytes.iter().take(listed) {
        let Some(s) = report.stack(*rank) else {
            continue;
        };
        let frame = s
            .driver_frame
            .and_then(|i| s.frames.get(i))
            .map_or("", String::as_str);
        let _ = writeln!(
            out,
            "  {:<6} {:>10} {:>6} {:>11}  {:<24}  {}",
            format!("#{}", s.rank),
            bytes(s.bytes),
            percent(s.bytes, total),
            thousands(s.hits),
            fit(&clean(&s.driver), 24),
            fit(&clean(frame), WIDTH - 66)
        );
    }
}

fn boots(out: &mut String, report: &Report) {
    if report.boots.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "\nBoots (numbered across captures and files; capture.boot as in the log)"
    );
    let _ = writeln!(
        out,
        "  {:>4}  {:<8}  {:<24}  {:>5}  {:<18}  {:<11}  {:>11}",
        "boot", "log", "file", "build", "kernel base", "first (UTC)", "hits"
    );
    for b in &report.boots {
        let file = report
            .files
            .get(b.file)
            .and_then(|f| f.path.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  {:>4}  {:<8}  {:<24}  {:>5}  {:<18}  {:<11}  {:>11}",
            b.id,
            format!("{}.{}", b.capture, b.boot),
            fit(&clean(&file), 24),
            b.build.map(|n| n.to_string()).unwrap_or_else(|| "-".into()),
            b.kernel_base
                .map(|k| format!("{k:#x}"))
                .unwrap_or_else(|| "-".into()),
            b.first.map(short_time).unwrap_or_else(|| "-".into()),
            thousands(b.hits)
        );
    }
}
