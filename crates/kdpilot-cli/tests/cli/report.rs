//! `kdpilot report`: the forms on stdout, the files it writes, warnings and exit codes, and the
//! HTML page as headless Chromium renders it. Logs are written by `kdpilot_report::synth`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kdpilot_report::synth::{allocator_frames, at, syscall_frames, SynthCapture, SynthFrame};

use crate::util::{run, run_in};

fn leaky() -> Vec<SynthFrame> {
    let mut s = allocator_frames();
    s.push(SynthFrame::new("leakydrv", "LeakyAllocate", 0x1000, 0x46));
    s.push(SynthFrame::new("leakydrv", "LeakyWorker", 0x1200, 0x19));
    s.extend(syscall_frames());
    s
}

fn other() -> Vec<SynthFrame> {
    let mut s = allocator_frames();
    s.push(SynthFrame::new("netfoo", "RxAllocateBuffer", 0x4000, 0x2c));
    s.extend(syscall_frames());
    s
}

/// A night with two boots: 30 hits of the leaky stack and 5 of another, a bad line, and a
/// last record cut in half.
fn night(dir: &Path) -> PathBuf {
    let mut c = SynthCapture::new(Vec::new(), at(0)).unwrap();
    for _ in 0..2 {
        c.boot().unwrap();
        for i in 0..15 {
            c.hit(&leaky(), 64).unwrap();
            if i % 6 == 0 {
                c.hit(&other(), 512).unwrap();
            }
            c.advance(Duration::from_secs(40));
        }
        c.reboot().unwrap();
        c.advance(Duration::from_secs(120));
    }
    c.raw(b"not a record\n").unwrap();
    let mut bytes = c.into_inner();
    bytes.extend_from_slice(b"{\"hit\":31,\"boot\":2,\"time\":\"2026-11");
    let path = dir.join("night.jsonl");
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn help() {
    let r = run(&["report", "--help"]);
    assert_eq!(r.code, 0);
    insta::assert_snapshot!(r.stdout);
}

#[test]
fn text_json_and_folded() {
    let dir = tempfile::tempdir().unwrap();
    let log = night(dir.path());
    let r = run_in(dir.path(), &["report", "night.jsonl"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout
            .starts_with("kdpilot report: 36 hits of tag Leak in 1 file"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("#1   30 hits"), "{}", r.stdout);
    assert!(
        r.stdout.contains("   > leakydrv!LeakyAllocate+0x46\n"),
        "{}",
        r.stdout
    );
    // Warnings name the file and line, on stderr.
    let lines = 2 * (1 + 1 + 15 + 3 + 1) + 1 + 1;
    assert!(
        r.stderr.contains(&format!(
            "kdpilot: warning: night.jsonl:{}: skipped: not JSON",
            lines
        )),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains(&format!(
            "kdpilot: warning: night.jsonl:{}: the last line is not a complete record",
            lines + 1
        )),
        "{}",
        r.stderr
    );

    let r = run_in(
        dir.path(),
        &["report", "night.jsonl", "--format", "json", "-q"],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    // -q keeps the warnings, which go to stderr: stdout is JSON alone.
    assert!(
        r.stderr
            .lines()
            .all(|l| l.starts_with("kdpilot: warning: ")),
        "{}",
        r.stderr
    );
    let json: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(json["summary"]["hits"], 36);
    assert_eq!(json["summary"]["boots"], 2);
    assert_eq!(json["stacks"][0]["driver"], "leakydrv");
    assert_eq!(json["stacks"][1]["bytes"], 6 * 512);

    let r = run(&["report", log.to_str().unwrap(), "--format", "folded", "-q"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let report = kdpilot_report::read_logs(&[&log]).unwrap();
    assert_eq!(r.stdout, kdpilot_report::render_folded(&report));
    assert!(r
        .stdout
        .contains(";leakydrv!LeakyWorker+0x19;leakydrv!LeakyAllocate+0x46;"));
    assert!(r.stdout.contains("nt!ExAllocateHeapSpecialPool 30\n"));
}

#[test]
fn writes_the_flame_graph_and_the_page() {
    let dir = tempfile::tempdir().unwrap();
    night(dir.path());
    if !kdpilot_report::HAS_FLAMEGRAPH {
        // Built without the flame graph: --svg is refused and says what to use instead.
        let r = run_in(dir.path(), &["report", "night.jsonl", "--svg", "night.svg"]);
        assert_eq!(r.code, 2);
        assert!(r.stderr.contains("--format folded"), "{}", r.stderr);
    }
    let mut args = vec![
        "report",
        "night.jsonl",
        "--html",
        "night.html",
        "--top",
        "1",
    ];
    if kdpilot_report::HAS_FLAMEGRAPH {
        args.extend(["--svg", "night.svg"]);
    }
    let r = run_in(dir.path(), &args);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("kdpilot: wrote the HTML report to night.html"),
        "{}",
        r.stderr
    );
    let page = std::fs::read_to_string(dir.path().join("night.html")).unwrap();
    assert!(page.contains("Top 1 stacks by hits"));
    assert!(page.contains("<li class=\"driver\">leakydrv!LeakyAllocate+0x46</li>"));
    if kdpilot_report::HAS_FLAMEGRAPH {
        let svg = std::fs::read_to_string(dir.path().join("night.svg")).unwrap();
        assert!(svg.starts_with("<?xml"), "{}", &svg[..100]);
        assert!(svg.contains("Allocations of pool tag Leak by stack"));
        assert!(svg.contains("leakydrv!LeakyAllocate+0x46 (30 hits"));
    } else {
        assert!(page.contains("built without flame graphs"));
    }
}

#[test]
fn bad_input_is_a_usage_error_that_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let r = run_in(dir.path(), &["report", "missing.jsonl"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr
            .starts_with("kdpilot: error: cannot open the log missing.jsonl:"),
        "{}",
        r.stderr
    );

    std::fs::write(
        dir.path().join("night.log"),
        "[2026-11-22 01:02:03.456 UTC] hello\n",
    )
    .unwrap();
    let r = run_in(dir.path(), &["report", "night.log"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("give the .jsonl file beside it"),
        "{}",
        r.stderr
    );

    let r = run(&["report"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("<FILE.jsonl>..."), "{}", r.stderr);

    let r = run(&["report", "x.jsonl", "--format", "yaml"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("possible values: text, json, folded"),
        "{}",
        r.stderr
    );
}

#[test]
fn never_overwrites_an_input() {
    let dir = tempfile::tempdir().unwrap();
    let log = night(dir.path());
    let before = std::fs::read(&log).unwrap();
    let r = run_in(
        dir.path(),
        &["report", "night.jsonl", "--html", "./night.jsonl"],
    );
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("is also an input log"), "{}", r.stderr);
    let r = run_in(
        dir.path(),
        &["report", "night.jsonl", "--svg", "a.x", "--html", "a.x"],
    );
    assert_eq!(r.code, 2);
    assert_eq!(std::fs::read(&log).unwrap(), before);
}

/// A capture with `--track-frees` over two boots: in each, 12 leaky allocations of which the
/// 3rd, 7th and 11th are never freed, and 4 others all freed; a reboot between them.
fn tracked_night(dir: &Path) -> PathBuf {
    let mut c = SynthCapture::new(Vec::new(), at(0)).unwrap();
    let freer = other();
    for boot in 0..2 {
        c.boot().unwrap();
        for i in 0..12 {
            c.hit(&leaky(), 64).unwrap();
            let h = c.hit_number();
            c.allocated(h, false).unwrap();
            if ![2, 6, 10].contains(&i) {
                c.free(h, &freer).unwrap();
            }
            if i % 3 == 0 {
                c.hit(&other(), 512).unwrap();
                let o = c.hit_number();
                c.allocated(o, false).unwrap();
                c.free(o, &freer).unwrap();
            }
            c.advance(Duration::from_secs(600));
        }
        if boot == 0 {
            c.reboot().unwrap();
            c.advance(Duration::from_secs(120));
        }
    }
    c.free(999, &freer).unwrap();
    c.detached().unwrap();
    let path = dir.join("tracked.jsonl");
    std::fs::write(&path, c.into_inner()).unwrap();
    path
}

#[test]
fn outstanding_lists_the_allocations_never_freed() {
    let dir = tempfile::tempdir().unwrap();
    tracked_night(dir.path());
    let r = run_in(dir.path(), &["report", "tracked.jsonl", "--outstanding"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let out = &r.stdout;
    assert!(
        out.starts_with(
            "kdpilot report --outstanding: 3 allocations of tag Leak never freed, 192 B (1 stack)\n"
        ),
        "{out}"
    );
    // Ages at the end of the log (boot 2 began at 2h02m, its last record at 4h02m): the 3rd
    // allocation of boot 2 was at 2h22m, the 11th at 3h42m.
    assert!(
        out.contains("  #1               3      192 B   1h40m  20m00s  leakydrv"),
        "{out}"
    );
    assert!(out.contains("   > leakydrv!LeakyAllocate+0x46\n"), "{out}");
    assert!(!out.contains("netfoo!RxAllocateBuffer"), "{out}");
    assert!(out.contains("Outstanding when boot 1 ended (log 1.1, ended 2026-11-22 03:00:00 UTC): 3 allocations, 192 B"), "{out}");
    assert!(
        out.contains("1 free record whose hit is not in the log"),
        "{out}"
    );

    let r = run_in(
        dir.path(),
        &[
            "report",
            "tracked.jsonl",
            "--outstanding",
            "--format",
            "folded",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout.lines().count(), 1);
    assert!(
        r.stdout.ends_with(";nt!ExAllocateHeapSpecialPool 3\n"),
        "{}",
        r.stdout
    );

    let r = run_in(
        dir.path(),
        &[
            "report",
            "tracked.jsonl",
            "--outstanding",
            "--format",
            "json",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let json: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(json["pairing"]["outstanding"], 3);
    assert_eq!(json["pairing"]["outstanding_in_ended_boots"], 3);
    assert_eq!(json["ended_boots"][0]["allocations"], 3);

    if kdpilot_report::HAS_FLAMEGRAPH {
        let r = run_in(
            dir.path(),
            &[
                "report",
                "tracked.jsonl",
                "--outstanding",
                "--svg",
                "leaks.svg",
            ],
        );
        assert_eq!(r.code, 0, "{}", r.stderr);
        let svg = std::fs::read_to_string(dir.path().join("leaks.svg")).unwrap();
        assert!(svg.contains("Outstanding allocations of pool tag Leak by stack"));
        assert!(
            svg.contains("leakydrv!LeakyAllocate+0x46 (3 allocations"),
            "{svg}"
        );
    }

    let r = run_in(
        dir.path(),
        &[
            "report",
            "tracked.jsonl",
            "--outstanding",
            "--html",
            "x.html",
        ],
    );
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("use --svg FILE"), "{}", r.stderr);
}

#[test]
fn outstanding_without_track_frees_says_how_to_capture() {
    let dir = tempfile::tempdir().unwrap();
    night(dir.path());
    let r = run_in(dir.path(), &["report", "night.jsonl", "--outstanding"]);
    assert_eq!(r.code, 2, "{}", r.stdout);
    assert!(
        r.stderr
            .contains("capture with `kdpilot capture --track-frees`"),
        "{}",
        r.stderr
    );
    assert!(r.stdout.is_empty());
}

/// Chromium, killed when dropped (a test that fails does not leave it running).
struct Browser(Child);

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn find_chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KDPILOT_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| ["chromium", "chromium-browser"].map(|n| dir.join(n)))
        .find(|p| p.is_file())
}

/// The DOM of `page` after Chromium loaded it and ran its scripts.
fn rendered_dom(chromium: &Path, page: &Path, profile: &Path) -> String {
    let url = format!("file://{}", page.display());
    let child = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("--dump-dom")
        .arg(&url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromium starts");
    let mut browser = Browser(child);
    let mut stdout = browser.0.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut dom = String::new();
        let _ = stdout.read_to_string(&mut dom);
        dom
    });
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if browser.0.try_wait().expect("wait for chromium").is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "chromium did not finish within 90 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(browser);
    reader.join().expect("reader")
}

#[test]
fn the_html_page_renders_in_headless_chromium() {
    let Some(chromium) = find_chromium() else {
        eprintln!(
            "SKIPPED the_html_page_renders_in_headless_chromium: chromium is not installed \
             (apt-get install chromium; .ci/run installs it)"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    night(dir.path());
    let r = run_in(
        dir.path(),
        &["report", "night.jsonl", "--html", "night.html", "-q"],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let page = dir.path().join("night.html");
    let source = std::fs::read_to_string(&page).unwrap();
    let dom = rendered_dom(&chromium, &page, &dir.path().join("profile"));
    assert!(
        dom.contains("<h1>kdpilot report</h1>"),
        "not rendered: {dom:.2000}"
    );

    // The top stack, with its driver's frame highlighted.
    let stack = dom.find("id=\"stack-1\"").expect("stack #1 in the DOM");
    let stack = &dom[stack..stack + dom[stack..].find("</details>").unwrap()];
    assert!(
        stack.contains("<li class=\"driver\">leakydrv!LeakyAllocate+0x46</li>"),
        "{stack}"
    );
    assert!(stack.contains("30 hits"), "{stack}");

    // The plot of hits over time.
    assert!(dom.contains("<polyline class=\"series\" data-stack=\"1\""));

    if kdpilot_report::HAS_FLAMEGRAPH {
        // The flame graph is an SVG in the page with a frame for the leaking function...
        let start = dom
            .find("<section id=\"flamegraph\">")
            .expect("flame graph section");
        let flame = &dom[start..start + dom[start..].find("</section>").unwrap()];
        assert!(flame.contains("<svg"), "{flame:.2000}");
        assert!(flame.contains("id=\"frames\""), "{flame:.2000}");
        assert!(
            flame.contains("<title>leakydrv!LeakyAllocate+0x46 (30 hits"),
            "{flame:.3000}"
        );
        // ...and its script ran: in a fluid flame graph inferno's init() drops the fixed width
        // that the file has.
        let tag = |html: &str| {
            let i = html.find("<svg version=\"1.1\"").expect("flame graph svg");
            html[i..i + html[i..].find('>').unwrap()].to_string()
        };
        assert!(tag(&source).contains(" width=\""), "{}", tag(&source));
        assert!(
            !tag(&dom).contains(" width=\""),
            "the flame graph's script did not run: {}",
            tag(&dom)
        );
    }
}
