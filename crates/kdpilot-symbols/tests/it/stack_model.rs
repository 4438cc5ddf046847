//! An independent way to get stacks to unwind: run the real fixture code forward.
//!
//! A call path (`nt!KiSystemStartup` → ... → `nt!ExAllocatePoolWithTag`) is "executed" by
//! decoding each function with iced-x86 from its entry, in address order, up to the call that
//! leads to the next function, applying only what matters to a stack: pushes, pops, stack
//! pointer arithmetic (including alignment and `alloca`), frame pointer set-up, stores of
//! registers to memory, and register writes (a copy for `mov reg, reg`, a fresh unique value
//! otherwise). Branches are not taken: the code between an entry and a call site on these paths
//! is straight-line as far as the stack is concerned. Interrupts push a machine frame as the
//! CPU does. The result is the memory, the registers at the stop, and for every frame the
//! ground truth: pc, stack pointer, registers at its call, and where its return address is.
//!
//! This uses the code bytes only: not `.pdata`/`.xdata`, not the PDB's frame data. Names are
//! resolved through the module set (PDB publics), which the name tests check separately.

use std::collections::HashMap;

use iced_x86::{
    Code, Decoder, DecoderOptions, Instruction, InstructionInfoFactory, Mnemonic, OpAccess, OpKind,
    Register,
};
use kdpilot_symbols::{MockMemory, ModuleSet, Registers, X64Registers, X86Registers};

