//! x86 stacks as the compiled code leaves them. x86 images have no unwind tables, so the
//! simulator *executes* each function's stack operations from its entry to the call on the path:
//! pushes, pops, `sub/add/and esp`, `mov ebp, esp`, `lea esp/ebp`, and the calls made on the way
//! (a stdcall callee pops its arguments with `ret N`, read from the callee's code). Only the
//! stack pointer, the frame pointer and the values pushed matter to an unwinder; other register
//! results are given fresh values. Conditional branches fall through and forward jumps are
//! followed, which covers the straight-line code the fixture paths have before their calls; a
//! path that needs more is refused with an error rather than approximated.

use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};
use kdpilot_kd::context::{Context, X86Reg};
use kdpilot_kd::Arch;

use crate::frames::{BuiltFrame, FrameError, PathStep};
use crate::memory::Memory;

/// Instructions one function may execute before its call on the path.
const BUDGET: usize = 4096;

const GPRS: [X86Reg; 8] = [
    X86Reg::Eax,
    X86Reg::Ecx,
    X86Reg::Edx,
    X86Reg::Ebx,
    X86Reg::Esp,
    X86Reg::Ebp,
    X86Reg::Esi,
    X86Reg::Edi,
];

fn gpr_index(r: Register) -> Option<usize> {
    match r.full_register32() {
        Register::EAX => Some(0),
        Register::ECX => Some(1),
        Register::EDX => Some(2),
        Register::EBX => Some(3),
        Register::ESP => Some(4),
        Register::EBP => Some(5),
        Register::ESI => Some(6),
        Register::EDI => Some(7),
        _ => None,
    }
}

/// A 32-bit target address as the simulator stores it (sign-extended).
fn va(x: u32) -> u64 {
    Arch::X86.canonical_address(u64::from(x))
}

fn decode_at(mem: &Memory, ip: u64) -> Instruction {
    let code = mem.read(ip, 16);
    Decoder::with_ip(32, &code, ip, DecoderOptions::NONE).decode()
}

/// Bytes a function pops with its first `ret` (stdcall `ret N`; 0 for cdecl).
pub fn callee_pops(mem: &Memory, entry: u64) -> u32 {
    let mut ip = entry;
    for _ in 0..BUDGET {
        let i = decode_at(mem, ip);
        if i.is_invalid() {
            return 0;
        }
        if i.mnemonic() == Mnemonic::Ret {
            return if i.op_count() == 1 {
                u32::from(i.immediate16())
            } else {
                0
            };
        }
        ip = i.next_ip();
    }
    0
}

/// Builds the x86 stack of a thread that called along `path` (outermost first) and is now at
/// the entry of the last step. Same contract as [`crate::frames::build_amd64`].
pub fn build_x86(
    mem: &mut Memory,
    path: &[PathStep],
    stack_top: u64,
    mut values: impl FnMut() -> u64,
) -> Result<(Context, Vec<BuiltFrame>), FrameError> {
    let mut regs = [0u32; 8];
    for (i, r) in regs.iter_mut().enumerate() {
        if i != 4 {
            *r = values() as u32;
        }
    }
    let mut esp = ((stack_top & 0xFFFF_FFF0) - 4) as u32;
    mem.write(va(esp), &0u32.to_le_bytes());
    let mut frames = Vec::with_capacity(path.len());
    let mut return_address = 0u64;
    for (n, step) in path.iter().enumerate() {
        frames.push(BuiltFrame {
            function: step.function,
            entry_sp: va(esp),
            return_address,
        });
        if n + 1 == path.len() {
            break;
        }
        regs[4] = esp;
        run_to_call(mem, step, &mut regs, &mut values)?;
        esp = regs[4];
        return_address = step.return_address;
        esp -= 4;
        mem.write(va(esp), &(return_address as u32).to_le_bytes());
    }
    regs[4] = esp;
    let mut ctx = Context::zeroed(Arch::X86);
    if let Context::X86(c) = &mut ctx {
        for (r, v) in GPRS.iter().zip(regs) {
            c.set(*r, u64::from(v));
        }
        c.set(
            X86Reg::Eip,
            path.last().map_or(0, |s| s.function) & 0xFFFF_FFFF,
        );
        c.set(X86Reg::SegCs, 0x8);
        c.set(X86Reg::EFlags, 0x246);
    }
    frames.reverse();
    Ok((ctx, frames))
}

