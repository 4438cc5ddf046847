//! x64: unwind info, then RBP chain, then scan.
//!
//! The unwind codes are parsed with pe-unwind-info; the driving loop is RtlVirtualUnwind's
//! (as in the WRK and Wine), written here with checked arithmetic and async stack reads:
//! - the frame base for SAVE_NONVOL / SAVE_XMM128 is fixed once, before any code is undone:
//!   RSP at the unwound pc, or, once SET_FPREG has run, `frame register - 16 * FrameOffset`
//!   (pe-unwind-info's own loop uses the RSP of the moment, which is wrong for MSVC's
//!   "mov [rsp+8], rbx before push" prologues);
//! - codes whose prologue offset is past the pc are skipped, for the primary entry only;
//!   chained parents run in full with the same frame base;
//! - the epilog check runs only outside the prologue and only when there are codes; a `jmp`
//!   inside the function is followed, one outside it is a tail call (the end of the epilog);
//! - a machine frame ends the frame: RIP and RSP come from the trap frame.

use pe_unwind_info::x86_64::{FunctionEpilogInstruction, UnwindInfo, UnwindOperation};

use super::code::{self, Code, RuntimeFunction};
use super::{
    read_word, scan, Frame, FrameTrust, Registers, Step, WalkConfig, X64Register, X64Registers,
};
use crate::memory::{MemoryReader, ReadError};
use crate::module_set::ModuleSet;

/// The deepest chain of chained unwind entries followed.
const MAX_CHAIN: usize = 32;
/// Stack pointers above this are refused (no kernel stack is within 1 TiB of the top, and
/// staying below it keeps every offset addition from overflowing).
const MAX_SANE_SP: u64 = u64::MAX - (1 << 40);
/// The most unwind codes read from one UNWIND_INFO.
const MAX_CODES: usize = 255;
/// Bytes of code read for an epilog check.
const EPILOG_WINDOW: usize = 96;

fn sane_sp(v: u64) -> bool {
    (0x1000..=MAX_SANE_SP).contains(&v) && v % 8 == 0
}

async fn read_u64<R: MemoryReader>(reader: &mut R, a: u64) -> Result<Option<u64>, ReadError> {
    read_word(reader, a, 8).await
}

/// One unwind step from `cur`.
pub(crate) async fn step<R: MemoryReader>(
    modules: &ModuleSet,
    config: &WalkConfig,
    reader: &mut R,
    cur: &Frame,
    regs: X64Registers,
) -> Result<Option<Step>, ReadError> {
    let lookup = if cur.pc_is_return_address {
        cur.pc.wrapping_sub(1)
    } else {
        cur.pc
    };
    if let Some(m) = modules.find(lookup) {
        let code = Code {
            module: m,
            remote: config.remote_unwind_info,
        };
        if code.has_unwind_data() && sane_sp(regs.rsp()) {
            let lookup_rva = (lookup - m.base) as u32;
            let pc_rva = (cur.pc.wrapping_sub(m.base)) as u32;
            if let Some((r, machine, slot)) =
                unwind_with_info(&code, reader, regs, lookup_rva, pc_rva).await?
            {
                return Ok(Some(Step {
                    regs: Registers::X64(r),
                    trust: FrameTrust::UnwindInfo,
                    ra_slot: Some(slot),
                    machine_frame: machine,
                }));
            }
        }
    }

    // RBP chain: [rbp] = caller's rbp, [rbp+8] = return address.
    let rbp = regs.rbp();
    let rsp = regs.rsp();
    if rbp > rsp && rbp - rsp < (1 << 20) && rbp % 8 == 0 && rbp <= MAX_SANE_SP {
        if let (Some(saved), Some(ra)) = (
            read_u64(reader, rbp).await?,
            read_u64(reader, rbp + 8).await?,
        ) {
            if code::looks_like_return_address(modules, ra) {
                let mut r = regs;
                r.rip = ra;
                r.set(X64Register::RBP, saved);
                r.set(X64Register::RSP, rbp + 16);
                return Ok(Some(Step {
                    regs: Registers::X64(r),
                    trust: FrameTrust::FramePointer,
                    ra_slot: Some(rbp + 8),
                    machine_frame: false,
                }));
            }
        }
    }

    // Scan. Frame 0 may be a leaf whose return address is at [rsp]; later frames' rsp points
    // just past their return address slot.
    if let Some((slot, ra)) = scan(modules, reader, rsp, config.scan_bytes, 8).await? {
        let mut r = regs;
        r.rip = ra;
        r.set(X64Register::RSP, slot + 8);
        return Ok(Some(Step {
            regs: Registers::X64(r),
            trust: FrameTrust::Scan,
            ra_slot: Some(slot),
            machine_frame: false,
        }));
    }
    Ok(None)
}

