//! `cargo xtask soak [--minutes N] [--quick] [--seed S] [--keep]`: a compressed night.
//!
//! The real `kdpilot capture` binary (built first, debug profile) captures from the simulator,
//! which runs in this process and serves its COM port on a Unix socket as a VM does, with the
//! fixture kernel (modern, x64) and the leaky driver allocating the tag `Leak` at a steady rate.
//! Through the night the harness:
//!
//! - reboots the target on a schedule (every other connection loses its socket while the
//!   target is down, the rest keep the link through a dead line), and bugchecks it twice;
//! - flips and drops bytes on every connection, both ways (the line model's seeded rates);
//! - makes the socket vanish and come back at moments that land anywhere (in a hit, a step,
//!   an arming, a boot);
//! - hangs the kernel (it stops reading the line) and makes the socket vanish during the hang,
//!   so kdpilot reconnects to a target that does not answer until the hang ends;
//! - has the kernel print DbgPrint strings full of terminal escape sequences on some
//!   connections.
//!
//! At the end it stops kdpilot with SIGINT, as a user would, and checks: every stop the
//! simulator made at the breakpoint (its ground truth) is in the JSON log once, with the
//! simulator's frames, size, tag, processor and thread; both logs parse; every reboot was
//! re-armed; the target was left running with nothing planted; no escape byte reached
//! kdpilot's stderr; kdpilot's peak memory (VmHWM) at the end is within a stated bound of its
//! peak at the start. Any failure exits nonzero.

mod check;
mod frees;
mod vm;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kdpilot_capture::record::LogLine;
use kdpilot_kd::Arch;
use kdpilot_sim::{AllocationActivity, Fault, Machine, MachineConfig};
use tokio::sync::mpsc;

use self::vm::{Control, SoakActivity, VmConfig};

/// One line for `cargo xtask help`.
pub const ABOUT: &str = "a compressed night against the simulator: reboots, lost links, a noisy \
                         line, a hang; every hit checked against the truth (--quick for CI)";

const LEAK: u32 = u32::from_le_bytes(*b"Leak");
const BREAKPOINT: &str = "nt!ExAllocateHeapSpecialPool";
/// Where `--track-frees` catches the frees of special-pool blocks on this (segment-heap) kernel.
const FREE_BREAKPOINT: &str = "nt!ExFreeHeapSpecialPool";
/// Where in the night the hang starts.
const HANG_AT: f64 = 0.5;
/// The longest the log may stay silent outside the hang: a reboot with the socket gone (4 s),
/// a vanished socket (up to 6 s) and kdpilot's reconnect back-off (up to 5 s) fit well inside.
const QUIET_LIMIT: Duration = Duration::from_secs(30);

/// What a night holds.
#[derive(Clone, Debug)]
struct Night {
    length: Duration,
    /// Orderly reboots asked of the kernel (bugchecks come on top).
    reboots: u32,
    bugchecks: u32,
    /// Times the socket vanishes outside the hang.
    vanishes: u32,
    /// How long the kernel hangs.
    hang: Duration,
    /// Allocations per second the driver tries to make.
    rate: f64,
    corrupt_rate: f64,
    drop_rate: f64,
    seed: u64,
    /// Allowed growth of kdpilot's peak memory from the first arming to the end.
    memory_bound_kib: u64,
    /// Fewest hits and reboots for the night to count.
    min_hits: usize,
    min_reboots: usize,
    /// The leak hunt: the workload frees most allocations, kdpilot runs with `--track-frees`.
    track_frees: bool,
}

impl Night {
    fn full(minutes: f64, seed: u64) -> Self {
        Night {
            length: Duration::from_secs_f64(minutes * 60.0),
            reboots: 24,
            bugchecks: 2,
            vanishes: 12,
            hang: Duration::from_secs(60),
            rate: 60.0,
            corrupt_rate: 1.0 / 5000.0,
            drop_rate: 1.0 / 20000.0,
            seed,
            memory_bound_kib: 8 * 1024,
            min_hits: 2000,
            min_reboots: 20,
            track_frees: false,
        }
    }

