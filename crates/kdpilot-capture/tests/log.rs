//! The capture logs: formats (snapshots), round trips, append-only and crash repair, write
//! errors, default paths.

mod log_common;

use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use kdpilot_capture::log::{
    default_log_file_name, format_event_text, format_hit_text, json_line, json_path_for,
    resolve_log_paths, resolve_log_paths_with, JsonLog, LogOptions, LogSink, TextLog,
    ENV_LOG_FILE_APPEND, ENV_LOG_FILE_OPEN,
};
use kdpilot_capture::record::{EventRecord, HitRecord, LogLine};
use log_common::{events, t0, x64_hit, x86_hit};

fn opts() -> LogOptions {
    LogOptions::default()
}

fn read(p: &Path) -> String {
    fs::read_to_string(p).unwrap()
}

fn parse_all(p: &Path) -> Vec<LogLine> {
    read(p)
        .lines()
        .enumerate()
        .map(|(i, l)| LogLine::parse(l).unwrap_or_else(|e| panic!("line {}: {e}: {l}", i + 1)))
        .collect()
}

#[test]
fn text_hit_x64() {
    insta::assert_snapshot!(format_hit_text(&x64_hit(4)));
}

#[test]
fn text_hit_x86() {
    insta::assert_snapshot!(format_hit_text(&x86_hit()));
}

#[test]
fn text_hit_blocks_end_with_a_blank_line() {
    for hit in [x64_hit(0), x64_hit(10), x86_hit()] {
        let block = format_hit_text(&hit);
        assert!(block.ends_with("\n\n") && !block.ends_with("\n\n\n"));
        assert_eq!(block.lines().count(), 2 + hit.frames.len().max(1) + 1);
    }
}

#[test]
fn text_hit_without_frames() {
    insta::assert_snapshot!(format_hit_text(&x64_hit(0)));
}

#[test]
fn text_events() {
    let text: String = events().iter().map(format_event_text).collect();
    insta::assert_snapshot!(text);
}

#[test]
fn json_lines() {
    let mut out = Vec::new();
    out.extend(json_line(&x64_hit(2)).unwrap());
    out.extend(json_line(&x86_hit()).unwrap());
    for e in events() {
        out.extend(json_line(&e).unwrap());
    }
    insta::assert_snapshot!(String::from_utf8(out).unwrap());
}

#[test]
fn issue_field_names() {
    let v: serde_json::Value = serde_json::from_slice(&json_line(&x64_hit(1)).unwrap()).unwrap();
    for k in [
        "hit",
        "boot",
        "time",
        "tag",
        "size",
        "pool_type",
        "processor",
        "thread",
        "breakpoint",
        "frames",
    ] {
        assert!(v.get(k).is_some(), "{k} missing");
    }
    assert!(v.get("event").is_none());
    assert_eq!(v["time"], "2026-11-22T01:02:03.456Z");
    assert_eq!(v["tag"], "Leak");
    let f = &v["frames"][0];
    assert_eq!(f["address"], "0xfffff8010f5a1230");
    assert_eq!(f["module"], "nt");
    assert_eq!(f["function"], "ExAllocateHeapSpecialPool");
    assert_eq!(f["offset"], 0);
    // function is null (not absent) when unknown.
    let v: serde_json::Value = serde_json::from_slice(&json_line(&x86_hit()).unwrap()).unwrap();
    assert!(v["frames"][3]["function"].is_null());
    assert!(v["frames"][3]["module"].is_null());
}

#[test]
fn json_round_trip_through_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("night.jsonl");
    let mut log = JsonLog::open(&path, &opts()).unwrap();
    let mut expect: Vec<LogLine> = Vec::new();
    for (i, e) in events().into_iter().enumerate() {
        log.write_event(&e).unwrap();
        expect.push(e.into());
        let mut hit = if i % 2 == 0 { x64_hit(i) } else { x86_hit() };
        hit.hit = i as u64;
        log.write_hit(&hit).unwrap();
        expect.push(hit.into());
    }
    assert_eq!(log.records_written(), expect.len() as u64);
    assert_eq!(log.bytes_written(), fs::metadata(&path).unwrap().len());
    assert_eq!(parse_all(&path), expect);
    // The serde route reads the same.
    let via_serde: Vec<LogLine> = read(&path)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(via_serde, expect);
    // A reader that knows nothing of kdpilot sees hits without an `event` key.
    let hits = read(&path)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("event").is_none())
        .count();
    assert_eq!(hits, events().len());
}

