//! The capture loop over one KD link: identify, load symbols, arm, record every hit, step over
//! and re-arm, follow reboots, detach cleanly. It emits [`CaptureEvent`]s and never prints.
//!
//! Status: one link (no reopening after a lost link yet), reboots followed on the same link.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use kdpilot_kd::api::{self, Continue2, GetContext, SetContext};
use kdpilot_kd::client::{KdError, Running, Stopped, WaitOutcome};
use kdpilot_kd::context::Context;
use kdpilot_kd::state_change::StateInfo;
use kdpilot_kd::wire::status;
use kdpilot_kd::{Arch, PayloadError};
use kdpilot_symbols::{
    CachedReader, Frame, KernelInfo, MemoryReader, Module, ModuleSet, ReadError, Registers,
    StackWalker, StoreOptions, SymbolPath, SymbolStore, WalkConfig, WalkLimits, X64Registers,
    X86Registers,
};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::record::{FrameRecord, HitRecord};
use crate::strategy::{plan, ArgLayout, Plan, StrategyChoice, StrategyError};

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
}

/// What the capture did or saw; the CLI renders these.
#[derive(Clone, Debug)]
pub enum CaptureEvent {
    /// Synchronised with the target.
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
    /// A captured allocation.
    Hit(Box<HitRecord>),
    /// The target is going down for a reboot ("unload all").
    Reboot {
        /// The boot that ended.
        boot: u64,
    },
    /// Something the user should know.
    Warning(String),
    /// The capture ended and left the target running.
    Detached {
        /// Hits captured.
        hits: u64,
        /// Whether every breakpoint was removed and PoolHitTag restored.
        clean: bool,
    },
}

