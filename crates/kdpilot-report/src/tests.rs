//! Reading logs written by [`crate::synth`]: grouping, drivers, boots, bad input, the forms.
//! Expected values come from what each test wrote, never from the report itself.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kdpilot_capture::record::LogLine;

use crate::synth::{allocator_frames, at, syscall_frames, SynthCapture, SynthFrame};
use crate::*;

fn driver_stack(driver: &str, function: &str, offset: u64) -> Vec<SynthFrame> {
    let mut frames = allocator_frames();
    frames.push(SynthFrame::new(driver, function, 0x1000, offset));
    frames.push(SynthFrame::new(
        driver,
        "DispatchDeviceControl",
        0x3400,
        0x2f,
    ));
    frames.extend(syscall_frames());
    frames
}

fn call_sites(stack: &[SynthFrame]) -> Vec<String> {
    stack.iter().map(|f| f.call_site().unwrap()).collect()
}

/// A log file in a fresh temporary directory, written by `write`.
fn log_file(
    dir: &tempfile::TempDir,
    name: &str,
    write: impl FnOnce(&mut SynthCapture<Vec<u8>>) -> std::io::Result<()>,
) -> PathBuf {
    let mut capture = SynthCapture::new(Vec::new(), at(0)).unwrap();
    write(&mut capture).unwrap();
    let path = dir.path().join(name);
    fs::write(&path, capture.into_inner()).unwrap();
    path
}

fn addresses(path: &Path) -> Vec<Vec<u64>> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|l| match LogLine::parse(l) {
            Ok(LogLine::Hit(h)) => Some(h.frames.iter().map(|f| f.address).collect()),
            _ => None,
        })
        .collect()
}

#[test]
fn the_same_stack_in_two_boots_is_one_stack() {
    let dir = tempfile::tempdir().unwrap();
    let stack = driver_stack("leakydrv", "LeakyAllocate", 0x46);
    let path = log_file(&dir, "a.jsonl", |c| {
        c.boot()?;
        c.hit(&stack, 64)?;
        c.advance(Duration::from_secs(60));
        c.reboot()?;
        c.boot()?;
        c.hit(&stack, 64)?;
        c.hit(&stack, 32)
    });
    // The frames really are at other addresses in the second boot.
    let addrs = addresses(&path);
    assert_eq!(addrs.len(), 3);
    assert!(addrs[0].iter().zip(&addrs[1]).all(|(a, b)| a != b));

    let report = read_logs(&[path]).unwrap();
    assert_eq!(report.summary.hits, 3);
    assert_eq!(report.summary.bytes, 160);
    assert_eq!(report.summary.boots, 2);
    assert_eq!(report.stacks.len(), 1);
    let s = &report.stacks[0];
    assert_eq!(s.frames, call_sites(&stack));
    assert_eq!((s.hits, s.bytes, s.min_size, s.max_size), (3, 160, 32, 64));
    assert_eq!((s.first_seen, s.last_seen), (at(0), at(60)));
    let per_boot: Vec<(usize, u64)> = s.per_boot.iter().map(|c| (c.boot, c.hits)).collect();
    assert_eq!(per_boot, [(1, 1), (2, 2)]);
}

#[test]
fn offsets_and_names_make_stacks_different_addresses_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let a = driver_stack("leakydrv", "LeakyAllocate", 0x46);
    let b = driver_stack("leakydrv", "LeakyAllocate", 0x4b);
    let unnamed = {
        let mut s = allocator_frames();
        s.push(SynthFrame::unnamed("nosyms", 0x1234));
        s
    };
    let outside = {
        let mut s = allocator_frames();
        s.push(SynthFrame::outside(0xffff_9000_0000_1000));
        s
    };
    let path = log_file(&dir, "a.jsonl", |c| {
        for _ in 0..2 {
            c.boot()?;
            c.hit(&a, 64)?;
            c.hit(&b, 64)?;
            c.hit(&unnamed, 64)?;
            c.hit(&outside, 64)?;
            c.reboot()?;
        }
        Ok(())
    });
    let report = read_logs(&[path]).unwrap();
    // a, b and the module+offset stack group across the boots; the stack with a frame
    // outside every module is keyed by its address, which moved: two stacks.
    assert_eq!(report.stacks.len(), 5);
    let hits_of = |frames: &[String]| {
        report
            .stacks
            .iter()
            .find(|s| s.frames == frames)
            .map(|s| s.hits)
    };
    assert_eq!(hits_of(&call_sites(&a)), Some(2));
    assert_eq!(hits_of(&call_sites(&b)), Some(2));
    let mut u = call_sites(&allocator_frames());
    u.push("nosyms+0x1234".into());
    assert_eq!(hits_of(&u), Some(2));
    let outside_stacks: Vec<_> = report
        .stacks
        .iter()
        .filter(|s| s.frames.last().is_some_and(|f| f.starts_with("0x")))
        .collect();
    assert_eq!(outside_stacks.len(), 2);
    assert!(outside_stacks.iter().all(|s| s.hits == 1));
}

