//! The workload: kernel threads that allocate (and free) pool along real call paths of the
//! fixture images, stopping wherever a debugger would make them stop, and the ground truth of
//! every allocation for the tests.
//!
//! An allocation walks its path outermost first: a driver function chain (from the scenario),
//! the allocator API it calls, and the kernel-internal continuation of that API, which depends
//! on the kernel flavour (classic: ExAllocatePoolWithTag → MmAllocateSpecialPool; modern: every
//! API → ExAllocateHeapPool → ExAllocateHeapSpecialPool) and on the tag (special pool for
//! `MmSpecialPoolTag`, a break into the debugger for `PoolHitTag`). At each function entry it
//! stops if a debugger breakpoint (an int3 from the breakpoint table) or an enabled hardware
//! execution breakpoint is there. The registers and stack at a stop are built from the images'
//! unwind information ([`crate::frames`]) and the return addresses of the real `call`
//! instructions ([`crate::callsites`]).
//!
//! When the innermost function has run, the operation returns through its path, innermost
//! caller first: the CPU executes at the return address of each caller's `call`
//! ([`TruthRecord::returns`]). A debugger int3 or an enabled hardware execution breakpoint there
//! stops it, as a host that plants a one-shot breakpoint at the allocator's return address into
//! the driver expects. The registers at such a stop are the callee's entry context after its
//! `ret`: x64 `rip` = the return address, `rsp` raised by 8; x86 `eip` = the return address,
//! `esp` raised by 4 plus the bytes the stdcall callee pops with its `ret N` (read from the
//! callee's code, as the x86 frame builder does). The return value register (`rax`/`eax`) holds the block at every return
//! of an allocation's path (every function on it hands the block up, the kernel's own
//! `DbgBreakPoint` of a PoolHitTag break included: the model does not reorder the path) and 0 at
//! the returns of a free (void); the other volatile registers hold garbage. Nonvolatile
//! registers are those the caller had before the call, which the callee restored.
//!
//! Model choice for PoolHitTag frees: the kernel breaks (`DbgBreakPoint`) from inside
//! ExFreePoolWithTag, which still needs the block afterwards, so it keeps P live across the
//! call in a nonvolatile register: on x64 `rbx` = P at that stop. On x86 the block is
//! ExFreePoolWithTag's first stdcall argument, on the stack above its return address (frame 1
//! of the stop), as the driver pushed it.
//!
//! Special pool has a per-boot capacity in blocks ([`Workload::special_pool_blocks`], default
//! unlimited): while that many special-pool blocks of this boot are not freed, allocations that
//! would go to special pool silently take the normal path (classic `ExpAllocateNormalPool`,
//! modern `RtlpHpAllocateHeap`), as the real kernel falls back when special pool is full; frees
//! of special-pool blocks give room back and a reboot empties it.

use std::collections::BTreeMap;

use kdpilot_kd::context::{Amd64Reg, Context, X86Reg};
use kdpilot_kd::wire::status;
use kdpilot_kd::Arch;

use crate::callsites::{calls_to, CallKind};
use crate::frames::{build_amd64, BuiltFrame, FrameError, MappedImage, PathStep};
use crate::frames_x86::{build_x86, callee_pops};
use crate::memory::Memory;
use crate::pdbmap::PdbMap;

/// What the workload needs from the simulated machine.
pub trait KernelView {
    /// Architecture.
    fn arch(&self) -> Arch;
    /// Target memory.
    fn memory(&mut self) -> &mut Memory;
    /// Where the image with this module name ("nt", "hal", "leakydrv") is loaded this boot.
    fn image(&self, module: &str) -> Option<MappedImage>;
    /// Changes on every boot (images move).
    fn boot_id(&self) -> u64;
    /// Whether a debugger breakpoint (int3 from the breakpoint table) is at `va` now.
    fn breakpoint_at(&self, va: u64) -> bool;
    /// The index (0-3) of an enabled hardware execution breakpoint at `va`, if any.
    fn hardware_breakpoint_at(&self, va: u64) -> Option<u8>;
    /// Number of processors.
    fn processors(&self) -> u32;
    /// The register context of a processor.
    fn context(&self, cpu: u16) -> Option<&Context>;
    /// Sets the register context of a processor.
    fn set_context(&mut self, cpu: u16, ctx: Context);
}

