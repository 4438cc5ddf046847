//! Stack frames as the compiled code would leave them: the simulator builds the stack and the
//! registers of a thread that called down a path of functions, from the images' own unwind
//! information (x64 `.pdata`/`.xdata`), so that a correct unwinder recovers exactly that path.
//!
//! The prologue of each function is *executed forward* from its UNWIND_CODEs, the inverse of
//! what RtlVirtualUnwind does backwards:
//! - codes are stored in reverse prologue order, so they run last-to-first, and a chained
//!   entry's parent prologue runs before the fragment's own codes;
//! - PUSH_NONVOL stores the register at the new RSP; ALLOC_SMALL/LARGE lower RSP;
//! - SET_FPREG sets the frame register to RSP + 16 * FrameOffset;
//! - SAVE_NONVOL/SAVE_XMM128 store at `frame base + offset`, where the frame base is RSP after
//!   the whole fixed prologue, or, when a frame register is used, the RSP at SET_FPREG
//!   (RtlVirtualUnwind computes its "establisher frame" the same way).
//!
//! This parser is written separately from the client's unwinder on purpose: the two must agree
//! through the compiled code, not by sharing a mistake.

use kdpilot_kd::context::{Amd64Reg, Context};
use kdpilot_kd::Arch;

use crate::memory::Memory;

/// Why a frame could not be built.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A structure was outside the mapped image.
    #[error("{0} is not readable in the mapped image")]
    Unreadable(&'static str),
    /// No RUNTIME_FUNCTION covers the address.
    #[error("no unwind information covers {0:#x}")]
    NoUnwindInfo(u64),
    /// An unwind code the forward executor does not support on a call path.
    #[error("unsupported unwind code {op} in the function at {function:#x}")]
    Unsupported {
        /// UWOP number.
        op: u8,
        /// Function start.
        function: u64,
    },
    /// The return address is not inside the function it should return into.
    #[error("return address {return_address:#x} is not in the function at {function:#x}")]
    CallSiteOutside {
        /// The function.
        function: u64,
        /// The return address.
        return_address: u64,
    },
    /// Chained unwind information nests too deeply (corrupt or hostile).
    #[error("unwind chain too deep at {0:#x}")]
    ChainTooDeep(u64),
}

/// An image mapped in simulated memory, seen through its PE headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MappedImage {
    /// Load address.
    pub base: u64,
    /// SizeOfImage.
    pub size: u32,
}

impl MappedImage {
    /// Whether `va` lies inside the image.
    pub fn contains(&self, va: u64) -> bool {
        va >= self.base && va < self.base + u64::from(self.size)
    }

    fn u32_at(mem: &Memory, va: u64, what: &'static str) -> Result<u32, FrameError> {
        let b = mem.read(va, 4);
        let a: [u8; 4] = b.try_into().map_err(|_| FrameError::Unreadable(what))?;
        Ok(u32::from_le_bytes(a))
    }

    /// The exception directory (RVA, size) from the mapped PE headers.
    fn exception_directory(&self, mem: &Memory) -> Result<(u32, u32), FrameError> {
        let e_lfanew = Self::u32_at(mem, self.base + 0x3C, "e_lfanew")?;
        let nt = self.base + u64::from(e_lfanew);
        // PE32+ optional header: data directories start at 0x70 into it; the optional header
        // starts 0x18 after the NT signature. Entry 3 is the exception directory.
        let dir = nt + 0x18 + 0x70 + 3 * 8;
        Ok((
            Self::u32_at(mem, dir, "exception directory")?,
            Self::u32_at(mem, dir + 4, "exception directory size")?,
        ))
    }

    /// The RUNTIME_FUNCTION (begin, end, unwind info RVA) covering `va`.
    fn runtime_function(&self, mem: &Memory, va: u64) -> Result<(u32, u32, u32), FrameError> {
        let (rva, size) = self.exception_directory(mem)?;
        let rel = va
            .checked_sub(self.base)
            .ok_or(FrameError::NoUnwindInfo(va))?;
        let count = (size / 12).min(100_000);
        // The table is sorted by BeginAddress: binary search.
        let (mut lo, mut hi) = (0u32, count);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let at = self.base + u64::from(rva) + u64::from(mid) * 12;
            let begin = Self::u32_at(mem, at, "RUNTIME_FUNCTION")?;
            let end = Self::u32_at(mem, at + 4, "RUNTIME_FUNCTION")?;
            if rel < u64::from(begin) {
                hi = mid;
            } else if rel >= u64::from(end) {
                lo = mid + 1;
            } else {
                let unwind = Self::u32_at(mem, at + 8, "RUNTIME_FUNCTION")?;
                return Ok((begin, end, unwind));
            }
        }
        Err(FrameError::NoUnwindInfo(va))
    }
}

