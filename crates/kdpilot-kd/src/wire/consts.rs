//! Magic numbers of the KDCOM link layer and of the KD API (kd-protocol.md 1.1, 1.3, 7).

/// Leader of a data packet: `"0000"`.
pub const PACKET_LEADER: u32 = 0x3030_3030;
/// Leader of a control packet (ACK, RESEND, RESET): `"iiii"`.
pub const CONTROL_PACKET_LEADER: u32 = 0x6969_6969;
/// The byte a data leader repeats four times.
pub const PACKET_LEADER_BYTE: u8 = b'0';
/// The byte a control leader repeats four times.
pub const CONTROL_PACKET_LEADER_BYTE: u8 = b'i';
/// The single byte a host sends, outside any packet, to make a running target break in.
pub const BREAKIN_PACKET_BYTE: u8 = b'b';
/// The byte that follows every data packet's payload.
pub const PACKET_TRAILING_BYTE: u8 = 0xAA;
/// Largest payload (ByteCount) a Windows target accepts.
pub const PACKET_MAX_SIZE: usize = 4000;
/// Size of the KD_PACKET header on the wire.
pub const PACKET_HEADER_SIZE: usize = 16;
/// First packet id of a sequence.
pub const INITIAL_PACKET_ID: u32 = 0x8080_0000;
/// Or-ed into a target's first packet id to force the receiver to start a new sequence.
pub const SYNC_PACKET_ID: u32 = 0x0000_0800;

/// KD_PACKET PacketType values.
pub mod packet_type {
    /// Unused (KDNET's first packet).
    pub const UNUSED: u16 = 0;
    /// NT4/W2K 32-bit state change (never sent by supported targets).
    pub const KD_STATE_CHANGE32: u16 = 1;
    /// DBGKD_MANIPULATE_STATE64 request or reply.
    pub const KD_STATE_MANIPULATE: u16 = 2;
    /// DbgPrint / DbgPrompt.
    pub const KD_DEBUG_IO: u16 = 3;
    /// Control: acknowledge.
    pub const KD_ACKNOWLEDGE: u16 = 4;
    /// Control: resend the last packet.
    pub const KD_RESEND: u16 = 5;
    /// Control: reset packet ids.
    pub const KD_RESET: u16 = 6;
    /// DBGKD_ANY_WAIT_STATE_CHANGE: the target stopped.
    pub const KD_STATE_CHANGE64: u16 = 7;
    /// Target-internal receive mode; never on the wire.
    pub const KD_POLL_BREAKIN: u16 = 8;
    /// Trace data.
    pub const KD_TRACE_IO: u16 = 9;
    /// Hardware breakpoint request/release.
    pub const KD_CONTROL_REQUEST: u16 = 10;
    /// File I/O (.kdfiles) request or reply.
    pub const KD_FILE_IO: u16 = 11;
    /// One past the last valid type.
    pub const MAX: u16 = 12;

    /// A short upper-case name for logs.
    pub fn name(t: u16) -> &'static str {
        match t {
            UNUSED => "UNUSED",
            KD_STATE_CHANGE32 => "STATE_CHANGE32",
            KD_STATE_MANIPULATE => "STATE_MANIPULATE",
            KD_DEBUG_IO => "DEBUG_IO",
            KD_ACKNOWLEDGE => "ACK",
            KD_RESEND => "RESEND",
            KD_RESET => "RESET",
            KD_STATE_CHANGE64 => "STATE_CHANGE64",
            KD_POLL_BREAKIN => "POLL_BREAKIN",
            KD_TRACE_IO => "TRACE_IO",
            KD_CONTROL_REQUEST => "CONTROL_REQUEST",
            KD_FILE_IO => "FILE_IO",
            _ => "UNKNOWN",
        }
    }

    /// Whether the type is a control packet type (sent with the `iiii` leader).
    pub fn is_control(t: u16) -> bool {
        matches!(t, KD_ACKNOWLEDGE | KD_RESEND | KD_RESET)
    }
}

/// NTSTATUS and continue-status values used by the protocol.
pub mod status {
    /// STATUS_SUCCESS.
    pub const SUCCESS: u32 = 0;
    /// STATUS_PENDING: what WinDbg puts in a request's ReturnStatus.
    pub const PENDING: u32 = 0x0000_0103;
    /// STATUS_UNSUCCESSFUL.
    pub const UNSUCCESSFUL: u32 = 0xC000_0001;
    /// STATUS_NO_SUCH_FILE: WinDbg's answer to every FILE_IO request it cannot serve.
    pub const NO_SUCH_FILE: u32 = 0xC000_000F;
    /// STATUS_BREAKPOINT exception code.
    pub const BREAKPOINT: u32 = 0x8000_0003;
    /// STATUS_SINGLE_STEP exception code.
    pub const SINGLE_STEP: u32 = 0x8000_0004;
    /// STATUS_WAKE_SYSTEM_DEBUGGER exception code (break-in).
    pub const WAKE_SYSTEM_DEBUGGER: u32 = 0x8000_0007;
    /// DBG_CONTINUE.
    pub const DBG_CONTINUE: u32 = 0x0001_0002;
    /// DBG_EXCEPTION_HANDLED.
    pub const DBG_EXCEPTION_HANDLED: u32 = 0x0001_0001;
    /// DBG_EXCEPTION_NOT_HANDLED.
    pub const DBG_EXCEPTION_NOT_HANDLED: u32 = 0x8001_0001;

    /// True for NT_SUCCESS values (severity success or informational).
    pub fn is_success(s: u32) -> bool {
        (s as i32) >= 0
    }
}