#[test]
fn drivers_are_the_first_frame_outside_nt_and_hal() {
    let dir = tempfile::tempdir().unwrap();
    let mut through_hal = allocator_frames();
    through_hal.push(SynthFrame::new("hal", "HalpDmaAllocate", 0x5000, 0x10));
    through_hal.push(SynthFrame::outside(0xffff_9000_0000_2000));
    through_hal.push(SynthFrame::new(
        "ndis",
        "NdisAllocateMemoryWithTagPriority",
        0x9000,
        0x3c,
    ));
    through_hal.push(SynthFrame::new("netfoo", "RxIndicate", 0x2000, 0x99));
    let kernel_only = {
        let mut s = allocator_frames();
        s.extend(syscall_frames());
        s
    };
    let leaky = driver_stack("leakydrv", "LeakyAllocate", 0x46);
    let path = log_file(&dir, "a.jsonl", |c| {
        c.boot()?;
        for _ in 0..3 {
            c.hit(&leaky, 100)?;
        }
        c.hit(&through_hal, 10)?;
        c.hit(&kernel_only, 1)?;
        c.hit(&[], 7)
    });
    let report = read_logs(&[path]).unwrap();
    let by_driver = |d: &str| report.drivers.iter().find(|x| x.name == d).unwrap();
    assert_eq!(report.stacks[0].driver, "leakydrv");
    assert_eq!(report.stacks[0].driver_frame, Some(3));
    let hal = report
        .stacks
        .iter()
        .find(|s| s.frames.iter().any(|f| f.starts_with("hal!")))
        .unwrap();
    assert_eq!(hal.driver, "ndis");
    assert_eq!(hal.driver_frame, Some(5));
    assert_eq!(by_driver("leakydrv").hits, 3);
    assert_eq!(by_driver("leakydrv").bytes, 300);
    assert_eq!(by_driver("ndis").hits, 1);
    assert_eq!(by_driver(driver::KERNEL).bytes, 1);
    assert_eq!(by_driver(driver::NO_FRAMES).bytes, 7);
    assert_eq!(report.drivers[0].name, "leakydrv");
    assert_eq!(report.summary.drivers, 4);
}

#[test]
fn an_incomplete_last_line_is_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let stack = driver_stack("leakydrv", "LeakyAllocate", 0x46);
    let path = log_file(&dir, "a.jsonl", |c| {
        c.boot()?;
        c.hit(&stack, 64)?;
        c.hit(&stack, 64)?;
        // The capture was killed in the middle of a record.
        let line = kdpilot_capture::log::json_line(&LogLine::Hit(c.hit_record(&stack, 64)))?;
        c.raw(&line[..line.len() / 2])
    });
    let report = read_logs(&[&path]).unwrap();
    assert_eq!(report.summary.hits, 2);
    assert_eq!(report.summary.bad_lines, 1);
    assert!(report.files[0].incomplete_last_line);
    assert_eq!(report.warnings.len(), 1);
    let w = &report.warnings[0];
    // connected, boot, armed, two hits: the partial record is line 6.
    assert_eq!((w.file.as_path(), w.line), (path.as_path(), Some(6)));
    assert!(
        w.message.contains("the last line is not a complete record"),
        "{w}"
    );
}

#[test]
fn a_bad_line_in_the_middle_is_skipped_with_its_number() {
    let dir = tempfile::tempdir().unwrap();
    let stack = driver_stack("leakydrv", "LeakyAllocate", 0x46);
    let path = log_file(&dir, "a.jsonl", |c| {
        c.boot()?;
        c.hit(&stack, 64)?;
        c.raw(b"{\"hit\": 2, \"boot\": 1}\n")?;
        c.raw(b"\x00\x00\x00\x00\n")?;
        c.raw(b"\n")?;
        c.hit(&stack, 64)
    });
    let report = read_logs(&[&path]).unwrap();
    assert_eq!(report.summary.hits, 2);
    assert_eq!(report.summary.bad_lines, 2);
    assert!(!report.files[0].incomplete_last_line);
    let lines: Vec<Option<u64>> = report.warnings.iter().map(|w| w.line).collect();
    assert_eq!(lines, [Some(5), Some(6)]);
    assert_eq!(
        report.warnings[0].to_string(),
        format!(
            "{}:5: skipped: not a record: missing field `time`",
            path.display()
        )
    );
}

