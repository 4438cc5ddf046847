//! Figures for docs/capture-log.md: bytes per hit and the cost of a write, with and without
//! `sync_data`. Not a pass/fail test: run with
//! `cargo test -p kdpilot-capture --release --test log_measure -- --ignored --nocapture`.

mod log_common;

use std::time::Instant;

use kdpilot_capture::log::{format_hit_text, json_line, JsonLog, LogOptions, LogSink, TextLog};
use log_common::x64_hit;

const WRITES: u32 = 500;

fn per_write(mut write: impl FnMut()) -> f64 {
    write(); // warm-up: file creation
    let start = Instant::now();
    for _ in 0..WRITES {
        write();
    }
    start.elapsed().as_secs_f64() * 1e6 / f64::from(WRITES)
}

#[test]
#[ignore = "a measurement, not a test"]
fn measure() {
    let hit = x64_hit(10);
    let json = json_line(&hit).unwrap().len();
    let text = format_hit_text(&hit).len();
    println!("10-frame x64 hit: JSON line {json} bytes, text block {text} bytes");

    let dir = tempfile::Builder::new()
        .prefix("kdpilot-measure")
        .tempdir_in(std::env::var_os("MEASURE_DIR").unwrap_or_else(|| std::env::temp_dir().into()))
        .unwrap();
    println!("directory: {}", dir.path().display());
    let start = Instant::now();
    for _ in 0..WRITES {
        std::hint::black_box(json_line(&hit).unwrap());
        std::hint::black_box(format_hit_text(&hit));
    }
    println!(
        "formatting both: {:.1} us per hit",
        start.elapsed().as_secs_f64() * 1e6 / f64::from(WRITES)
    );
    for sync_data in [false, true] {
        let o = LogOptions { sync_data };
        let mut j = JsonLog::open(&dir.path().join(format!("j{sync_data}.jsonl")), &o).unwrap();
        let json_us = per_write(|| j.write_hit(&hit).unwrap());
        let mut t = TextLog::open(&dir.path().join(format!("t{sync_data}.log")), &o).unwrap();
        let text_us = per_write(|| t.write_hit(&hit).unwrap());
        let mut s = LogSink::open(
            &dir.path().join(format!("s{sync_data}.log")),
            &dir.path().join(format!("s{sync_data}.jsonl")),
            &o,
        )
        .unwrap();
        let sink_us = per_write(|| s.write_hit(&hit).unwrap());
        println!(
            "sync_data {sync_data}: JSON {json_us:.1} us, text {text_us:.1} us, both (LogSink) {sink_us:.1} us per hit"
        );
    }
}
