//! x86: PDB frame data (FPO and "new FPO" program strings), then the EBP chain, then scan.
//!
//! `.raSearch` follows breakpad: the search starts at ESP + the callee's parameter bytes
//! (still on the stack from the unwinder's point of view) + locals + saved registers, and
//! looks up to three more words for a return address in case ESP was aligned.

use std::collections::HashMap;

use super::code::{self, Code};
use super::postfix::{evaluate, EvalError};
use super::{
    read_word, scan, sign_extend, Frame, FrameTrust, Registers, Step, WalkConfig, X86Registers,
};
use crate::memory::{MemoryReader, ReadError};
use crate::module_set::ModuleSet;
use crate::pdb::{FrameKind, FrameRecord};

/// How many evaluations (each after fetching one more dword) a program gets.
const MAX_EVAL_ROUNDS: usize = 32;

async fn read_u32<R: MemoryReader>(reader: &mut R, a: u32) -> Result<Option<u32>, ReadError> {
    Ok(read_word(reader, sign_extend(a), 4)
        .await?
        .map(|v| v as u32))
}

fn plausible(modules: &ModuleSet, eip: u32) -> bool {
    code::looks_like_return_address(modules, sign_extend(eip))
}

/// The parameter bytes of the function `frame` is in (from its frame data), which sit between
/// its caller's ESP and the caller's locals.
pub(crate) fn params_size(modules: &ModuleSet, frame: &Frame) -> u64 {
    if !matches!(frame.registers, Registers::X86(_)) {
        return 0;
    }
    let lookup = if frame.pc_is_return_address {
        frame.pc.wrapping_sub(1)
    } else {
        frame.pc
    };
    modules
        .find(lookup)
        .and_then(|m| {
            let rva = m.rva(lookup)?;
            Some(u64::from(
                m.symbols.as_ref()?.frame_record(rva)?.params_size,
            ))
        })
        .unwrap_or(0)
}

/// One unwind step from `cur`.
pub(crate) async fn step<R: MemoryReader>(
    modules: &ModuleSet,
    config: &WalkConfig,
    reader: &mut R,
    cur: &Frame,
    regs: X86Registers,
    callee_params: u64,
) -> Result<Option<Step>, ReadError> {
    let lookup = if cur.pc_is_return_address {
        cur.pc.wrapping_sub(1)
    } else {
        cur.pc
    };
    let module = modules.find(lookup);
    if let Some(m) = module {
        let rva = (lookup - m.base) as u32;
        // At an exact pc in an epilogue, frame data (written for the body) no longer holds:
        // EBP may already be the caller's. Run the rest of the epilogue instead.
        if !cur.pc_is_return_address {
            let code = Code {
                module: m,
                remote: config.remote_unwind_info,
            };
            if let Some(r) = epilogue_step(&code, reader, regs, rva).await? {
                return Ok(Some(r));
            }
        }
        if let Some(rec) = m.symbols.as_ref().and_then(|s| s.frame_record(rva)) {
            if let Some(r) =
                with_frame_data(modules, reader, regs, rec, callee_params as u32).await?
            {
                return Ok(Some(r));
            }
        }
        // No frame data: at an exact pc, recognise a standard prologue or a ret.
        if !cur.pc_is_return_address {
            let code = Code {
                module: m,
                remote: config.remote_unwind_info,
            };
            let pc_rva = (cur.pc - m.base) as u32;
            if let Some(r) = prologue_step(&code, modules, reader, regs, pc_rva).await? {
                return Ok(Some(r));
            }
        }
    }

    // EBP chain: [ebp] = caller's ebp, [ebp+4] = return address.
    let (ebp, esp) = (regs.ebp, regs.esp);
    if ebp >= esp && ebp - esp < (1 << 20) && ebp % 4 == 0 && ebp < u32::MAX - 8 {
        if let (Some(saved), Some(ra)) = (
            read_u32(reader, ebp).await?,
            read_u32(reader, ebp + 4).await?,
        ) {
            if plausible(modules, ra) {
                let mut r = regs;
                r.eip = ra;
                r.esp = ebp + 8;
                r.ebp = saved;
                return Ok(Some(Step {
                    regs: Registers::X86(r),
                    trust: FrameTrust::FramePointer,
                    ra_slot: Some(sign_extend(ebp + 4)),
                    machine_frame: false,
                }));
            }
        }
    }

    if let Some((slot, ra)) = scan(modules, reader, sign_extend(esp), config.scan_bytes, 4).await? {
        let mut r = regs;
        r.eip = ra as u32;
        r.esp = (slot as u32).wrapping_add(4);
        return Ok(Some(Step {
            regs: Registers::X86(r),
            trust: FrameTrust::Scan,
            ra_slot: Some(slot),
            machine_frame: false,
        }));
    }
    Ok(None)
}

