//! The simulated machine and its kernel's KD API layer (KdpSendWaitContinue's request switch,
//! R4 kdapi.c in kd-protocol.md): memory, processors, the breakpoint table, the state a stop
//! reports (KdpSetCommonState), control space, and what a continue does.
//!
//! Wire structures are laid out here from the sheet's offsets directly (not through the
//! client's encoders), so a shared mistake between client and simulator cannot pass the tests.
//! Building a kernel (images, KASLR, KDBG, module list, processors) is in `boot.rs`.

use std::collections::{BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use kdpilot_kd::api::{
    number, Api, ContextBytes, Continue, Continue2, GetContext, GetContextEx, GetVersion,
    Manipulate, ReadControlSpace, ReadReply, ReadVirtualMemory, RestoreBreakPoint, SetContext,
    SetContextEx, WriteBreakPoint, WriteControlSpace, WriteVirtualMemory,
};
use kdpilot_kd::context::{Amd64Reg, Context, X86Reg};
use kdpilot_kd::state_change::{
    Amd64ControlReport, ControlReport, Exception64, LoadSymbols64, StateChange, StateInfo,
    X86ControlReport,
};
use kdpilot_kd::version::GetVersion64;
use kdpilot_kd::wire::status;
use kdpilot_kd::Arch;

use crate::boot::MachineConfig;
use crate::loader::LoadedImage;
use crate::memory::{Memory, Pool};
use crate::target::unsuccessful;

/// KD_BREAKPOINT_MAX.
pub const BREAKPOINT_MAX: usize = 32;
/// Size of KDDEBUGGER_DATA64 as Windows 7 has it.
pub const KDBG_SIZE: u32 = 0x340;
/// DBGKD_MAXSTREAM: instruction bytes in a control report.
pub const MAX_STREAM: usize = 16;
/// sizeof(KSPECIAL_REGISTERS) on AMD64 (what T1's ReadControlSpace(2) returns).
pub const AMD64_SPECIAL_SIZE: usize = 0xE0;
/// sizeof(KSPECIAL_REGISTERS) on x86.
pub const X86_SPECIAL_SIZE: usize = 0x54;
/// sizeof(KPROCESSOR_STATE) on x86: CONTEXT (0x2CC) then KSPECIAL_REGISTERS.
pub const X86_PROCESSOR_STATE_SIZE: usize = 0x2CC + X86_SPECIAL_SIZE;
/// EFLAGS.TF.
pub const EFLAGS_TF: u32 = 0x100;
/// DR6 as read from an idle CPU (reserved bits set).
pub const DR6_IDLE: u64 = 0xFFFF_0FF0;
/// DR6.BS: the debug trap was a single step.
pub const DR6_BS: u64 = 0x4000;
/// KMODE_EXCEPTION_NOT_HANDLED.
pub const KMODE_EXCEPTION_NOT_HANDLED: u32 = 0x1E;
/// MANUALLY_INITIATED_CRASH (DbgKdCauseBugCheckApi).
pub const MANUALLY_INITIATED_CRASH: u32 = 0xE2;
/// DBG_STATUS_CONTROL_C: DbgBreakPointWithStatus's argument for a break-in.
pub const DBG_STATUS_CONTROL_C: u64 = 1;
/// DBG_STATUS_BUGCHECK_FIRST: its argument for the break of a bugcheck.
pub const DBG_STATUS_BUGCHECK_FIRST: u64 = 3;

/// What the kernel does after a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send this reply and keep serving.
    Reply(Manipulate),
    /// An API the kernel executes without answering (ClearAllInternalBreakpoints).
    NoReply,
    /// Continue or Continue2: leave the debugger.
    Resume(Resume),
    /// DbgKdRebootApi: HalReturnToFirmware at once (R4 kdapi.c; no "unload all" first).
    Reboot,
    /// DbgKdSwitchProcessor: the named CPU reports next (sheet 2.1, 4.3).
    SwitchProcessor(u16),
    /// DbgKdCauseBugCheckApi: the machine bugchecks with this code.
    BugCheck(u32),
}

/// How the host continued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resume {
    /// ContinueStatus.
    pub status: u32,
    /// Continue2's TraceFlag, when ContinueStatus was NT_SUCCESS (R4 KdpGetStateChange).
    pub trace: bool,
}

impl Resume {
    /// Whether the status is NT_SUCCESS (ContinueSuccess rather than ContinueError).
    pub fn success(&self) -> bool {
        status::is_success(self.status)
    }
}

/// One entry of the breakpoint table (R4 kdbreak.c KD_BREAKPOINT_ENTRY).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Breakpoint {
    /// Address of the int3 (canonical: sign-extended on x86).
    pub address: u64,
    /// The byte the int3 replaced (meaningless while `pending`).
    pub saved: u8,
    /// Deferred ("owed"): the memory was not mapped when it was written; the int3 is planted
    /// when the page appears (kd-protocol.md 4.5, KD_BREAKPOINT_PENDING).
    pub pending: bool,
}

