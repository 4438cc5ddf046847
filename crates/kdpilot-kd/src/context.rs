//! CONTEXT structures (kd-protocol.md 2.6): the register file GetContext returns.
//!
//! Both layouts are kept as the raw bytes the target sent ([`Amd64Context`]: 1232 bytes,
//! [`X86Context`]: 716 bytes) with register access by enum at the sheet's offsets, so a context
//! read from a target writes back byte for byte with SetContext, floating-point and vector
//! state included.

use crate::wire::bytes::{Fields, FieldsMut};
use crate::{Arch, PayloadError};

/// Size of the AMD64 CONTEXT.
pub const AMD64_CONTEXT_SIZE: usize = 1232;
/// Size of the x86 CONTEXT.
pub const X86_CONTEXT_SIZE: usize = 716;

/// ContextFlags bits.
pub mod flags {
    /// CONTEXT_AMD64: the architecture bit of every AMD64 flag.
    pub const AMD64: u32 = 0x0010_0000;
    /// CONTEXT_i386: the architecture bit of every x86 flag.
    pub const I386: u32 = 0x0001_0000;
    /// Control registers (RIP/EIP, RSP/ESP, EFlags, CS, SS; x86 also EBP).
    pub const CONTROL: u32 = 0x1;
    /// Integer registers.
    pub const INTEGER: u32 = 0x2;
    /// Segment registers.
    pub const SEGMENTS: u32 = 0x4;
    /// Floating point state.
    pub const FLOATING_POINT: u32 = 0x8;
    /// Debug registers.
    pub const DEBUG_REGISTERS: u32 = 0x10;
    /// x86 only: FXSAVE area (ExtendedRegisters).
    pub const EXTENDED_REGISTERS: u32 = 0x20;
}

/// A byte range of a CONTEXT, as DBGKD_CONTEXT_EX (GetContextEx/SetContextEx) names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ContextRange {
    /// First byte, from the start of the CONTEXT.
    pub offset: u32,
    /// Number of bytes.
    pub byte_count: u32,
}

impl ContextRange {
    /// The whole CONTEXT of `arch`.
    pub fn full(arch: Arch) -> Self {
        Self {
            offset: 0,
            byte_count: arch.context_size() as u32,
        }
    }

    /// The smallest range that holds every register in `regs` (`None` for an empty list).
    pub fn for_amd64(regs: &[Amd64Reg]) -> Option<Self> {
        Self::covering(regs.iter().map(|r| (r.offset(), r.size())))
    }

    /// The smallest range that holds every register in `regs` (`None` for an empty list).
    pub fn for_x86(regs: &[X86Reg]) -> Option<Self> {
        Self::covering(regs.iter().map(|r| (r.offset(), r.size())))
    }

    /// The range holding the program counter, stack pointer and frame pointer: AMD64
    /// Rsp..Rip (0x98, 0x68 bytes: also Rsi, Rdi, R8-R15), x86 Ebp..SegSs (0xB4, 0x14 bytes:
    /// Ebp, Eip, SegCs, EFlags, Esp).
    pub fn pc_sp_fp(arch: Arch) -> Self {
        let r = match arch {
            Arch::Amd64 => Self::for_amd64(&[Amd64Reg::Rsp, Amd64Reg::Rbp, Amd64Reg::Rip]),
            Arch::X86 => Self::for_x86(&[X86Reg::Ebp, X86Reg::Eip, X86Reg::Esp]),
        };
        r.unwrap_or(Self::full(arch))
    }

    /// One past the last byte.
    pub fn end(&self) -> u64 {
        u64::from(self.offset) + u64::from(self.byte_count)
    }

    /// Whether the range lies inside a CONTEXT of `arch`.
    pub fn fits(&self, arch: Arch) -> bool {
        self.end() <= arch.context_size() as u64
    }

    fn covering(mut it: impl Iterator<Item = (usize, usize)>) -> Option<Self> {
        let (o, s) = it.next()?;
        let (lo, hi) = it.fold((o, o + s), |(lo, hi), (o, s)| (lo.min(o), hi.max(o + s)));
        Some(Self {
            offset: lo as u32,
            byte_count: (hi - lo) as u32,
        })
    }
}