/// The most instructions simulated in an x86 epilogue.
const MAX_EPILOGUE: usize = 16;

/// If the code at `pc_rva` is the rest of an epilogue (`pop r32`, `add esp, imm`,
/// `mov esp, ebp`, `lea esp, [ebp+disp8]`, `leave`, ending in `ret` / `ret imm16`), runs it.
async fn epilogue_step<R: MemoryReader>(
    code: &Code<'_>,
    reader: &mut R,
    regs: X86Registers,
    pc_rva: u32,
) -> Result<Option<Step>, ReadError> {
    let Some(bytes) = code.bytes_upto(reader, pc_rva, 64).await? else {
        return Ok(None);
    };
    enum Op {
        Pop(u8),
        AddEsp(u32),
        EspFromEbp(u32),
    }
    let mut ops = Vec::new();
    let mut at = 0usize;
    loop {
        if ops.len() > MAX_EPILOGUE {
            return Ok(None);
        }
        let b = |i: usize| bytes.get(at + i).copied();
        match (b(0), b(1)) {
            (Some(op @ 0x58..=0x5F), _) if op != 0x5C => {
                ops.push(Op::Pop(op - 0x58));
                at += 1;
            }
            (Some(0x83), Some(0xC4)) => {
                let Some(imm) = b(2) else { return Ok(None) };
                ops.push(Op::AddEsp(i32::from(imm as i8) as u32));
                at += 3;
            }
            (Some(0x81), Some(0xC4)) => {
                let Some(imm) = crate::bytes::le_u32(&bytes, at + 2) else {
                    return Ok(None);
                };
                ops.push(Op::AddEsp(imm));
                at += 6;
            }
            (Some(0x8B), Some(0xE5)) | (Some(0x89), Some(0xEC)) => {
                ops.push(Op::EspFromEbp(0));
                at += 2;
            }
            (Some(0x8D), Some(0x65)) => {
                let Some(d) = b(2) else { return Ok(None) };
                ops.push(Op::EspFromEbp(i32::from(d as i8) as u32));
                at += 3;
            }
            (Some(0xC9), _) => {
                ops.push(Op::EspFromEbp(0));
                ops.push(Op::Pop(5));
                at += 1;
            }
            (Some(0xC3), _) | (Some(0xC2), _) => break,
            _ => return Ok(None),
        }
    }
    let mut r = regs;
    for op in ops {
        match op {
            Op::Pop(reg) => {
                let Some(v) = read_u32(reader, r.esp).await? else {
                    return Ok(None);
                };
                match reg {
                    0 => r.eax = v,
                    1 => r.ecx = v,
                    2 => r.edx = v,
                    3 => r.ebx = v,
                    5 => r.ebp = v,
                    6 => r.esi = v,
                    _ => r.edi = v,
                }
                r.esp = r.esp.wrapping_add(4);
            }
            Op::AddEsp(n) => r.esp = r.esp.wrapping_add(n),
            Op::EspFromEbp(d) => r.esp = r.ebp.wrapping_add(d),
        }
    }
    let slot = r.esp;
    let Some(ra) = read_u32(reader, slot).await? else {
        return Ok(None);
    };
    r.eip = ra;
    r.esp = slot.wrapping_add(4);
    Ok(Some(Step {
        regs: Registers::X86(r),
        trust: FrameTrust::CodeAnalysis,
        ra_slot: Some(sign_extend(slot)),
        machine_frame: false,
    }))
}

/// A frame without frame data, at an exact pc: the first instruction of a standard prologue
/// (`mov edi, edi` / `push ebp` / `mov ebp, esp`), right after its `push ebp`, or a `ret`.
async fn prologue_step<R: MemoryReader>(
    code: &Code<'_>,
    modules: &ModuleSet,
    reader: &mut R,
    regs: X86Registers,
    pc_rva: u32,
) -> Result<Option<Step>, ReadError> {
    let before = match pc_rva.checked_sub(1) {
        Some(r) => code.bytes(reader, r, 1).await?,
        None => None,
    };
    let Some(at) = code.bytes_upto(reader, pc_rva, 3).await? else {
        return Ok(None);
    };
    let mov_ebp_esp = |b: &[u8]| b.starts_with(&[0x8B, 0xEC]) || b.starts_with(&[0x89, 0xE5]);
    // The first byte of a known function, or a hot-patchable / standard prologue.
    let function_start = code
        .module
        .symbol_at(pc_rva)
        .is_some_and(|(_, start)| start == pc_rva);
    let at_entry = function_start
        || at.starts_with(&[0x8B, 0xFF, 0x55])
        || at.starts_with(&[0x89, 0xFF, 0x55])
        || (at.first() == Some(&0x55) && mov_ebp_esp(at.get(1..).unwrap_or_default()))
        || matches!(at.first(), Some(0xC3 | 0xC2));
    let after_push = before.as_deref() == Some(&[0x55]) && mov_ebp_esp(&at);
    let (ra_off, saved_ebp_off) = if at_entry {
        (0u32, None)
    } else if after_push {
        (4, Some(0u32))
    } else {
        return Ok(None);
    };
    let esp = regs.esp;
    let Some(ra) = read_u32(reader, esp.wrapping_add(ra_off)).await? else {
        return Ok(None);
    };
    if ra != 0 && !plausible(modules, ra) {
        return Ok(None);
    }
    let mut r = regs;
    if let Some(off) = saved_ebp_off {
        let Some(saved) = read_u32(reader, esp.wrapping_add(off)).await? else {
            return Ok(None);
        };
        r.ebp = saved;
    }
    r.eip = ra;
    r.esp = esp.wrapping_add(ra_off + 4);
    Ok(Some(Step {
        regs: Registers::X86(r),
        trust: FrameTrust::CodeAnalysis,
        ra_slot: Some(sign_extend(esp.wrapping_add(ra_off))),
        machine_frame: false,
    }))
}