/// Where things live this boot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Layout {
    /// Kernel image base (KASLR: changes every boot).
    pub kern_base: u64,
    /// KDDEBUGGER_DATA64 block address.
    pub kdbg: u64,
    /// KdpDebuggerDataListHead.
    pub debugger_data_list: u64,
    /// PsLoadedModuleList head.
    pub ps_loaded_module_list: u64,
    /// nt!RtlpBreakWithStatusInstruction: where break-ins, boot notifications and bugchecks
    /// stop.
    pub break_instruction: u64,
    /// The boot processor's initial thread (KiInitialThread).
    pub thread: u64,
    /// Where the idle processors sit (KiIdleLoop, or the break site's `ret`).
    pub idle_loop: u64,
    /// KdDebuggerNotPresent (a BOOLEAN the simulator keeps up to date).
    pub kd_debugger_not_present: u64,
    /// PoolHitTag, when the kernel has it (export or a symbol given in [`MachineConfig`]).
    pub pool_hit_tag: Option<u64>,
    /// MmSpecialPoolTag (a ULONG).
    pub mm_special_pool_tag: u64,
    /// KiProcessorBlock (an array of KPRCB pointers).
    pub ki_processor_block: u64,
    /// KiBugCheckData (code and four parameters, pointer-sized).
    pub ki_bugcheck_data: u64,
    /// The simulator's nonpaged pool range (module entries, KPCR/KPRCB, threads, stacks).
    pub pool: (u64, u64),
}

/// One processor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cpu {
    /// Its register state (what GetContext returns; the Activity writes it before a stop).
    pub context: Context,
    /// KSPECIAL_REGISTERS as control space 2 (AMD64) or KPROCESSOR_STATE+0x2CC (x86) holds it:
    /// Cr0, Cr2, Cr3, Cr4, KernelDr0..3, KernelDr6, KernelDr7, ...
    pub special: Vec<u8>,
    /// KPCR.
    pub kpcr: u64,
    /// KPRCB.
    pub kprcb: u64,
    /// Current thread (KTHREAD).
    pub thread: u64,
    /// Idle thread.
    pub idle_thread: u64,
    /// Top of its idle/boot stack.
    pub stack_top: u64,
}

/// The kernel debug registers of one CPU (KSPECIAL_REGISTERS KernelDr*).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DebugRegisters {
    /// KernelDr0..3.
    pub dr: [u64; 4],
    /// KernelDr6.
    pub dr6: u64,
    /// KernelDr7 (Continue2's Dr7 lands here on every CPU).
    pub dr7: u64,
}

/// A thread the simulator made: its KTHREAD and kernel stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thread {
    /// KTHREAD address.
    pub kthread: u64,
    /// Stack base (highest address, exclusive; InitialStack).
    pub stack_base: u64,
    /// Stack limit (lowest address).
    pub stack_limit: u64,
}

/// An exception stop an [`crate::Activity`] asks the kernel to report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stop {
    /// The CPU that took the exception (its context is already set).
    pub cpu: u16,
    /// Exception code (STATUS_BREAKPOINT, STATUS_SINGLE_STEP, ...).
    pub code: u32,
    /// Program counter (= ExceptionAddress: for a debugger int3 the breakpoint's address).
    pub pc: u64,
    /// The KTHREAD that was running.
    pub thread: u64,
}

/// A fault of the machine itself (scheduled per boot, or requested at run time).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The kernel hangs: the line is not read at all for this long.
    Hang(Duration),
    /// KeBugCheckEx: a DbgPrint of the "*** Fatal System Error" text, a breakpoint stop at the
    /// break instruction, then (after the continue) "unload all" and a reboot.
    BugCheck {
        /// Bugcheck code.
        code: u32,
        /// Its four parameters.
        parameters: [u64; 4],
    },
    /// An orderly reboot: "unload all" state change, link down, new boot (kd-protocol.md 5).
    Reboot,
}

/// What happens when the host continues from a stop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AfterStop {
    /// Back to running.
    Run,
    /// The boot goes on with image `n` (KdInitSystem, then boot drivers).
    Boot(usize),
    /// The reboot goes on (after "unload all").
    Reboot,
    /// A bugcheck goes on: "unload all", then reboot.
    BugCheckDone,
}

/// A stop the kernel reports and waits in (KdpSendWaitContinue).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingStop {
    /// The reporting CPU.
    pub cpu: u16,
    /// The state change (resent after a RESET or when a new host attaches).
    pub state: StateChange,
    /// What a continue leads to.
    pub after: AfterStop,
    /// A LoadSymbols notification: dropped after the retries, as kdcom does (sheet 1.5).
    /// Exception state changes are retried forever.
    pub give_up: bool,
}

/// What the kernel is doing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Running: polls for the break-in byte every clock tick, runs the workload.
    Running,
    /// In the debugger, waiting for a continue.
    Debugger(Box<PendingStop>),
    /// Booting: the next image to report (KdInitSystem: ntoskrnl, hal; then drivers).
    Booting(usize),
    /// Hung until then: the line is not read.
    Hung(Instant),
    /// Rebooting: the line is dead until then, then a new boot.
    Rebooting {
        /// When the new kernel starts.
        until: Instant,
        /// The session must end first (a socket target closes the connection).
        disconnect: bool,
    },
    /// A bugcheck is starting (its DbgPrint is next).
    BugCheck {
        /// Bugcheck code.
        code: u32,
        /// Parameters.
        parameters: [u64; 4],
    },
}

