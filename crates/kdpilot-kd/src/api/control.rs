//! Execution control: Continue (0x3136), Continue2 (0x313C), Reboot (0x313B) and
//! SwitchProcessor (0x3150). None of them gets a manipulate reply: the target resumes,
//! reboots, or reports a fresh STATE_CHANGE64 from the new CPU.

use super::get_version::expect_api;
use super::{number, Api, Manipulate};
use crate::wire::status;
use crate::{Arch, PayloadError};

/// The echo a simulator could build for an API that has no reply (never sent by a target).
fn no_reply(api: u32) -> Manipulate {
    let mut m = Manipulate::request(api, 0);
    m.return_status = status::SUCCESS;
    m
}

/// DbgKdContinueApi (0x3136): ContinueStatus @16. WinDbg uses it to answer an "unload all"
/// state change (T1 frame 954); it also copies ContinueStatus into ReturnStatus, and so does
/// [`Continue::encode_request`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Continue {
    /// ContinueStatus (DBG_CONTINUE, DBG_EXCEPTION_HANDLED, DBG_EXCEPTION_NOT_HANDLED).
    pub status: u32,
}

impl Continue {
    /// Continue with DBG_CONTINUE.
    pub fn dbg_continue() -> Self {
        Self {
            status: status::DBG_CONTINUE,
        }
    }
}

impl Api for Continue {
    const NUMBER: u32 = number::CONTINUE;
    const HAS_REPLY: bool = false;
    type Reply = ();

    fn encode_request(&self, _arch: Arch) -> Manipulate {
        let mut m = Manipulate::request(Self::NUMBER, 0);
        m.return_status = self.status;
        m.body_mut().u32(0, self.status);
        m
    }

    fn decode_request(m: &Manipulate, _arch: Arch) -> Result<Self, PayloadError> {
        expect_api(m, Self::NUMBER)?;
        Ok(Self {
            status: m.body().u32(0)?,
        })
    }

    fn encode_reply(&self, _reply: &(), _arch: Arch) -> Manipulate {
        no_reply(Self::NUMBER)
    }

    fn decode_reply(&self, m: &Manipulate, _arch: Arch) -> Result<(), PayloadError> {
        m.check(Self::NUMBER)
    }
}

/// DbgKdContinueApi2 (0x313C): DBGKD_CONTINUE2. The control set differs by architecture
/// (kd-protocol.md 2.1): AMD64 TraceFlag u32 @20, Dr7 u64 @24, CurrentSymbolStart u64 @32,
/// CurrentSymbolEnd u64 @40; x86 TraceFlag u32 @20, Dr7 u32 @24, CurrentSymbolStart u32 @28,
/// CurrentSymbolEnd u32 @32 (the x86 fields are truncated on encode, zero-extended on
/// decode). [`Continue2::encode_request`] copies ContinueStatus into ReturnStatus, as WinDbg
/// does (T1 frame 234).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Continue2 {
    /// ContinueStatus @16. TraceFlag and Dr7 are applied only if it is an NT_SUCCESS value.
    pub continue_status: u32,
    /// 1 = single-step (sets EFLAGS.TF).
    pub trace_flag: u32,
    /// Dr7 to load as KernelDr7 on every CPU (0x400 = no hardware breakpoints).
    pub dr7: u64,
    /// CurrentSymbolStart (1 = no change).
    pub current_symbol_start: u64,
    /// CurrentSymbolEnd.
    pub current_symbol_end: u64,
}

impl Default for Continue2 {
    fn default() -> Self {
        Self::go()
    }
}

impl Continue2 {
    /// What real WinDbg sends to resume (T1 frame 234): DBG_CONTINUE, TraceFlag 0, Dr7 0x400,
    /// CurrentSymbolStart 1, CurrentSymbolEnd 0.
    pub fn go() -> Self {
        Self {
            continue_status: status::DBG_CONTINUE,
            trace_flag: 0,
            dr7: 0x400,
            current_symbol_start: 1,
            current_symbol_end: 0,
        }
    }

    /// [`Continue2::go`] with TraceFlag 1: execute one instruction, then report
    /// STATUS_SINGLE_STEP.
    pub fn single_step() -> Self {
        Self {
            trace_flag: 1,
            ..Self::go()
        }
    }

