//! DBGKD_GET_VERSION64 (kd-protocol.md 2.2): 40 bytes at packet offset 16 of a GetVersion reply.

use crate::wire::bytes::{Fields, FieldsMut};
use crate::{Arch, PayloadError};

/// Size of DBGKD_GET_VERSION64.
pub const GET_VERSION64_SIZE: usize = 40;

/// DBGKD_GET_VERSION64 flag bits.
pub mod flags {
    /// Multiprocessor kernel.
    pub const MP: u16 = 0x1;
    /// DebuggerDataList is valid.
    pub const DATA: u16 = 0x2;
    /// 64-bit pointers.
    pub const PTR64: u16 = 0x4;
    /// No memory manager (boot debugger).
    pub const NOMM: u16 = 0x8;
    /// Hardware stepping support.
    pub const HSS: u16 = 0x10;
    /// Partitions.
    pub const PARTITIONS: u16 = 0x20;
}

/// What a target says about itself in a GetVersion reply.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct GetVersion64 {
    /// `(DBGKD_MAJOR_TYPE << 8) | (NtBuildNumber >> 28)`: 0x000F free NT kernel, 0x000C checked,
    /// 0x040F boot debugger.
    pub major_version: u16,
    /// Build number (e.g. 7601, 10586).
    pub minor_version: u16,
    /// 6 = DBGKD_64BIT_PROTOCOL_VERSION2.
    pub protocol_version: u8,
    /// KdSecondaryVersion.
    pub kd_secondary_version: u8,
    /// See [`flags`].
    pub flags: u16,
    /// PE machine type of the target.
    pub machine_type: u16,
    /// Highest packet type the target knows.
    pub max_packet_type: u8,
    /// Highest state change the target knows.
    pub max_state_change: u8,
    /// Highest manipulate API the target knows.
    pub max_manipulate: u8,
    /// Simulation flag.
    pub simulation: u8,
    /// Unused field, kept for byte-exact round trips.
    pub unused: u16,
    /// Kernel base address (changes every boot under KASLR).
    pub kern_base: u64,
    /// Address of the PsLoadedModuleList LIST_ENTRY head.
    pub ps_loaded_module_list: u64,
    /// Address of KdpDebuggerDataListHead.
    pub debugger_data_list: u64,
}

impl GetVersion64 {
    /// Parses the 40-byte structure.
    pub fn parse(bytes: &[u8]) -> Result<Self, PayloadError> {
        let f = Fields::new(bytes, "DBGKD_GET_VERSION64");
        Ok(Self {
            major_version: f.u16(0)?,
            minor_version: f.u16(2)?,
            protocol_version: f.u8(4)?,
            kd_secondary_version: f.u8(5)?,
            flags: f.u16(6)?,
            machine_type: f.u16(8)?,
            max_packet_type: f.u8(10)?,
            max_state_change: f.u8(11)?,
            max_manipulate: f.u8(12)?,
            simulation: f.u8(13)?,
            unused: f.u16(14)?,
            kern_base: f.u64(16)?,
            ps_loaded_module_list: f.u64(24)?,
            debugger_data_list: f.u64(32)?,
        })
    }

    /// The 40 bytes.
    pub fn encode(&self) -> [u8; GET_VERSION64_SIZE] {
        let mut out = [0u8; GET_VERSION64_SIZE];
        let mut w = FieldsMut::new(&mut out);
        w.u16(0, self.major_version);
        w.u16(2, self.minor_version);
        w.u8(4, self.protocol_version);
        w.u8(5, self.kd_secondary_version);
        w.u16(6, self.flags);
        w.u16(8, self.machine_type);
        w.u8(10, self.max_packet_type);
        w.u8(11, self.max_state_change);
        w.u8(12, self.max_manipulate);
        w.u8(13, self.simulation);
        w.u16(14, self.unused);
        w.u64(16, self.kern_base);
        w.u64(24, self.ps_loaded_module_list);
        w.u64(32, self.debugger_data_list);
        out
    }

    /// The architecture, from MachineType (Flags are not trusted: one stub sends 0xb).
    pub fn arch(&self) -> Option<Arch> {
        Arch::from_machine_type(self.machine_type)
    }

    /// Whether the kernel is multiprocessor.
    pub fn is_mp(&self) -> bool {
        self.flags & flags::MP != 0
    }

    /// Whether DebuggerDataList may be followed to KDDEBUGGER_DATA64.
    pub fn has_debugger_data(&self) -> bool {
        self.flags & flags::DATA != 0 && self.debugger_data_list != 0
    }

    /// Whether this is the boot debugger (bootmgr/winload), not the NT kernel.
    pub fn is_boot_debugger(&self) -> bool {
        self.major_version >> 8 == 0x04
    }

    /// Whether this is a checked (debug) build.
    pub fn is_checked_build(&self) -> bool {
        self.major_version & 0xFF == 0x0C
    }
}
