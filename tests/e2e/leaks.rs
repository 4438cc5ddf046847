//! Leak accounting and the guards of a long capture (issue 9), against the simulator: the
//! frozen-time budget samples hits and says so, the per-stack cap counts repeated stacks
//! without losing them, `--track-frees` pairs every captured allocation with its free, and a
//! special pool that runs out is noticed.

use std::path::PathBuf;
use std::time::Duration;

use kdpilot_capture::engine::{Capture, CaptureEvent, CaptureOptions, Guards};
use kdpilot_capture::record::{EventRecord, HitRecord};
use kdpilot_capture::strategy::StrategyChoice;
use kdpilot_kd::client::EventSink;
use kdpilot_kd::Arch;
use kdpilot_sim::workload::{AllocationSpec, OpKind, TruthRecord};
use kdpilot_sim::{
    serve_with, AllocationActivity, FaultyLine, LineModel, Machine, MachineConfig, TargetOptions,
};

use crate::support::*;

const LEAK: u32 = u32::from_le_bytes(*b"Leak");

fn dir(arch: Arch, flavour: &str) -> PathBuf {
    let a = if arch == Arch::Amd64 { "x64" } else { "x86" };
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/out")
        .join(a)
        .join(flavour)
}

/// One capture against a simulated machine.
struct Run {
    arch: Arch,
    flavour: &'static str,
    strategy: StrategyChoice,
    specs: Vec<AllocationSpec>,
    hits: u64,
    track_frees: bool,
    guards: Guards,
    /// Special pool's capacity in blocks (`None`: unlimited).
    special_pool_blocks: Option<u64>,
    /// Allocations per second of the workload.
    rate: f64,
    limit: Duration,
}

impl Run {
    fn new(arch: Arch, flavour: &'static str) -> Self {
        Self {
            arch,
            flavour,
            strategy: StrategyChoice::Auto,
            specs: AllocationActivity::leakydrv_specs(LEAK),
            hits: 20,
            track_frees: false,
            guards: Guards::default(),
            special_pool_blocks: None,
            rate: 200.0,
            limit: Duration::from_secs(60),
        }
    }
}

struct Outcome {
    events: Vec<CaptureEvent>,
    machine: Machine,
    activity: AllocationActivity,
}

impl Outcome {
    fn hits(&self) -> Vec<HitRecord> {
        self.events
            .iter()
            .filter_map(|e| match e {
                CaptureEvent::Hit(h) => Some((**h).clone()),
                _ => None,
            })
            .collect()
    }

    fn records(&self) -> Vec<EventRecord> {
        self.events
            .iter()
            .filter_map(|e| match e {
                CaptureEvent::Record(r) => Some((**r).clone()),
                _ => None,
            })
            .collect()
    }
}

async fn run(r: Run) -> Outcome {
    let d = dir(r.arch, r.flavour);
    let mut mconfig = MachineConfig::from_dir(r.arch, 19041, 2, 21, &d).unwrap();
    mconfig.special_pool_tag = LEAK;
    let mut machine = Machine::boot(mconfig).unwrap();
    let mut activity = AllocationActivity::from_fixture_dir(&d, r.specs, 8, r.rate).unwrap();
    set_special_pool_blocks(&mut activity, r.special_pool_blocks);
    let (host, target) = tokio::io::duplex(64 * 1024);
    let model = LineModel::clean();
    let tm = model.clone();
    let sim = tokio::spawn(async move {
        let _ = serve_with(
            FaultyLine::new(target, tm),
            &mut machine,
            &TargetOptions::default(),
            &mut activity,
        )
        .await;
        (machine, activity)
    });
    let stopped = connect(
        FaultyLine::new(host, model.clone()),
        config(&model, EventSink::none()),
    )
    .await;
    let mut events = Vec::new();
    let options = CaptureOptions {
        tag: LEAK,
        strategy: r.strategy,
        symbols: d.display().to_string(),
        offline: true,
        max_hits: Some(r.hits),
        duration: Some(r.limit),
        hardware_breakpoint: true,
        measure: false,
        track_frees: r.track_frees,
        guards: r.guards,
    };
    let mut capture = Capture::new(options, |e| events.push(e.clone())).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    capture.run(stopped, &stop).await.expect("capture");
    drop(capture);
    let (machine, activity) = sim.await.unwrap();
    assert!(machine.running, "the target was left stopped");
    assert!(
        machine.planted().is_empty(),
        "a breakpoint was left planted: {:?}",
        machine.planted()
    );
    Outcome {
        events,
        machine,
        activity,
    }
}