#[test]
fn bad_lines_are_errors_that_name_the_problem() {
    let e =
        LogLine::parse(r#"{"event": "exploded", "time": "2026-11-22T01:02:03.456Z"}"#).unwrap_err();
    assert!(e.to_string().contains("exploded"), "{e}");
    let e = LogLine::parse(r#"{"hit": 1, "boot": 1}"#).unwrap_err();
    assert!(e.to_string().contains("missing field"), "{e}");
    let line = String::from_utf8(json_line(&x64_hit(1)).unwrap()).unwrap();
    let bad = line.replace("2026-11-22T01:02:03.456Z", "last tuesday");
    let e = LogLine::parse(&bad).unwrap_err();
    assert!(e.to_string().contains("RFC 3339"), "{e}");
    assert!(LogLine::parse(&line[..line.len() / 2]).is_err());
    assert!(LogLine::parse("[1, 2]").is_err());
    // Unknown fields are ignored (newer writers).
    let newer = line.replacen("{\"hit\"", "{\"future\":[1],\"hit\"", 1);
    assert_eq!(LogLine::parse(&newer).unwrap(), LogLine::Hit(x64_hit(1)));
}

#[test]
fn times_read_back_to_the_millisecond() {
    let mut hit = x64_hit(1);
    hit.time = t0() + std::time::Duration::from_micros(999);
    let back = LogLine::parse(std::str::from_utf8(&json_line(&hit).unwrap()).unwrap()).unwrap();
    assert_eq!(back.time(), t0());
}

#[test]
fn append_never_truncates() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("night.log");
    let json = dir.path().join("night.jsonl");
    fs::write(&text, "kd: an earlier session\n").unwrap();
    fs::write(
        &json,
        String::from_utf8(json_line(&events()[0]).unwrap()).unwrap(),
    )
    .unwrap();
    {
        let mut sink = LogSink::open(&text, &json, &opts()).unwrap();
        sink.write_hit(&x64_hit(3)).unwrap();
    }
    {
        let mut sink = LogSink::open(&text, &json, &opts()).unwrap();
        assert!(!sink.text().ended_partial_line());
        assert_eq!(sink.json().dropped_partial_line(), None);
        sink.write_event(&events()[4]).unwrap();
        sink.write_hit(&x86_hit()).unwrap();
    }
    let t = read(&text);
    assert!(t.starts_with("kd: an earlier session\n"));
    assert_eq!(t.matches(" hit 17 ").count(), 1);
    assert_eq!(t.matches(" hit 3 ").count(), 1);
    assert!(t.contains("=== reboot: boot 2 ended (unload all) ==="));
    let lines = parse_all(&json);
    assert_eq!(
        lines,
        vec![
            LogLine::Event(events()[0].clone()),
            LogLine::Hit(x64_hit(3)),
            LogLine::Event(events()[4].clone()),
            LogLine::Hit(x86_hit()),
        ]
    );
}

/// A writer killed mid-record (kill -9): half a JSON line at the end.
#[test]
fn partial_json_line_is_cut_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("night.jsonl");
    let first = json_line(&x64_hit(10)).unwrap();
    let second = json_line(&x86_hit()).unwrap();
    let mut f = fs::File::create(&json).unwrap();
    f.write_all(&first).unwrap();
    f.write_all(&second[..second.len() / 2]).unwrap();
    drop(f);

    let mut log = JsonLog::open(&json, &opts()).unwrap();
    assert_eq!(log.dropped_partial_line(), Some((second.len() / 2) as u64));
    assert_eq!(fs::read(&json).unwrap(), first);
    log.write_hit(&x86_hit()).unwrap();
    drop(log);
    assert_eq!(
        parse_all(&json),
        vec![LogLine::Hit(x64_hit(10)), LogLine::Hit(x86_hit())]
    );
}

