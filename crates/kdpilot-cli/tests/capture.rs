//! `kdpilot capture` against the simulator with the fixture kernels and the leaky driver:
//! the JSON log's stacks equal the ground truth across reboots, logs are appended (never
//! truncated), and Ctrl-C (SIGINT) leaves the target running with nothing planted.

use std::path::PathBuf;
use std::time::Duration;

use kdpilot_capture::record::LogLine;
use kdpilot_kd::Arch;
use kdpilot_sim::{serve_with, AllocationActivity, Machine, MachineConfig, TargetOptions};
use tokio::process::Command;

mod common;
use common::check_clean;

const LIMIT: Duration = Duration::from_secs(120);
const LEAK: u32 = u32::from_le_bytes(*b"Leak");

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/out/x64/modern")
}

async fn start(
    sessions: usize,
    reboot_every_hits: Option<u64>,
) -> (u16, tokio::task::JoinHandle<(Machine, AllocationActivity)>) {
    let dir = fixtures();
    let mut config = MachineConfig::from_dir(Arch::Amd64, 19041, 2, 31, &dir).unwrap();
    config.special_pool_tag = LEAK;
    let mut machine = Machine::boot(config).unwrap();
    let mut activity = AllocationActivity::from_fixture_dir(
        &dir,
        AllocationActivity::leakydrv_specs(LEAK),
        6,
        100.0,
    )
    .unwrap();
    activity.reboot_every_hits = reboot_every_hits;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        for _ in 0..sessions {
            let (sock, _) = listener.accept().await.unwrap();
            let _ = serve_with(sock, &mut machine, &TargetOptions::default(), &mut activity).await;
        }
        (machine, activity)
    });
    (port, task)
}

fn capture_cmd(port: u16, log: &std::path::Path, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kdpilot"));
    c.args([
        "capture",
        "--target",
        &format!("tcp:127.0.0.1:{port}"),
        "--tag",
        "Leak",
        "--offline",
    ])
    .arg("--symbols")
    .arg(fixtures())
    .arg("--log")
    .arg(log)
    .args(extra)
    .env_remove("_NT_SYMBOL_PATH")
    .env_remove("_NT_DEBUG_LOG_FILE_APPEND")
    .env_remove("_NT_DEBUG_LOG_FILE_OPEN")
    .kill_on_drop(true);
    c
}

fn hits(json: &std::path::Path) -> Vec<Vec<String>> {
    std::fs::read_to_string(json)
        .unwrap()
        .lines()
        .filter_map(|l| match LogLine::parse(l).expect("every line parses") {
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

#[tokio::test]
async fn capture_logs_every_hit_across_reboots_and_appends() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("night.log");
    let json = dir.path().join("night.jsonl");
    let (port, task) = start(2, Some(3)).await;
    for _ in 0..2 {
        let out = tokio::time::timeout(
            LIMIT,
            capture_cmd(port, &log, &["--max-hits", "5"]).output(),
        )
        .await
        .unwrap()
        .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (machine, activity) = tokio::time::timeout(LIMIT, task).await.unwrap().unwrap();
    assert!(
        machine.running && machine.planted().is_empty(),
        "target left stopped or with a breakpoint"
    );
    let got = hits(&json);
    assert_eq!(
        got.len(),
        10,
        "both runs' hits are in the log (appended, not truncated)"
    );
    let truth: Vec<Vec<String>> = activity
        .workload
        .truth
        .iter()
        .flat_map(|t| t.stops.iter())
        .filter(|s| {
            s.first()
                .is_some_and(|f| f.function == "ExAllocateHeapSpecialPool")
        })
        .map(|s| s.iter().map(ToString::to_string).collect())
        .collect();
    assert_eq!(
        got,
        truth[..got.len()],
        "captured stacks equal the ground truth"
    );
    let text_log = std::fs::read_to_string(&log).unwrap();
    assert!(
        text_log.contains("=== boot 2"),
        "reboot markers in the text log"
    );
    assert_eq!(text_log.matches(" hit ").count(), 10);
}

#[cfg(unix)]
#[tokio::test]
async fn sigint_detaches_and_leaves_the_target_running() {
    sigint_leaves_clean(&[]).await;
}

/// The same with PoolHitTag: after Ctrl-C nt!PoolHitTag holds what it held before (0).
#[cfg(unix)]
#[tokio::test]
async fn sigint_with_pool_hit_tag_restores_it() {
    sigint_leaves_clean(&["--strategy", "pool-hit-tag"]).await;
}

/// Ctrl-C after a few hits: exit 0, the target running with no int3 planted, no hardware
/// breakpoint enabled on any processor, nt!PoolHitTag clear.
#[cfg(unix)]
async fn sigint_leaves_clean(extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("ctrlc.log");
    let (port, task) = start(1, None).await;
    let mut child = capture_cmd(port, &log, extra)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for a few hits in the JSON log, then Ctrl-C.
    let json = dir.path().join("ctrlc.jsonl");
    let deadline = std::time::Instant::now() + LIMIT;
    while std::fs::read_to_string(&json)
        .map(|s| s.matches("\"hit\"").count())
        .unwrap_or(0)
        < 3
    {
        assert!(std::time::Instant::now() < deadline, "no hits");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pid = child.id().unwrap().to_string();
    let status = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    let out = tokio::time::timeout(LIMIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(out.success(), "exit code after Ctrl-C: {out:?}");
    let (machine, _) = tokio::time::timeout(LIMIT, task).await.unwrap().unwrap();
    check_clean(&machine);
    let lines = std::fs::read_to_string(&json).unwrap();
    assert!(lines.lines().all(|l| LogLine::parse(l).is_ok()));
    assert!(lines.contains("\"event\":\"detached\""));
}
