//! One instruction of execution for Continue2 with TraceFlag set (EFLAGS.TF: the CPU runs one
//! instruction and raises a debug trap, reported as STATUS_SINGLE_STEP; kd-protocol.md 2.1,
//! 4.4). The simulator does not emulate: it decodes the instruction's length with iced-x86 and
//! follows the control flow and stack effects that are easy to get exactly right (direct
//! call/jmp/jcc, ret, push, pop, sub/add rsp, mov rbp,rsp, leave); every other instruction
//! only advances the program counter, its other effects are not modelled.

use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};
use kdpilot_kd::context::{Amd64Reg, Context, X86Reg};
use kdpilot_kd::Arch;

use crate::memory::Memory;

/// EFLAGS bits used by conditional branches.
mod flag {
    pub const CF: u32 = 1 << 0;
    pub const PF: u32 = 1 << 2;
    pub const ZF: u32 = 1 << 6;
    pub const SF: u32 = 1 << 7;
    pub const OF: u32 = 1 << 11;
}

/// What one traced instruction did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepOutcome {
    /// It executed; the context now points at the next instruction.
    Stepped,
    /// It was an int3: a breakpoint exception at the same PC instead of a single-step trap.
    Breakpoint,
    /// The code at PC could not be read or decoded: nothing moved (an access violation on a
    /// real machine; the simulator reports the trap at the same PC).
    NoCode,
}

fn gpr64(r: Register) -> Option<Amd64Reg> {
    Some(match r {
        Register::RAX => Amd64Reg::Rax,
        Register::RCX => Amd64Reg::Rcx,
        Register::RDX => Amd64Reg::Rdx,
        Register::RBX => Amd64Reg::Rbx,
        Register::RSP => Amd64Reg::Rsp,
        Register::RBP => Amd64Reg::Rbp,
        Register::RSI => Amd64Reg::Rsi,
        Register::RDI => Amd64Reg::Rdi,
        Register::R8 => Amd64Reg::R8,
        Register::R9 => Amd64Reg::R9,
        Register::R10 => Amd64Reg::R10,
        Register::R11 => Amd64Reg::R11,
        Register::R12 => Amd64Reg::R12,
        Register::R13 => Amd64Reg::R13,
        Register::R14 => Amd64Reg::R14,
        Register::R15 => Amd64Reg::R15,
        _ => return None,
    })
}

fn gpr32(r: Register) -> Option<X86Reg> {
    Some(match r {
        Register::EAX => X86Reg::Eax,
        Register::ECX => X86Reg::Ecx,
        Register::EDX => X86Reg::Edx,
        Register::EBX => X86Reg::Ebx,
        Register::ESP => X86Reg::Esp,
        Register::EBP => X86Reg::Ebp,
        Register::ESI => X86Reg::Esi,
        Register::EDI => X86Reg::Edi,
        _ => return None,
    })
}

/// A full-width general register of the context.
fn get(ctx: &Context, r: Register) -> Option<u64> {
    match ctx {
        Context::Amd64(c) => gpr64(r).map(|g| c.get(g)),
        Context::X86(c) => gpr32(r).map(|g| c.get(g)),
    }
}

fn set(ctx: &mut Context, r: Register, v: u64) -> bool {
    match ctx {
        Context::Amd64(c) => gpr64(r).map(|g| c.set(g, v)).is_some(),
        Context::X86(c) => gpr32(r).map(|g| c.set(g, v)).is_some(),
    }
}

/// Whether a Jcc is taken, from its mnemonic and EFLAGS; `None` for other instructions.
fn jcc_taken(m: Mnemonic, eflags: u32) -> Option<bool> {
    let f = |bit: u32| eflags & bit != 0;
    Some(match m {
        Mnemonic::Jo => f(flag::OF),
        Mnemonic::Jno => !f(flag::OF),
        Mnemonic::Jb => f(flag::CF),
        Mnemonic::Jae => !f(flag::CF),
        Mnemonic::Je => f(flag::ZF),
        Mnemonic::Jne => !f(flag::ZF),
        Mnemonic::Jbe => f(flag::CF) || f(flag::ZF),
        Mnemonic::Ja => !f(flag::CF) && !f(flag::ZF),
        Mnemonic::Js => f(flag::SF),
        Mnemonic::Jns => !f(flag::SF),
        Mnemonic::Jp => f(flag::PF),
        Mnemonic::Jnp => !f(flag::PF),
        Mnemonic::Jl => f(flag::SF) != f(flag::OF),
        Mnemonic::Jge => f(flag::SF) == f(flag::OF),
        Mnemonic::Jle => f(flag::ZF) || f(flag::SF) != f(flag::OF),
        Mnemonic::Jg => !f(flag::ZF) && f(flag::SF) == f(flag::OF),
        _ => return None,
    })
}

