//! Virtual and physical memory reads and writes (0x3130, 0x3131, 0x313D, 0x313E) and control
//! space (0x3137, 0x3138), which share DBGKD_READ_MEMORY64 / DBGKD_WRITE_MEMORY64:
//! TargetBaseAddress u64 @16, TransferCount u32 @24, ActualBytes u32 @28.

use super::get_version::expect_api;
use super::{number, Api, Manipulate, MAX_TRANSFER};
use crate::{Arch, PayloadError};

/// The result of a read: the data the target returned, which may be shorter than asked for
/// when the range crosses an unmapped page (the target then reports STATUS_UNSUCCESSFUL with a
/// partial ActualBytesRead, which is not an error here).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadReply {
    /// ReturnStatus of the reply.
    pub status: u32,
    /// The bytes read (ActualBytesRead of them, bounded by what the packet carries).
    pub data: Vec<u8>,
}

macro_rules! read_api {
    ($(#[$doc:meta])* $name:ident, $num:expr) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub struct $name {
            /// Address (virtual, physical, or control-space index).
            pub address: u64,
            /// Bytes requested; the target clamps to 3944.
            pub count: u32,
        }

        impl Api for $name {
            const NUMBER: u32 = $num;
            type Reply = ReadReply;

            fn encode_request(&self, _arch: Arch) -> Manipulate {
                let mut m = Manipulate::request(Self::NUMBER, 0);
                let mut b = m.body_mut();
                b.u64(0, self.address);
                b.u32(8, self.count);
                m
            }

            fn decode_request(m: &Manipulate, _arch: Arch) -> Result<Self, PayloadError> {
                expect_api(m, Self::NUMBER)?;
                let b = m.body();
                Ok(Self { address: b.u64(0)?, count: b.u32(8)? })
            }

            fn encode_reply(&self, reply: &ReadReply, _arch: Arch) -> Manipulate {
                let mut m = Manipulate::request(Self::NUMBER, 0);
                m.return_status = reply.status;
                let n = reply.data.len().min(MAX_TRANSFER);
                let mut b = m.body_mut();
                b.u64(0, self.address);
                b.u32(8, self.count);
                b.u32(12, n as u32);
                m.data = reply.data.get(..n).unwrap_or(&[]).to_vec();
                m
            }

            fn decode_reply(&self, m: &Manipulate, _arch: Arch) -> Result<ReadReply, PayloadError> {
                expect_api(m, Self::NUMBER)?;
                // The reply echoes the request: a mismatch means damage the byte-sum checksum
                // let through (kd-protocol.md 9).
                let echoed = m.body().u64(0)?;
                if echoed != self.address {
                    return Err(PayloadError::Invalid {
                        what: number::name(Self::NUMBER),
                        detail: format!("reply is for address {echoed:#x}, not {:#x}", self.address),
                    });
                }
                let actual = m.body().u32(12)? as usize;
                // Trust neither field alone: the data is what both the count and the packet allow.
                let n = actual.min(m.data.len()).min(self.count as usize);
                if n == 0 && !m.succeeded() {
                    return Err(PayloadError::Failed {
                        api: number::name(Self::NUMBER),
                        status: m.return_status,
                    });
                }
                Ok(ReadReply { status: m.return_status, data: m.data.get(..n).unwrap_or(&[]).to_vec() })
            }
        }
    };
}

macro_rules! write_api {
    ($(#[$doc:meta])* $name:ident, $num:expr) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq)]
        pub struct $name {
            /// Address (virtual, physical, or control-space index).
            pub address: u64,
            /// Bytes to write.
            pub data: Vec<u8>,
        }

        impl Api for $name {
            const NUMBER: u32 = $num;
            /// ActualBytesWritten.
            type Reply = u32;

            fn encode_request(&self, _arch: Arch) -> Manipulate {
                let mut m = Manipulate::request(Self::NUMBER, 0);
                let mut b = m.body_mut();
                b.u64(0, self.address);
                b.u32(8, self.data.len() as u32);
                m.data = self.data.clone();
                m
            }

            fn decode_request(m: &Manipulate, _arch: Arch) -> Result<Self, PayloadError> {
                expect_api(m, Self::NUMBER)?;
                let b = m.body();
                let count = b.u32(8)? as usize;
                let data = m.data.get(..count).ok_or(PayloadError::Truncated {
                    what: number::name(Self::NUMBER),
                    need: count,
                    have: m.data.len(),
                })?;
                Ok(Self { address: b.u64(0)?, data: data.to_vec() })
            }

            fn encode_reply(&self, written: &u32, _arch: Arch) -> Manipulate {
                let mut m = Manipulate::request(Self::NUMBER, 0);
                m.return_status = if *written as usize == self.data.len() {
                    crate::wire::status::SUCCESS
                } else {
                    crate::wire::status::UNSUCCESSFUL
                };
                let mut b = m.body_mut();
                b.u64(0, self.address);
                b.u32(8, self.data.len() as u32);
                b.u32(12, *written);
                m
            }

            fn decode_reply(&self, m: &Manipulate, _arch: Arch) -> Result<u32, PayloadError> {
                m.check(Self::NUMBER)?;
                m.body().u32(12)
            }
        }
    };
}

read_api!(
    /// DbgKdReadVirtualMemoryApi (0x3130).
    ReadVirtualMemory,
    number::READ_VIRTUAL_MEMORY
);
write_api!(
    /// DbgKdWriteVirtualMemoryApi (0x3131).
    WriteVirtualMemory,
    number::WRITE_VIRTUAL_MEMORY
);
read_api!(
    /// DbgKdReadPhysicalMemoryApi (0x313D).
    ReadPhysicalMemory,
    number::READ_PHYSICAL_MEMORY
);
write_api!(
    /// DbgKdWritePhysicalMemoryApi (0x313E).
    WritePhysicalMemory,
    number::WRITE_PHYSICAL_MEMORY
);
read_api!(
    /// DbgKdReadControlSpaceApi (0x3137). AMD64 addresses: 0 KPCR, 1 KPRCB, 2 KSPECIAL_REGISTERS,
    /// 3 KTHREAD; x86: byte offset into KPROCESSOR_STATE.
    ReadControlSpace,
    number::READ_CONTROL_SPACE
);
write_api!(
    /// DbgKdWriteControlSpaceApi (0x3138). AMD64 accepts only address 2 (KSPECIAL_REGISTERS).
    WriteControlSpace,
    number::WRITE_CONTROL_SPACE
);