/// The simulated machine.
#[derive(Clone, Debug)]
pub struct Machine {
    /// Architecture.
    pub arch: Arch,
    /// Build number reported by GetVersion.
    pub build: u16,
    /// Processors.
    pub processors: u32,
    /// Memory.
    pub memory: Memory,
    /// Where things are this boot.
    pub layout: Layout,
    /// Loaded images in load order (ntoskrnl.exe, hal.dll, drivers).
    pub images: Vec<LoadedImage>,
    /// PsLoadedModuleList entries, in the same order.
    pub module_entries: Vec<u64>,
    /// The breakpoint table (handles are index + 1).
    pub breakpoints: [Option<Breakpoint>; BREAKPOINT_MAX],
    /// Processors' state.
    pub cpus: Vec<Cpu>,
    /// Whether a GetContext was served in this stop (SetContext is refused otherwise).
    pub context_sent: bool,
    /// Whether the kernel is running (false while it sits in the debugger).
    pub running: bool,
    /// How many times the kernel entered the debugger.
    pub stops: u64,
    /// Boots so far (1 after the first).
    pub boots: u64,
    /// KdDebuggerNotPresent: a LoadSymbols or DbgPrint went undelivered.
    pub debugger_not_present: bool,
    /// What the kernel is doing.
    pub phase: Phase,
    /// What the host answered to the kernel's chatter.
    pub chatter_log: crate::target::ChatterLog,
    /// The simulator's nonpaged pool.
    pub pool: Pool,
    pub(crate) config: MachineConfig,
    pub(crate) rng: crate::boot::Rng,
    pub(crate) requests: VecDeque<Fault>,
    pub(crate) faults_fired: BTreeSet<usize>,
    pub(crate) booted_at: Instant,
    pub(crate) started: bool,
    pub(crate) break_after_symbols_polled: bool,
}

impl Machine {
    pub(crate) fn ptr_bytes(&self, v: u64) -> Vec<u8> {
        match self.arch {
            Arch::Amd64 => v.to_le_bytes().to_vec(),
            Arch::X86 => (v as u32).to_le_bytes().to_vec(),
        }
    }

    /// The GetVersion reply this kernel gives.
    pub fn version(&self) -> GetVersion64 {
        let ptr64 = if self.arch == Arch::Amd64 { 0x4 } else { 0 };
        let mp = if self.processors > 1 { 0x1 } else { 0 };
        GetVersion64 {
            major_version: 0x000F,
            minor_version: self.build,
            protocol_version: 6,
            kd_secondary_version: if self.arch == Arch::Amd64 { 2 } else { 0 },
            flags: mp | 0x2 | ptr64,
            machine_type: self.arch.machine_type(),
            max_packet_type: 0x0C,
            max_state_change: 0x03,
            max_manipulate: 0x33,
            simulation: 0,
            unused: 0,
            kern_base: self.layout.kern_base,
            ps_loaded_module_list: self.layout.ps_loaded_module_list,
            debugger_data_list: self.layout.debugger_data_list,
        }
    }

    // ----- accessors for workloads -------------------------------------------------------

    /// What the machine is made of (images, kernel symbols, seed).
    pub fn config(&self) -> &MachineConfig {
        &self.config
    }

    /// A processor.
    pub fn cpu(&self, cpu: u16) -> Option<&Cpu> {
        self.cpus.get(usize::from(cpu))
    }

    /// A processor, writable.
    pub fn cpu_mut(&mut self, cpu: u16) -> Option<&mut Cpu> {
        self.cpus.get_mut(usize::from(cpu))
    }

    /// Replaces a CPU's registers (what the next stop on it reports); false if no such CPU or
    /// the context is for another architecture.
    pub fn set_context(&mut self, cpu: u16, context: Context) -> bool {
        let arch = self.arch;
        match self.cpus.get_mut(usize::from(cpu)) {
            Some(c) if context.arch() == arch => {
                c.context = context;
                true
            }
            _ => false,
        }
    }

    /// A loaded image by file name (case-insensitive).
    pub fn image(&self, name: &str) -> Option<&LoadedImage> {
        self.images
            .iter()
            .find(|i| i.name.eq_ignore_ascii_case(name))
    }

    /// The image containing `address`.
    pub fn image_at(&self, address: u64) -> Option<&LoadedImage> {
        self.images.iter().find(|i| i.contains(address))
    }

    /// The kernel image.
    pub fn kernel(&self) -> Option<&LoadedImage> {
        self.images.first()
    }

    /// A kernel symbol this boot: a symbol given in [`MachineConfig::kernel_symbols`] (an RVA,
    /// e.g. from the PDB), else a kernel export.
    pub fn kernel_symbol(&self, name: &str) -> Option<u64> {
        let k = self.kernel()?;
        match self.config.kernel_symbols.get(name) {
            Some(&rva) => Some(k.base + u64::from(rva)),
            None => k.export(name),
        }
    }

    /// The current value of nt!PoolHitTag, if the kernel has one.
    pub fn pool_hit_tag(&self) -> Option<u32> {
        self.memory.read_u32(self.layout.pool_hit_tag?)
    }

    /// The current value of nt!MmSpecialPoolTag.
    pub fn mm_special_pool_tag(&self) -> Option<u32> {
        self.memory.read_u32(self.layout.mm_special_pool_tag)
    }

    /// Allocates zeroed, mapped memory from the simulator's pool (16-byte aligned).
    pub fn allocate(&mut self, len: u64) -> u64 {
        self.pool.alloc(&mut self.memory, len)
    }

    /// Maps memory (zero-filled) and plants breakpoints owed on it (KdSetOwedBreakpoints).
    pub fn map(&mut self, address: u64, len: u64) {
        self.memory.map(address, len);
        self.set_owed_breakpoints();
    }