    fn quick(seed: u64) -> Self {
        Night {
            length: Duration::from_secs(120),
            reboots: 6,
            bugchecks: 1,
            vanishes: 4,
            hang: Duration::from_secs(20),
            min_hits: 300,
            min_reboots: 6,
            ..Night::full(2.0, seed)
        }
    }

    /// The same night as a leak hunt: the workload frees most of its allocations
    /// (`AllocationActivity::leak_hunt_specs`) and kdpilot runs with `--track-frees`.
    fn tracking_frees(self) -> Self {
        Night {
            track_frees: true,
            ..self
        }
    }
}

/// Runs the subcommand.
pub fn run(args: &[String]) -> Result<()> {
    let mut minutes = 12.0f64;
    let mut quick = false;
    let mut seed = 1u64;
    let mut keep = false;
    let mut track_frees = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--keep" => keep = true,
            "--track-frees" => track_frees = true,
            "--minutes" => {
                let v = it.next().context("--minutes needs a number")?;
                minutes = v.parse().with_context(|| format!("--minutes {v}"))?;
                if !(1.0..=15.0).contains(&minutes) {
                    bail!(
                        "--minutes {minutes}: give 1 to 15 (the night is compressed, and bounded)"
                    );
                }
            }
            "--seed" => {
                let v = it.next().context("--seed needs a number")?;
                seed = v.parse().with_context(|| format!("--seed {v}"))?;
            }
            other => bail!(
                "unknown argument `{other}` (--minutes N, --quick, --seed S, --keep, --track-frees)"
            ),
        }
    }
    let mut night = if quick {
        Night::quick(seed)
    } else {
        Night::full(minutes, seed)
    };
    if track_frees {
        night = night.tracking_frees();
    }
    let root = crate::workspace_root();
    println!("soak: building kdpilot");
    let status = std::process::Command::new("cargo")
        .args(["build", "--quiet", "-p", "kdpilot-cli", "--bin", "kdpilot"])
        .current_dir(&root)
        .status()?;
    if !status.success() {
        bail!("building kdpilot failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let exe = target.join("debug/kdpilot");
    let dir = std::env::temp_dir().join(format!("kdpilot-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = runtime.block_on(soak(&night, &exe, &root, &dir));
    if keep || result.is_err() {
        println!("soak: logs kept in {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

/// kdpilot's memory from /proc/PID/status, in KiB: (VmHWM, VmRSS).
fn memory(pid: u32) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse::<u64>()
            .ok()
    };
    Some((field("VmHWM:")?, field("VmRSS:")?))
}

/// A fault of the night, at a time from the start.
#[derive(Clone, Debug)]
enum Event {
    Fault(Fault),
    Vanish(Duration),
}

/// The night's faults in time order. The last tenth is quiet, so the capture ends on a link
/// that is up.
fn schedule(n: &Night) -> Vec<(Duration, Event)> {
    let at = |f: f64| n.length.mul_f64(f);
    let mut rng = n.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut out = Vec::new();
    let span = |i: u32, count: u32| 0.04 + 0.84 * (f64::from(i) + 0.5) / f64::from(count.max(1));
    for i in 0..n.reboots {
        out.push((at(span(i, n.reboots)), Event::Fault(Fault::Reboot)));
    }
    for i in 0..n.bugchecks {
        let f = 0.3 + 0.4 * f64::from(i) / f64::from(n.bugchecks.max(2) - 1);
        out.push((
            at(f),
            Event::Fault(Fault::BugCheck {
                code: 0xD1,
                parameters: [0x28, 2, 0, 0xfffff800_12345678],
            }),
        ));
    }
    for i in 0..n.vanishes {
        // Anywhere in its slot, gone for 0.5 to 6 s.
        let jitter = (next() % 1000) as f64 / 1000.0 - 0.5;
        let f = span(i, n.vanishes) + jitter * 0.8 / f64::from(n.vanishes.max(1));
        let gone = Duration::from_millis(500 + next() % 5500);
        out.push((at(f.clamp(0.03, 0.88)), Event::Vanish(gone)));
    }
    // The hang, with the socket gone for a few seconds in the middle of it: kdpilot reopens
    // it and finds a target that does not answer until the hang is over.
    let h = at(HANG_AT);
    out.push((h, Event::Fault(Fault::Hang(n.hang))));
    out.push((
        h + Duration::from_secs(3),
        Event::Vanish(Duration::from_secs(3)),
    ));
    out.sort_by_key(|(t, _)| *t);
    out
}

fn fixtures(root: &Path) -> PathBuf {
    root.join("fixtures/out/x64/modern")
}

async fn soak(n: &Night, exe: &Path, root: &Path, dir: &Path) -> Result<()> {
    let fix = fixtures(root);
    let mut config = MachineConfig::from_dir(Arch::Amd64, 19041, 2, n.seed, &fix)
        .context("the fixture kernel")?;
    config.special_pool_tag = LEAK;
    let machine = Machine::boot(config).context("booting the simulator")?;
    let specs = if n.track_frees {
        AllocationActivity::leak_hunt_specs(LEAK)
    } else {
        AllocationActivity::leakydrv_specs(LEAK)
    };
    let workload = AllocationActivity::from_fixture_dir(&fix, specs, n.seed, n.rate)?;
    let (activity, faults) = SoakActivity::new(workload);
    let socket = dir.join("com1.sock");
    let (control, control_rx) = mpsc::unbounded_channel();
    let vm_config = VmConfig {
        socket: socket.clone(),
        corrupt_rate: n.corrupt_rate,
        drop_rate: n.drop_rate,
        seed: n.seed,
        reboot_downtime: Duration::from_millis(1500),
        disconnect_downtime: Duration::from_secs(4),
    };
    let vm = tokio::spawn(vm::run(machine, activity, vm_config, control_rx));
    while !socket.exists() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "soak: {:.1} min night: {} reboots + {} bugchecks, {} vanished sockets + 1 during a {} s hang, \
         1 byte in {:.0} flipped and 1 in {:.0} lost both ways, {} allocations/s{} (seed {})",
        n.length.as_secs_f64() / 60.0,
        n.reboots,
        n.bugchecks,
        n.vanishes,
        n.hang.as_secs(),
        1.0 / n.corrupt_rate,
        1.0 / n.drop_rate,
        n.rate,
        if n.track_frees {
            " and frees (leak hunt, --track-frees)"
        } else {
            ""
        },
        n.seed
    );
    let log = dir.join("night.log");
    let json = dir.join("night.jsonl");
    let stderr_path = dir.join("kdpilot.stderr");
    let mut child = tokio::process::Command::new(exe)
        .args(["capture", "--tag", "Leak", "--offline", "--timeout", "30"])
        // The night is checked hit by hit against the ground truth: every hit recorded with
        // its frames (sampling and the per-stack cap are tested in tests/e2e/leaks.rs).
        .args(["--frozen-budget", "off", "--stack-cap", "0"])
        .args(n.track_frees.then_some("--track-frees"))
        .arg("--target")
        .arg(format!("unix:{}", socket.display()))
        .arg("--symbols")
        .arg(&fix)
        .arg("--log")
        .arg(&log)
        .env_remove("_NT_SYMBOL_PATH")
        .env_remove("_NT_DEBUG_LOG_FILE_APPEND")
        .env_remove("_NT_DEBUG_LOG_FILE_OPEN")
        .env_remove("KDPILOT_LOG")
        .env_remove("RUST_LOG")
        // To chase a finding: KDPILOT_SOAK_LOG=kdpilot_kd=debug becomes kdpilot's KDPILOT_LOG
        // (its stderr is kept with --keep).
        .envs(std::env::var_os("KDPILOT_SOAK_LOG").map(|v| ("KDPILOT_LOG", v)))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.join("kdpilot.stdout"))?)
        .stderr(std::fs::File::create(&stderr_path)?)
        .kill_on_drop(true)
        .spawn()
        .context("starting kdpilot")?;
    let pid = child.id().context("kdpilot's pid")?;
    let night = async {
        // The night starts when kdpilot has armed the first boot.
        let armed_by = Instant::now() + Duration::from_secs(120);
        while !std::fs::read_to_string(&json).is_ok_and(|s| s.contains("\"armed\"")) {
            if Instant::now() > armed_by {
                bail!("kdpilot did not arm within 120 s");
            }
            if let Ok(Some(st)) = child.try_wait() {
                bail!("kdpilot exited before arming: {st}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let start_mem = memory(pid).context("reading /proc/PID/status")?;
        let started = Instant::now();
        let started_wall = std::time::SystemTime::now();
        let mut plan = schedule(n).into_iter().peekable();
        let mut peak_rss = start_mem.1;
        let mut last_print = Instant::now();
        while started.elapsed() < n.length {
            while let Some((t, _)) = plan.peek() {
                if started.elapsed() < *t {
                    break;
                }
                let Some((_, ev)) = plan.next() else { break };
                match ev {
                    Event::Fault(f) => {
                        if let Ok(mut q) = faults.lock() {
                            q.push_back(f);
                        }
                    }
                    Event::Vanish(d) => {
                        let _ = control.send(Control::Vanish(d));
                    }
                }
            }
            if let Some((_, rss)) = memory(pid) {
                peak_rss = peak_rss.max(rss);
            }
            if let Ok(Some(st)) = child.try_wait() {
                bail!("kdpilot exited during the night: {st}");
            }
            if last_print.elapsed() >= Duration::from_secs(30) {
                last_print = Instant::now();
                let text = std::fs::read_to_string(&json).unwrap_or_default();
                let frees = if n.track_frees {
                    format!(
                        ", {} allocated, {} freed",
                        text.matches("\"event\":\"allocated\"").count(),
                        text.matches("\"event\":\"free\"").count()
                    )
                } else {
                    String::new()
                };
                println!(
                    "soak: {:>4} s: {} hits{frees}, {} boots, {} links lost, kdpilot VmRSS {} KiB",
                    started.elapsed().as_secs(),
                    text.lines()
                        .filter(|l| !l.contains("\"event\":") && l.contains("\"hit\":"))
                        .count(),
                    text.matches("\"event\":\"boot\"").count(),
                    text.matches("\"event\":\"link_lost\"").count(),
                    memory(pid).map_or(0, |m| m.1),
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let end_mem = memory(pid).context("reading /proc/PID/status")?;
        let wall = started.elapsed();
        // The user presses Ctrl-C.
        let _ = std::process::Command::new("kill")
            .args(["-INT", &pid.to_string()])
            .status();
        let status = tokio::time::timeout(Duration::from_secs(120), child.wait())
            .await
            .context("kdpilot did not end within 120 s of SIGINT")??;
        Ok((start_mem, end_mem, peak_rss, wall, status, started_wall))
    };
    let outcome = night.await;
    let _ = control.send(Control::Quit);
    let (machine, activity, vm_stats) = tokio::time::timeout(Duration::from_secs(120), vm)
        .await
        .context("the simulator did not stop")??;
    let (start_mem, end_mem, peak_rss, wall, status, started_wall) = outcome?;

    // The verdict.
    let mut failures: Vec<String> = Vec::new();
    if !status.success() {
        failures.push(format!("kdpilot exited with {status}"));
    }
    let lines = check::read_log(&json)?;
    let records: Vec<_> = lines
        .iter()
        .filter_map(|l| match l {
            LogLine::Hit(h) => Some(h),
            LogLine::Event(_) => None,
        })
        .collect();
    let (truth, repeated_stops) = check::truth_hits(&activity.inner.workload.truth, BREAKPOINT);
    let verdict = check::compare(&truth, &records);
    let frees = n.track_frees.then(|| {
        frees::check(
            &activity.inner.workload.truth,
            &truth,
            &verdict,
            &lines,
            FREE_BREAKPOINT,
        )
    });
    let text = std::fs::read_to_string(&log)?;
    let text_hits = text
        .lines()
        .filter(|l| {
            // `[time] boot N hit M  tag ...`, not `... hit M returned ...` nor `... free of hit M`.
            l.starts_with('[')
                && l.contains("] boot ")
                && l.contains(" hit ")
                && l.contains("  tag ")
        })
        .count();
    let rearm = check::rearm_times(&lines);
    let event_count = |kind: &str| {
        lines
            .iter()
            .filter(|l| matches!(l, LogLine::Event(e) if e.kind() == kind))
            .count()
    };
    let detached_clean = lines.iter().any(|l| {
        matches!(
            l,
            LogLine::Event(kdpilot_capture::record::EventRecord::Detached { clean: true, .. })
        )
    });
    let stderr = std::fs::read(&stderr_path)?;
    let escapes = stderr.iter().filter(|&&b| b == 0x1b).count()
        + String::from_utf8_lossy(&stderr).matches('\u{9b}').count();
    let prints_shown = String::from_utf8_lossy(&stderr)
        .matches("DbgPrint with escapes")
        .count();
    let sim_reboots = machine.boots.saturating_sub(1);
    // Silence is expected during the hang (and the reconnect after it); anywhere else a long
    // one means the capture stalled.
    let hang_at = started_wall + n.length.mul_f64(HANG_AT);
    let quiet = check::longest_quiet(&lines, (hang_at, hang_at + n.hang + QUIET_LIMIT));

    println!();
    println!(
        "soak: night of {:.1} s (wall), seed {}",
        wall.as_secs_f64(),
        n.seed
    );
    println!(
        "  allocations that stopped at {BREAKPOINT} (truth): {}",
        verdict.made
    );
    println!(
        "  records written: {} in the JSON log, {} in the text log",
        verdict.written, text_hits
    );
    println!(
        "  lost: {}, wrong: {}, duplicated: {}, misnumbered: {}; allocations the kernel stopped twice: {repeated_stops}",
        verdict.lost, verdict.wrong, verdict.duplicates, verdict.misnumbered
    );
    for e in &verdict.examples {
        println!("    {e}");
    }
    if let Some(f) = &frees {
        print_frees(f);
    }
    println!(
        "  reboots: {} by the simulator ({} with the socket gone for the downtime), {} seen by kdpilot, {} re-armed",
        sim_reboots, vm_stats.disconnect_reboots, rearm.reboots, rearm.rearmed
    );
    println!(
        "  time to re-arm, from the reboot's stop: {}",
        check::spread(&rearm.from_reboot)
    );
    println!(
        "  time to re-arm, from the new boot's first stop: {}",
        check::spread(&rearm.from_boot)
    );
    println!(
        "  links: {} connections, {} times the socket vanished, {} link_lost events; line damage: {} bytes flipped, {} lost",
        vm_stats.connections,
        vm_stats.vanished,
        event_count("link_lost"),
        vm_stats.bytes_corrupted,
        vm_stats.bytes_dropped
    );
    println!(
        "  faults handed to the kernel: {} reboots, {} bugchecks, {} hangs of {} s; link outages (link_lost to connected): {}",
        activity.applied[0],
        activity.applied[1],
        activity.applied[2],
        n.hang.as_secs(),
        check::spread(&check::outages(&lines))
    );
    println!(
        "  longest silence in the log outside the hang: {:.1} s (limit {} s)",
        quiet.as_secs_f64(),
        QUIET_LIMIT.as_secs()
    );
    println!(
        "  hostile DbgPrint: {} chatty connections, {} prints shown on stderr, {} escape bytes reached it",
        vm_stats.chatty_connections, prints_shown, escapes
    );
    println!(
        "  kdpilot memory: at the first arming VmHWM {} KiB, VmRSS {} KiB; at the end VmHWM {} KiB, VmRSS {} KiB; \
         largest VmRSS seen {} KiB (bound: VmHWM grows by at most {} KiB)",
        start_mem.0, start_mem.1, end_mem.0, end_mem.1, peak_rss, n.memory_bound_kib
    );
    println!(
        "  target at the end: {}, {} breakpoints planted",
        if machine.running {
            "running"
        } else {
            "stopped"
        },
        machine.planted().len()
    );

    if !verdict.clean() {
        failures.push("records lost, wrong, duplicated or misnumbered".into());
    }
    if let Some(f) = &frees {
        failures.extend(
            f.failures()
                .into_iter()
                .map(|s| format!("leak accounting: {s}")),
        );
    }
    if text_hits != verdict.written {
        failures.push(format!(
            "the text log has {text_hits} hits, the JSON log {}",
            verdict.written
        ));
    }
    if verdict.made < n.min_hits {
        failures.push(format!(
            "only {} hits (the night needs {})",
            verdict.made, n.min_hits
        ));
    }
    if (sim_reboots as usize) < n.min_reboots {
        failures.push(format!(
            "only {sim_reboots} reboots (the night needs {})",
            n.min_reboots
        ));
    }
    if rearm.rearmed != rearm.reboots || rearm.reboots < sim_reboots as usize {
        failures.push(format!(
            "{} reboots made, {} seen, {} re-armed",
            sim_reboots, rearm.reboots, rearm.rearmed
        ));
    }
    if !detached_clean || !machine.running || !machine.planted().is_empty() {
        failures.push("the target was not left clean and running".into());
    }
    if quiet > QUIET_LIMIT {
        failures.push(format!(
            "the capture was silent for {:.0} s outside the hang: a stall",
            quiet.as_secs_f64()
        ));
    }
    if activity.applied[2] == 0 {
        failures.push("the hang never happened".into());
    }
    if escapes > 0 {
        failures.push(format!(
            "{escapes} escape characters reached kdpilot's stderr"
        ));
    }
    if end_mem.0 > start_mem.0 + n.memory_bound_kib {
        failures.push(format!(
            "kdpilot's peak memory grew by {} KiB (bound {} KiB)",
            end_mem.0 - start_mem.0,
            n.memory_bound_kib
        ));
    }
    if failures.is_empty() {
        println!("soak: PASS");
        Ok(())
    } else {
        for f in &failures {
            println!("soak: FAIL: {f}");
        }
        bail!("{} check(s) failed", failures.len())
    }
}

/// The leak accounting figures, next to the hits'.
fn print_frees(f: &frees::FreeVerdict) {
    println!(
        "  allocated records: {}; hits with their address learnt: {} of {}, without: {} ({:.2}%, limit {:.0}%; \
         the simulator stopped at {} of their returns); wrong: {}, written twice: {} the same, {} different",
        f.allocated,
        f.learnt,
        f.hits,
        f.missing,
        100.0 * f.missing_share(),
        100.0 * frees::MISSING_LIMIT,
        f.missing_returned,
        f.wrong_address,
        f.repeated_same,
        f.repeated_different
    );
    println!(
        "  free records: {} (wrong {}, twice {}); frees expected (truth: a learnt block, stopped at {}): {}, \
         recorded {}, missing with the link up {}, missing with a link_lost around them {}",
        f.frees,
        f.free_wrong,
        f.free_duplicates,
        FREE_BREAKPOINT,
        f.expected,
        f.recorded,
        f.missing_link_up,
        f.missing_link_lost
    );
    println!(
        "  truth frees of learnt blocks that did not stop at {}: {} after the capture ended, {} while attached; \
         stops there of blocks not learnt: {}",
        FREE_BREAKPOINT, f.after_end, f.not_stopped, f.unknown_stops
    );
    if f.foreign_free_stops > 0 || !f.refusals.is_empty() {
        println!(
            "  kdpilot took {} stop(s) at {} for someone else's; the target refused {} breakpoint(s):",
            f.foreign_free_stops,
            FREE_BREAKPOINT,
            f.refusals.len()
        );
        for (boot, when, message, lost) in &f.refusals {
            println!(
                "    boot {boot}, {when}: \"{message}\"; frees of this boot lost (not recorded with the link up, \
                 or not stopped while attached): {lost}"
            );
        }
    }
    let paths: Vec<String> = f
        .by_path
        .iter()
        .map(|(p, o)| {
            let short = p.strip_prefix("leakydrv!").unwrap_or(p);
            if o.explained > 0 {
                format!(
                    "{short} {} / {} ({} explained)",
                    o.kdpilot, o.truth, o.explained
                )
            } else {
                format!("{short} {} / {}", o.kdpilot, o.truth)
            }
        })
        .collect();
    println!(
        "  outstanding at the end of the boots ({} boots), kdpilot / truth: {}",
        f.boots,
        paths.join(", ")
    );
    for e in &f.examples {
        println!("    {e}");
    }
}
