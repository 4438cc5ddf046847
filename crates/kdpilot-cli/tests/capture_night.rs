//! `kdpilot capture` through what a night brings, against the simulator with the fixture
//! kernels and the leaky driver:
//! - a pseudo-terminal throttled to 19200 baud, on the classic and the modern kernel, through
//!   three reboots (new kernel bases, re-armed each time): every allocation the simulator
//!   stopped for is in the JSON log once, with the simulator's frames;
//! - the same line with 1 corrupted byte in 1,000 and dropped bytes, through a reboot: no
//!   record lost, none wrong;
//! - a Unix socket that vanishes with a VM restart and comes back;
//! - `kill -9`, then a new capture appending to the same logs: both logs parse, and the two
//!   captures together hold every hit once;
//! - a log that cannot be written (a file size limit, like a full disk): the capture stops,
//!   the target is left running with nothing planted, and the lost record is on stderr;
//! - SIGTERM: a clean detach, like Ctrl-C.
#![cfg(unix)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use kdpilot_capture::record::{EventRecord, LogLine};
use kdpilot_kd::Arch;
use kdpilot_sim::{
    serve_with, AllocationActivity, FaultyLine, LineModel, Machine, MachineConfig, RebootOptions,
    SessionEnd, TargetOptions,
};
use tokio::process::Command;

mod common;
use common::check_clean;

const LIMIT: Duration = Duration::from_secs(300);
const LEAK: u32 = u32::from_le_bytes(*b"Leak");

fn fixtures(flavour: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/out/x64")
        .join(flavour)
}

fn machine(flavour: &str, seed: u64, rate: f64) -> (Machine, AllocationActivity) {
    let dir = fixtures(flavour);
    let mut config = MachineConfig::from_dir(Arch::Amd64, 19041, 2, seed, &dir).unwrap();
    config.special_pool_tag = LEAK;
    let machine = Machine::boot(config).unwrap();
    let activity = AllocationActivity::from_fixture_dir(
        &dir,
        AllocationActivity::leakydrv_specs(LEAK),
        seed,
        rate,
    )
    .unwrap();
    (machine, activity)
}

fn capture_cmd(target: &str, flavour: &str, log: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kdpilot"));
    c.args(["capture", "--target", target, "--tag", "Leak", "--offline"])
        .arg("--symbols")
        .arg(fixtures(flavour))
        .arg("--log")
        .arg(log)
        // These tests compare every hit with the ground truth: no sampling, no stack cap
        // (both are tested in tests/e2e/leaks.rs).
        .args(["--frozen-budget", "off", "--stack-cap", "0"])
        .args(extra)
        .env_remove("_NT_SYMBOL_PATH")
        .env_remove("_NT_DEBUG_LOG_FILE_APPEND")
        .env_remove("_NT_DEBUG_LOG_FILE_OPEN")
        .kill_on_drop(true);
    c
}