/// Pops the return address: RIP = [RSP], RSP += 8.
async fn pop_return<R: MemoryReader>(
    reader: &mut R,
    mut regs: X64Registers,
) -> Result<Option<(X64Registers, bool, u64)>, ReadError> {
    let rsp = regs.rsp();
    let Some(ra) = read_u64(reader, rsp).await? else {
        return Ok(None);
    };
    regs.rip = ra;
    regs.set(X64Register::RSP, rsp.wrapping_add(8));
    Ok(Some((regs, false, rsp)))
}

/// Reads and parses the UNWIND_INFO at `rva`; returns its bytes.
async fn read_unwind_info<R: MemoryReader>(
    code: &Code<'_>,
    reader: &mut R,
    rva: u32,
) -> Result<Option<Vec<u8>>, ReadError> {
    let Some(header) = code.bytes(reader, rva, 4).await? else {
        return Ok(None);
    };
    let count = usize::from(header[2]).min(MAX_CODES);
    let len = 4 + ((count + 1) & !1) * 2 + 12;
    code.bytes_upto(reader, rva, len).await
}

/// Unwinds one frame with the module's unwind data. `None` when the data or the stack could
/// not be read.
async fn unwind_with_info<R: MemoryReader>(
    code: &Code<'_>,
    reader: &mut R,
    regs: X64Registers,
    lookup_rva: u32,
    pc_rva: u32,
) -> Result<Option<(X64Registers, bool, u64)>, ReadError> {
    let Some(primary) = code.lookup_function(reader, lookup_rva).await? else {
        // No entry: a leaf function, its return address at [rsp].
        return pop_return(reader, regs).await;
    };
    if primary.end <= primary.begin {
        return Ok(None);
    }
    let Some(bytes) = read_unwind_info(code, reader, primary.unwind_info).await? else {
        return Ok(None);
    };
    let Some(info) = UnwindInfo::parse(&bytes) else {
        return Ok(None);
    };
    let ops: Vec<(u8, UnwindOperation)> = info.unwind_operations().take(MAX_CODES).collect();
    let offset = pc_rva.wrapping_sub(primary.begin);
    let in_prolog = offset < u32::from(info.prolog_size);

    // Frame base: the stack pointer after the whole fixed prologue (RtlVirtualUnwind's
    // EstablisherFrame). In the body that is RSP, or the frame register less its offset once
    // SET_FPREG has run. Inside the prologue the pushes and allocations not made yet are taken
    // off RSP, so that MSVC's `mov [rsp+8], rbx` before `push rdi; sub rsp, 20h` finds its slot
    // (Windows' own unwinder uses RSP as it is there, and reads the wrong slot).
    let pending: u64 = if in_prolog {
        ops.iter()
            .filter(|(o, _)| u32::from(*o) > offset)
            .map(|(_, op)| match op {
                UnwindOperation::PopNonVolatile(_) => 8,
                UnwindOperation::UnStackAlloc(n) => u64::from(*n),
                _ => 0,
            })
            .sum()
    } else {
        0
    };
    let fpreg = info.frame_register();
    let fp_offset = u64::from(info.frame_register_offset());
    let chained_primary = matches!(
        info.trailer(),
        Some(pe_unwind_info::x86_64::UnwindInfoTrailer::ChainedUnwindInfo { .. })
    );
    let set_fp_done = fpreg.is_some()
        && (!in_prolog
            || chained_primary
            || ops.iter().any(|(o, op)| {
                matches!(op, UnwindOperation::RestoreSPFromFP) && u32::from(*o) <= offset
            }));
    let frame_base = match fpreg {
        Some(fp) if set_fp_done => regs.get(fp).checked_sub(fp_offset),
        _ => regs.rsp().checked_sub(pending),
    };
    let Some(frame_base) = frame_base else {
        return Ok(None);
    };

    let mut regs = regs;
    // Epilog: simulate the rest of it. Also for a chained fragment without codes of its own
    // (MSVC's epilogue fragments): the parent's codes would undo what the epilog already did.
    if !in_prolog && offset < primary.end - primary.begin {
        if let Some(r) = try_epilog(code, reader, regs, &info, &ops, primary, pc_rva).await? {
            return Ok(r);
        }
    }

    let mut function = primary;
    let mut chained = false;
    let mut owned_bytes;
    let mut info = info;
    let mut ops = ops;
    for _ in 0..MAX_CHAIN {
        let fp = info.frame_register();
        let fpo = u64::from(info.frame_register_offset());
        for (op_offset, op) in &ops {
            if !chained && u32::from(*op_offset) > offset {
                continue;
            }
            let rsp = regs.rsp();
            match *op {
                UnwindOperation::EpilogInformation(_) | UnwindOperation::ReadXMM(..) => {}
                UnwindOperation::PopNonVolatile(reg) => {
                    let Some(v) = read_u64(reader, rsp).await? else {
                        return Ok(None);
                    };
                    regs.set(reg, v);
                    let Some(n) = rsp.checked_add(8) else {
                        return Ok(None);
                    };
                    regs.set(X64Register::RSP, n);
                }
                UnwindOperation::UnStackAlloc(n) => {
                    let Some(n) = rsp.checked_add(u64::from(n)) else {
                        return Ok(None);
                    };
                    regs.set(X64Register::RSP, n);
                }
                UnwindOperation::RestoreSPFromFP => {
                    if let Some(fp) = fp {
                        let Some(n) = regs.get(fp).checked_sub(fpo) else {
                            return Ok(None);
                        };
                        regs.set(X64Register::RSP, n);
                    }
                }
                UnwindOperation::ReadNonVolatile(reg, off) => {
                    // The offset relative to the frame base, without overflow on any value.
                    const BIAS: u64 = 1 << 62;
                    let rel = info.resolve_offset(|_| BIAS, off).wrapping_sub(BIAS) as i64;
                    let rel = match fp {
                        Some(_) => rel + fpo as i64,
                        None => rel,
                    };
                    let Some(addr) = frame_base.checked_add_signed(rel) else {
                        return Ok(None);
                    };
                    let Some(v) = read_u64(reader, addr).await? else {
                        return Ok(None);
                    };
                    regs.set(reg, v);
                }
                UnwindOperation::PopMachineFrame { error_code } => {
                    let base = rsp.wrapping_add(if error_code { 8 } else { 0 });
                    let (Some(rip), Some(new_rsp)) = (
                        read_u64(reader, base).await?,
                        read_u64(reader, base.wrapping_add(24)).await?,
                    ) else {
                        return Ok(None);
                    };
                    regs.rip = rip;
                    regs.set(X64Register::RSP, new_rsp);
                    return Ok(Some((regs, true, base)));
                }
            }
        }
        let next = match info.trailer() {
            Some(pe_unwind_info::x86_64::UnwindInfoTrailer::ChainedUnwindInfo { chained }) => {
                RuntimeFunction {
                    begin: chained.begin_address.get(),
                    end: chained.end_address.get(),
                    unwind_info: chained.unwind_info_address.get(),
                }
            }
            _ => return pop_return(reader, regs).await,
        };
        if next == function {
            return Ok(None);
        }
        function = next;
        chained = true;
        owned_bytes = match read_unwind_info(code, reader, function.unwind_info).await? {
            Some(b) => b,
            None => return Ok(None),
        };
        info = match UnwindInfo::parse(&owned_bytes) {
            Some(i) => i,
            None => return Ok(None),
        };
        ops = info.unwind_operations().take(MAX_CODES).collect();
    }
    Ok(None)
}