#[test]
fn many_bad_lines_are_counted_not_all_listed() {
    let dir = tempfile::tempdir().unwrap();
    let stack = driver_stack("leakydrv", "LeakyAllocate", 0x46);
    let path = log_file(&dir, "a.jsonl", |c| {
        c.boot()?;
        for _ in 0..50 {
            c.raw(b"garbage\n")?;
        }
        c.hit(&stack, 64)
    });
    let report = read_logs(&[path]).unwrap();
    assert_eq!(report.summary.bad_lines, 50);
    assert_eq!(
        report.warnings.len(),
        aggregate::WARNINGS_PER_FILE as usize + 1
    );
    let last = report.warnings.last().unwrap();
    assert_eq!(last.line, None);
    assert_eq!(
        last.message,
        "30 more lines that are not records were skipped"
    );
}

#[test]
fn records_of_unknown_kinds_are_counted_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let stack = driver_stack("leakydrv", "LeakyAllocate", 0x46);
    let path = log_file(&dir, "a.jsonl", |c| {
        c.boot()?;
        c.hit(&stack, 64)?;
        // A record shaped like a hit but of another kind must not count as a hit.
        let mut free = serde_json::to_value(c.hit_record(&stack, 64))?;
        free["kind"] = "free".into();
        c.raw(format!("{free}\n").as_bytes())?;
        c.raw(b"{\"event\":\"frobnicated\",\"time\":\"2026-11-22T01:00:00Z\"}\n")?;
        c.hit(&stack, 64)
    });
    let report = read_logs(&[path]).unwrap();
    assert_eq!(report.summary.hits, 2);
    assert_eq!(report.summary.ignored_records, 2);
    assert_eq!(report.summary.bad_lines, 0);
    assert_eq!(report.ignored.get("free"), Some(&1));
    assert_eq!(report.ignored.get("event frobnicated"), Some(&1));
    assert!(report.warnings.is_empty());
}

#[test]
fn files_that_are_not_logs_are_errors_that_name_them() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("night.log");
    fs::write(
        &text,
        "[2026-11-22 01:02:03.456 UTC] connected to com:port=/dev/ttyS0 (kdpilot 0.1.0)\n",
    )
    .unwrap();
    let e = read_logs(&[&text]).unwrap_err();
    assert!(matches!(e, ReportError::NotALog { lines: 1, .. }), "{e:?}");
    assert!(e.is_input_error());
    let message = e.to_string();
    assert!(message.contains(&text.display().to_string()), "{message}");
    assert!(
        message.contains("give the .jsonl file beside it"),
        "{message}"
    );

    let missing = dir.path().join("missing.jsonl");
    let e = read_logs(&[&missing]).unwrap_err();
    assert!(matches!(e, ReportError::Open { .. }), "{e:?}");
    assert!(e.to_string().contains("missing.jsonl"), "{e}");

    let e = read_logs(&[dir.path().to_path_buf()]).unwrap_err();
    assert!(e.to_string().contains("it is a directory"), "{e}");

    // An empty file, or one with only a record in flight, is a log with nothing in it yet.
    let empty = dir.path().join("empty.jsonl");
    fs::write(&empty, "").unwrap();
    assert_eq!(read_logs(&[empty]).unwrap().summary.hits, 0);
    let in_flight = dir.path().join("in-flight.jsonl");
    fs::write(&in_flight, "{\"event\":\"connec").unwrap();
    let report = read_logs(&[in_flight]).unwrap();
    assert!(report.files[0].incomplete_last_line);
}

#[test]
fn boots_are_numbered_across_captures_and_files() {
    let dir = tempfile::tempdir().unwrap();
    let stack = driver_stack("leakydrv", "LeakyAllocate", 0x46);
    // Night 1: boots 1 and 2, a lost link in boot 2 (same capture), then a second capture
    // appended to the same file (boot numbers restart at 1).
    let night1 = log_file(&dir, "night1.jsonl", |c| {
        c.boot()?;
        c.hit(&stack, 64)?;
        c.reboot()?;
        c.boot()?;
        c.hit(&stack, 64)?;
        c.link_lost()?;
        c.connected()?;
        c.hit(&stack, 64)?;
        c.detached()?;
        let mut second = SynthCapture::new(Vec::new(), at(7200))?;
        second.boot()?;
        second.hit(&stack, 64)?;
        c.raw(&second.into_inner())
    });
    // Night 2: boots 1 to 3 of its own capture.
    let night2 = log_file(&dir, "night2.jsonl", |c| {
        for _ in 0..3 {
            c.boot()?;
            c.hit(&stack, 64)?;
            c.hit(&stack, 64)?;
            c.reboot()?;
        }
        Ok(())
    });
    let report = read_logs(&[&night1, &night2]).unwrap();
    assert_eq!(report.summary.captures, 3);
    assert_eq!(report.summary.boots, 6);
    let boots: Vec<(usize, usize, u64, u64)> = report
        .boots
        .iter()
        .map(|b| (b.file, b.capture, b.boot, b.hits))
        .collect();
    assert_eq!(
        boots,
        [
            (0, 1, 1, 1),
            (0, 1, 2, 2),
            (0, 2, 1, 1),
            (1, 3, 1, 2),
            (1, 3, 2, 2),
            (1, 3, 3, 2)
        ]
    );
    let per_boot: Vec<(usize, u64)> = report.stacks[0]
        .per_boot
        .iter()
        .map(|c| (c.boot, c.hits))
        .collect();
    assert_eq!(per_boot, [(1, 1), (2, 2), (3, 1), (4, 2), (5, 2), (6, 2)]);
    assert_eq!(
        report.boots[1].kernel_base,
        Some(synth::module_base("nt", 2))
    );
    assert_eq!(report.boots[1].build, Some(19041));

    // The same file twice is read once.
    let again = read_logs(&[&night1, &night1]).unwrap();
    assert_eq!(again.summary.hits, 4);
    assert_eq!(again.warnings.len(), 1);
    assert!(again.warnings[0].message.contains("given more than once"));
}

