//! DBGKD_MANIPULATE_STATE64: the request/reply packets of a stopped target (kd-protocol.md 2.1).
//!
//! One API, one small type that knows its number and its reply ([`Api`]); one file per API
//! group. [`Manipulate`] is the generic decoded form: it keeps every byte (padding, the whole
//! 40-byte union, WinDbg's junk ProcessorLevel) so that a decoded packet re-encodes byte for byte.

use crate::wire::bytes::{Fields, FieldsMut};
use crate::{Arch, PayloadError};

/// Size of the DBGKD_MANIPULATE_STATE64 header that precedes any data.
pub const MANIPULATE_HEADER_SIZE: usize = 56;
/// Size of the union `u` at offset 16.
pub const MANIPULATE_UNION_SIZE: usize = 40;
/// Largest data a single read can return: 4000 - 56.
pub const MAX_TRANSFER: usize = crate::wire::consts::PACKET_MAX_SIZE - MANIPULATE_HEADER_SIZE;

/// API numbers (kd-protocol.md 2.1).
#[allow(missing_docs)]
pub mod number {
    pub const READ_VIRTUAL_MEMORY: u32 = 0x3130;
    pub const WRITE_VIRTUAL_MEMORY: u32 = 0x3131;
    pub const GET_CONTEXT: u32 = 0x3132;
    pub const SET_CONTEXT: u32 = 0x3133;
    pub const WRITE_BREAKPOINT: u32 = 0x3134;
    pub const RESTORE_BREAKPOINT: u32 = 0x3135;
    pub const CONTINUE: u32 = 0x3136;
    pub const READ_CONTROL_SPACE: u32 = 0x3137;
    pub const WRITE_CONTROL_SPACE: u32 = 0x3138;
    pub const READ_IO_SPACE: u32 = 0x3139;
    pub const WRITE_IO_SPACE: u32 = 0x313A;
    pub const REBOOT: u32 = 0x313B;
    pub const CONTINUE2: u32 = 0x313C;
    pub const READ_PHYSICAL_MEMORY: u32 = 0x313D;
    pub const WRITE_PHYSICAL_MEMORY: u32 = 0x313E;
    pub const GET_VERSION: u32 = 0x3146;
    pub const WRITE_BREAKPOINT_EX: u32 = 0x3147;
    pub const RESTORE_BREAKPOINT_EX: u32 = 0x3148;
    pub const CAUSE_BUGCHECK: u32 = 0x3149;
    pub const SWITCH_PROCESSOR: u32 = 0x3150;
    pub const READ_MSR: u32 = 0x3152;
    pub const WRITE_MSR: u32 = 0x3153;
    pub const SEARCH_MEMORY: u32 = 0x3156;
    pub const CLEAR_ALL_INTERNAL_BREAKPOINTS: u32 = 0x315A;
    pub const QUERY_MEMORY: u32 = 0x315C;
    pub const GET_CONTEXT_EX: u32 = 0x315F;
    pub const SET_CONTEXT_EX: u32 = 0x3160;

    /// A name for logs (`DbgKd...Api` without the prefix and suffix).
    pub fn name(api: u32) -> &'static str {
        match api {
            READ_VIRTUAL_MEMORY => "ReadVirtualMemory",
            WRITE_VIRTUAL_MEMORY => "WriteVirtualMemory",
            GET_CONTEXT => "GetContext",
            SET_CONTEXT => "SetContext",
            WRITE_BREAKPOINT => "WriteBreakPoint",
            RESTORE_BREAKPOINT => "RestoreBreakPoint",
            CONTINUE => "Continue",
            READ_CONTROL_SPACE => "ReadControlSpace",
            WRITE_CONTROL_SPACE => "WriteControlSpace",
            READ_IO_SPACE => "ReadIoSpace",
            WRITE_IO_SPACE => "WriteIoSpace",
            REBOOT => "Reboot",
            CONTINUE2 => "Continue2",
            READ_PHYSICAL_MEMORY => "ReadPhysicalMemory",
            WRITE_PHYSICAL_MEMORY => "WritePhysicalMemory",
            GET_VERSION => "GetVersion",
            WRITE_BREAKPOINT_EX => "WriteBreakPointEx",
            RESTORE_BREAKPOINT_EX => "RestoreBreakPointEx",
            CAUSE_BUGCHECK => "CauseBugCheck",
            SWITCH_PROCESSOR => "SwitchProcessor",
            READ_MSR => "ReadMachineSpecificRegister",
            WRITE_MSR => "WriteMachineSpecificRegister",
            SEARCH_MEMORY => "SearchMemory",
            CLEAR_ALL_INTERNAL_BREAKPOINTS => "ClearAllInternalBreakpoints",
            QUERY_MEMORY => "QueryMemory",
            GET_CONTEXT_EX => "GetContextEx",
            SET_CONTEXT_EX => "SetContextEx",
            _ => "UnknownApi",
        }
    }
}