/// Which allocator API a driver path calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllocApi {
    /// ExAllocatePoolWithTag(PoolType, NumberOfBytes, Tag).
    PoolWithTag,
    /// ExAllocatePool2(Flags, NumberOfBytes, Tag).
    Pool2,
}

impl AllocApi {
    fn function(self) -> &'static str {
        match self {
            AllocApi::PoolWithTag => "ExAllocatePoolWithTag",
            AllocApi::Pool2 => "ExAllocatePool2",
        }
    }
}

/// Which free API a driver path calls to give a block back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FreeApi {
    /// ExFreePoolWithTag(P, Tag).
    PoolWithTag,
    /// ExFreePool(P).
    Pool,
}

impl FreeApi {
    fn function(self) -> &'static str {
        match self {
            FreeApi::PoolWithTag => "ExFreePoolWithTag",
            FreeApi::Pool => "ExFreePool",
        }
    }
}

/// One kind of allocation the workload makes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllocationSpec {
    /// The calling chain, outermost first, as `module!function`, ending with the function that
    /// calls the allocator (e.g. `["nt!KiCallDriverEntry", "leakydrv!DriverEntry",
    /// "leakydrv!LeakyWorker", "leakydrv!LeakyAllocPushes"]`).
    pub path: Vec<String>,
    /// The API the last function calls.
    pub api: AllocApi,
    /// Pool tag (as the little-endian u32 of the 4 characters).
    pub tag: u32,
    /// Size in bytes.
    pub size: u64,
    /// POOL_TYPE (or POOL_FLAG_* for ExAllocatePool2).
    pub pool_type: u64,
    /// Relative frequency among the specs.
    pub weight: u32,
    /// Freed right after (by the same driver function, through this API); `None`: leaked.
    pub free: Option<FreeApi>,
}

/// One frame of the ground truth: `module!function+offset`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TruthFrame {
    /// Module name ("nt", "leakydrv").
    pub module: String,
    /// Function name.
    pub function: String,
    /// Offset from the function start (0 at the stop; the return address offset in callers).
    pub offset: u64,
}

/// As WinDbg writes a call site: `module!function+0xoff`, no offset at 0.
impl std::fmt::Display for TruthFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}!{}", self.module, self.function)?;
        if self.offset != 0 {
            write!(f, "+{:#x}", self.offset)?;
        }
        Ok(())
    }
}

/// What really happened, for the tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TruthRecord {
    /// Sequence number (all allocations, all boots).
    pub seq: u64,
    /// Boot number it happened in.
    pub boot: u64,
    /// Tag, size and pool type as passed.
    pub tag: u32,
    /// Size.
    pub size: u64,
    /// Pool type.
    pub pool_type: u64,
    /// Processor and thread.
    pub cpu: u16,
    /// KTHREAD address.
    pub thread: u64,
    /// Where the debugger stopped it, each with the stack innermost first.
    pub stops: Vec<Vec<TruthFrame>>,
    /// The whole path the allocation took, outermost first (`module!function`).
    pub path: Vec<String>,
    /// Whether it went to special pool.
    pub special_pool: bool,
    /// Allocation or free.
    pub kind: OpKind,
    /// The block: returned by the allocation, passed to the free.
    pub address: u64,
    /// Where the debugger stopped it on the way back out (at a return address into a caller
    /// on the path), in order. Kept apart from [`TruthRecord::stops`], which are entry stops.
    pub returns: Vec<ReturnStop>,
}

/// A stop at a return address on an operation's way back out of its path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReturnStop {
    /// The stack at the stop, innermost first: the caller at the return address
    /// (`offset` = return address - function start), then its callers.
    pub stack: Vec<TruthFrame>,
    /// The return value register (`rax`/`eax`) there: the block for an allocation, 0 for a free.
    pub value: u64,
}

/// What an operation of the workload is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    /// An allocation.
    Alloc,
    /// A free of an earlier allocation (`TruthRecord::address` names it).
    Free,
}

/// A stop the workload asks the kernel to report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkloadStop {
    /// Processor.
    pub cpu: u16,
    /// Exception code (STATUS_BREAKPOINT for int3, STATUS_SINGLE_STEP for a hardware breakpoint).
    pub code: u32,
    /// Where.
    pub pc: u64,
    /// KTHREAD.
    pub thread: u64,
    /// Hardware breakpoint index (sets Dr6 bit), if that is what stopped it.
    pub dr6_hit: Option<u8>,
}

