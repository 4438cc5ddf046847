//! Model-specific registers: ReadMachineSpecificRegister (0x3152) and
//! WriteMachineSpecificRegister (0x3153), DBGKD_READ_WRITE_MSR (Msr u32 @16, DataValueLow
//! u32 @20, DataValueHigh u32 @24), on the CPU named by the packet's Processor field.

use super::get_version::expect_api;
use super::{number, Api, Manipulate};
use crate::wire::status;
use crate::{Arch, PayloadError};

/// Read an MSR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadMsr {
    /// MSR number.
    pub msr: u32,
}

/// Write an MSR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteMsr {
    /// MSR number.
    pub msr: u32,
    /// The 64-bit value (split into DataValueLow/High).
    pub value: u64,
}

fn encode(api: u32, msr: u32, value: u64) -> Manipulate {
    let mut m = Manipulate::request(api, 0);
    let mut b = m.body_mut();
    b.u32(0, msr);
    b.u32(4, value as u32);
    b.u32(8, (value >> 32) as u32);
    m
}

fn decode(m: &Manipulate) -> Result<(u32, u64), PayloadError> {
    let b = m.body();
    let lo = u64::from(b.u32(4)?);
    let hi = u64::from(b.u32(8)?);
    Ok((b.u32(0)?, hi << 32 | lo))
}

impl Api for ReadMsr {
    const NUMBER: u32 = number::READ_MSR;
    /// The MSR value.
    type Reply = u64;

    fn encode_request(&self, _arch: Arch) -> Manipulate {
        encode(Self::NUMBER, self.msr, 0)
    }

    fn decode_request(m: &Manipulate, _arch: Arch) -> Result<Self, PayloadError> {
        expect_api(m, Self::NUMBER)?;
        Ok(Self { msr: decode(m)?.0 })
    }

    fn encode_reply(&self, value: &u64, _arch: Arch) -> Manipulate {
        let mut m = encode(Self::NUMBER, self.msr, *value);
        m.return_status = status::SUCCESS;
        m
    }

    /// Fails when the MSR does not exist (the target catches the #GP and reports failure).
    fn decode_reply(&self, m: &Manipulate, _arch: Arch) -> Result<u64, PayloadError> {
        m.check(Self::NUMBER)?;
        Ok(decode(m)?.1)
    }
}

impl Api for WriteMsr {
    const NUMBER: u32 = number::WRITE_MSR;
    type Reply = ();

    fn encode_request(&self, _arch: Arch) -> Manipulate {
        encode(Self::NUMBER, self.msr, self.value)
    }

    fn decode_request(m: &Manipulate, _arch: Arch) -> Result<Self, PayloadError> {
        expect_api(m, Self::NUMBER)?;
        let (msr, value) = decode(m)?;
        Ok(Self { msr, value })
    }

    fn encode_reply(&self, _reply: &(), _arch: Arch) -> Manipulate {
        let mut m = encode(Self::NUMBER, self.msr, self.value);
        m.return_status = status::SUCCESS;
        m
    }

    fn decode_reply(&self, m: &Manipulate, _arch: Arch) -> Result<(), PayloadError> {
        m.check(Self::NUMBER)
    }
}
