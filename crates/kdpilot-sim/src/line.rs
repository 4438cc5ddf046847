//! The line between host and target: a stream wrapper that throttles to a baud rate and
//! corrupts or drops bytes at seeded rates, in both directions (ptys and sockets ignore baud).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Fault and speed settings of a line.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LineModel {
    /// Baud rate to throttle to (10 bits per byte), or `None` for full speed.
    pub baud: Option<u32>,
    /// Probability that a byte is flipped (one random bit).
    pub corrupt_rate: f64,
    /// Probability that a byte is lost.
    pub drop_rate: f64,
    /// Seed of the fault generator (same seed, same faults for the same traffic).
    pub seed: u64,
}

impl LineModel {
    /// A clean line at full speed.
    pub fn clean() -> Self {
        Self::default()
    }

    /// Whether the model changes anything.
    pub fn is_clean(&self) -> bool {
        self.baud.is_none() && self.corrupt_rate <= 0.0 && self.drop_rate <= 0.0
    }
}

/// Counters of what the line did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LineStats {
    /// Bytes corrupted.
    pub corrupted: u64,
    /// Bytes dropped.
    pub dropped: u64,
}

/// A small deterministic generator (xorshift64*): no dependency, reproducible faults.
#[derive(Clone, Debug)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

/// Applies a [`LineModel`] to a stream: faults on the bytes read from it (what this side
/// receives) and on the bytes written to it, and a baud-rate throttle on writes (wrap both
/// ends to throttle both directions).
#[derive(Debug)]
pub struct FaultyLine<S> {
    inner: S,
    model: LineModel,
    rng: Rng,
    stats: LineStats,
    /// Earliest time the next write may go out (throttle).
    ready_at: Option<Pin<Box<Sleep>>>,
}

impl<S> FaultyLine<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, model: LineModel) -> Self {
        let rng = Rng::new(model.seed);
        Self {
            inner,
            model,
            rng,
            stats: LineStats::default(),
            ready_at: None,
        }
    }

    /// What the line did so far.
    pub fn stats(&self) -> &LineStats {
        &self.stats
    }

    fn mangle(&mut self, bytes: &mut Vec<u8>) {
        if self.model.corrupt_rate <= 0.0 && self.model.drop_rate <= 0.0 {
            return;
        }
        let mut out = Vec::with_capacity(bytes.len());
        for &b in bytes.iter() {
            if self.rng.chance(self.model.drop_rate) {
                self.stats.dropped += 1;
                continue;
            }
            if self.rng.chance(self.model.corrupt_rate) {
                self.stats.corrupted += 1;
                out.push(b ^ (1 << (self.rng.next() % 8)));
            } else {
                out.push(b);
            }
        }
        *bytes = out;
    }

    fn byte_time(&self, n: usize) -> Duration {
        match self.model.baud {
            Some(baud) if baud > 0 => Duration::from_secs_f64(n as f64 * 10.0 / f64::from(baud)),
            _ => Duration::ZERO,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FaultyLine<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut tmp = vec![0u8; buf.remaining().max(1)];
        let mut rb = ReadBuf::new(&mut tmp);
        match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => {
                if rb.filled().is_empty() {
                    return Poll::Ready(Ok(()));
                }
                let mut bytes = rb.filled().to_vec();
                this.mangle(&mut bytes);
                if bytes.is_empty() {
                    // Everything dropped: come back for more.
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                buf.put_slice(&bytes);
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FaultyLine<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // The sender's UART: bytes leave no faster than the baud rate, so a writer is held up
        // for their line time (and starts its ACK timer only after the last byte left).
        if let Some(sleep) = this.ready_at.as_mut() {
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            this.ready_at = None;
        }
        let buf = match this.model.baud {
            Some(b) if b > 0 => buf
                .get(..((b / 10 / 100).max(1) as usize).min(buf.len()))
                .unwrap_or(buf),
            _ => buf,
        };
        let res = this.write_mangled(cx, buf);
        if let Poll::Ready(Ok(n)) = res {
            let delay = this.byte_time(n);
            if !delay.is_zero() {
                this.ready_at = Some(Box::pin(tokio::time::sleep_until(Instant::now() + delay)));
            }
        }
        res
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(sleep) = this.ready_at.as_mut() {
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            this.ready_at = None;
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: AsyncWrite + Unpin> FaultyLine<S> {
    fn write_mangled(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self;
        if this.model.corrupt_rate <= 0.0 && this.model.drop_rate <= 0.0 {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        // Mangle one byte at a time so a partial write never re-rolls the dice for bytes
        // already decided.
        let Some(&first) = buf.first() else {
            return Poll::Ready(Ok(0));
        };
        let mut one = vec![first];
        let state = this.rng.clone();
        let stats = this.stats.clone();
        this.mangle(&mut one);
        if one.is_empty() {
            return Poll::Ready(Ok(1));
        }
        match Pin::new(&mut this.inner).poll_write(cx, &one) {
            Poll::Ready(Ok(0)) => Poll::Ready(Ok(0)),
            Poll::Ready(Ok(_)) => Poll::Ready(Ok(1)),
            other => {
                // Not written: undo this roll so the same byte gets the same fate next time.
                this.rng = state;
                this.stats = stats;
                other
            }
        }
    }
}
