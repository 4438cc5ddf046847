//! Why a link could not be opened, or was lost, and what to do about it.

use std::io;
use std::time::Duration;

/// A failure to open (or keep) a link. Messages say what to do; the underlying OS error, where
/// there is one, is the [`std::error::Error::source`], so print the whole chain (`{:#}` with
/// anyhow).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The serial device does not exist.
    #[error("serial port {port} not found; {}", available_ports_text(.available))]
    SerialPortNotFound {
        /// The port as given.
        port: String,
        /// The serial ports this machine has, from `tokio_serial::available_ports()`.
        available: Vec<String>,
    },
    /// A pipe or socket that does not exist (yet).
    #[error("{what} does not exist: {hint}")]
    NotFound {
        /// `named pipe \\.\pipe\com_1`, `Unix socket /tmp/com_1`.
        what: String,
        /// What to check.
        hint: &'static str,
    },
    /// The OS refused access.
    #[error("permission denied opening {what}: {hint}")]
    PermissionDenied {
        /// What was opened.
        what: String,
        /// What to change.
        hint: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Another program has the port or pipe open.
    #[error("{what} is busy: {hint}")]
    Busy {
        /// What was opened.
        what: String,
        /// Who probably has it.
        hint: &'static str,
    },
    /// Nothing listens at the address.
    #[error("{what} refused the connection: {hint}")]
    ConnectionRefused {
        /// What was connected to.
        what: String,
        /// What to check.
        hint: &'static str,
    },
    /// A TCP connect that got no answer.
    #[error("no answer from {what} within {} s: is the host reachable and the VM running?", .after.as_secs())]
    TimedOut {
        /// What was connected to.
        what: String,
        /// How long we tried.
        after: Duration,
    },
    /// A host name that does not resolve.
    #[error("cannot resolve host `{host}`: check the name, or give an IP address")]
    Resolve {
        /// The host as given.
        host: String,
        /// The resolver's error.
        #[source]
        source: io::Error,
    },
    /// The endpoint cannot be used on this host, or is the wrong kind of file.
    #[error("cannot use {what}: {reason}")]
    Unsupported {
        /// The endpoint.
        what: String,
        /// Why, and what to use instead.
        reason: String,
    },
    /// [`crate::open_waiting`] gave up (only with [`crate::WaitOptions::give_up_after`]).
    #[error("gave up waiting for {what} after {} s", .waited.as_secs())]
    WaitTimedOut {
        /// The endpoint.
        what: String,
        /// How long we waited.
        waited: Duration,
        /// Why the last attempt failed.
        #[source]
        last: Box<TransportError>,
    },
    /// An open link failed (EOF, broken pipe, reset). Reopen it if the endpoint has `reconnect`.
    #[error("link to {what} lost")]
    LinkLost {
        /// The endpoint.
        what: String,
        /// The I/O error (`UnexpectedEof` for a clean EOF).
        #[source]
        source: io::Error,
    },
    /// Any other OS error while opening.
    #[error("cannot open {what}")]
    Io {
        /// What was opened.
        what: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Any other error from the serial port library.
    #[error("cannot open serial port {port}")]
    Serial {
        /// The port as given.
        port: String,
        /// The serial library's error.
        #[source]
        source: tokio_serial::Error,
    },
}

fn available_ports_text(available: &[String]) -> String {
    if available.is_empty() {
        "this machine reports no serial ports (is the USB adapter plugged in?)".into()
    } else {
        format!("available serial ports: {}", available.join(", "))
    }
}

impl TransportError {
    /// Whether trying again later may succeed: the endpoint is missing, refused, busy or timed
    /// out, or an open link was lost. [`crate::open_waiting`] keeps waiting on these; a caller
    /// whose link failed reopens on these (when the endpoint has `reconnect`). Configuration
    /// problems (permissions, wrong kind of file, unsupported on this host) are not transient.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::SerialPortNotFound { .. }
            | Self::NotFound { .. }
            | Self::Busy { .. }
            | Self::ConnectionRefused { .. }
            | Self::TimedOut { .. }
            | Self::LinkLost { .. } => true,
            Self::Io { source, .. } => {
                is_link_lost(source)
                    || matches!(
                        source.kind(),
                        io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
                    )
            }
            Self::Serial { source, .. } => matches!(
                source.kind,
                tokio_serial::ErrorKind::NoDevice
                    | tokio_serial::ErrorKind::Io(
                        io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                            | io::ErrorKind::BrokenPipe
                    )
            ),
            Self::PermissionDenied { .. }
            | Self::Resolve { .. }
            | Self::Unsupported { .. }
            | Self::WaitTimedOut { .. } => false,
        }
    }

    /// Wraps an I/O error from reading or writing an open link (`what` names the endpoint).
    /// Link-lost errors (see [`is_link_lost`]) become [`TransportError::LinkLost`].
    pub fn from_link_io(what: impl Into<String>, source: io::Error) -> Self {
        let what = what.into();
        if is_link_lost(&source) {
            Self::LinkLost { what, source }
        } else {
            Self::Io { what, source }
        }
    }
}

/// Whether an I/O error from an open link means the other end went away (EOF, broken pipe,
/// connection reset, pipe closed by the VM), so the link must be reopened. A read returning
/// `Ok(0)` is the same condition.
pub fn is_link_lost(err: &io::Error) -> bool {
    // ERROR_BROKEN_PIPE, ERROR_NO_DATA, ERROR_PIPE_NOT_CONNECTED: the VM closed or recreated its pipe.
    #[cfg(windows)]
    if matches!(err.raw_os_error(), Some(109 | 232 | 233)) {
        return true;
    }
    matches!(
        err.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::NotConnected
    )
}