/// Why the workload could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    /// A `module!function` is not in the module's PDB, or the module is not loaded.
    #[error("unknown function {0}")]
    UnknownFunction(String),
    /// The caller has no call to the callee.
    #[error("{caller} does not call {callee}")]
    NoCall {
        /// Caller.
        caller: String,
        /// Callee.
        callee: String,
    },
    /// Building the frames failed.
    #[error(transparent)]
    Frames(#[from] FrameError),
    /// The architecture is not supported by the frame builder yet.
    #[error("stack synthesis for {0} is not implemented")]
    Arch(Arch),
}

/// The per-boot resolution of names to addresses.
#[derive(Clone, Debug, Default)]
struct Resolved {
    boot: u64,
    functions: BTreeMap<String, (u64, u32, MappedImage)>,
    call_sites: BTreeMap<(String, String), u64>,
}

/// The allocating threads.
#[derive(Debug)]
pub struct Workload {
    specs: Vec<AllocationSpec>,
    pdbs: BTreeMap<String, PdbMap>,
    seed: u64,
    seq: u64,
    /// Everything that happened, in order.
    pub truth: Vec<TruthRecord>,
    resolved: Resolved,
    /// The allocation in progress: its record index, steps, and the next step to run.
    current: Option<InFlight>,
    /// Where thread stacks live on x64 (one per processor; x86 uses a 32-bit address).
    pub stack_base: u64,
    /// Frees due, in order: (spec, allocation record).
    pending_frees: std::collections::VecDeque<(AllocationSpec, usize)>,
    /// How many special-pool blocks one boot can have outstanding (allocated and not freed);
    /// `None`: unlimited. When it is full, allocations that would go to special pool take the
    /// normal pool path instead, until special-pool blocks are freed or the machine reboots.
    pub special_pool_blocks: Option<u64>,
    /// (boot, special-pool blocks of that boot not freed yet).
    special_outstanding: (u64, u64),
}

#[derive(Clone, Debug)]
struct InFlight {
    record: usize,
    steps: Vec<String>,
    args: [u64; 4],
    next: usize,
    stopped_at: Option<u64>,
    /// Return steps done (the way back out runs after every entry step has).
    returned: usize,
    /// The caller step `j` whose return address the operation is stopped at, if the stop was
    /// a return stop.
    stopped_return: Option<usize>,
}

/// Kernel functions the allocator path may go through after the API.
const HIT_BREAK: &str = "DbgBreakPoint";

impl Workload {
    /// A workload over images whose PDBs are given by module name (`"nt"`, `"leakydrv"`).
    pub fn new(specs: Vec<AllocationSpec>, pdbs: BTreeMap<String, PdbMap>, seed: u64) -> Self {
        Self {
            specs,
            pdbs,
            seed,
            seq: 0,
            truth: Vec::new(),
            resolved: Resolved::default(),
            current: None,
            stack_base: 0xffff_f880_0100_0000,
            pending_frees: Default::default(),
            special_pool_blocks: None,
            special_outstanding: (0, 0),
        }
    }

    fn is_modern(&self) -> bool {
        self.pdbs
            .get("nt")
            .is_some_and(|p| p.function("ExAllocateHeapPool").is_some())
    }

    fn resolve(
        &mut self,
        k: &dyn KernelView,
        name: &str,
    ) -> Result<(u64, u32, MappedImage), WorkloadError> {
        if let Some(f) = self.resolved.functions.get(name) {
            return Ok(*f);
        }
        let (module, function) = name
            .split_once('!')
            .ok_or_else(|| WorkloadError::UnknownFunction(name.into()))?;
        let image = k
            .image(module)
            .ok_or_else(|| WorkloadError::UnknownFunction(name.into()))?;
        let (rva, len) = self
            .pdbs
            .get(module)
            .and_then(|p| p.function(function))
            .ok_or_else(|| WorkloadError::UnknownFunction(name.into()))?;
        let f = (image.base + u64::from(rva), len, image);
        self.resolved.functions.insert(name.into(), f);
        Ok(f)
    }