/// What to do next on the path.
#[derive(Clone, Debug)]
pub enum Step {
    /// Call the named function (`module!name`) from the current one.
    Call(&'static str),
    /// Call through a register (`call rbx`) into the named function.
    CallIndirect(&'static str),
    /// The current function traps at `stop` (after the instruction there for a trap like int3,
    /// at it for a fault); the CPU enters `handler` through a machine frame.
    Interrupt {
        /// Handler, `module!name`.
        handler: &'static str,
        /// Where in the current function.
        stop: Stop,
        /// Whether the CPU pushes an error code (faults like #PF).
        error_code: bool,
        /// Whether the saved RIP is the next instruction (traps: int3).
        after: bool,
    },
}

/// Where the innermost function stops.
#[derive(Clone, Copy, Debug)]
pub enum Stop {
    /// At its first instruction.
    Entry,
    /// After `n` instructions.
    Instructions(usize),
    /// At the first instruction that is not part of the prologue.
    AfterPrologue,
    /// `n` instructions before its first `ret` (0: at the `ret`).
    BeforeRet(usize),
    /// At its call to the named function.
    AtCallTo(&'static str),
}

/// Ground truth for one frame.
#[derive(Clone, Debug)]
pub struct TruthFrame {
    /// `module!function`.
    pub function: String,
    /// The frame's pc.
    pub pc: u64,
    /// The frame's stack pointer.
    pub sp: u64,
    /// Registers in this frame (at the stop, or at its call).
    pub regs: [u64; 16],
    /// Where this frame's return address was pushed (None for the outermost).
    pub ra_slot: Option<u64>,
    /// Whether the frame below was entered through a machine frame.
    pub via_interrupt: bool,
}

pub struct Model {
    pub mem: MockMemory,
    pub start: Registers,
    /// Innermost first.
    pub frames: Vec<TruthFrame>,
}

struct Cpu<'a> {
    set: &'a ModuleSet,
    bits: u32,
    mem: MockMemory,
    regs: [u64; 16],
    fresh: u64,
    info: InstructionInfoFactory,
    /// RVA -> raw public name, per module base (for `__imp_` slots and x86 decorations).
    reverse: HashMap<u64, String>,
}

const RSP: usize = 4;
const RBP: usize = 5;

fn gpr_index(r: Register) -> Option<usize> {
    let full = r.full_register();
    (full.is_gpr64()).then(|| full.number())
}

impl<'a> Cpu<'a> {
    fn mask(&self, v: u64) -> u64 {
        if self.bits == 32 {
            v & 0xFFFF_FFFF
        } else {
            v
        }
    }

    fn addr(&self, v: u64) -> u64 {
        if self.bits == 32 {
            v as u32 as i32 as i64 as u64
        } else {
            v
        }
    }

    fn width(&self) -> u64 {
        u64::from(self.bits / 8)
    }

    fn fresh(&mut self) -> u64 {
        self.fresh += 1;
        self.mask(0x0F0F_0000_0F00_0000 + self.fresh * 0x10)
    }

    fn write_word(&mut self, a: u64, v: u64) {
        let a = self.addr(a);
        if self.bits == 64 {
            self.mem.write_u64(a, v)
        } else {
            self.mem.write_u32(a, v as u32)
        }
    }

    fn read_word(&self, a: u64) -> u64 {
        let b = self.mem.peek(self.addr(a), self.width() as usize);
        let mut buf = [0u8; 8];
        buf[..b.len()].copy_from_slice(&b);
        u64::from_le_bytes(buf)
    }

    fn push(&mut self, v: u64) -> u64 {
        self.regs[RSP] = self.mask(self.regs[RSP].wrapping_sub(self.width()));
        let sp = self.regs[RSP];
        self.write_word(sp, v);
        self.addr(sp)
    }

    fn sp(&self) -> u64 {
        self.addr(self.regs[RSP])
    }

    fn resolve(&self, name: &str) -> u64 {
        self.set
            .resolve(name)
            .unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    fn decoder_at(&self, address: u64) -> Decoder<'a> {
        let set: &'a ModuleSet = self.set;
        let m = set.find(address).expect("address in a module");
        let img = m.image.as_deref().expect("image attached");
        let rva = (address - m.base) as u32;
        let bytes = img.at_rva(rva).expect("code in file");
        Decoder::with_ip(self.bits, bytes, self.mask(address), DecoderOptions::NONE)
    }

    fn ip(&self, i: &Instruction) -> u64 {
        self.addr(i.ip())
    }

    fn next_ip(&self, i: &Instruction) -> u64 {
        self.addr(i.next_ip())
    }

    /// Instructions of the function at `entry`, up to (not including) its first ret, at most 400.
    fn listing(&self, entry: u64) -> Vec<Instruction> {
        let mut d = self.decoder_at(entry);
        let mut out = Vec::new();
        while d.can_decode() && out.len() < 400 {
            let i = d.decode();
            let ret = matches!(
                i.mnemonic(),
                Mnemonic::Ret | Mnemonic::Iretq | Mnemonic::Iretd
            );
            out.push(i);
            if ret {
                break;
            }
        }
        out
    }

    fn mem_address(&self, i: &Instruction) -> Option<u64> {
        if i.memory_base() == Register::RIP || i.memory_base() == Register::EIP {
            return Some(i.memory_displacement64());
        }
        if self.bits == 32
            && i.memory_base() == Register::None
            && i.memory_index() == Register::None
        {
            // An absolute address as linked: rebase it to where the module is mapped.
            let m = self.set.find(self.ip(i))?;
            let pref = m.best_headers()?.image_base;
            let abs = i.memory_displacement64() & 0xFFFF_FFFF;
            return Some(m.base.wrapping_add(abs.wrapping_sub(pref)));
        }
        let base = match i.memory_base() {
            Register::None => 0,
            r => self.regs[gpr_index(r)?],
        };
        let index = match i.memory_index() {
            Register::None => 0,
            r => self.regs[gpr_index(r)?].wrapping_mul(u64::from(i.memory_index_scale())),
        };
        Some(
            self.mask(
                base.wrapping_add(index)
                    .wrapping_add(i.memory_displacement64()),
            ),
        )
    }

    /// The target of a call instruction, as `module!name` of the callee when known.
    fn call_target(&self, i: &Instruction) -> CallTarget {
        match i.op0_kind() {
            OpKind::NearBranch64 | OpKind::NearBranch32 => {
                let a = self.addr(i.near_branch_target());
                match self.reverse.get(&a) {
                    // The x86 msvcstyle.S fixture assembles `call dword ptr [__imp__X]` as a
                    // direct call to the import slot; take it for the import call it means.
                    Some(n) if n.starts_with("__imp_") => CallTarget::Import(Some(n.clone())),
                    _ => CallTarget::Direct(a),
                }
            }
            OpKind::Memory => {
                let slot = self.mem_address(i).unwrap_or(0);
                let m = self.set.find(slot);
                let name = m.and_then(|m| {
                    self.reverse
                        .get(&slot)
                        .cloned()
                        .map(|n| (m.name.clone(), n))
                });
                CallTarget::Import(name.map(|(_, n)| n))
            }
            _ => CallTarget::Register,
        }
    }

    /// Bytes a stdcall callee pops (x86), from its decorated name.
    fn callee_pops(&self, target: &CallTarget) -> u64 {
        if self.bits != 32 {
            return 0;
        }
        let name = match target {
            CallTarget::Direct(a) => self.reverse.get(a).cloned(),
            CallTarget::Import(n) => n.clone(),
            CallTarget::Register => None,
        };
        name.and_then(|n| n.rsplit_once('@').and_then(|(_, d)| d.parse().ok()))
            .unwrap_or(0)
    }

    /// Applies one instruction's effect on stack and registers.
    fn exec(&mut self, i: &Instruction) {
        let w = self.width();
        let op0_reg = (i.op0_kind() == OpKind::Register).then(|| i.op0_register());
        let op1_reg =
            (i.op_count() > 1 && i.op1_kind() == OpKind::Register).then(|| i.op1_register());
        let is_sp = |r: Option<Register>| r.and_then(gpr_index) == Some(RSP);
        match i.mnemonic() {
            Mnemonic::Push => {
                let v = match i.op0_kind() {
                    OpKind::Register => self.regs[gpr_index(i.op0_register()).unwrap()],
                    OpKind::Memory => self
                        .mem_address(i)
                        .map(|a| self.read_word(a))
                        .unwrap_or_else(|| self.fresh()),
                    _ => self.mask(i.immediate(0)),
                };
                self.push(v);
                return;
            }
            Mnemonic::Pop => {
                let v = self.read_word(self.regs[RSP]);
                self.regs[RSP] = self.mask(self.regs[RSP] + w);
                if let Some(ix) = op0_reg.and_then(gpr_index) {
                    self.regs[ix] = v;
                }
                return;
            }
            Mnemonic::Sub | Mnemonic::Add | Mnemonic::And if is_sp(op0_reg) => {
                let v = match i.op1_kind() {
                    OpKind::Register => 0x40, // alloca: data-dependent, any multiple of 16
                    _ => i.immediate(1),
                };
                let sp = self.regs[RSP];
                self.regs[RSP] = self.mask(match i.mnemonic() {
                    Mnemonic::Sub => sp.wrapping_sub(v),
                    Mnemonic::Add => sp.wrapping_add(v),
                    _ => sp & v,
                });
                return;
            }
            Mnemonic::Call | Mnemonic::Ret | Mnemonic::Jmp => return,
            m if i.is_jcc_short_or_near()
                || m == Mnemonic::Nop
                || m == Mnemonic::Int3
                || m == Mnemonic::Pause =>
            {
                return
            }
            Mnemonic::Mov if op0_reg.is_some() && op1_reg.is_some() => {
                if let (Some(d), Some(s)) =
                    (op0_reg.and_then(gpr_index), op1_reg.and_then(gpr_index))
                {
                    let v = self.regs[s];
                    self.regs[d] = if op0_reg.unwrap().size() == 4 {
                        v & 0xFFFF_FFFF
                    } else {
                        v
                    };
                    return;
                }
            }
            Mnemonic::Mov if op0_reg.is_some() && i.op1_kind() == OpKind::Memory => {
                if let (Some(d), Some(a)) = (op0_reg.and_then(gpr_index), self.mem_address(i)) {
                    if op0_reg.unwrap().size() as u64 == w && d != RSP {
                        self.regs[d] = self.read_word(a);
                        return;
                    }
                }
            }
            Mnemonic::Mov if i.op0_kind() == OpKind::Memory && op1_reg.is_some() => {
                if let (Some(a), Some(s)) = (self.mem_address(i), op1_reg.and_then(gpr_index)) {
                    if op1_reg.unwrap().size() as u64 == w {
                        let v = self.regs[s];
                        self.write_word(a, v);
                    }
                }
                return;
            }
            Mnemonic::Lea if op0_reg.is_some() => {
                let a = self.mem_address(i);
                if let (Some(d), Some(a)) = (op0_reg.and_then(gpr_index), a) {
                    self.regs[d] = a;
                    return;
                }
            }
            _ => {}
        }
        // Anything else: every general register it writes gets a fresh value (never RSP:
        // the stack pointer only moves through the cases above).
        let info = self.info.info(i).clone();
        for ur in info.used_registers() {
            if matches!(
                ur.access(),
                OpAccess::Write
                    | OpAccess::ReadWrite
                    | OpAccess::CondWrite
                    | OpAccess::ReadCondWrite
            ) {
                if let Some(ix) = gpr_index(ur.register()) {
                    if ix != RSP {
                        let v = self.fresh();
                        self.regs[ix] = v;
                    }
                }
            }
        }
    }

    /// Runs the function at `entry` until `until` says stop; returns the stop instruction.
    fn run_until(
        &mut self,
        entry: u64,
        mut until: impl FnMut(&mut Self, &Instruction, usize) -> bool,
    ) -> Instruction {
        for (n, i) in self.listing(entry).into_iter().enumerate() {
            if until(self, &i, n) {
                return i;
            }
            if i.mnemonic() == Mnemonic::Ret {
                panic!("ran into a ret at {:#x} before the stop", self.ip(&i));
            }
            if i.mnemonic() == Mnemonic::Call {
                // A call that is not on the path: returns with the stack as it was, less what
                // a stdcall callee pops.
                let t = self.call_target(&i);
                let pops = self.callee_pops(&t);
                self.regs[RSP] = self.mask(self.regs[RSP] + pops);
                for v in [0usize, 1, 2] {
                    // The volatile registers a call clobbers.
                    let f = self.fresh();
                    self.regs[v] = f;
                }
                continue;
            }
            self.exec(&i);
        }
        panic!("stop not found in the function at {entry:#x}");
    }

    fn is_prologue(&self, i: &Instruction) -> bool {
        let op0 = (i.op0_kind() == OpKind::Register)
            .then(|| i.op0_register())
            .and_then(gpr_index);
        match i.mnemonic() {
            Mnemonic::Push => i.op0_kind() == OpKind::Register,
            Mnemonic::Sub => op0 == Some(RSP) && i.op1_kind() != OpKind::Register,
            Mnemonic::Mov | Mnemonic::Lea if op0 == Some(RBP) => {
                (i.op1_kind() == OpKind::Register && gpr_index(i.op1_register()) == Some(RSP))
                    || (i.op1_kind() == OpKind::Memory && gpr_index(i.memory_base()) == Some(RSP))
            }
            Mnemonic::Mov
                if self.bits == 32
                    && i.code() == Code::Mov_r32_rm32
                    && i.op0_register() == Register::EDI
                    && i.op1_register() == Register::EDI =>
            {
                true
            }
            Mnemonic::Mov => {
                i.op0_kind() == OpKind::Memory
                    && gpr_index(i.memory_base()) == Some(RSP)
                    && i.op1_kind() == OpKind::Register
            }
            _ => false,
        }
    }
}

enum CallTarget {
    Direct(u64),
    Import(Option<String>),
    Register,
}

/// Runs `entry_function` through `path` and stops in the last function at `stop`.
pub fn run(
    set: &ModuleSet,
    mut mem: MockMemory,
    bits: u32,
    stack_top: u64,
    entry_function: &'static str,
    path: &[Step],
    stop: Stop,
) -> Model {
    mem.map_zeroed(stack_top - 0x10000, 0x11000);
    let mut reverse = HashMap::new();
    for m in set.modules() {
        if let Some(s) = &m.symbols {
            for (name, rva) in s.names() {
                let a = m.base + u64::from(rva);
                // Prefer the raw (decorated / __imp_) names.
                let better =
                    name.starts_with("__imp_") || name.contains('@') || !reverse.contains_key(&a);
                if better {
                    reverse.insert(a, name.to_string());
                }
            }
        }
    }
    let mut cpu = Cpu {
        set,
        bits,
        mem,
        regs: [0; 16],
        fresh: 0,
        info: InstructionInfoFactory::new(),
        reverse,
    };
    for (ix, r) in cpu.regs.iter_mut().enumerate() {
        *r = if bits == 64 {
            0x0A0A_0000_0000_0000 + ix as u64
        } else {
            0x0A00_0000 + ix as u64 * 0x10
        };
    }
    cpu.regs[RSP] = cpu.mask(stack_top);
    // The outermost function was called from "nowhere": a zero return address.
    let first_slot = cpu.push(0);
    let mut frames: Vec<TruthFrame> = Vec::new();
    let mut current = entry_function.to_string();
    let mut entry = cpu.resolve(entry_function);
    let mut pending_slot = Some(first_slot);
    let mut via_interrupt = false;
    for step in path {
        match step {
            Step::Call(callee) | Step::CallIndirect(callee) => {
                let target = cpu.resolve(callee);
                let indirect = matches!(step, Step::CallIndirect(_));
                let wanted_import = callee.split_once('!').map(|(_, n)| n.to_string()).unwrap();
                let call = cpu.run_until(entry, |cpu, i, _| {
                    if i.mnemonic() != Mnemonic::Call {
                        return false;
                    }
                    match cpu.call_target(i) {
                        CallTarget::Direct(a) => a == target,
                        CallTarget::Import(Some(n)) => {
                            let n = n.trim_start_matches("__imp_").trim_start_matches('_');
                            n == wanted_import
                                || n.split('@').next() == Some(wanted_import.as_str())
                        }
                        CallTarget::Import(None) => false,
                        CallTarget::Register => indirect,
                    }
                });
                frames.push(TruthFrame {
                    function: current.clone(),
                    pc: cpu.next_ip(&call),
                    sp: cpu.sp(),
                    regs: cpu.regs,
                    ra_slot: pending_slot,
                    via_interrupt,
                });
                via_interrupt = false;
                let ra = cpu.next_ip(&call);
                pending_slot = Some(cpu.push(ra));
                current = callee.to_string();
                entry = target;
            }
            Step::Interrupt {
                handler,
                stop,
                error_code,
                after,
            } => {
                let at = stop_instruction(&mut cpu, entry, *stop);
                frames.push(TruthFrame {
                    function: current.clone(),
                    pc: cpu.ip(&at),
                    sp: cpu.sp(),
                    regs: cpu.regs,
                    ra_slot: pending_slot,
                    via_interrupt,
                });
                let rip = if *after {
                    cpu.next_ip(&at)
                } else {
                    cpu.ip(&at)
                };
                let old_sp = cpu.regs[RSP];
                cpu.regs[RSP] &= !0xF;
                cpu.push(0x18); // SS
                cpu.push(old_sp);
                cpu.push(0x246); // RFLAGS
                cpu.push(0x10); // CS
                let slot = cpu.push(rip);
                if *error_code {
                    cpu.push(0x2);
                }
                // The interrupted frame's "pc" is the saved RIP.
                frames.last_mut().unwrap().pc = rip;
                pending_slot = Some(slot);
                via_interrupt = true;
                current = handler.to_string();
                entry = cpu.resolve(handler);
            }
        }
    }
    let at = stop_instruction(&mut cpu, entry, stop);
    frames.push(TruthFrame {
        function: current,
        pc: cpu.ip(&at),
        sp: cpu.sp(),
        regs: cpu.regs,
        ra_slot: pending_slot,
        via_interrupt,
    });
    frames.reverse();
    // frames[i].ra_slot is where frame i's *own* return address is (pushed by frame i+1).
    let start = if bits == 64 {
        Registers::X64(X64Registers {
            gpr: cpu.regs,
            rip: frames[0].pc,
        })
    } else {
        let r = |ix: usize| cpu.regs[ix] as u32;
        Registers::X86(X86Registers {
            eip: frames[0].pc as u32,
            esp: r(RSP),
            ebp: r(RBP),
            ebx: r(3),
            esi: r(6),
            edi: r(7),
            eax: r(0),
            ecx: r(1),
            edx: r(2),
        })
    };
    Model {
        mem: cpu.mem,
        start,
        frames,
    }
}

fn stop_instruction(cpu: &mut Cpu<'_>, entry: u64, stop: Stop) -> Instruction {
    match stop {
        Stop::Entry => cpu.run_until(entry, |_, _, n| n == 0),
        Stop::Instructions(k) => cpu.run_until(entry, move |_, _, n| n == k),
        Stop::AfterPrologue => cpu.run_until(entry, |cpu, i, _| !cpu.is_prologue(i)),
        Stop::BeforeRet(k) => {
            let listing = cpu.listing(entry);
            let ret = listing
                .iter()
                .position(|i| i.mnemonic() == Mnemonic::Ret)
                .expect("a ret");
            let target = listing[ret - k].ip();
            cpu.run_until(entry, move |_, i, _| i.ip() == target)
        }
        Stop::AtCallTo(callee) => {
            let target = cpu.resolve(callee);
            cpu.run_until(entry, move |cpu, i, _| {
                i.mnemonic() == Mnemonic::Call
                    && matches!(cpu.call_target(i), CallTarget::Direct(a) if a == target)
            })
        }
    }
}
