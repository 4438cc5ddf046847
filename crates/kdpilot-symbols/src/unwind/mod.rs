//! Stack walking for x64 and x86 kernels.
//!
//! Each step tries, in order (rust-minidump's fallback chain):
//! 1. the module's unwind data: x64 `.pdata`/`.xdata` through pe-unwind-info's parsers
//!    (chained entries, epilogs, machine frames), x86 FPO / "new FPO" frame data from the PDB;
//! 2. the frame pointer (RBP/EBP chain);
//! 3. a bounded scan of the stack for something that looks like a return address.
//!
//! Every [`Frame`] records how it was found ([`FrameTrust`]). The walk always makes progress
//! (the stack pointer must grow, except across a machine frame, and a (pc, sp) pair is never
//! visited twice) and stops at a depth cap.
//!
//! Image bytes (unwind data, code for epilog and call-site checks) come from the image files
//! attached to the [`ModuleSet`] (from the symbol store), and from target memory only when
//! [`WalkConfig::remote_unwind_info`] allows it and no file is attached.

mod code;
pub mod postfix;
mod x64;
mod x86;

use std::collections::HashSet;
use std::fmt;

use crate::memory::{MemoryReader, ReadError};
use crate::module_set::ModuleSet;

pub use pe_unwind_info::x86_64::Register as X64Register;

/// How a frame was found, from most to least trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FrameTrust {
    /// The registers of the stop (frame 0).
    Context,
    /// x64 unwind information (`.pdata`/`.xdata`), including the leaf rule for functions
    /// without an entry.
    UnwindInfo,
    /// x86 frame data (FPO / program strings) from the PDB.
    FrameData,
    /// x86 code at an exact pc (a stop, or an interrupted instruction): a standard prologue
    /// not yet run, or an epilogue whose pops and `ret` were simulated.
    CodeAnalysis,
    /// The frame pointer chain.
    FramePointer,
    /// A stack scan found a plausible return address.
    Scan,
}

impl FrameTrust {
    /// A short name, as rust-minidump prints trust levels.
    pub fn as_str(self) -> &'static str {
        match self {
            FrameTrust::Context => "context",
            FrameTrust::UnwindInfo => "unwind info",
            FrameTrust::FrameData => "frame data",
            FrameTrust::CodeAnalysis => "code analysis",
            FrameTrust::FramePointer => "frame pointer",
            FrameTrust::Scan => "stack scan",
        }
    }
}

impl fmt::Display for FrameTrust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// x64 integer registers in encoding order (RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8..R15)
/// and RIP.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct X64Registers {
    /// RAX..R15, indexed by [`X64Register`] `as usize`.
    pub gpr: [u64; 16],
    /// RIP.
    pub rip: u64,
}

impl X64Registers {
    /// Registers with only RIP, RSP and RBP known (the rest zero).
    pub fn new(rip: u64, rsp: u64, rbp: u64) -> Self {
        let mut r = X64Registers { gpr: [0; 16], rip };
        r.set(X64Register::RSP, rsp);
        r.set(X64Register::RBP, rbp);
        r
    }

    /// One register.
    pub fn get(&self, reg: X64Register) -> u64 {
        self.gpr[reg as usize & 15]
    }

    /// Sets one register.
    pub fn set(&mut self, reg: X64Register, value: u64) {
        self.gpr[reg as usize & 15] = value;
    }

    /// RSP.
    pub fn rsp(&self) -> u64 {
        self.get(X64Register::RSP)
    }

    /// RBP.
    pub fn rbp(&self) -> u64 {
        self.get(X64Register::RBP)
    }
}

/// x86 integer registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct X86Registers {
    /// EIP.
    pub eip: u32,
    /// ESP.
    pub esp: u32,
    /// EBP.
    pub ebp: u32,
    /// EBX.
    pub ebx: u32,
    /// ESI.
    pub esi: u32,
    /// EDI.
    pub edi: u32,
    /// EAX.
    pub eax: u32,
    /// ECX.
    pub ecx: u32,
    /// EDX.
    pub edx: u32,
}

impl X86Registers {
    /// Registers with only EIP, ESP and EBP known.
    pub fn new(eip: u32, esp: u32, ebp: u32) -> Self {
        X86Registers {
            eip,
            esp,
            ebp,
            ..Default::default()
        }
    }
}