    /// Maps memory holding `bytes` (a page of code paged in, an image section) and plants
    /// breakpoints owed on it.
    pub fn load(&mut self, address: u64, bytes: &[u8]) {
        self.memory.load(address, bytes);
        self.set_owed_breakpoints();
    }

    /// Reads memory (short at the first unmapped page).
    pub fn read(&self, address: u64, len: usize) -> Vec<u8> {
        self.memory.read(address, len)
    }

    /// Writes mapped memory; returns the bytes written.
    pub fn write(&mut self, address: u64, bytes: &[u8]) -> usize {
        self.memory.write(address, bytes)
    }

    /// Makes a thread: a KTHREAD and a kernel stack from the pool, with the KTHREAD's stack
    /// fields filled at the offsets KDDEBUGGER_DATA64 advertises.
    pub fn create_thread(&mut self) -> Thread {
        crate::boot::create_thread(self)
    }

    /// The kernel debug registers of a CPU.
    pub fn debug_registers(&self, cpu: u16) -> Option<DebugRegisters> {
        let c = self.cpu(cpu)?;
        let (first, step) = match self.arch {
            Arch::Amd64 => (0x20usize, 8usize),
            Arch::X86 => (0x10, 4),
        };
        let at = |i: usize| special_field(&c.special, first + i * step, step);
        Some(DebugRegisters {
            dr: [at(0), at(1), at(2), at(3)],
            dr6: at(4),
            dr7: at(5),
        })
    }

    fn set_special(&mut self, cpu: usize, index: usize, value: u64) {
        let (first, step) = match self.arch {
            Arch::Amd64 => (0x20usize, 8usize),
            Arch::X86 => (0x10, 4),
        };
        if let Some(c) = self.cpus.get_mut(cpu) {
            let at = first + index * step;
            if let Some(dst) = c.special.get_mut(at..at + step) {
                dst.copy_from_slice(value.to_le_bytes().get(..step).unwrap_or(&[]));
            }
        }
    }

    /// The hardware breakpoint (0..3) an instruction fetch at `address` on `cpu` triggers:
    /// enabled in KernelDr7 (L or G bit), execute type (R/W = 00), address equal.
    pub fn hardware_breakpoint(&self, cpu: u16, address: u64) -> Option<usize> {
        let d = self.debug_registers(cpu)?;
        (0..4).find(|&i| {
            let enabled = d.dr7 >> (2 * i) & 3 != 0;
            let rw = d.dr7 >> (16 + 4 * i) & 3;
            enabled && rw == 0 && self.arch.canonical_address(d.dr[i]) == address
        })
    }

    /// Asks for a fault; the running kernel acts on it at its next clock tick.
    pub fn request(&mut self, fault: Fault) {
        self.requests.push_back(fault);
    }

    /// Asks for an orderly reboot ("unload all", link down, new boot with new bases).
    pub fn request_reboot(&mut self) {
        self.request(Fault::Reboot);
    }

    /// KdDebuggerNotPresent, kept in the kernel's variable too: set when a LoadSymbols or
    /// DbgPrint goes undelivered, cleared when the host is heard again (sheet 1.5).
    pub fn set_debugger_not_present(&mut self, not_present: bool) {
        self.debugger_not_present = not_present;
        let at = self.layout.kd_debugger_not_present;
        self.memory.write(at, &[u8::from(not_present)]);
    }

    /// Time since this boot started.
    pub fn uptime(&self) -> Duration {
        self.booted_at.elapsed()
    }

    // ----- breakpoints (R4 kdbreak.c) ----------------------------------------------------

    /// KdpAddBreakpoint: returns the 1-based handle, or 0 when the table is full or an active
    /// breakpoint already sits at `address`. Unmapped memory gives a deferred breakpoint
    /// (sheet 4.5), planted when the page is mapped.
    pub fn add_breakpoint(&mut self, address: u64) -> u32 {
        if self
            .breakpoints
            .iter()
            .flatten()
            .any(|b| b.address == address)
        {
            return 0;
        }
        let Some(slot) = self.breakpoints.iter().position(Option::is_none) else {
            return 0;
        };
        let entry = match self.memory.read(address, 1).first() {
            Some(&saved) => {
                self.memory.write(address, &[0xCC]);
                Breakpoint {
                    address,
                    saved,
                    pending: false,
                }
            }
            None => Breakpoint {
                address,
                saved: 0,
                pending: true,
            },
        };
        if let Some(b) = self.breakpoints.get_mut(slot) {
            *b = Some(entry);
        }
        slot as u32 + 1
    }

    /// KdpDeleteBreakpoint: removes a breakpoint by handle, restoring the byte; false if the
    /// handle is not in use (then RestoreBreakPoint answers STATUS_UNSUCCESSFUL).
    pub fn remove_breakpoint(&mut self, handle: u32) -> bool {
        let Some(entry) = (handle as usize)
            .checked_sub(1)
            .and_then(|i| self.breakpoints.get_mut(i))
        else {
            return false;
        };
        let Some(bp) = entry.take() else {
            return false;
        };
        if !bp.pending {
            self.memory.write(bp.address, &[bp.saved]);
        }
        true
    }

    /// KdpDeleteBreakpointRange: every breakpoint in `[base, limit]` is deleted.
    pub fn delete_breakpoint_range(&mut self, base: u64, limit: u64) -> bool {
        let handles: Vec<u32> = self
            .breakpoints
            .iter()
            .enumerate()
            .filter_map(|(i, b)| {
                b.filter(|b| b.address >= base && b.address <= limit)
                    .map(|_| i as u32 + 1)
            })
            .collect();
        for &h in &handles {
            self.remove_breakpoint(h);
        }
        !handles.is_empty()
    }