#[test]
fn hit_numbers_going_back_start_a_new_capture() {
    let dir = tempfile::tempdir().unwrap();
    let stack = driver_stack("leakydrv", "LeakyAllocate", 0x46);
    let path = log_file(&dir, "a.jsonl", |c| {
        c.boot()?;
        c.hit(&stack, 64)?;
        c.hit(&stack, 64)?;
        // Another capture's hits, appended without its events.
        let mut other = SynthCapture::new(Vec::new(), at(100))?;
        other.boot()?;
        let hit = other.hit_record(&stack, 64);
        c.raw(&kdpilot_capture::log::json_line(&LogLine::Hit(hit))?)
    });
    let report = read_logs(&[path]).unwrap();
    assert_eq!(report.summary.captures, 2);
    assert_eq!(report.summary.boots, 2);
}

#[test]
fn ranks_by_hits_and_by_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let many = driver_stack("leakydrv", "Small", 0x10);
    let big = driver_stack("netfoo", "Big", 0x20);
    let path = log_file(&dir, "a.jsonl", |c| {
        c.boot()?;
        for _ in 0..10 {
            c.hit(&many, 16)?;
        }
        for _ in 0..2 {
            c.hit(&big, 4096)?;
        }
        Ok(())
    });
    let report = read_logs(&[path]).unwrap();
    assert_eq!(report.stacks[0].frames, call_sites(&many));
    assert_eq!(report.stacks[0].rank, 1);
    assert_eq!(report.stacks_by_bytes, [2, 1]);
    assert_eq!(report.drivers[0].name, "leakydrv");
}

#[test]
fn folded_lines_are_root_first_with_counts() {
    let dir = tempfile::tempdir().unwrap();
    let a = driver_stack("leakydrv", "LeakyAllocate", 0x46);
    let b = driver_stack("netfoo", "RxAllocate", 0x10);
    let path = log_file(&dir, "a.jsonl", |c| {
        c.boot()?;
        c.hit(&a, 64)?;
        c.hit(&b, 64)?;
        c.hit(&a, 64)
    });
    let report = read_logs(&[path]).unwrap();
    let folded = render_folded(&report);
    let expect = |stack: &[SynthFrame], n: u64| {
        let mut names = call_sites(stack);
        names.reverse();
        format!("{} {n}", names.join(";"))
    };
    let mut lines = [expect(&a, 2), expect(&b, 1)];
    lines.sort();
    assert_eq!(folded, format!("{}\n", lines.join("\n")));
    assert!(folded.starts_with("nt!KiSystemServiceCopyEnd+0x25;nt!NtDeviceIoControlFile+0x56;"));
}

#[test]
fn json_has_the_numbers_and_hex_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let a = driver_stack("leakydrv", "LeakyAllocate", 0x46);
    let path = log_file(&dir, "a.jsonl", |c| {
        c.boot()?;
        c.hit(&a, 64)?;
        c.hit(&a, 64)
    });
    let report = read_logs(&[path]).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&render_json(&report, &ReportOptions::default())).unwrap();
    assert_eq!(json["summary"]["hits"], 2);
    assert_eq!(json["summary"]["first"], "2026-11-22T01:00:00.000Z");
    assert_eq!(
        json["stacks"][0]["frames"][3],
        "leakydrv!LeakyAllocate+0x46"
    );
    assert_eq!(json["stacks"][0]["driver"], "leakydrv");
    assert_eq!(json["stacks"][0]["per_boot"][0]["hits"], 2);
    assert_eq!(
        json["boots"][0]["kernel_base"],
        format!("{:#x}", synth::module_base("nt", 1))
    );
}

