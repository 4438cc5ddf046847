//! A simulated Windows kernel debug target that speaks KDCOM like the real kernel does,
//! quirks included (kd-protocol.md): it only polls for the break-in byte while running, sends
//! SYNC ids at boot, answers RESET with a junk id and resends what it was delivering, ACKs and
//! drops duplicates and wrong packet types, and answers unknown APIs with STATUS_UNSUCCESSFUL.
//!
//! It is part of the product (the README's demo runs on it) and the peer of every
//! integration test.

pub mod kernel;
pub mod line;
pub mod link;
pub mod memory;
pub mod target;

pub use kernel::Machine;
pub use line::{FaultyLine, LineModel};
pub use target::{serve, Chatter, SessionEnd, TargetOptions};
