//! The folded-stacks form: one line per unique stack, `outer;...;inner count`, the input of
//! inferno-flamegraph and flamegraph.pl.

use crate::Report;

/// Every stack as `frame;frame;frame hits`, the outermost frame first (the root of the flame
/// graph) and the allocator last; lines sorted by text, so the output is stable. A `;` in a
/// name becomes `:` and white space `_`, as the format reserves them.
pub fn render_folded(report: &Report) -> String {
    let mut lines: Vec<String> = report
        .stacks
        .iter()
        .map(|s| {
            let mut line = String::new();
            for (i, frame) in s.frames.iter().rev().enumerate() {
                if i > 0 {
                    line.push(';');
                }
                line.extend(frame.chars().map(|c| match c {
                    ';' => ':',
                    c if c.is_whitespace() || c.is_control() => '_',
                    c => c,
                }));
            }
            if s.frames.is_empty() {
                line.push_str("[no-frames]");
            }
            line.push(' ');
            line.push_str(&s.hits.to_string());
            line
        })
        .collect();
    lines.sort();
    let mut out = lines.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    out
}