#[test]
fn partial_json_line_without_any_newline_is_cut_to_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("night.jsonl");
    fs::write(&json, b"{\"hit\":1,\"bo").unwrap();
    let mut log = JsonLog::open(&json, &opts()).unwrap();
    assert_eq!(log.dropped_partial_line(), Some(12));
    log.write_event(&events()[0]).unwrap();
    assert_eq!(parse_all(&json), vec![LogLine::Event(events()[0].clone())]);
}

/// A power loss can leave zeros where the record was being written.
#[test]
fn zero_filled_tail_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("night.jsonl");
    let mut bytes = json_line(&events()[1]).unwrap();
    bytes.extend([0u8; 300]);
    fs::write(&json, &bytes).unwrap();
    let log = JsonLog::open(&json, &opts()).unwrap();
    assert_eq!(log.dropped_partial_line(), Some(300));
    assert_eq!(parse_all(&json), vec![LogLine::Event(events()[1].clone())]);
}

/// A complete object that only lacks its newline (another tool wrote it) is kept.
#[test]
fn complete_last_line_without_newline_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("night.jsonl");
    let mut bytes = json_line(&events()[1]).unwrap();
    bytes.extend(json_line(&events()[2]).unwrap());
    bytes.pop();
    fs::write(&json, &bytes).unwrap();
    let mut log = JsonLog::open(&json, &opts()).unwrap();
    assert_eq!(log.dropped_partial_line(), None);
    log.write_event(&events()[3]).unwrap();
    assert_eq!(
        parse_all(&json),
        events()[1..4]
            .iter()
            .cloned()
            .map(LogLine::Event)
            .collect::<Vec<_>>()
    );
}

#[test]
fn partial_text_line_is_ended_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("night.log");
    let block = format_hit_text(&x64_hit(3));
    fs::write(&text, &block[..block.len() / 2]).unwrap();
    let mut log = TextLog::open(&text, &opts()).unwrap();
    assert!(log.ended_partial_line());
    log.write_event(&events()[4]).unwrap();
    let t = read(&text);
    assert!(t.starts_with(&block[..block.len() / 2]));
    assert!(t.ends_with(&format!("\n{}", format_event_text(&events()[4]))));
    assert_eq!(
        log.bytes_written(),
        format_event_text(&events()[4]).len() as u64
    );
}

#[test]
fn files_are_created_with_missing_ones() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("a.log");
    let json = dir.path().join("a.jsonl");
    let sink = LogSink::open(&text, &json, &opts()).unwrap();
    assert!(text.exists() && json.exists());
    assert_eq!(sink.text().path(), text);
    assert_eq!(sink.json().path(), json);
    // A missing directory is an error naming the file.
    let e = LogSink::open(
        &dir.path().join("no/such/dir.log"),
        &dir.path().join("x.jsonl"),
        &opts(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("no/such/dir.log"), "{e}");
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
}

#[test]
fn the_same_file_twice_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("both.log");
    let e = LogSink::open(&p, &p, &opts()).unwrap_err();
    assert!(e.to_string().contains("also the text log"), "{e}");
    let dotted = dir.path().join(".").join("both.log");
    assert!(LogSink::open(&p, &dotted, &opts()).is_err());
    assert!(!p.exists());
}

#[test]
fn sync_can_be_turned_off() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("a.log");
    let json = dir.path().join("a.jsonl");
    let mut sink = LogSink::open(&text, &json, &LogOptions { sync_data: false }).unwrap();
    sink.write_hit(&x64_hit(10)).unwrap();
    sink.set_sync_data(true);
    sink.write_hit(&x86_hit()).unwrap();
    assert_eq!(parse_all(&json).len(), 2);
}