macro_rules! regs {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $v:ident = ($off:expr, $size:expr, $label:expr)),* $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vdoc])* $v,)*
        }

        impl $name {
            /// Every register, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$v),*];

            /// Byte offset in the CONTEXT.
            pub fn offset(self) -> usize {
                match self { $($name::$v => $off,)* }
            }

            /// Width in bytes (2, 4 or 8).
            pub fn size(self) -> usize {
                match self { $($name::$v => $size,)* }
            }

            /// Lower-case name as WinDbg prints it.
            pub fn name(self) -> &'static str {
                match self { $($name::$v => $label,)* }
            }

            /// Looks a register up by its (case-insensitive) name.
            pub fn from_name(name: &str) -> Option<Self> {
                Self::ALL.iter().copied().find(|r| r.name().eq_ignore_ascii_case(name))
            }
        }
    };
}

regs!(
    /// An AMD64 CONTEXT field.
    Amd64Reg {
        /// ContextFlags @0x30.
        ContextFlags = (0x30, 4, "contextflags"),
        /// MxCsr @0x34.
        MxCsr = (0x34, 4, "mxcsr"),
        /// SegCs @0x38.
        SegCs = (0x38, 2, "cs"),
        /// SegDs @0x3A.
        SegDs = (0x3A, 2, "ds"),
        /// SegEs @0x3C.
        SegEs = (0x3C, 2, "es"),
        /// SegFs @0x3E.
        SegFs = (0x3E, 2, "fs"),
        /// SegGs @0x40.
        SegGs = (0x40, 2, "gs"),
        /// SegSs @0x42.
        SegSs = (0x42, 2, "ss"),
        /// EFlags @0x44.
        EFlags = (0x44, 4, "efl"),
        /// Dr0 @0x48.
        Dr0 = (0x48, 8, "dr0"),
        /// Dr1 @0x50.
        Dr1 = (0x50, 8, "dr1"),
        /// Dr2 @0x58.
        Dr2 = (0x58, 8, "dr2"),
        /// Dr3 @0x60.
        Dr3 = (0x60, 8, "dr3"),
        /// Dr6 @0x68.
        Dr6 = (0x68, 8, "dr6"),
        /// Dr7 @0x70.
        Dr7 = (0x70, 8, "dr7"),
        /// Rax @0x78.
        Rax = (0x78, 8, "rax"),
        /// Rcx @0x80.
        Rcx = (0x80, 8, "rcx"),
        /// Rdx @0x88.
        Rdx = (0x88, 8, "rdx"),
        /// Rbx @0x90.
        Rbx = (0x90, 8, "rbx"),
        /// Rsp @0x98.
        Rsp = (0x98, 8, "rsp"),
        /// Rbp @0xA0.
        Rbp = (0xA0, 8, "rbp"),
        /// Rsi @0xA8.
        Rsi = (0xA8, 8, "rsi"),
        /// Rdi @0xB0.
        Rdi = (0xB0, 8, "rdi"),
        /// R8 @0xB8.
        R8 = (0xB8, 8, "r8"),
        /// R9 @0xC0.
        R9 = (0xC0, 8, "r9"),
        /// R10 @0xC8.
        R10 = (0xC8, 8, "r10"),
        /// R11 @0xD0.
        R11 = (0xD0, 8, "r11"),
        /// R12 @0xD8.
        R12 = (0xD8, 8, "r12"),
        /// R13 @0xE0.
        R13 = (0xE0, 8, "r13"),
        /// R14 @0xE8.
        R14 = (0xE8, 8, "r14"),
        /// R15 @0xF0.
        R15 = (0xF0, 8, "r15"),
        /// Rip @0xF8.
        Rip = (0xF8, 8, "rip"),
        /// DebugControl @0x4A8.
        DebugControl = (0x4A8, 8, "debugcontrol"),
        /// LastBranchToRip @0x4B0.
        LastBranchToRip = (0x4B0, 8, "lastbranchtorip"),
        /// LastBranchFromRip @0x4B8.
        LastBranchFromRip = (0x4B8, 8, "lastbranchfromrip"),
        /// LastExceptionToRip @0x4C0.
        LastExceptionToRip = (0x4C0, 8, "lastexceptiontorip"),
        /// LastExceptionFromRip @0x4C8.
        LastExceptionFromRip = (0x4C8, 8, "lastexceptionfromrip"),
    }
);