#[test]
fn top_limits_the_listed_stacks() {
    let dir = tempfile::tempdir().unwrap();
    let stacks = synth::stacks(12);
    let path = log_file(&dir, "a.jsonl", |c| {
        c.boot()?;
        for (i, s) in stacks.iter().enumerate() {
            for _ in 0..=i {
                c.hit(s, 8)?;
            }
        }
        Ok(())
    });
    let report = read_logs(&[path]).unwrap();
    let options = ReportOptions {
        top: 3,
        ..ReportOptions::default()
    };
    let json: serde_json::Value = serde_json::from_str(&render_json(&report, &options)).unwrap();
    assert_eq!(json["stacks"].as_array().unwrap().len(), 3);
    assert_eq!(json["summary"]["unique_stacks"], 12);
    assert_eq!(json["stacks"][0]["hits"], 12);
    let text = render_text(&report, &options);
    assert!(text.contains("Top 3 stacks by hits (of 12;"), "{text}");
    assert!(text.contains("\n#3 "), "{text}");
    assert!(!text.contains("\n#4 "), "{text}");
    let all = ReportOptions {
        top: 0,
        ..ReportOptions::default()
    };
    assert!(render_text(&report, &all).contains("\n#12 "));
    for line in render_text(&report, &all).lines() {
        assert!(line.chars().count() <= text::WIDTH, "too wide: {line}");
    }
}

#[test]
fn the_html_page_is_self_contained_and_written_atomically() {
    let dir = tempfile::tempdir().unwrap();
    let a = driver_stack("leakydrv", "LeakyAllocate", 0x46);
    let path = log_file(&dir, "a.jsonl", |c| {
        c.boot()?;
        for i in 0..20 {
            c.hit(&a, 64)?;
            c.advance(Duration::from_secs(30 + i));
        }
        c.reboot()?;
        c.boot()?;
        c.hit(&a, 64)
    });
    let out = dir.path().join("report.html");
    fs::write(&out, "old page").unwrap();
    let options = ReportOptions {
        refresh: Some(Duration::from_secs(60)),
        ..ReportOptions::default()
    };
    let summary = write_html_report(&[path], &out, &options).unwrap();
    assert_eq!(summary.hits, 21);
    let page = fs::read_to_string(&out).unwrap();
    assert!(page.starts_with("<!DOCTYPE html>"));
    assert!(page.contains("<meta http-equiv=\"refresh\" content=\"60\">"));
    assert!(page.contains("<li class=\"driver\">leakydrv!LeakyAllocate+0x46</li>"));
    assert!(page.contains("<polyline class=\"series\" data-stack=\"1\""));
    assert!(page.contains("<title>boot 2 begins</title>"));
    if HAS_FLAMEGRAPH {
        let flame = page.find("<svg version=\"1.1\"").unwrap();
        let timeline = page.find("<svg class=\"timeline\"").unwrap();
        assert!(flame < timeline, "the flame graph must be the first svg");
        assert!(page.contains("id=\"frames\""));
        assert!(!page.contains("<!DOCTYPE svg"));
    }
    for external in ["src=\"http", "href=\"http", "url(http", "@import", "<link"] {
        assert!(!page.contains(external), "{external}");
    }
    // Only the page is left in the directory: the temporary file was renamed.
    let mut names: Vec<String> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["a.jsonl", "report.html"]);
}

#[test]
fn a_log_still_being_written_can_be_reported() {
    let dir = tempfile::tempdir().unwrap();
    let a = driver_stack("leakydrv", "LeakyAllocate", 0x46);
    let path = log_file(&dir, "a.jsonl", |c| {
        c.boot()?;
        c.hit(&a, 64)
    });
    let out = dir.path().join("live.html");
    write_html_report(&[&path], &out, &ReportOptions::default()).unwrap();
    // A record half written, then completed.
    let more = {
        let mut c = SynthCapture::new(Vec::new(), at(10)).unwrap();
        c.hit_record(&a, 64)
    };
    let line = kdpilot_capture::log::json_line(&LogLine::Hit(more)).unwrap();
    let mut f = fs::OpenOptions::new().append(true).open(&path).unwrap();
    f.write_all(&line[..100]).unwrap();
    let s = write_html_report(&[&path], &out, &ReportOptions::default()).unwrap();
    assert_eq!((s.hits, s.bad_lines), (1, 1));
    f.write_all(&line[100..]).unwrap();
    let s = write_html_report(&[path], &out, &ReportOptions::default()).unwrap();
    assert_eq!((s.hits, s.bad_lines), (2, 0));
}

/// The stack of the report whose frames are `stack`'s.
fn find<'a>(stacks: &'a [StackInfo], stack: &[SynthFrame]) -> Option<&'a StackInfo> {
    let sites = call_sites(stack);
    stacks.iter().find(|s| s.frames == sites)
}

