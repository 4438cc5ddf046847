//! The capture loop: connect, identify the boot, load symbols, arm, record every hit, step over
//! and re-arm, follow reboots and lost links, detach cleanly. It emits [`CaptureEvent`]s and
//! never prints.
//!
//! The engine keeps what it planted per boot ([`BootState`]) outside any one link, so a link
//! that goes away (a vanished pipe, a reset port, a target that stops answering) is reopened
//! through a [`Connector`] and the capture goes on where it was:
//!
//! - same boot (same kernel base): the old breakpoint handle is restored (the kernel may or may
//!   not still hold it) and planted again; a hit whose record was written but whose stop was
//!   never resumed is recognised when the kernel reports that stop again, and not written twice;
//! - new boot (the kernel moved, KASLR): a `reboot` is recorded, the new boot is identified and
//!   armed.
//!
//! Any stop is handled: "unload all" (a reboot), the boot's LoadSymbols stops, our breakpoint,
//! the kernel's PoolHitTag break, single steps, foreign breakpoints and exceptions. DbgPrint,
//! DbgPrompt and file requests are answered by the KD client below.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use kdpilot_kd::api::{self, Continue2, GetContext, GetContextEx, SetContext, SetContextEx};
use kdpilot_kd::client::{KdError, LinkStats, Running, Stopped, WaitOutcome};
use kdpilot_kd::context::{Amd64Reg, Context, ContextRange, X86Reg};
use kdpilot_kd::state_change::{StateChange, StateInfo};
use kdpilot_kd::version::GetVersion64;
use kdpilot_kd::wire::status;
use kdpilot_kd::{Arch, PayloadError};
use kdpilot_symbols::{
    CachedReader, Frame, KernelInfo, MemoryReader, Module, ModuleSet, ProgressSink, ReadError,
    Registers, StackWalker, StoreOptions, SymbolPath, SymbolStore, WalkConfig, WalkLimits,
    X64Registers, X86Registers,
};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::record::{EventRecord, FrameRecord, HitRecord};
use crate::strategy::{plan, unloaded_module, ArgLayout, Plan, StrategyChoice, StrategyError};

/// What a capture does.
#[derive(Clone, Debug)]
pub struct CaptureOptions {
    /// The pool tag (PoolTag value: 'Leak' is 0x6b61654c).
    pub tag: u32,
    /// Where to break.
    pub strategy: StrategyChoice,
    /// Symbol path text (WinDbg syntax); empty: no symbols (module+offset frames).
    pub symbols: String,
    /// Use only the symbol caches.
    pub offline: bool,
    /// Stop after this many hits.
    pub max_hits: Option<u64>,
    /// Stop after this long.
    pub duration: Option<Duration>,
    /// Break with a debug register (KernelDr0 + Dr7, as WinDbg's `ba e1`) where the target
    /// accepts it: a hit then costs no single step and no re-plant. False: always an int3
    /// (WinDbg's `bp`).
    pub hardware_breakpoint: bool,
    /// Measure each hit's stack bytes the unwind needed (a second walk from the cache, no line
    /// traffic): `HitCost::stack_touched`, for benchmarks.
    pub measure: bool,
    /// `--track-frees`: learn each allocation's address (a one-shot int3 at the return into
    /// the allocator's caller, reading rax/eax there) and catch the frees of those blocks
    /// (a breakpoint on the special-pool free function, or PoolHitTag's free breaks), written
    /// as `allocated` and `free` records.
    pub track_frees: bool,
    /// Guards for a long capture: frozen-time budget, per-stack cap, special pool exhaustion.
    pub guards: Guards,
}

/// Guards for a night-long capture.
#[derive(Clone, Debug)]
pub struct Guards {
    /// At most this much frozen time (the target stopped in the debugger) per `budget_window`;
    /// above it only 1 hit in N is recorded (N doubles, and halves again when the target is
    /// frozen less than a quarter of the budget). `None`: every hit is recorded.
    pub frozen_budget: Option<Duration>,
    /// The window the budget is measured over (a minute).
    pub budget_window: Duration,
    /// After this many hits with one stack, further hits with it are written without their
    /// frames (`same_stack_as`): counted, not repeated. `None`: no cap.
    pub stack_cap: Option<u64>,
    /// What to do when special pool looks exhausted.
    pub on_exhaustion: OnExhaustion,
    /// Special pool counts as quiet after this long without a hit (and at least 10 times the
    /// boot's mean interval between hits); then a PoolHitTag probe checks whether the tag is
    /// still being allocated.
    pub exhaustion_quiet: Duration,
    /// How long the PoolHitTag probe listens.
    pub probe_window: Duration,
}

impl Default for Guards {
    fn default() -> Self {
        Self {
            frozen_budget: None,
            budget_window: Duration::from_secs(60),
            stack_cap: None,
            on_exhaustion: OnExhaustion::Warn,
            exhaustion_quiet: Duration::from_secs(300),
            probe_window: Duration::from_secs(60),
        }
    }
}

/// What a capture on special pool does when special pool looks exhausted (its breakpoint went
/// quiet while the kernel still allocates the tag, in normal pool).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnExhaustion {
    /// Do not probe.
    Off,
    /// Probe, and warn (`special_pool_exhausted` record) when the tag is still allocated.
    Warn,
    /// Probe, warn, and follow the tag with nt!PoolHitTag for the rest of the boot.
    PoolHitTag,
}

/// Dr7 bits of kdpilot's hardware breakpoint: L0 and G0 (DR0 enabled), R/W0 = LEN0 = 0
/// (instruction fetch).
const DR7_DR0_EXECUTE: u64 = 0b11;

/// The state of the link, for a status line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkState {
    /// Opening the endpoint or waiting for the target to answer.
    Waiting,
    /// Synchronised; the target runs (or is stopped for a hit).
    Up,
}

/// A periodic snapshot for a status line.
#[derive(Clone, Debug)]
pub struct Status {
    /// The link.
    pub link: LinkState,
    /// Byte and packet counters over every link of this capture.
    pub stats: LinkStats,
    /// Hits recorded.
    pub hits: u64,
    /// The boot in progress (0 before the first).
    pub boot: u64,
}

/// The line cost of one hit: everything from the resume before it (so its state change and
/// ACK are in) to the resume that ended it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HitCost {
    /// The hit number.
    pub hit: u64,
    /// Bytes host to target.
    pub bytes_tx: u64,
    /// Bytes target to host.
    pub bytes_rx: u64,
    /// Data packets host to target (requests and continues: the round trips).
    pub packets_tx: u64,
    /// Data packets target to host.
    pub packets_rx: u64,
    /// From the stop's arrival at the host to the resume's ACK: the target is frozen this long
    /// (plus the state change's own time on the line).
    pub stopped: Duration,
    /// Stack bytes the unwind asked for (the union of the walker's reads above the stack
    /// pointer).
    pub stack_touched: u64,
    /// Stack bytes read from the target for it.
    pub stack_read: u64,
    /// Bytes of the hit's state change payload.
    pub state_change_len: u64,
    /// Registers read (GetContextEx byte count, or the whole CONTEXT).
    pub context_bytes: u64,
    /// Frames in the stack.
    pub frames: u64,
    /// The breakpoint was a debug register (no step, no re-plant).
    pub hardware: bool,
}

/// What the capture did or saw; the CLI renders these.
#[derive(Clone, Debug)]
pub enum CaptureEvent {
    /// Opening the endpoint or waiting for the target (the first time, and after a link loss).
    Waiting {
        /// What is awaited, for a spinner.
        what: String,
    },
    /// Synchronised with the target (the first time, and again after a link loss).
    Connected {
        /// Build number.
        build: u16,
        /// Architecture.
        arch: Arch,
        /// Kernel base.
        kern_base: u64,
        /// Processors.
        processors: u32,
    },
    /// A boot of the target was identified (1 = the one found at connect).
    Boot {
        /// Boot number.
        boot: u64,
        /// Kernel base (KASLR).
        kern_base: u64,
        /// Build number.
        build: u16,
    },
    /// The plan is in place.
    Armed {
        /// Boot number.
        boot: u64,
        /// `nt!ExAllocateHeapSpecialPool`, `nt!PoolHitTag`, ...
        target: String,
        /// The breakpoint's (or PoolHitTag's) address.
        address: u64,
        /// Why this strategy.
        why: String,
    },
    /// The breakpoint's module is not loaded yet: it is planted when the module loads (as
    /// WinDbg's `bu`).
    Deferred {
        /// Boot number.
        boot: u64,
        /// The symbol.
        target: String,
        /// The module awaited.
        module: String,
    },
    /// A captured allocation.
    Hit(Box<HitRecord>),
    /// A record for the logs as is: `allocated`, `free`, `sampled`, `special_pool_exhausted`.
    Record(Box<EventRecord>),
    /// A boot ended: the kernel's "unload all" stop, or a new kernel base found after a link
    /// loss.
    Reboot {
        /// The boot that ended.
        boot: u64,
        /// How it was noticed.
        reason: String,
    },
    /// The link went away; the capture reopens it and waits for the target.
    LinkLost {
        /// The boot in progress (0 if none was identified).
        boot: u64,
        /// What happened.
        reason: String,
    },
    /// What the last hit cost on the line, from the previous resume to this one.
    HitCost(HitCost),
    /// Counters, twice a second while the target runs.
    Status(Status),
    /// Something the user should know.
    Warning(String),
    /// The capture ended.
    Detached {
        /// Hits captured.
        hits: u64,
        /// Why it ended (`max-hits`, `duration`, `stop requested`, an error).
        reason: String,
        /// Whether every breakpoint was removed, PoolHitTag restored and the target resumed.
        clean: bool,
        /// What may still be planted when `clean` is false (the link was gone at the end).
        left_planted: Vec<String>,
    },
}

/// Why a capture ended badly.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The KD link failed.
    #[error(transparent)]
    Kd(#[from] KdError),
    /// The first connection could not be made.
    #[error("{0}")]
    Connect(String),
    /// No strategy could be armed.
    #[error(transparent)]
    Strategy(#[from] StrategyError),
    /// The symbol path is invalid.
    #[error("invalid symbol path: {0}")]
    SymbolPath(String),
    /// Target memory could not be read through the link.
    #[error("reading target memory: {0}")]
    Memory(String),
}

impl CaptureError {
    /// True when the link (not the capture) is at fault: reopen it and go on.
    pub fn is_link_trouble(&self) -> bool {
        match self {
            // A changed stop that was not handled where it surfaced: reconnecting makes the
            // kernel report the stop it is in.
            CaptureError::Kd(e) => {
                e.is_fatal() || matches!(e, KdError::ReplyLost { .. } | KdError::StopChanged)
            }
            _ => false,
        }
    }
}

/// A failed connection attempt.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ConnectError {
    /// What went wrong, with the fix.
    pub message: String,
    /// Worth trying again (the endpoint or target may come back).
    pub retry: bool,
}

