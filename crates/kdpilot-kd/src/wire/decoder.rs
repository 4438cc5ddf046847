//! The receive state machine: a byte pump that finds leaders, validates once and resynchronises
//! after garbage (kd-protocol.md 1.4).
//!
//! "Not enough bytes yet" is normal flow: [`Decoder::push`] returns `None` until something
//! complete happened. Framing errors are events, not failures: the link layer answers them with a
//! RESEND, exactly as a Windows target does.

use super::consts::*;
use super::packet::{checksum, Leader, Packet};

/// Something the decoder recognised in the byte stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeEvent {
    /// A complete packet whose trailer and checksum are good.
    Packet(Packet),
    /// A lone break-in byte (`'b'`) seen while hunting for a leader.
    BreakIn,
    /// A damaged packet; the decoder is hunting for the next leader again.
    Error(FrameError),
}

/// A packet that was framed but failed validation.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The payload bytes do not add up to the header's checksum.
    #[error("checksum mismatch in packet id {id:#010x}: header says {expected:#010x}, payload sums to {actual:#010x}")]
    BadChecksum {
        /// PacketId of the damaged packet.
        id: u32,
        /// Checksum from the header.
        expected: u32,
        /// Sum of the received payload.
        actual: u32,
    },
    /// The byte after the payload was not 0xAA.
    #[error("bad trailer {byte:#04x} after packet id {id:#010x} (expected 0xaa)")]
    BadTrailer {
        /// PacketId of the damaged packet.
        id: u32,
        /// The byte found instead.
        byte: u8,
    },
    /// ByteCount larger than the decoder's limit.
    #[error("packet id {id:#010x} claims {count} payload bytes (limit {limit})")]
    TooLong {
        /// PacketId from the header.
        id: u32,
        /// ByteCount from the header.
        count: u16,
        /// The configured limit.
        limit: usize,
    },
    /// The line went quiet in the middle of a packet ([`Decoder::abandon_partial`]).
    #[error("line went idle after {received} bytes of a packet")]
    Truncated {
        /// Bytes of the packet (leader included) that had arrived.
        received: usize,
        /// PacketId, if the header had arrived.
        id: Option<u32>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Hunting: `run` identical leader bytes of value `byte` seen so far.
    Leader { byte: u8, run: u8 },
    /// Reading the 12 header bytes after the leader.
    Header { leader: Leader, have: usize },
    /// Reading the payload.
    Payload,
    /// Waiting for the 0xAA trailer.
    Trailer,
}

/// Byte-pump decoder. Feed it bytes in any split; it yields [`DecodeEvent`]s.
#[derive(Clone, Debug)]
pub struct Decoder {
    state: State,
    leader: Leader,
    header: [u8; 12],
    payload: Vec<u8>,
    count: usize,
    max_payload: usize,
    skipped: u64,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder {
    /// A decoder with the Windows limit of [`PACKET_MAX_SIZE`] payload bytes.
    pub fn new() -> Self {
        Self::with_limit(PACKET_MAX_SIZE)
    }

    /// A decoder with a custom payload limit (some stubs use 4096).
    pub fn with_limit(max_payload: usize) -> Self {
        Self {
            state: State::Leader { byte: 0, run: 0 },
            leader: Leader::Data,
            header: [0; 12],
            payload: Vec::new(),
            count: 0,
            max_payload,
            skipped: 0,
        }
    }

    /// Bytes discarded so far while hunting for a leader (garbage, noise, stray bytes).
    pub fn skipped_bytes(&self) -> u64 {
        self.skipped
    }

    /// True when the decoder is between packets (not inside a frame).
    pub fn is_idle(&self) -> bool {
        matches!(self.state, State::Leader { run: 0, .. })
    }

    /// Bytes of the current partial frame (0 when hunting with no leader byte seen).
    pub fn partial_len(&self) -> usize {
        match self.state {
            State::Leader { run, .. } => usize::from(run),
            State::Header { have, .. } => 4 + have,
            State::Payload => 16 + self.payload.len(),
            State::Trailer => 16 + self.payload.len(),
        }
    }

    /// Gives up on a partial frame (the line went idle mid-packet, as the target's per-byte
    /// timeout does). Returns a [`FrameError::Truncated`] event if a frame was in progress.
    pub fn abandon_partial(&mut self) -> Option<DecodeEvent> {
        let received = self.partial_len();
        let in_frame = !matches!(self.state, State::Leader { .. });
        let id = matches!(self.state, State::Payload | State::Trailer).then(|| self.id());
        self.state = State::Leader { byte: 0, run: 0 };
        self.payload.clear();
        if in_frame {
            Some(DecodeEvent::Error(FrameError::Truncated { received, id }))
        } else {
            self.skipped += received as u64;
            None
        }
    }

    /// Feeds a buffer, appending every event to `out`.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<DecodeEvent>) {
        for &b in bytes {
            if let Some(ev) = self.push(b) {
                out.push(ev);
            }
        }
    }