    fn call_site(
        &mut self,
        k: &mut dyn KernelView,
        caller: &str,
        callee: &str,
    ) -> Result<u64, WorkloadError> {
        let key = (caller.to_string(), callee.to_string());
        if let Some(r) = self.resolved.call_sites.get(&key) {
            return Ok(*r);
        }
        let (start, len, _) = self.resolve(k, caller)?;
        let (target, _, _) = self.resolve(k, callee)?;
        let arch = k.arch();
        let calls = calls_to(k.memory(), arch, start, len, target);
        let ret = calls
            .iter()
            .find(|(_, kind)| *kind != CallKind::Indirect)
            .or_else(|| calls.iter().find(|(_, kind)| *kind == CallKind::Indirect))
            .map(|(r, _)| *r)
            .ok_or_else(|| WorkloadError::NoCall {
                caller: caller.into(),
                callee: callee.into(),
            })?;
        self.resolved.call_sites.insert(key, ret);
        Ok(ret)
    }

    /// The whole path of an allocation: driver chain, API, kernel continuation.
    fn kernel_path(&self, spec: &AllocationSpec, special: bool, hit: bool) -> Vec<String> {
        let nt = |f: &str| format!("nt!{f}");
        let mut path = spec.path.clone();
        path.push(nt(spec.api.function()));
        if self.is_modern() {
            path.push(nt("ExAllocateHeapPool"));
            if hit {
                path.push(nt(HIT_BREAK));
            } else if special {
                path.push(nt("ExAllocateHeapSpecialPool"));
            } else {
                path.push(nt("RtlpHpAllocateHeap"));
            }
        } else {
            if spec.api == AllocApi::Pool2 {
                path.push(nt("ExAllocatePoolWithTag"));
            }
            if hit {
                path.push(nt(HIT_BREAK));
            } else if special {
                path.push(nt("MmAllocateSpecialPool"));
            } else {
                path.push(nt("ExpAllocateNormalPool"));
            }
        }
        path
    }

    /// The whole path of a free: driver chain, free API, kernel continuation.
    fn free_path(
        &self,
        spec: &AllocationSpec,
        api: FreeApi,
        special: bool,
        hit: bool,
    ) -> Vec<String> {
        let nt = |f: &str| format!("nt!{f}");
        let mut path = spec.path.clone();
        path.push(nt(api.function()));
        if api == FreeApi::Pool {
            path.push(nt("ExFreePoolWithTag"));
        }
        if hit {
            path.push(nt(HIT_BREAK));
        } else if self.is_modern() {
            path.push(nt("ExFreeHeapPool"));
            path.push(nt(if special {
                "ExFreeHeapSpecialPool"
            } else {
                "ExpCheckFree"
            }));
        } else {
            path.push(nt(if special {
                "MmFreeSpecialPool"
            } else {
                "ExpCheckFree"
            }));
        }
        path
    }

    /// A u32 kernel global by name (PoolHitTag, MmSpecialPoolTag).
    fn kernel_u32(&self, k: &mut dyn KernelView, name: &str) -> Option<u32> {
        let rva = *self.pdbs.get("nt")?.data.get(name)?;
        let base = k.image("nt")?.base;
        let b = k.memory().read(base + u64::from(rva), 4);
        b.try_into().ok().map(u32::from_le_bytes)
    }

    /// Starts the next allocation and runs it until it stops or completes. Returns the stop,
    /// if any. Also resumes an allocation that was stopped.
    pub fn step(&mut self, k: &mut dyn KernelView) -> Result<Option<WorkloadStop>, WorkloadError> {
        if self.resolved.boot != k.boot_id() {
            self.resolved = Resolved {
                boot: k.boot_id(),
                ..Resolved::default()
            };
            self.current = None;
        }
        if self.current.is_none() {
            self.start_allocation(k)?;
        }
        self.run(k)
    }