/// Every line of a JSON log, parsed (panics on a line that does not parse).
fn lines(json: &Path) -> Vec<LogLine> {
    std::fs::read_to_string(json)
        .unwrap()
        .lines()
        .map(|l| LogLine::parse(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The hits' frames as `module!function+0xoff`, up to the first frame outside every module.
fn hit_stacks(lines: &[LogLine]) -> Vec<Vec<String>> {
    lines
        .iter()
        .filter_map(|l| match l {
            LogLine::Hit(h) => Some(
                h.frames
                    .iter()
                    .map(|f| f.call_site())
                    .take_while(|s| !s.starts_with("0x"))
                    .collect(),
            ),
            LogLine::Event(_) => None,
        })
        .collect()
}

fn events<'a>(lines: &'a [LogLine], kind: &str) -> Vec<&'a EventRecord> {
    lines
        .iter()
        .filter_map(|l| match l {
            LogLine::Event(e) if e.kind() == kind => Some(e),
            _ => None,
        })
        .collect()
}

/// The simulator's stops at the special-pool breakpoint, in order.
fn truth(activity: &AllocationActivity, function: &str) -> Vec<Vec<String>> {
    activity
        .workload
        .truth
        .iter()
        .flat_map(|t| t.stops.iter())
        .filter(|s| s.first().is_some_and(|f| f.function == function))
        .map(|s| s.iter().map(ToString::to_string).collect())
        .collect()
}

/// Serves `machine` on a pseudo-terminal with `model`; returns the slave's path and the task
/// (stopped through the channel, it yields the machine).
fn serve_pty(
    mut machine: Machine,
    mut activity: AllocationActivity,
    model: LineModel,
) -> (
    String,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<(Machine, AllocationActivity)>,
) {
    use tokio_serial::SerialPort as _;
    let (mut master, slave) = tokio_serial::SerialStream::pair().unwrap();
    let name = slave.name().unwrap();
    let (done_tx, mut done_rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let _slave = slave;
        loop {
            let options = TargetOptions::default();
            let line = FaultyLine::new(&mut master, model.clone());
            tokio::select! {
                _ = serve_with(line, &mut machine, &options, &mut activity) => {}
                _ = &mut done_rx => break,
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        (machine, activity)
    });
    (name, done_tx, task)
}

/// A capture over a pseudo-terminal throttled to 19200 baud with `model`'s damage, the
/// target rebooting every `reboot_every` hits; checks every hit against the truth and
/// returns the JSON log's lines.
async fn serial_capture(
    flavour: &str,
    function: &str,
    model: LineModel,
    reboot_every: Option<u64>,
    hits: usize,
) -> Vec<LogLine> {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serial.log");
    let json = dir.path().join("serial.jsonl");
    let (machine, mut activity) = machine(flavour, model.seed, 30.0);
    activity.reboot_every_hits = reboot_every;
    // A noisy line takes minutes (about 50 s to arm, 5 to 20 s a hit), more on a busy machine.
    let limit = if model.corrupt_rate > 0.0 {
        LIMIT * 2
    } else {
        LIMIT
    };
    let (pty, done, task) = serve_pty(machine, activity, model);
    let target = format!("com:port={pty},baud=19200");
    let max = hits.to_string();
    let out = tokio::time::timeout(
        limit,
        capture_cmd(&target, flavour, &log, &["--max-hits", &max, "--quiet"]).output(),
    )
    .await
    .expect("capture finished in time")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    // The measurements, for the record (`cargo test -- --nocapture` shows them).
    println!("{flavour} kernel at 19200 baud: {stdout}");
    let _ = done.send(());
    let (machine, activity) = task.await.unwrap();
    check_clean(&machine);
    let all = lines(&json);
    let got = hit_stacks(&all);
    assert_eq!(got.len(), hits);
    let truth = truth(&activity, function);
    assert_eq!(
        got,
        truth[..got.len()],
        "every hit once, equal to the truth"
    );
    // Every allocation, not only every stop: in the boots the capture armed from their start
    // (not the first, which ran before kdpilot connected, nor the last, which it left), each
    // allocation of the tag that special pool served stopped at the breakpoint.
    let boots: std::collections::BTreeSet<u64> =
        activity.workload.truth.iter().map(|t| t.boot).collect();
    let (first, last) = (boots.first().copied(), boots.last().copied());
    let slipped = activity
        .workload
        .truth
        .iter()
        .filter(|t| {
            t.kind == kdpilot_sim::workload::OpKind::Alloc
                && t.special_pool
                && t.stops.is_empty()
                && Some(t.boot) != first
                && Some(t.boot) != last
        })
        .count();
    assert_eq!(slipped, 0, "allocations of the tag that stopped nobody");
    all
}

fn kernel_bases(all: &[LogLine]) -> std::collections::BTreeSet<u64> {
    events(all, "boot")
        .iter()
        .filter_map(|e| match e {
            EventRecord::Boot { kernel_base, .. } => Some(*kernel_base),
            _ => None,
        })
        .collect()
}

async fn serial_through_three_reboots(flavour: &str, function: &str, seed: u64) {
    let model = LineModel {
        baud: Some(19200),
        seed,
        ..LineModel::clean()
    };
    let all = serial_capture(flavour, function, model, Some(3), 10).await;
    assert_eq!(
        kernel_bases(&all).len(),
        4,
        "three reboots, a new kernel base each"
    );
    assert_eq!(events(&all, "armed").len(), 4, "re-armed in every boot");
    assert_eq!(events(&all, "reboot").len(), 3);
}

#[tokio::test]
async fn serial_19200_modern_kernel_through_three_reboots() {
    serial_through_three_reboots("modern", "ExAllocateHeapSpecialPool", 41).await;
}

#[tokio::test]
async fn serial_19200_classic_kernel_through_three_reboots() {
    serial_through_three_reboots("classic", "MmAllocateSpecialPool", 42).await;
}

#[tokio::test]
async fn noisy_serial_19200_loses_and_garbles_no_record() {
    // One byte in 1,000 flipped, one in 5,000 lost, both ways.
    let model = LineModel {
        baud: Some(19200),
        corrupt_rate: 0.001,
        drop_rate: 0.0002,
        seed: 43,
    };
    let all = serial_capture("modern", "ExAllocateHeapSpecialPool", model, Some(4), 5).await;
    assert_eq!(
        kernel_bases(&all).len(),
        2,
        "and a reboot on the noisy line"
    );
}

#[tokio::test]
async fn a_vanished_unix_socket_is_followed_after_a_vm_restart() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("com1");
    let log = dir.path().join("vm.log");
    let json = dir.path().join("vm.jsonl");
    let (mut machine, mut activity) = machine("modern", 51, 60.0);
    activity.reboot_every_hits = Some(3);
    let options = TargetOptions {
        reboot: RebootOptions {
            downtime: Duration::from_secs(2),
            disconnect: true,
        },
        ..TargetOptions::default()
    };
    let (done_tx, mut done_rx) = tokio::sync::oneshot::channel::<()>();
    let path = sock.clone();
    let gone = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let gone2 = gone.clone();
    let task = tokio::spawn(async move {
        'vm: loop {
            let listener = tokio::net::UnixListener::bind(&path).unwrap();
            loop {
                let sock = tokio::select! {
                    r = listener.accept() => r.unwrap().0,
                    _ = &mut done_rx => break 'vm,
                };
                let end = serve_with(sock, &mut machine, &options, &mut activity).await;
                if matches!(end, Ok(SessionEnd::Reboot)) {
                    break;
                }
            }
            // The VM restarts: its socket goes away, and comes back with the new boot.
            drop(listener);
            std::fs::remove_file(&path).unwrap();
            gone2.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tokio::time::sleep(options.reboot.downtime).await;
        }
        (machine, activity)
    });
    let target = format!("unix:{}", sock.display());
    let out = tokio::time::timeout(
        LIMIT,
        capture_cmd(&target, "modern", &log, &["--max-hits", "8"]).output(),
    )
    .await
    .expect("capture finished in time")
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = done_tx.send(());
    let (machine, activity) = task.await.unwrap();
    check_clean(&machine);
    assert!(gone.load(std::sync::atomic::Ordering::Relaxed) >= 2);
    let all = lines(&json);
    assert!(events(&all, "link_lost").len() >= 2, "the socket vanished");
    assert!(events(&all, "connected").len() >= 3, "and was reopened");
    assert!(events(&all, "boot").len() >= 3);
    let got = hit_stacks(&all);
    assert_eq!(got.len(), 8);
    assert_eq!(
        got,
        truth(&activity, "ExAllocateHeapSpecialPool")[..8],
        "no hit lost or wrong"
    );
}

