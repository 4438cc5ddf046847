//! The capture engine against the simulator running the fixture kernels and the leaky driver:
//! every hit's frames equal the ground truth, on classic and modern kernels, with the
//! pool-hit-tag strategy, and across reboots (new KASLR bases, re-armed by itself); the target
//! is left running with nothing planted.

use std::path::PathBuf;
use std::time::Duration;

use kdpilot_capture::engine::{Capture, CaptureEvent, CaptureOptions};
use kdpilot_capture::record::HitRecord;
use kdpilot_capture::strategy::StrategyChoice;
use kdpilot_kd::client::EventSink;
use kdpilot_kd::Arch;
use kdpilot_sim::workload::OpKind;
use kdpilot_sim::{
    serve_with, AllocationActivity, FaultyLine, LineModel, Machine, MachineConfig, TargetOptions,
};

use crate::support::*;

const LEAK: u32 = u32::from_le_bytes(*b"Leak");

struct Scenario {
    arch: Arch,
    flavour: &'static str,
    strategy: StrategyChoice,
    hits: u64,
    reboot_every_hits: Option<u64>,
    model: LineModel,
    hardware: bool,
}

fn dir(arch: Arch, flavour: &str) -> PathBuf {
    let a = if arch == Arch::Amd64 { "x64" } else { "x86" };
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/out")
        .join(a)
        .join(flavour)
}

async fn run(
    sc: Scenario,
) -> (
    Vec<HitRecord>,
    Vec<CaptureEvent>,
    Machine,
    AllocationActivity,
) {
    let d = dir(sc.arch, sc.flavour);
    let mut mconfig = MachineConfig::from_dir(sc.arch, 19041, 2, 21, &d).unwrap();
    mconfig.special_pool_tag = LEAK;
    let mut machine = Machine::boot(mconfig).unwrap();
    let mut activity = AllocationActivity::from_fixture_dir(
        &d,
        AllocationActivity::leakydrv_specs(LEAK),
        8,
        200.0,
    )
    .unwrap();
    activity.reboot_every_hits = sc.reboot_every_hits;
    let (host, target) = tokio::io::duplex(64 * 1024);
    let tm = LineModel {
        seed: sc.model.seed + 1,
        ..sc.model.clone()
    };
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
        FaultyLine::new(host, sc.model.clone()),
        config(&sc.model, EventSink::none()),
    )
    .await;
    let mut events = Vec::new();
    let options = CaptureOptions {
        tag: LEAK,
        strategy: sc.strategy,
        symbols: d.display().to_string(),
        offline: true,
        max_hits: Some(sc.hits),
        duration: Some(Duration::from_secs(90)),
        hardware_breakpoint: sc.hardware,
        measure: true,
        track_frees: false,
        guards: kdpilot_capture::engine::Guards::default(),
    };
    let mut capture = Capture::new(options, |e| events.push(e.clone())).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let hits = capture.run(stopped, &stop).await.expect("capture");
    drop(capture);
    assert_eq!(hits, sc.hits);
    let (machine, activity) = sim.await.unwrap();
    let records = events
        .iter()
        .filter_map(|e| match e {
            CaptureEvent::Hit(h) => Some((**h).clone()),
            _ => None,
        })
        .collect();
    (records, events, machine, activity)
}

/// The truth stops at `function` (module!function of the innermost frame), in order.
fn truth_stops(
    activity: &AllocationActivity,
    function: &str,
    kind: Option<OpKind>,
) -> Vec<Vec<String>> {
    activity
        .workload
        .truth
        .iter()
        .filter(|t| kind.is_none_or(|k| t.kind == k))
        .flat_map(|t| t.stops.iter())
        .filter(|s| {
            s.first()
                .is_some_and(|f| format!("{}!{}", f.module, f.function) == function)
        })
        .map(|s| s.iter().map(ToString::to_string).collect())
        .collect()
}

fn printed(h: &HitRecord) -> Vec<String> {
    h.frames
        .iter()
        .map(|f| f.call_site())
        .take_while(|s| !s.starts_with("0x"))
        .collect()
}

fn check_clean(machine: &Machine) {
    let left = machine.leftovers(LEAK);
    assert!(
        left.is_empty(),
        "the capture left the target unclean: {left:?}"
    );
}