fn set_special_pool_blocks(activity: &mut AllocationActivity, blocks: Option<u64>) {
    activity.workload.special_pool_blocks = blocks;
}

/// The truth's allocations (or frees) that stopped at `function`, in order.
fn truth_ops<'a>(
    activity: &'a AllocationActivity,
    function: &str,
    kind: OpKind,
) -> Vec<&'a TruthRecord> {
    activity
        .workload
        .truth
        .iter()
        .filter(|t| t.kind == kind)
        .filter(|t| {
            t.stops.iter().any(|s| {
                s.first()
                    .is_some_and(|f| format!("{}!{}", f.module, f.function) == function)
            })
        })
        .collect()
}

/// The truth's stops whose innermost frame is `function`, as call sites.
fn truth_stops(activity: &AllocationActivity, function: &str) -> Vec<Vec<String>> {
    activity
        .workload
        .truth
        .iter()
        .filter(|t| t.kind == OpKind::Alloc)
        .flat_map(|t| t.stops.iter())
        .filter(|s| {
            s.first()
                .is_some_and(|f| format!("{}!{}", f.module, f.function) == function)
        })
        .map(|s| s.iter().map(ToString::to_string).collect())
        .collect()
}

fn printed(frames: &[kdpilot_capture::record::FrameRecord]) -> Vec<String> {
    frames
        .iter()
        .map(|f| f.call_site())
        .take_while(|s| !s.starts_with("0x"))
        .collect()
}

#[tokio::test]
async fn a_frozen_budget_samples_hits_and_says_so() {
    bounded(async {
        let mut r = Run::new(Arch::Amd64, "modern");
        r.hits = 12;
        r.guards = Guards {
            // Every stop costs milliseconds here: a budget of 1 ms per 2 s is always over.
            frozen_budget: Some(Duration::from_millis(1)),
            budget_window: Duration::from_secs(2),
            ..Guards::default()
        };
        let out = run(r).await;
        let hits = out.hits();
        let sampled: Vec<(u64, u64)> = out
            .records()
            .iter()
            .filter_map(|e| match e {
                EventRecord::Sampled {
                    one_in, skipped, ..
                } => Some((*one_in, *skipped)),
                _ => None,
            })
            .collect();
        assert!(
            sampled.iter().any(|(n, _)| *n >= 4),
            "sampling went to 1 in 4 or sparser: {sampled:?}"
        );
        let skipped: u64 = sampled.iter().map(|(_, s)| s).sum();
        assert!(skipped > 0);
        // Nothing is lost without a trace: recorded + skipped = every stop at the breakpoint.
        let truth = truth_stops(&out.activity, "nt!ExAllocateHeapSpecialPool");
        assert_eq!(
            hits.len() as u64 + skipped,
            truth.len() as u64,
            "hits {} + skipped {skipped} = stops at the breakpoint",
            hits.len()
        );
        // The recorded hits are true stops, in order (a subsequence of the truth).
        let mut t = truth.iter();
        for h in &hits {
            let p = printed(&h.frames);
            assert!(
                t.any(|s| *s == p),
                "hit {} is not a true stop: {p:?}",
                h.hit
            );
        }
    })
    .await;
}