/// One prologue operation, in execution order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PrologOp {
    Push(u8),
    Alloc(u32),
    SetFp { reg: u8, offset: u32 },
    SaveNonvol { reg: u8, offset: u32 },
    SaveXmm { offset: u32 },
}

/// The prologue of the function containing `va`, in execution order, with the start of the
/// primary function (for code in a chained fragment, the function it was split from).
fn prologue(
    mem: &Memory,
    image: &MappedImage,
    va: u64,
) -> Result<(u64, Vec<PrologOp>), FrameError> {
    let (begin, _end, mut unwind_rva) = image.runtime_function(mem, va)?;
    let mut function = image.base + u64::from(begin);
    // Each UNWIND_INFO's codes, outermost chain link last; executed in reverse.
    let mut chain: Vec<Vec<PrologOp>> = Vec::new();
    for _ in 0..32 {
        let at = image.base + u64::from(unwind_rva);
        let head = mem.read(at, 4);
        let [ver_flags, _size_of_prolog, count, frame] =
            <[u8; 4]>::try_from(head).map_err(|_| FrameError::Unreadable("UNWIND_INFO"))?;
        let flags = ver_flags >> 3;
        let frame_reg = frame & 0x0F;
        let frame_off = u32::from(frame >> 4) * 16;
        let slots: Vec<u16> = mem
            .read(at + 4, usize::from(count) * 2)
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        if slots.len() != usize::from(count) {
            return Err(FrameError::Unreadable("UNWIND_CODE array"));
        }
        let slot = |i: usize| {
            slots
                .get(i)
                .copied()
                .map(u32::from)
                .ok_or(FrameError::Unreadable("UNWIND_CODE operand"))
        };
        let mut ops = Vec::new();
        let mut i = 0usize;
        while i < slots.len() {
            let code = slots.get(i).copied().unwrap_or(0);
            let op = ((code >> 8) & 0x0F) as u8;
            let info = (code >> 12) as u8;
            match op {
                0 => {
                    ops.push(PrologOp::Push(info));
                    i += 1;
                }
                1 if info == 0 => {
                    ops.push(PrologOp::Alloc(slot(i + 1)? * 8));
                    i += 2;
                }
                1 => {
                    ops.push(PrologOp::Alloc(slot(i + 1)? | (slot(i + 2)? << 16)));
                    i += 3;
                }
                2 => {
                    ops.push(PrologOp::Alloc(u32::from(info) * 8 + 8));
                    i += 1;
                }
                3 => {
                    ops.push(PrologOp::SetFp {
                        reg: frame_reg,
                        offset: frame_off,
                    });
                    i += 1;
                }
                4 => {
                    ops.push(PrologOp::SaveNonvol {
                        reg: info,
                        offset: slot(i + 1)? * 8,
                    });
                    i += 2;
                }
                5 => {
                    ops.push(PrologOp::SaveNonvol {
                        reg: info,
                        offset: slot(i + 1)? | (slot(i + 2)? << 16),
                    });
                    i += 3;
                }
                6 => i += 2, // UWOP_EPILOG (version 2): describes epilogs, not the prologue.
                8 => {
                    ops.push(PrologOp::SaveXmm {
                        offset: slot(i + 1)? * 16,
                    });
                    i += 2;
                }
                9 => {
                    ops.push(PrologOp::SaveXmm {
                        offset: slot(i + 1)? | (slot(i + 2)? << 16),
                    });
                    i += 3;
                }
                other => {
                    return Err(FrameError::Unsupported {
                        op: other,
                        function,
                    })
                }
            }
        }
        ops.reverse();
        chain.push(ops);
        if flags & 0x4 == 0 {
            break;
        }
        // UNW_FLAG_CHAININFO: a RUNTIME_FUNCTION of the parent follows the (even-padded) codes.
        let parent = at + 4 + (u64::from(count) + u64::from(count) % 2) * 2;
        function = image.base
            + u64::from(MappedImage::u32_at(
                mem,
                parent,
                "chained RUNTIME_FUNCTION",
            )?);
        unwind_rva = MappedImage::u32_at(mem, parent + 8, "chained RUNTIME_FUNCTION")?;
        if chain.len() >= 32 {
            return Err(FrameError::ChainTooDeep(va));
        }
    }
    // The parent's prologue ran first.
    let ops = chain.into_iter().rev().flatten().collect();
    Ok((function, ops))
}

/// One function on a call path: where it is entered, and (for every function but the last)
/// the return address of the call it makes to the next one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PathStep {
    /// The function's entry point.
    pub function: u64,
    /// The image the function is in.
    pub image: MappedImage,
    /// Return address of this function's call to the next step (ignored for the last step).
    pub return_address: u64,
    /// Extra stack a frame-pointer function allocated dynamically (alloca) before the call:
    /// below the fixed frame, found only through the frame register.
    pub dynamic_alloc: u32,
}