/// Runs the record's program (or one synthesised for old FPO records).
async fn with_frame_data<R: MemoryReader>(
    modules: &ModuleSet,
    reader: &mut R,
    regs: X86Registers,
    rec: &FrameRecord,
    callee_params: u32,
) -> Result<Option<Step>, ReadError> {
    let program = match (&rec.program, rec.kind) {
        (Some(p), _) => p.clone(),
        (None, FrameKind::Fpo | FrameKind::FrameData) if rec.uses_base_pointer => {
            "$T0 $ebp = $eip $T0 4 + ^ = $ebp $T0 ^ = $esp $T0 8 + =".to_string()
        }
        (None, FrameKind::Fpo | FrameKind::FrameData) => {
            "$T0 .raSearch = $eip $T0 ^ = $esp $T0 4 + =".to_string()
        }
        _ => return Ok(None),
    };
    let start = regs
        .esp
        .wrapping_add(callee_params)
        .wrapping_add(rec.locals_size)
        .wrapping_add(rec.saved_regs_size);
    let mut ra_search = start;
    if program.contains(".raSearch") {
        for i in 0..4u32 {
            let slot = start.wrapping_add(4 * i);
            match read_u32(reader, slot).await? {
                Some(v) if plausible(modules, v) => {
                    ra_search = slot;
                    break;
                }
                Some(_) => {}
                None => break,
            }
        }
    }
    let mut base: HashMap<String, u32> = HashMap::new();
    for (k, v) in [
        ("$eip", regs.eip),
        ("$esp", regs.esp),
        ("$ebp", regs.ebp),
        ("$ebx", regs.ebx),
        ("$esi", regs.esi),
        ("$edi", regs.edi),
        (".raSearch", ra_search),
        (".raSearchStart", ra_search),
        (".cbLocals", rec.locals_size),
        (".cbSavedRegs", rec.saved_regs_size),
        (".cbParams", rec.params_size),
        (".cbCalleeParams", callee_params),
    ] {
        base.insert(k.to_string(), v);
    }
    let mut memory: HashMap<u32, u32> = HashMap::new();
    let mut vars = None;
    for _ in 0..MAX_EVAL_ROUNDS {
        let mut attempt = base.clone();
        match evaluate(&program, &mut attempt, &mut |a| memory.get(&a).copied()) {
            Ok(()) => {
                vars = Some(attempt);
                break;
            }
            Err(EvalError::Memory(a)) => match read_u32(reader, a).await? {
                Some(v) => {
                    memory.insert(a, v);
                }
                None => return Ok(None),
            },
            Err(e) => {
                tracing::debug!(error = %e, program, "frame data program failed");
                return Ok(None);
            }
        }
    }
    let Some(vars) = vars else { return Ok(None) };
    let (Some(&eip), Some(&esp)) = (vars.get("$eip"), vars.get("$esp")) else {
        return Ok(None);
    };
    if eip != 0 && modules.find(sign_extend(eip)).is_none() {
        return Ok(None);
    }
    let get = |k: &str, old: u32| vars.get(k).copied().unwrap_or(old);
    let r = X86Registers {
        eip,
        esp,
        ebp: get("$ebp", regs.ebp),
        ebx: get("$ebx", regs.ebx),
        esi: get("$esi", regs.esi),
        edi: get("$edi", regs.edi),
        ..regs
    };
    Ok(Some(Step {
        regs: Registers::X86(r),
        trust: FrameTrust::FrameData,
        ra_slot: Some(sign_extend(esp.wrapping_sub(4))),
        machine_frame: false,
    }))
}