    /// KdSetOwedBreakpoints: plants deferred breakpoints whose memory is now mapped.
    pub fn set_owed_breakpoints(&mut self) {
        for i in 0..BREAKPOINT_MAX {
            let Some(Some(bp)) = self.breakpoints.get(i).copied() else {
                continue;
            };
            if !bp.pending {
                continue;
            }
            if let Some(&saved) = self.memory.read(bp.address, 1).first() {
                self.memory.write(bp.address, &[0xCC]);
                if let Some(b) = self.breakpoints.get_mut(i) {
                    *b = Some(Breakpoint {
                        address: bp.address,
                        saved,
                        pending: false,
                    });
                }
            }
        }
    }

    /// Addresses that hold a debugger int3 now (pending ones excluded).
    pub fn planted(&self) -> Vec<u64> {
        self.breakpoints
            .iter()
            .flatten()
            .filter(|b| !b.pending)
            .map(|b| b.address)
            .collect()
    }

    /// What a debugger that worked with `tag` left behind, as a detach must not: the machine
    /// stopped, int3s planted, a hardware breakpoint enabled in any processor's Dr7,
    /// nt!PoolHitTag holding the tag. Empty when the machine was left clean.
    pub fn leftovers(&self, tag: u32) -> Vec<String> {
        let mut out = Vec::new();
        if !self.running {
            out.push(format!("the machine was left stopped: {:?}", self.phase));
        }
        let planted = self.planted();
        if !planted.is_empty() {
            out.push(format!("int3s left planted at {planted:x?}"));
        }
        for cpu in 0..self.processors as u16 {
            let dr7 = self.debug_registers(cpu).map_or(0, |d| d.dr7);
            if dr7 & 0xff != 0 {
                out.push(format!(
                    "a hardware breakpoint left enabled on CPU {cpu} (Dr7 {dr7:#x})"
                ));
            }
        }
        if self.pool_hit_tag() == Some(tag) {
            out.push(format!("nt!PoolHitTag left holding the tag {tag:#010x}"));
        }
        out
    }

    /// Whether a debugger int3 from the table is in memory at `address` now (what a CPU
    /// executing there would hit).
    pub fn planted_at(&self, address: u64) -> bool {
        self.breakpoints
            .iter()
            .flatten()
            .any(|b| b.address == address && !b.pending)
    }

    /// The handle of the breakpoint at `address`, planted or owed.
    pub fn breakpoint_at(&self, address: u64) -> Option<u32> {
        self.breakpoints
            .iter()
            .position(|b| b.is_some_and(|b| b.address == address))
            .map(|i| i as u32 + 1)
    }

    // ----- stops ---------------------------------------------------------------------------

    /// KdEnterDebugger's bookkeeping, and KiSaveProcessorControlState on every CPU: KernelDr6
    /// reads as the hardware has it (`dr6` on the reporting CPU, idle elsewhere), KPRCB gets
    /// the current thread and a copy of the processor state.
    pub(crate) fn enter_debugger(&mut self, cpu: u16, dr6: u64) {
        self.context_sent = false;
        self.running = false;
        self.stops += 1;
        for i in 0..self.cpus.len() {
            self.set_special(i, 4, if i == usize::from(cpu) { dr6 } else { DR6_IDLE });
        }
        crate::boot::save_processor_state(self);
    }

    /// KdpSetCommonState + KdpSetContextState: the state change for `info` on `cpu`, with
    /// the control report. The instruction stream is copied from PC, every debugger
    /// breakpoint within [PC, PC+InstructionCount-1] is deleted (sheet 4.4: breakpoints are
    /// consumed at every stop; RestoreBreakPoint on them then fails), and the stream is copied
    /// again without them.
    pub fn common_state(&mut self, cpu: u16, info: StateInfo) -> StateChange {
        let arch = self.arch;
        let Some(c) = self.cpus.get(usize::from(cpu)) else {
            return StateChange::new(info, 0, 0);
        };
        let pc = arch.canonical_address(c.context.pc());
        let thread = arch.canonical_address(c.thread);
        let count = self.memory.read(pc, MAX_STREAM).len();
        if count > 0 {
            self.delete_breakpoint_range(pc, pc + count as u64 - 1);
        }
        let mut stream = [0u8; MAX_STREAM];
        for (d, s) in stream.iter_mut().zip(self.memory.read(pc, count)) {
            *d = s;
        }
        let regs = self.debug_registers(cpu).unwrap_or_default();
        let ctx = &self.cpus[usize::from(cpu)].context;
        let report = match ctx {
            Context::Amd64(x) => {
                let cs = x.get(Amd64Reg::SegCs) as u16;
                ControlReport::Amd64(Amd64ControlReport {
                    dr6: regs.dr6,
                    dr7: regs.dr7,
                    eflags: x.get(Amd64Reg::EFlags) as u32,
                    instruction_count: count as u16,
                    // REPORT_INCLUDES_SEGS, and REPORT_STANDARD_CS for KGDT64_R0_CODE.
                    report_flags: 1 | if cs == 0x10 { 2 } else { 0 },
                    instruction_stream: stream,
                    seg_cs: cs,
                    seg_ds: x.get(Amd64Reg::SegDs) as u16,
                    seg_es: x.get(Amd64Reg::SegEs) as u16,
                    seg_fs: x.get(Amd64Reg::SegFs) as u16,
                })
            }
            Context::X86(x) => {
                let cs = x.get(X86Reg::SegCs) as u16;
                ControlReport::X86(X86ControlReport {
                    dr6: regs.dr6 as u32,
                    dr7: regs.dr7 as u32,
                    instruction_count: count as u16,
                    // REPORT_STANDARD_CS for KGDT_R0_CODE outside V86 mode.
                    report_flags: 1 | if cs == 0x8 { 2 } else { 0 },
                    instruction_stream: stream,
                    seg_cs: cs,
                    seg_ds: x.get(X86Reg::SegDs) as u16,
                    seg_es: x.get(X86Reg::SegEs) as u16,
                    seg_fs: x.get(X86Reg::SegFs) as u16,
                    eflags: x.get(X86Reg::EFlags) as u32,
                })
            }
        };
        // ProcessorLevel stays 0: R4 fills in KeProcessorLevel, but both real captures (T1
        // x64, T2 x86) carry 0.
        StateChange::new(info, thread, pc)
            .with_processor(cpu, self.processors)
            .with_control_report(&report)
    }

