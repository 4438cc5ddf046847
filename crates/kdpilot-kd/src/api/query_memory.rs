//! DbgKdQueryMemoryApi (0x315C): DBGKD_QUERY_MEMORY (Address u64 @16, Reserved u64 @24,
//! AddressSpace u32 @32, Flags u32 @36). The request's AddressSpace must be 0 (virtual); the
//! reply says which space the address is in and its protection.

use super::get_version::expect_api;
use super::{number, Api, Manipulate};
use crate::wire::status;
use crate::{Arch, PayloadError};

/// DBGKD_QUERY_MEMORY address spaces.
pub mod address_space {
    /// Request: query a virtual address. Reply: user space.
    pub const VIRTUAL: u32 = 0;
    /// Reply: user-mode (process) address.
    pub const PROCESS: u32 = 0;
    /// Reply: session space.
    pub const SESSION: u32 = 1;
    /// Reply: kernel space.
    pub const KERNEL: u32 = 2;
}

/// DBGKD_QUERY_MEMORY flags.
pub mod query_flags {
    /// Readable.
    pub const READ: u32 = 0x1;
    /// Writable.
    pub const WRITE: u32 = 0x2;
    /// Executable.
    pub const EXECUTE: u32 = 0x4;
    /// Fixed.
    pub const FIXED: u32 = 0x8;
}

/// Where an address lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueryMemory {
    /// The address.
    pub address: u64,
}

/// The answer to [`QueryMemory`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryInfo {
    /// See [`address_space`].
    pub address_space: u32,
    /// See [`query_flags`].
    pub flags: u32,
}

impl Api for QueryMemory {
    const NUMBER: u32 = number::QUERY_MEMORY;
    type Reply = MemoryInfo;

    fn encode_request(&self, _arch: Arch) -> Manipulate {
        let mut m = Manipulate::request(Self::NUMBER, 0);
        m.body_mut().u64(0, self.address);
        m
    }

    fn decode_request(m: &Manipulate, _arch: Arch) -> Result<Self, PayloadError> {
        expect_api(m, Self::NUMBER)?;
        Ok(Self {
            address: m.body().u64(0)?,
        })
    }

    fn encode_reply(&self, info: &MemoryInfo, arch: Arch) -> Manipulate {
        let mut m = self.encode_request(arch);
        m.return_status = status::SUCCESS;
        let mut b = m.body_mut();
        b.u32(16, info.address_space);
        b.u32(20, info.flags);
        m
    }

    fn decode_reply(&self, m: &Manipulate, _arch: Arch) -> Result<MemoryInfo, PayloadError> {
        m.check(Self::NUMBER)?;
        let b = m.body();
        Ok(MemoryInfo {
            address_space: b.u32(16)?,
            flags: b.u32(20)?,
        })
    }
}