/// Executes the stack effects of `step.function` from its entry up to the call whose return
/// address is `step.return_address`, leaving ESP as it is at that call instruction.
fn run_to_call(
    mem: &mut Memory,
    step: &PathStep,
    regs: &mut [u32; 8],
    values: &mut impl FnMut() -> u64,
) -> Result<(), FrameError> {
    let unsupported = |op: u8| FrameError::Unsupported {
        op,
        function: step.function,
    };
    let trace = std::env::var_os("KDPILOT_SIM_TRACE_X86").is_some();
    let mut ip = step.function;
    for _ in 0..BUDGET {
        let i = decode_at(mem, ip);
        if i.is_invalid() {
            return Err(FrameError::Unreadable("x86 code"));
        }
        let next = Arch::X86.canonical_address(i.next_ip());
        let esp = regs[4];
        if trace {
            eprintln!(
                "esp={esp:#x} ebp={:#x} eax={:#x} edi={:#x} {ip:#x} {:?}",
                regs[5],
                regs[0],
                regs[7],
                i.code()
            );
        }
        match i.mnemonic() {
            Mnemonic::Call => {
                if next == step.return_address {
                    return Ok(());
                }
                let target = call_target(mem, &i);
                let pops = target.map_or(0, |t| callee_pops(mem, t));
                regs[4] = esp.wrapping_add(pops);
                regs[0] = values() as u32; // the return value
                regs[1] = values() as u32;
                regs[2] = values() as u32;
            }
            Mnemonic::Push => {
                let v = match i.op0_kind() {
                    OpKind::Register => {
                        gpr_index(i.op0_register()).map_or(values() as u32, |r| regs[r])
                    }
                    OpKind::Immediate8to32
                    | OpKind::Immediate32
                    | OpKind::Immediate8
                    | OpKind::Immediate16 => i.immediate(0) as u32,
                    OpKind::Memory => {
                        read_operand(mem, &i, regs).unwrap_or_else(|| values() as u32)
                    }
                    _ => return Err(unsupported(1)),
                };
                regs[4] = esp.wrapping_sub(4);
                mem.write(va(regs[4]), &v.to_le_bytes());
            }
            Mnemonic::Pop => {
                let v = mem
                    .read(va(esp), 4)
                    .try_into()
                    .map(u32::from_le_bytes)
                    .unwrap_or(0);
                regs[4] = esp.wrapping_add(4);
                if let Some(r) = gpr_index(i.op0_register()) {
                    regs[r] = v;
                }
            }
            Mnemonic::Sub | Mnemonic::Add | Mnemonic::And
                if i.op0_kind() == OpKind::Register && i.op0_register() == Register::ESP =>
            {
                let imm = match i.op1_kind() {
                    OpKind::Register => gpr_index(i.op1_register()).map(|r| regs[r]),
                    OpKind::Immediate8to32 | OpKind::Immediate32 => Some(i.immediate(1) as u32),
                    _ => None,
                }
                .ok_or_else(|| unsupported(2))?;
                regs[4] = match i.mnemonic() {
                    Mnemonic::Sub => esp.wrapping_sub(imm),
                    Mnemonic::Add => esp.wrapping_add(imm),
                    _ => esp & imm,
                };
            }
            Mnemonic::Mov if i.op0_kind() == OpKind::Register => {
                let dst = gpr_index(i.op0_register());
                let v = match i.op1_kind() {
                    OpKind::Register => gpr_index(i.op1_register()).map(|r| regs[r]),
                    OpKind::Immediate32 => Some(i.immediate(1) as u32),
                    OpKind::Memory => read_operand(mem, &i, regs),
                    _ => None,
                };
                match dst {
                    Some(4) | Some(5) if v.is_none() => return Err(unsupported(3)),
                    Some(d) => regs[d] = v.unwrap_or_else(|| (values() & 0x3c) as u32),
                    None => {}
                }
            }
            Mnemonic::Lea if i.op0_kind() == OpKind::Register => {
                let ea = effective_address(&i, regs);
                match gpr_index(i.op0_register()) {
                    Some(d @ (4 | 5)) => regs[d] = ea.ok_or_else(|| unsupported(4))?,
                    Some(d) => regs[d] = ea.unwrap_or_else(|| (values() & 0x3c) as u32),
                    None => {}
                }
            }
            Mnemonic::Jmp => match i.op0_kind() {
                OpKind::NearBranch32 | OpKind::NearBranch16
                    if va(i.near_branch_target() as u32) > ip =>
                {
                    ip = Arch::X86.canonical_address(i.near_branch_target());
                    continue;
                }
                _ => return Err(unsupported(5)),
            },
            Mnemonic::Ret | Mnemonic::Leave | Mnemonic::Enter => return Err(unsupported(6)),
            // Conditional branches fall through (loops run zero times more). Arithmetic on a
            // full 32-bit register is computed, so stack adjustments derived from it (alloca)
            // come out as the code would compute them; anything else gets a small unknown value.
            m => {
                if i.op_count() > 0
                    && i.op0_kind() == OpKind::Register
                    && !matches!(m, Mnemonic::Cmp | Mnemonic::Test)
                {
                    let full = i.op0_register().full_register32() == i.op0_register();
                    if let Some(d) = gpr_index(i.op0_register()) {
                        match alu(&i, regs, mem).filter(|_| full) {
                            Some(v) => regs[d] = v,
                            None if d == 4 || d == 5 => return Err(unsupported(7)),
                            None => regs[d] = (values() & 0x3c) as u32,
                        }
                    }
                }
            }
        }
        ip = next;
    }
    Err(FrameError::CallSiteOutside {
        function: step.function,
        return_address: step.return_address,
    })
}