/// The registers a walk starts from, or a frame's recovered registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Registers {
    /// x64.
    X64(X64Registers),
    /// x86.
    X86(X86Registers),
}

impl Registers {
    /// The instruction pointer (x86 addresses sign-extended, as the kernel's are in KD).
    pub fn pc(&self) -> u64 {
        match self {
            Registers::X64(r) => r.rip,
            Registers::X86(r) => sign_extend(r.eip),
        }
    }

    /// The stack pointer.
    pub fn sp(&self) -> u64 {
        match self {
            Registers::X64(r) => r.rsp(),
            Registers::X86(r) => sign_extend(r.esp),
        }
    }

    /// The frame pointer (RBP/EBP).
    pub fn fp(&self) -> u64 {
        match self {
            Registers::X64(r) => r.rbp(),
            Registers::X86(r) => sign_extend(r.ebp),
        }
    }
}

pub(crate) fn sign_extend(v: u32) -> u64 {
    v as i32 as i64 as u64
}

/// One stack frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// The frame's instruction pointer: the stop address for frame 0, a return address (or an
    /// interrupted instruction, after a machine frame) for the others.
    pub pc: u64,
    /// The stack pointer in this frame (WinDbg's Child-SP).
    pub sp: u64,
    /// The frame pointer register's value in this frame.
    pub fp: u64,
    /// How this frame was found.
    pub trust: FrameTrust,
    /// Whether `pc` is a return address (look symbols up at `pc - 1`).
    pub pc_is_return_address: bool,
    /// Where the caller resumes (the next frame's `pc`), once found.
    pub return_address: Option<u64>,
    /// The stack slot the return address was read from.
    pub return_address_slot: Option<u64>,
    /// The words above the return address slot, as `kb` shows them: 4 qwords on x64 (the
    /// caller's home area), 3 dwords on x86 (the first stack arguments). Empty when the slot is
    /// unknown or unreadable.
    pub args: Vec<u64>,
    /// The caller was found through a machine frame (trap or interrupt).
    pub caller_via_machine_frame: bool,
    /// The registers recovered for this frame (nonvolatile ones are exact when found through
    /// unwind data; the others are carried over from the frame below).
    pub registers: Registers,
}

/// Why a walk ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WalkEnd {
    /// A return address of zero: the bottom of the thread's stack.
    Bottom,
    /// No caller could be found (unwind data, frame pointer and scan all failed).
    NoCaller,
    /// The depth cap was reached.
    DepthLimit,
    /// The stack pointer did not grow (or a frame repeated): stopped to guarantee progress.
    NoProgress,
    /// The last frame is outside every known module (user mode, or an unknown module).
    OutsideModules,
}

/// The result of a walk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StackTrace {
    /// Frames, innermost first.
    pub frames: Vec<Frame>,
    /// Why the walk ended.
    pub end: WalkEnd,
}

/// `fffff800`02ccd8e2`: WinDbg's 64-bit address form.
fn windbg64(v: u64) -> String {
    format!("{:08x}`{:08x}", v >> 32, v & 0xFFFF_FFFF)
}

impl StackTrace {
    /// The frames the way WinDbg's `kb` prints them: x64 `Child-SP RetAddr : Args to Child :
    /// Call Site`, x86 `ChildEBP RetAddr Args to Child Call Site`. Call sites are
    /// `module!function+0xoff` (or `module+0xoff`), with `[file @ line]` when `lines` is set.
    pub fn format_kb(&self, modules: &ModuleSet, lines: bool) -> String {
        let x86 = matches!(
            self.frames.first().map(|f| f.registers),
            Some(Registers::X86(_))
        );
        let mut out = String::new();
        if x86 {
            out.push_str(" # ChildEBP RetAddr  Args to Child              \n");
        } else {
            out.push_str(" # Child-SP          RetAddr               : Args to Child                                                           : Call Site\n");
        }
        let locations = modules.describe_all(
            &self
                .frames
                .iter()
                .map(|f| (f.pc, f.pc_is_return_address))
                .collect::<Vec<_>>(),
        );
        for (i, (f, loc)) in self.frames.iter().zip(locations).enumerate() {
            let site = if lines {
                loc.with_source()
            } else {
                loc.to_string()
            };
            let ra = f.return_address.unwrap_or(0);
            if x86 {
                let mut args: Vec<String> = f
                    .args
                    .iter()
                    .map(|a| format!("{:08x}", *a as u32))
                    .collect();
                args.resize(3, "????????".into());
                out.push_str(&format!(
                    "{i:02x} {:08x} {:08x} {} {site}\n",
                    f.fp as u32,
                    ra as u32,
                    args.join(" ")
                ));
            } else {
                let mut args: Vec<String> = f.args.iter().map(|a| windbg64(*a)).collect();
                args.resize(4, "????????`????????".into());
                out.push_str(&format!(
                    "{i:02x} {} {}     : {} : {site}\n",
                    windbg64(f.sp),
                    windbg64(ra),
                    args.join(" ")
                ));
            }
        }
        out
    }
}

