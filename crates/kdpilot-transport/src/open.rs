//! Opening an [`Endpoint`]: once ([`open`]), or waiting for it to appear ([`open_waiting`]).

use std::fmt;
use std::time::{Duration, Instant};

use crate::{Endpoint, EndpointKind, Link, TransportError};

/// Opens the endpoint once.
///
/// - Serial: 8N1, no flow control, the endpoint's baud rate; exclusive access on Unix; stale
///   input in the driver is dropped.
/// - `com:pipe`: a named pipe on Windows (retried for up to 2 s while every instance is busy,
///   `ERROR_PIPE_BUSY`); a Unix socket path on Unix hosts.
/// - TCP: `TCP_NODELAY` set; 10 s connect timeout per address.
/// - `unix:`: a Unix-domain stream socket (an error on Windows).
///
/// Errors say what to do (see [`TransportError`]); [`TransportError::is_transient`] tells the
/// ones where waiting may help.
pub async fn open(endpoint: &Endpoint) -> Result<Link, TransportError> {
    let what = endpoint.description();
    match endpoint.kind() {
        EndpointKind::Serial { port, baud } => crate::serial::open(port, *baud),
        EndpointKind::Tcp { host, port } => crate::socket::open_tcp(host, *port, what).await,
        EndpointKind::Pipe { path } => open_pipe(path, what).await,
        EndpointKind::Unix { path } => {
            #[cfg(unix)]
            return crate::socket::open_unix(path, what).await;
            #[cfg(not(unix))]
            {
                let _ = path;
                Err(TransportError::Unsupported {
                    what,
                    reason: r"Unix sockets are not supported on this host; a VM's COM port on a \
                        Windows host is a named pipe: use com:pipe,port=\\.\pipe\NAME"
                        .into(),
                })
            }
        }
    }
}

#[cfg(windows)]
async fn open_pipe(path: &str, what: String) -> Result<Link, TransportError> {
    crate::pipe_windows::open(path, what).await
}

#[cfg(unix)]
async fn open_pipe(path: &str, what: String) -> Result<Link, TransportError> {
    if path.starts_with(r"\\") {
        return Err(TransportError::Unsupported {
            what: format!("named pipe {path}"),
            reason: format!(
                "`{path}` is a Windows named pipe, and this host is not Windows. Here VirtualBox, \
                 VMware and QEMU expose a VM's COM port as a Unix socket: use \
                 com:pipe,port=/path/to/socket (VirtualBox: the 'Path/Address' of the 'Host Pipe' \
                 port, e.g. /tmp/com_1)"
            ),
        });
    }
    crate::socket::open_unix(std::path::Path::new(path), what).await
}

#[cfg(not(any(unix, windows)))]
async fn open_pipe(path: &str, what: String) -> Result<Link, TransportError> {
    let _ = path;
    Err(TransportError::Unsupported {
        what,
        reason: "pipes are not supported on this platform".into(),
    })
}

/// How [`open_waiting`] polls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitOptions {
    /// Delay before the second attempt; it doubles after each attempt up to `max_delay`.
    pub initial_delay: Duration,
    /// Longest delay between attempts.
    pub max_delay: Duration,
    /// Give up with [`TransportError::WaitTimedOut`] after this long; `None` waits until the
    /// future is dropped.
    pub give_up_after: Option<Duration>,
}

impl Default for WaitOptions {
    /// 100 ms, doubling up to 1 s, forever.
    fn default() -> Self {
        Self {
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            give_up_after: None,
        }
    }
}

/// One failed attempt of [`open_waiting`], reported before it sleeps. Its `Display` is a
/// ready-made spinner line: `waiting for named pipe \\.\pipe\com_1 to appear`.
#[derive(Debug)]
#[non_exhaustive]
pub struct WaitEvent<'a> {
    /// The endpoint being waited for.
    pub endpoint: &'a Endpoint,
    /// Attempts made so far (1 after the first failure).
    pub attempt: u32,
    /// Time since `open_waiting` was called.
    pub waited: Duration,
    /// Delay before the next attempt.
    pub retry_in: Duration,
    /// Why the last attempt failed (always [`TransportError::is_transient`]).
    pub reason: &'a TransportError,
}

impl fmt::Display for WaitEvent<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = self.endpoint.description();
        match self.reason {
            TransportError::SerialPortNotFound { .. } | TransportError::NotFound { .. } => {
                write!(f, "waiting for {what} to appear")
            }
            TransportError::ConnectionRefused { .. } => {
                write!(f, "waiting for {what} to accept connections")
            }
            TransportError::Busy { .. } => write!(f, "waiting for {what} to be free"),
            other => write!(f, "waiting for {what} ({other})"),
        }
    }
}

/// Opens the endpoint; when it has `reconnect`, waits for it first.
///
/// Without `reconnect` this is [`open`]. With it, transient failures (pipe/socket/port missing,
/// connection refused, busy; see [`TransportError::is_transient`]) are retried with backoff
/// until the endpoint opens, each one reported to `on_wait` (and logged with `tracing`) so a CLI
/// can show a spinner. Other errors (permissions, wrong kind of file) return at once.
///
/// Cancel by dropping the future (e.g. in `tokio::select!` with Ctrl+C); nothing is left open.
/// After a link is lost, call this again to reopen.
pub async fn open_waiting<F>(
    endpoint: &Endpoint,
    options: &WaitOptions,
    mut on_wait: F,
) -> Result<Link, TransportError>
where
    F: FnMut(&WaitEvent<'_>) + Send,
{
    if !endpoint.reconnect() {
        return open(endpoint).await;
    }
    let started = Instant::now();
    let mut delay = options.initial_delay;
    let mut attempt = 0u32;
    loop {
        let error = match open(endpoint).await {
            Ok(link) => {
                if attempt > 0 {
                    tracing::info!(endpoint = %endpoint, attempts = attempt + 1, "opened after waiting");
                }
                return Ok(link);
            }
            Err(e) if e.is_transient() => e,
            Err(e) => return Err(e),
        };
        attempt += 1;
        let waited = started.elapsed();
        if let Some(limit) = options.give_up_after {
            if waited >= limit {
                return Err(TransportError::WaitTimedOut {
                    what: endpoint.description(),
                    waited,
                    last: Box::new(error),
                });
            }
        }
        let retry_in = match options.give_up_after {
            Some(limit) => delay.min(limit.saturating_sub(waited)),
            None => delay,
        };
        report(
            &WaitEvent {
                endpoint,
                attempt,
                waited,
                retry_in,
                reason: &error,
            },
            &mut on_wait,
        );
        tokio::time::sleep(retry_in).await;
        delay = (delay * 2).min(options.max_delay.max(options.initial_delay));
    }
}

/// Logs a wait event and hands it to the caller's callback.
fn report<F: FnMut(&WaitEvent<'_>)>(event: &WaitEvent<'_>, on_wait: &mut F) {
    if event.attempt == 1 {
        tracing::info!(reason = %event.reason, "{event}");
    } else {
        tracing::debug!(attempt = event.attempt, reason = %event.reason, "{event}");
    }
    on_wait(event);
}