/// The result of a two-operand ALU instruction on a 32-bit register, when its inputs are known.
fn alu(i: &Instruction, regs: &[u32; 8], mem: &Memory) -> Option<u32> {
    let a = regs[gpr_index(i.op0_register())?];
    let b = match i.op_count() {
        1 => 0,
        _ => match i.op1_kind() {
            OpKind::Register if i.op1_register().full_register32() == i.op1_register() => {
                regs[gpr_index(i.op1_register())?]
            }
            OpKind::Immediate8 | OpKind::Immediate8to32 | OpKind::Immediate32 => {
                i.immediate(1) as u32
            }
            OpKind::Memory => read_operand(mem, i, regs)?,
            _ => return None,
        },
    };
    Some(match i.mnemonic() {
        Mnemonic::Add => a.wrapping_add(b),
        Mnemonic::Sub => a.wrapping_sub(b),
        Mnemonic::And => a & b,
        Mnemonic::Or => a | b,
        Mnemonic::Xor => a ^ b,
        Mnemonic::Shl => a.wrapping_shl(b),
        Mnemonic::Shr => a.wrapping_shr(b),
        Mnemonic::Sar => (a as i32).wrapping_shr(b) as u32,
        Mnemonic::Inc => a.wrapping_add(1),
        Mnemonic::Dec => a.wrapping_sub(1),
        Mnemonic::Neg => a.wrapping_neg(),
        Mnemonic::Not => !a,
        Mnemonic::Imul if i.op_count() == 2 => a.wrapping_mul(b),
        Mnemonic::Imul if i.op_count() == 3 => b.wrapping_mul(i.immediate(2) as u32),
        _ => return None,
    })
}

fn call_target(mem: &Memory, i: &Instruction) -> Option<u64> {
    match i.op0_kind() {
        OpKind::NearBranch32 | OpKind::NearBranch16 => {
            Some(Arch::X86.canonical_address(i.near_branch_target()))
        }
        OpKind::Memory
            if i.memory_base() == Register::None && i.memory_index() == Register::None =>
        {
            let slot = Arch::X86.canonical_address(i.memory_displacement64());
            let p: [u8; 4] = mem.read(slot, 4).try_into().ok()?;
            Some(Arch::X86.canonical_address(u64::from(u32::from_le_bytes(p))))
        }
        _ => None,
    }
}

/// The effective address of the memory operand, when it is ESP/EBP-based (or absolute).
fn effective_address(i: &Instruction, regs: &[u32; 8]) -> Option<u32> {
    let base = match i.memory_base() {
        Register::None => 0,
        r => regs[gpr_index(r)?],
    };
    let index = match i.memory_index() {
        Register::None => 0,
        r => regs[gpr_index(r)?].wrapping_mul(i.memory_index_scale()),
    };
    Some(
        base.wrapping_add(index)
            .wrapping_add(i.memory_displacement32()),
    )
}

/// A dword read through the instruction's memory operand, for stack-based operands.
fn read_operand(mem: &Memory, i: &Instruction, regs: &[u32; 8]) -> Option<u32> {
    if !matches!(i.memory_base(), Register::ESP | Register::EBP) {
        return None;
    }
    let ea = effective_address(i, regs)?;
    mem.read(va(ea), 4).try_into().ok().map(u32::from_le_bytes)
}