impl Amd64Reg {
    /// The 16 general registers in the x64 encoding order (RAX=0 .. R15=15), the numbering
    /// UNWIND_CODE operands and instruction encodings use.
    pub const GPR_ORDER: [Amd64Reg; 16] = [
        Amd64Reg::Rax,
        Amd64Reg::Rcx,
        Amd64Reg::Rdx,
        Amd64Reg::Rbx,
        Amd64Reg::Rsp,
        Amd64Reg::Rbp,
        Amd64Reg::Rsi,
        Amd64Reg::Rdi,
        Amd64Reg::R8,
        Amd64Reg::R9,
        Amd64Reg::R10,
        Amd64Reg::R11,
        Amd64Reg::R12,
        Amd64Reg::R13,
        Amd64Reg::R14,
        Amd64Reg::R15,
    ];

    /// The general register with encoding number `n` (0..15).
    pub fn gpr(n: u8) -> Option<Amd64Reg> {
        Self::GPR_ORDER.get(usize::from(n)).copied()
    }
}

regs!(
    /// An x86 CONTEXT field.
    X86Reg {
        /// ContextFlags @0.
        ContextFlags = (0x00, 4, "contextflags"),
        /// Dr0 @4.
        Dr0 = (0x04, 4, "dr0"),
        /// Dr1 @8.
        Dr1 = (0x08, 4, "dr1"),
        /// Dr2 @0xC.
        Dr2 = (0x0C, 4, "dr2"),
        /// Dr3 @0x10.
        Dr3 = (0x10, 4, "dr3"),
        /// Dr6 @0x14.
        Dr6 = (0x14, 4, "dr6"),
        /// Dr7 @0x18.
        Dr7 = (0x18, 4, "dr7"),
        /// SegGs @0x8C.
        SegGs = (0x8C, 4, "gs"),
        /// SegFs @0x90.
        SegFs = (0x90, 4, "fs"),
        /// SegEs @0x94.
        SegEs = (0x94, 4, "es"),
        /// SegDs @0x98.
        SegDs = (0x98, 4, "ds"),
        /// Edi @0x9C.
        Edi = (0x9C, 4, "edi"),
        /// Esi @0xA0.
        Esi = (0xA0, 4, "esi"),
        /// Ebx @0xA4.
        Ebx = (0xA4, 4, "ebx"),
        /// Edx @0xA8.
        Edx = (0xA8, 4, "edx"),
        /// Ecx @0xAC.
        Ecx = (0xAC, 4, "ecx"),
        /// Eax @0xB0.
        Eax = (0xB0, 4, "eax"),
        /// Ebp @0xB4.
        Ebp = (0xB4, 4, "ebp"),
        /// Eip @0xB8.
        Eip = (0xB8, 4, "eip"),
        /// SegCs @0xBC.
        SegCs = (0xBC, 4, "cs"),
        /// EFlags @0xC0.
        EFlags = (0xC0, 4, "efl"),
        /// Esp @0xC4.
        Esp = (0xC4, 4, "esp"),
        /// SegSs @0xC8.
        SegSs = (0xC8, 4, "ss"),
    }
);

fn read_reg(bytes: &[u8], what: &'static str, off: usize, size: usize) -> u64 {
    let f = Fields::new(bytes, what);
    let v = match size {
        2 => f.u16(off).map(u64::from),
        4 => f.u32(off).map(u64::from),
        _ => f.u64(off),
    };
    // Offsets are constants inside the fixed-size arrays, so this cannot fail.
    v.unwrap_or(0)
}

fn write_reg(bytes: &mut [u8], off: usize, size: usize, value: u64) {
    let mut w = FieldsMut::new(bytes);
    match size {
        2 => w.u16(off, value as u16),
        4 => w.u32(off, value as u32),
        _ => w.u64(off, value),
    }
}

/// Copies `src` into `dst` at `offset`, clipped to `dst`; returns the bytes copied.
fn apply(dst: &mut [u8], offset: usize, src: &[u8]) -> usize {
    let Some(tail) = dst.get_mut(offset..) else {
        return 0;
    };
    let n = tail.len().min(src.len());
    if let (Some(d), Some(s)) = (tail.get_mut(..n), src.get(..n)) {
        d.copy_from_slice(s);
    }
    n
}

