//! The HTML page: one self-contained file (styles, the flame graph and the plot inline; no
//! network, no external script) with the summary, the drivers, the top stacks, the flame
//! graph, hits over time of the top stacks, the stacks by bytes and the boots.
//!
//! The flame graph is the page's first `<svg>`: inferno's script looks for it as
//! `document.getElementsByTagName("svg")[0]`, and finds its elements by the ids `frames`,
//! `details`, `search`, `unzoom`, `matched`, which nothing else on the page uses.

use std::fmt::Write as _;

use crate::format::{bytes, clean, duration, percent, span, thousands, time};
use crate::{chart, render_flamegraph, Report, ReportOptions, StackInfo};

/// Text for HTML and SVG: `&`, `<`, `>`, `"`, `'` escaped, control characters as `?`.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() => out.push('?'),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 1.5em auto;
  max-width: 1240px; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ccc; }
.sub { color: #555; margin-top: 0; }
table { border-collapse: collapse; font-size: 0.92em; }
th, td { padding: 0.2em 0.7em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; } tr:nth-child(even) td { background: #fafafa; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
table.kv th { background: none; font-weight: 600; }
code, .frames { font-family: ui-monospace, Consolas, monospace; font-size: 0.9em; }
details.stack { margin: 0.6em 0; padding: 0.3em 0.6em; border: 1px solid #ddd; border-radius: 4px; }
details.stack summary { cursor: pointer; }
.frames { margin: 0.4em 0 0.2em 0; padding-left: 2.6em; }
.frames li.driver { font-weight: 700; background: #fff3c4; }
.meta { color: #444; font-size: 0.9em; margin: 0.3em 0; }
.warn { color: #8a4b00; }
.flame { overflow-x: auto; }
.flame > svg { width: 100%; }
.legend { list-style: none; padding: 0; font-size: 0.9em; }
.legend li { margin: 0.15em 0; }
.swatch { display: inline-block; width: 1.4em; height: 0.35em; vertical-align: middle;
  margin-right: 0.5em; }
footer { margin-top: 2em; color: #777; font-size: 0.85em; }
";

/// The page as a string (see the module documentation).
pub fn render_html(report: &Report, options: &ReportOptions) -> String {
    let s = &report.summary;
    let mut out = String::with_capacity(256 * 1024);
    let tags: Vec<String> = s.tags.keys().cloned().collect();
    let what = format!(
        "{} hits{}",
        thousands(s.hits),
        match tags.len() {
            0 => String::new(),
            1 => format!(" of pool tag {}", tags.join("")),
            _ => format!(" of pool tags {}", tags.join(", ")),
        }
    );
    out.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
    out.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n");
    if let Some(refresh) = options.refresh {
        let _ = writeln!(
            out,
            "<meta http-equiv=\"refresh\" content=\"{}\">",
            refresh.as_secs().max(1)
        );
    }
    let _ = writeln!(out, "<title>kdpilot report: {}</title>", escape(&what));
    let _ = writeln!(out, "<style>{STYLE}</style>\n</head>\n<body>");
    let _ = writeln!(out, "<header><h1>kdpilot report</h1>");
    let mut sub = escape(&what);
    if let Some(at) = options.generated_at {
        let _ = write!(sub, "; made {}", escape(&time(at)));
    }
    if let Some(refresh) = options.refresh {
        let _ = write!(
            sub,
            "; the capture rewrites this page and it reloads every {}",
            escape(&duration(refresh))
        );
    }
    let _ = writeln!(out, "<p class=\"sub\">{sub}</p></header>");

    summary(&mut out, report);
    warnings(&mut out, report);
    notes(&mut out, report);
    drivers(&mut out, report);
    top_stacks(&mut out, report, options);
    flame_graph(&mut out, report);
    timeline(&mut out, report, options);
    by_bytes(&mut out, report, options);
    boots(&mut out, report);
    let _ = writeln!(
        out,
        "<footer>kdpilot {} report; stacks are grouped by module!function+offset, so the same \
         code path in another boot (another kernel base) is the same stack.</footer>\n</body>\n</html>",
        env!("CARGO_PKG_VERSION")
    );
    out
}

fn summary(out: &mut String, report: &Report) {
    let s = &report.summary;
    out.push_str("<section id=\"summary\"><h2>Summary</h2><table class=\"kv\">\n");
    let mut row = |k: &str, v: String| {
        let _ = writeln!(out, "<tr><th>{}</th><td>{v}</td></tr>", escape(k));
    };
    row("hits", thousands(s.hits));
    row(
        "bytes requested",
        format!("{} ({})", thousands(s.bytes), escape(&bytes(s.bytes))),
    );
    if let (Some(first), Some(last)) = (s.first, s.last) {
        row(
            "time",
            escape(&format!(
                "{} .. {} ({})",
                time(first),
                time(last),
                duration(span(first, last))
            )),
        );
    }
    row(
        "boots",
        format!(
            "{} in {} capture(s), {} file(s)",
            s.boots, s.captures, s.files
        ),
    );
    row("unique stacks", thousands(s.unique_stacks as u64));
    row("drivers", thousands(s.drivers as u64));
    if s.ignored_records > 0 {
        let kinds: Vec<String> = report
            .ignored
            .iter()
            .map(|(k, n)| format!("{} {}", escape(k), thousands(*n)))
            .collect();
        row(
            "skipped records",
            format!(
                "{} of kinds this report does not use ({})",
                thousands(s.ignored_records),
                kinds.join(", ")
            ),
        );
    }
    out.push_str("</table></section>\n");
}

fn warnings(out: &mut String, report: &Report) {
    if report.warnings.is_empty() {
        return;
    }
    out.push_str("<section id=\"warnings\"><h2>Input warnings</h2><ul class=\"warn\">\n");
    for w in &report.warnings {
        let _ = writeln!(out, "<li>{}</li>", escape(&w.to_string()));
    }
    out.push_str("</ul></section>\n");
}

fn notes(out: &mut String, report: &Report) {
    if report.notes.is_empty() {
        return;
    }
    out.push_str(
        "<section id=\"notes\"><h2>Notes: the counts are incomplete</h2><p class=\"meta\">\
         What the capture recorded about hits it did not catch or did not record.</p>\
         <ul class=\"warn\">\n",
    );
    for n in &report.notes {
        let boot = n.boot.map(|b| format!(" boot {b}")).unwrap_or_default();
        let _ = writeln!(
            out,
            "<li>{}{}: {}</li>",
            escape(&time(n.time)),
            escape(&boot),
            escape(&n.message)
        );
    }
    out.push_str("</ul></section>\n");
}

fn drivers(out: &mut String, report: &Report) {
    if report.drivers.is_empty() {
        return;
    }
    out.push_str(
        "<section id=\"drivers\"><h2>Drivers</h2><p class=\"meta\">The driver responsible \
         for a stack is the module of its first frame outside nt and hal.</p>\n<table>\
         <tr><th>driver</th><th class=\"n\">hits</th><th class=\"n\">%</th>\
         <th class=\"n\">bytes</th><th class=\"n\">stacks</th><th>first hit</th>\
         <th>last hit</th></tr>\n",
    );
    for d in &report.drivers {
        let _ = writeln!(
            out,
            "<tr><td><code>{}</code></td><td class=\"n\">{}</td><td class=\"n\">{}</td>\
             <td class=\"n\">{}</td><td class=\"n\">{}</td><td>{}</td><td>{}</td></tr>",
            escape(&d.name),
            thousands(d.hits),
            percent(d.hits, report.summary.hits),
            escape(&bytes(d.bytes)),
            d.stacks,
            escape(&time(d.first_seen)),
            escape(&time(d.last_seen))
        );
    }
    out.push_str("</table></section>\n");
}

fn driver_frame(s: &StackInfo) -> &str {
    s.driver_frame
        .and_then(|i| s.frames.get(i))
        .or(s.frames.first())
        .map_or("", String::as_str)
}

fn top_stacks(out: &mut String, report: &Report, options: &ReportOptions) {
    let listed = options.listed(report.stacks.len());
    let _ = writeln!(
        out,
        "<section id=\"top-stacks\"><h2>Top {listed} stacks by hits</h2><p class=\"meta\">{} \
         unique stacks. Frames innermost first; the driver's frame is highlighted.</p>",
        thousands(report.stacks.len() as u64)
    );
    if report.stacks.is_empty() {
        out.push_str("<p>No hits yet.</p></section>\n");
        return;
    }
    for s in report.stacks.iter().take(listed) {
        let open = if s.rank <= 3 { " open" } else { "" };
        let _ = writeln!(
            out,
            "<details class=\"stack\" id=\"stack-{rank}\"{open}><summary><b>#{rank}</b> {hits} \
             hits ({pct}), {bytes}, driver <code>{driver}</code>: <code>{frame}</code></summary>",
            rank = s.rank,
            hits = thousands(s.hits),
            pct = percent(s.hits, report.summary.hits),
            bytes = escape(&bytes(s.bytes)),
            driver = escape(&s.driver),
            frame = escape(&clean(driver_frame(s))),
        );
        let per_boot: Vec<String> = s
            .per_boot
            .iter()
            .map(|c| format!("{}:&nbsp;{}", c.boot, thousands(c.hits)))
            .collect();
        let per_boot = per_boot.join(", ");
        let sizes = if s.min_size == s.max_size {
            bytes(s.min_size)
        } else {
            format!("{} to {}", bytes(s.min_size), bytes(s.max_size))
        };
        let _ = writeln!(
            out,
            "<p class=\"meta\">{} to {}; {} each; {} bytes ({}); per boot: {}</p>",
            escape(&time(s.first_seen)),
            escape(&time(s.last_seen)),
            escape(&sizes),
            thousands(s.bytes),
            percent(s.bytes, report.summary.bytes),
            per_boot
        );
        out.push_str("<ol class=\"frames\" start=\"0\">\n");
        for (i, f) in s.frames.iter().enumerate() {
            let class = if Some(i) == s.driver_frame {
                " class=\"driver\""
            } else {
                ""
            };
            let _ = writeln!(out, "<li{class}>{}</li>", escape(f));
        }
        out.push_str("</ol></details>\n");
    }
    out.push_str("</section>\n");
}

fn flame_graph(out: &mut String, report: &Report) {
    out.push_str(
        "<section id=\"flamegraph\"><h2>Flame graph</h2><p class=\"meta\">Every stack, \
         the allocator's outermost callers at the bottom; width is hits. Click a frame to \
         zoom, Ctrl-F or the Search button to highlight.</p>\n",
    );
    if report.stacks.is_empty() {
        out.push_str("<p>No hits yet.</p></section>\n");
        return;
    }
    match render_flamegraph(report) {
        Ok(svg) => {
            let body = svg.find("<svg").and_then(|i| svg.get(i..)).unwrap_or("");
            out.push_str("<div class=\"flame\">\n");
            out.push_str(body);
            out.push_str("</div>\n");
        }
        Err(e) => {
            let _ = writeln!(out, "<p class=\"warn\">{}</p>", escape(&e.to_string()));
        }
    }
    out.push_str("</section>\n");
}

fn timeline(out: &mut String, report: &Report, options: &ReportOptions) {
    let Some(svg) = chart::render(report, options.chart_stacks) else {
        return;
    };
    let n = options.chart_stacks.min(chart::COLOURS.len());
    let _ = writeln!(
        out,
        "<section id=\"timeline\"><h2>Hits over time</h2><p class=\"meta\">The top {n} \
         stacks; dashed lines mark where a boot began.</p>\n{svg}\n<ul class=\"legend\">"
    );
    for (s, colour) in report.stacks.iter().take(n).zip(chart::COLOURS) {
        let _ = writeln!(
            out,
            "<li><span class=\"swatch\" style=\"background:{colour}\"></span><a \
             href=\"#stack-{rank}\">#{rank}</a> {hits} hits, <code>{frame}</code></li>",
            rank = s.rank,
            hits = thousands(s.hits),
            frame = escape(driver_frame(s)),
        );
    }
    out.push_str("</ul></section>\n");
}

fn by_bytes(out: &mut String, report: &Report, options: &ReportOptions) {
    if report.stacks.is_empty() {
        return;
    }
    let listed = options.listed(report.stacks.len());
    let _ = writeln!(
        out,
        "<section id=\"by-bytes\"><h2>Top {listed} stacks by bytes</h2><table><tr>\
         <th>stack</th><th class=\"n\">bytes</th><th class=\"n\">%</th><th class=\"n\">hits</th>\
         <th>driver</th><th>driver frame</th></tr>"
    );
    for rank in report.stacks_by_bytes.iter().take(listed) {
        let Some(s) = report.stack(*rank) else {
            continue;
        };
        let _ = writeln!(
            out,
            "<tr><td><a href=\"#stack-{rank}\">#{rank}</a></td><td class=\"n\">{}</td>\
             <td class=\"n\">{}</td><td class=\"n\">{}</td><td><code>{}</code></td>\
             <td><code>{}</code></td></tr>",
            escape(&bytes(s.bytes)),
            percent(s.bytes, report.summary.bytes),
            thousands(s.hits),
            escape(&s.driver),
            escape(driver_frame(s)),
        );
    }
    out.push_str("</table></section>\n");
}

fn boots(out: &mut String, report: &Report) {
    if report.boots.is_empty() {
        return;
    }
    out.push_str(
        "<section id=\"boots\"><h2>Boots</h2><p class=\"meta\">Numbered across captures and \
         files; <i>log</i> is capture.boot as the log numbers it.</p><table><tr>\
         <th class=\"n\">boot</th><th>log</th><th>file</th><th class=\"n\">build</th>\
         <th>kernel base</th><th>first record</th><th class=\"n\">hits</th>\
         <th class=\"n\">bytes</th></tr>\n",
    );
    for b in &report.boots {
        let file = report
            .files
            .get(b.file)
            .map(|f| f.path.display().to_string())
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "<tr><td class=\"n\">{}</td><td>{}.{}</td><td><code>{}</code></td>\
             <td class=\"n\">{}</td><td><code>{}</code></td><td>{}</td><td class=\"n\">{}</td>\
             <td class=\"n\">{}</td></tr>",
            b.id,
            b.capture,
            b.boot,
            escape(&file),
            b.build.map(|n| n.to_string()).unwrap_or_default(),
            b.kernel_base.map(|k| format!("{k:#x}")).unwrap_or_default(),
            b.first.map(|t| escape(&time(t))).unwrap_or_default(),
            thousands(b.hits),
            escape(&bytes(b.bytes))
        );
    }
    out.push_str("</table></section>\n");
}