/// Opens (and reopens) the link and gets the target stopped and identified.
#[allow(async_fn_in_trait)] // the engine runs on one task; Send-ness is left to the caller
pub trait Connector {
    /// The byte stream.
    type Link: AsyncRead + AsyncWrite + Unpin;
    /// Opens the endpoint, synchronises and breaks in. `reconnect` is false the first time;
    /// after a link loss a connector should wait for the endpoint to come back.
    async fn connect(&mut self, reconnect: bool) -> Result<Stopped<Self::Link>, ConnectError>;
    /// What is being connected to, for messages.
    fn describe(&self) -> String;
}

/// A connector for a link that is already synchronised and cannot be reopened: the capture
/// ends when it is lost.
pub struct OneLink<S>(Option<Stopped<S>>);

impl<S> OneLink<S> {
    /// Wraps a synchronised link.
    pub fn new(stopped: Stopped<S>) -> Self {
        Self(Some(stopped))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connector for OneLink<S> {
    type Link = S;
    async fn connect(&mut self, _reconnect: bool) -> Result<Stopped<S>, ConnectError> {
        self.0.take().ok_or_else(|| ConnectError {
            message: "the link was lost and this capture cannot reopen it".into(),
            retry: false,
        })
    }
    fn describe(&self) -> String {
        "the target".into()
    }
}

/// Target memory through the KD link, for the symbols crate: unreadable memory is an empty or
/// short read, a dead link an error.
pub struct TargetMemory<'a, S>(pub &'a mut Stopped<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> MemoryReader for TargetMemory<'_, S> {
    async fn read(&mut self, address: u64, len: usize) -> Result<Vec<u8>, ReadError> {
        match self.0.read_virtual(address, len).await {
            Ok(v) => Ok(v),
            Err(KdError::Payload(PayloadError::Failed { .. })) => Ok(Vec::new()),
            Err(e) => Err(ReadError::failed(e)),
        }
    }
}

/// What the capture knows about one boot of the target: its modules, the plan, and what is
/// planted. It outlives links: after a link loss it says what to restore.
struct BootState {
    kern_base: u64,
    modules: ModuleSet,
    /// `None` while a deferred breakpoint waits for its module.
    plan: Option<Plan>,
    /// The module a deferred breakpoint waits for.
    awaiting: Option<String>,
    /// The handle of our planted breakpoint (`None`: not planted, or consumed at a stop).
    handle: Option<u32>,
    /// Our breakpoint is in KernelDr0 of every processor, enabled by our Dr7 bits.
    hw_planted: bool,
    /// PoolHitTag holds our tag.
    hit_tag_written: bool,
    /// PoolHitTag's value before we wrote it.
    old_hit_tag: Option<u32>,
    /// The `armed` event was emitted for this boot.
    announced: bool,
    /// Extra int3 breakpoints planted (address -> handle): the free breakpoint and the
    /// one-shot return breakpoints of `--track-frees`.
    extra: BTreeMap<u64, u32>,
    /// `--track-frees`: the free breakpoint (address, `nt!MmFreeSpecialPool`).
    free_bp: Option<(u64, String)>,
    /// `--track-frees`: allocations whose return (and address) is awaited.
    pending_returns: Vec<PendingReturn>,
    /// `--track-frees`: blocks of this boot not freed yet (address -> hit).
    outstanding: HashMap<u64, u64>,
    /// Special pool's hits in this boot, and the exhaustion probe.
    special: SpecialWatch,
}

/// An allocation whose return into its caller is awaited (`--track-frees`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PendingReturn {
    hit: u64,
    thread: u64,
    /// The return address: a one-shot int3 is planted there.
    address: u64,
}

/// Special pool's hits in this boot and the PoolHitTag probe for its exhaustion.
#[derive(Clone, Debug, Default)]
struct SpecialWatch {
    hits: u64,
    first: Option<Instant>,
    last: Option<Instant>,
    /// A probe listens until then; PoolHitTag holds our tag (its old value kept here).
    probe_until: Option<Instant>,
    probe_old: Option<u32>,
    /// A probe ran since the last hit (the next one waits for a hit).
    probed: bool,
    /// The probe found the tag still allocated: warned for this boot.
    exhausted: bool,
}

impl SpecialWatch {
    fn hit(&mut self, now: Instant) {
        self.hits += 1;
        self.first.get_or_insert(now);
        self.last = Some(now);
        self.probed = false;
    }

    /// Whether special pool has been quiet long enough to probe: since its last hit, or since
    /// it was armed (a special pool already full when the capture started never hits).
    fn probe_due(&self, guards: &Guards, now: Instant) -> bool {
        let Some(last) = self.last else {
            return false;
        };
        if self.probed || self.exhausted || self.probe_until.is_some() {
            return false;
        }
        let mean = match self.first {
            Some(first) if self.hits >= 2 => {
                last.duration_since(first) / u32::try_from(self.hits - 1).unwrap_or(u32::MAX)
            }
            _ => Duration::ZERO,
        };
        let quiet = guards.exhaustion_quiet.max(mean.saturating_mul(10));
        now.duration_since(last) >= quiet
    }
}

/// Frozen-time accounting and 1-in-N sampling (`Guards::frozen_budget`).
#[derive(Debug)]
struct Sampler {
    one_in: u64,
    seen: u64,
    skipped: u64,
    window: VecDeque<(Instant, Duration)>,
    last_change: Option<Instant>,
}

impl Default for Sampler {
    fn default() -> Self {
        Self {
            one_in: 1,
            seen: 0,
            skipped: 0,
            window: VecDeque::new(),
            last_change: None,
        }
    }
}

impl Sampler {
    fn frozen(&mut self, now: Instant, window: Duration) -> Duration {
        while self
            .window
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > window)
        {
            self.window.pop_front();
        }
        self.window.iter().map(|(_, d)| *d).sum()
    }

    /// A new rate when the frozen time calls for one: (one_in, reason).
    fn adjust(&mut self, g: &Guards, now: Instant) -> Option<(u64, String)> {
        let budget = g.frozen_budget?;
        if self
            .last_change
            .is_some_and(|t| now.duration_since(t) < g.budget_window / 4)
        {
            return None;
        }
        let frozen = self.frozen(now, g.budget_window);
        let window = g.budget_window.as_secs_f64();
        if frozen > budget && self.one_in < 1024 {
            self.one_in *= 2;
            self.last_change = Some(now);
            Some((
                self.one_in,
                format!(
                    "the target was frozen {:.1} s in the last {window:.0} s, over the budget of {:.1} s",
                    frozen.as_secs_f64(),
                    budget.as_secs_f64()
                ),
            ))
        } else if frozen < budget / 4 && self.one_in > 1 {
            self.one_in /= 2;
            self.last_change = Some(now);
            Some((
                self.one_in,
                format!(
                    "the target was frozen {:.1} s in the last {window:.0} s, under a quarter of the budget",
                    frozen.as_secs_f64()
                ),
            ))
        } else {
            None
        }
    }

    /// Whether this hit is recorded.
    fn take(&mut self) -> bool {
        self.seen += 1;
        if self.seen % self.one_in == 0 {
            true
        } else {
            self.skipped += 1;
            false
        }
    }
}

/// A stop at one of the extra breakpoints, or PoolHitTag's break during a probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Extra {
    Return,
    Free,
    Probe,
}

/// How to leave a stop.
enum Next {
    /// Plant what is missing, then go.
    Go,
    /// Step over our consumed breakpoint (TraceFlag), plant it again, go.
    StepOver,
    /// "unload all": the old continue, as WinDbg answers it; the boot is over.
    UnloadAll,
}

/// A hit whose record was written but whose stop was not yet resumed: if the link dies here,
/// the kernel reports the same stop again after the reconnect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct InFlight {
    boot: u64,
    processor: u16,
    thread: u64,
    pc: u64,
}

/// The capture engine.
pub struct Capture<F: FnMut(&CaptureEvent)> {
    options: CaptureOptions,
    emit: F,
    store: Option<Arc<SymbolStore>>,
    boot: u64,
    hits: u64,
    state: Option<BootState>,
    in_flight: Option<InFlight>,
    /// Whether the target answers GetContextEx (`None`: not asked yet).
    context_ex: Option<bool>,
    /// Whether the target takes a hardware breakpoint (`None`: not tried yet).
    hardware: Option<bool>,
    /// Counters at the last resume, and what the hit being handled measured.
    stats_at_resume: LinkStats,
    pending_cost: Option<HitCost>,
    /// Counters of links that are gone, and the last seen of the current one.
    stats_done: LinkStats,
    stats_now: LinkStats,
    started: Instant,
    sampler: Sampler,
    /// Stacks seen (call sites joined) -> (count, first hit), for the per-stack cap; frees
    /// separately.
    stacks: HashMap<String, (u64, u64)>,
    free_stacks: HashMap<String, (u64, u64)>,
    /// Frees of blocks the capture did not learn (allocated before it, or sampled out).
    unknown_frees: u64,
    /// The stop being handled counts against the frozen-time budget.
    frozen_counts: bool,
}

impl<F: FnMut(&CaptureEvent)> Capture<F> {
    /// A capture that reports to `emit`.
    pub fn new(options: CaptureOptions, emit: F) -> Result<Self, CaptureError> {
        let store = if options.symbols.trim().is_empty() {
            None
        } else {
            let path = SymbolPath::parse(&options.symbols)
                .map_err(|e| CaptureError::SymbolPath(e.to_string()))?;
            let opts = StoreOptions {
                offline: options.offline,
                ..StoreOptions::default()
            };
            Some(Arc::new(SymbolStore::new(path, opts, None)))
        };
        Ok(Self {
            options,
            emit,
            store,
            boot: 0,
            hits: 0,
            state: None,
            in_flight: None,
            context_ex: None,
            hardware: None,
            stats_at_resume: LinkStats::default(),
            pending_cost: None,
            stats_done: LinkStats::default(),
            stats_now: LinkStats::default(),
            started: Instant::now(),
            sampler: Sampler::default(),
            stacks: HashMap::new(),
            free_stacks: HashMap::new(),
            unknown_frees: 0,
            frozen_counts: false,
        })
    }

    /// Reports symbol lookups and downloads to `sink` (a progress bar).
    pub fn set_progress(&mut self, sink: Arc<dyn ProgressSink>) {
        if self.store.is_some() {
            if let Ok(path) = SymbolPath::parse(&self.options.symbols) {
                let opts = StoreOptions {
                    offline: self.options.offline,
                    ..StoreOptions::default()
                };
                self.store = Some(Arc::new(SymbolStore::new(path, opts, Some(sink))));
            }
        }
    }

    /// The last hit of a previous capture that was killed before it finished (see
    /// [`crate::log::unfinished_hit`]): if the target reports that stop again at the first
    /// stop of this capture, it is stepped over without a second record.
    pub fn set_unfinished_hit(&mut self, hit: &HitRecord) {
        if self.boot == 0 {
            if let Some(f) = hit.frames.first() {
                self.in_flight = Some(InFlight {
                    boot: 1,
                    processor: hit.processor,
                    thread: hit.thread,
                    pc: f.address,
                });
            }
        }
    }

    /// Hits captured so far.
    pub fn hits(&self) -> u64 {
        self.hits
    }

    /// Byte and packet counters over every link so far.
    pub fn stats(&self) -> LinkStats {
        add_stats(&self.stats_done, &self.stats_now)
    }