/// Walk limits and choices.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalkConfig {
    /// The most frames returned.
    pub max_frames: usize,
    /// How far above the stack pointer a scan looks, in bytes.
    pub scan_bytes: u64,
    /// Bytes of stack read at the start in one go (a warm-up for a [`CachedReader`](crate::CachedReader)).
    pub initial_stack_read: usize,
    /// Read unwind data and code bytes from target memory for modules without a local image
    /// file. Costs reads over the link; off means such modules fall back to frame pointers and
    /// scans.
    pub remote_unwind_info: bool,
    /// The most machine frames (trap frames) followed.
    pub max_machine_frames: usize,
}

impl Default for WalkConfig {
    fn default() -> Self {
        WalkConfig {
            max_frames: 256,
            scan_bytes: 0x400,
            initial_stack_read: 0x400,
            remote_unwind_info: true,
            max_machine_frames: 8,
        }
    }
}

/// What one unwind step found for the caller.
pub(crate) struct Step {
    pub regs: Registers,
    pub trust: FrameTrust,
    pub ra_slot: Option<u64>,
    pub machine_frame: bool,
}

/// Walks stacks over a [`ModuleSet`].
#[derive(Clone, Debug)]
pub struct StackWalker<'m> {
    modules: &'m ModuleSet,
    config: WalkConfig,
}

impl<'m> StackWalker<'m> {
    /// A walker over `modules` with the default configuration.
    pub fn new(modules: &'m ModuleSet) -> Self {
        Self::with_config(modules, WalkConfig::default())
    }

    /// A walker over `modules`.
    pub fn with_config(modules: &'m ModuleSet, config: WalkConfig) -> Self {
        StackWalker { modules, config }
    }

    /// Walks the stack starting from `registers`, reading the stack through `reader` (use a
    /// [`CachedReader`](crate::CachedReader): the walk reads word by word). Fails only when
    /// the reader fails; unreadable memory ends the walk normally.
    pub async fn walk<R: MemoryReader>(
        &self,
        reader: &mut R,
        registers: Registers,
    ) -> Result<StackTrace, ReadError> {
        let sp0 = registers.sp();
        if self.config.initial_stack_read > 0 {
            code::soft(reader.read(sp0, self.config.initial_stack_read).await)?;
        }
        let mut frames = vec![Frame {
            pc: registers.pc(),
            sp: sp0,
            fp: registers.fp(),
            trust: FrameTrust::Context,
            pc_is_return_address: false,
            return_address: None,
            return_address_slot: None,
            args: Vec::new(),
            caller_via_machine_frame: false,
            registers,
        }];
        let mut seen = HashSet::new();
        seen.insert((registers.pc(), sp0));
        let mut machine_frames = 0;
        let end = loop {
            let Some(cur) = frames.last() else {
                break WalkEnd::NoCaller;
            };
            if frames.len() >= self.config.max_frames.max(1) {
                break WalkEnd::DepthLimit;
            }
            if cur.trust != FrameTrust::Context && self.modules.find(cur.pc).is_none() {
                break WalkEnd::OutsideModules;
            }
            let callee_params = match frames.len() {
                1 => 0,
                n => frames
                    .get(n - 2)
                    .map(|f| x86::params_size(self.modules, f))
                    .unwrap_or(0),
            };
            let step = match cur.registers {
                Registers::X64(r) => x64::step(self.modules, &self.config, reader, cur, r).await?,
                Registers::X86(r) => {
                    x86::step(self.modules, &self.config, reader, cur, r, callee_params).await?
                }
            };
            let Some(step) = step else {
                break WalkEnd::NoCaller;
            };
            let pc = step.regs.pc();
            let sp = step.regs.sp();
            if pc == 0 {
                // The thread's first frame: `kb` still shows its (zero) return address and
                // the words above it.
                let args = match step.ra_slot {
                    Some(slot) => read_args(reader, &step.regs, slot).await?,
                    None => Vec::new(),
                };
                if let Some(last) = frames.last_mut() {
                    last.return_address = Some(0);
                    last.return_address_slot = step.ra_slot;
                    last.args = args;
                }
                break WalkEnd::Bottom;
            }
            if step.machine_frame {
                machine_frames += 1;
                if machine_frames > self.config.max_machine_frames {
                    break WalkEnd::NoProgress;
                }
            } else if sp <= cur.sp {
                break WalkEnd::NoProgress;
            }
            if !seen.insert((pc, sp)) {
                break WalkEnd::NoProgress;
            }
            let args = match step.ra_slot {
                Some(slot) => read_args(reader, &step.regs, slot).await?,
                None => Vec::new(),
            };
            if let Some(last) = frames.last_mut() {
                last.return_address = Some(pc);
                last.return_address_slot = step.ra_slot;
                last.args = args;
                last.caller_via_machine_frame = step.machine_frame;
            }
            frames.push(Frame {
                pc,
                sp,
                fp: step.regs.fp(),
                trust: step.trust,
                pc_is_return_address: !step.machine_frame,
                return_address: None,
                return_address_slot: None,
                args: Vec::new(),
                caller_via_machine_frame: false,
                registers: step.regs,
            });
        };
        Ok(StackTrace { frames, end })
    }
}

