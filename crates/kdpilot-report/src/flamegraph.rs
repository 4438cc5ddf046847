//! The flame graph, drawn by inferno from the folded form (feature `flamegraph`).

use inferno::flamegraph::{self, color, Options};

use crate::{format, render_folded, Outstanding, Report, ReportError};

/// The flame graph of every stack by hits: the allocator's callers at the bottom, the driver
/// code above; colours chosen from the frame names (the same names get the same colours in
/// every report).
pub fn render(report: &Report) -> Result<String, ReportError> {
    let subtitle = format!(
        "{} hits, {} unique stacks, {} requested; width: hits",
        format::thousands(report.summary.hits),
        format::thousands(report.stacks.len() as u64),
        format::bytes(report.summary.bytes)
    );
    draw(
        report,
        title(report),
        subtitle,
        "hits",
        "No hits: nothing to draw.",
    )
}

/// The flame graph of the outstanding allocations: width is allocations never freed.
pub fn render_outstanding(outstanding: &Outstanding) -> Result<String, ReportError> {
    let report = &outstanding.report;
    let subtitle = format!(
        "{} allocations outstanding at the end of the log, {} unique stacks, {}; width: \
         allocations",
        format::thousands(report.summary.hits),
        format::thousands(report.stacks.len() as u64),
        format::bytes(report.summary.bytes)
    );
    let title = title(report).replacen("Allocations", "Outstanding allocations", 1);
    draw(
        report,
        title,
        subtitle,
        "allocations",
        "No outstanding allocations: nothing to draw.",
    )
}

fn draw(
    report: &Report,
    title: String,
    subtitle: String,
    count_name: &str,
    empty: &str,
) -> Result<String, ReportError> {
    if report.stacks.is_empty() {
        return Ok(empty_svg(empty));
    }
    let folded = render_folded(report);
    let mut options = Options::default();
    options.title = title;
    options.subtitle = Some(subtitle);
    options.count_name = count_name.into();
    options.name_type = "Frame:".into();
    options.colors = color::Palette::Basic(color::BasicPalette::Mem);
    options.deterministic = true;
    let mut svg = Vec::new();
    flamegraph::from_lines(&mut options, folded.lines(), &mut svg)
        .map_err(ReportError::FlameGraph)?;
    String::from_utf8(svg).map_err(|e| {
        ReportError::FlameGraph(std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    })
}

fn title(report: &Report) -> String {
    let tags: Vec<&str> = report.summary.tags.keys().map(String::as_str).collect();
    match tags.as_slice() {
        [] => "Allocations by stack".into(),
        [tag] => format!("Allocations of pool tag {} by stack", format::clean(tag)),
        _ => format!(
            "Allocations of pool tags {} by stack",
            format::clean(&tags.join(", "))
        ),
    }
}

/// A small SVG that says there is nothing to draw.
fn empty_svg(message: &str) -> String {
    format!(
        concat!(
            r#"<?xml version="1.0" standalone="no"?>"#,
            "\n",
            r#"<svg version="1.1" width="600" height="60" xmlns="http://www.w3.org/2000/svg">"#,
            r#"<text x="10" y="35" font-family="Verdana" font-size="14">{}</text>"#,
            "</svg>\n"
        ),
        message
    )
}