/// What one synthesized frame looks like, for ground truth and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuiltFrame {
    /// The function.
    pub function: u64,
    /// RSP at the function's entry (pointing at its return address).
    pub entry_sp: u64,
    /// The return address stored at `entry_sp` (0 for the outermost frame).
    pub return_address: u64,
}

/// Builds the stack of a thread that called along `path` (outermost first) and is now at the
/// entry of the last step. Writes the stack into `mem` below `stack_top` and returns the
/// register context at that entry plus the frames, innermost first.
///
/// `values` seeds the nonvolatile registers: each frame gives the registers it saved new
/// values, as code that saves a register does, so the unwinder's register recovery is tested.
pub fn build_amd64(
    mem: &mut Memory,
    path: &[PathStep],
    stack_top: u64,
    mut values: impl FnMut() -> u64,
) -> Result<(Context, Vec<BuiltFrame>), FrameError> {
    let mut ctx = Context::zeroed(Arch::Amd64);
    for r in [
        Amd64Reg::Rbx,
        Amd64Reg::Rbp,
        Amd64Reg::Rsi,
        Amd64Reg::Rdi,
        Amd64Reg::R12,
        Amd64Reg::R13,
        Amd64Reg::R14,
        Amd64Reg::R15,
    ] {
        set(&mut ctx, r, values());
    }
    // At a function's entry RSP is 8 below a 16-byte boundary (the return address was pushed).
    let mut rsp = (stack_top & !0xF) - 8;
    mem.write(rsp, &0u64.to_le_bytes());
    let mut frames = Vec::with_capacity(path.len());
    let mut return_address = 0u64;
    for (i, step) in path.iter().enumerate() {
        frames.push(BuiltFrame {
            function: step.function,
            entry_sp: rsp,
            return_address,
        });
        if i + 1 == path.len() {
            break;
        }
        // The call site lies in the RUNTIME_FUNCTION that contains the return address - 1.
        let (start, ops) = prologue(mem, &step.image, step.return_address - 1)?;
        if start != step.function {
            return Err(FrameError::CallSiteOutside {
                function: step.function,
                return_address: step.return_address,
            });
        }
        let mut saved = Vec::new();
        let mut fp_base = None;
        for op in &ops {
            match *op {
                PrologOp::Push(reg) => {
                    rsp -= 8;
                    let v = get_n(&ctx, reg);
                    mem.write(rsp, &v.to_le_bytes());
                    saved.push(reg);
                }
                PrologOp::Alloc(n) => rsp -= u64::from(n),
                PrologOp::SetFp { reg, offset } => {
                    set_n(&mut ctx, reg, rsp + u64::from(offset));
                    fp_base = Some(rsp);
                }
                PrologOp::SaveNonvol { .. } | PrologOp::SaveXmm { .. } => {}
            }
        }
        let frame_base = fp_base.unwrap_or(rsp);
        for op in &ops {
            match *op {
                PrologOp::SaveNonvol { reg, offset } => {
                    let v = get_n(&ctx, reg);
                    mem.write(frame_base + u64::from(offset), &v.to_le_bytes());
                    saved.push(reg);
                }
                PrologOp::SaveXmm { offset } => {
                    mem.write(frame_base + u64::from(offset), &[0x5A; 16]);
                }
                _ => {}
            }
        }
        // The body now uses the registers it saved (but not the frame register).
        let fp_reg = ops.iter().find_map(|o| match o {
            PrologOp::SetFp { reg, .. } => Some(*reg),
            _ => None,
        });
        for reg in saved {
            if Some(reg) != fp_reg && reg != 4 {
                set_n(&mut ctx, reg, values());
            }
        }
        if fp_reg.is_some() {
            rsp -= u64::from(step.dynamic_alloc);
        }
        // The call.
        return_address = step.return_address;
        rsp -= 8;
        mem.write(rsp, &return_address.to_le_bytes());
    }
    let last = path.last().map(|s| s.function).unwrap_or(0);
    ctx.set_pc(last);
    ctx.set_sp(rsp);
    frames.reverse();
    Ok((ctx, frames))
}

fn reg_n(n: u8) -> Amd64Reg {
    Amd64Reg::gpr(n & 0xF).unwrap_or(Amd64Reg::Rax)
}

fn get_n(ctx: &Context, n: u8) -> u64 {
    match ctx {
        Context::Amd64(c) => c.get(reg_n(n)),
        Context::X86(_) => 0,
    }
}

fn set_n(ctx: &mut Context, n: u8, v: u64) {
    set(ctx, reg_n(n), v);
}

fn set(ctx: &mut Context, r: Amd64Reg, v: u64) {
    if let Context::Amd64(c) = ctx {
        c.set(r, v);
    }
}
