//! The simulated machine and its kernel's KD API layer (KdpSendWaitContinue's request switch,
//! R4 kdapi.c in kd-protocol.md).
//!
//! Wire structures are laid out here from the sheet's offsets directly (not through the
//! client's encoders), so a shared mistake between client and simulator cannot pass the tests.

use kdpilot_kd::api::{
    number, Api, ContextBytes, GetContext, GetContextEx, GetVersion, Manipulate, ReadReply,
    ReadVirtualMemory, RestoreBreakPoint, SetContext, WriteBreakPoint, WriteVirtualMemory,
};
use kdpilot_kd::context::Context;
use kdpilot_kd::state_change::{Amd64ControlReport, ControlReport, StateChange, X86ControlReport};
use kdpilot_kd::version::GetVersion64;
use kdpilot_kd::wire::status;
use kdpilot_kd::Arch;

use crate::memory::{Memory, PAGE_SIZE};
use crate::target::unsuccessful;

/// KD_BREAKPOINT_MAX.
pub const BREAKPOINT_MAX: usize = 32;
/// Size of KDDEBUGGER_DATA64 as Windows 7 has it.
pub const KDBG_SIZE: u32 = 0x340;

/// What the kernel does after a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send this reply and keep serving.
    Reply(Manipulate),
    /// Continue or Continue2: leave the debugger.
    Resume,
    /// Reboot.
    Reboot,
}

/// One planted debugger breakpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Breakpoint {
    /// Address of the int3.
    pub address: u64,
    /// The byte the int3 replaced.
    pub saved: u8,
}

/// Layout of the simulated kernel: where things live this boot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Kernel image base (KASLR: changes every boot).
    pub kern_base: u64,
    /// KDDEBUGGER_DATA64 block address.
    pub kdbg: u64,
    /// KdpDebuggerDataListHead.
    pub debugger_data_list: u64,
    /// PsLoadedModuleList head.
    pub ps_loaded_module_list: u64,
    /// nt!RtlpBreakWithStatusInstruction: where break-ins stop.
    pub break_instruction: u64,
    /// The thread that reports break-ins.
    pub thread: u64,
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
    /// The breakpoint table (handles are index + 1).
    pub breakpoints: [Option<Breakpoint>; BREAKPOINT_MAX],
    /// Per-processor register state.
    pub contexts: Vec<Context>,
    /// Whether a GetContext was served in this stop (SetContext is refused otherwise).
    pub context_sent: bool,
    /// Whether the kernel is running (false while it sits in the debugger).
    pub running: bool,
    /// How many times the kernel entered the debugger.
    pub stops: u64,
    /// What the host answered to the kernel's chatter.
    pub chatter_log: crate::target::ChatterLog,
}

impl Machine {
    /// A machine with a kernel mapped at `kern_base`: an image page with "MZ", the KDBG block,
    /// the debugger data list and an empty loaded-module list.
    pub fn new(arch: Arch, build: u16, processors: u32, kern_base: u64) -> Self {
        let kern_base = arch.canonical_address(kern_base);
        let layout = Layout {
            kern_base,
            kdbg: kern_base + 0x20000,
            debugger_data_list: kern_base + 0x21000,
            ps_loaded_module_list: kern_base + 0x21100,
            break_instruction: kern_base + 0x1000,
            thread: kern_base + 0x30000,
        };
        let mut m = Self {
            arch,
            build,
            processors: processors.max(1),
            memory: Memory::new(),
            layout,
            breakpoints: [None; BREAKPOINT_MAX],
            contexts: Vec::new(),
            context_sent: false,
            running: true,
            stops: 0,
            chatter_log: Default::default(),
        };
        m.build_kernel();
        m
    }

    fn ptr(&self, v: u64) -> Vec<u8> {
        match self.arch {
            Arch::Amd64 => v.to_le_bytes().to_vec(),
            Arch::X86 => (v as u32).to_le_bytes().to_vec(),
        }
    }

    fn build_kernel(&mut self) {
        let l = self.layout.clone();
        self.memory.map(l.kern_base, 0x40000);
        self.memory.write(l.kern_base, b"MZ");
        // int3; ret at the break-in site, as nt!RtlpBreakWithStatusInstruction.
        self.memory.write(l.break_instruction, &[0xCC, 0xC3]);
        // KDDEBUGGER_DATA64: header (List, OwnerTag 'KDBG', Size) then the fields we serve.
        // All pointer fields are 64-bit, sign-extended on x86.
        let kdbg = l.kdbg;
        self.memory.write_u64(kdbg, l.debugger_data_list);
        self.memory.write_u64(kdbg + 8, l.debugger_data_list);
        self.memory.write_u32(kdbg + 0x10, 0x4742_444B);
        self.memory.write_u32(kdbg + 0x14, KDBG_SIZE);
        self.memory.write_u64(kdbg + 0x18, l.kern_base);
        self.memory.write_u64(kdbg + 0x20, l.break_instruction);
        self.memory.write_u64(kdbg + 0x48, l.ps_loaded_module_list);
        self.memory.write_u64(kdbg + 0x138, l.kern_base + 0x22000); // MmPageSize -> 0x1000
        self.memory
            .write_u32(l.kern_base + 0x22000, PAGE_SIZE as u32);
        // KdpDebuggerDataListHead: a one-entry circular list.
        let head = self.ptr(kdbg);
        self.memory.write(l.debugger_data_list, &head);
        let off = self.arch.pointer_size() as u64;
        self.memory.write(l.debugger_data_list + off, &head);
        // PsLoadedModuleList: empty (head points to itself).
        let me = self.ptr(l.ps_loaded_module_list);
        self.memory.write(l.ps_loaded_module_list, &me);
        self.memory.write(l.ps_loaded_module_list + off, &me);
        self.contexts = (0..self.processors)
            .map(|_| {
                let mut c = Context::zeroed(self.arch);
                c.set_pc(l.break_instruction);
                c.set_sp(l.kern_base + 0x3F000);
                c
            })
            .collect();
    }