#[tokio::test]
async fn the_stack_cap_counts_repeated_stacks_without_losing_them() {
    bounded(async {
        let mut r = Run::new(Arch::Amd64, "modern");
        r.hits = 30;
        r.guards = Guards {
            stack_cap: Some(2),
            ..Guards::default()
        };
        let out = run(r).await;
        let hits = out.hits();
        assert_eq!(hits.len(), 30);
        let truth = truth_stops(&out.activity, "nt!ExAllocateHeapSpecialPool");
        let mut full: std::collections::HashMap<Vec<String>, Vec<u64>> = Default::default();
        let mut capped = 0;
        for (h, t) in hits.iter().zip(&truth) {
            match h.same_stack_as {
                None => {
                    assert_eq!(printed(&h.frames), *t, "hit {}", h.hit);
                    full.entry(printed(&h.frames)).or_default().push(h.hit);
                }
                Some(first) => {
                    capped += 1;
                    assert!(h.frames.is_empty());
                    let f = hits.iter().find(|x| x.hit == first).expect("first hit");
                    assert_eq!(printed(&f.frames), *t, "hit {} same as {first}", h.hit);
                }
            }
        }
        assert!(capped > 0, "some stacks repeated past the cap");
        assert!(
            full.values().all(|v| v.len() <= 2),
            "at most 2 full records per stack: {full:?}"
        );
    })
    .await;
}

/// The driver function that made an operation (the last `leakydrv!` step of its path).
fn driver_function(t: &TruthRecord) -> String {
    t.path
        .iter()
        .rev()
        .find(|p| p.starts_with("leakydrv!"))
        .cloned()
        .unwrap_or_default()
}

const LEAKING: [&str; 2] = ["leakydrv!LeakyAllocPushes", "leakydrv!LeakyAllocViaPool2"];

