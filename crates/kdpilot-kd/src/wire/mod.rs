//! Sans-IO KDCOM wire format: framing, checksum, decoding and packet-id rules.

pub mod bytes;
pub mod consts;
mod decoder;
mod packet;
mod sequence;

pub use consts::{packet_type, status};
pub use decoder::{DecodeEvent, Decoder, FrameError};
pub use packet::{checksum, EncodeError, Leader, Packet};
pub use sequence::{HostIds, Incoming, TargetIds, TargetIncoming};