    fn start_allocation(&mut self, k: &mut dyn KernelView) -> Result<(), WorkloadError> {
        let hit_tag = self.kernel_u32(k, "PoolHitTag").unwrap_or(0);
        if self.special_outstanding.0 != k.boot_id() {
            // A new boot: special pool is empty again.
            self.special_outstanding = (k.boot_id(), 0);
        }
        let cpu = (self.seq % u64::from(k.processors().max(1))) as u16;
        let thread = self.stack_base(k.arch()) + 0x10_0000 + u64::from(cpu) * 0x1000;
        // A free that is due goes first (blocks of an earlier boot are gone with it).
        while let Some((spec, alloc)) = self.pending_frees.pop_front() {
            let Some(a) = self.truth.get(alloc).cloned() else {
                continue;
            };
            if a.boot != k.boot_id() {
                continue;
            }
            let api = spec.free.unwrap_or(FreeApi::PoolWithTag);
            let hit = hit_tag != 0 && spec.tag == hit_tag;
            let steps = self.free_path(&spec, api, a.special_pool, hit);
            let tag = if api == FreeApi::Pool { 0 } else { spec.tag };
            if a.special_pool {
                // The block goes back to special pool (the next allocation runs after this
                // free has, so giving the room back now is the same).
                self.special_outstanding.1 = self.special_outstanding.1.saturating_sub(1);
            }
            self.truth.push(TruthRecord {
                seq: self.seq,
                stops: Vec::new(),
                returns: Vec::new(),
                path: steps.clone(),
                kind: OpKind::Free,
                cpu,
                thread,
                ..a.clone()
            });
            self.current = Some(InFlight {
                record: self.truth.len() - 1,
                steps,
                args: [a.address, u64::from(tag), 0, 0],
                next: 0,
                stopped_at: None,
                returned: 0,
                stopped_return: None,
            });
            self.seq += 1;
            return Ok(());
        }
        if self.specs.is_empty() {
            return Ok(());
        }
        let total: u64 = self.specs.iter().map(|s| u64::from(s.weight.max(1))).sum();
        let mut pick = mix(self.seed ^ self.seq) % total.max(1);
        let Some(spec) = self
            .specs
            .iter()
            .find(|s| {
                let w = u64::from(s.weight.max(1));
                if pick < w {
                    true
                } else {
                    pick -= w;
                    false
                }
            })
            .cloned()
        else {
            return Ok(());
        };
        let special_tag = self.kernel_u32(k, "MmSpecialPoolTag").unwrap_or(0);
        let hit = hit_tag != 0 && spec.tag == hit_tag;
        // Special pool full: the allocation silently falls back to normal pool.
        let room = self
            .special_pool_blocks
            .is_none_or(|cap| self.special_outstanding.1 < cap);
        let special =
            !hit && room && special_matches(special_tag, spec.tag) && spec.size <= 4096 - 16;
        if special {
            self.special_outstanding.1 += 1;
        }
        let steps = self.kernel_path(&spec, special, hit);
        // Special pool puts the block at the end of its own page; normal pool packs blocks.
        let address = if special {
            0xffff_c900_0000_0000
                + self.seq * 0x2000
                + (0x1000 - spec.size.min(0xff0).div_ceil(16) * 16)
        } else {
            0xffff_c800_0000_0000 + self.seq * 0x100
        };
        let address = k.arch().canonical_address(if k.arch() == Arch::X86 {
            address & 0x3fff_ffff | 0x8000_0000
        } else {
            address
        });
        self.truth.push(TruthRecord {
            seq: self.seq,
            boot: k.boot_id(),
            tag: spec.tag,
            size: spec.size,
            pool_type: spec.pool_type,
            cpu,
            thread,
            stops: Vec::new(),
            returns: Vec::new(),
            path: steps.clone(),
            special_pool: special,
            kind: OpKind::Alloc,
            address,
        });
        let record = self.truth.len() - 1;
        if spec.free.is_some() {
            self.pending_frees.push_back((spec.clone(), record));
        }
        self.current = Some(InFlight {
            record,
            steps,
            args: [spec.pool_type, spec.size, u64::from(spec.tag), 0],
            next: 0,
            stopped_at: None,
            returned: 0,
            stopped_return: None,
        });
        self.seq += 1;
        Ok(())
    }

