//! The target side of KDCOM, as kdcom.dll does it (kd-protocol.md 1.5): SYNC ids at boot,
//! ACK matching with the SYNC bit cleared, RESEND on damage, RESET answered with a junk id,
//! duplicates ACKed and dropped, wrong packet types ACKed and dropped without moving the id.

use std::time::Duration;

use kdpilot_kd::wire::{
    packet_type, DecodeEvent, Decoder, Leader, Packet, TargetIds, TargetIncoming,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Link errors: the host side of the stream went away.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The stream closed or failed.
    #[error("host link closed: {0}")]
    Closed(String),
}

/// How a send ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendOutcome {
    /// ACKed (or the host's next packet showed the ACK was lost).
    Delivered,
    /// Nobody ACKed within the retries (the caller decides: drop, or retry forever).
    NotDelivered,
}

/// How a receive ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecvOutcome {
    /// A good packet of the awaited type.
    Packet(Packet),
    /// The host sent RESET: the caller must resend what it was waiting to deliver.
    NeedsResend,
    /// Nothing within the timeout.
    Timeout,
}

/// Target-side link configuration.
#[derive(Clone, Debug)]
pub struct TargetLinkConfig {
    /// Id of the RESET packet the target answers with (garbage on real targets).
    pub reset_reply_id: u32,
    /// How long to wait for an ACK before resending.
    pub ack_timeout: Duration,
    /// Resends before giving up on a packet (KdpDefaultRetries = 20).
    pub retries: u32,
    /// How long the line may pause inside a packet before the partial packet is dropped
    /// (kdcom's per-byte read timeout, "about 1 s", kd-protocol.md 1.4). Without it a host
    /// packet whose byte count took a bit flip would swallow everything the host sends next,
    /// RESETs included, until the inflated count is reached.
    pub byte_timeout: Duration,
}

impl Default for TargetLinkConfig {
    fn default() -> Self {
        Self {
            reset_reply_id: 0x0005_f863,
            ack_timeout: Duration::from_millis(200),
            retries: 20,
            byte_timeout: Duration::from_secs(1),
        }
    }
}

