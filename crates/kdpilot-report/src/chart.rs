//! The HTML page's plot of hits over time: one step line per top stack, hits per time bucket,
//! reboots marked. Drawn as inline SVG here (no library, no script).

use std::fmt::Write as _;
use std::time::Duration;

use crate::format::{clock, duration, thousands};
use crate::html::escape;
use crate::timeline::unix_seconds;
use crate::Report;

/// Line colours, one per plotted stack (the legend uses the same).
pub const COLOURS: [&str; 10] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

/// At most this many buckets across the plot.
const MAX_BUCKETS: i64 = 120;

const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 320.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 16.0;
const BOTTOM: f64 = 44.0;

/// The plot of the first `n` stacks (by hits) as an `<svg>` element, `None` without hits.
pub fn render(report: &Report, n: usize) -> Option<String> {
    let stacks: Vec<_> = report.stacks.iter().take(n.min(COLOURS.len())).collect();
    let (first, last) = report.hit_span()?;
    let (first, last) = (unix_seconds(first), unix_seconds(last));
    let finest = stacks.iter().map(|s| s.timeline.width()).max().unwrap_or(1);
    let mut width: i64 = 1;
    while width < finest || (last - first) / width >= MAX_BUCKETS {
        width *= 2;
    }
    let start = first.div_euclid(width) * width;
    let buckets = usize::try_from((last - start) / width + 1).unwrap_or(1);
    let series: Vec<Vec<u64>> = stacks
        .iter()
        .map(|s| {
            let mut v = vec![0u64; buckets];
            for (t, count) in s.timeline.rebucket(width) {
                let i = usize::try_from((t - start) / width).unwrap_or(0);
                if let Some(slot) = v.get_mut(i) {
                    *slot += count;
                }
            }
            v
        })
        .collect();
    let peak = series.iter().flatten().copied().max().unwrap_or(0).max(1);
    let y_max = nice_ceiling(peak);

    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let span = (buckets as f64) * width as f64;
    let x = |t: i64| LEFT + (t - start) as f64 / span * plot_w;
    let y = |v: u64| TOP + plot_h - v as f64 / y_max as f64 * plot_h;

    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg class="timeline" role="img" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" xmlns="http://www.w3.org/2000/svg">"#
    );
    let _ = write!(
        svg,
        "<title>Hits per {} of the top {} stacks</title>",
        duration(Duration::from_secs(width.unsigned_abs())),
        stacks.len()
    );
    // Grid and y labels.
    for i in 0..=4u64 {
        let v = y_max * i / 4;
        let _ = write!(
            svg,
            r##"<line x1="{LEFT}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end" font-size="11">{}</text>"##,
            WIDTH - RIGHT,
            y(v),
            y(v),
            LEFT - 6.0,
            y(v) + 4.0,
            thousands(v)
        );
    }
    // x labels: about six, on bucket boundaries.
    let with_date =
        last - first >= 86_400 || clock(start, true).get(..5) != clock(last, true).get(..5);
    let step = ((buckets as i64 + 5) / 6).max(1);
    let mut b = 0;
    while b <= buckets as i64 {
        let t = start + b * width;
        let _ = write!(
            svg,
            r##"<line x1="{0:.1}" x2="{0:.1}" y1="{1:.1}" y2="{2:.1}" stroke="#999"/><text x="{0:.1}" y="{3:.1}" text-anchor="middle" font-size="11">{4}</text>"##,
            x(t),
            TOP + plot_h,
            TOP + plot_h + 4.0,
            TOP + plot_h + 17.0,
            escape(&clock(t, with_date))
        );
        b += step;
    }
    let _ = write!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="11">time (UTC); hits per {}</text>"#,
        LEFT + plot_w / 2.0,
        HEIGHT - 6.0,
        escape(&duration(Duration::from_secs(width.unsigned_abs())))
    );
    // Reboots: where each boot after the first began.
    if report.boots.len() <= 60 {
        for boot in report.boots.iter().skip(1) {
            let Some(t) = boot.first.map(unix_seconds) else {
                continue;
            };
            if t < start || t > start + span as i64 {
                continue;
            }
            let _ = write!(
                svg,
                r##"<line class="boot" x1="{0:.1}" x2="{0:.1}" y1="{1:.1}" y2="{2:.1}" stroke="#888" stroke-dasharray="4 3"><title>boot {3} begins</title></line><text x="{4:.1}" y="{5:.1}" font-size="10" fill="#666">b{3}</text>"##,
                x(t),
                TOP,
                TOP + plot_h,
                boot.id,
                x(t) + 2.0,
                TOP + 10.0
            );
        }
    }
    // One step line per stack.
    for ((s, values), colour) in stacks.iter().zip(&series).zip(COLOURS) {
        let mut points = String::new();
        for (i, &v) in values.iter().enumerate() {
            let t0 = start + i as i64 * width;
            let _ = write!(
                points,
                "{:.1},{:.1} {:.1},{:.1} ",
                x(t0),
                y(v),
                x(t0 + width),
                y(v)
            );
        }
        let _ = write!(
            svg,
            r#"<polyline class="series" data-stack="{}" fill="none" stroke="{colour}" stroke-width="2" points="{}"><title>#{} {}</title></polyline>"#,
            s.rank,
            points.trim_end(),
            s.rank,
            escape(&s.driver)
        );
    }
    svg.push_str("</svg>");
    Some(svg)
}

/// The smallest of 1, 2, 5 × 10^k at least `n`.
fn nice_ceiling(n: u64) -> u64 {
    let mut base = 1u64;
    loop {
        for m in [1, 2, 5] {
            let v = base.saturating_mul(m);
            if v >= n {
                return v;
            }
        }
        if base > u64::MAX / 10 {
            return n;
        }
        base *= 10;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_ceilings() {
        assert_eq!(nice_ceiling(1), 1);
        assert_eq!(nice_ceiling(3), 5);
        assert_eq!(nice_ceiling(7), 10);
        assert_eq!(nice_ceiling(101), 200);
        assert_eq!(nice_ceiling(u64::MAX), u64::MAX);
    }
}