    /// Builder: ContinueStatus (e.g. DBG_EXCEPTION_HANDLED, which WinDbg sends after a
    /// breakpoint exception: T1 frame 950).
    pub fn with_status(mut self, continue_status: u32) -> Self {
        self.continue_status = continue_status;
        self
    }

    /// Builder: Dr7 (pass back the control report's Dr7 to keep hardware breakpoints).
    pub fn with_dr7(mut self, dr7: u64) -> Self {
        self.dr7 = dr7;
        self
    }
}

impl Api for Continue2 {
    const NUMBER: u32 = number::CONTINUE2;
    const HAS_REPLY: bool = false;
    type Reply = ();

    fn encode_request(&self, arch: Arch) -> Manipulate {
        let mut m = Manipulate::request(Self::NUMBER, 0);
        m.return_status = self.continue_status;
        let mut b = m.body_mut();
        b.u32(0, self.continue_status);
        b.u32(4, self.trace_flag);
        match arch {
            Arch::Amd64 => {
                b.u64(8, self.dr7);
                b.u64(16, self.current_symbol_start);
                b.u64(24, self.current_symbol_end);
            }
            Arch::X86 => {
                b.u32(8, self.dr7 as u32);
                b.u32(12, self.current_symbol_start as u32);
                b.u32(16, self.current_symbol_end as u32);
            }
        }
        m
    }

    fn decode_request(m: &Manipulate, arch: Arch) -> Result<Self, PayloadError> {
        expect_api(m, Self::NUMBER)?;
        let b = m.body();
        let (dr7, start, end) = match arch {
            Arch::Amd64 => (b.u64(8)?, b.u64(16)?, b.u64(24)?),
            Arch::X86 => (
                u64::from(b.u32(8)?),
                u64::from(b.u32(12)?),
                u64::from(b.u32(16)?),
            ),
        };
        Ok(Self {
            continue_status: b.u32(0)?,
            trace_flag: b.u32(4)?,
            dr7,
            current_symbol_start: start,
            current_symbol_end: end,
        })
    }

    fn encode_reply(&self, _reply: &(), _arch: Arch) -> Manipulate {
        no_reply(Self::NUMBER)
    }

    fn decode_reply(&self, m: &Manipulate, _arch: Arch) -> Result<(), PayloadError> {
        m.check(Self::NUMBER)
    }
}

/// DbgKdRebootApi (0x313B): the target reboots; no reply.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reboot;

impl Api for Reboot {
    const NUMBER: u32 = number::REBOOT;
    const HAS_REPLY: bool = false;
    type Reply = ();

    fn encode_request(&self, _arch: Arch) -> Manipulate {
        Manipulate::request(Self::NUMBER, 0)
    }

    fn decode_request(m: &Manipulate, _arch: Arch) -> Result<Self, PayloadError> {
        expect_api(m, Self::NUMBER)?;
        Ok(Reboot)
    }

    fn encode_reply(&self, _reply: &(), _arch: Arch) -> Manipulate {
        no_reply(Self::NUMBER)
    }

    fn decode_reply(&self, m: &Manipulate, _arch: Arch) -> Result<(), PayloadError> {
        m.check(Self::NUMBER)
    }
}

/// DbgKdSwitchProcessor (0x3150): make `processor` the reporting CPU. No manipulate reply: the
/// new CPU sends a STATE_CHANGE64. [`Api::encode_request`] sets the packet's Processor field.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SwitchProcessor {
    /// The CPU to switch to (the request's Processor field).
    pub processor: u16,
}

impl Api for SwitchProcessor {
    const NUMBER: u32 = number::SWITCH_PROCESSOR;
    const HAS_REPLY: bool = false;
    type Reply = ();

    fn encode_request(&self, _arch: Arch) -> Manipulate {
        Manipulate::request(Self::NUMBER, self.processor)
    }

    fn decode_request(m: &Manipulate, _arch: Arch) -> Result<Self, PayloadError> {
        expect_api(m, Self::NUMBER)?;
        Ok(Self {
            processor: m.processor,
        })
    }

    fn encode_reply(&self, _reply: &(), _arch: Arch) -> Manipulate {
        no_reply(Self::NUMBER)
    }

    fn decode_reply(&self, m: &Manipulate, _arch: Arch) -> Result<(), PayloadError> {
        m.check(Self::NUMBER)
    }
}