    /// Runs the capture on one connected, stopped target; a lost link ends it (see
    /// [`Capture::run_with`] to reopen it).
    pub async fn run<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        stopped: Stopped<S>,
        stop: &AtomicBool,
    ) -> Result<u64, CaptureError> {
        self.run_with(&mut OneLink::new(stopped), stop).await
    }

    /// Runs the capture until max hits, the duration, or `stop` is set (checked twice a
    /// second: Ctrl-C); then detaches, leaving the target running with nothing planted.
    /// A lost link is reopened through `connector`, as often as it takes.
    pub async fn run_with<C: Connector>(
        &mut self,
        connector: &mut C,
        stop: &AtomicBool,
    ) -> Result<u64, CaptureError> {
        self.started = Instant::now();
        let mut reconnect = false;
        let mut backoff = Duration::from_millis(250);
        loop {
            (self.emit)(&CaptureEvent::Waiting {
                what: if reconnect {
                    format!(
                        "reopening {} and waiting for the target",
                        connector.describe()
                    )
                } else {
                    format!("waiting for {}", connector.describe())
                },
            });
            let attempt = tokio::select! {
                r = connector.connect(reconnect) => Some(r),
                () = until(|| self.done(stop).is_some()) => None,
            };
            let stopped = match attempt {
                None => return Ok(self.give_up("the capture ended while the link was down")),
                Some(Ok(s)) => s,
                Some(Err(e)) if !reconnect => return Err(CaptureError::Connect(e.message)),
                Some(Err(e)) if !e.retry => return Ok(self.give_up(&e.message)),
                Some(Err(e)) => {
                    (self.emit)(&CaptureEvent::Warning(format!("{e}; trying again")));
                    if self.pause(backoff, stop).await {
                        return Ok(self.give_up("the capture ended while the link was down"));
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            let hits_before = self.hits;
            let result = self.session(stopped, stop).await;
            self.stats_done = add_stats(&self.stats_done, &self.stats_now);
            self.stats_now = LinkStats::default();
            match result {
                Ok(()) => return Ok(self.hits),
                Err(e) if e.is_link_trouble() => {
                    (self.emit)(&CaptureEvent::LinkLost {
                        boot: self.boot,
                        reason: e.to_string(),
                    });
                    reconnect = true;
                    // A session that got nowhere (the same stop failing again) backs off.
                    if self.hits == hits_before {
                        if self.pause(backoff, stop).await {
                            return Ok(self.give_up("the capture ended while the link was down"));
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    } else {
                        backoff = Duration::from_millis(250);
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Why the capture should end now, if it should.
    fn done(&self, stop: &AtomicBool) -> Option<&'static str> {
        if stop.load(Ordering::Relaxed) {
            Some("stop requested")
        } else if self.options.max_hits.is_some_and(|m| self.hits >= m) {
            Some("max-hits")
        } else if self
            .options
            .duration
            .is_some_and(|d| self.started.elapsed() >= d)
        {
            Some("duration")
        } else {
            None
        }
    }

    /// Sleeps `d`; true if the capture should end meanwhile.
    async fn pause(&self, d: Duration, stop: &AtomicBool) -> bool {
        tokio::select! {
            () = tokio::time::sleep(d) => self.done(stop).is_some(),
            () = until(|| self.done(stop).is_some()) => true,
        }
    }

    /// Ends without a link: says what may be left on the target.
    fn give_up(&mut self, why: &str) -> u64 {
        let left_planted = self.left_planted();
        (self.emit)(&CaptureEvent::Detached {
            hits: self.hits,
            reason: why.to_string(),
            clean: left_planted.is_empty(),
            left_planted,
        });
        self.hits
    }

    /// What may still be planted on the target if we cannot reach it.
    fn left_planted(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(b) = &self.state {
            match &b.plan {
                Some(Plan::Breakpoint {
                    symbol, address, ..
                }) if b.hw_planted => {
                    out.push(format!(
                        "a hardware breakpoint at {symbol} ({address:#x}): KernelDr0 with Dr7 bits 0-1 on every processor"
                    ));
                }
                Some(Plan::Breakpoint {
                    symbol, address, ..
                }) if b.handle.is_some() => {
                    out.push(format!("a breakpoint at {symbol} ({address:#x})"));
                }
                Some(Plan::PoolHitTag { address, .. }) if b.hit_tag_written => {
                    out.push(format!(
                        "nt!PoolHitTag ({address:#x}) = {:#010x}, was {}",
                        self.options.tag,
                        b.old_hit_tag
                            .map_or_else(|| "unknown".to_string(), |v| format!("{v:#010x}"))
                    ));
                }
                _ => {}
            }
        }
        if let Some(b) = &self.state {
            for address in b.extra.keys() {
                out.push(format!(
                    "a breakpoint at {} ({address:#x})",
                    b.modules.describe(*address, false)
                ));
            }
            if let Some(old) = b.special.probe_old {
                out.push(format!(
                    "nt!PoolHitTag = {:#010x} (exhaustion probe), was {old:#010x}",
                    self.options.tag
                ));
            }
        }
        if self.in_flight.is_some() {
            out.push("the target may be stopped in the debugger (connect kd and type g)".into());
        }
        out
    }

    /// One link, from its first stop until the capture ends (`Ok`) or the link fails.
    async fn session<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        stopped: Stopped<S>,
        stop: &AtomicBool,
    ) -> Result<(), CaptureError> {
        if let Some(v) = stopped.version().cloned() {
            (self.emit)(&CaptureEvent::Connected {
                build: v.minor_version,
                arch: stopped.arch(),
                kern_base: v.kern_base,
                processors: stopped.state().number_processors,
            });
        }
        self.stats_at_resume = stopped.stats().clone();
        let mut running = self.handle_and_resume(stopped, true).await?;
        let mut last_status = Instant::now();
        loop {
            self.stats_now = running.stats().clone();
            if let Some(reason) = self.done(stop) {
                let s = running.break_in(Duration::from_secs(30)).await?;
                return self.finish(s, reason).await;
            }
            if last_status.elapsed() >= Duration::from_millis(500) {
                last_status = Instant::now();
                self.emit_status(LinkState::Up);
            }
            if let Some(start) = self.probe_action() {
                let mut s = running.break_in(Duration::from_secs(30)).await?;
                self.probe(&mut s, start).await?;
                let st = s.state().clone();
                // The break-in's own stop is resumed as is; a stop that came first (a hit, a
                // return, a free, a module load, a reboot) is handled as any stop.
                let plain = matches!(&st.info, StateInfo::Exception(_))
                    && self.our_stop(&st).is_none()
                    && self.extra_stop(&st).is_none();
                running = if plain {
                    self.go(s).await?
                } else {
                    self.handle_and_resume(s, false).await?
                };
                continue;
            }
            running = match running.wait_stop(Duration::from_millis(500)).await? {
                WaitOutcome::StillRunning(r) => r,
                WaitOutcome::Stopped(s) => self.handle_and_resume(s, false).await?,
            };
        }
    }

    fn emit_status(&mut self, link: LinkState) {
        let status = Status {
            link,
            stats: self.stats(),
            hits: self.hits,
            boot: self.boot,
        };
        (self.emit)(&CaptureEvent::Status(status));
    }

    /// The end with the link up: a hit that arrived with the break-in is still recorded, then
    /// everything is removed and the target resumed.
    async fn finish<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        mut s: Stopped<S>,
        reason: &str,
    ) -> Result<(), CaptureError> {
        if self.options.max_hits.is_none_or(|m| self.hits < m) {
            if let Some(plan) = self.our_stop(s.state()) {
                if let Err(e) = self.record(&mut s, &plan).await {
                    if e.is_link_trouble() {
                        return Err(e);
                    }
                    (self.emit)(&CaptureEvent::Warning(format!(
                        "the last hit could not be read: {e}"
                    )));
                }
            }
        }
        self.detach(s, reason).await
    }

    /// Handles a stop, then leaves it; a hit's line cost is measured and emitted.
    async fn handle_and_resume<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        s: Stopped<S>,
        fresh: bool,
    ) -> Result<Running<S>, CaptureError> {
        let stop_at = Instant::now();
        let hits_before = self.hits;
        self.pending_cost = None;
        self.frozen_counts = false;
        let r = self.handle_and_resume_inner(s, fresh).await?;
        // The budget is for what the capture makes the target pay: hits (recorded or
        // sampled out), returns and frees; not a boot's symbol loading.
        if self.frozen_counts {
            self.sampler.window.push_back((stop_at, stop_at.elapsed()));
        }
        let now = r.stats().clone();
        if self.hits > hits_before {
            let before = &self.stats_at_resume;
            let cost = HitCost {
                hit: self.hits,
                bytes_tx: now.bytes_tx.saturating_sub(before.bytes_tx),
                bytes_rx: now.bytes_rx.saturating_sub(before.bytes_rx),
                packets_tx: now.packets_tx.saturating_sub(before.packets_tx),
                packets_rx: now.packets_rx.saturating_sub(before.packets_rx),
                stopped: stop_at.elapsed(),
                ..self.pending_cost.take().unwrap_or_default()
            };
            (self.emit)(&CaptureEvent::HitCost(cost));
        }
        self.stats_at_resume = now;
        Ok(r)
    }

    /// Handles a stop, then leaves it. Errors that are not the link's end the capture, after
    /// a best-effort detach.
    async fn handle_and_resume_inner<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        mut s: Stopped<S>,
        fresh: bool,
    ) -> Result<Running<S>, CaptureError> {
        self.stats_now = s.stats().clone();
        let next = match self.handle_stop(&mut s, fresh).await {
            Ok(n) => n,
            Err(e) if s.take_stop_changed() => return self.stop_changed(s, &e).await,
            Err(e) if e.is_link_trouble() => return Err(e),
            Err(e) => {
                let _ = self.detach(s, &format!("error: {e}")).await;
                return Err(e);
            }
        };
        match next {
            Next::UnloadAll => {
                self.state = None;
                self.in_flight = None;
                Ok(s.continue_old(status::DBG_CONTINUE).await?)
            }
            Next::Go => self.go(s).await,
            Next::StepOver => {
                let pc = s.state().program_counter;
                if let Some(b) = &mut self.state {
                    if matches!(b.plan, Some(Plan::Breakpoint { address, .. }) if address == pc) {
                        b.handle = None; // consumed at the stop (sheet 4.4)
                    }
                }
                let dr7 = self.dr7_for(&s);
                let r = s.resume(&Continue2::single_step().with_dr7(dr7)).await?;
                self.in_flight = None;
                let s2 = match r.wait_stop(Duration::from_secs(30)).await? {
                    WaitOutcome::Stopped(s2) => s2,
                    WaitOutcome::StillRunning(r) => r.break_in(Duration::from_secs(30)).await?,
                };
                if s2.state().is_single_step() {
                    self.go(s2).await
                } else {
                    // Something else came first (another CPU, a reboot): handle it as any stop;
                    // our breakpoint is planted again before the target goes on.
                    Box::pin(self.handle_and_resume_inner(s2, false)).await
                }
            }
        }
    }

    /// The Dr7 a Continue2 carries: the reporting processor's KernelDr7, with our DR0 enable
    /// bits while the hardware breakpoint is planted, without them once it is not.
    fn dr7_for<S: AsyncRead + AsyncWrite + Unpin>(&self, s: &Stopped<S>) -> u64 {
        let base = s.state().control_report(s.arch()).dr7();
        if self.state.as_ref().is_some_and(|b| b.hw_planted) {
            base | DR7_DR0_EXECUTE
        } else if self.hardware == Some(true) {
            base & !DR7_DR0_EXECUTE
        } else {
            base
        }
    }

    /// The stop being served turned out to be a stale copy (the target is in another one,
    /// which `s` now holds): what was being done for it is dropped, the new stop handled.
    async fn stop_changed<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        s: Stopped<S>,
        e: &dyn std::fmt::Display,
    ) -> Result<Running<S>, CaptureError> {
        tracing::warn!(error = %e, "handling the stop the target is in");
        Box::pin(self.handle_and_resume_inner(s, false)).await
    }

    /// Plants what is missing and resumes.
    async fn go<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        mut s: Stopped<S>,
    ) -> Result<Running<S>, CaptureError> {
        if let Err(e) = self.plant(&mut s).await {
            if s.take_stop_changed() {
                return self.stop_changed(s, &e).await;
            }
            return Err(e);
        }
        let dr7 = self.dr7_for(&s);
        let r = s.resume(&Continue2::go().with_dr7(dr7)).await?;
        self.in_flight = None;
        Ok(r)
    }

    /// Decides what a stop is and records a hit.
    async fn handle_stop<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        s: &mut Stopped<S>,
        fresh: bool,
    ) -> Result<Next, CaptureError> {
        let state = s.state().clone();
        if state.is_unload_all() {
            if self.state.is_some() {
                (self.emit)(&CaptureEvent::Reboot {
                    boot: self.boot,
                    reason: "unload all symbols".into(),
                });
            }
            return Ok(Next::UnloadAll);
        }
        if state.is_breakpoint() {
            // The kernel deletes a breakpoint at the PC it reports (sheet 4.4).
            if let Some(b) = self.state.as_mut() {
                b.extra.remove(&state.program_counter);
            }
        }
        let ours = self.our_stop(&state);
        let extra = self.extra_stop(&state);
        if fresh || self.state.is_none() || (ours.is_none() && extra.is_none()) {
            let v = s.refresh_version().await?.clone();
            self.identify(s, &v, fresh).await?;
        }
        if self.our_stop(&state).is_none() {
            if let Some(kind) = self.extra_stop(&state) {
                return self.handle_extra(s, kind).await;
            }
        }
        if let StateInfo::LoadSymbols(ls) = &state.info {
            if !ls.is_unload() {
                self.module_loaded(s, ls.base_of_dll, ls.size_of_image, &ls.path_str())
                    .await?;
            }
        }
        let Some(plan) = self.our_stop(&state) else {
            if !fresh {
                if let StateInfo::Exception(e) = &state.info {
                    if !state.is_single_step() {
                        self.foreign_exception(e.record.code, state.program_counter);
                    }
                }
            }
            return Ok(Next::Go);
        };
        let key = InFlight {
            boot: self.boot,
            processor: state.processor,
            thread: state.thread,
            pc: state.program_counter,
        };
        let seen = fresh && self.in_flight == Some(key);
        if seen {
            (self.emit)(&CaptureEvent::Warning(format!(
                "hit {} was reported again after the reconnect: already recorded, not written twice",
                self.hits
            )));
        }
        match plan {
            Plan::Breakpoint { .. } => {
                if !seen {
                    self.record(s, &plan).await?;
                    self.in_flight = Some(key);
                }
                // A debug register leaves nothing to step over (the kernel resumes with RF).
                if state.is_single_step() {
                    Ok(Next::Go)
                } else {
                    Ok(Next::StepOver)
                }
            }
            Plan::PoolHitTag { .. } => {
                let mut ctx = if seen {
                    self.registers(s).await?
                } else {
                    let ctx = self.record(s, &plan).await?;
                    self.in_flight = Some(key);
                    ctx
                };
                // Step past the kernel's own int3, as WinDbg does (PC+1). The reported PC is
                // the int3's, also when the stop is reported again after a reconnect.
                ctx.set_pc(state.program_counter.wrapping_add(1));
                self.set_pc(s, &ctx).await?;
                Ok(Next::Go)
            }
        }
    }

    fn foreign_exception(&mut self, code: u32, pc: u64) {
        let at = match &self.state {
            Some(b) => b.modules.describe(pc, false).to_string(),
            None => format!("{pc:#x}"),
        };
        (self.emit)(&CaptureEvent::Warning(format!(
            "the target stopped on exception {code:#010x} at {at} (not kdpilot's); resuming it"
        )));
    }

    /// Which of our plans this stop is a hit of.
    fn our_stop(&self, state: &StateChange) -> Option<Plan> {
        let b = self.state.as_ref()?;
        let plan = b.plan.as_ref()?;
        let StateInfo::Exception(e) = &state.info else {
            return None;
        };
        let code = e.record.code;
        let pc = state.program_counter;
        match plan {
            // An int3 (planted now or before a link loss), or the debug register (reported as
            // a single step with Dr6.B0 at the instruction).
            // Dr6.B0 also names one planted by a capture that was killed, which this one
            // has not planted yet.
            Plan::Breakpoint { address, .. }
                if *address == pc
                    && (code == status::BREAKPOINT
                        || (code == status::SINGLE_STEP
                            && (b.hw_planted || dr6_b0(state, b.modules.arch())))) =>
            {
                Some(plan.clone())
            }
            Plan::PoolHitTag { .. }
                if code == status::BREAKPOINT
                    && b.hit_tag_written
                    && is_hit_tag_break(&b.modules, pc) =>
            {
                Some(plan.clone())
            }
            _ => None,
        }
    }

    /// The boot of this stop: the one we know (after a reconnect: restore our breakpoint, the
    /// kernel may or may not still hold it), or a new one (identify and plan it).
    async fn identify<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        s: &mut Stopped<S>,
        v: &GetVersion64,
        fresh: bool,
    ) -> Result<(), CaptureError> {
        if let Some(b) = &mut self.state {
            if b.kern_base == v.kern_base {
                if fresh {
                    if let Some(h) = b.handle.take() {
                        let _ = s.request(&api::RestoreBreakPoint { handle: h }).await;
                    }
                    // The extra breakpoints may or may not still be there: planted again.
                    for (_, h) in std::mem::take(&mut b.extra) {
                        let _ = s.request(&api::RestoreBreakPoint { handle: h }).await;
                    }
                }
                return Ok(());
            }
            (self.emit)(&CaptureEvent::Reboot {
                boot: self.boot,
                reason: format!(
                    "the kernel moved from {:#x} to {:#x}: the target rebooted",
                    b.kern_base, v.kern_base
                ),
            });
            self.state = None;
            self.in_flight = None;
        }
        self.new_boot(s, v).await
    }

    /// A new boot: modules, symbols, the plan (planted on resume).
    async fn new_boot<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        s: &mut Stopped<S>,
        v: &GetVersion64,
    ) -> Result<(), CaptureError> {
        self.boot += 1;
        (self.emit)(&CaptureEvent::Boot {
            boot: self.boot,
            kern_base: v.kern_base,
            build: v.minor_version,
        });
        let kernel = KernelInfo {
            arch: s.arch(),
            kern_base: v.kern_base,
            ps_loaded_module_list: v.ps_loaded_module_list,
        };
        let mut modules = {
            let mut reader = TargetMemory(s);
            match ModuleSet::from_target(&mut reader, &kernel, &WalkLimits::default()).await {
                Ok((set, warnings)) => {
                    for w in warnings {
                        (self.emit)(&CaptureEvent::Warning(format!("module list: {w}")));
                    }
                    set
                }
                Err(e) => return Err(read_failed("the module list", &e)),
            }
        };
        if modules.by_name("nt").is_none() {
            // Early in a boot the list may be empty: the kernel alone, from GetVersion.
            let mut nt = Module::new("nt", "ntoskrnl.exe", v.kern_base, 0);
            let _ = nt.read_headers(&mut TargetMemory(s)).await;
            modules = ModuleSet::new(Some(s.arch()), vec![nt]);
        }
        if let Some(store) = &self.store {
            for m in modules.modules_mut() {
                let load = store.load_module(m).await;
                if let Err(e) = load.pdb {
                    let what = if m.name == "nt" {
                        format!(
                            "no symbols for the kernel: {e} (symbol path: {}). Fix --symbols or _NT_SYMBOL_PATH \
                             (srv*C:\\symbols*https://msdl.microsoft.com/download/symbols)",
                            self.options.symbols
                        )
                    } else {
                        format!("{}: {e}", m.name)
                    };
                    (self.emit)(&CaptureEvent::Warning(what));
                }
            }
        }
        let mut state = BootState {
            kern_base: v.kern_base,
            modules,
            plan: None,
            awaiting: None,
            handle: None,
            hw_planted: false,
            hit_tag_written: false,
            old_hit_tag: None,
            announced: false,
            extra: BTreeMap::new(),
            free_bp: None,
            pending_returns: Vec::new(),
            outstanding: HashMap::new(),
            special: SpecialWatch::default(),
        };
        self.make_plan(&mut state)?;
        self.state = Some(state);
        Ok(())
    }

    /// Plans, or defers a breakpoint whose module is not loaded yet.
    fn make_plan(&mut self, state: &mut BootState) -> Result<(), CaptureError> {
        match plan(&self.options.strategy, &state.modules) {
            Ok(p) => {
                if self.options.track_frees {
                    state.free_bp = self.free_breakpoint(&p, &state.modules);
                }
                state.plan = Some(p);
                state.awaiting = None;
                Ok(())
            }
            Err(e) => {
                let StrategyChoice::Breakpoint(symbol) = &self.options.strategy else {
                    return Err(e.into());
                };
                let Some(module) = unloaded_module(&state.modules, symbol) else {
                    return Err(e.into());
                };
                if state.awaiting.as_deref() != Some(module.as_str()) {
                    (self.emit)(&CaptureEvent::Deferred {
                        boot: self.boot,
                        target: symbol.clone(),
                        module: module.clone(),
                    });
                }
                state.awaiting = Some(module);
                Ok(())
            }
        }
    }

    /// `--track-frees`: where frees are caught. Special pool: its free function (only blocks
    /// in special pool stop there). PoolHitTag: the kernel's own break on frees, no
    /// breakpoint. Any other breakpoint: frees are not followed (the free functions are hot).
    fn free_breakpoint(&mut self, plan: &Plan, modules: &ModuleSet) -> Option<(u64, String)> {
        let Plan::Breakpoint { symbol, .. } = plan else {
            return None;
        };
        let free = match symbol.as_str() {
            "nt!MmAllocateSpecialPool" => "nt!MmFreeSpecialPool",
            "nt!ExAllocateHeapSpecialPool" => "nt!ExFreeHeapSpecialPool",
            _ => {
                (self.emit)(&CaptureEvent::Warning(format!(
                    "--track-frees with a breakpoint on {symbol}: allocation addresses are learnt, but frees \
                     are followed only with --strategy special-pool or pool-hit-tag"
                )));
                return None;
            }
        };
        match modules.resolve(free) {
            Ok(address) => Some((address, free.to_string())),
            Err(e) => {
                (self.emit)(&CaptureEvent::Warning(format!(
                    "--track-frees: {free} is not in the symbols ({e}): frees cannot be caught"
                )));
                None
            }
        }
    }

    /// A LoadSymbols stop: if a deferred breakpoint waits for this module, add it and plan.
    async fn module_loaded<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        s: &mut Stopped<S>,
        base: u64,
        size: u32,
        path: &str,
    ) -> Result<(), CaptureError> {
        let Some(mut state) = self.state.take() else {
            return Ok(());
        };
        let file = path.rsplit(['\\', '/']).next().unwrap_or(path).to_string();
        let stem = file.split('.').next().unwrap_or(&file).to_ascii_lowercase();
        let wanted = state
            .awaiting
            .as_deref()
            .is_some_and(|m| m.eq_ignore_ascii_case(&stem));
        if wanted && state.modules.by_name(&stem).is_none() {
            let mut m = Module::new(stem.clone(), file, base, size);
            let _ = m.read_headers(&mut TargetMemory(s)).await;
            if let Some(store) = &self.store {
                if let Err(e) = store.load_module(&mut m).await.pdb {
                    (self.emit)(&CaptureEvent::Warning(format!("{}: {e}", m.name)));
                }
            }
            let mut all: Vec<Module> = state.modules.modules().to_vec();
            all.push(m);
            state.modules = ModuleSet::new(Some(s.arch()), all);
        }
        let result = if wanted {
            self.make_plan(&mut state)
        } else {
            Ok(())
        };
        self.state = Some(state);
        result
    }

    /// Plants the plan if it is not planted; announces it once per boot.
    async fn plant<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        s: &mut Stopped<S>,
    ) -> Result<(), CaptureError> {
        let Some(b) = self.state.as_mut() else {
            return Ok(());
        };
        let Some(plan) = b.plan.clone() else {
            return Ok(());
        };
        match &plan {
            Plan::Breakpoint {
                address, symbol, ..
            } => {
                if b.handle.is_none()
                    && !b.hw_planted
                    && self.options.hardware_breakpoint
                    && self.hardware != Some(false)
                {
                    if set_dr0(s, *address).await? {
                        b.hw_planted = true;
                        self.hardware = Some(true);
                    } else {
                        self.hardware = Some(false);
                        (self.emit)(&CaptureEvent::Warning(
                            "the target refused the debug registers: using an int3 breakpoint (a single step and a re-plant per hit)".into(),
                        ));
                    }
                }
                if b.handle.is_none() && !b.hw_planted {
                    let write = api::WriteBreakPoint { address: *address };
                    b.handle = Some(match s.request(&write).await {
                        Ok(h) => h,
                        Err(KdError::Payload(PayloadError::Failed { .. })) => {
                            // The kernel refuses a second breakpoint at one address: one is
                            // already there (planted before a link loss whose reply never
                            // came, or left by a capture that was killed). Only a debugger
                            // plants KD breakpoints, and kdpilot is the debugger: clear the
                            // table (handles 1..=32, sheet 4.5) and plant again.
                            let message = format!(
                                "a breakpoint is already planted at {symbol} ({address:#x}), left by an \
                                 earlier session: clearing the kernel's breakpoint table and planting again"
                            );
                            (self.emit)(&CaptureEvent::Warning(message));
                            for handle in 1..=32 {
                                let _ = s.request(&api::RestoreBreakPoint { handle }).await;
                            }
                            // The extra breakpoints went with the table: planted again below.
                            b.extra.clear();
                            s.request(&write).await?
                        }
                        Err(e) => return Err(e.into()),
                    });
                }
            }
            Plan::PoolHitTag { address, .. } => {
                if !b.hit_tag_written {
                    if b.old_hit_tag.is_none() {
                        let old = s.read_virtual(*address, 4).await?;
                        let mut old = <[u8; 4]>::try_from(old).ok().map(u32::from_le_bytes);
                        if old == Some(self.options.tag) {
                            (self.emit)(&CaptureEvent::Warning(format!(
                                "nt!PoolHitTag already holds {:#010x} (left by a capture that was killed?): \
                                 it will be cleared to 0 at the end",
                                self.options.tag
                            )));
                            old = Some(0);
                        }
                        b.old_hit_tag = old;
                    }
                    write_u32(s, *address, self.options.tag).await?;
                    b.hit_tag_written = true;
                }
            }
        }
        let wanted = self.wanted_extras();
        let Some(b) = self.state.as_mut() else {
            return Ok(());
        };
        for address in &wanted {
            if b.extra.contains_key(address) {
                continue;
            }
            let write = api::WriteBreakPoint { address: *address };
            let mut planted = s.request(&write).await;
            if let Err(KdError::Payload(PayloadError::Failed { .. })) = planted {
                // Already there: planted just before a link loss whose reply never came (its
                // handle unknown). Only kdpilot plants breakpoints: every handle that is not one
                // of ours is that orphan. Remove them and plant again.
                let mut ours: BTreeSet<u32> = b.extra.values().copied().collect();
                ours.extend(b.handle);
                for handle in (1..=32).filter(|h| !ours.contains(h)) {
                    let _ = s.request(&api::RestoreBreakPoint { handle }).await;
                }
                planted = s.request(&write).await;
            }
            match planted {
                Ok(h) => {
                    b.extra.insert(*address, h);
                }
                Err(KdError::Payload(PayloadError::Failed { .. })) => {
                    // Refused again (the table is full of breakpoints that are not ours?): a
                    // return that cannot be caught leaves its block's address unknown.
                    let lost: Vec<u64> = b
                        .pending_returns
                        .iter()
                        .filter(|p| p.address == *address)
                        .map(|p| p.hit)
                        .collect();
                    b.pending_returns.retain(|p| p.address != *address);
                    if b.free_bp.as_ref().is_some_and(|(a, _)| a == address) {
                        b.free_bp = None;
                    }
                    (self.emit)(&CaptureEvent::Warning(format!(
                        "the target refused a breakpoint at {address:#x}: {}. The kernel's table \
                         holds 32 breakpoints: if another debugger planted some, remove them (bc *) \
                         or capture without --track-frees",
                        if lost.is_empty() {
                            "frees are not followed in this boot".to_string()
                        } else {
                            format!("the address of hit(s) {lost:?} is not learnt")
                        }
                    )));
                }
                Err(e) => return Err(e.into()),
            }
        }
        let stale: Vec<u64> = b
            .extra
            .keys()
            .filter(|a| !wanted.contains(a))
            .copied()
            .collect();
        for address in stale {
            if let Some(h) = b.extra.remove(&address) {
                let _ = s.request(&api::RestoreBreakPoint { handle: h }).await;
            }
        }
        if !b.announced {
            b.announced = true;
            let (target, address) = match &plan {
                Plan::Breakpoint {
                    symbol, address, ..
                } => (symbol.clone(), *address),
                Plan::PoolHitTag { address, .. } => ("nt!PoolHitTag".to_string(), *address),
            };
            if target.contains("SpecialPool") {
                b.special.last.get_or_insert_with(Instant::now);
                self.check_special_pool_tag(s).await;
            }
            (self.emit)(&CaptureEvent::Armed {
                boot: self.boot,
                target,
                address,
                why: plan.why().to_string(),
            });
        }
        Ok(())
    }

    /// Warns when special pool is not set for the tag (the breakpoint would never fire).
    async fn check_special_pool_tag<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        s: &mut Stopped<S>,
    ) {
        let Some(Ok(addr)) = self
            .state
            .as_ref()
            .map(|b| b.modules.resolve("nt!MmSpecialPoolTag"))
        else {
            return;
        };
        let Ok(bytes) = s.read_virtual(addr, 4).await else {
            return;
        };
        let Ok(b) = <[u8; 4]>::try_from(bytes) else {
            return;
        };
        let value = u32::from_le_bytes(b);
        if value != self.options.tag {
            (self.emit)(&CaptureEvent::Warning(format!(
                "special pool is set for tag {value:#010x} on the target, not {:#010x}: the breakpoint will not fire for your tag. \
                 Run `kdpilot pooltag --setup` on the target and reboot it, or use --strategy pool-hit-tag",
                self.options.tag
            )));
        }
    }

    /// The registers a hit needs: the integer registers and the program counter (GetContextEx,
    /// 136 bytes on x64 / 44 on x86), or the whole CONTEXT where GetContextEx is refused.
    async fn registers<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        s: &mut Stopped<S>,
    ) -> Result<Context, CaptureError> {
        let range = hit_registers(s.arch());
        self.registers_in(s, range).await
    }

    /// The registers of `range` (GetContextEx; the rest of the returned context is zero), or
    /// the whole CONTEXT where GetContextEx is refused.
    async fn registers_in<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        s: &mut Stopped<S>,
        range: ContextRange,
    ) -> Result<Context, CaptureError> {
        let arch = s.arch();
        if self.context_ex != Some(false) {
            match s.request_verified(&GetContextEx { range }).await {
                Ok(part) if part.bytes.len() == range.byte_count as usize => {
                    self.context_ex = Some(true);
                    let mut ctx = Context::zeroed(arch);
                    ctx.apply_partial(part.offset, &part.bytes);
                    return Ok(ctx);
                }
                Ok(_) | Err(KdError::Payload(_)) if self.context_ex.is_none() => {
                    // Older kernels (and the boot debugger) refuse it: GetContext from now on.
                    self.context_ex = Some(false);
                }
                Ok(_) => {
                    return Err(CaptureError::Kd(KdError::ReplyLost {
                        api: "GetContextEx",
                    }))
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(s.request_verified(&GetContext).await?)
    }

    /// Moves the program counter (SetContextEx where the target has it, else SetContext of the
    /// whole CONTEXT, which GetContext just read).
    async fn set_pc<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        s: &mut Stopped<S>,
        ctx: &Context,
    ) -> Result<(), CaptureError> {
        if self.context_ex == Some(true) {
            let range = match ctx {
                Context::Amd64(_) => ContextRange::for_amd64(&[Amd64Reg::Rip]),
                Context::X86(_) => ContextRange::for_x86(&[X86Reg::Eip]),
            };
            if let Some(range) = range {
                s.request(&SetContextEx::from_context(ctx, range)).await?;
                return Ok(());
            }
        }
        s.request(&SetContext::new(ctx.clone())).await?;
        Ok(())
    }

    /// Reads registers and stack and emits the record (unless the tag filter says the hit is
    /// not ours); returns the registers.
    async fn record<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        s: &mut Stopped<S>,
        plan: &Plan,
    ) -> Result<Context, CaptureError> {
        let (symbol, args) = match plan {
            Plan::Breakpoint { symbol, args, .. } => (symbol.clone(), *args),
            Plan::PoolHitTag { .. } => (
                "nt!PoolHitTag".to_string(),
                ArgLayout {
                    tag: None,
                    size: None,
                    pool_type: None,
                },
            ),
        };
        self.frozen_counts = true;
        let ctx = self.registers(s).await?;
        let state = s.state().clone();
        let s_arch = s.arch();
        let s_state_len = s.state_bytes().len() as u64;
        let regs = registers(&ctx);
        let arg = |i: Option<u8>, mem: &[u8]| -> Option<u64> {
            let i = i?;
            match &ctx {
                Context::Amd64(c) => {
                    Amd64Reg::gpr([1u8, 2, 8, 9].get(usize::from(i)).copied()?).map(|r| c.get(r))
                }
                Context::X86(_) => mem
                    .get(4 + 4 * usize::from(i)..8 + 4 * usize::from(i))
                    .and_then(|b| <[u8; 4]>::try_from(b).ok())
                    .map(|b| u64::from(u32::from_le_bytes(b))),
            }
        };
        if self.state.is_none() {
            return Ok(ctx);
        }
        let mut reader = CachedReader::new(TargetMemory(s));
        // x64 arguments are in registers: nothing to read. x86 (stdcall) arguments are above
        // the return address: read as much as the walker starts with, so the walk that follows
        // is served from the cache instead of a second KD round trip.
        let top = match &ctx {
            Context::Amd64(_) => Vec::new(),
            Context::X86(_) => {
                let len = WalkConfig::default().initial_stack_read;
                match reader.read(regs.sp(), len).await {
                    Ok(v) => v,
                    Err(e) => return Err(read_failed("the stack", &e)),
                }
            }
        };
        let tag = arg(args.tag, &top).map_or(self.options.tag, |t| t as u32);
        if args.tag.is_some() && tag != self.options.tag {
            return Ok(ctx); // another tag: not ours (breakpoint strategy filter)
        }
        if matches!(plan, Plan::PoolHitTag { .. }) {
            // PoolHitTag breaks on frees of the tag too: DbgBreakPoint is a leaf, [sp] is the
            // return into its caller (ExFreePoolWithTag for a free). Served from the cache on
            // x86; one small read on x64.
            let width = if s_arch == Arch::Amd64 { 8 } else { 4 };
            let word = reader
                .read(regs.sp(), width)
                .await
                .map_err(|e| read_failed("the stack", &e))?;
            let mut b = [0u8; 8];
            for (d, v) in b.iter_mut().zip(word.iter()) {
                *d = *v;
            }
            let ret = s_arch.canonical_address(u64::from_le_bytes(b));
            let caller = self.state.as_ref().and_then(|b| {
                b.modules
                    .describe(ret, true)
                    .symbol
                    .as_deref()
                    .map(str::to_string)
            });
            if caller.as_deref().is_some_and(is_free_function) {
                drop(reader);
                if self.options.track_frees {
                    self.pooltag_free(s, &ctx).await?;
                }
                return Ok(ctx);
            }
        }
        if symbol.contains("SpecialPool") {
            if let Some(b) = self.state.as_mut() {
                b.special.hit(Instant::now());
            }
        }
        if !self.sample() {
            return Ok(ctx);
        }
        let Some(boot) = self.state.as_ref() else {
            return Ok(ctx);
        };
        let trace = StackWalker::new(&boot.modules)
            .walk(&mut reader, regs)
            .await
            .map_err(|e| read_failed("the stack", &e))?;
        let stack_read = reader.stats().bytes_received;
        let stack_touched = if self.options.measure {
            // The same walk again, served from the cache, without the first window: the bytes
            // it asks for are the ones the unwind needs.
            let config = WalkConfig {
                initial_stack_read: 0,
                ..WalkConfig::default()
            };
            let mut touch = Touch {
                inner: &mut reader,
                ranges: Vec::new(),
            };
            let _ = StackWalker::with_config(&boot.modules, config)
                .walk(&mut touch, regs)
                .await;
            union_len(touch.ranges, regs.sp(), regs.sp().saturating_add(0x10000))
        } else {
            0
        };
        self.pending_cost = Some(HitCost {
            stack_touched,
            stack_read,
            state_change_len: s_state_len,
            context_bytes: if self.context_ex == Some(true) {
                u64::from(hit_registers(s_arch).byte_count)
            } else {
                s_arch.context_size() as u64
            },
            frames: trace.frames.len() as u64,
            hardware: state.is_single_step(),
            ..HitCost::default()
        });
        self.hits += 1;
        let frames: Vec<FrameRecord> = trace
            .frames
            .iter()
            .map(|f| frame_record(&boot.modules, f))
            .collect();
        if self.options.track_frees {
            self.await_return(&frames, state.thread);
        }
        let same_stack_as = capped(
            &mut self.stacks,
            self.options.guards.stack_cap,
            &frames,
            self.hits,
        );
        let frames = if same_stack_as.is_some() {
            Vec::new()
        } else {
            frames
        };
        let record = HitRecord {
            hit: self.hits,
            boot: self.boot,
            time: SystemTime::now(),
            tag: crate::record::tag_text(tag),
            tag_value: tag,
            size: arg(args.size, &top).unwrap_or(0),
            pool_type: arg(args.pool_type, &top).unwrap_or(0),
            processor: state.processor,
            thread: state.thread,
            arch: s_arch.into(),
            breakpoint: symbol,
            strategy: self.options.strategy.to_string(),
            frames,
            same_stack_as,
        };
        (self.emit)(&CaptureEvent::Hit(Box::new(record)));
        Ok(ctx)
    }

    /// The sampling decision for an allocation (and a `sampled` record when the rate changes).
    fn sample(&mut self) -> bool {
        if let Some((one_in, reason)) = self.sampler.adjust(&self.options.guards, Instant::now()) {
            let skipped = std::mem::take(&mut self.sampler.skipped);
            let record = EventRecord::Sampled {
                time: SystemTime::now(),
                boot: Some(self.boot),
                one_in,
                reason,
                skipped,
            };
            (self.emit)(&CaptureEvent::Record(Box::new(record)));
        }
        self.sampler.take()
    }

    /// `--track-frees`: plant a one-shot breakpoint where the allocator returns into its
    /// caller (the first frame outside the pool functions), to read the block's address there.
    fn await_return(&mut self, frames: &[FrameRecord], thread: u64) {
        let hit = self.hits;
        let Some(site) = frames.iter().skip(1).find(|f| !is_pool_internal(f)) else {
            (self.emit)(&CaptureEvent::Warning(format!(
                "hit {hit}: no caller outside the pool functions in its stack: its address cannot be learnt"
            )));
            return;
        };
        let Some(b) = self.state.as_mut() else {
            return;
        };
        b.pending_returns.retain(|p| p.thread != thread);
        b.pending_returns.push(PendingReturn {
            hit,
            thread,
            address: site.address,
        });
        // The kernel has 32 breakpoints; returns that never came (a thread that died) give way.
        if b.pending_returns.len() > MAX_PENDING_RETURNS {
            let gone = b.pending_returns.remove(0);
            (self.emit)(&CaptureEvent::Warning(format!(
                "hit {}: its allocator never returned to {:#x} on its thread: its address is not known",
                gone.hit, gone.address
            )));
        }
    }

    /// The function a leaf stop returns to (DbgBreakPoint has no prologue: `[sp]` is the
    /// return address).
    async fn leaf_caller<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        s: &mut Stopped<S>,
        ctx: &Context,
    ) -> Result<Option<String>, CaptureError> {
        let arch = s.arch();
        let sp = arch.canonical_address(ctx.sp());
        let width = if arch == Arch::Amd64 { 8 } else { 4 };
        let bytes = s.read_virtual(sp, width).await?;
        let mut word = [0u8; 8];
        for (d, b) in word.iter_mut().zip(bytes.iter()) {
            *d = *b;
        }
        let ret = arch.canonical_address(u64::from_le_bytes(word));
        Ok(self.state.as_ref().and_then(|b| {
            b.modules
                .describe(ret, true)
                .symbol
                .as_deref()
                .map(str::to_string)
        }))
    }

    /// The stack of a stop, symbolised.
    async fn walk_frames<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        s: &mut Stopped<S>,
        ctx: &Context,
    ) -> Result<Vec<FrameRecord>, CaptureError> {
        let Some(boot) = self.state.as_ref() else {
            return Ok(Vec::new());
        };
        let mut reader = CachedReader::new(TargetMemory(s));
        let trace = StackWalker::new(&boot.modules)
            .walk(&mut reader, registers(ctx))
            .await
            .map_err(|e| read_failed("the stack", &e))?;
        Ok(trace
            .frames
            .iter()
            .map(|f| frame_record(&boot.modules, f))
            .collect())
    }

    /// A free caught by PoolHitTag: the block is in a register the free function keeps it in
    /// (x64) or its first argument (x86); only blocks this capture learnt are recorded.
    async fn pooltag_free<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        s: &mut Stopped<S>,
        ctx: &Context,
    ) -> Result<(), CaptureError> {
        let mut candidates = Vec::new();
        if let Context::Amd64(c) = ctx {
            use Amd64Reg::*;
            for r in [Rbx, Rsi, Rdi, R12, R13, R14, R15, Rbp, Rcx, Rdx] {
                candidates.push(c.get(r));
            }
        }
        let known = self.known_block(&candidates, s.arch());
        if known.is_none() && s.arch() == Arch::Amd64 {
            // Not in a register: no stack walk for a block we never learnt.
            self.unknown_frees += 1;
            return Ok(());
        }
        let frames = self.walk_frames(s, ctx).await?;
        let known = known.or_else(|| {
            let args = frames.get(1).map(|f| f.args.clone()).unwrap_or_default();
            self.known_block(&args, s.arch())
        });
        self.free_record(s, known, frames, "nt!PoolHitTag".into());
        Ok(())
    }

    /// The first of `candidates` that is a block of this boot not freed yet.
    fn known_block(&self, candidates: &[u64], arch: Arch) -> Option<u64> {
        let b = self.state.as_ref()?;
        candidates
            .iter()
            .map(|v| arch.canonical_address(*v))
            .find(|v| *v != 0 && b.outstanding.contains_key(v))
    }

    /// Writes the `free` record of a block this capture learnt (or counts an unknown one).
    fn free_record<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        s: &Stopped<S>,
        block: Option<u64>,
        frames: Vec<FrameRecord>,
        breakpoint: String,
    ) {
        let state = s.state();
        let hit = block.and_then(|a| self.state.as_mut()?.outstanding.remove(&a));
        let (Some(address), Some(hit)) = (block, hit) else {
            self.unknown_frees += 1;
            return;
        };
        let same_stack_as = capped(
            &mut self.free_stacks,
            self.options.guards.stack_cap,
            &frames,
            hit,
        );
        let record = EventRecord::Free {
            time: SystemTime::now(),
            boot: self.boot,
            hit,
            address,
            processor: state.processor,
            thread: state.thread,
            arch: s.arch().into(),
            breakpoint,
            frames: if same_stack_as.is_some() {
                Vec::new()
            } else {
                frames
            },
            same_stack_as,
        };
        (self.emit)(&CaptureEvent::Record(Box::new(record)));
    }

    /// The PoolHitTag probe found the tag still allocated while special pool is quiet: warn,
    /// and follow the tag with PoolHitTag from now on if the user allows it; this stop (an
    /// allocation of the tag) is recorded either way.
    async fn special_pool_exhausted<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        s: &mut Stopped<S>,
    ) -> Result<(), CaptureError> {
        let switch = self.options.guards.on_exhaustion == OnExhaustion::PoolHitTag;
        let boot = self.boot;
        let Some(b) = self.state.as_mut() else {
            return Ok(());
        };
        let Ok(address) = b.modules.resolve("nt!PoolHitTag") else {
            return Ok(());
        };
        let quiet_secs = b.special.last.map_or(0, |l| l.elapsed().as_secs());
        b.special.exhausted = true;
        b.special.probe_until = None;
        let old = b.special.probe_old.take();
        let plan = Plan::PoolHitTag {
            address,
            why: format!(
                "special pool looks exhausted (no hit for {quiet_secs} s while the tag is still allocated): \
                 --on-exhaustion pool-hit-tag follows the tag with nt!PoolHitTag for the rest of the boot"
            ),
        };
        if switch {
            if let Some(h) = b.handle.take() {
                let _ = s.request(&api::RestoreBreakPoint { handle: h }).await;
            }
            // The Dr7 bits go with the next resume (dr7_for).
            b.hw_planted = false;
            b.plan = Some(plan.clone());
            b.hit_tag_written = true;
            b.old_hit_tag = old;
            b.announced = false;
        } else {
            let old = old.unwrap_or(0);
            write_u32(s, address, old).await?;
        }
        let record = EventRecord::SpecialPoolExhausted {
            time: SystemTime::now(),
            boot,
            quiet_secs,
            switched: switch,
        };
        (self.emit)(&CaptureEvent::Record(Box::new(record)));
        self.record(s, &plan).await?;
        Ok(())
    }

    /// What the exhaustion probe should do now: `Some(true)` start, `Some(false)` end.
    fn probe_action(&self) -> Option<bool> {
        let g = &self.options.guards;
        if g.on_exhaustion == OnExhaustion::Off {
            return None;
        }
        let b = self.state.as_ref()?;
        let special = matches!(&b.plan, Some(Plan::Breakpoint { symbol, .. }) if symbol.contains("SpecialPool"));
        if !special {
            return None;
        }
        let now = Instant::now();
        match b.special.probe_until {
            Some(until) => (now >= until).then_some(false),
            None => b.special.probe_due(g, now).then_some(true),
        }
    }

    /// Starts (writes our tag into PoolHitTag) or ends (restores it) the exhaustion probe, at
    /// a break-in.
    async fn probe<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        s: &mut Stopped<S>,
        start: bool,
    ) -> Result<(), CaptureError> {
        let window = self.options.guards.probe_window;
        let tag = self.options.tag;
        let Some(b) = self.state.as_mut() else {
            return Ok(());
        };
        let Ok(address) = b.modules.resolve("nt!PoolHitTag") else {
            b.special.probed = true;
            b.special.exhausted = true;
            (self.emit)(&CaptureEvent::Warning(
                "special pool has gone quiet, and nt!PoolHitTag is not in the kernel's symbols: \
                 kdpilot cannot check whether special pool is exhausted"
                    .into(),
            ));
            return Ok(());
        };
        let quiet = b.special.last.map_or(0, |l| l.elapsed().as_secs());
        if start {
            let old = s.read_virtual(address, 4).await?;
            let old = <[u8; 4]>::try_from(old.as_slice()).map_or(0, u32::from_le_bytes);
            write_u32(s, address, tag).await?;
            b.special.probe_old = Some(if old == tag { 0 } else { old });
            b.special.probe_until = Some(Instant::now() + window);
            b.special.probed = true;
            (self.emit)(&CaptureEvent::Warning(format!(
                "special pool has served no allocation of the tag for {quiet} s: watching nt!PoolHitTag for {} s \
                 to see whether the kernel still allocates it (special pool exhausted?)",
                window.as_secs()
            )));
        } else {
            let old = b.special.probe_old.take().unwrap_or(0);
            write_u32(s, address, old).await?;
            b.special.probe_until = None;
            (self.emit)(&CaptureEvent::Warning(format!(
                "the tag was not allocated while nt!PoolHitTag was watched ({} s): special pool is not exhausted, \
                 the tag is quiet",
                window.as_secs()
            )));
        }
        Ok(())
    }

    /// Which extra breakpoint (or probe) this stop is, if any.
    fn extra_stop(&self, state: &StateChange) -> Option<Extra> {
        let b = self.state.as_ref()?;
        if !state.is_breakpoint() {
            return None;
        }
        let pc = state.program_counter;
        if b.pending_returns.iter().any(|p| p.address == pc) {
            Some(Extra::Return)
        } else if b.free_bp.as_ref().is_some_and(|(a, _)| *a == pc) {
            Some(Extra::Free)
        } else if b.special.probe_until.is_some() && is_hit_tag_break(&b.modules, pc) {
            Some(Extra::Probe)
        } else {
            None
        }
    }

    /// The extra breakpoints this boot wants planted.
    fn wanted_extras(&self) -> BTreeSet<u64> {
        let mut out = BTreeSet::new();
        if let Some(b) = &self.state {
            if let Some((a, _)) = &b.free_bp {
                out.insert(*a);
            }
            out.extend(b.pending_returns.iter().map(|p| p.address));
        }
        out
    }

    /// A stop at an extra breakpoint: a return (the block's address), a free, or PoolHitTag's
    /// break during an exhaustion probe.
    async fn handle_extra<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        s: &mut Stopped<S>,
        kind: Extra,
    ) -> Result<Next, CaptureError> {
        self.frozen_counts = true;
        let state = s.state().clone();
        let pc = state.program_counter;
        let arch = s.arch();
        match kind {
            Extra::Return => {
                // Only the return value: 8 bytes instead of the 136 of a hit.
                let range = match arch {
                    Arch::Amd64 => ContextRange::for_amd64(&[Amd64Reg::Rax]),
                    Arch::X86 => ContextRange::for_x86(&[X86Reg::Eax]),
                }
                .unwrap_or(ContextRange::full(arch));
                let ctx = self.registers_in(s, range).await?;
                let value = arch.canonical_address(match &ctx {
                    Context::Amd64(c) => c.get(Amd64Reg::Rax),
                    Context::X86(c) => c.get(X86Reg::Eax),
                });
                let boot = self.boot;
                let mut record = None;
                if let Some(b) = self.state.as_mut() {
                    if let Some(i) = b
                        .pending_returns
                        .iter()
                        .position(|p| p.address == pc && p.thread == state.thread)
                    {
                        let p = b.pending_returns.remove(i);
                        if value != 0 {
                            b.outstanding.insert(value, p.hit);
                        }
                        record = Some(EventRecord::Allocated {
                            time: SystemTime::now(),
                            boot,
                            hit: p.hit,
                            address: value,
                        });
                    }
                }
                if let Some(r) = record {
                    (self.emit)(&CaptureEvent::Record(Box::new(r)));
                }
                // Another thread on its way through the same call site keeps it planted.
                Ok(if self.wanted_extras().contains(&pc) {
                    Next::StepOver
                } else {
                    Next::Go
                })
            }
            Extra::Free => {
                // Only special-pool blocks stop here, nearly all of them the capture's: the
                // hit's registers at once (a second, narrower read first costs more).
                let ctx = self.registers(s).await?;
                let first = match &ctx {
                    Context::Amd64(c) => c.get(Amd64Reg::Rcx),
                    Context::X86(_) => {
                        let sp = arch.canonical_address(ctx.sp());
                        let b = s.read_virtual(sp + 4, 4).await?;
                        <[u8; 4]>::try_from(b.as_slice())
                            .map_or(0, |b| u64::from(u32::from_le_bytes(b)))
                    }
                };
                let symbol = self
                    .state
                    .as_ref()
                    .and_then(|b| b.free_bp.as_ref().map(|(_, n)| n.clone()))
                    .unwrap_or_default();
                match self.known_block(&[first], arch) {
                    Some(block) => {
                        let frames = self.walk_frames(s, &ctx).await?;
                        self.free_record(s, Some(block), frames, symbol);
                    }
                    None => self.unknown_frees += 1,
                }
                Ok(Next::StepOver)
            }
            Extra::Probe => {
                let mut ctx = self.registers(s).await?;
                let caller = self.leaf_caller(s, &ctx).await?;
                if caller.as_deref().is_some_and(is_free_function) {
                    if self.options.track_frees {
                        self.pooltag_free(s, &ctx).await?;
                    }
                } else {
                    self.special_pool_exhausted(s).await?;
                }
                ctx.set_pc(pc.wrapping_add(1));
                self.set_pc(s, &ctx).await?;
                Ok(Next::Go)
            }
        }
    }

    /// Removes everything planted and resumes.
    async fn detach<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        mut s: Stopped<S>,
        reason: &str,
    ) -> Result<(), CaptureError> {
        let mut clean = true;
        if self.unknown_frees > 0 {
            (self.emit)(&CaptureEvent::Warning(format!(
                "{} free(s) of blocks this capture did not learn (allocated before it, or sampled out) were resumed without a record",
                std::mem::take(&mut self.unknown_frees)
            )));
        }
        if self.sampler.skipped > 0 {
            let record = EventRecord::Sampled {
                time: SystemTime::now(),
                boot: Some(self.boot),
                one_in: self.sampler.one_in,
                reason: "the capture ended while sampling".into(),
                skipped: std::mem::take(&mut self.sampler.skipped),
            };
            (self.emit)(&CaptureEvent::Record(Box::new(record)));
        }
        if let Some(b) = self.state.as_mut() {
            if let Some(h) = b.handle.take() {
                // Fails when the kernel already consumed it at a stop: then it is gone too.
                let _ = s.request(&api::RestoreBreakPoint { handle: h }).await;
            }
            for (_, h) in std::mem::take(&mut b.extra) {
                let _ = s.request(&api::RestoreBreakPoint { handle: h }).await;
            }
            b.pending_returns.clear();
            b.free_bp = None;
            if let (Some(old), Ok(address)) = (
                b.special.probe_old.take(),
                b.modules.resolve("nt!PoolHitTag"),
            ) {
                b.special.probe_until = None;
                if let Err(e) = write_u32(&mut s, address, old).await {
                    clean = false;
                    (self.emit)(&CaptureEvent::Warning(format!(
                        "could not restore nt!PoolHitTag to {old:#010x} after the exhaustion probe: {e}"
                    )));
                }
            }
            if let (Some(Plan::PoolHitTag { address, .. }), true) = (&b.plan, b.hit_tag_written) {
                let old = b.old_hit_tag.unwrap_or(0);
                match write_u32(&mut s, *address, old).await {
                    Ok(_) => b.hit_tag_written = false,
                    Err(e) => {
                        clean = false;
                        let e = e.to_string();
                        (self.emit)(&CaptureEvent::Warning(format!(
                            "could not restore nt!PoolHitTag to {old:#010x}: {e}"
                        )));
                    }
                }
            }
        }
        // Our Dr7 bits go with this resume; KernelDr0 may keep the address (disabled).
        let base = s.state().control_report(s.arch()).dr7();
        let dr7 = if self.hardware == Some(true) {
            base & !DR7_DR0_EXECUTE
        } else {
            base
        };
        let mut running = s.resume(&Continue2::go().with_dr7(dr7)).await?;
        if let Some(b) = self.state.as_mut() {
            b.hw_planted = false;
        }
        self.in_flight = None;
        // Another processor may have hit the breakpoint while the target was stopped: its
        // report comes right after the resume, and with no debugger left to answer it the
        // machine would wait forever. Resume such stops until the line stays quiet.
        // On a damaged line a stop can take seconds to come through, and a break-in byte sent
        // twice (the first stop's report arrived damaged) breaks in again after the resume.
        // A continue that was never acknowledged may not have arrived: the silence RESET that
        // finds out goes after 2 s, so wait past it.
        for _ in 0..8 {
            let quiet = if self.stats().frame_errors > 0 || running.continue_unconfirmed() {
                Duration::from_secs(4)
            } else {
                Duration::from_secs(1)
            };
            match running.wait_stop(quiet).await? {
                WaitOutcome::StillRunning(_) => break,
                WaitOutcome::Stopped(s) => {
                    let st = s.state();
                    (self.emit)(&CaptureEvent::Warning(format!(
                        "as the capture ended, processor {} reported {}; resumed it",
                        st.processor,
                        describe_stop(st)
                    )));
                    let dr7 = self.dr7_for(&s);
                    running = s.resume(&Continue2::go().with_dr7(dr7)).await?;
                }
            }
        }
        let left_planted = if clean {
            Vec::new()
        } else {
            self.left_planted()
        };
        (self.emit)(&CaptureEvent::Detached {
            hits: self.hits,
            reason: reason.to_string(),
            clean,
            left_planted,
        });
        Ok(())
    }
}