    fn run(&mut self, k: &mut dyn KernelView) -> Result<Option<WorkloadStop>, WorkloadError> {
        let Some(mut cur) = self.current.take() else {
            return Ok(None);
        };
        let rec = self.truth.get(cur.record).cloned();
        let Some(rec) = rec else {
            return Ok(None);
        };
        // The CPU goes on from the PC the host resumed it at. If an int3 is still there (a
        // debugger breakpoint re-planted without stepping over it, or the kernel's own int3 in
        // DbgBreakPoint that the host did not step past with SetContext, as WinDbg does), it
        // executes again: the same stop, again.
        let stopped_return = cur.stopped_return.take();
        if let Some(pc) = cur.stopped_at.take() {
            let arch = k.arch();
            let at_pc = k
                .context(rec.cpu)
                .is_some_and(|c| arch.canonical_address(c.pc()) == pc);
            if at_pc && k.memory().read(pc, 1) == [0xCC] {
                let stop = match stopped_return {
                    Some(j) => self.return_stop(k, &cur, j, status::BREAKPOINT, None, pc)?,
                    None => self.stop_here(
                        k,
                        &cur,
                        cur.next.saturating_sub(1),
                        status::BREAKPOINT,
                        None,
                        pc,
                    )?,
                };
                cur.stopped_at = Some(pc);
                cur.stopped_return = stopped_return;
                self.current = Some(cur);
                return Ok(Some(stop));
            }
        }
        while cur.next < cur.steps.len() {
            let i = cur.next;
            cur.next += 1;
            let name = cur.steps.get(i).cloned().unwrap_or_default();
            let (entry, _, _) = self.resolve(k, &name)?;
            let is_hit_break = name.ends_with(HIT_BREAK);
            // The kernel's own int3 inside DbgBreakPoint, or a debugger breakpoint at the entry.
            let int3 = if is_hit_break {
                first_int3(k.memory(), entry)
            } else {
                Some(entry).filter(|e| k.breakpoint_at(*e))
            };
            let stop = if int3.is_some() {
                Some((status::BREAKPOINT, None))
            } else {
                k.hardware_breakpoint_at(entry)
                    .map(|n| (status::SINGLE_STEP, Some(n)))
            };
            if let Some((code, dr)) = stop {
                let pc = int3.unwrap_or(entry);
                let s = self.stop_here(k, &cur, i, code, dr, pc)?;
                cur.stopped_at = dr.is_none().then_some(pc);
                self.current = Some(cur);
                return Ok(Some(s));
            }
        }
        // The way back out: into each caller at the return address of its call, innermost
        // caller first.
        while cur.returned + 1 < cur.steps.len() {
            let j = cur.steps.len() - 2 - cur.returned;
            cur.returned += 1;
            let caller = cur.steps.get(j).cloned().unwrap_or_default();
            let callee = cur.steps.get(j + 1).cloned().unwrap_or_default();
            let ret = self.call_site(k, &caller, &callee)?;
            let stop = if k.breakpoint_at(ret) {
                Some((status::BREAKPOINT, None))
            } else {
                k.hardware_breakpoint_at(ret)
                    .map(|n| (status::SINGLE_STEP, Some(n)))
            };
            if let Some((code, dr)) = stop {
                let s = self.return_stop(k, &cur, j, code, dr, ret)?;
                cur.stopped_at = dr.is_none().then_some(ret);
                cur.stopped_return = Some(j);
                self.current = Some(cur);
                return Ok(Some(s));
            }
        }
        Ok(None)
    }

    /// The registers and stack of the thread at the entry of step `i` (written into memory),
    /// with the ground-truth frames innermost first and the x86/x64 frames built.
    fn entry_context(
        &mut self,
        k: &mut dyn KernelView,
        cur: &InFlight,
        rec: &TruthRecord,
        i: usize,
    ) -> Result<(Context, Vec<TruthFrame>, Vec<BuiltFrame>), WorkloadError> {
        let names: Vec<String> = cur.steps.iter().take(i + 1).cloned().collect();
        let mut steps = Vec::with_capacity(names.len());
        let mut truth = Vec::with_capacity(names.len());
        for (j, name) in names.iter().enumerate() {
            let (entry, _, image) = self.resolve(k, name)?;
            let ret = match names.get(j + 1) {
                Some(next) => self.call_site(k, name, next)?,
                None => 0,
            };
            steps.push(PathStep {
                function: entry,
                image,
                return_address: ret,
                dynamic_alloc: 0x40,
            });
            let (module, function) = name.split_once('!').unwrap_or(("?", name));
            // Innermost frame: offset 0 (the stop is at the entry); callers: the return address.
            let offset = names.get(j + 1).map_or(0, |_| ret - entry);
            truth.push(TruthFrame {
                module: module.into(),
                function: function.into(),
                offset,
            });
        }
        truth.reverse();
        let arch = k.arch();
        let top = self.stack_base(arch) + u64::from(rec.cpu) * 0x10000 + 0xF000;
        k.memory().map(top - 0x8000, 0x8000);
        let mut n = mix(self.seed ^ (rec.seq << 8));
        let (ctx, frames) = match arch {
            Arch::Amd64 => build_amd64(k.memory(), &steps, top, || {
                n = mix(n);
                0xffff_a000_0000_0000 | (n & 0x0000_0fff_ffff_fff0)
            })?,
            Arch::X86 => build_x86(k.memory(), &steps, top, || {
                n = mix(n);
                0x8a00_0000 | (n & 0x00ff_fffc)
            })?,
        };
        Ok((ctx, truth, frames))
    }