    /// Reports an exception stop on `cpu` (KdpReport: enter the debugger, KdpSetCommonState):
    /// the CPU's PC is set to `pc` and its current thread to `thread`; the rest of its context
    /// is what the caller put there. Breakpoints in the reported instruction range are
    /// consumed. The machine is then stopped until [`Machine::handle`] sees a continue.
    pub fn report_stop(&mut self, cpu: u16, code: u32, pc: u64, thread: u64) -> StateChange {
        self.report_exception(cpu, code, pc, thread, true)
    }

    pub(crate) fn report_exception(
        &mut self,
        cpu: u16,
        code: u32,
        pc: u64,
        thread: u64,
        first_chance: bool,
    ) -> StateChange {
        let arch = self.arch;
        let pc = arch.canonical_address(pc);
        if let Some(c) = self.cpus.get_mut(usize::from(cpu)) {
            c.context.set_pc(pc);
            c.thread = thread;
        }
        let dr6 = if code == status::SINGLE_STEP {
            let hw = self.hardware_breakpoint(cpu, pc);
            DR6_IDLE | hw.map_or(DR6_BS, |i| 1 << i)
        } else {
            DR6_IDLE
        };
        self.enter_debugger(cpu, dr6);
        let mut e = Exception64::new(code, pc);
        e.first_chance = u32::from(first_chance);
        if code == status::BREAKPOINT {
            // ExceptionInformation[0] = BREAKPOINT_BREAK (0): a plain int3, not a debug service.
            e.record.number_parameters = 1;
        }
        self.common_state(cpu, StateInfo::Exception(e))
    }

    /// A LoadSymbols notification for `image` on the boot processor (DbgLoadImageSymbols ->
    /// KdpReportLoadSymbolsStateChange). ProcessId: KdInitSystem passes -1 for the boot
    /// images (T2 shows 0x00000000ffffffff from an x86 kernel, T1 all ones from x64); drivers
    /// loaded later report the System process (4).
    pub(crate) fn load_symbols_state_change(&mut self, index: usize) -> Option<StateChange> {
        let img = self.images.get(index)?.clone();
        self.park_boot_cpu();
        self.enter_debugger(0, DR6_IDLE);
        let mut ls = LoadSymbols64::load(img.base, img.size, img.checksum, &img.path);
        ls.process_id = match (index, self.arch) {
            (0 | 1, Arch::Amd64) => u64::MAX,
            (0 | 1, Arch::X86) => 0xFFFF_FFFF,
            _ => 4,
        };
        Some(self.common_state(0, StateInfo::LoadSymbols(ls)))
    }

    /// The "unload all" notification of a shutdown (DbgUnLoadImageSymbols(NULL, -1, 0)):
    /// LoadSymbols with UnloadSymbols=1, BaseOfDll=-1 (sign-extended on x86 as well),
    /// PathNameLength 0 (sheet 2.4, 5).
    pub(crate) fn unload_all_state_change(&mut self) -> StateChange {
        self.park_boot_cpu();
        self.enter_debugger(0, DR6_IDLE);
        self.common_state(0, StateInfo::LoadSymbols(LoadSymbols64::unload_all()))
    }

    /// Puts CPU 0 at the break site (the int3 of DbgBreakPointWithStatus and the debug
    /// services), on its boot/idle stack and thread.
    pub(crate) fn park_boot_cpu(&mut self) {
        let at = self.layout.break_instruction;
        if let Some(c) = self.cpus.get_mut(0) {
            c.context.set_pc(at);
            c.context.set_sp(c.stack_top - 0x38);
            c.thread = c.idle_thread;
        }
    }

    /// A break-in: KdPollBreakIn saw 'b', the clock CPU calls
    /// DbgBreakPointWithStatus(DBG_STATUS_CONTROL_C): STATUS_BREAKPOINT at the break
    /// instruction on CPU 0.
    pub fn break_in(&mut self) -> StateChange {
        self.break_with_status(DBG_STATUS_CONTROL_C)
    }

    pub(crate) fn break_with_status(&mut self, dbg_status: u64) -> StateChange {
        self.park_boot_cpu();
        if let Some(Cpu {
            context: Context::Amd64(c),
            ..
        }) = self.cpus.get_mut(0)
        {
            c.set(Amd64Reg::Rcx, dbg_status);
        }
        let (pc, thread) = (self.layout.break_instruction, self.cpus[0].thread);
        self.report_stop(0, status::BREAKPOINT, pc, thread)
    }