/// A read of target memory that failed through the link (unreadable memory is a short read,
/// not an error): the link is in trouble. Reconnecting makes the kernel report the same stop
/// again, and it is read again.
fn read_failed(what: &str, e: &dyn std::error::Error) -> CaptureError {
    let mut detail = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        detail.push_str(": ");
        detail.push_str(&s.to_string());
        source = s.source();
    }
    CaptureError::Kd(KdError::LinkLost(format!("reading {what}: {detail}")))
}

/// Writes a u32 to target memory (nt!PoolHitTag: set, restored, probed).
async fn write_u32<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut Stopped<S>,
    address: u64,
    value: u32,
) -> Result<(), KdError> {
    s.request(&api::WriteVirtualMemory {
        address,
        data: value.to_le_bytes().to_vec(),
    })
    .await
    .map(drop)
}

/// Puts `address` in KernelDr0 of every processor (control space: AMD64 KSPECIAL_REGISTERS,
/// read then written back whole from Cr0 to KernelDr0; x86 KPROCESSOR_STATE+0x2DC). Continue2's
/// Dr7 enables it. False when the target refuses (the caller falls back to an int3).
async fn set_dr0<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut Stopped<S>,
    address: u64,
) -> Result<bool, CaptureError> {
    let cpus = u16::try_from(s.state().number_processors.clamp(1, 64)).unwrap_or(1);
    for cpu in 0..cpus {
        let write = match s.arch() {
            Arch::Amd64 => {
                let read = api::ReadControlSpace {
                    address: 2,
                    count: 0x28,
                };
                let mut regs = match s.request_on(cpu, &read).await {
                    Ok(r) => r.data,
                    Err(KdError::Payload(_)) => return Ok(false),
                    Err(e) => return Err(e.into()),
                };
                if regs.len() < 0x28 {
                    return Ok(false);
                }
                regs.truncate(0x28);
                if let Some(dr0) = regs.get_mut(0x20..0x28) {
                    dr0.copy_from_slice(&address.to_le_bytes());
                }
                api::WriteControlSpace {
                    address: 2,
                    data: regs,
                }
            }
            Arch::X86 => api::WriteControlSpace {
                address: 0x2CC + 0x10,
                data: (address as u32).to_le_bytes().to_vec(),
            },
        };
        match s.request_on(cpu, &write).await {
            Ok(_) => {}
            Err(KdError::Payload(_)) => return Ok(false),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(true)
}

/// Whether the stop's Dr6 says DR0 matched (B0).
fn dr6_b0(state: &StateChange, arch: Option<Arch>) -> bool {
    arch.is_some_and(|a| state.control_report(a).dr6() & 1 != 0)
}

/// A reader that notes every range it served (for [`HitCost::stack_touched`]).
struct Touch<R> {
    inner: R,
    ranges: Vec<(u64, u64)>,
}

impl<R: MemoryReader> MemoryReader for Touch<R> {
    async fn read(&mut self, address: u64, len: usize) -> Result<Vec<u8>, ReadError> {
        let got = self.inner.read(address, len).await?;
        self.ranges
            .push((address, address.saturating_add(got.len() as u64)));
        Ok(got)
    }
}

/// Bytes of `[lo, hi)` covered by the union of `ranges`.
fn union_len(mut ranges: Vec<(u64, u64)>, lo: u64, hi: u64) -> u64 {
    ranges.sort_unstable();
    let mut total = 0;
    let mut end = lo;
    for (a, b) in ranges {
        let (a, b) = (a.max(end), b.min(hi));
        if b > a {
            total += b - a;
            end = b;
        }
    }
    total
}

/// A stop in a few words, for messages.
fn describe_stop(st: &StateChange) -> String {
    match &st.info {
        StateInfo::LoadSymbols(_) if st.is_unload_all() => "a reboot (unload all)".to_string(),
        StateInfo::LoadSymbols(ls) if ls.is_unload() => format!("the unload of {}", ls.path_str()),
        StateInfo::LoadSymbols(ls) => format!("the load of {}", ls.path_str()),
        StateInfo::Exception(e) if e.record.code == status::BREAKPOINT => {
            format!("a breakpoint at {:#x}", st.program_counter)
        }
        StateInfo::Exception(e) => format!(
            "exception {:#010x} at {:#x}",
            e.record.code, st.program_counter
        ),
        _ => format!("a stop at {:#x}", st.program_counter),
    }
}

/// Resolves when `f` turns true (polled four times a second).
async fn until(f: impl Fn() -> bool) {
    while !f() {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The registers a hit reads: x64 Rax..Rip (arguments in Rcx/Rdx/R8/R9, the unwinder's
/// integer registers, RIP), x86 Edi..Esp (the unwinder's registers, EIP, ESP).
pub fn hit_registers(arch: Arch) -> ContextRange {
    let r = match arch {
        Arch::Amd64 => ContextRange::for_amd64(&[Amd64Reg::Rax, Amd64Reg::Rip]),
        Arch::X86 => ContextRange::for_x86(&[X86Reg::Edi, X86Reg::Esp]),
    };
    r.unwrap_or(ContextRange::full(arch))
}

/// Return breakpoints awaited at once at most (the kernel has 32 breakpoints).
const MAX_PENDING_RETURNS: usize = 16;

/// A kernel free function (the caller of DbgBreakPoint for PoolHitTag's free break).
fn is_free_function(name: &str) -> bool {
    name.starts_with("ExFree") || name.starts_with("ExpFree") || name.starts_with("MmFree")
}

/// A frame inside the kernel's pool allocator (the return breakpoint goes past these, into
/// the allocator's caller, where rax/eax is the block).
fn is_pool_internal(f: &FrameRecord) -> bool {
    f.module.as_deref() == Some("nt")
        && f.function.as_deref().is_some_and(|n| {
            n == "DbgBreakPoint"
                || n.starts_with("ExAllocate")
                || n.starts_with("ExpAllocate")
                || n == "MmAllocateSpecialPool"
                || n.starts_with("RtlpHp")
        })
}

/// Counts a stack; past the cap, the hit number of its first occurrence (`same_stack_as`).
fn capped(
    seen: &mut HashMap<String, (u64, u64)>,
    cap: Option<u64>,
    frames: &[FrameRecord],
    hit: u64,
) -> Option<u64> {
    let cap = cap?;
    let key = frames
        .iter()
        .map(FrameRecord::call_site)
        .collect::<Vec<_>>()
        .join("\n");
    let entry = seen.entry(key).or_insert((0, hit));
    entry.0 += 1;
    (entry.0 > cap).then_some(entry.1)
}

/// Where the kernel breaks for PoolHitTag: the int3 of nt!DbgBreakPoint (break-ins and
/// bugchecks break in RtlpBreakWithStatusInstruction / DbgBreakPointWithStatus instead).
fn is_hit_tag_break(modules: &ModuleSet, pc: u64) -> bool {
    let loc = modules.describe(pc, false);
    loc.module.as_deref() == Some("nt") && loc.symbol.as_deref() == Some("DbgBreakPoint")
}

fn add_stats(a: &LinkStats, b: &LinkStats) -> LinkStats {
    LinkStats {
        bytes_tx: a.bytes_tx + b.bytes_tx,
        bytes_rx: a.bytes_rx + b.bytes_rx,
        packets_tx: a.packets_tx + b.packets_tx,
        packets_rx: a.packets_rx + b.packets_rx,
        retransmits: a.retransmits + b.retransmits,
        frame_errors: a.frame_errors + b.frame_errors,
        duplicates: a.duplicates + b.duplicates,
        resets_rx: a.resets_rx + b.resets_rx,
    }
}

/// The unwinder's registers from a CONTEXT.
pub fn registers(ctx: &Context) -> Registers {
    match ctx {
        Context::Amd64(c) => {
            let mut gpr = [0u64; 16];
            for (slot, r) in gpr.iter_mut().zip(Amd64Reg::GPR_ORDER) {
                *slot = c.get(r);
            }
            Registers::X64(X64Registers {
                gpr,
                rip: c.get(Amd64Reg::Rip),
            })
        }
        Context::X86(c) => {
            let g = |r: X86Reg| c.get(r) as u32;
            Registers::X86(X86Registers {
                eip: g(X86Reg::Eip),
                esp: g(X86Reg::Esp),
                ebp: g(X86Reg::Ebp),
                ebx: g(X86Reg::Ebx),
                esi: g(X86Reg::Esi),
                edi: g(X86Reg::Edi),
                eax: g(X86Reg::Eax),
                ecx: g(X86Reg::Ecx),
                edx: g(X86Reg::Edx),
            })
        }
    }
}

fn frame_record(modules: &ModuleSet, f: &Frame) -> FrameRecord {
    let loc = modules.describe(f.pc, f.pc_is_return_address);
    FrameRecord {
        address: f.pc,
        module: loc.module.clone(),
        function: loc.symbol.as_deref().map(str::to_string),
        offset: loc.offset,
        child_sp: f.sp,
        return_address: f.return_address.unwrap_or(0),
        frame_pointer: Some(f.fp),
        args: f.args.clone(),
        trust: f.trust.to_string(),
    }
}

impl<F: FnMut(&CaptureEvent)> std::fmt::Debug for Capture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capture")
            .field("boot", &self.boot)
            .field("hits", &self.hits)
            .finish()
    }
}
