//! The Windows KD protocol as spoken over a serial line (KDCOM), host side.
//!
//! - [`wire`]: sans-IO framing, checksum, the byte-pump [`wire::Decoder`] and the packet-id rules
//!   of both ends. No tokio, no `unsafe`, no panic on any input.
//! - [`api`], [`state_change`], [`debug_io`], [`file_io`], [`version`], [`kddebugger_data`],
//!   [`context`]: typed payloads for AMD64 and x86 targets.
//! - `client` (feature `client`, on by default): an async host-side client over any
//!   `AsyncRead + AsyncWrite`.
//!
//! Every offset comes from `docs/kd-protocol.md` and is checked against real WinDbg traffic in
//! the tests.
#![cfg_attr(
    not(test),
    warn(
        clippy::indexing_slicing,
        clippy::unwrap_used,
        clippy::panic,
        clippy::expect_used
    )
)]

pub mod api;
mod arch;
pub mod context;
pub mod debug_io;
pub mod file_io;
pub mod kddebugger_data;
pub mod state_change;
pub mod version;
pub mod wire;

#[cfg(feature = "client")]
pub mod client;

pub use arch::Arch;

/// A payload could not be decoded or a reply reported failure.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    /// The payload is shorter than the structure needs.
    #[error("{what} truncated: need {need} bytes, have {have}")]
    Truncated {
        /// Structure name.
        what: &'static str,
        /// Bytes needed.
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// A reply for another API arrived.
    #[error("reply for API {got:#06x} where {expected:#06x} was expected")]
    WrongApi {
        /// ApiNumber requested.
        expected: u32,
        /// ApiNumber in the reply.
        got: u32,
    },
    /// The target answered with a failure status.
    #[error("{api} failed with status {status:#010x}")]
    Failed {
        /// API name.
        api: &'static str,
        /// ReturnStatus.
        status: u32,
    },
    /// A field holds a value the structure cannot have.
    #[error("{what}: {detail}")]
    Invalid {
        /// Structure or field name.
        what: &'static str,
        /// What is wrong.
        detail: String,
    },
}