    /// The GetVersion reply this kernel gives.
    pub fn version(&self) -> GetVersion64 {
        let ptr64 = if self.arch == Arch::Amd64 { 0x4 } else { 0 };
        GetVersion64 {
            major_version: 0x000F,
            minor_version: self.build,
            protocol_version: 6,
            kd_secondary_version: if self.arch == Arch::Amd64 { 2 } else { 0 },
            flags: 0x1 | 0x2 | ptr64,
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

    /// The state change of a break-in on processor 0.
    pub fn break_in_state_change(&self) -> StateChange {
        let pc = self.layout.break_instruction;
        let code = self.memory.read(pc, 16);
        let mut stream = [0u8; 16];
        for (d, s) in stream.iter_mut().zip(&code) {
            *d = *s;
        }
        let report = match self.arch {
            Arch::Amd64 => ControlReport::Amd64(Amd64ControlReport {
                dr6: 0xffff_0ff0,
                dr7: 0x400,
                eflags: 0x86,
                instruction_count: 16,
                report_flags: 3,
                instruction_stream: stream,
                seg_cs: 0x10,
                seg_ds: 0x2b,
                seg_es: 0x2b,
                seg_fs: 0x53,
            }),
            Arch::X86 => ControlReport::X86(X86ControlReport {
                dr6: 0xffff_0ff0,
                dr7: 0x400,
                instruction_count: 16,
                report_flags: 3,
                instruction_stream: stream,
                seg_cs: 0x8,
                seg_ds: 0x23,
                seg_es: 0x23,
                seg_fs: 0x30,
                eflags: 0x246,
            }),
        };
        StateChange::exception(status::BREAKPOINT, pc, self.layout.thread, pc)
            .with_processor(0, self.processors)
            .with_control_report(&report)
    }

    /// Called when the kernel enters the debugger.
    pub fn on_stop(&mut self) {
        self.context_sent = false;
        self.running = false;
        self.stops += 1;
    }

    fn cpu(&self, req: &Manipulate) -> Option<&Context> {
        self.contexts.get(usize::from(req.processor))
    }

    /// Plants an int3 (KdpAddBreakpoint): returns the 1-based handle, 0 when the table is full
    /// or the address is unmapped (the real kernel defers those; not modelled yet).
    pub fn add_breakpoint(&mut self, address: u64) -> u32 {
        if let Some(i) = self
            .breakpoints
            .iter()
            .position(|b| b.is_some_and(|b| b.address == address))
        {
            return i as u32 + 1;
        }
        let Some(slot) = self.breakpoints.iter().position(Option::is_none) else {
            return 0;
        };
        let Some(&saved) = self.memory.read(address, 1).first() else {
            return 0;
        };
        self.memory.write(address, &[0xCC]);
        if let Some(b) = self.breakpoints.get_mut(slot) {
            *b = Some(Breakpoint { address, saved });
        }
        slot as u32 + 1
    }

    /// Removes a breakpoint by handle, restoring the byte; false if the handle is not in use.
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
        self.memory.write(bp.address, &[bp.saved]);
        true
    }

    /// Addresses that still hold a debugger int3.
    pub fn planted(&self) -> Vec<u64> {
        self.breakpoints
            .iter()
            .flatten()
            .map(|b| b.address)
            .collect()
    }

    /// Serves one request.
    pub fn handle(&mut self, req: &Manipulate) -> Action {
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
            number::GET_CONTEXT => match (GetContext::decode_request(req, arch), self.cpu(req)) {
                (Ok(r), Some(ctx)) => {
                    let ctx = ctx.clone();
                    self.context_sent = true;
                    r.encode_reply(&ctx, arch)
                }
                _ => unsuccessful(req),
            },
            number::GET_CONTEXT_EX => {
                match (GetContextEx::decode_request(req, arch), self.cpu(req)) {
                    (Ok(r), Some(ctx))
                        if r.range.fits(arch)
                            && r.range.byte_count as usize <= kdpilot_kd::api::MAX_TRANSFER =>
                    {
                        let bytes = ctx
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
                Ok(r) if self.context_sent && usize::from(req.processor) < self.contexts.len() => {
                    if let Some(c) = self.contexts.get_mut(usize::from(req.processor)) {
                        *c = r.context.clone();
                    }
                    r.encode_reply(&(), arch)
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
            number::CONTINUE | number::CONTINUE2 => {
                self.running = true;
                return Action::Resume;
            }
            number::REBOOT => return Action::Reboot,
            _ => unsuccessful(req),
        };
        // Replies go to the processor that asked, as the kernel fills them in place.
        reply.processor = req.processor;
        reply.processor_level = req.processor_level;
        Action::Reply(reply)
    }
}