#[test]
fn outstanding_names_exactly_the_leaking_stacks() {
    let dir = tempfile::tempdir().unwrap();
    let freed = driver_stack("netfoo", "AllocateBuffer", 0x20);
    let leaky = driver_stack("leakydrv", "LeakyAllocate", 0x46);
    let rare = driver_stack("fsfilt", "AllocateContext", 0x1c);
    let freer = driver_stack("netfoo", "FreeBuffer", 0x10);
    let path = log_file(&dir, "a.jsonl", |c| {
        c.boot()?;
        // 40 allocations of `freed`, all freed; 10 of `leaky`, 3 never freed (the 2nd, 5th
        // and 9th); 4 of `rare` of 100 bytes, the last never freed; one failed allocation.
        let mut leaky_n = 0;
        for i in 0..40u64 {
            c.hit(&freed, 256)?;
            let h = c.hit_number();
            c.allocated(h, false)?;
            if i % 4 == 0 {
                c.advance(Duration::from_secs(60));
                c.hit(&leaky, 64)?;
                let l = c.hit_number();
                c.allocated(l, false)?;
                leaky_n += 1;
                if ![2, 5, 9].contains(&leaky_n) {
                    c.free(l, &freer)?;
                }
            }
            if i % 10 == 9 {
                c.hit(&rare, 100)?;
                let r = c.hit_number();
                c.allocated(r, false)?;
                if i != 39 {
                    c.free(r, &freer)?;
                }
            }
            c.free(h, &freer)?;
        }
        c.hit(&leaky, 64)?;
        let failed = c.hit_number();
        c.allocated(failed, true)?;
        c.advance(Duration::from_secs(3600));
        c.detached()
    });

    let o = read_outstanding(&[&path]).unwrap();
    let r = &o.report;
    assert_eq!(r.stacks.len(), 2, "{:#?}", r.stacks);
    let l = find(&r.stacks, &leaky).unwrap();
    assert_eq!((l.rank, l.hits, l.bytes), (1, 3, 192));
    let s = find(&r.stacks, &rare).unwrap();
    assert_eq!((s.rank, s.hits, s.bytes), (2, 1, 100));
    assert!(find(&r.stacks, &freed).is_none());
    assert_eq!((r.summary.hits, r.summary.bytes), (4, 292));
    assert_eq!(r.drivers.len(), 2);
    assert_eq!(r.drivers[0].name, "leakydrv");
    assert!(o.ended_boots.is_empty());
    // The 2nd leaky allocation at 2 min, the 9th at 9 min; the log ends at 10 min + 1 h.
    assert_eq!(l.first_seen, at(120));
    assert_eq!(l.last_seen, at(540));
    assert_eq!(o.end, Some(at(600 + 3600)));
    let p = o.pairing;
    assert_eq!(p.hits, 40 + 10 + 4 + 1);
    assert_eq!(p.allocated_records, 55);
    assert_eq!(p.with_address, 54);
    assert_eq!(p.failed, 1);
    assert_eq!(p.freed, 50);
    assert_eq!(p.outstanding, 4);
    assert_eq!(
        (p.unpaired, p.unknown_frees, p.outstanding_in_ended_boots),
        (0, 0, 0)
    );

    let text = render_outstanding_text(&o, &ReportOptions::default());
    assert!(
        text.starts_with(
            "kdpilot report --outstanding: 4 allocations of tag Leak never freed, 292 B (2 stacks)"
        ),
        "{text}"
    );
    // Oldest 1h08m (from 2 min to 1h10m), newest 1h01m.
    assert!(text.contains("1h08m"), "{text}");
    assert!(text.contains("age 1h01m .. 1h08m"), "{text}");
    assert!(text.contains("leakydrv!LeakyAllocate+0x46"), "{text}");
    assert!(!text.contains("netfoo!AllocateBuffer"), "{text}");
    assert!(
        text.lines().all(|l| l.chars().count() <= text::WIDTH),
        "{text}"
    );
    // The folded form of the outstanding set is the leak picture: 2 stacks, by allocations.
    let folded = render_folded(r);
    assert_eq!(folded.lines().count(), 2);
    assert!(folded.lines().any(|l| l.ends_with(" 3")), "{folded}");
    let json: serde_json::Value =
        serde_json::from_str(&render_outstanding_json(&o, &ReportOptions::default())).unwrap();
    assert_eq!(json["pairing"]["outstanding"], 4);
    assert_eq!(json["report"]["stacks"][0]["hits"], 3);
}