/// The target's end of the line.
#[derive(Debug)]
pub struct TargetLink<S> {
    io: S,
    decoder: Decoder,
    ids: TargetIds,
    pending: std::collections::VecDeque<DecodeEvent>,
    config: TargetLinkConfig,
    buf: Vec<u8>,
    /// A break-in byte arrived while stopped: kdcom remembers it (KdpControlCPending).
    pub break_in_pending: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> TargetLink<S> {
    /// A link at boot: the first packet carries the SYNC bit.
    pub fn new(io: S, config: TargetLinkConfig) -> Self {
        Self {
            io,
            decoder: Decoder::new(),
            ids: TargetIds::boot(),
            pending: Default::default(),
            config,
            buf: vec![0; 4096],
            break_in_pending: false,
        }
    }

    /// Back to boot-time ids (a reboot, or KdDebuggerNotPresent after undelivered packets).
    pub fn reset_ids_to_boot(&mut self) {
        self.ids = TargetIds::boot();
    }

    /// Writes raw bytes (garbage injection, tests).
    pub async fn write_raw(&mut self, bytes: &[u8]) -> Result<(), LinkError> {
        self.io.write_all(bytes).await.map_err(closed)?;
        self.io.flush().await.map_err(closed)
    }

    async fn next_event(&mut self, timeout: Duration) -> Result<Option<DecodeEvent>, LinkError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return Ok(Some(ev));
            }
            // Inside a packet the line may pause only for the per-byte timeout.
            let limit = if self.decoder.is_idle() {
                deadline
            } else {
                deadline.min(tokio::time::Instant::now() + self.config.byte_timeout)
            };
            match tokio::time::timeout_at(limit, self.io.read(&mut self.buf)).await {
                Ok(Ok(0)) => return Err(LinkError::Closed("end of stream".into())),
                Ok(Ok(n)) => {
                    let mut out = Vec::new();
                    self.decoder
                        .feed(self.buf.get(..n).unwrap_or(&[]), &mut out);
                    self.pending.extend(out);
                }
                Ok(Err(e)) => return Err(closed(e)),
                Err(_) => {
                    if let Some(ev) = self.decoder.abandon_partial() {
                        self.pending.push_back(ev);
                        continue;
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// While running, a kernel only polls for the break-in byte: every other byte is consumed
    /// and dropped, packets are not parsed (kd-protocol.md 3). Returns true on 'b'.
    pub async fn poll_break_in(&mut self, wait: Duration) -> Result<bool, LinkError> {
        if std::mem::take(&mut self.break_in_pending) {
            return Ok(true);
        }
        self.pending.clear();
        self.decoder = Decoder::new();
        match tokio::time::timeout(wait, self.io.read(&mut self.buf)).await {
            Ok(Ok(0)) => Err(LinkError::Closed("end of stream".into())),
            Ok(Ok(n)) => Ok(self.buf.get(..n).unwrap_or(&[]).contains(&b'b')),
            Ok(Err(e)) => Err(closed(e)),
            Err(_) => Ok(false),
        }
    }

    async fn send_control(&mut self, p: Packet) -> Result<(), LinkError> {
        self.write_raw(&p.encode()).await
    }

    async fn answer_reset(&mut self) -> Result<(), LinkError> {
        self.ids.reset();
        let id = self.config.reset_reply_id;
        self.send_control(Packet::control(packet_type::KD_RESET, id))
            .await
    }

    /// Sends a data packet and waits for its ACK (KdSendPacket), forever: what the kernel does
    /// for exception state changes and manipulate replies.
    pub async fn send(&mut self, ptype: u16, payload: &[u8]) -> Result<SendOutcome, LinkError> {
        self.send_with(ptype, payload, false).await
    }

    /// Sends a packet the kernel gives up on after its retries (DbgPrint, LoadSymbols): then
    /// KdDebuggerNotPresent is set and ids go back to boot values.
    pub async fn send_or_give_up(
        &mut self,
        ptype: u16,
        payload: &[u8],
    ) -> Result<SendOutcome, LinkError> {
        let out = self.send_with(ptype, payload, true).await?;
        if out == SendOutcome::NotDelivered {
            self.reset_ids_to_boot();
        }
        Ok(out)
    }

    async fn send_with(
        &mut self,
        ptype: u16,
        payload: &[u8],
        give_up: bool,
    ) -> Result<SendOutcome, LinkError> {
        let mut tries = 0;
        'resend: loop {
            if give_up && tries > self.config.retries {
                return Ok(SendOutcome::NotDelivered);
            }
            tries += 1;
            let id = self.ids.next_send_id();
            let p = Packet::data(ptype, id, payload.to_vec())
                .map_err(|e| LinkError::Closed(e.to_string()))?;
            self.write_raw(&p.encode()).await?;
            loop {
                let Some(ev) = self.next_event(self.config.ack_timeout).await? else {
                    continue 'resend;
                };
                match ev {
                    DecodeEvent::BreakIn => self.break_in_pending = true,
                    DecodeEvent::Error(_) => {}
                    DecodeEvent::Packet(c) if c.leader == Leader::Control => match c.packet_type {
                        packet_type::KD_ACKNOWLEDGE if self.ids.ack_matches(c.id) => {
                            self.ids.on_sent();
                            return Ok(SendOutcome::Delivered);
                        }
                        packet_type::KD_RESEND => continue 'resend,
                        packet_type::KD_RESET => {
                            self.answer_reset().await?;
                            continue 'resend;
                        }
                        _ => {}
                    },
                    DecodeEvent::Packet(d) => {
                        if d.id == self.ids.expected_id() {
                            // The host already sent its next packet: our ACK was lost.
                            self.send_control(Packet::resend()).await?;
                            self.ids.on_sent();
                            return Ok(SendOutcome::Delivered);
                        }
                    }
                }
            }
        }
    }

    /// Waits for a data packet of `ptype` (KdReceivePacket).
    pub async fn recv(&mut self, ptype: u16, timeout: Duration) -> Result<RecvOutcome, LinkError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let Some(ev) = self.next_event(left).await? else {
                return Ok(RecvOutcome::Timeout);
            };
            match ev {
                DecodeEvent::BreakIn => self.break_in_pending = true,
                DecodeEvent::Error(_) => self.send_control(Packet::resend()).await?,
                DecodeEvent::Packet(c) if c.leader == Leader::Control => {
                    if c.packet_type == packet_type::KD_RESET {
                        self.answer_reset().await?;
                        return Ok(RecvOutcome::NeedsResend);
                    }
                }
                DecodeEvent::Packet(d) => match self.ids.on_data_peek(d.id) {
                    TargetIncoming::Invalid => self.send_control(Packet::resend()).await?,
                    TargetIncoming::Duplicate => self.send_control(Packet::ack(d.id)).await?,
                    TargetIncoming::New => {
                        self.send_control(Packet::ack(d.id)).await?;
                        if d.packet_type == ptype {
                            self.ids.on_data(d.id);
                            return Ok(RecvOutcome::Packet(d));
                        }
                        // Wrong type: ACKed and dropped, expected id unchanged.
                    }
                },
            }
        }
    }
}

fn closed(e: std::io::Error) -> LinkError {
    LinkError::Closed(e.to_string())
}