/// Why a capture ended badly.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The KD link failed.
    #[error(transparent)]
    Kd(#[from] KdError),
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

/// Per-boot state: modules, plan, the breakpoint handle or the old PoolHitTag.
struct Armed {
    modules: ModuleSet,
    plan: Plan,
    handle: Option<u32>,
    old_hit_tag: Option<u32>,
}

/// The capture engine.
pub struct Capture<F: FnMut(&CaptureEvent)> {
    options: CaptureOptions,
    emit: F,
    store: Option<Arc<SymbolStore>>,
    boot: u64,
    hits: u64,
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
        })
    }

    /// Hits captured so far.
    pub fn hits(&self) -> u64 {
        self.hits
    }

    /// Runs the capture on a connected, stopped target until max hits, the duration, or `stop`
    /// is set (checked twice a second: Ctrl-C); then detaches, leaving the target running with
    /// nothing planted.
    pub async fn run<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        mut stopped: Stopped<S>,
        stop: &AtomicBool,
    ) -> Result<u64, CaptureError> {
        let started = Instant::now();
        if let Some(v) = stopped.version().cloned() {
            (self.emit)(&CaptureEvent::Connected {
                build: v.minor_version,
                arch: stopped.arch(),
                kern_base: v.kern_base,
                processors: stopped.state().number_processors,
            });
        }
        let mut armed = self.arm(&mut stopped).await?;
        let mut running = self.resume(stopped).await?;
        loop {
            let done = self.options.max_hits.is_some_and(|m| self.hits >= m)
                || self
                    .options
                    .duration
                    .is_some_and(|d| started.elapsed() >= d)
                || stop.load(Ordering::Relaxed);
            if done {
                break;
            }
            let s = match running.wait_stop(Duration::from_millis(500)).await? {
                WaitOutcome::StillRunning(r) => {
                    running = r;
                    continue;
                }
                WaitOutcome::Stopped(s) => s,
            };
            let (r, a) = self.on_stop(s, armed).await?;
            running = r;
            armed = a;
        }
        let stopped = self.break_in(running).await?;
        self.detach(stopped, armed).await
    }

    async fn break_in<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        running: Running<S>,
    ) -> Result<Stopped<S>, CaptureError> {
        Ok(running.break_in(Duration::from_secs(30)).await?)
    }

    async fn resume<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        stopped: Stopped<S>,
    ) -> Result<Running<S>, CaptureError> {
        let dr7 = stopped.state().control_report(stopped.arch()).dr7();
        Ok(stopped.resume(&Continue2::go().with_dr7(dr7)).await?)
    }

    /// Identifies the boot, reads modules and symbols, makes and applies the plan.
    async fn arm<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        stopped: &mut Stopped<S>,
    ) -> Result<Armed, CaptureError> {
        let v = stopped
            .version()
            .cloned()
            .ok_or_else(|| CaptureError::Memory("no version".into()))?;
        self.boot += 1;
        (self.emit)(&CaptureEvent::Boot {
            boot: self.boot,
            kern_base: v.kern_base,
            build: v.minor_version,
        });
        let kernel = KernelInfo {
            arch: stopped.arch(),
            kern_base: v.kern_base,
            ps_loaded_module_list: v.ps_loaded_module_list,
        };
        let mut modules = {
            let mut reader = TargetMemory(stopped);
            match ModuleSet::from_target(&mut reader, &kernel, &WalkLimits::default()).await {
                Ok((set, warnings)) => {
                    for w in warnings {
                        (self.emit)(&CaptureEvent::Warning(format!("module list: {w}")));
                    }
                    set
                }
                Err(e) => return Err(CaptureError::Memory(e.to_string())),
            }
        };
        if modules.by_name("nt").is_none() {
            // Early in a boot the list may be empty: the kernel alone, from GetVersion.
            let mut nt = Module::new("nt", "ntoskrnl.exe", v.kern_base, 0);
            let _ = nt.read_headers(&mut TargetMemory(stopped)).await;
            modules = ModuleSet::new(Some(stopped.arch()), vec![nt]);
        }
        if let Some(store) = &self.store {
            for m in modules.modules_mut() {
                let load = store.load_module(m).await;
                if let Err(e) = load.pdb {
                    (self.emit)(&CaptureEvent::Warning(format!("{}: {e}", m.name)));
                }
            }
        }
        let plan = plan(&self.options.strategy, &modules)?;
        let mut armed = Armed {
            modules,
            plan,
            handle: None,
            old_hit_tag: None,
        };
        self.plant(stopped, &mut armed).await?;
        if let Plan::Breakpoint { symbol, .. } = &armed.plan {
            if symbol.contains("SpecialPool") {
                self.check_special_pool_tag(stopped, &armed).await;
            }
        }
        let address = match &armed.plan {
            Plan::Breakpoint { address, .. } | Plan::PoolHitTag { address, .. } => *address,
        };
        (self.emit)(&CaptureEvent::Armed {
            boot: self.boot,
            target: armed.plan.target(),
            address,
            why: armed.plan.why().to_string(),
        });
        Ok(armed)
    }

    /// Warns when special pool is not set for the tag (the breakpoint would never fire).
    async fn check_special_pool_tag<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        stopped: &mut Stopped<S>,
        armed: &Armed,
    ) {
        let Ok(addr) = armed.modules.resolve("nt!MmSpecialPoolTag") else {
            return;
        };
        let Ok(bytes) = stopped.read_virtual(addr, 4).await else {
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

    async fn plant<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        stopped: &mut Stopped<S>,
        armed: &mut Armed,
    ) -> Result<(), CaptureError> {
        match armed.plan.clone() {
            Plan::Breakpoint { address, .. } => {
                armed.handle = Some(stopped.request(&api::WriteBreakPoint { address }).await?);
            }
            Plan::PoolHitTag { address, .. } => {
                if armed.old_hit_tag.is_none() {
                    let old = stopped.read_virtual(address, 4).await?;
                    armed.old_hit_tag = <[u8; 4]>::try_from(old).ok().map(u32::from_le_bytes);
                }
                stopped
                    .request(&api::WriteVirtualMemory {
                        address,
                        data: self.options.tag.to_le_bytes().to_vec(),
                    })
                    .await?;
            }
        }
        Ok(())
    }

    /// Handles one stop and resumes.
    async fn on_stop<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        mut s: Stopped<S>,
        mut armed: Armed,
    ) -> Result<(Running<S>, Armed), CaptureError> {
        let state = s.state().clone();
        match &state.info {
            StateInfo::LoadSymbols(_) if state.is_unload_all() => {
                (self.emit)(&CaptureEvent::Reboot { boot: self.boot });
                // As WinDbg answers "unload all": the old continue.
                let r = s.continue_old(status::DBG_CONTINUE).await?;
                return self.await_boot(r).await;
            }
            StateInfo::Exception(e) if e.record.code == status::BREAKPOINT => {
                let pc = state.program_counter;
                match armed.plan.clone() {
                    Plan::Breakpoint {
                        address,
                        symbol,
                        args,
                        ..
                    } if pc == address => {
                        self.hit(&mut s, &armed, &symbol, args).await?;
                        // The kernel consumed the breakpoint: step over, re-plant, go.
                        let r = s.resume(&Continue2::single_step()).await?;
                        let mut s2 = match r.wait_stop(Duration::from_secs(30)).await? {
                            WaitOutcome::Stopped(s2) => s2,
                            WaitOutcome::StillRunning(r) => self.break_in(r).await?,
                        };
                        self.plant(&mut s2, &mut armed).await?;
                        let r = self.resume(s2).await?;
                        return Ok((r, armed));
                    }
                    Plan::PoolHitTag { .. } if self.is_kernel_break(&armed, pc) => {
                        let mut ctx = self
                            .hit(
                                &mut s,
                                &armed,
                                "nt!PoolHitTag",
                                ArgLayout {
                                    tag: None,
                                    size: None,
                                    pool_type: None,
                                },
                            )
                            .await?;
                        // Step past the kernel's own int3, as WinDbg does (SetContext RIP+1),
                        // with the registers the hit already read (SetContext needs a
                        // GetContext in this stop, which that was).
                        ctx.set_pc(pc + 1);
                        s.request(&SetContext::new(ctx)).await?;
                        let r = self.resume(s).await?;
                        return Ok((r, armed));
                    }
                    _ => {}
                }
            }
            _ => {}
        }
        // Any other stop: a boot, a foreign breakpoint, a step. A new boot needs re-arming.
        if let Ok(v) = s.refresh_version().await.cloned() {
            if armed
                .modules
                .by_name("nt")
                .is_none_or(|nt| nt.base != v.kern_base)
            {
                armed = self.arm(&mut s).await?;
            }
        }
        let r = self.resume(s).await?;
        Ok((r, armed))
    }

    /// After "unload all": wait for the new boot's first stop and re-arm there.
    async fn await_boot<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        r: Running<S>,
    ) -> Result<(Running<S>, Armed), CaptureError> {
        let mut s = match r.wait_stop(Duration::from_secs(600)).await? {
            WaitOutcome::Stopped(s) => s,
            // The new kernel did not report (KdDebuggerNotPresent): break in.
            WaitOutcome::StillRunning(r) => r.break_in(Duration::from_secs(30)).await?,
        };
        s.refresh_version().await?;
        let armed = self.arm(&mut s).await?;
        Ok((self.resume(s).await?, armed))
    }

    fn is_kernel_break(&self, armed: &Armed, pc: u64) -> bool {
        let loc = armed.modules.describe(pc, false);
        loc.symbol
            .as_deref()
            .is_some_and(|s| s.contains("DbgBreakPoint") || s.contains("RtlpBreakWithStatus"))
    }

    /// Reads registers and stack and emits the record; returns the registers.
    async fn hit<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        s: &mut Stopped<S>,
        armed: &Armed,
        symbol: &str,
        args: ArgLayout,
    ) -> Result<Context, CaptureError> {
        let ctx = s.request(&GetContext).await?;
        let state = s.state().clone();
        let s_arch = s.arch();
        let regs = registers(&ctx);
        let arg = |i: Option<u8>, mem: &[u8]| -> Option<u64> {
            let i = i?;
            match &ctx {
                Context::Amd64(c) => {
                    kdpilot_kd::context::Amd64Reg::gpr([1u8, 2, 8, 9].get(usize::from(i)).copied()?)
                        .map(|r| c.get(r))
                }
                Context::X86(_) => mem
                    .get(4 + 4 * usize::from(i)..8 + 4 * usize::from(i))
                    .and_then(|b| <[u8; 4]>::try_from(b).ok())
                    .map(|b| u64::from(u32::from_le_bytes(b))),
            }
        };
        let mut reader = CachedReader::new(TargetMemory(s));
        // x64 arguments are in registers: nothing to read. x86 (stdcall) arguments are above
        // the return address: read as much as the walker starts with, so the walk that follows
        // is served from the cache instead of a second KD round trip.
        let top = match &ctx {
            Context::Amd64(_) => Vec::new(),
            Context::X86(_) => {
                let len = WalkConfig::default().initial_stack_read;
                reader.read(regs.sp(), len).await.unwrap_or_default()
            }
        };
        let tag = arg(args.tag, &top).map_or(self.options.tag, |t| t as u32);
        if args.tag.is_some() && tag != self.options.tag {
            return Ok(ctx); // another tag: not ours (breakpoint strategy filter)
        }
        let trace = StackWalker::new(&armed.modules)
            .walk(&mut reader, regs)
            .await
            .map_err(|e| CaptureError::Memory(e.to_string()))?;
        self.hits += 1;
        let frames = trace
            .frames
            .iter()
            .map(|f| frame_record(&armed.modules, f))
            .collect();
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
            breakpoint: symbol.to_string(),
            strategy: self.options.strategy.to_string(),
            frames,
        };
        (self.emit)(&CaptureEvent::Hit(Box::new(record)));
        Ok(ctx)
    }

    /// Removes everything planted and resumes.
    async fn detach<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        mut s: Stopped<S>,
        armed: Armed,
    ) -> Result<u64, CaptureError> {
        let mut clean = true;
        if let Some(h) = armed.handle {
            // Fails when the kernel already consumed it at a stop: then it is gone too.
            let _ = s.request(&api::RestoreBreakPoint { handle: h }).await;
        }
        if let (Plan::PoolHitTag { address, .. }, Some(old)) = (&armed.plan, armed.old_hit_tag) {
            if s.request(&api::WriteVirtualMemory {
                address: *address,
                data: old.to_le_bytes().to_vec(),
            })
            .await
            .is_err()
            {
                clean = false;
                (self.emit)(&CaptureEvent::Warning(format!(
                    "could not restore nt!PoolHitTag to {old:#010x}"
                )));
            }
        }
        let _ = self.resume(s).await?;
        (self.emit)(&CaptureEvent::Detached {
            hits: self.hits,
            clean,
        });
        Ok(self.hits)
    }
}

/// The unwinder's registers from a CONTEXT.
pub fn registers(ctx: &Context) -> Registers {
    use kdpilot_kd::context::{Amd64Reg, X86Reg};
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