#[tokio::test]
async fn track_frees_pairs_every_captured_allocation_with_its_free() {
    bounded(async {
        for (arch, flavour, strategy, stop_at, free_at) in [
            (
                Arch::Amd64,
                "modern",
                StrategyChoice::SpecialPool,
                "nt!ExAllocateHeapSpecialPool",
                "nt!ExFreeHeapSpecialPool",
            ),
            (
                Arch::Amd64,
                "classic",
                StrategyChoice::SpecialPool,
                "nt!MmAllocateSpecialPool",
                "nt!MmFreeSpecialPool",
            ),
            (
                Arch::X86,
                "classic",
                StrategyChoice::SpecialPool,
                "nt!MmAllocateSpecialPool",
                "nt!MmFreeSpecialPool",
            ),
            (
                Arch::Amd64,
                "modern",
                StrategyChoice::PoolHitTag,
                "nt!DbgBreakPoint",
                "nt!DbgBreakPoint",
            ),
            (
                Arch::X86,
                "classic",
                StrategyChoice::PoolHitTag,
                "nt!DbgBreakPoint",
                "nt!DbgBreakPoint",
            ),
        ] {
            let what = format!("{arch} {flavour} {strategy}");
            let mut r = Run::new(arch, flavour);
            r.strategy = strategy;
            r.specs = AllocationActivity::leak_hunt_specs(LEAK);
            r.hits = 30;
            r.track_frees = true;
            let out = run(r).await;
            let hits = out.hits();
            assert_eq!(hits.len(), 30, "{what}");
            let allocs = truth_ops(&out.activity, stop_at, OpKind::Alloc);
            let records = out.records();
            let mut learnt = std::collections::BTreeMap::new();
            for e in &records {
                if let EventRecord::Allocated { hit, address, .. } = e {
                    let t = allocs[(*hit - 1) as usize];
                    assert_eq!(*address, t.address, "{what}: hit {hit}'s address");
                    learnt.insert(*address, *hit);
                }
            }
            // Only the last hit's return may still be on its way when the capture ends.
            assert!(learnt.len() >= hits.len() - 1, "{what}: {} learnt", learnt.len());
            let mut freed = std::collections::BTreeSet::new();
            for e in &records {
                if let EventRecord::Free {
                    hit,
                    address,
                    frames,
                    ..
                } = e
                {
                    assert_eq!(learnt.get(address), Some(hit), "{what}: free of {address:#x}");
                    let op = out
                        .activity
                        .workload
                        .truth
                        .iter()
                        .find(|t| t.kind == OpKind::Free && t.address == *address)
                        .expect("a true free");
                    assert_eq!(
                        printed(frames),
                        op.stops[0].iter().map(ToString::to_string).collect::<Vec<_>>(),
                        "{what}: the freeing stack of hit {hit}"
                    );
                    assert!(freed.insert(*hit), "{what}: hit {hit} freed twice");
                }
            }
            // Every free of a learnt block that stopped at the free breakpoint is recorded.
            for t in truth_ops(&out.activity, free_at, OpKind::Free) {
                if let Some(hit) = learnt.get(&t.address) {
                    assert!(freed.contains(hit), "{what}: the free of hit {hit} is missing");
                }
            }
            assert!(!freed.is_empty(), "{what}: frees were caught");
            // What is left outstanding is exactly the leaking paths (and at most the last
            // balanced allocation, whose free had not come yet).
            let mut balanced_left = 0;
            for (address, hit) in &learnt {
                let t = allocs[(*hit - 1) as usize];
                let f = driver_function(t);
                if LEAKING.contains(&f.as_str()) {
                    assert!(!freed.contains(hit), "{what}: a leak was freed: {address:#x}");
                } else if !freed.contains(hit) {
                    balanced_left += 1;
                }
            }
            assert!(balanced_left <= 1, "{what}: {balanced_left} balanced allocations not freed");
            assert!(
                learnt
                    .values()
                    .any(|h| LEAKING.contains(&driver_function(allocs[(*h - 1) as usize]).as_str())),
                "{what}: the workload leaked something"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn special_pool_exhaustion_is_noticed_and_followed_with_pool_hit_tag() {
    bounded(async {
        for switch in [true, false] {
            let mut r = Run::new(Arch::Amd64, "modern");
            // Special pool holds 4 blocks; the default workload mostly leaks: it fills up.
            r.special_pool_blocks = Some(4);
            r.hits = if switch { 12 } else { 100 };
            r.limit = Duration::from_secs(if switch { 30 } else { 8 });
            r.guards = Guards {
                on_exhaustion: if switch {
                    kdpilot_capture::engine::OnExhaustion::PoolHitTag
                } else {
                    kdpilot_capture::engine::OnExhaustion::Warn
                },
                exhaustion_quiet: Duration::from_secs(1),
                probe_window: Duration::from_secs(3),
                ..Guards::default()
            };
            let out = run(r).await;
            let hits = out.hits();
            let exhausted: Vec<bool> = out
                .records()
                .iter()
                .filter_map(|e| match e {
                    EventRecord::SpecialPoolExhausted { switched, .. } => Some(*switched),
                    _ => None,
                })
                .collect();
            let warnings: Vec<&String> = out
                .events
                .iter()
                .filter_map(|e| match e {
                    CaptureEvent::Warning(w) => Some(w),
                    _ => None,
                })
                .collect();
            assert_eq!(
                exhausted,
                vec![switch],
                "one special_pool_exhausted record; {} hits, warnings {warnings:?}",
                hits.len()
            );
            let special = hits
                .iter()
                .filter(|h| h.breakpoint == "nt!ExAllocateHeapSpecialPool")
                .count();
            let special_truth = truth_stops(&out.activity, "nt!ExAllocateHeapSpecialPool");
            assert_eq!(
                special,
                special_truth.len(),
                "every special-pool hit recorded"
            );
            let by_tag: Vec<&HitRecord> = hits
                .iter()
                .filter(|h| h.breakpoint == "nt!PoolHitTag")
                .collect();
            let tag_truth = truth_stops(&out.activity, "nt!DbgBreakPoint");
            let got: Vec<Vec<String>> = by_tag.iter().map(|h| printed(&h.frames)).collect();
            assert_eq!(
                got,
                tag_truth[..got.len()],
                "PoolHitTag hits are true stops"
            );
            if switch {
                assert_eq!(hits.len(), 12);
                assert!(
                    by_tag.len() > 1,
                    "the capture followed the tag with PoolHitTag"
                );
                assert!(out.events.iter().any(|e| matches!(e,
                    CaptureEvent::Armed { target, .. } if target == "nt!PoolHitTag")));
            } else {
                assert_eq!(by_tag.len(), 1, "warn: only the probe's allocation");
            }
            assert_eq!(
                out.machine.pool_hit_tag(),
                Some(0xffff_ff0f),
                "PoolHitTag restored"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn lost_links_keep_every_pairing_right() {
    bounded(async {
        let d = dir(Arch::Amd64, "modern");
        let mut mconfig = MachineConfig::from_dir(Arch::Amd64, 19041, 2, 78, &d).unwrap();
        mconfig.special_pool_tag = LEAK;
        let mut machine = Machine::boot(mconfig).unwrap();
        let mut activity = AllocationActivity::from_fixture_dir(
            &d,
            AllocationActivity::leak_hunt_specs(LEAK),
            10,
            200.0,
        )
        .unwrap();
        // The simulator counts every stop (hits, returns, frees).
        activity.reboot_every_hits = Some(50);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<tokio::io::DuplexStream>();
        let sim = tokio::spawn(async move {
            while let Some(line) = rx.recv().await {
                let _ =
                    serve_with(line, &mut machine, &TargetOptions::default(), &mut activity).await;
            }
            (machine, activity)
        });
        // Cuts after byte counts that land anywhere: in a hit, a return, a free, while the
        // extra breakpoints are being planted, in a boot's arming.
        // The first link lives long enough to arm (a failed first connection ends a capture).
        let cuts: std::collections::VecDeque<(u64, Option<u32>)> = std::iter::once(30_000)
            .chain((0..14u64).map(|i| 500 + i * 997 % 5000))
            .map(|b| (b, None))
            .collect();
        let n_cuts = cuts.len();
        let mut connector = crate::capture::CuttingConnector { lines: tx, cuts };
        let mut events = Vec::new();
        let options = CaptureOptions {
            tag: LEAK,
            strategy: StrategyChoice::SpecialPool,
            symbols: d.display().to_string(),
            offline: true,
            max_hits: Some(40),
            duration: Some(Duration::from_secs(100)),
            hardware_breakpoint: true,
            measure: false,
            track_frees: true,
            guards: Guards::default(),
        };
        let mut capture = Capture::new(options, |e| events.push(e.clone())).unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        capture
            .run_with(&mut connector, &stop)
            .await
            .expect("capture");
        drop(capture);
        drop(connector);
        let (machine, activity) = sim.await.unwrap();
        assert!(machine.running);
        assert!(
            machine.planted().is_empty(),
            "left planted: {:?}",
            machine.planted()
        );
        let lost = events
            .iter()
            .filter(|e| matches!(e, CaptureEvent::LinkLost { .. }))
            .count();
        assert!(
            lost + 3 >= n_cuts,
            "{lost} of {n_cuts} cuts were lost links"
        );
        let hits: Vec<HitRecord> = events
            .iter()
            .filter_map(|e| match e {
                CaptureEvent::Hit(h) => Some((**h).clone()),
                _ => None,
            })
            .collect();
        assert_eq!(hits.len(), 40);
        let allocs = truth_ops(&activity, "nt!ExAllocateHeapSpecialPool", OpKind::Alloc);
        let mut learnt = std::collections::BTreeMap::new();
        let mut freed = std::collections::BTreeSet::new();
        for e in &events {
            match e {
                CaptureEvent::Record(r) => match &**r {
                    EventRecord::Allocated { hit, address, .. } => {
                        let t = allocs[(*hit - 1) as usize];
                        assert_eq!(*address, t.address, "hit {hit}'s address");
                        assert!(learnt.insert(*address, *hit).is_none(), "learnt twice");
                    }
                    EventRecord::Free { hit, address, .. } => {
                        assert_eq!(learnt.get(address), Some(hit), "free of {address:#x}");
                        assert!(freed.insert(*hit), "hit {hit} freed twice");
                    }
                    _ => {}
                },
                CaptureEvent::Warning(w) => {
                    assert!(
                        !w.contains("refused a breakpoint"),
                        "a breakpoint was refused: {w}"
                    );
                }
                _ => {}
            }
        }
        // A return whose link died before it came is not learnt; everything else is.
        assert!(
            learnt.len() + lost + 1 >= hits.len(),
            "{} learnt",
            learnt.len()
        );
        // Every free of a learnt block that stopped at the free breakpoint is recorded.
        let missing: Vec<u64> = truth_ops(&activity, "nt!ExFreeHeapSpecialPool", OpKind::Free)
            .iter()
            .filter_map(|t| learnt.get(&t.address).copied())
            .filter(|h| !freed.contains(h))
            .collect();
        eprintln!(
            "{lost} links lost; {} learnt, {} frees recorded",
            learnt.len(),
            freed.len()
        );
        assert!(
            missing.is_empty(),
            "frees of hits {missing:?} were not recorded"
        );
    })
    .await;
}

/// The host's end of a line that dies right after the host has written its `n`-th
/// WriteBreakPoint request (ApiNumber 0x3134 at the start of a manipulate packet's body): the
/// kernel gets the request, plants the breakpoint and replies, but the reply (the handle) never
/// reaches the host: from then on the host reads nothing, and its next write, 300 ms or more
/// later, finds the line dead.
struct DiesAfterPlant {
    inner: tokio::io::DuplexStream,
    left: Option<u32>,
    dead_since: Option<std::time::Instant>,
}

impl DiesAfterPlant {
    fn gone(&self) -> bool {
        self.dead_since
            .is_some_and(|t| t.elapsed() >= Duration::from_millis(300))
    }
}

impl tokio::io::AsyncRead for DiesAfterPlant {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.gone() {
            return std::task::Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into()));
        }
        if self.dead_since.is_some() {
            // The kernel's ACK and reply go nowhere.
            let mut scratch = [0u8; 4096];
            let mut sink = tokio::io::ReadBuf::new(&mut scratch);
            while let std::task::Poll::Ready(Ok(())) =
                std::pin::Pin::new(&mut self.inner).poll_read(cx, &mut sink)
            {
                if sink.filled().is_empty() {
                    break;
                }
                sink.clear();
            }
            return std::task::Poll::Pending;
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for DiesAfterPlant {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.dead_since.is_some() {
            if self.gone() {
                return std::task::Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into()));
            }
            return std::task::Poll::Ready(Ok(buf.len()));
        }
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        // A data packet (leader 0x30303030, type 2) whose body starts with 0x3134.
        let plant = buf.len() > 20
            && buf[..4] == [0x30; 4]
            && buf[4..6] == [2, 0]
            && buf[16..20] == [0x34, 0x31, 0, 0];
        if plant {
            if let Some(n) = self.left.as_mut() {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.dead_since = Some(std::time::Instant::now());
                }
            }
        }
        r
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

struct PlantCutter {
    lines: tokio::sync::mpsc::UnboundedSender<tokio::io::DuplexStream>,
    cuts: std::collections::VecDeque<Option<u32>>,
}

impl kdpilot_capture::engine::Connector for PlantCutter {
    type Link = DiesAfterPlant;

    async fn connect(
        &mut self,
        _reconnect: bool,
    ) -> Result<kdpilot_kd::client::Stopped<Self::Link>, kdpilot_capture::engine::ConnectError>
    {
        let (host, target) = tokio::io::duplex(64 * 1024);
        let _ = self.lines.send(target);
        let io = DiesAfterPlant {
            inner: host,
            left: self.cuts.pop_front().flatten(),
            dead_since: None,
        };
        kdpilot_kd::client::Connection::new(io, config(&LineModel::clean(), EventSink::none()))
            .connect(Duration::from_secs(30))
            .await
            .map_err(|e| kdpilot_capture::engine::ConnectError {
                message: e.to_string(),
                retry: true,
            })
    }

    fn describe(&self) -> String {
        "a line that dies as breakpoints are planted".into()
    }
}

#[tokio::test]
async fn a_breakpoint_planted_as_the_link_died_is_planted_again() {
    bounded(async {
        let d = dir(Arch::Amd64, "modern");
        let mut mconfig = MachineConfig::from_dir(Arch::Amd64, 19041, 2, 79, &d).unwrap();
        mconfig.special_pool_tag = LEAK;
        let mut machine = Machine::boot(mconfig).unwrap();
        let mut activity = AllocationActivity::from_fixture_dir(
            &d,
            AllocationActivity::leak_hunt_specs(LEAK),
            12,
            200.0,
        )
        .unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<tokio::io::DuplexStream>();
        let sim = tokio::spawn(async move {
            while let Some(line) = rx.recv().await {
                let _ =
                    serve_with(line, &mut machine, &TargetOptions::default(), &mut activity).await;
            }
            (machine, activity)
        });
        // Each link dies just after a WriteBreakPoint went out: the free breakpoint at the
        // first arming, then return breakpoints; the last link lives.
        let cuts = [Some(1), Some(2), Some(1), Some(3), Some(2), None]
            .into_iter()
            .collect();
        let mut connector = PlantCutter { lines: tx, cuts };
        let mut events = Vec::new();
        let options = CaptureOptions {
            tag: LEAK,
            strategy: StrategyChoice::SpecialPool,
            symbols: d.display().to_string(),
            offline: true,
            max_hits: Some(20),
            duration: Some(Duration::from_secs(60)),
            hardware_breakpoint: true,
            measure: false,
            track_frees: true,
            guards: Guards::default(),
        };
        let mut capture = Capture::new(options, |e| events.push(e.clone())).unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        capture
            .run_with(&mut connector, &stop)
            .await
            .expect("capture");
        drop(capture);
        drop(connector);
        let (machine, activity) = sim.await.unwrap();
        assert!(
            machine.planted().is_empty(),
            "left planted: {:?}",
            machine.planted()
        );
        let lost = events
            .iter()
            .filter(|e| matches!(e, CaptureEvent::LinkLost { .. }))
            .count();
        assert_eq!(lost, 5, "every cut link was lost and reopened");
        for e in &events {
            if let CaptureEvent::Warning(w) = e {
                assert!(!w.contains("refused a breakpoint"), "{w}");
                assert!(!w.contains("not kdpilot's"), "a stray breakpoint: {w}");
            }
        }
        let learnt: std::collections::BTreeMap<u64, u64> = events
            .iter()
            .filter_map(|e| match e {
                CaptureEvent::Record(r) => match &**r {
                    EventRecord::Allocated { hit, address, .. } => Some((*address, *hit)),
                    _ => None,
                },
                _ => None,
            })
            .collect();
        let freed: std::collections::BTreeSet<u64> = events
            .iter()
            .filter_map(|e| match e {
                CaptureEvent::Record(r) => match &**r {
                    EventRecord::Free { hit, .. } => Some(*hit),
                    _ => None,
                },
                _ => None,
            })
            .collect();
        let missing: Vec<u64> = truth_ops(&activity, "nt!ExFreeHeapSpecialPool", OpKind::Free)
            .iter()
            .filter_map(|t| learnt.get(&t.address).copied())
            .filter(|h| !freed.contains(h))
            .collect();
        assert!(missing.is_empty(), "frees of hits {missing:?} were lost");
        assert!(!freed.is_empty());
    })
    .await;
}