    /// SwitchProcessor: the new CPU was frozen by the debugger IPI (KiFreezeTargetExecution)
    /// and reports STATUS_WAKE_SYSTEM_DEBUGGER at its own PC.
    pub(crate) fn switch_state_change(&mut self, cpu: u16) -> StateChange {
        self.context_sent = false;
        let pc = self
            .cpu(cpu)
            .map(|c| self.arch.canonical_address(c.context.pc()))
            .unwrap_or(0);
        let mut e = Exception64::new(status::WAKE_SYSTEM_DEBUGGER, pc);
        e.first_chance = 1;
        self.common_state(cpu, StateInfo::Exception(e))
    }

    // ----- the API switch ------------------------------------------------------------------

    fn cpu_of(&self, req: &Manipulate) -> Option<&Cpu> {
        self.cpus.get(usize::from(req.processor))
    }

    /// KdpSysReadControlSpace (R4 kdx64.c / kdx86.c).
    fn read_control_space(&self, cpu: &Cpu, address: u64, count: u32) -> Option<Vec<u8>> {
        let want = (count as usize).min(kdpilot_kd::api::MAX_TRANSFER);
        match self.arch {
            Arch::Amd64 => {
                let bytes = match address {
                    0 => cpu.kpcr.to_le_bytes().to_vec(),
                    1 => cpu.kprcb.to_le_bytes().to_vec(),
                    2 => cpu.special.clone(),
                    3 => cpu.thread.to_le_bytes().to_vec(),
                    _ => return None,
                };
                Some(bytes.get(..want.min(bytes.len())).unwrap_or(&[]).to_vec())
            }
            Arch::X86 => {
                let mut state = cpu.context.as_bytes().to_vec();
                state.extend_from_slice(&cpu.special);
                let start = usize::try_from(address).ok().filter(|&a| a < state.len())?;
                let end = start.saturating_add(want).min(state.len());
                state.get(start..end).map(<[u8]>::to_vec)
            }
        }
    }

    /// KdpSysWriteControlSpace: AMD64 takes only KSPECIAL_REGISTERS (address 2); x86 writes
    /// into KPROCESSOR_STATE (CONTEXT, then KSPECIAL_REGISTERS). Returns the bytes written.
    fn write_control_space(&mut self, cpu: usize, address: u64, data: &[u8]) -> Option<u32> {
        let arch = self.arch;
        let c = self.cpus.get_mut(cpu)?;
        match arch {
            Arch::Amd64 => {
                if address != 2 {
                    return None;
                }
                let n = data.len().min(c.special.len());
                c.special.get_mut(..n)?.copy_from_slice(data.get(..n)?);
                Some(n as u32)
            }
            Arch::X86 => {
                let start = usize::try_from(address)
                    .ok()
                    .filter(|&a| a < X86_PROCESSOR_STATE_SIZE)?;
                let n = data.len().min(X86_PROCESSOR_STATE_SIZE - start);
                let mut state = c.context.as_bytes().to_vec();
                state.extend_from_slice(&c.special);
                state
                    .get_mut(start..start + n)?
                    .copy_from_slice(data.get(..n)?);
                c.context.apply_partial(0, state.get(..0x2CC)?);
                c.special = state.get(0x2CC..)?.to_vec();
                Some(n as u32)
            }
        }
    }

    /// KdpGetStateChange for a Continue2 with an NT_SUCCESS status (R4): TraceFlag sets or
    /// clears EFLAGS.TF of the reporting CPU; Dr7 becomes KernelDr7 of every CPU.
    fn apply_continue2(&mut self, cpu: u16, c: &Continue2) {
        if let Some(x) = self.cpus.get_mut(usize::from(cpu)) {
            let fl = x.context.eflags();
            let fl = if c.trace_flag != 0 {
                fl | EFLAGS_TF
            } else {
                fl & !EFLAGS_TF
            };
            match &mut x.context {
                Context::Amd64(a) => a.set(Amd64Reg::EFlags, u64::from(fl)),
                Context::X86(a) => a.set(X86Reg::EFlags, u64::from(fl)),
            }
        }
        for i in 0..self.cpus.len() {
            self.set_special(i, 5, c.dr7);
        }
    }

