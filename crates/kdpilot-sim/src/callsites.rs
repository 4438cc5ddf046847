//! Finding where one function calls another, in the mapped machine code: the return addresses
//! the workload's stacks carry are those of real `call` instructions.

use iced_x86::{Decoder, DecoderOptions, Mnemonic, OpKind, Register};
use kdpilot_kd::Arch;

use crate::memory::Memory;

/// How a call reaches its target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallKind {
    /// `call rel32`.
    Direct,
    /// `call [IAT slot]`: an imported function.
    Import,
    /// `call reg` or `call [reg+...]`: a function pointer (thread start routines).
    Indirect,
}

/// Return addresses of every call in `[start, start+len)` that reaches `target`, in address
/// order. Indirect calls through a register match any target (the caller passes a function
/// pointer) and are reported as [`CallKind::Indirect`].
pub fn calls_to(
    mem: &Memory,
    arch: Arch,
    start: u64,
    len: u32,
    target: u64,
) -> Vec<(u64, CallKind)> {
    let code = mem.read(start, len as usize);
    let bitness = match arch {
        Arch::Amd64 => 64,
        Arch::X86 => 32,
    };
    let mut out = Vec::new();
    let mut decoder = Decoder::with_ip(bitness, &code, start, DecoderOptions::NONE);
    for instr in &mut decoder {
        if instr.mnemonic() != Mnemonic::Call {
            continue;
        }
        let kind = match instr.op0_kind() {
            OpKind::NearBranch64 | OpKind::NearBranch32 | OpKind::NearBranch16 => {
                (arch.canonical_address(instr.near_branch_target()) == target)
                    .then_some(CallKind::Direct)
            }
            OpKind::Memory => {
                let slot = if instr.is_ip_rel_memory_operand() {
                    Some(instr.ip_rel_memory_address())
                } else if instr.memory_base() == Register::None
                    && instr.memory_index() == Register::None
                {
                    Some(instr.memory_displacement64())
                } else {
                    None
                };
                match slot {
                    Some(slot) => {
                        let ptr = mem.read(arch.canonical_address(slot), arch.pointer_size());
                        let value = match arch {
                            Arch::Amd64 => ptr.try_into().map(u64::from_le_bytes).ok(),
                            Arch::X86 => <[u8; 4]>::try_from(ptr)
                                .map(|b| arch.canonical_address(u64::from(u32::from_le_bytes(b))))
                                .ok(),
                        };
                        (value == Some(target)).then_some(CallKind::Import)
                    }
                    None => Some(CallKind::Indirect),
                }
            }
            OpKind::Register => Some(CallKind::Indirect),
            _ => None,
        };
        if let Some(k) = kind {
            out.push((arch.canonical_address(instr.next_ip()), k));
        }
    }
    out
}

/// Length of the instruction at `pc` (0 if it cannot be decoded).
pub fn instruction_len(mem: &Memory, arch: Arch, pc: u64) -> usize {
    let code = mem.read(pc, 16);
    let bitness = match arch {
        Arch::Amd64 => 64,
        Arch::X86 => 32,
    };
    let mut decoder = Decoder::with_ip(bitness, &code, pc, DecoderOptions::NONE);
    let instr = decoder.decode();
    if instr.is_invalid() {
        0
    } else {
        instr.len()
    }
}