/// A decoded DBGKD_MANIPULATE_STATE64 packet, request or reply, with every byte kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manipulate {
    /// ApiNumber @0.
    pub api: u32,
    /// ProcessorLevel @4 (WinDbg fills junk).
    pub processor_level: u16,
    /// Processor @6: the CPU a request targets.
    pub processor: u16,
    /// ReturnStatus @8: STATUS_PENDING in requests, NTSTATUS in replies.
    pub return_status: u32,
    /// Alignment padding @12, kept for byte-exact re-encoding.
    pub padding: u32,
    /// The 40-byte union `u` @16.
    pub body: [u8; MANIPULATE_UNION_SIZE],
    /// Data after the 56-byte header (write payload, read result, CONTEXT...).
    pub data: Vec<u8>,
}

impl Manipulate {
    /// A request for `api` with ReturnStatus STATUS_PENDING (as WinDbg sends) and an empty union.
    pub fn request(api: u32, processor: u16) -> Self {
        Self {
            api,
            processor_level: 0,
            processor,
            return_status: crate::wire::consts::status::PENDING,
            padding: 0,
            body: [0; MANIPULATE_UNION_SIZE],
            data: Vec::new(),
        }
    }

    /// Parses a STATE_MANIPULATE payload. Needs at least the 56-byte header.
    pub fn parse(payload: &[u8]) -> Result<Self, PayloadError> {
        let f = Fields::new(payload, "DBGKD_MANIPULATE_STATE64");
        f.slice(0, MANIPULATE_HEADER_SIZE)?;
        Ok(Self {
            api: f.u32(0)?,
            processor_level: f.u16(4)?,
            processor: f.u16(6)?,
            return_status: f.u32(8)?,
            padding: f.u32(12)?,
            body: f.bytes_at(16)?,
            data: f.rest(MANIPULATE_HEADER_SIZE).to_vec(),
        })
    }

    /// The packet payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![0u8; MANIPULATE_HEADER_SIZE];
        let mut w = FieldsMut::new(&mut out);
        w.u32(0, self.api);
        w.u16(4, self.processor_level);
        w.u16(6, self.processor);
        w.u32(8, self.return_status);
        w.u32(12, self.padding);
        w.put(16, &self.body);
        out.extend_from_slice(&self.data);
        out
    }

    /// Field reader over the union (offsets relative to the union, i.e. packet offset - 16).
    pub fn body(&self) -> Fields<'_> {
        Fields::new(&self.body, "DBGKD_MANIPULATE_STATE64 union")
    }

    /// Field writer over the union (offsets relative to the union).
    pub fn body_mut(&mut self) -> FieldsMut<'_> {
        FieldsMut::new(&mut self.body)
    }

    /// Whether ReturnStatus is an NT_SUCCESS value.
    pub fn succeeded(&self) -> bool {
        crate::wire::consts::status::is_success(self.return_status)
    }

    /// Error unless ReturnStatus is a success and the reply is for `api`.
    pub fn check(&self, api: u32) -> Result<(), PayloadError> {
        if self.api != api {
            return Err(PayloadError::WrongApi {
                expected: api,
                got: self.api,
            });
        }
        if !self.succeeded() {
            return Err(PayloadError::Failed {
                api: number::name(api),
                status: self.return_status,
            });
        }
        Ok(())
    }
}

/// One KD manipulate API: how to build its request, parse it back (simulator, vectors), and
/// parse and build its reply.
pub trait Api: Sized {
    /// ApiNumber.
    const NUMBER: u32;
    /// Whether the target answers with a manipulate reply (Continue, Continue2, Reboot and
    /// SwitchProcessor do not).
    const HAS_REPLY: bool = true;
    /// The decoded reply.
    type Reply;

    /// The request packet (Processor set by the caller through [`Manipulate::processor`]).
    fn encode_request(&self, arch: Arch) -> Manipulate;
    /// Decodes a request (what a target does).
    fn decode_request(m: &Manipulate, arch: Arch) -> Result<Self, PayloadError>;
    /// Builds the reply a target sends for this request.
    fn encode_reply(&self, reply: &Self::Reply, arch: Arch) -> Manipulate;
    /// Decodes a reply (what the host does). Fails on a failed ReturnStatus unless the API
    /// reports partial success in its reply type.
    fn decode_reply(&self, m: &Manipulate, arch: Arch) -> Result<Self::Reply, PayloadError>;
}

mod get_version;
mod memory;

pub use get_version::GetVersion;
pub use memory::{
    ReadControlSpace, ReadPhysicalMemory, ReadReply, ReadVirtualMemory, WriteControlSpace,
    WritePhysicalMemory, WriteVirtualMemory,
};

mod breakpoint;
mod control;
mod get_set_context;
mod msr;
mod query_memory;
mod search;

pub use breakpoint::{RestoreBreakPoint, WriteBreakPoint};
pub use control::{Continue, Continue2, Reboot, SwitchProcessor};
pub use get_set_context::{ContextBytes, GetContext, GetContextEx, SetContext, SetContextEx};
pub use msr::{ReadMsr, WriteMsr};
pub use query_memory::{address_space, query_flags, MemoryInfo, QueryMemory};
pub use search::{SearchMemory, STATUS_NO_MORE_ENTRIES};