#[test]
fn a_reboot_moves_the_previous_boots_outstanding_to_their_own_section() {
    let dir = tempfile::tempdir().unwrap();
    let leaky = driver_stack("leakydrv", "LeakyAllocate", 0x46);
    let boot_only = driver_stack("usbbar", "StartDevice", 0x88);
    let freer = driver_stack("leakydrv", "Cleanup", 0x10);
    let path = log_file(&dir, "a.jsonl", |c| {
        c.boot()?;
        for _ in 0..2 {
            c.hit(&leaky, 64)?;
            c.allocated(c.hit_number(), false)?;
        }
        c.hit(&boot_only, 32)?;
        c.allocated(c.hit_number(), false)?;
        c.hit(&leaky, 64)?;
        c.allocated(c.hit_number(), false)?;
        c.free(c.hit_number(), &freer)?;
        c.advance(Duration::from_secs(1800));
        c.reboot()?;
        c.boot()?;
        c.hit(&leaky, 64)?;
        c.allocated(c.hit_number(), false)?;
        c.advance(Duration::from_secs(600));
        c.detached()
    });
    let o = read_outstanding(&[&path]).unwrap();
    // The main table: boot 2 only.
    assert_eq!(o.report.stacks.len(), 1);
    let s = &o.report.stacks[0];
    assert_eq!(s.frames, call_sites(&leaky));
    assert_eq!((s.hits, s.bytes), (1, 64));
    assert_eq!(s.per_boot.len(), 1);
    assert_eq!(s.per_boot[0].boot, 2);
    // Boot 1 ended with 2 leaky and 1 boot_only outstanding.
    assert_eq!(o.ended_boots.len(), 1);
    let b = &o.ended_boots[0];
    assert_eq!((b.boot, b.capture, b.log_boot), (1, 1, 1));
    assert_eq!((b.allocations, b.bytes), (3, 160));
    assert_eq!(b.ended, Some(at(1800)));
    assert_eq!(find(&b.stacks, &leaky).unwrap().hits, 2);
    assert_eq!(find(&b.stacks, &boot_only).unwrap().hits, 1);
    assert_eq!(o.pairing.outstanding, 1);
    assert_eq!(o.pairing.outstanding_in_ended_boots, 3);
    assert_eq!(o.report.boots[0].hits, 0);
    assert_eq!(o.report.boots[1].hits, 1);

    let text = render_outstanding_text(&o, &ReportOptions::default());
    let section = text
        .find("Outstanding when boot 1 ended")
        .unwrap_or_else(|| panic!("{text}"));
    assert!(text[section..].contains("they are gone with the reboot"));
    assert!(text[section..].contains("= #1"), "{text}");
    assert!(
        text[section..].contains("usbbar!StartDevice+0x88"),
        "{text}"
    );
    assert!(!text[..section].contains("usbbar"), "{text}");
}

#[test]
fn a_new_boot_without_a_reboot_record_ends_the_previous_one() {
    let dir = tempfile::tempdir().unwrap();
    let leaky = driver_stack("leakydrv", "LeakyAllocate", 0x46);
    let path = log_file(&dir, "a.jsonl", |c| {
        c.boot()?;
        c.hit(&leaky, 64)?;
        c.allocated(c.hit_number(), false)?;
        c.advance(Duration::from_secs(60));
        c.link_lost()?;
        c.connected()?;
        c.boot()?;
        c.hit(&leaky, 64)?;
        c.allocated(c.hit_number(), false)
    });
    let o = read_outstanding(&[&path]).unwrap();
    assert_eq!(o.pairing.outstanding, 1);
    assert_eq!(o.ended_boots.len(), 1);
    assert_eq!(o.ended_boots[0].ended, Some(at(60)));
}

#[test]
fn same_stack_as_hits_count_under_the_named_stack() {
    let dir = tempfile::tempdir().unwrap();
    let a = driver_stack("leakydrv", "LeakyAllocate", 0x46);
    let b = driver_stack("netfoo", "AllocateBuffer", 0x20);
    let first = log_file(&dir, "1.jsonl", |c| {
        c.boot()?;
        c.hit(&a, 64)?; // hit 1
        c.hit(&b, 32)?; // hit 2
        c.hit(&a, 64)?; // hit 3
        c.hit_same_stack_as(1, 64)?; // 4: a
        c.hit_same_stack_as(2, 32)?; // 5: b
        c.hit_same_stack_as(1, 64)?; // 6: a
        c.allocated(6, false)?;
        c.hit_same_stack_as(77, 16)?; // 7: not in the log
        c.hit_same_stack_as(77, 16) // 8: the same unknown stack
    });
    // A second capture: hit numbers restart, hit 1 is stack b there.
    let second = log_file(&dir, "2.jsonl", |c| {
        c.boot()?;
        c.hit(&b, 32)?;
        c.hit_same_stack_as(1, 32)
    });
    let report = read_logs(&[&first, &second]).unwrap();
    assert_eq!(report.summary.captures, 2);
    assert_eq!(report.stacks.len(), 3, "{:#?}", report.stacks);
    assert_eq!(find(&report.stacks, &a).unwrap().hits, 4);
    assert_eq!(find(&report.stacks, &b).unwrap().hits, 4);
    let unknown = report
        .stacks
        .iter()
        .find(|s| s.frames == ["(unknown: same stack as hit 77, not in the log)"])
        .unwrap();
    assert_eq!((unknown.hits, unknown.bytes), (2, 32));
    assert_eq!(report.summary.same_stack_hits, 6);
    assert_eq!(report.summary.same_stack_unresolved, 2);
    assert_eq!(report.summary.unique_stacks, 3);
    let leaky = report
        .drivers
        .iter()
        .find(|d| d.name == "leakydrv")
        .unwrap();
    assert_eq!(leaky.hits, 4);
    let folded = render_folded(&report);
    assert!(
        folded.lines().any(|l| l.ends_with("leakydrv!LeakyAllocate+0x46;nt!ExAllocatePoolWithTag+0x3b;nt!ExAllocateHeapPool+0x1a2;nt!ExAllocateHeapSpecialPool 4")),
        "{folded}"
    );

    // Outstanding: hit 6 (same_stack_as 1) is outstanding under stack a.
    let o = read_outstanding(&[&first, &second]).unwrap();
    assert_eq!(o.report.stacks.len(), 1);
    assert_eq!(o.report.stacks[0].frames, call_sites(&a));
    assert_eq!(o.pairing.unpaired, 10 - 1);
}

