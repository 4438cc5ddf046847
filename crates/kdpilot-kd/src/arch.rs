//! Target architectures the protocol structures differ by.

/// The target's processor architecture, decided from DBGKD_GET_VERSION64.MachineType.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Arch {
    /// x64 (IMAGE_FILE_MACHINE_AMD64, 0x8664).
    Amd64,
    /// 32-bit x86 (IMAGE_FILE_MACHINE_I386, 0x014C).
    X86,
}

impl Arch {
    /// IMAGE_FILE_MACHINE_I386.
    pub const MACHINE_I386: u16 = 0x014C;
    /// IMAGE_FILE_MACHINE_AMD64.
    pub const MACHINE_AMD64: u16 = 0x8664;

    /// Maps a PE machine type; `None` for architectures kdpilot does not drive (ARM, ARM64).
    pub fn from_machine_type(machine: u16) -> Option<Self> {
        match machine {
            Self::MACHINE_AMD64 => Some(Arch::Amd64),
            Self::MACHINE_I386 => Some(Arch::X86),
            _ => None,
        }
    }

    /// The PE machine type.
    pub fn machine_type(self) -> u16 {
        match self {
            Arch::Amd64 => Self::MACHINE_AMD64,
            Arch::X86 => Self::MACHINE_I386,
        }
    }

    /// Pointer size in target memory.
    pub fn pointer_size(self) -> usize {
        match self {
            Arch::Amd64 => 8,
            Arch::X86 => 4,
        }
    }

    /// Size of the CONTEXT structure GetContext returns.
    pub fn context_size(self) -> usize {
        match self {
            Arch::Amd64 => crate::context::AMD64_CONTEXT_SIZE,
            Arch::X86 => crate::context::X86_CONTEXT_SIZE,
        }
    }

    /// Short name as WinDbg prints it.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Amd64 => "x64",
            Arch::X86 => "x86",
        }
    }

    /// Normalises an address the target reported: 32-bit targets sign-extend (kd-protocol.md 8).
    pub fn canonical_address(self, addr: u64) -> u64 {
        match self {
            Arch::Amd64 => addr,
            Arch::X86 => crate::wire::bytes::sign_extend32(addr as u32),
        }
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