    /// Feeds one byte.
    pub fn push(&mut self, b: u8) -> Option<DecodeEvent> {
        match self.state {
            State::Leader { byte, run } => self.hunt(byte, run, b),
            State::Header { leader, have } => {
                if have == 0 && b == leader_byte(leader) {
                    // More than four leader bytes (a stray '0' before the packet): no packet type
                    // starts with 0x30 or 0x69, so the leader simply continues.
                    self.skipped += 1;
                    return None;
                }
                if let Some(slot) = self.header.get_mut(have) {
                    *slot = b;
                }
                let have = have + 1;
                if have < self.header.len() {
                    self.state = State::Header { leader, have };
                    return None;
                }
                self.header_done(leader)
            }
            State::Payload => {
                self.payload.push(b);
                if self.payload.len() >= self.count {
                    self.state = State::Trailer;
                }
                None
            }
            State::Trailer => {
                self.state = State::Leader { byte: 0, run: 0 };
                let id = self.id();
                let payload = std::mem::take(&mut self.payload);
                if b != PACKET_TRAILING_BYTE {
                    // A dropped payload byte makes us read the next packet's first leader byte as
                    // the trailer: count it towards the next leader so that packet is not lost too.
                    if b == PACKET_LEADER_BYTE || b == CONTROL_PACKET_LEADER_BYTE {
                        self.state = State::Leader { byte: b, run: 1 };
                    }
                    return Some(DecodeEvent::Error(FrameError::BadTrailer { id, byte: b }));
                }
                let expected = self.header_u32(8);
                let actual = checksum(&payload);
                if expected != actual {
                    return Some(DecodeEvent::Error(FrameError::BadChecksum {
                        id,
                        expected,
                        actual,
                    }));
                }
                Some(DecodeEvent::Packet(Packet {
                    leader: Leader::Data,
                    packet_type: self.header_u16(0),
                    id,
                    payload,
                }))
            }
        }
    }

    fn hunt(&mut self, byte: u8, run: u8, b: u8) -> Option<DecodeEvent> {
        if b == PACKET_LEADER_BYTE || b == CONTROL_PACKET_LEADER_BYTE {
            let run = if b == byte {
                run + 1
            } else {
                // A different leader byte abandons the run so far.
                self.skipped += u64::from(run);
                1
            };
            if run == 4 {
                let leader = if b == PACKET_LEADER_BYTE {
                    Leader::Data
                } else {
                    Leader::Control
                };
                self.state = State::Header { leader, have: 0 };
            } else {
                self.state = State::Leader { byte: b, run };
            }
            return None;
        }
        self.skipped += u64::from(run) + 1;
        self.state = State::Leader { byte: 0, run: 0 };
        if b == BREAKIN_PACKET_BYTE {
            self.skipped -= 1;
            return Some(DecodeEvent::BreakIn);
        }
        None
    }

    fn header_done(&mut self, leader: Leader) -> Option<DecodeEvent> {
        self.leader = leader;
        let packet_type = self.header_u16(0);
        let count = self.header_u16(2);
        let id = self.id();
        self.state = State::Leader { byte: 0, run: 0 };
        if leader == Leader::Control {
            // Control packets have no payload and no trailer, whatever ByteCount says.
            return Some(DecodeEvent::Packet(Packet::control(packet_type, id)));
        }
        if usize::from(count) > self.max_payload {
            return Some(DecodeEvent::Error(FrameError::TooLong {
                id,
                count,
                limit: self.max_payload,
            }));
        }
        self.count = usize::from(count);
        self.payload.clear();
        self.payload.reserve(self.count);
        self.state = if count == 0 {
            State::Trailer
        } else {
            State::Payload
        };
        None
    }

    fn header_u16(&self, off: usize) -> u16 {
        let mut a = [0u8; 2];
        if let Some(s) = self.header.get(off..off + 2) {
            a.copy_from_slice(s);
        }
        u16::from_le_bytes(a)
    }

    fn header_u32(&self, off: usize) -> u32 {
        let mut a = [0u8; 4];
        if let Some(s) = self.header.get(off..off + 4) {
            a.copy_from_slice(s);
        }
        u32::from_le_bytes(a)
    }

    fn id(&self) -> u32 {
        self.header_u32(4)
    }
}

fn leader_byte(leader: Leader) -> u8 {
    match leader {
        Leader::Data => PACKET_LEADER_BYTE,
        Leader::Control => CONTROL_PACKET_LEADER_BYTE,
    }
}

impl FrameError {
    /// The PacketId of the damaged data packet, when its header arrived (it may itself be
    /// damaged: compare it with the id you expect before acting on it).
    pub fn packet_id(&self) -> Option<u32> {
        match self {
            FrameError::BadChecksum { id, .. }
            | FrameError::BadTrailer { id, .. }
            | FrameError::TooLong { id, .. } => Some(*id),
            FrameError::Truncated { id, .. } => *id,
        }
    }
}
