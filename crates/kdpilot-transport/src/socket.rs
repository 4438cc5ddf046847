//! TCP and Unix-domain sockets (and `com:pipe` on Unix hosts, which is a Unix socket).

use std::io;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::{Link, TransportError};

/// How long one TCP connect may take before we call the host unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

const TCP_REFUSED_HINT: &str = "is the VM running, and is its serial port a TCP server \
     (QEMU: -serial tcp::4445,server,nowait)?";

pub(crate) async fn open_tcp(host: &str, port: u16, what: String) -> Result<Link, TransportError> {
    let addrs: Vec<_> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|source| TransportError::Resolve {
            host: host.to_string(),
            source,
        })?
        .collect();
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the host name has no addresses");
    for addr in addrs {
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                stream
                    .set_nodelay(true)
                    .map_err(|source| TransportError::Io {
                        what: what.clone(),
                        source,
                    })?;
                tracing::debug!(%addr, "connected");
                return Ok(Link::tcp(stream, what));
            }
            Ok(Err(e)) => last = e,
            Err(_) => last = io::ErrorKind::TimedOut.into(),
        }
    }
    Err(match last.kind() {
        io::ErrorKind::ConnectionRefused => TransportError::ConnectionRefused {
            what,
            hint: TCP_REFUSED_HINT,
        },
        io::ErrorKind::TimedOut => TransportError::TimedOut {
            what,
            after: CONNECT_TIMEOUT,
        },
        _ => TransportError::Io { what, source: last },
    })
}

#[cfg(unix)]
pub(crate) use unix::open_unix;

#[cfg(unix)]
mod unix {
    use std::io;
    use std::os::unix::fs::FileTypeExt;
    use std::path::Path;

    use crate::{Link, TransportError};

    const MISSING_HINT: &str = "is the VM running, and is its COM port a pipe/socket server at \
         this path (VirtualBox: port mode 'Host Pipe' with 'Connect to existing pipe/socket' \
         unchecked; QEMU: -serial unix:PATH,server,nowait)? Add `,reconnect` to wait for it";
    const REFUSED_HINT: &str = "the socket file exists but nothing listens on it: the VM is not \
         running, or left a stale socket behind";
    const PERMISSION_HINT: &str = "the socket belongs to the user the VM runs as: run kdpilot as \
         that user, or give your user access to the socket (group or mode)";

    pub(crate) async fn open_unix(path: &Path, what: String) -> Result<Link, TransportError> {
        match std::fs::metadata(path) {
            Ok(meta) if meta.file_type().is_char_device() => {
                return Err(TransportError::Unsupported {
                    what,
                    reason: format!(
                        "{} is a character device (a serial port?), not a socket: use com:port={}",
                        path.display(),
                        path.display()
                    ),
                })
            }
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(TransportError::Unsupported {
                    what,
                    reason: format!("{} exists but is not a socket", path.display()),
                })
            }
            _ => {}
        }
        match tokio::net::UnixStream::connect(path).await {
            Ok(stream) => {
                tracing::debug!(path = %path.display(), "connected");
                Ok(Link::unix(stream, what))
            }
            Err(source) => Err(match source.kind() {
                io::ErrorKind::NotFound => TransportError::NotFound {
                    what,
                    hint: MISSING_HINT,
                },
                io::ErrorKind::ConnectionRefused => TransportError::ConnectionRefused {
                    what,
                    hint: REFUSED_HINT,
                },
                io::ErrorKind::PermissionDenied => TransportError::PermissionDenied {
                    what,
                    hint: PERMISSION_HINT,
                    source,
                },
                _ => TransportError::Io { what, source },
            }),
        }
    }
}