/// The hits' line costs, and whether every one was a hardware breakpoint hit.
fn costs(events: &[CaptureEvent]) -> Vec<kdpilot_capture::engine::HitCost> {
    events
        .iter()
        .filter_map(|e| match e {
            CaptureEvent::HitCost(c) => Some(c.clone()),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn special_pool_capture_matches_ground_truth() {
    bounded(async {
        for (arch, flavour, target) in [
            (Arch::Amd64, "modern", "nt!ExAllocateHeapSpecialPool"),
            (Arch::Amd64, "classic", "nt!MmAllocateSpecialPool"),
            (Arch::X86, "classic", "nt!MmAllocateSpecialPool"),
        ] {
            let sc = Scenario {
                arch,
                flavour,
                strategy: StrategyChoice::Auto,
                hits: 8,
                reboot_every_hits: None,
                model: LineModel::clean(),
                hardware: true,
            };
            let (records, events, machine, activity) = run(sc).await;
            check_clean(&machine);
            assert!(events
                .iter()
                .any(|e| matches!(e, CaptureEvent::Armed { target: t, .. } if t == target)));
            let truth = truth_stops(&activity, target, None);
            let got: Vec<Vec<String>> = records.iter().map(printed).collect();
            assert_eq!(got, truth[..got.len()], "{arch} {flavour}");
            // Through the debug register: no step, no re-plant, on both architectures.
            let c = costs(&events);
            assert_eq!(c.len(), records.len());
            assert!(c.iter().all(|c| c.hardware), "{arch} {flavour}: {c:?}");
            // No hit costs less than the protocol's minimum for what it read.
            for cost in &c {
                let (tx, rx) = kdpilot_capture::cost::lower_bound(cost, arch);
                assert!(
                    cost.bytes_tx >= tx && cost.bytes_rx >= rx && cost.stack_touched > 0,
                    "{arch} {flavour}: {cost:?} under the bound ({tx}, {rx})"
                );
            }
            assert!(machine.planted().is_empty() && machine.stops as usize >= records.len());
            assert!(records.iter().all(|r| r.tag_value == LEAK && r.size > 0));
        }
    })
    .await;
}

#[tokio::test]
async fn pool_hit_tag_capture_restores_the_tag() {
    bounded(async {
        let sc = Scenario {
            arch: Arch::Amd64,
            flavour: "modern",
            strategy: StrategyChoice::PoolHitTag,
            hits: 16,
            reboot_every_hits: None,
            model: LineModel::clean(),
            hardware: true,
        };
        let (records, _events, machine, activity) = run(sc).await;
        check_clean(&machine);
        assert_eq!(
            machine.pool_hit_tag(),
            Some(0xffff_ff0f),
            "PoolHitTag restored"
        );
        // Allocations and frees of the tag both break; only allocations are hits (the
        // frees, with --track-frees, are `free` records).
        let truth: Vec<Vec<String>> =
            truth_stops(&activity, "nt!DbgBreakPoint", Some(OpKind::Alloc));
        let got: Vec<Vec<String>> = records.iter().map(printed).collect();
        assert_eq!(got, truth[..got.len()]);
        let frees = truth_stops(&activity, "nt!DbgBreakPoint", Some(OpKind::Free));
        assert!(!frees.is_empty(), "the workload freed blocks of the tag");
        assert!(records
            .iter()
            .all(|r| r.frames.get(1).and_then(|f| f.function.as_deref())
                != Some("ExFreePoolWithTag")));
    })
    .await;
}

#[tokio::test]
async fn capture_follows_reboots_and_rearms() {
    bounded(async {
        let sc = Scenario {
            arch: Arch::Amd64,
            flavour: "modern",
            strategy: StrategyChoice::Auto,
            hits: 10,
            reboot_every_hits: Some(3),
            model: LineModel::clean(),
            hardware: true,
        };
        let (records, events, machine, activity) = run(sc).await;
        check_clean(&machine);
        let boots: std::collections::BTreeSet<u64> = records.iter().map(|r| r.boot).collect();
        assert!(boots.len() >= 3, "hits in {} boots", boots.len());
        let bases: std::collections::BTreeSet<u64> = events
            .iter()
            .filter_map(|e| match e {
                CaptureEvent::Boot { kern_base, .. } => Some(*kern_base),
                _ => None,
            })
            .collect();
        assert!(bases.len() >= 3, "new kernel bases each boot: {bases:?}");
        let truth = truth_stops(&activity, "nt!ExAllocateHeapSpecialPool", None);
        let got: Vec<Vec<String>> = records.iter().map(printed).collect();
        assert_eq!(
            got,
            truth[..got.len()],
            "no hit lost or wrong across reboots"
        );
    })
    .await;
}

/// The host's end of a line that dies (a pipe that vanishes) after `budget` bytes, or when the
/// host sends its `steps`-th single-step Continue2 (the moment a recorded hit's stop is about
/// to be resumed: the kernel reports that stop again after the reconnect).
pub(crate) struct Cuttable<S> {
    inner: S,
    budget: u64,
    steps: Option<u32>,
}

/// A single-step Continue2 in a written buffer: ApiNumber 0x313C, then at body offset 0
/// ContinueStatus DBG_CONTINUE (0x00010002) and TraceFlag 1 (the body starts 16 bytes in).
fn is_single_step(buf: &[u8]) -> bool {
    buf.windows(24).any(|w| {
        w[..4] == [0x3C, 0x31, 0, 0] && w[16..20] == [2, 0, 1, 0] && w[20..24] == [1, 0, 0, 0]
    })
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Cuttable<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.budget == 0 {
            return std::task::Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into()));
        }
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        self.budget = self.budget.saturating_sub(n);
        r
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Cuttable<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if is_single_step(buf) {
            if let Some(n) = self.steps.as_mut() {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.budget = 0;
                }
            }
        }
        if self.budget == 0 {
            return std::task::Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into()));
        }
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &r {
            self.budget = self.budget.saturating_sub(*n as u64);
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

/// Hands the simulator a new line for every (re)connection; each line dies as `cuts` says.
pub(crate) struct CuttingConnector {
    pub(crate) lines: tokio::sync::mpsc::UnboundedSender<tokio::io::DuplexStream>,
    pub(crate) cuts: std::collections::VecDeque<(u64, Option<u32>)>,
}

impl kdpilot_capture::engine::Connector for CuttingConnector {
    type Link = Cuttable<tokio::io::DuplexStream>;

    async fn connect(
        &mut self,
        _reconnect: bool,
    ) -> Result<kdpilot_kd::client::Stopped<Self::Link>, kdpilot_capture::engine::ConnectError>
    {
        let (host, target) = tokio::io::duplex(64 * 1024);
        let _ = self.lines.send(target);
        let (budget, steps) = self.cuts.pop_front().unwrap_or((u64::MAX, None));
        let io = Cuttable {
            inner: host,
            budget,
            steps,
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
        "a line that keeps dying".into()
    }
}

#[tokio::test]
async fn lost_links_lose_and_repeat_no_hit() {
    bounded(async {
        let d = dir(Arch::Amd64, "modern");
        let mut mconfig = MachineConfig::from_dir(Arch::Amd64, 19041, 2, 77, &d).unwrap();
        mconfig.special_pool_tag = LEAK;
        let mut machine = Machine::boot(mconfig).unwrap();
        let mut activity = AllocationActivity::from_fixture_dir(
            &d,
            AllocationActivity::leakydrv_specs(LEAK),
            9,
            200.0,
        )
        .unwrap();
        activity.reboot_every_hits = Some(6);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<tokio::io::DuplexStream>();
        let sim = tokio::spawn(async move {
            while let Some(line) = rx.recv().await {
                let _ =
                    serve_with(line, &mut machine, &TargetOptions::default(), &mut activity).await;
            }
            (machine, activity)
        });
        // Cuts at the moment a recorded hit is being resumed, and after byte counts that land
        // anywhere (in a hit's reads, the step, the re-plant, a boot's arming).
        let mut cuts = std::collections::VecDeque::new();
        cuts.push_back((u64::MAX, Some(2)));
        for i in 0..10u64 {
            cuts.push_back((300 + i * 413 % 2900, None));
            cuts.push_back((u64::MAX, Some(1)));
        }
        let n_cuts = cuts.len();
        let mut connector = CuttingConnector { lines: tx, cuts };
        let mut events = Vec::new();
        let options = CaptureOptions {
            tag: LEAK,
            strategy: StrategyChoice::Auto,
            symbols: d.display().to_string(),
            offline: true,
            max_hits: Some(24),
            duration: Some(Duration::from_secs(100)),
            // The cuts at the single step need the int3 path (step over, re-plant).
            hardware_breakpoint: false,
            measure: false,
            track_frees: false,
            guards: kdpilot_capture::engine::Guards::default(),
        };
        let mut capture = Capture::new(options, |e| events.push(e.clone())).unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        let hits = capture
            .run_with(&mut connector, &stop)
            .await
            .expect("capture");
        drop(capture);
        drop(connector);
        let (machine, activity) = sim.await.unwrap();
        assert_eq!(hits, 24);
        check_clean(&machine);
        let lost = events
            .iter()
            .filter(|e| matches!(e, CaptureEvent::LinkLost { .. }))
            .count();
        // The capture may end before the last few cuts come due.
        assert!(
            lost + 4 >= n_cuts,
            "{lost} of {n_cuts} cuts were lost links, and were reopened"
        );
        let repeated = events
            .iter()
            .filter(|e| matches!(e, CaptureEvent::Warning(w) if w.contains("reported again")))
            .count();
        eprintln!("{lost} links lost, {repeated} re-reported stops recognised");
        assert!(repeated >= 5, "re-reported stops recognised: {repeated}");
        let records: Vec<HitRecord> = events
            .iter()
            .filter_map(|e| match e {
                CaptureEvent::Hit(h) => Some((**h).clone()),
                _ => None,
            })
            .collect();
        let numbers: Vec<u64> = records.iter().map(|r| r.hit).collect();
        assert_eq!(numbers, (1..=24).collect::<Vec<_>>());
        let truth = truth_stops(&activity, "nt!ExAllocateHeapSpecialPool", None);
        let got: Vec<Vec<String>> = records.iter().map(printed).collect();
        assert_eq!(got, truth[..got.len()], "no hit lost, repeated or wrong");
        let boots: std::collections::BTreeSet<u64> = records.iter().map(|r| r.boot).collect();
        assert!(boots.len() >= 3, "through reboots: {boots:?}");
    })
    .await;
}
