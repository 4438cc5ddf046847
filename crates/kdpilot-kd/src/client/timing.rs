//! Timeouts that scale with the line rate.
//!
//! At 19200 baud a serial line carries about 1,920 bytes per second: a 4000-byte packet takes
//! 2.1 s, a 1288-byte GetContext reply 0.7 s. Fixed timeouts that suit a socket would make a
//! slow line look dead, so every wait is "fixed latency + time to move the bytes".

use std::time::Duration;

/// Timing parameters of a link.
#[derive(Clone, Debug, PartialEq)]
pub struct Timing {
    /// Bytes per second the line carries (baud / 10 for 8N1), or `None` for sockets and pipes,
    /// which are fast.
    pub line_rate: Option<u32>,
    /// Latency allowed on top of transfer time: the target's own processing and scheduling.
    pub latency: Duration,
    /// How long the line may stay silent in the middle of a packet before the partial packet is
    /// abandoned (the target's per-byte timeout plays the same role).
    pub inter_byte: Duration,
    /// Retransmissions of one packet before the link is declared unresponsive.
    pub retries: u32,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            line_rate: None,
            latency: Duration::from_millis(500),
            inter_byte: Duration::from_millis(500),
            retries: 10,
        }
    }
}

impl Timing {
    /// Timing for a serial line at `baud` (8N1: 10 bits per byte).
    pub fn for_baud(baud: u32) -> Self {
        Self {
            line_rate: Some((baud / 10).max(1)),
            ..Self::default()
        }
    }

    /// Time to move `bytes` over the line (zero for fast links).
    pub fn transfer(&self, bytes: usize) -> Duration {
        match self.line_rate {
            Some(rate) => Duration::from_secs_f64(bytes as f64 / f64::from(rate.max(1))),
            None => Duration::ZERO,
        }
    }

    /// How long to wait for the ACK of a packet of `wire_len` bytes.
    pub fn ack_wait(&self, wire_len: usize) -> Duration {
        self.latency + self.transfer(wire_len + 16)
    }

    /// How long to wait for a reply to a request of `wire_len` bytes whose reply may be as large
    /// as `reply_len` payload bytes.
    pub fn reply_wait(&self, wire_len: usize, reply_len: usize) -> Duration {
        self.latency * 2 + self.transfer(wire_len + 16 + reply_len + 17 + 16)
    }
}
