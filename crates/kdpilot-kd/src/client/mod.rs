//! The async host-side KD client over any `AsyncRead + AsyncWrite` (feature `client`).
//!
//! Layers:
//! - [`KdLink`]: the link layer (ACK wait, retransmit, RESEND, RESET, duplicates).
//! - [`Connection`] / [`Stopped`] / [`Running`]: the session as types. Memory and registers can
//!   be read only from a [`Stopped`] target; [`Stopped::resume`] consumes it and returns a
//!   [`Running`] one, which can only wait for the next stop or break in.
//!
//! DbgPrint strings, DbgPrompt questions and FILE_IO requests are handled wherever they
//! arrive: prints go to `tracing` and to the caller's [`EventSink`], prompts are answered (the
//! target hangs otherwise), file requests get STATUS_NO_SUCH_FILE as WinDbg answers them.

mod link;
mod session;
mod timing;
pub mod unsolicited;

pub use link::{KdLink, LinkStats, Received};
pub use session::{ClientConfig, Connection, Running, Stopped, WaitOutcome};
pub use timing::Timing;

use tokio::sync::mpsc;

/// Something the client did or saw that a caller may want to show or log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientEvent {
    /// A DbgPrint string from the target (raw bytes, untrusted: escape before printing).
    DebugPrint(Vec<u8>),
    /// A DbgPrompt from the target and the answer sent.
    Prompt {
        /// The prompt text (raw bytes).
        prompt: Vec<u8>,
        /// What was answered.
        answer: String,
    },
    /// A FILE_IO request (answered STATUS_NO_SUCH_FILE).
    FileRequest {
        /// The file name the target asked for.
        name: String,
    },
    /// A damaged frame was received (a RESEND was requested).
    FrameError(String),
    /// The link was resynchronised with RESET.
    Resynchronised,
}

/// Where [`ClientEvent`]s go: nowhere, or an unbounded channel the caller drains.
#[derive(Clone, Debug, Default)]
pub struct EventSink(Option<mpsc::UnboundedSender<ClientEvent>>);

impl EventSink {
    /// A sink that drops everything.
    pub fn none() -> Self {
        Self(None)
    }

    /// A sink and the receiver that gets its events.
    pub fn channel() -> (Self, mpsc::UnboundedReceiver<ClientEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self(Some(tx)), rx)
    }

    /// Sends an event (dropped if nobody listens).
    pub fn emit(&self, ev: ClientEvent) {
        if let Some(tx) = &self.0 {
            let _ = tx.send(ev);
        }
    }
}

/// Errors of the client. [`KdError::is_fatal`] separates the ones that end the session (the
/// caller reconnects) from the ones that only failed one request.
#[derive(Debug, thiserror::Error)]
pub enum KdError {
    /// The stream closed or failed: reopen the transport and reconnect.
    #[error("link lost: {0}")]
    LinkLost(String),
    /// The target stopped answering.
    #[error("the target did not answer: timed out waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
    },
    /// The reply kept arriving damaged and was given up (a noisy line and a large reply): ask
    /// again for less.
    #[error("the reply to {api} kept arriving damaged; giving up on it")]
    ReplyLost {
        /// API name.
        api: &'static str,
    },
    /// The target said something the protocol does not allow here.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A reply could not be decoded, or reported failure.
    #[error(transparent)]
    Payload(#[from] crate::PayloadError),
    /// While a request was being served the target reported another stop, and a RESET
    /// exchange confirmed it is in that stop now: the stop being served was a stale copy of
    /// one already continued. The [`Stopped`] now holds the new stop (see
    /// [`Stopped::take_stop_changed`]); handle it from the start.
    #[error("the target is in another stop than the one being served (a stale copy of an earlier stop was taken for the current one)")]
    StopChanged,
}

impl KdError {
    pub(crate) fn io(e: std::io::Error) -> Self {
        KdError::LinkLost(e.to_string())
    }

    /// True if the session cannot go on (link lost, target silent); false if only one request
    /// failed (a failed status, an undecodable reply).
    pub fn is_fatal(&self) -> bool {
        matches!(self, KdError::LinkLost(_) | KdError::Timeout { .. })
    }
}