/// /dev/full: every write fails with ENOSPC, as on a full disk.
#[cfg(target_os = "linux")]
#[test]
fn a_full_disk_is_an_error_the_caller_sees() {
    let full = Path::new("/dev/full");
    let mut log = JsonLog::open(full, &opts()).unwrap();
    let e = log.write_hit(&x64_hit(10)).unwrap_err();
    assert!(e.is_storage_full(), "{e:?}");
    assert_eq!(e.kind(), std::io::ErrorKind::StorageFull);
    assert_eq!(e.path(), full);
    assert!(e.to_string().contains("/dev/full"), "{e}");
    assert!(e.to_string().contains("another disk"), "{e}");
    let as_io: std::io::Error = e.into();
    assert_eq!(as_io.kind(), std::io::ErrorKind::StorageFull);

    // Through the sink: the JSON log still gets the record, the text log's error comes back.
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("a.jsonl");
    let mut sink = LogSink::open(full, &json, &opts()).unwrap();
    let e = sink.write_hit(&x64_hit(2)).unwrap_err();
    assert!(e.is_storage_full());
    let e = sink.write_event(&events()[0]).unwrap_err();
    assert!(e.is_storage_full());
    assert_eq!(parse_all(&json).len(), 2);
}

/// A write cut short (the file size limit reached half way through a record, as a disk filling
/// up does) is taken back: the file still ends on a complete line. The limit is set for a child
/// process (`ulimit -f`, SIGXFSZ ignored) that runs this same test.
#[cfg(target_os = "linux")]
#[test]
fn a_write_cut_short_is_taken_back() {
    const CHILD: &str = "KDPILOT_CAPTURE_FSIZE_CHILD";
    if let Some(dir) = std::env::var_os(CHILD) {
        let path = Path::new(&dir).join("limited.jsonl");
        let mut log = JsonLog::open(&path, &opts()).unwrap();
        let mut written = 0;
        let err = loop {
            match log.write_hit(&x64_hit(10)) {
                Ok(()) => written += 1,
                Err(e) => break e,
            }
            assert!(written < 1000, "the file size limit did not apply");
        };
        assert_eq!(err.kind(), std::io::ErrorKind::FileTooLarge, "{err}");
        let bytes = fs::read(&path).unwrap();
        assert_eq!(bytes.len() as u64, log.bytes_written());
        assert_eq!(parse_all(&path).len(), written);
        assert!(written > 0);
        println!("child: {written} records, then: {err}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg("ulimit -f 16 && trap '' XFSZ && exec \"$0\" --exact a_write_cut_short_is_taken_back --nocapture")
        .arg(std::env::current_exe().unwrap())
        .env(CHILD, dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("child: "),
        "{}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // Whole records only, though the limit (8 or 16 KiB) is not a multiple of one.
    let len = fs::metadata(dir.path().join("limited.jsonl"))
        .unwrap()
        .len();
    let record = json_line(&x64_hit(10)).unwrap().len() as u64;
    assert_eq!(len % record, 0);
    assert!(8192 % record != 0 && 16384 % record != 0);
}

// The default paths read the process environment: these tests take a lock and put back what
// they changed.
static ENV: Mutex<()> = Mutex::new(());

struct EnvGuard {
    saved: Vec<(&'static str, Option<OsString>)>,
    _lock: std::sync::MutexGuard<'static, ()>,
}

impl EnvGuard {
    fn set(vars: &[(&'static str, Option<&str>)]) -> EnvGuard {
        let lock = ENV.lock().unwrap_or_else(|p| p.into_inner());
        let mut saved = Vec::new();
        for name in [ENV_LOG_FILE_APPEND, ENV_LOG_FILE_OPEN] {
            saved.push((name, std::env::var_os(name)));
            std::env::remove_var(name);
        }
        for (k, v) in vars {
            if let Some(v) = v {
                std::env::set_var(k, v);
            }
        }
        EnvGuard { saved, _lock: lock }
    }
}

impl Drop for EnvGuard {
    fn drop(&mut self) {
        for (k, v) in &self.saved {
            match v {
                Some(v) => std::env::set_var(k, v),
                None => std::env::remove_var(k),
            }
        }
    }
}

fn p(s: &str) -> PathBuf {
    PathBuf::from(s)
}

#[test]
fn default_paths_from_the_environment() {
    {
        let _g = EnvGuard::set(&[
            (ENV_LOG_FILE_APPEND, Some("/logs/append.txt")),
            (ENV_LOG_FILE_OPEN, Some("/logs/open.txt")),
        ]);
        assert_eq!(
            resolve_log_paths(None, None),
            (p("/logs/append.txt"), p("/logs/append.jsonl"))
        );
        assert_eq!(
            resolve_log_paths(Some(p("mine.log")), None),
            (p("mine.log"), p("mine.jsonl"))
        );
        assert_eq!(
            resolve_log_paths(None, Some(p("j.json"))),
            (p("/logs/append.txt"), p("j.json"))
        );
    }
    {
        let _g = EnvGuard::set(&[
            (ENV_LOG_FILE_APPEND, Some("")),
            (ENV_LOG_FILE_OPEN, Some("/logs/open.txt")),
        ]);
        assert_eq!(
            resolve_log_paths(None, None),
            (p("/logs/open.txt"), p("/logs/open.jsonl"))
        );
    }
    {
        let _g = EnvGuard::set(&[]);
        let (log, json) = resolve_log_paths(None, None);
        let name = log.to_str().unwrap();
        assert!(
            name.len() == "kdpilot-20261122-010203.log".len()
                && name.starts_with("kdpilot-20")
                && name.ends_with(".log")
                && name[8..16].bytes().all(|b| b.is_ascii_digit())
                && &name[16..17] == "-"
                && name[17..23].bytes().all(|b| b.is_ascii_digit()),
            "{name}"
        );
        assert_eq!(json, log.with_extension("jsonl"));
    }
}

#[test]
fn default_paths_are_put_back() {
    let before = (
        std::env::var_os(ENV_LOG_FILE_APPEND),
        std::env::var_os(ENV_LOG_FILE_OPEN),
    );
    {
        let _g = EnvGuard::set(&[(ENV_LOG_FILE_OPEN, Some("x.log"))]);
        assert_eq!(resolve_log_paths(None, None).0, p("x.log"));
    }
    let _lock = ENV.lock().unwrap_or_else(|p| p.into_inner());
    assert_eq!(
        (
            std::env::var_os(ENV_LOG_FILE_APPEND),
            std::env::var_os(ENV_LOG_FILE_OPEN),
        ),
        before
    );
}

#[test]
fn default_paths_with_a_given_environment_and_clock() {
    let none = |_: &str| None;
    assert_eq!(
        resolve_log_paths_with(None, None, none, t0()),
        (
            p("kdpilot-20261122-010203.log"),
            p("kdpilot-20261122-010203.jsonl")
        )
    );
    assert_eq!(
        default_log_file_name(t0()),
        p("kdpilot-20261122-010203.log")
    );
    let env = |k: &str| (k == ENV_LOG_FILE_OPEN).then(|| OsString::from("C:\\dbg\\kd.log"));
    assert_eq!(
        resolve_log_paths_with(None, None, env, t0()).0,
        p("C:\\dbg\\kd.log")
    );
    assert_eq!(json_path_for(Path::new("night")), p("night.jsonl"));
    assert_eq!(
        json_path_for(Path::new("dir/night.txt")),
        p("dir/night.jsonl")
    );
    // --log x.jsonl must not make the JSON log the text log.
    assert_eq!(json_path_for(Path::new("x.jsonl")), p("x.jsonl.jsonl"));
}

#[test]
fn hit_records_compare_after_a_round_trip() {
    // A hit with every optional part empty still reads back.
    let mut h: HitRecord = x64_hit(1);
    h.frames[0].module = None;
    h.frames[0].function = None;
    h.frames[0].args.clear();
    let back = LogLine::parse(std::str::from_utf8(&json_line(&h).unwrap()).unwrap()).unwrap();
    assert_eq!(back, LogLine::Hit(h));
    let e: &EventRecord = &events()[9];
    assert_eq!(
        LogLine::parse(std::str::from_utf8(&json_line(e).unwrap()).unwrap()).unwrap(),
        LogLine::Event(e.clone())
    );
}
