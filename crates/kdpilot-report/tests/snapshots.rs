//! Snapshots of what people read: the text report and the folded stacks of two nights of
//! synthetic capture (written by `kdpilot_report::synth` with fixed times and addresses).
//!
//! The fixture: night 1 has two boots and a lost link; night 2 has three boots, a line of
//! garbage, a record of a kind this version does not know, and a last record cut in half.
//! Stacks: two leaking paths of leakydrv (one much hotter), a netfoo path, a path through the
//! HAL into ndis, a frame without symbols, and a kernel-only stack.

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use kdpilot_capture::log::json_line;
use kdpilot_capture::record::LogLine;
use kdpilot_report::synth::{allocator_frames, at, syscall_frames, SynthCapture, SynthFrame};
use kdpilot_report::{read_logs, render_folded, render_text, ReportOptions};

fn with_driver(frames: &[SynthFrame]) -> Vec<SynthFrame> {
    let mut s = allocator_frames();
    s.extend_from_slice(frames);
    s.extend(syscall_frames());
    s
}

struct Stacks {
    hot: Vec<SynthFrame>,
    cold: Vec<SynthFrame>,
    net: Vec<SynthFrame>,
    hal: Vec<SynthFrame>,
    nosyms: Vec<SynthFrame>,
    kernel: Vec<SynthFrame>,
}

fn stacks() -> Stacks {
    Stacks {
        hot: with_driver(&[
            SynthFrame::new("leakydrv", "LeakyAllocate", 0x1000, 0x46),
            SynthFrame::new("leakydrv", "LeakyWorker", 0x1200, 0x19),
            SynthFrame::new("leakydrv", "LeakyDispatch", 0x1400, 0x8b),
        ]),
        cold: with_driver(&[
            SynthFrame::new("leakydrv", "LeakyAllocate", 0x1000, 0x46),
            SynthFrame::new("leakydrv", "LeakyTimerDpc", 0x1800, 0x33),
        ]),
        net: with_driver(&[
            SynthFrame::new("netfoo", "RxAllocateBuffer", 0x4000, 0x2c),
            SynthFrame::new("netfoo", "RxIndicate", 0x4400, 0x111),
        ]),
        hal: with_driver(&[
            SynthFrame::new("hal", "HalpDmaAllocateContiguous", 0x5000, 0x10),
            SynthFrame::new("ndis", "NdisAllocateMemoryWithTagPriority", 0x9000, 0x3c),
            SynthFrame::new("netfoo", "TxPrepare", 0x4800, 0x77),
        ]),
        nosyms: with_driver(&[SynthFrame::unnamed("vendorx", 0x1a2b4)]),
        kernel: {
            let mut s = allocator_frames();
            s.push(SynthFrame::new("nt", "ObpAllocateObject", 0x7000, 0x2a1));
            s.extend(syscall_frames());
            s
        },
    }
}

/// A night: `boots` boots, each with a fixed pattern of hits a few seconds apart.
fn night(c: &mut SynthCapture<Vec<u8>>, s: &Stacks, boots: u64) -> std::io::Result<()> {
    for boot in 0..boots {
        c.boot()?;
        for i in 0..40u64 {
            c.hit(&s.hot, 64)?;
            if i % 4 == 0 {
                c.hit(&s.cold, 256)?;
            }
            if i % 10 == boot {
                c.hit(&s.net, 1500)?;
            }
            if i == 7 {
                c.hit(&s.hal, 4096)?;
            }
            if i % 20 == 3 {
                c.hit(&s.nosyms, 48)?;
            }
            if i == 30 && boot == 0 {
                c.hit(&s.kernel, 120)?;
            }
            c.advance(Duration::from_secs(13 + i % 7));
        }
        c.advance(Duration::from_secs(90));
        c.reboot()?;
        c.advance(Duration::from_secs(60));
    }
    Ok(())
}

fn fixture(dir: &tempfile::TempDir) -> Vec<PathBuf> {
    let s = stacks();
    let mut one = SynthCapture::new(Vec::new(), at(0)).unwrap();
    night(&mut one, &s, 1).unwrap();
    one.boot().unwrap();
    one.hit(&s.hot, 64).unwrap();
    one.link_lost().unwrap();
    one.advance(Duration::from_secs(30));
    one.connected().unwrap();
    one.hit(&s.hot, 64).unwrap();
    one.detached().unwrap();

    let mut two = SynthCapture::new(Vec::new(), at(86_400)).unwrap();
    night(&mut two, &s, 2).unwrap();
    two.raw(b"this line is not JSON\n").unwrap();
    let mut free = serde_json::to_value(two.hit_record(&s.hot, 64)).unwrap();
    free["kind"] = "free".into();
    two.raw(format!("{free}\n").as_bytes()).unwrap();
    night(&mut two, &s, 1).unwrap();
    let cut = json_line(&LogLine::Hit(two.hit_record(&s.hot, 64))).unwrap();
    two.raw(&cut[..cut.len() / 3]).unwrap();

    let paths = vec![
        dir.path().join("night1.jsonl"),
        dir.path().join("night2.jsonl"),
    ];
    fs::write(&paths[0], one.into_inner()).unwrap();
    fs::write(&paths[1], two.into_inner()).unwrap();
    paths
}

#[test]
fn text_report() {
    let dir = tempfile::tempdir().unwrap();
    let report = read_logs(&fixture(&dir)).unwrap();
    let options = ReportOptions {
        top: 5,
        ..ReportOptions::default()
    };
    let text = render_text(&report, &options);
    for line in text.lines() {
        assert!(line.chars().count() <= 110, "too wide: {line}");
    }
    insta::assert_snapshot!(text);
}

#[test]
fn folded_stacks() {
    let dir = tempfile::tempdir().unwrap();
    let report = read_logs(&fixture(&dir)).unwrap();
    insta::assert_snapshot!(render_folded(&report));
}

#[test]
fn warnings_name_the_lines() {
    let dir = tempfile::tempdir().unwrap();
    let paths = fixture(&dir);
    let report = read_logs(&paths).unwrap();
    let warnings: Vec<String> = report
        .warnings
        .iter()
        .map(|w| {
            w.to_string()
                .replace(&dir.path().display().to_string(), "DIR")
        })
        .collect();
    insta::assert_snapshot!(warnings.join("\n"));
}
