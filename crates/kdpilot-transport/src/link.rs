//! An open byte stream to the target.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What kind of stream a [`Link`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LinkKind {
    /// A serial port.
    Serial,
    /// A Windows named pipe.
    NamedPipe,
    /// A Unix-domain socket.
    UnixSocket,
    /// A TCP connection.
    Tcp,
    /// A stream supplied by the caller ([`Link::from_stream`]): a simulator, `tokio::io::duplex`.
    Other,
}

/// Any stream a [`Link`] can wrap.
trait Duplex: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Duplex for T {}

enum Inner {
    Serial(tokio_serial::SerialStream),
    Tcp(tokio::net::TcpStream),
    #[cfg(unix)]
    Unix(tokio::net::UnixStream),
    #[cfg(windows)]
    Pipe(tokio::net::windows::named_pipe::NamedPipeClient),
    Other(Box<dyn Duplex>),
}

/// An open link to the target: `AsyncRead + AsyncWrite + Unpin + Send`, bytes only.
///
/// Made by [`crate::open`] / [`crate::open_waiting`], or by [`Link::from_stream`] around any
/// stream. A read returning `Ok(0)` or an error for which [`crate::is_link_lost`] holds means
/// the link is gone: drop it and reopen.
pub struct Link {
    inner: Inner,
    peer: String,
}

impl Link {
    pub(crate) fn serial(stream: tokio_serial::SerialStream, peer: String) -> Self {
        Self {
            inner: Inner::Serial(stream),
            peer,
        }
    }

    pub(crate) fn tcp(stream: tokio::net::TcpStream, peer: String) -> Self {
        Self {
            inner: Inner::Tcp(stream),
            peer,
        }
    }

    #[cfg(unix)]
    pub(crate) fn unix(stream: tokio::net::UnixStream, peer: String) -> Self {
        Self {
            inner: Inner::Unix(stream),
            peer,
        }
    }

    #[cfg(windows)]
    pub(crate) fn pipe(
        stream: tokio::net::windows::named_pipe::NamedPipeClient,
        peer: String,
    ) -> Self {
        Self {
            inner: Inner::Pipe(stream),
            peer,
        }
    }

    /// Wraps any stream, e.g. one end of `tokio::io::duplex` joined to a simulator, so callers
    /// can treat it like a real link. `peer` names it in messages.
    pub fn from_stream<S>(stream: S, peer: impl Into<String>) -> Self
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        Self {
            inner: Inner::Other(Box::new(stream)),
            peer: peer.into(),
        }
    }

    /// What kind of stream this is.
    pub fn kind(&self) -> LinkKind {
        match self.inner {
            Inner::Serial(_) => LinkKind::Serial,
            Inner::Tcp(_) => LinkKind::Tcp,
            #[cfg(unix)]
            Inner::Unix(_) => LinkKind::UnixSocket,
            #[cfg(windows)]
            Inner::Pipe(_) => LinkKind::NamedPipe,
            Inner::Other(_) => LinkKind::Other,
        }
    }

    /// The other end, for messages: `serial port COM1`, `TCP 127.0.0.1:4445`.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Drops input that has already arrived and not been read: the serial driver's receive
    /// buffer and whatever the stream holds right now. Does not wait. Returns how many bytes
    /// were dropped, as far as known (a serial driver may not say).
    ///
    /// Call it before (re)synchronising: stale RESET/ACK bytes buffered in a VM pipe otherwise
    /// start an endless RESET ping-pong.
    pub fn discard_input(&mut self) -> io::Result<usize> {
        let mut dropped = 0usize;
        if let Inner::Serial(port) = &self.inner {
            use tokio_serial::SerialPort;
            dropped += port.bytes_to_read().unwrap_or(0) as usize;
            port.clear(tokio_serial::ClearBuffer::Input)
                .map_err(io::Error::from)?;
        }
        // Poll without a real waker: data already here is returned, anything else is Pending.
        let mut cx = Context::from_waker(Waker::noop());
        let mut buf = [0u8; 4096];
        // Bounded, so a peer that floods us cannot keep this loop going.
        for _ in 0..256 {
            let mut read_buf = ReadBuf::new(&mut buf);
            match Pin::new(&mut *self).poll_read(&mut cx, &mut read_buf) {
                Poll::Ready(Ok(())) if read_buf.filled().is_empty() => break,
                Poll::Ready(Ok(())) => dropped += read_buf.filled().len(),
                Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => break,
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => break,
            }
        }
        if dropped > 0 {
            tracing::debug!(peer = %self.peer, dropped, "discarded stale input");
        }
        Ok(dropped)
    }
}

impl fmt::Debug for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Link")
            .field("kind", &self.kind())
            .field("peer", &self.peer)
            .finish()
    }
}

/// Forwards a call to whichever stream `inner` holds.
macro_rules! delegate {
    ($self:ident, $s:ident => $call:expr) => {
        match &mut $self.get_mut().inner {
            Inner::Serial($s) => $call,
            Inner::Tcp($s) => $call,
            #[cfg(unix)]
            Inner::Unix($s) => $call,
            #[cfg(windows)]
            Inner::Pipe($s) => $call,
            Inner::Other($s) => $call,
        }
    };
}

impl AsyncRead for Link {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Link {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_shutdown(cx))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => Pin::new(s).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.inner {
            Inner::Serial(s) => s.is_write_vectored(),
            Inner::Tcp(s) => s.is_write_vectored(),
            #[cfg(unix)]
            Inner::Unix(s) => s.is_write_vectored(),
            #[cfg(windows)]
            Inner::Pipe(s) => s.is_write_vectored(),
            Inner::Other(s) => s.is_write_vectored(),
        }
    }
}