/// The `kb` words above the return address slot.
async fn read_args<R: MemoryReader>(
    reader: &mut R,
    regs: &Registers,
    slot: u64,
) -> Result<Vec<u64>, ReadError> {
    let (width, count) = match regs {
        Registers::X64(_) => (8usize, 4usize),
        Registers::X86(_) => (4, 3),
    };
    let Some(bytes) = code::soft(
        reader
            .read(slot.wrapping_add(width as u64), width * count)
            .await,
    )?
    else {
        return Ok(Vec::new());
    };
    Ok(bytes
        .chunks_exact(width)
        .map(|c| match width {
            8 => crate::bytes::le_u64(c, 0).unwrap_or(0),
            _ => u64::from(crate::bytes::le_u32(c, 0).unwrap_or(0)),
        })
        .collect())
}

/// Bytes of stack read at once when a word is missing.
pub const STACK_WINDOW: usize = 256;

/// Reads a word of the given width; `None` when unreadable.
///
/// Stack words are read in windows of [`STACK_WINDOW`] bytes (never past the page end, so an
/// unmapped next page is not probed): the walk goes on upward, and a [`CachedReader`](crate::CachedReader)
/// serves the next words from the window.
pub(crate) async fn read_word<R: MemoryReader>(
    reader: &mut R,
    address: u64,
    width: usize,
) -> Result<Option<u64>, ReadError> {
    let to_page_end = crate::memory::PAGE_SIZE - (address % crate::memory::PAGE_SIZE);
    let window = (STACK_WINDOW as u64).min(to_page_end).max(width as u64) as usize;
    let Some(b) = code::soft(reader.read(address, window).await)? else {
        return Ok(None);
    };
    Ok(match width {
        8 => crate::bytes::le_u64(&b, 0),
        _ => crate::bytes::le_u32(&b, 0).map(u64::from),
    })
}

/// Scans upward from `from` for a plausible return address; returns (slot, value).
pub(crate) async fn scan<R: MemoryReader>(
    modules: &ModuleSet,
    reader: &mut R,
    from: u64,
    limit: u64,
    width: usize,
) -> Result<Option<(u64, u64)>, ReadError> {
    let w = width as u64;
    let start = from.wrapping_add(w - 1) & !(w - 1);
    let mut off = 0;
    while off < limit {
        let slot = start.wrapping_add(off);
        if slot < start {
            break;
        }
        let Some(v) = read_word(reader, slot, width).await? else {
            break;
        };
        let v = if width == 4 { sign_extend(v as u32) } else { v };
        if code::looks_like_return_address(modules, v) {
            return Ok(Some((slot, v)));
        }
        off += w;
    }
    Ok(None)
}