    /// Builds the registers and stack for a stop at the entry of step `i` and records it.
    fn stop_here(
        &mut self,
        k: &mut dyn KernelView,
        cur: &InFlight,
        i: usize,
        code: u32,
        dr6_hit: Option<u8>,
        pc: u64,
    ) -> Result<WorkloadStop, WorkloadError> {
        let rec = self
            .truth
            .get(cur.record)
            .cloned()
            .ok_or(WorkloadError::Arch(k.arch()))?;
        let (mut ctx, truth, frames) = self.entry_context(k, cur, &rec, i)?;
        let arch = k.arch();
        let stopped = cur.steps.get(i).map(String::as_str).unwrap_or("");
        let args = args_for(stopped, cur.args);
        let hit_break = stopped.ends_with(HIT_BREAK);
        match &mut ctx {
            Context::Amd64(c) => {
                // The arguments of the function stopped at, in registers.
                c.set(Amd64Reg::Rcx, args[0]);
                c.set(Amd64Reg::Rdx, args[1]);
                c.set(Amd64Reg::R8, args[2]);
                c.set(Amd64Reg::R9, args[3]);
                if hit_break && rec.kind == OpKind::Free {
                    // ExFreePoolWithTag keeps P live across its break in a nonvolatile register.
                    c.set(Amd64Reg::Rbx, rec.address);
                }
            }
            Context::X86(_) => {
                // stdcall: the arguments are above the return address. DbgBreakPoint takes
                // none: above its return address is its caller's frame, left as it is.
                let sp = Arch::X86.canonical_address(ctx.sp());
                if !hit_break {
                    // As many as the function takes (its `ret N`): above them is the caller's
                    // frame, left as it is (MmFreeSpecialPool takes one).
                    let entry = frames.first().map(|f| f.function).unwrap_or(0);
                    let count = (callee_pops(k.memory(), entry) / 4).min(4) as usize;
                    for (j, a) in args.iter().take(count).enumerate() {
                        k.memory()
                            .write(sp + 4 + 4 * j as u64, &(*a as u32).to_le_bytes());
                    }
                } else if let (Some(caller), Some(frame)) = (
                    i.checked_sub(1).and_then(|c| cur.steps.get(c)),
                    frames.get(1),
                ) {
                    // The API that breaks (frame 1) has its own arguments on the stack, as its
                    // caller pushed them: P first for ExFreePoolWithTag.
                    let caller_args = args_for(caller, cur.args);
                    let count = (callee_pops(k.memory(), frame.function) / 4).min(4) as usize;
                    for (j, a) in caller_args.iter().take(count).enumerate() {
                        k.memory().write(
                            frame.entry_sp + 4 + 4 * j as u64,
                            &(*a as u32).to_le_bytes(),
                        );
                    }
                }
            }
        }
        // Inside the function (the int3 of DbgBreakPoint) the stack is still the entry's: a
        // leaf with no prologue.
        if pc != arch.canonical_address(ctx.pc()) {
            ctx.set_pc(pc);
        }
        k.set_context(rec.cpu, ctx);
        if let Some(r) = self.truth.get_mut(cur.record) {
            r.stops.push(truth);
        }
        Ok(WorkloadStop {
            cpu: rec.cpu,
            code,
            pc,
            thread: rec.thread,
            dr6_hit,
        })
    }

