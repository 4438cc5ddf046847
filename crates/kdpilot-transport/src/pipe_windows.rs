//! Windows named pipes (`com:pipe,port=\\.\pipe\NAME`): the COM port of a Hyper-V, VirtualBox
//! or VMware VM on a Windows host.

use std::io;
use std::time::{Duration, Instant};

use tokio::net::windows::named_pipe::ClientOptions;

use crate::{Link, TransportError};

/// How long to keep retrying while every instance of the pipe is connected to someone else.
pub(crate) const PIPE_BUSY_WAIT: Duration = Duration::from_secs(2);

/// `ERROR_PIPE_BUSY`: the pipe exists but all its instances are connected.
const ERROR_PIPE_BUSY: i32 = 231;

const MISSING_HINT: &str = "is the VM running, and is its COM port a named pipe server \
     (Hyper-V: Set-VMComPort -Path \\\\.\\pipe\\NAME; VirtualBox: port mode 'Host Pipe' with \
     'Connect to existing pipe/socket' unchecked)? Add `,reconnect` to wait for it";
const REMOTE_HINT: &str = "the host in \\\\HOST\\pipe\\NAME cannot be reached, or has no such pipe";
const BUSY_HINT: &str = "another debugger is connected to the pipe (a pipe serves one client \
     at a time); close it and retry";
const PERMISSION_HINT: &str = "Hyper-V creates VM COM pipes for administrators only: run from an \
     elevated prompt";

pub(crate) async fn open(path: &str, what: String) -> Result<Link, TransportError> {
    let started = Instant::now();
    let mut delay = Duration::from_millis(20);
    loop {
        match ClientOptions::new().open(path) {
            Ok(client) => {
                tracing::debug!(path, "connected to named pipe");
                return Ok(Link::pipe(client, what));
            }
            Err(e) if e.raw_os_error() == Some(ERROR_PIPE_BUSY) => {
                if started.elapsed() >= PIPE_BUSY_WAIT {
                    return Err(TransportError::Busy {
                        what,
                        hint: BUSY_HINT,
                    });
                }
                tracing::debug!(path, "named pipe busy (ERROR_PIPE_BUSY), retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_millis(200));
            }
            Err(source) => return Err(classify(what, source)),
        }
    }
}

fn classify(what: String, source: io::Error) -> TransportError {
    match source.raw_os_error() {
        // ERROR_FILE_NOT_FOUND, ERROR_PATH_NOT_FOUND
        Some(2 | 3) => TransportError::NotFound {
            what,
            hint: MISSING_HINT,
        },
        // ERROR_BAD_NETPATH, ERROR_BAD_NET_NAME
        Some(53 | 67) => TransportError::NotFound {
            what,
            hint: REMOTE_HINT,
        },
        // ERROR_ACCESS_DENIED
        Some(5) => TransportError::PermissionDenied {
            what,
            hint: PERMISSION_HINT,
            source,
        },
        _ => TransportError::Io { what, source },
    }
}
