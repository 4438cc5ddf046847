//! `cargo xtask bench`: what a capture costs on the line, against the simulator throttled to
//! 19200 and 115200 baud with a fixed workload (the modern x64 fake kernel, the leaky driver,
//! special pool for 'Leak', a reboot every 12 hits).
//!
//! Per hit: bytes each way, packets, time the target stays stopped, hits per minute, and the
//! lower bound: the bytes of the packets the protocol cannot do without for the same
//! information (the state change and its ACK, the registers read, the stack bytes the unwind
//! touched, for an int3 also the single step and the re-plant, the resume), computed from the
//! kd crate's own encoders. Per phase: connect-to-armed and reboot-to-re-armed, bytes and
//! seconds, and whether an allocation of the tag slipped through before re-arming. With
//! `--idle`, the `kdpilot` binary's CPU and memory while it waits overnight, and after a long
//! run at 115200.
//!
//! Usage: `bench_capture [--hits N] [--quick] [--idle SECS] [--kdpilot PATH]`

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use kdpilot_capture::engine::{Capture, CaptureEvent, CaptureOptions, HitCost};
use kdpilot_capture::strategy::StrategyChoice;
use kdpilot_kd::client::{ClientConfig, Connection, EventSink, Timing};
use kdpilot_kd::Arch;
use kdpilot_sim::workload::OpKind;
use kdpilot_sim::{serve_with, AllocationActivity, FaultyLine, LineModel, Machine, MachineConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const LEAK: u32 = u32::from_le_bytes(*b"Leak");

/// Counts the bytes through the host's end of the line.
struct Counted<S> {
    inner: S,
    tx: Arc<AtomicU64>,
    rx: Arc<AtomicU64>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.rx
            .fetch_add((buf.filled().len() - before) as u64, Ordering::Relaxed);
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.tx.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/out/x64/modern")
}

/// One phase (connect-to-armed, reboot-to-re-armed): seconds and bytes.
#[derive(Clone, Copy, Debug, Default)]
struct Phase {
    secs: f64,
    tx: u64,
    rx: u64,
}

struct Run {
    baud: u32,
    hardware: bool,
    /// The leak-hunt workload (most allocations freed), no reboots; with `--track-frees` when
    /// true.
    frees: Option<bool>,
    /// Only the driver's deepest path (10-frame x64 stacks at the allocator).
    deep: bool,
    /// Total line bytes (both ways) at each hit.
    hit_bytes: Vec<u64>,
    costs: Vec<HitCost>,
    hit_times: Vec<Instant>,
    connect: Phase,
    rearms: Vec<Phase>,
    slipped: usize,
    before_connect: usize,
    wall: f64,
}

fn lower_bound(c: &HitCost) -> (u64, u64) {
    kdpilot_capture::cost::lower_bound(c, Arch::Amd64)
}

async fn run(baud: u32, hardware: bool, hits: u64, frees: Option<bool>, deep: bool) -> Run {
    let dir = fixtures();
    let mut config = MachineConfig::from_dir(Arch::Amd64, 19041, 2, 7, &dir).expect("fixtures");
    config.special_pool_tag = LEAK;
    let mut machine = Machine::boot(config).expect("boot");
    let specs = if frees.is_some() {
        AllocationActivity::leak_hunt_specs(LEAK)
    } else if deep {
        vec![AllocationActivity::deep_spec(LEAK)]
    } else {
        AllocationActivity::leakydrv_specs(LEAK)
    };
    let mut activity =
        AllocationActivity::from_fixture_dir(&dir, specs, 7, 120.0).expect("activity");
    activity.reboot_every_hits = if frees.is_some() { None } else { Some(12) };
    let model = LineModel {
        baud: Some(baud),
        ..LineModel::clean()
    };
    let (host, target) = tokio::io::duplex(64 * 1024);
    let target_model = model.clone();
    let sim = tokio::spawn(async move {
        let _ = serve_with(
            FaultyLine::new(target, target_model),
            &mut machine,
            &kdpilot_sim::TargetOptions::default(),
            &mut activity,
        )
        .await;
        activity
    });
    let tx = Arc::new(AtomicU64::new(0));
    let rx = Arc::new(AtomicU64::new(0));
    let io = Counted {
        inner: FaultyLine::new(host, model),
        tx: tx.clone(),
        rx: rx.clone(),
    };
    let started = Instant::now();
    let mut timing = Timing::for_baud(baud);
    timing.latency = timing.latency.max(Duration::from_millis(300));
    let stopped = Connection::new(
        io,
        ClientConfig {
            timing,
            sink: EventSink::none(),
            ..ClientConfig::default()
        },
    )
    .connect(Duration::from_secs(60))
    .await
    .expect("connect");
    let options = CaptureOptions {
        tag: LEAK,
        strategy: StrategyChoice::Auto,
        symbols: dir.display().to_string(),
        offline: true,
        max_hits: Some(hits),
        duration: Some(Duration::from_secs(900)),
        hardware_breakpoint: hardware,
        measure: true,
        track_frees: frees == Some(true),
        guards: kdpilot_capture::engine::Guards::default(),
    };
    let mut costs = Vec::new();
    let mut hit_bytes = Vec::new();
    let mut hit_times = Vec::new();
    let mut connect = None;
    let mut rearms = Vec::new();
    let mut reboot_at: Option<(Instant, u64, u64)> = None;
    let bytes = || (tx.load(Ordering::Relaxed), rx.load(Ordering::Relaxed));
    let mut capture = Capture::new(options, |e| match e {
        CaptureEvent::HitCost(c) => costs.push(c.clone()),
        CaptureEvent::Hit(_) => {
            hit_times.push(Instant::now());
            let (t, r) = bytes();
            hit_bytes.push(t + r);
        }
        CaptureEvent::Armed { .. } => {
            let (t, r) = bytes();
            if connect.is_none() {
                connect = Some(Phase {
                    secs: started.elapsed().as_secs_f64(),
                    tx: t,
                    rx: r,
                });
            } else if let Some((at, t0, r0)) = reboot_at.take() {
                rearms.push(Phase {
                    secs: at.elapsed().as_secs_f64(),
                    tx: t - t0,
                    rx: r - r0,
                });
            }
        }
        CaptureEvent::Reboot { .. } => {
            let (t, r) = bytes();
            reboot_at = Some((Instant::now(), t, r));
        }
        _ => {}
    })
    .expect("capture");
    let stop = AtomicBool::new(false);
    capture.run(stopped, &stop).await.expect("capture ran");
    drop(capture);
    let wall = started.elapsed().as_secs_f64();
    let activity = sim.await.expect("sim");
    // Allocations of the tag that went to special pool but stopped nobody: the breakpoint was
    // not in place (the first boot before the capture connected, or a boot before re-arming).
    // The last boot is left out: the capture ended in it.
    let boots: std::collections::BTreeSet<u64> =
        activity.workload.truth.iter().map(|t| t.boot).collect();
    let first_boot = boots.first().copied().unwrap_or(0);
    let last_boot = boots.last().copied().unwrap_or(0);
    let missed = |boot_ok: &dyn Fn(u64) -> bool| {
        activity
            .workload
            .truth
            .iter()
            .filter(|t| {
                t.kind == OpKind::Alloc && t.special_pool && t.stops.is_empty() && boot_ok(t.boot)
            })
            .count()
    };
    let before_connect = missed(&|b| b == first_boot);
    let slipped = missed(&|b| b != first_boot && b != last_boot);
    Run {
        baud,
        hardware,
        frees,
        deep,
        hit_bytes,
        costs,
        hit_times,
        connect: connect.unwrap_or_default(),
        rearms,
        slipped,
        before_connect,
        wall,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// The leak-hunt runs: everything on the line between the first and the last hit (hits,
/// returns, frees), per hit.
fn report_frees(r: &Run) {
    let n = r.hit_bytes.len().saturating_sub(1).max(1) as f64;
    let bytes = r
        .hit_bytes
        .last()
        .zip(r.hit_bytes.first())
        .map_or(0, |(b, a)| b - a) as f64;
    let span = r
        .hit_times
        .last()
        .zip(r.hit_times.first())
        .map_or(0.0, |(b, a)| b.duration_since(*a).as_secs_f64());
    println!(
        "\n## {} baud, leak-hunt workload (8 in 10 allocations of the tag freed), {}: {} hits, {:.0} s",
        r.baud,
        if r.frees == Some(true) {
            "--track-frees"
        } else {
            "hits only"
        },
        r.hit_bytes.len(),
        r.wall
    );
    println!(
        "all line traffic per hit (its stop, and with --track-frees its return and its share of the frees): {:.0} B; \
         hits per minute: {:.1}",
        bytes / n,
        n * 60.0 / span.max(0.001)
    );
}

fn report(r: &Run) {
    if r.frees.is_some() {
        report_frees(r);
        return;
    }
    let n = r.costs.len().max(1) as f64;
    let avg = |f: &dyn Fn(&HitCost) -> f64| r.costs.iter().map(f).sum::<f64>() / n;
    let tx = avg(&|c| c.bytes_tx as f64);
    let rx = avg(&|c| c.bytes_rx as f64);
    let (lb_tx, lb_rx) = r
        .costs
        .iter()
        .map(lower_bound)
        .fold((0u64, 0u64), |(a, b), (x, y)| (a + x, b + y));
    let (lb_tx, lb_rx) = (lb_tx as f64 / n, lb_rx as f64 / n);
    let stopped = median(r.costs.iter().map(|c| c.stopped.as_secs_f64()).collect());
    let per_hit_line = (tx + rx) * 10.0 / f64::from(r.baud); // 10 bits per byte
                                                             // Hits per minute between the first and the last hit of each boot, summed (the reboots'
                                                             // downtime is not the capture's cost).
    let steady = if r.hit_times.len() >= 2 {
        let span = r
            .hit_times
            .last()
            .zip(r.hit_times.first())
            .map_or(0.0, |(b, a)| b.duration_since(*a).as_secs_f64());
        let rearm: f64 = r.rearms.iter().map(|p| p.secs).sum();
        (r.hit_times.len() - 1) as f64 * 60.0 / (span - rearm).max(0.001)
    } else {
        0.0
    };
    println!(
        "\n## {} baud, {} breakpoint, {}{} hits, {:.0} s",
        r.baud,
        if r.hardware { "hardware" } else { "int3" },
        if r.deep {
            "the driver's deepest path only (LeakyAllocDeep), "
        } else {
            ""
        },
        r.costs.len(),
        r.wall
    );
    if r.deep {
        let fewest = r.costs.iter().map(|c| c.frames).min().unwrap_or(0);
        assert!(
            fewest >= 10,
            "the deep path's stacks have 10 frames or more: {fewest}"
        );
    }
    println!(
        "per hit: {tx:.0} B host->target, {rx:.0} B target->host ({:.0} B), {:.1} packets out, {:.1} in, \
         {:.1} frames, stack {:.0} B touched / {:.0} B read, registers {:.0} B",
        tx + rx,
        avg(&|c| c.packets_tx as f64),
        avg(&|c| c.packets_rx as f64),
        avg(&|c| c.frames as f64),
        avg(&|c| c.stack_touched as f64),
        avg(&|c| c.stack_read as f64),
        avg(&|c| c.context_bytes as f64),
    );
    println!(
        "lower bound: {lb_tx:.0} + {lb_rx:.0} = {:.0} B; measured/bound = {:.2}",
        lb_tx + lb_rx,
        (tx + rx) / (lb_tx + lb_rx)
    );
    println!(
        "target stopped per hit (median): {:.3} s (line time of the bytes alone: {per_hit_line:.3} s); \
         hits per minute while armed: {steady:.1} (line-limited: {:.1})",
        stopped,
        60.0 / per_hit_line.max(1e-9)
    );
    println!(
        "connect to armed: {:.2} s, {} B out, {} B in ({} allocations of the tag in the first boot before that)",
        r.connect.secs, r.connect.tx, r.connect.rx, r.before_connect
    );
    if !r.rearms.is_empty() {
        println!(
            "reboot to re-armed ({} reboots): median {:.2} s, {:.0} B out, {:.0} B in; allocations of the tag before re-arming: {}",
            r.rearms.len(),
            median(r.rearms.iter().map(|p| p.secs).collect()),
            median(r.rearms.iter().map(|p| p.tx as f64).collect()),
            median(r.rearms.iter().map(|p| p.rx as f64).collect()),
            r.slipped
        );
    }
}

/// CPU seconds (user + system) and VmRSS/VmHWM in kB of a process.
fn proc_usage(pid: u32) -> Option<(f64, u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((ticks / 100.0, kb("VmRSS:")?, kb("VmHWM:")?))
}

/// `kdpilot capture` as its own process against `kdpilot sim`: CPU and memory while waiting
/// for hits (a target that allocates nothing), then after `hits` hits at 115200 baud.
async fn idle(kdpilot: &PathBuf, secs: u64, hits: u64) {
    use tokio::io::AsyncBufReadExt;
    let dir = tempfile::tempdir().expect("tempdir");
    for (what, rate, max) in [("idle", "0.001", None), ("busy", "200", Some(hits))] {
        let mut sim = tokio::process::Command::new(kdpilot)
            .args([
                "sim",
                "--listen",
                "tcp:127.0.0.1:0",
                "--kernel",
                "modern",
                "--pool-tag",
                "Leak",
                "--rate",
                rate,
                "--baud",
                "115200",
            ])
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("kdpilot sim");
        let mut lines = tokio::io::BufReader::new(sim.stderr.take().expect("stderr")).lines();
        let mut target = String::new();
        while let Ok(Some(l)) = lines.next_line().await {
            if let Some(t) = l.split("--target ").nth(1) {
                target = t.trim().to_string();
                break;
            }
        }
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let log = dir.path().join(format!("{what}.log"));
        let mut args = vec![
            "capture".to_string(),
            "--target".into(),
            target,
            "--tag".into(),
            "Leak".into(),
            "--offline".into(),
            "--quiet".into(),
            "--symbols".into(),
            fixtures().display().to_string(),
            "--log".into(),
            log.display().to_string(),
        ];
        if let Some(m) = max {
            args.push("--max-hits".into());
            args.push(m.to_string());
        }
        let started = Instant::now();
        let mut cap = tokio::process::Command::new(kdpilot)
            .args(&args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("kdpilot capture");
        let pid = cap.id().expect("pid");
        let json = log.with_extension("jsonl");
        while !std::fs::read_to_string(&json)
            .map(|s| s.contains("\"event\":\"armed\""))
            .unwrap_or(false)
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if what == "idle" {
            let (c0, _, _) = proc_usage(pid).unwrap_or_default();
            tokio::time::sleep(Duration::from_secs(secs)).await;
            let (c1, rss, hwm) = proc_usage(pid).unwrap_or_default();
            println!(
                "\n## kdpilot capture waiting for hits ({secs} s, armed, no allocations): CPU {:.2} % of one core, RSS {} kB (peak {} kB)",
                (c1 - c0) * 100.0 / secs as f64,
                rss,
                hwm
            );
            let _ = cap.kill().await;
        } else {
            let mut last = (0.0, 0, 0);
            loop {
                if let Some(u) = proc_usage(pid) {
                    last = u;
                }
                if let Ok(Some(_)) = cap.try_wait() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            println!(
                "## kdpilot capture, {hits} hits at 115200 baud in {:.0} s: CPU {:.1} s, peak RSS {} kB",
                started.elapsed().as_secs_f64(),
                last.0,
                last.2
            );
        }
        let _ = sim.kill().await;
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let quick = args.iter().any(|a| a == "--quick");
    let hits: u64 = value("--hits")
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 15 } else { 36 });
    println!(
        "# kdpilot capture benchmark (simulator, x64 modern fake kernel, leaky driver, 2 CPUs)"
    );
    let mut runs = Vec::new();
    for baud in [19200, 115_200] {
        for hardware in [true, false] {
            if quick && baud == 115_200 && !hardware {
                continue;
            }
            runs.push(run(baud, hardware, hits, None, false).await);
            report(runs.last().expect("run"));
        }
    }
    // The goal is stated for 10-frame x64 hits at 19200 baud: the driver's deepest path.
    for hardware in [true, false] {
        runs.push(run(19200, hardware, hits, None, true).await);
        report(runs.last().expect("run"));
    }
    // What --track-frees adds, on a workload that frees most of what it allocates.
    for track in [false, true] {
        runs.push(run(19200, true, hits, Some(track), false).await);
        report(runs.last().expect("run"));
    }
    if let Some(secs) = value("--idle").and_then(|v| v.parse().ok()) {
        let kdpilot = value("--kdpilot").map(PathBuf::from).unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/kdpilot")
        });
        idle(&kdpilot, secs, if quick { 200 } else { 2000 }).await;
    }
}