    /// Builds the registers and stack for a stop at the return address `pc` in caller step `j`
    /// (right after step `j + 1` returned) and records it: the callee's entry context with the
    /// return address popped (and, on x86, the stdcall arguments the callee pops).
    fn return_stop(
        &mut self,
        k: &mut dyn KernelView,
        cur: &InFlight,
        j: usize,
        code: u32,
        dr6_hit: Option<u8>,
        pc: u64,
    ) -> Result<WorkloadStop, WorkloadError> {
        let rec = self
            .truth
            .get(cur.record)
            .cloned()
            .ok_or(WorkloadError::Arch(k.arch()))?;
        let (mut ctx, mut truth, frames) = self.entry_context(k, cur, &rec, j + 1)?;
        // The callee's frame is gone; the caller is at the return address.
        if !truth.is_empty() {
            truth.remove(0);
        }
        let value = match rec.kind {
            OpKind::Alloc => rec.address,
            OpKind::Free => 0,
        };
        let mut n = mix(self.seed ^ (rec.seq << 8) ^ 0x7265_7475_726e);
        let mut garbage = || {
            n = mix(n);
            n
        };
        let callee = frames.first().map_or(0, |f| f.function);
        match &mut ctx {
            Context::Amd64(c) => {
                let rsp = c.get(Amd64Reg::Rsp);
                c.set(Amd64Reg::Rsp, rsp + 8);
                c.set(Amd64Reg::Rip, pc);
                c.set(Amd64Reg::Rax, value);
                for r in [
                    Amd64Reg::Rcx,
                    Amd64Reg::Rdx,
                    Amd64Reg::R8,
                    Amd64Reg::R9,
                    Amd64Reg::R10,
                    Amd64Reg::R11,
                ] {
                    c.set(r, garbage());
                }
            }
            Context::X86(c) => {
                let pops = callee_pops(k.memory(), callee);
                let esp = c.get(X86Reg::Esp) as u32;
                c.set(
                    X86Reg::Esp,
                    u64::from(esp.wrapping_add(4).wrapping_add(pops)),
                );
                c.set(X86Reg::Eip, pc & 0xFFFF_FFFF);
                c.set(X86Reg::Eax, value & 0xFFFF_FFFF);
                for r in [X86Reg::Ecx, X86Reg::Edx] {
                    c.set(r, garbage() & 0xFFFF_FFFF);
                }
            }
        }
        k.set_context(rec.cpu, ctx);
        if let Some(r) = self.truth.get_mut(cur.record) {
            r.returns.push(ReturnStop {
                stack: truth,
                value,
            });
        }
        Ok(WorkloadStop {
            cpu: rec.cpu,
            code,
            pc,
            thread: rec.thread,
            dr6_hit,
        })
    }

    fn stack_base(&self, arch: Arch) -> u64 {
        match arch {
            Arch::Amd64 => self.stack_base,
            Arch::X86 => arch.canonical_address(0x8d00_0000),
        }
    }

    /// Whether an allocation is stopped in the debugger or waiting to go on.
    pub fn in_flight(&self) -> bool {
        self.current.is_some()
    }
}

/// The first int3 in the first 16 bytes of a function (DbgBreakPoint is `int3; ret`).
fn first_int3(mem: &Memory, entry: u64) -> Option<u64> {
    mem.read(entry, 16)
        .iter()
        .position(|b| *b == 0xCC)
        .map(|i| entry + i as u64)
}

/// Arguments as the stopped function sees them, from (PoolType, Size, Tag, -).
fn args_for(function: &str, [pool_type, size, tag, _]: [u64; 4]) -> [u64; 4] {
    let f = function.rsplit('!').next().unwrap_or(function);
    match f {
        // MmAllocateSpecialPool(NumberOfBytes, Tag, PoolType, SpecialPoolType)
        "MmAllocateSpecialPool" => [size, tag, pool_type, 2],
        // ExAllocateHeapPool(PoolType, Size, Tag, Node)
        "ExAllocateHeapPool" => [pool_type, size, tag, 0x8000_0000],
        // RtlpHpAllocateHeap(Heap, Size, Flags, Tag)
        "RtlpHpAllocateHeap" => [0, size, pool_type, tag],
        "DbgBreakPoint" => [0, 0, 0, 0],
        // Frees: the op's args are (P, Tag).
        "ExFreePoolWithTag" | "ExFreeHeapPool" | "ExpCheckFree" => [pool_type, size, 0, 0],
        "ExFreePool" | "MmFreeSpecialPool" | "ExFreeHeapSpecialPool" => [pool_type, 0, 0, 0],
        _ => [pool_type, size, tag, 0],
    }
}

/// Special pool's tag match: `?` matches one byte, `*` the rest (little-endian bytes).
pub fn special_matches(pattern: u32, tag: u32) -> bool {
    if pattern == 0 {
        return false;
    }
    let p = pattern.to_le_bytes();
    let t = tag.to_le_bytes();
    for (a, b) in p.iter().zip(t.iter()) {
        match *a {
            b'*' => return true,
            b'?' => {}
            c if c == *b => {}
            _ => return false,
        }
    }
    true
}

fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}
