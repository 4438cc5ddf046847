//! Register state: GetContext (0x3132), SetContext (0x3133), and the partial forms
//! GetContextEx (0x315F) / SetContextEx (0x3160) with DBGKD_CONTEXT_EX (Offset u32 @16,
//! ByteCount u32 @20, BytesCopied u32 @24). The CONTEXT bytes travel after the 56-byte header;
//! their size depends on the architecture (AMD64 1232, x86 716).
//!
//! Modern WinDbg asks GetContextEx first and falls back to GetContext when the target refuses
//! with STATUS_UNSUCCESSFUL (T1 frames 190/192 -> 194/196).

use super::get_version::expect_api;
use super::{number, Api, Manipulate};
use crate::context::{Context, ContextRange};
use crate::wire::status;
use crate::{Arch, PayloadError};

/// DbgKdGetContextApi (0x3132): the full CONTEXT of the CPU named by the packet's Processor
/// field (set by the caller through [`Manipulate::processor`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GetContext;

impl Api for GetContext {
    const NUMBER: u32 = number::GET_CONTEXT;
    type Reply = Context;

    fn encode_request(&self, _arch: Arch) -> Manipulate {
        Manipulate::request(Self::NUMBER, 0)
    }

    fn decode_request(m: &Manipulate, _arch: Arch) -> Result<Self, PayloadError> {
        expect_api(m, Self::NUMBER)?;
        Ok(GetContext)
    }

    fn encode_reply(&self, context: &Context, _arch: Arch) -> Manipulate {
        let mut m = Manipulate::request(Self::NUMBER, 0);
        m.return_status = status::SUCCESS;
        m.data = context.as_bytes().to_vec();
        m
    }

    /// The CONTEXT of `arch` from the data (bytes past its size are ignored).
    fn decode_reply(&self, m: &Manipulate, arch: Arch) -> Result<Context, PayloadError> {
        m.check(Self::NUMBER)?;
        Context::parse(arch, &m.data)
    }
}

/// DbgKdSetContextApi (0x3133): replace the CONTEXT of the CPU named by Processor. Targets
/// accept it only after a GetContext in the same stop (KdpContextSent). ContextFlags @16 is
/// not used by the target (WinDbg leaves junk there: T1 frames 214, 942).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetContext {
    /// ContextFlags @16.
    pub context_flags: u32,
    /// The CONTEXT to load.
    pub context: Context,
}

impl SetContext {
    /// Sets `context`; ContextFlags @16 is taken from the context itself.
    pub fn new(context: Context) -> Self {
        Self {
            context_flags: context.context_flags(),
            context,
        }
    }
}

impl Api for SetContext {
    const NUMBER: u32 = number::SET_CONTEXT;
    type Reply = ();

    fn encode_request(&self, _arch: Arch) -> Manipulate {
        let mut m = Manipulate::request(Self::NUMBER, 0);
        m.body_mut().u32(0, self.context_flags);
        m.data = self.context.as_bytes().to_vec();
        m
    }

    fn decode_request(m: &Manipulate, arch: Arch) -> Result<Self, PayloadError> {
        expect_api(m, Self::NUMBER)?;
        Ok(Self {
            context_flags: m.body().u32(0)?,
            context: Context::parse(arch, &m.data)?,
        })
    }

    fn encode_reply(&self, _reply: &(), _arch: Arch) -> Manipulate {
        let mut m = Manipulate::request(Self::NUMBER, 0);
        m.return_status = status::SUCCESS;
        m.body_mut().u32(0, self.context_flags);
        m
    }

    fn decode_reply(&self, m: &Manipulate, _arch: Arch) -> Result<(), PayloadError> {
        m.check(Self::NUMBER)
    }
}

/// Part of a CONTEXT: what GetContextEx returns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContextBytes {
    /// Offset of `bytes` in the CONTEXT.
    pub offset: u32,
    /// The bytes copied (BytesCopied of them, bounded by the request and the packet).
    pub bytes: Vec<u8>,
}

/// DbgKdGetContextExApi (0x315F): `range` of the CONTEXT of the CPU named by Processor.
/// Merge the reply into a context with [`Context::apply_partial`]; [`ContextRange::pc_sp_fp`]
/// names the bytes a stack walk needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GetContextEx {
    /// Offset and ByteCount.
    pub range: ContextRange,
}

