//! KD_PACKET framing: encode data and control packets (kd-protocol.md 1.2, 1.7).

use super::consts::*;

/// Which leader a packet was framed with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Leader {
    /// `"0000"`: data packet with payload, checksum and 0xAA trailer.
    Data,
    /// `"iiii"`: control packet (ACK/RESEND/RESET), header only.
    Control,
}

impl Leader {
    /// The 32-bit leader value.
    pub fn value(self) -> u32 {
        match self {
            Leader::Data => PACKET_LEADER,
            Leader::Control => CONTROL_PACKET_LEADER,
        }
    }
}

/// One framed packet, as sent or received.
///
/// For control packets `payload` is empty and the checksum on the wire is 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    /// Data or control leader.
    pub leader: Leader,
    /// PacketType (see [`packet_type`]).
    pub packet_type: u16,
    /// PacketId.
    pub id: u32,
    /// Payload (ByteCount bytes); empty for control packets.
    pub payload: Vec<u8>,
}

/// A packet could not be encoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The payload is larger than a Windows target accepts.
    #[error("payload of {len} bytes exceeds the KD limit of {PACKET_MAX_SIZE} bytes")]
    TooLarge {
        /// Payload length.
        len: usize,
    },
}

/// The KD checksum: the 32-bit unsigned sum of all payload bytes.
pub fn checksum(payload: &[u8]) -> u32 {
    payload
        .iter()
        .fold(0u32, |acc, &b| acc.wrapping_add(u32::from(b)))
}

impl Packet {
    /// A data packet. Fails if the payload exceeds [`PACKET_MAX_SIZE`].
    pub fn data(packet_type: u16, id: u32, payload: Vec<u8>) -> Result<Self, EncodeError> {
        if payload.len() > PACKET_MAX_SIZE {
            return Err(EncodeError::TooLarge { len: payload.len() });
        }
        Ok(Self {
            leader: Leader::Data,
            packet_type,
            id,
            payload,
        })
    }

    /// A control packet (ACK, RESEND or RESET).
    pub fn control(packet_type: u16, id: u32) -> Self {
        Self {
            leader: Leader::Control,
            packet_type,
            id,
            payload: Vec::new(),
        }
    }

    /// ACK for a received data packet id. The SYNC bit is cleared, as every Windows target
    /// requires (kd-protocol.md 1.6).
    pub fn ack(received_id: u32) -> Self {
        Self::control(packet_type::KD_ACKNOWLEDGE, received_id & !SYNC_PACKET_ID)
    }

    /// RESEND request (id 0).
    pub fn resend() -> Self {
        Self::control(packet_type::KD_RESEND, 0)
    }

    /// RESET (id 0, as WinDbg sends it).
    pub fn reset() -> Self {
        Self::control(packet_type::KD_RESET, 0)
    }

    /// The checksum this packet carries on the wire.
    pub fn wire_checksum(&self) -> u32 {
        match self.leader {
            Leader::Data => checksum(&self.payload),
            Leader::Control => 0,
        }
    }

    /// Number of bytes [`Packet::encode`] produces.
    pub fn wire_len(&self) -> usize {
        match self.leader {
            Leader::Data => PACKET_HEADER_SIZE + self.payload.len() + 1,
            Leader::Control => PACKET_HEADER_SIZE,
        }
    }

    /// Appends the packet's wire bytes to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.reserve(self.wire_len());
        out.extend_from_slice(&self.leader.value().to_le_bytes());
        out.extend_from_slice(&self.packet_type.to_le_bytes());
        let count = match self.leader {
            Leader::Data => self.payload.len().min(usize::from(u16::MAX)) as u16,
            Leader::Control => 0,
        };
        out.extend_from_slice(&count.to_le_bytes());
        out.extend_from_slice(&self.id.to_le_bytes());
        out.extend_from_slice(&self.wire_checksum().to_le_bytes());
        if self.leader == Leader::Data {
            out.extend_from_slice(self.payload.get(..usize::from(count)).unwrap_or(&[]));
            out.push(PACKET_TRAILING_BYTE);
        }
    }

    /// The packet's wire bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode_into(&mut v);
        v
    }
}