/// Decodes the instruction at `pc` (at most 15 bytes; fewer if the page ends).
pub fn decode(arch: Arch, memory: &Memory, pc: u64) -> Option<Instruction> {
    let bytes = memory.read(arch.canonical_address(pc), 15);
    if bytes.is_empty() {
        return None;
    }
    let (bitness, ip) = match arch {
        Arch::Amd64 => (64, pc),
        Arch::X86 => (32, pc & 0xFFFF_FFFF),
    };
    let mut d = Decoder::with_ip(bitness, &bytes, ip, DecoderOptions::NONE);
    let i = d.decode();
    (!i.is_invalid()).then_some(i)
}

/// Executes the instruction at the context's PC as far as the simulator models it.
pub fn single_step(arch: Arch, ctx: &mut Context, memory: &mut Memory) -> StepOutcome {
    let pc = ctx.pc();
    let Some(i) = decode(arch, memory, pc) else {
        return StepOutcome::NoCode;
    };
    if i.mnemonic() == Mnemonic::Int3 {
        return StepOutcome::Breakpoint;
    }
    let width = arch.pointer_size() as u64;
    let mask = if arch == Arch::X86 {
        0xFFFF_FFFF
    } else {
        u64::MAX
    };
    let next = i.next_ip() & mask;
    let sp = ctx.sp();
    let push = |ctx: &mut Context, memory: &mut Memory, v: u64| {
        let new_sp = ctx.sp().wrapping_sub(width) & mask;
        match arch {
            Arch::Amd64 => memory.write_u64(arch.canonical_address(new_sp), v),
            Arch::X86 => memory.write_u32(arch.canonical_address(new_sp), v as u32),
        }
        ctx.set_sp(new_sp);
    };
    let read_stack = |memory: &Memory, at: u64| match arch {
        Arch::Amd64 => memory.read_u64(at),
        Arch::X86 => memory.read_u32(arch.canonical_address(at)).map(u64::from),
    };
    let direct = matches!(
        i.op0_kind(),
        OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
    );
    let mut new_pc = next;
    match i.mnemonic() {
        Mnemonic::Call if direct => {
            push(ctx, memory, next);
            new_pc = i.near_branch_target();
        }
        Mnemonic::Jmp if direct => new_pc = i.near_branch_target(),
        m if direct && jcc_taken(m, ctx.eflags()) == Some(true) => {
            new_pc = i.near_branch_target();
        }
        Mnemonic::Ret => {
            if let Some(ret) = read_stack(memory, sp) {
                let extra = if i.op_count() == 1 { i.immediate(0) } else { 0 };
                ctx.set_sp(sp.wrapping_add(width).wrapping_add(extra) & mask);
                new_pc = ret;
            }
        }
        Mnemonic::Push => match i.op0_kind() {
            OpKind::Register => {
                if let Some(v) = get(ctx, i.op0_register()) {
                    push(ctx, memory, v);
                }
            }
            OpKind::Immediate8to64
            | OpKind::Immediate32to64
            | OpKind::Immediate8to32
            | OpKind::Immediate32
            | OpKind::Immediate8to16 => {
                let v = i.immediate(0) & mask;
                push(ctx, memory, v);
            }
            _ => {}
        },
        Mnemonic::Pop if i.op0_kind() == OpKind::Register => {
            if let Some(v) = read_stack(memory, sp) {
                ctx.set_sp(sp.wrapping_add(width) & mask);
                set(ctx, i.op0_register(), v);
            }
        }
        Mnemonic::Sub | Mnemonic::Add
            if i.op0_kind() == OpKind::Register
                && matches!(i.op0_register(), Register::RSP | Register::ESP)
                && i.op_count() == 2
                && i.op1_kind() != OpKind::Register =>
        {
            let imm = i.immediate(1) & mask;
            let v = if i.mnemonic() == Mnemonic::Sub {
                sp.wrapping_sub(imm)
            } else {
                sp.wrapping_add(imm)
            };
            ctx.set_sp(v & mask);
        }
        Mnemonic::Mov if i.op0_kind() == OpKind::Register && i.op1_kind() == OpKind::Register => {
            if let Some(v) = get(ctx, i.op1_register()) {
                set(ctx, i.op0_register(), v);
            }
        }
        Mnemonic::Leave => {
            let bp = ctx.fp();
            if let Some(v) = read_stack(memory, bp) {
                ctx.set_fp(v);
                ctx.set_sp(bp.wrapping_add(width) & mask);
            }
        }
        _ => {}
    }
    // The x86 CONTEXT keeps 32 bits (Eip); addresses in memory are sign-extended.
    ctx.set_pc(new_pc);
    StepOutcome::Stepped
}