impl Api for GetContextEx {
    const NUMBER: u32 = number::GET_CONTEXT_EX;
    type Reply = ContextBytes;

    fn encode_request(&self, _arch: Arch) -> Manipulate {
        let mut m = Manipulate::request(Self::NUMBER, 0);
        let mut b = m.body_mut();
        b.u32(0, self.range.offset);
        b.u32(4, self.range.byte_count);
        m
    }

    fn decode_request(m: &Manipulate, _arch: Arch) -> Result<Self, PayloadError> {
        expect_api(m, Self::NUMBER)?;
        let b = m.body();
        Ok(Self {
            range: ContextRange {
                offset: b.u32(0)?,
                byte_count: b.u32(4)?,
            },
        })
    }

    fn encode_reply(&self, reply: &ContextBytes, _arch: Arch) -> Manipulate {
        let mut m = Manipulate::request(Self::NUMBER, 0);
        m.return_status = status::SUCCESS;
        let mut b = m.body_mut();
        b.u32(0, reply.offset);
        b.u32(4, self.range.byte_count);
        b.u32(8, reply.bytes.len() as u32);
        m.data = reply.bytes.clone();
        m
    }

    /// Fails on a failed ReturnStatus (older targets, and the T1 boot debugger, refuse with
    /// STATUS_UNSUCCESSFUL: fall back to [`GetContext`]) and when the reply's Offset is not
    /// the requested one.
    fn decode_reply(&self, m: &Manipulate, _arch: Arch) -> Result<ContextBytes, PayloadError> {
        m.check(Self::NUMBER)?;
        let b = m.body();
        let offset = b.u32(0)?;
        if offset != self.range.offset {
            return Err(PayloadError::Invalid {
                what: "GetContextEx reply",
                detail: format!(
                    "Offset {offset:#x} where {:#x} was requested",
                    self.range.offset
                ),
            });
        }
        let n = (b.u32(8)? as usize)
            .min(self.range.byte_count as usize)
            .min(m.data.len());
        Ok(ContextBytes {
            offset,
            bytes: m.data.get(..n).unwrap_or(&[]).to_vec(),
        })
    }
}

/// DbgKdSetContextExApi (0x3160): write `bytes` into the CONTEXT at `offset`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetContextEx {
    /// Offset in the CONTEXT.
    pub offset: u32,
    /// The bytes to write (ByteCount = their length).
    pub bytes: Vec<u8>,
}

impl SetContextEx {
    /// The bytes of `range` taken from `context`.
    pub fn from_context(context: &Context, range: ContextRange) -> Self {
        Self {
            offset: range.offset,
            bytes: context.range_bytes(range).to_vec(),
        }
    }
}

impl Api for SetContextEx {
    const NUMBER: u32 = number::SET_CONTEXT_EX;
    /// BytesCopied.
    type Reply = u32;

    fn encode_request(&self, _arch: Arch) -> Manipulate {
        let mut m = Manipulate::request(Self::NUMBER, 0);
        let mut b = m.body_mut();
        b.u32(0, self.offset);
        b.u32(4, self.bytes.len() as u32);
        m.data = self.bytes.clone();
        m
    }

    fn decode_request(m: &Manipulate, _arch: Arch) -> Result<Self, PayloadError> {
        expect_api(m, Self::NUMBER)?;
        let b = m.body();
        let count = b.u32(4)? as usize;
        let bytes = m.data.get(..count).ok_or(PayloadError::Truncated {
            what: number::name(Self::NUMBER),
            need: count,
            have: m.data.len(),
        })?;
        Ok(Self {
            offset: b.u32(0)?,
            bytes: bytes.to_vec(),
        })
    }

    fn encode_reply(&self, copied: &u32, _arch: Arch) -> Manipulate {
        let mut m = Manipulate::request(Self::NUMBER, 0);
        m.return_status = status::SUCCESS;
        let mut b = m.body_mut();
        b.u32(0, self.offset);
        b.u32(4, self.bytes.len() as u32);
        b.u32(8, *copied);
        m
    }

    fn decode_reply(&self, m: &Manipulate, _arch: Arch) -> Result<u32, PayloadError> {
        m.check(Self::NUMBER)?;
        m.body().u32(8)
    }
}
