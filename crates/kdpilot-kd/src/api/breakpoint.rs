//! Software breakpoints: WriteBreakPoint (0x3134) and RestoreBreakPoint (0x3135),
//! DBGKD_WRITE_BREAKPOINT64 (BreakPointAddress u64 @16, BreakPointHandle u32 @24) and
//! DBGKD_RESTORE_BREAKPOINT (BreakPointHandle u32 @16).

use super::get_version::expect_api;
use super::{number, Api, Manipulate};
use crate::wire::status;
use crate::{Arch, PayloadError};

/// DbgKdWriteBreakPointApi (0x3134): plant an int3. The reply's handle (1-based) names the
/// breakpoint for RestoreBreakPoint; 0 means the target refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteBreakPoint {
    /// Where to plant it (sign-extended on 32-bit targets).
    pub address: u64,
}

impl Api for WriteBreakPoint {
    const NUMBER: u32 = number::WRITE_BREAKPOINT;
    /// BreakPointHandle (nonzero).
    type Reply = u32;

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

    fn encode_reply(&self, handle: &u32, _arch: Arch) -> Manipulate {
        let mut m = Manipulate::request(Self::NUMBER, 0);
        m.return_status = if *handle == 0 {
            status::UNSUCCESSFUL
        } else {
            status::SUCCESS
        };
        let mut b = m.body_mut();
        b.u64(0, self.address);
        b.u32(8, *handle);
        m
    }

    /// Fails on a failed ReturnStatus and on handle 0.
    fn decode_reply(&self, m: &Manipulate, _arch: Arch) -> Result<u32, PayloadError> {
        m.check(Self::NUMBER)?;
        match m.body().u32(8)? {
            0 => Err(PayloadError::Failed {
                api: number::name(Self::NUMBER),
                status: m.return_status,
            }),
            h => Ok(h),
        }
    }
}

/// DbgKdRestoreBreakPointApi (0x3135): remove a breakpoint by handle. Targets drop every
/// breakpoint at the reporting PC when they stop (kd-protocol.md 4.4), so a failure
/// (STATUS_UNSUCCESSFUL, T1 frames 60..) is normal and the caller usually ignores it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestoreBreakPoint {
    /// The handle WriteBreakPoint returned.
    pub handle: u32,
}

impl Api for RestoreBreakPoint {
    const NUMBER: u32 = number::RESTORE_BREAKPOINT;
    type Reply = ();

    fn encode_request(&self, _arch: Arch) -> Manipulate {
        let mut m = Manipulate::request(Self::NUMBER, 0);
        m.body_mut().u32(0, self.handle);
        m
    }

    fn decode_request(m: &Manipulate, _arch: Arch) -> Result<Self, PayloadError> {
        expect_api(m, Self::NUMBER)?;
        Ok(Self {
            handle: m.body().u32(0)?,
        })
    }

    fn encode_reply(&self, _reply: &(), arch: Arch) -> Manipulate {
        let mut m = self.encode_request(arch);
        m.return_status = status::SUCCESS;
        m
    }

    /// Fails (`PayloadError::Failed`) when the target no longer knew the handle.
    fn decode_reply(&self, m: &Manipulate, _arch: Arch) -> Result<(), PayloadError> {
        m.check(Self::NUMBER)
    }
}
