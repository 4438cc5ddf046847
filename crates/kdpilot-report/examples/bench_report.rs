//! The report benchmark: `cargo xtask bench-report` runs this in release mode.
//!
//! ```text
//! bench_report generate FILE RECORDS STACKS BOOTS   write a synthetic capture log
//! bench_report report FILE...                       time a report of the logs; print one JSON
//!                                                   line with the times and the peak memory
//! ```
//!
//! The report mode runs in its own process (the xtask starts one per run), so its peak
//! resident memory (VmHWM in /proc/self/status, Linux) is the report's alone, not the
//! generator's.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use kdpilot_report::synth::{at, stacks, SynthCapture};
use kdpilot_report::{
    read_logs, render_flamegraph, render_folded, render_html, render_json, render_text,
    ReportOptions,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("generate") => {
            let [_, file, records, unique, boots] = args.as_slice() else {
                return Err("usage: bench_report generate FILE RECORDS STACKS BOOTS".into());
            };
            generate(
                file.into(),
                records.parse()?,
                unique.parse()?,
                boots.parse()?,
            )
        }
        Some("report") if args.len() > 1 => {
            report(args.iter().skip(1).map(PathBuf::from).collect())
        }
        _ => Err("usage: bench_report generate FILE RECORDS STACKS BOOTS | report FILE...".into()),
    }
}

/// `records` hits over `boots` boots, drawn from `unique` stacks with a skewed distribution
/// (stack i is picked about twice as often as stack 2i), one hit every 30 ms of capture time.
fn generate(
    file: PathBuf,
    records: u64,
    unique: usize,
    boots: u64,
) -> Result<(), Box<dyn std::error::Error>> {
    let stacks = stacks(unique.max(1));
    let out = BufWriter::with_capacity(1 << 20, File::create(&file)?);
    let mut capture = SynthCapture::new(out, at(0))?;
    let per_boot = records.div_ceil(boots.max(1));
    let mut written = 0u64;
    let mut state = 0x2545_f491_4f6c_dd1du64;
    while written < records {
        capture.boot()?;
        for _ in 0..per_boot.min(records - written) {
            // xorshift: the same sequence every run.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let r = (state >> 11) as f64 / (1u64 << 53) as f64;
            let index = ((unique as f64).powf(r) as usize).saturating_sub(1) % stacks.len();
            let size = 32 + (state % 8) * 16;
            capture.hit(&stacks[index], size)?;
            capture.advance(Duration::from_millis(30));
            written += 1;
        }
        capture.reboot()?;
        capture.advance(Duration::from_secs(120));
    }
    capture.detached()?;
    capture.into_inner().flush()?;
    let size = std::fs::metadata(&file)?.len();
    eprintln!(
        "wrote {} ({} records, {} stacks, {} boots, {:.1} MiB)",
        file.display(),
        records,
        unique,
        boots,
        size as f64 / (1 << 20) as f64
    );
    Ok(())
}

fn report(files: Vec<PathBuf>) -> Result<(), Box<dyn std::error::Error>> {
    let bytes: u64 = files
        .iter()
        .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .sum();
    let started = Instant::now();
    let report = read_logs(&files)?;
    let read = started.elapsed();
    let options = ReportOptions::default();
    let t = Instant::now();
    let text = render_text(&report, &options);
    let text_time = t.elapsed();
    let t = Instant::now();
    let json = render_json(&report, &options);
    let folded = render_folded(&report);
    let json_folded_time = t.elapsed();
    let t = Instant::now();
    let svg = render_flamegraph(&report).map(|s| s.len()).unwrap_or(0);
    let svg_time = t.elapsed();
    let t = Instant::now();
    let html = render_html(&report, &options);
    let html_time = t.elapsed();
    let total = started.elapsed();
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| "unknown".into())
    };
    println!(
        "{}",
        serde_json::json!({
            "records": report.summary.hits + report.files.iter().map(|f| f.events).sum::<u64>(),
            "hits": report.summary.hits,
            "unique_stacks": report.summary.unique_stacks,
            "boots": report.summary.boots,
            "input_mib": bytes as f64 / (1 << 20) as f64,
            "read_s": read.as_secs_f64(),
            "read_mib_per_s": bytes as f64 / (1 << 20) as f64 / read.as_secs_f64(),
            "text_s": text_time.as_secs_f64(),
            "json_and_folded_s": json_folded_time.as_secs_f64(),
            "flamegraph_s": svg_time.as_secs_f64(),
            "html_s": html_time.as_secs_f64(),
            "total_s": total.as_secs_f64(),
            "peak_rss": field("VmHWM:"),
            "sizes": {"text": text.len(), "json": json.len(), "folded": folded.len(), "svg": svg, "html": html.len()},
        })
    );
    Ok(())
}