macro_rules! context_type {
    ($(#[$doc:meta])* $name:ident, $reg:ident, $size:expr, $what:expr, $arch:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq)]
        pub struct $name {
            bytes: Box<[u8; $size]>,
        }

        impl Default for $name {
            fn default() -> Self {
                Self::zeroed()
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                let mut d = f.debug_struct(stringify!($name));
                for r in $reg::ALL {
                    d.field(r.name(), &format_args!("{:#x}", self.get(*r)));
                }
                d.finish_non_exhaustive()
            }
        }

        impl $name {
            /// Size in bytes.
            pub const SIZE: usize = $size;

            /// An all-zero context.
            pub fn zeroed() -> Self {
                Self { bytes: Box::new([0u8; $size]) }
            }

            /// Parses the first [`Self::SIZE`] bytes of `bytes` (anything after is ignored).
            pub fn parse(bytes: &[u8]) -> Result<Self, PayloadError> {
                let f = Fields::new(bytes, $what);
                Ok(Self { bytes: Box::new(f.bytes_at::<$size>(0)?) })
            }

            /// The raw CONTEXT bytes.
            pub fn as_bytes(&self) -> &[u8; $size] {
                &self.bytes
            }

            /// The raw CONTEXT bytes, writable (floating point, vector state...).
            pub fn as_bytes_mut(&mut self) -> &mut [u8; $size] {
                &mut self.bytes
            }

            /// A register, zero-extended to 64 bits.
            pub fn get(&self, reg: $reg) -> u64 {
                read_reg(self.bytes.as_slice(), $what, reg.offset(), reg.size())
            }

            /// Sets a register; the value is truncated to the register's width.
            pub fn set(&mut self, reg: $reg, value: u64) {
                write_reg(self.bytes.as_mut_slice(), reg.offset(), reg.size(), value)
            }

            /// Copies a partial CONTEXT (a GetContextEx reply) in at `offset`; bytes past the
            /// end are dropped. Returns the number of bytes copied.
            pub fn apply_partial(&mut self, offset: u32, bytes: &[u8]) -> usize {
                apply(self.bytes.as_mut_slice(), offset as usize, bytes)
            }

            /// The bytes of `range`, clipped to the CONTEXT (for SetContextEx).
            pub fn range_bytes(&self, range: ContextRange) -> &[u8] {
                let start = (range.offset as usize).min($size);
                let end = (range.end().min($size as u64)) as usize;
                self.bytes.get(start..end).unwrap_or(&[])
            }

            /// The architecture of this layout.
            pub fn arch(&self) -> Arch {
                $arch
            }
        }
    };
}

context_type!(
    /// AMD64 CONTEXT: 1232 bytes, raw, with register access at the sheet's offsets.
    Amd64Context,
    Amd64Reg,
    AMD64_CONTEXT_SIZE,
    "AMD64 CONTEXT",
    Arch::Amd64
);

context_type!(
    /// x86 CONTEXT: 716 bytes, raw, with register access at the sheet's offsets.
    X86Context,
    X86Reg,
    X86_CONTEXT_SIZE,
    "x86 CONTEXT",
    Arch::X86
);

/// A CONTEXT of either architecture.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Context {
    /// AMD64 layout.
    Amd64(Amd64Context),
    /// x86 layout.
    X86(X86Context),
}

impl Context {
    /// An all-zero context of `arch`.
    pub fn zeroed(arch: Arch) -> Self {
        match arch {
            Arch::Amd64 => Context::Amd64(Amd64Context::zeroed()),
            Arch::X86 => Context::X86(X86Context::zeroed()),
        }
    }

    /// Parses the CONTEXT of `arch` from the start of `bytes` (extra bytes are ignored).
    pub fn parse(arch: Arch, bytes: &[u8]) -> Result<Self, PayloadError> {
        Ok(match arch {
            Arch::Amd64 => Context::Amd64(Amd64Context::parse(bytes)?),
            Arch::X86 => Context::X86(X86Context::parse(bytes)?),
        })
    }

    /// The architecture.
    pub fn arch(&self) -> Arch {
        match self {
            Context::Amd64(_) => Arch::Amd64,
            Context::X86(_) => Arch::X86,
        }
    }

