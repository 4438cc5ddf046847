//! Packet-id rules of KDCOM, for both ends of the line (kd-protocol.md 1.5, 1.6).
//!
//! These are pure state machines: the async client and the target simulator drive them.

use super::consts::{INITIAL_PACKET_ID, SYNC_PACKET_ID};

/// What a receiver should do with an incoming data packet, judged by its id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Incoming {
    /// A new packet: ACK it and process it.
    New,
    /// A retransmission of a packet already processed (our ACK got lost): ACK it again and drop it.
    Duplicate,
}

/// Host-side id sequencing.
///
/// - Host data packets carry 0x80800000 / 0x80800001 alternately, starting at 0x80800000 after
///   every RESET and never with the SYNC bit.
/// - Incoming packets: a SYNC-bit id starts a new sequence; the id we expect is processed; the
///   other id of the pair is a duplicate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostIds {
    next_send: u32,
    expected: Option<u32>,
}

impl Default for HostIds {
    fn default() -> Self {
        Self::new()
    }
}

impl HostIds {
    /// State after a RESET exchange.
    pub fn new() -> Self {
        Self {
            next_send: INITIAL_PACKET_ID,
            expected: Some(INITIAL_PACKET_ID),
        }
    }

    /// Back to the initial ids (after a RESET from either side, or a target reboot).
    pub fn reset(&mut self) {
        *self = Self::new();
    }

    /// Forget which id we expect from the target: the next packet starts the sequence, whatever
    /// its id. Used when attaching to a target that is already mid-sequence.
    pub fn forget_expected(&mut self) {
        self.expected = None;
    }

    /// The id our next data packet must carry.
    pub fn next_send_id(&self) -> u32 {
        self.next_send
    }

    /// The id we expect on the next new packet from the target, if known.
    pub fn expected_id(&self) -> Option<u32> {
        self.expected
    }

    /// An ACK arrived: true if it acknowledges our pending packet (then the id toggles).
    pub fn on_ack(&mut self, ack_id: u32) -> bool {
        if ack_id & !SYNC_PACKET_ID == self.next_send {
            self.next_send ^= 1;
            true
        } else {
            false
        }
    }

    /// Our pending packet counts as acknowledged without an ACK (the reply arrived first).
    pub fn assume_acked(&mut self) {
        self.next_send ^= 1;
    }

    /// Accepts `id` as new whatever we expected (the target moved on: see
    /// [`crate::client::KdLink`]'s duplicate check) and expects the other id next.
    pub fn accept(&mut self, id: u32) {
        self.expected = Some((id & !SYNC_PACKET_ID) ^ 1);
    }

    /// Classifies an incoming good data packet and advances the expected id.
    pub fn on_data(&mut self, id: u32) -> Incoming {
        let base = id & !SYNC_PACKET_ID;
        if id & SYNC_PACKET_ID != 0 {
            // A target that starts a new sequence (a fresh boot, or after giving up on a packet:
            // KdDebuggerNotPresent) also expects our ids from 0x80800000 again
            // (kd-protocol.md 9): a host that went on with 0x80800001 would be ACKed and ignored.
            self.expected = Some(base ^ 1);
            self.next_send = INITIAL_PACKET_ID;
            return Incoming::New;
        }
        match self.expected {
            Some(e) if e == id => {
                self.expected = Some(e ^ 1);
                Incoming::New
            }
            Some(e) if e ^ 1 == id => Incoming::Duplicate,
            // Unknown (attach mid-sequence) or an id outside the pair: a new sequence.
            _ => {
                self.expected = Some(id ^ 1);
                Incoming::New
            }
        }
    }
}

/// What a target does with an incoming host data packet (kd-protocol.md 1.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetIncoming {
    /// Expected id: ACK and process.
    New,
    /// The other id of the pair: ACK and drop.
    Duplicate,
    /// Not 0x80800000/0x80800001: answer RESEND.
    Invalid,
}

/// Target-side id sequencing, as kdcom.dll does it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetIds {
    next_send: u32,
    expected: u32,
}

impl Default for TargetIds {
    fn default() -> Self {
        Self::boot()
    }
}

impl TargetIds {
    /// State at boot: first packet carries the SYNC bit.
    pub fn boot() -> Self {
        Self {
            next_send: INITIAL_PACKET_ID | SYNC_PACKET_ID,
            expected: INITIAL_PACKET_ID,
        }
    }

    /// State after a RESET from the host: both ids back to 0x80800000, no SYNC bit.
    pub fn reset(&mut self) {
        self.next_send = INITIAL_PACKET_ID;
        self.expected = INITIAL_PACKET_ID;
    }

    /// Id for the next data packet the target sends.
    pub fn next_send_id(&self) -> u32 {
        self.next_send
    }

    /// The id the target expects on the host's next packet.
    pub fn expected_id(&self) -> u32 {
        self.expected
    }

    /// True if `ack_id` acknowledges the pending packet (compared with the SYNC bit cleared).
    pub fn ack_matches(&self, ack_id: u32) -> bool {
        ack_id == self.next_send & !SYNC_PACKET_ID
    }

    /// The pending packet was delivered: toggle and clear SYNC.
    pub fn on_sent(&mut self) {
        self.next_send = (self.next_send ^ 1) & !SYNC_PACKET_ID;
    }

    /// Classifies a host data packet by id without advancing anything (a packet of the wrong
    /// type is ACKed and dropped with the expected id unchanged).
    pub fn on_data_peek(&self, id: u32) -> TargetIncoming {
        if id != INITIAL_PACKET_ID && id != INITIAL_PACKET_ID | 1 {
            TargetIncoming::Invalid
        } else if id == self.expected {
            TargetIncoming::New
        } else {
            TargetIncoming::Duplicate
        }
    }

    /// Classifies a host data packet by id, advancing the expected id for a new one.
    pub fn on_data(&mut self, id: u32) -> TargetIncoming {
        if id != INITIAL_PACKET_ID && id != INITIAL_PACKET_ID | 1 {
            TargetIncoming::Invalid
        } else if id == self.expected {
            self.expected ^= 1;
            TargetIncoming::New
        } else {
            TargetIncoming::Duplicate
        }
    }
}