/// Waits until the JSON log holds `n` hits.
async fn wait_for_hits(json: &Path, n: usize) {
    let deadline = std::time::Instant::now() + LIMIT;
    while std::fs::read_to_string(json)
        .map(|s| s.matches("\"hit\":").count())
        .unwrap_or(0)
        < n
    {
        assert!(std::time::Instant::now() < deadline, "no hits");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn signal(pid: u32, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// A TCP target that serves the same machine to `sessions` hosts in turn.
async fn tcp_target(
    mut machine: Machine,
    mut activity: AllocationActivity,
    sessions: usize,
) -> (
    String,
    tokio::task::JoinHandle<(Machine, AllocationActivity)>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = format!("tcp:{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        for _ in 0..sessions {
            let (sock, _) = listener.accept().await.unwrap();
            let _ = serve_with(sock, &mut machine, &TargetOptions::default(), &mut activity).await;
        }
        (machine, activity)
    });
    (target, task)
}

#[tokio::test]
async fn kill_9_loses_nothing_and_a_new_capture_appends() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("killed.log");
    let json = dir.path().join("killed.jsonl");
    let (machine, activity) = machine("modern", 61, 200.0);
    let (target, task) = tcp_target(machine, activity, 2).await;
    let mut first = capture_cmd(&target, "modern", &log, &["--quiet"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for_hits(&json, 4).await;
    // At a moment that depends on scheduling: inside a hit, between hits, in a write.
    tokio::time::sleep(Duration::from_millis(37)).await;
    signal(first.id().unwrap(), "-KILL");
    let _ = first.wait().await;
    let after_kill = lines(&json); // every line parses
    let killed_hits = hit_stacks(&after_kill).len();
    assert!(events(&after_kill, "detached").is_empty());
    // The second capture appends to the same logs and finds the target as the kill left it
    // (a breakpoint planted, maybe stopped at a hit).
    let out = tokio::time::timeout(
        LIMIT,
        capture_cmd(&target, "modern", &log, &["--max-hits", "5", "--quiet"]).output(),
    )
    .await
    .expect("capture finished in time")
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (machine, activity) = task.await.unwrap();
    check_clean(&machine);
    let all = lines(&json);
    let got = hit_stacks(&all);
    assert_eq!(got.len(), killed_hits + 5);
    assert_eq!(
        got,
        truth(&activity, "ExAllocateHeapSpecialPool")[..got.len()],
        "the two captures hold every hit once"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.matches(" hit ").count(), got.len(), "{text}");
}

#[tokio::test]
async fn a_log_that_cannot_be_written_stops_the_capture_cleanly() {
    if std::process::Command::new("prlimit")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: prlimit (util-linux) is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("full.log");
    let json = dir.path().join("full.jsonl");
    let (machine, activity) = machine("modern", 71, 200.0);
    let (target, task) = tcp_target(machine, activity, 1).await;
    let cmd = capture_cmd(&target, "modern", &log, &["--quiet"]);
    // The same command under a file size limit of 12 KB: a few hits fit, then writes fail
    // (EFBIG), as they would on a full disk.
    let std_cmd = cmd.as_std();
    let mut limited = Command::new("prlimit");
    limited
        .arg("--fsize=12000")
        .arg(std_cmd.get_program())
        .args(std_cmd.get_args())
        .env_remove("_NT_SYMBOL_PATH")
        .env_remove("_NT_DEBUG_LOG_FILE_APPEND")
        .env_remove("_NT_DEBUG_LOG_FILE_OPEN")
        .kill_on_drop(true);
    let out = tokio::time::timeout(LIMIT, limited.output())
        .await
        .expect("capture finished in time")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("could not write hit"), "{stderr}");
    assert!(stderr.contains("left running"), "{stderr}");
    let (machine, _) = task.await.unwrap();
    check_clean(&machine);
    let all = lines(&json);
    assert!(!hit_stacks(&all).is_empty(), "some hits fit");
    // The hit that did not fit is on stderr, with its frames.
    assert!(stderr.contains("leakydrv!"), "{stderr}");
}

#[tokio::test]
async fn sigterm_detaches_like_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("term.log");
    let json = dir.path().join("term.jsonl");
    let (machine, activity) = machine("modern", 81, 200.0);
    let (target, task) = tcp_target(machine, activity, 1).await;
    let mut child = capture_cmd(&target, "modern", &log, &["--quiet"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for_hits(&json, 2).await;
    signal(child.id().unwrap(), "-TERM");
    let status = tokio::time::timeout(LIMIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
    let (machine, _) = task.await.unwrap();
    check_clean(&machine);
    let all = lines(&json);
    let detached = events(&all, "detached");
    assert!(
        matches!(detached.as_slice(), [EventRecord::Detached { reason, clean: true, .. }] if reason == "terminated"),
        "{detached:?}"
    );
}

#[tokio::test]
async fn the_report_page_is_kept_up_to_date_during_a_capture() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("night.log");
    let json = dir.path().join("night.jsonl");
    let page = dir.path().join("night.html");
    let (machine, activity) = machine("modern", 91, 200.0);
    let (target, task) = tcp_target(machine, activity, 1).await;
    let report = page.display().to_string();
    let mut child = capture_cmd(&target, "modern", &log, &["--quiet", "--report", &report])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Written at once, while the capture runs (then every minute), reloading itself.
    let deadline = std::time::Instant::now() + LIMIT;
    while !page.exists() {
        assert!(std::time::Instant::now() < deadline, "no report page");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let during = std::fs::read_to_string(&page).unwrap();
    assert!(during.contains("http-equiv=\"refresh\""), "{during}");
    wait_for_hits(&json, 3).await;
    signal(child.id().unwrap(), "-INT");
    let status = tokio::time::timeout(LIMIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    let (machine, _) = task.await.unwrap();
    check_clean(&machine);
    // The final page: every hit of the log, no reloading.
    let hits = hit_stacks(&lines(&json)).len();
    let after = std::fs::read_to_string(&page).unwrap();
    assert!(!after.contains("http-equiv=\"refresh\""));
    assert!(after.contains("leakydrv!"), "the top stack is on the page");
    assert!(
        after.contains(&format!("{hits} hits")),
        "{hits} hits on the page"
    );
}

/// The whole leak hunt through the real binary, at 19200 baud across a reboot: `kdpilot
/// capture --track-frees` on a workload that frees most allocations and leaks two call paths,
/// then `kdpilot report --outstanding`: the outstanding stacks are exactly the leaking paths of
/// the last boot, with the simulator's counts.
#[tokio::test]
async fn a_leak_hunt_at_19200_baud_names_exactly_the_leaking_paths() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("hunt.log");
    let json = dir.path().join("hunt.jsonl");
    let flavour = "modern";
    let fixture = fixtures(flavour);
    let mut config = MachineConfig::from_dir(Arch::Amd64, 19041, 2, 5, &fixture).unwrap();
    config.special_pool_tag = LEAK;
    let machine = Machine::boot(config).unwrap();
    let mut activity = AllocationActivity::from_fixture_dir(
        &fixture,
        AllocationActivity::leak_hunt_specs(LEAK),
        5,
        30.0,
    )
    .unwrap();
    activity.reboot_every_hits = Some(20);
    let model = LineModel {
        baud: Some(19200),
        seed: 5,
        ..LineModel::clean()
    };
    let (pty, done, task) = serve_pty(machine, activity, model);
    let target = format!("com:port={pty},baud=19200");
    let out = tokio::time::timeout(
        LIMIT,
        capture_cmd(
            &target,
            flavour,
            &log,
            &["--max-hits", "30", "--track-frees", "--quiet"],
        )
        .output(),
    )
    .await
    .expect("capture finished in time")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    println!("leak hunt at 19200 baud: {stdout}");
    let _ = done.send(());
    let (machine, activity) = task.await.unwrap();
    check_clean(&machine);
    let all = lines(&json);
    assert!(!events(&all, "reboot").is_empty(), "the target rebooted");
    assert!(!events(&all, "free").is_empty(), "frees were recorded");

    let report = Command::new(env!("CARGO_BIN_EXE_kdpilot"))
        .args(["report", "--outstanding", "--format", "folded"])
        .arg(&json)
        .output()
        .await
        .unwrap();
    let folded = String::from_utf8_lossy(&report.stdout);
    assert!(
        report.status.success(),
        "{folded}\n{}",
        String::from_utf8_lossy(&report.stderr)
    );
    // Per driver function (the leaf's caller in the driver): outstanding count.
    let mut got: std::collections::BTreeMap<String, u64> = Default::default();
    for line in folded.lines() {
        let (stack, n) = line.rsplit_once(' ').expect("folded line");
        let driver = stack
            .split(';')
            .rfind(|f| f.starts_with("leakydrv!"))
            .expect("a driver frame")
            .split('+')
            .next()
            .unwrap()
            .to_string();
        *got.entry(driver).or_default() += n.parse::<u64>().unwrap();
    }
    // The truth: allocations of the last boot that stopped at the breakpoint and were never
    // freed, by driver function.
    let last_boot = activity
        .workload
        .truth
        .iter()
        .map(|t| t.boot)
        .max()
        .unwrap();
    let recorded: std::collections::BTreeSet<u64> = all
        .iter()
        .filter_map(|l| match l {
            LogLine::Event(EventRecord::Allocated { address, .. }) => Some(*address),
            _ => None,
        })
        .collect();
    let freed: std::collections::BTreeSet<u64> = activity
        .workload
        .truth
        .iter()
        // Frees the capture could see: they stopped at its free breakpoint (after it
        // detached, the target frees with nothing planted).
        .filter(|t| t.kind == kdpilot_sim::workload::OpKind::Free && !t.stops.is_empty())
        .map(|t| t.address)
        .collect();
    let mut want: std::collections::BTreeMap<String, u64> = Default::default();
    for t in &activity.workload.truth {
        if t.boot == last_boot
            && t.kind == kdpilot_sim::workload::OpKind::Alloc
            && recorded.contains(&t.address)
            && !freed.contains(&t.address)
        {
            let f = t
                .path
                .iter()
                .rev()
                .find(|p| p.starts_with("leakydrv!"))
                .unwrap()
                .clone();
            *want.entry(f).or_default() += 1;
        }
    }
    // Only the leaking paths, but for the last balanced allocation if its free had not come
    // when the capture ended.
    let balanced: u64 = want
        .iter()
        .filter(|(f, _)| !f.contains("LeakyAlloc"))
        .map(|(_, n)| n)
        .sum();
    assert!(
        balanced <= 1,
        "the truth leaks only the known paths: {want:?}"
    );
    assert!(!want.is_empty(), "something leaked in the last boot");
    assert_eq!(got, want, "the outstanding report:\n{folded}");
}

/// The README's first command: `kdpilot demo` probes the simulator, hunts a leak through a
/// reboot and ends with the outstanding report naming the leaking path.
#[tokio::test]
async fn the_demo_hunts_a_leak_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let out = tokio::time::timeout(
        LIMIT,
        Command::new(env!("CARGO_BIN_EXE_kdpilot"))
            .arg("demo")
            .current_dir(dir.path())
            .env_remove("_NT_SYMBOL_PATH")
            .env_remove("_NT_DEBUG_LOG_FILE_APPEND")
            .env_remove("_NT_DEBUG_LOG_FILE_OPEN")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("demo finished in time")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("24 hits captured"), "{stdout}");
    let report = stdout
        .split_once("--outstanding --top 3\n")
        .expect("the outstanding report")
        .1;
    assert!(report.contains("never freed"), "{report}");
    let top = report
        .lines()
        .find(|l| l.trim_start().starts_with("#1 "))
        .expect("a top stack");
    assert!(top.contains("leakydrv!LeakyAlloc"), "{top}");
    assert!(stderr.contains("the target is rebooting"), "{stderr}");
    // The logs are in the working directory, named on the demo's last line, and parse.
    let json = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .expect("the JSON log");
    let name = json.file_name().unwrap().to_string_lossy().to_string();
    let last = stdout.trim_end().lines().last().unwrap_or_default();
    assert!(
        last.starts_with("The capture's logs: ") && last.contains(&name),
        "the demo ends with the logs' paths: {last}"
    );
    let all = lines(&json);
    assert!(!events(&all, "free").is_empty());
    assert!(!events(&all, "allocated").is_empty());
}

/// Hits seconds apart on a clean line: every stop once. The same breakpoint hit again by the
/// same thread on the same processor is byte for byte the stop before it; before the fix, a
/// silence RESET that the running target ignored made kdpilot take such a hit for the old stop
/// resent ("the continue was lost") and resume it unrecorded (found by an audit: 3 of 15 lost
/// at 0.4 allocations a second).
#[tokio::test]
async fn slow_hits_on_a_clean_line_are_all_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("slow.log");
    let json = dir.path().join("slow.jsonl");
    let (machine, activity) = machine("modern", 61, 0.4);
    let (target, task) = tcp_target(machine, activity, 1).await;
    let out = tokio::time::timeout(
        LIMIT,
        capture_cmd(&target, "modern", &log, &["--max-hits", "10", "--quiet"]).output(),
    )
    .await
    .expect("capture finished in time")
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let (machine, activity) = task.await.unwrap();
    check_clean(&machine);
    let got = hit_stacks(&lines(&json));
    let truth = truth(&activity, "ExAllocateHeapSpecialPool");
    assert_eq!(got.len(), 10, "{stderr}");
    assert_eq!(got, truth[..got.len()], "every stop once, in order");
    assert!(
        !stderr.contains("continue was lost"),
        "no continue is lost on a clean line: {stderr}"
    );
}
