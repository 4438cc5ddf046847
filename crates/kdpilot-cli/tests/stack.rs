//! `kdpilot lm` and `kdpilot stack` against the simulator running the fixture kernels with the
//! leaky-driver workload: the frames `kdpilot stack --break-at` prints must be the simulator's
//! ground truth, on x64 and x86, classic and modern kernels.

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use kdpilot_kd::Arch;
use kdpilot_sim::workload::TruthFrame;
use kdpilot_sim::{serve_with, AllocationActivity, Machine, MachineConfig, TargetOptions};
use tokio::process::Command;

const LIMIT: Duration = Duration::from_secs(90);
const LEAK: u32 = u32::from_le_bytes(*b"Leak");

fn fixtures(arch: &str, flavour: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/out")
        .join(arch)
        .join(flavour)
}

async fn kdpilot(args: &[&str]) -> Output {
    let child = Command::new(env!("CARGO_BIN_EXE_kdpilot"))
        .args(args)
        .env_remove("_NT_SYMBOL_PATH")
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(LIMIT, child)
        .await
        .expect("kdpilot finished in time")
        .expect("kdpilot runs")
}

/// Serves one machine with the workload on TCP; returns the port and the task giving back the
/// machine and the workload's ground truth.
async fn start(
    arch: Arch,
    flavour: &str,
) -> (u16, tokio::task::JoinHandle<(Machine, AllocationActivity)>) {
    let dir = fixtures(if arch == Arch::Amd64 { "x64" } else { "x86" }, flavour);
    let mut config = MachineConfig::from_dir(arch, 19041, 2, 9, &dir).unwrap();
    config.special_pool_tag = LEAK;
    let mut machine = Machine::boot(config).unwrap();
    let mut activity = AllocationActivity::from_fixture_dir(
        &dir,
        AllocationActivity::leakydrv_specs(LEAK),
        4,
        100.0,
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        // Two sessions: `lm`, then `stack`.
        for _ in 0..2 {
            let (sock, _) = listener.accept().await.unwrap();
            let _ = serve_with(sock, &mut machine, &TargetOptions::default(), &mut activity).await;
        }
        (machine, activity)
    });
    (port, task)
}

async fn check(arch: Arch, flavour: &str, function: &str) {
    let (port, task) = start(arch, flavour).await;
    let target = format!("tcp:127.0.0.1:{port}");
    let dir = fixtures(if arch == Arch::Amd64 { "x64" } else { "x86" }, flavour);
    let symbols = dir.display().to_string();

    let lm = kdpilot(&["lm", "--target", &target, "--symbols", &symbols]).await;
    let text = String::from_utf8_lossy(&lm.stdout);
    assert!(
        lm.status.success(),
        "{}",
        String::from_utf8_lossy(&lm.stderr)
    );
    for module in ["nt ", "hal ", "leakydrv "] {
        let line = text
            .lines()
            .find(|l| l.contains(module))
            .unwrap_or_else(|| panic!("{module} missing:\n{text}"));
        assert!(line.contains("pdb symbols"), "{line}");
    }

    let symbol = format!("nt!{function}");
    let out = kdpilot(&[
        "stack",
        "--target",
        &target,
        "--symbols",
        &symbols,
        "--break-at",
        &symbol,
        "--no-lines",
    ])
    .await;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (machine, activity) = tokio::time::timeout(LIMIT, task).await.unwrap().unwrap();
    assert!(machine.running, "the target was left stopped");
    assert!(
        machine.planted().is_empty(),
        "a breakpoint was left planted"
    );
    let truth: Vec<TruthFrame> = activity
        .workload
        .truth
        .iter()
        .flat_map(|t| t.stops.iter())
        .find(|s| s.first().is_some_and(|f| f.function == function))
        .cloned()
        .expect("the workload stopped at the breakpoint");
    let printed: Vec<String> = text
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().last().map(str::to_string))
        .collect();
    let want: Vec<String> = truth.iter().map(ToString::to_string).collect();
    assert_eq!(printed, want, "{arch} {flavour}:\n{text}");
}

#[tokio::test]
async fn stack_at_the_modern_special_pool_allocator_x64() {
    check(Arch::Amd64, "modern", "ExAllocateHeapSpecialPool").await;
}

#[tokio::test]
async fn stack_at_mm_allocate_special_pool_classic_x64() {
    check(Arch::Amd64, "classic", "MmAllocateSpecialPool").await;
}

#[tokio::test]
async fn stack_at_mm_allocate_special_pool_classic_x86() {
    check(Arch::X86, "classic", "MmAllocateSpecialPool").await;
}

#[tokio::test]
async fn stack_at_the_modern_special_pool_allocator_x86() {
    check(Arch::X86, "modern", "ExAllocateHeapSpecialPool").await;
}