#[test]
fn outstanding_without_allocated_records_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let stack = driver_stack("leakydrv", "LeakyAllocate", 0x46);
    let path = log_file(&dir, "a.jsonl", |c| {
        c.boot()?;
        c.hit(&stack, 64)?;
        c.free(1, &stack)
    });
    let err = read_outstanding(&[&path]).unwrap_err();
    assert!(matches!(err, ReportError::NoAllocations));
    assert!(err.is_input_error());
    assert!(
        err.to_string().contains("kdpilot capture --track-frees"),
        "{err}"
    );
}

#[test]
fn unknown_frees_and_unpaired_hits_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let stack = driver_stack("leakydrv", "LeakyAllocate", 0x46);
    let path = log_file(&dir, "a.jsonl", |c| {
        c.boot()?;
        c.hit(&stack, 64)?; // 1: paired, freed
        c.allocated(1, false)?;
        c.hit(&stack, 64)?; // 2: no address learnt
        c.hit(&stack, 64)?; // 3: outstanding
        c.allocated(3, false)?;
        c.free(1, &stack)?;
        c.free(1, &stack)?; // freed twice: unknown
        c.free(99, &stack)?; // never seen
        c.allocated(98, false) // never seen
    });
    let o = read_outstanding(&[&path]).unwrap();
    let p = o.pairing;
    assert_eq!((p.freed, p.outstanding, p.unpaired), (1, 1, 1));
    assert_eq!((p.unknown_frees, p.unknown_allocated), (2, 1));
    let text = render_outstanding_text(&o, &ReportOptions::default());
    assert!(
        text.contains(
            "1 hit without a learnt address is not in this report (captured without --track-frees"
        ),
        "{text}"
    );
    assert!(
        text.contains("2 free records whose hit is not in the log"),
        "{text}"
    );
}

#[test]
fn sampling_and_special_pool_exhaustion_are_notes() {
    let dir = tempfile::tempdir().unwrap();
    let stack = driver_stack("leakydrv", "LeakyAllocate", 0x46);
    let path = log_file(&dir, "a.jsonl", |c| {
        c.boot()?;
        c.hit(&stack, 64)?;
        c.advance(Duration::from_secs(60));
        c.sampled(8, 0)?;
        c.hit(&stack, 64)?;
        c.advance(Duration::from_secs(60));
        c.sampled(1, 412)?;
        c.special_pool_exhausted(600, false)?;
        c.detached()
    });
    let report = read_logs(&[&path]).unwrap();
    assert_eq!(report.notes.len(), 3);
    assert_eq!(report.summary.skipped_hits, 412);
    assert_eq!(report.summary.max_one_in, 8);
    assert_eq!(report.summary.special_pool_exhausted, 1);
    assert_eq!(report.notes[0].boot, Some(1));
    let text = render_text(&report, &ReportOptions::default());
    assert!(
        text.contains("Notes: the counts are incomplete\n  sampled up to 1 hit in 8, 412 hits resumed without a record; special pool exhausted 1 time\n"),
        "{text}"
    );
    assert!(text.contains("1 hit in 8 is recorded"), "{text}");
    assert!(
        text.contains("412 hits were resumed without a record"),
        "{text}"
    );
    assert!(
        text.contains("special pool exhausted: no allocation"),
        "{text}"
    );
    assert!(
        text.lines().all(|l| l.chars().count() <= text::WIDTH),
        "{text}"
    );
    let html = render_html(&report, &ReportOptions::default());
    assert!(html.contains("<section id=\"notes\">"));
    let json: serde_json::Value =
        serde_json::from_str(&render_json(&report, &ReportOptions::default())).unwrap();
    assert_eq!(json["summary"]["skipped_hits"], 412);
    assert_eq!(json["notes"].as_array().unwrap().len(), 3);
}