    /// The raw bytes (1232 or 716).
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Context::Amd64(c) => c.as_bytes().as_slice(),
            Context::X86(c) => c.as_bytes().as_slice(),
        }
    }

    /// Program counter: RIP / EIP.
    pub fn pc(&self) -> u64 {
        match self {
            Context::Amd64(c) => c.get(Amd64Reg::Rip),
            Context::X86(c) => c.get(X86Reg::Eip),
        }
    }

    /// Stack pointer: RSP / ESP.
    pub fn sp(&self) -> u64 {
        match self {
            Context::Amd64(c) => c.get(Amd64Reg::Rsp),
            Context::X86(c) => c.get(X86Reg::Esp),
        }
    }

    /// Frame pointer: RBP / EBP.
    pub fn fp(&self) -> u64 {
        match self {
            Context::Amd64(c) => c.get(Amd64Reg::Rbp),
            Context::X86(c) => c.get(X86Reg::Ebp),
        }
    }

    /// Sets the program counter.
    pub fn set_pc(&mut self, v: u64) {
        match self {
            Context::Amd64(c) => c.set(Amd64Reg::Rip, v),
            Context::X86(c) => c.set(X86Reg::Eip, v),
        }
    }

    /// Sets the stack pointer.
    pub fn set_sp(&mut self, v: u64) {
        match self {
            Context::Amd64(c) => c.set(Amd64Reg::Rsp, v),
            Context::X86(c) => c.set(X86Reg::Esp, v),
        }
    }

    /// Sets the frame pointer.
    pub fn set_fp(&mut self, v: u64) {
        match self {
            Context::Amd64(c) => c.set(Amd64Reg::Rbp, v),
            Context::X86(c) => c.set(X86Reg::Ebp, v),
        }
    }

    /// EFlags.
    pub fn eflags(&self) -> u32 {
        match self {
            Context::Amd64(c) => c.get(Amd64Reg::EFlags) as u32,
            Context::X86(c) => c.get(X86Reg::EFlags) as u32,
        }
    }

    /// ContextFlags (see [`flags`]).
    pub fn context_flags(&self) -> u32 {
        match self {
            Context::Amd64(c) => c.get(Amd64Reg::ContextFlags) as u32,
            Context::X86(c) => c.get(X86Reg::ContextFlags) as u32,
        }
    }

    /// Copies a partial CONTEXT in at `offset` (see [`Amd64Context::apply_partial`]).
    pub fn apply_partial(&mut self, offset: u32, bytes: &[u8]) -> usize {
        match self {
            Context::Amd64(c) => c.apply_partial(offset, bytes),
            Context::X86(c) => c.apply_partial(offset, bytes),
        }
    }

    /// The bytes of `range`, clipped to the CONTEXT.
    pub fn range_bytes(&self, range: ContextRange) -> &[u8] {
        match self {
            Context::Amd64(c) => c.range_bytes(range),
            Context::X86(c) => c.range_bytes(range),
        }
    }
}

impl From<Amd64Context> for Context {
    fn from(c: Amd64Context) -> Self {
        Context::Amd64(c)
    }
}

impl From<X86Context> for Context {
    fn from(c: X86Context) -> Self {
        Context::X86(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_ranges() {
        assert_eq!(Amd64Context::SIZE, 0x4D0);
        assert_eq!(X86Context::SIZE, 0x2CC);
        assert_eq!(
            ContextRange::pc_sp_fp(Arch::Amd64),
            ContextRange {
                offset: 0x98,
                byte_count: 0x68
            }
        );
        assert_eq!(
            ContextRange::pc_sp_fp(Arch::X86),
            ContextRange {
                offset: 0xB4,
                byte_count: 0x14
            }
        );
        for r in Amd64Reg::ALL {
            assert!(r.offset() + r.size() <= AMD64_CONTEXT_SIZE);
        }
        for r in X86Reg::ALL {
            assert!(r.offset() + r.size() <= X86_CONTEXT_SIZE);
        }
    }

    #[test]
    fn hand_written_x86_registers() {
        let mut raw = vec![0u8; X86_CONTEXT_SIZE];
        raw[0xB8..0xBC].copy_from_slice(&[0x78, 0x56, 0x34, 0x12]);
        raw[0xC4..0xC8].copy_from_slice(&[0xF0, 0xFF, 0x12, 0x80]);
        raw[0xB4..0xB8].copy_from_slice(&[0x10, 0x00, 0x13, 0x80]);
        let c = Context::parse(Arch::X86, &raw).unwrap();
        assert_eq!(c.pc(), 0x1234_5678);
        assert_eq!(c.sp(), 0x8012_FFF0);
        assert_eq!(c.fp(), 0x8013_0010);
    }

    #[test]
    fn partial_apply_is_clipped() {
        let mut c = Context::zeroed(Arch::X86);
        assert_eq!(c.apply_partial(710, &[1; 10]), 6);
        assert_eq!(c.apply_partial(u32::MAX, &[1; 10]), 0);
    }
}