    /// Serves one request (KdpSendWaitContinue's switch). `cpu` is the reporting processor
    /// (Continue2's TraceFlag applies to it).
    pub fn handle_on(&mut self, cpu: u16, req: &Manipulate) -> Action {
        let arch = self.arch;
        let mut reply = match req.api {
            number::GET_VERSION => match GetVersion::decode_request(req, arch) {
                Ok(r) => r.encode_reply(&self.version(), arch),
                Err(_) => unsuccessful(req),
            },
            number::READ_VIRTUAL_MEMORY => match ReadVirtualMemory::decode_request(req, arch) {
                Ok(r) => {
                    let want = (r.count as usize).min(kdpilot_kd::api::MAX_TRANSFER);
                    let data = self.memory.read(arch.canonical_address(r.address), want);
                    let st = if data.len() == want {
                        status::SUCCESS
                    } else {
                        status::UNSUCCESSFUL
                    };
                    r.encode_reply(&ReadReply { status: st, data }, arch)
                }
                Err(_) => unsuccessful(req),
            },
            number::WRITE_VIRTUAL_MEMORY => match WriteVirtualMemory::decode_request(req, arch) {
                Ok(r) => {
                    let n = self
                        .memory
                        .write(arch.canonical_address(r.address), &r.data);
                    r.encode_reply(&(n as u32), arch)
                }
                Err(_) => unsuccessful(req),
            },
            number::GET_CONTEXT => {
                match (GetContext::decode_request(req, arch), self.cpu_of(req)) {
                    (Ok(r), Some(c)) => {
                        let ctx = c.context.clone();
                        self.context_sent = true;
                        r.encode_reply(&ctx, arch)
                    }
                    _ => unsuccessful(req),
                }
            }
            number::GET_CONTEXT_EX => {
                match (GetContextEx::decode_request(req, arch), self.cpu_of(req)) {
                    (Ok(r), Some(c))
                        if r.range.fits(arch)
                            && r.range.byte_count as usize <= kdpilot_kd::api::MAX_TRANSFER =>
                    {
                        let bytes = c
                            .context
                            .as_bytes()
                            .get(r.range.offset as usize..r.range.end() as usize)
                            .unwrap_or(&[])
                            .to_vec();
                        self.context_sent = true;
                        r.encode_reply(
                            &ContextBytes {
                                offset: r.range.offset,
                                bytes,
                            },
                            arch,
                        )
                    }
                    _ => unsuccessful(req),
                }
            }
            number::SET_CONTEXT => match SetContext::decode_request(req, arch) {
                // KdpSetContext refuses unless a GetContext was served in this stop.
                Ok(r) if self.context_sent && self.cpu_of(req).is_some() => {
                    if let Some(c) = self.cpus.get_mut(usize::from(req.processor)) {
                        c.context = r.context.clone();
                    }
                    r.encode_reply(&(), arch)
                }
                _ => unsuccessful(req),
            },
            number::SET_CONTEXT_EX => match SetContextEx::decode_request(req, arch) {
                Ok(r) if self.context_sent && self.cpu_of(req).is_some() => {
                    let n = self
                        .cpus
                        .get_mut(usize::from(req.processor))
                        .map_or(0, |c| c.context.apply_partial(r.offset, &r.bytes));
                    r.encode_reply(&(n as u32), arch)
                }
                _ => unsuccessful(req),
            },
            number::WRITE_BREAKPOINT => match WriteBreakPoint::decode_request(req, arch) {
                Ok(r) => {
                    let handle = self.add_breakpoint(arch.canonical_address(r.address));
                    r.encode_reply(&handle, arch)
                }
                Err(_) => unsuccessful(req),
            },
            number::RESTORE_BREAKPOINT => match RestoreBreakPoint::decode_request(req, arch) {
                Ok(r) if self.remove_breakpoint(r.handle) => r.encode_reply(&(), arch),
                _ => unsuccessful(req),
            },
            number::READ_CONTROL_SPACE => {
                match (
                    ReadControlSpace::decode_request(req, arch),
                    self.cpu_of(req),
                ) {
                    (Ok(r), Some(c)) => match self.read_control_space(c, r.address, r.count) {
                        Some(data) => r.encode_reply(
                            &ReadReply {
                                status: status::SUCCESS,
                                data,
                            },
                            arch,
                        ),
                        None => unsuccessful(req),
                    },
                    _ => unsuccessful(req),
                }
            }
            number::WRITE_CONTROL_SPACE => match WriteControlSpace::decode_request(req, arch) {
                Ok(r) => {
                    match self.write_control_space(usize::from(req.processor), r.address, &r.data) {
                        Some(n) => r.encode_reply(&n, arch),
                        None => unsuccessful(req),
                    }
                }
                Err(_) => unsuccessful(req),
            },
            number::CONTINUE => {
                let st =
                    Continue::decode_request(req, arch).map_or(status::DBG_CONTINUE, |c| c.status);
                self.running = true;
                return Action::Resume(Resume {
                    status: st,
                    trace: false,
                });
            }
            number::CONTINUE2 => {
                let Ok(c) = Continue2::decode_request(req, arch) else {
                    return Action::Reply(unsuccessful(req));
                };
                let ok = status::is_success(c.continue_status);
                if ok {
                    self.apply_continue2(cpu, &c);
                }
                self.running = true;
                return Action::Resume(Resume {
                    status: c.continue_status,
                    trace: ok && c.trace_flag != 0,
                });
            }
            number::SWITCH_PROCESSOR => return Action::SwitchProcessor(req.processor),
            number::REBOOT => return Action::Reboot,
            number::CAUSE_BUGCHECK => return Action::BugCheck(MANUALLY_INITIATED_CRASH),
            number::CLEAR_ALL_INTERNAL_BREAKPOINTS => return Action::NoReply,
            _ => unsuccessful(req),
        };
        // Replies go to the processor that asked, as the kernel fills them in place.
        reply.processor = req.processor;
        reply.processor_level = req.processor_level;
        Action::Reply(reply)
    }

    /// Serves one request as the CPU of the current stop (CPU 0 if none).
    pub fn handle(&mut self, req: &Manipulate) -> Action {
        let cpu = match &self.phase {
            Phase::Debugger(s) => s.cpu,
            _ => 0,
        };
        self.handle_on(cpu, req)
    }
}

fn special_field(special: &[u8], at: usize, width: usize) -> u64 {
    let mut b = [0u8; 8];
    if let Some(s) = special.get(at..at + width) {
        b[..width].copy_from_slice(s);
    }
    u64::from_le_bytes(b)
}
