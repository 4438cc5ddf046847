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
use kdpilot_sim::workload::{AllocationSpec, OpKind};
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
    let _ = (activity, blocks);
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
            assert!(t.any(|s| *s == p), "hit {} is not a true stop: {p:?}", h.hit);
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