/// Whether v2 epilog codes allow `offset` to be in an epilog (no v2 codes: maybe).
fn epilog_possible(ops: &[(u8, UnwindOperation)], pc_rva: u32, f: RuntimeFunction) -> bool {
    let mut infos = ops.iter().filter_map(|(_, op)| match op {
        UnwindOperation::EpilogInformation(i) => Some(*i),
        _ => None,
    });
    let Some(first) = infos.next() else {
        return true;
    };
    let header = first.as_header();
    let size = u32::from(header.epilog_size());
    let at = |epilog_offset: u32| {
        let start = f.end.wrapping_sub(epilog_offset);
        pc_rva >= start && pc_rva < start.wrapping_add(size)
    };
    if header.single_epilog() && at(size) {
        return true;
    }
    infos.any(|i| i.as_offset() != 0 && at(u32::from(i.as_offset())))
}

/// If `pc_rva` is in an epilog, simulates the rest of it and pops the return address.
/// `Ok(None)`: not in an epilog; `Ok(Some(None))`: in one but the stack was unreadable.
#[allow(clippy::type_complexity)]
async fn try_epilog<R: MemoryReader>(
    code: &Code<'_>,
    reader: &mut R,
    regs: X64Registers,
    info: &UnwindInfo<'_>,
    ops: &[(u8, UnwindOperation)],
    f: RuntimeFunction,
    pc_rva: u32,
) -> Result<Option<Option<(X64Registers, bool, u64)>>, ReadError> {
    if !epilog_possible(ops, pc_rva, f) {
        return Ok(None);
    }
    let fpreg = info.frame_register();
    let mut instrs = Vec::new();
    let mut at = pc_rva;
    let mut jumps = 0;
    'outer: loop {
        let Some(window) = code.bytes_upto(reader, at, EPILOG_WINDOW).await? else {
            return Ok(None);
        };
        let mut rest: &[u8] = &window;
        loop {
            // `add rsp` / `lea rsp` are accepted anywhere in the run, not only first: a
            // chained fragment's epilogue can run on into its parent's (KiCallDriverEntry).
            match FunctionEpilogInstruction::parse(rest, fpreg, true) {
                Ok(Some((ins, next))) => {
                    instrs.push(ins);
                    if instrs.len() > 16 {
                        return Ok(None);
                    }
                    rest = next;
                }
                Ok(None) => {
                    // ret, or a jmp: follow a relative jmp that stays in the function.
                    let consumed = (window.len() - rest.len()) as u32;
                    let mut t = rest;
                    if t.first().is_some_and(|b| b & 0xF0 == 0x40) {
                        t = &t[1..];
                    }
                    let (len, disp) = match t.first() {
                        Some(0xEB) => (2u32, t.get(1).map(|&d| i64::from(d as i8))),
                        Some(0xE9) => (5, crate::bytes::le_u32(t, 1).map(|d| i64::from(d as i32))),
                        _ => break 'outer,
                    };
                    let Some(disp) = disp else { return Ok(None) };
                    let prefix = (rest.len() - t.len()) as u32;
                    let next = i64::from(at) + i64::from(consumed + prefix + len);
                    let target = next + disp;
                    if target >= i64::from(f.begin) && target < i64::from(f.end) {
                        jumps += 1;
                        if jumps > 4 {
                            return Ok(None);
                        }
                        at = target as u32;
                        continue 'outer;
                    }
                    break 'outer;
                }
                Err(_) => return Ok(None),
            }
        }
    }
    let mut regs = regs;
    for ins in instrs {
        let rsp = regs.rsp();
        match ins {
            FunctionEpilogInstruction::AddSP(n) => {
                let Some(v) = rsp.checked_add(u64::from(n)) else {
                    return Ok(Some(None));
                };
                regs.set(X64Register::RSP, v);
            }
            FunctionEpilogInstruction::AddSPFromFP(n) => {
                let Some(fp) = fpreg else {
                    return Ok(Some(None));
                };
                let Some(v) = regs.get(fp).checked_add(u64::from(n)) else {
                    return Ok(Some(None));
                };
                regs.set(X64Register::RSP, v);
            }
            FunctionEpilogInstruction::Pop(reg) => {
                let Some(v) = read_u64(reader, rsp).await? else {
                    return Ok(Some(None));
                };
                regs.set(reg, v);
                regs.set(X64Register::RSP, rsp.wrapping_add(8));
            }
        }
    }
    Ok(Some(pop_return(reader, regs).await?))
}
