//! The host side of the KDCOM link layer over any byte stream: ACK waits, retransmission,
//! RESEND, RESET, duplicate suppression (kd-protocol.md 1.4-1.7).

use std::collections::VecDeque;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use super::{ClientEvent, EventSink, KdError, Timing};
use crate::wire::consts::BREAKIN_PACKET_BYTE;
use crate::wire::{packet_type, DecodeEvent, Decoder, HostIds, Incoming, Leader, Packet};

/// Byte and packet counters of a link, for status lines and benchmarks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Bytes written to the target.
    pub bytes_tx: u64,
    /// Bytes read from the target.
    pub bytes_rx: u64,
    /// Data packets sent (retransmissions included).
    pub packets_tx: u64,
    /// Good data packets received (duplicates included).
    pub packets_rx: u64,
    /// Our packets sent again (timeout or RESEND).
    pub retransmits: u64,
    /// Damaged frames received (checksum, trailer, length, truncation).
    pub frame_errors: u64,
    /// Duplicate data packets received and dropped.
    pub duplicates: u64,
    /// RESET packets received from the target.
    pub resets_rx: u64,
}

/// The link layer: one byte stream, the decoder and the host's packet ids.
#[derive(Debug)]
pub struct KdLink<S> {
    io: S,
    decoder: Decoder,
    ids: HostIds,
    events: VecDeque<DecodeEvent>,
    /// Good data packets received and ACKed but not yet consumed.
    inbox: VecDeque<Packet>,
    last_sent: Option<Packet>,
    timing: Timing,
    stats: LinkStats,
    sink: EventSink,
    buf: Box<[u8]>,
    /// Id of the last damaged data packet whose header arrived.
    last_damaged: Option<u32>,
    /// The last new data packet received (type and payload), to tell a real duplicate from a
    /// new packet that merely carries the id of one.
    last_rx: Option<(u16, Vec<u8>)>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> KdLink<S> {
    /// Wraps a stream.
    pub fn new(io: S, timing: Timing, sink: EventSink) -> Self {
        Self {
            io,
            decoder: Decoder::new(),
            ids: HostIds::new(),
            events: VecDeque::new(),
            inbox: VecDeque::new(),
            last_sent: None,
            timing,
            stats: LinkStats::default(),
            sink,
            buf: vec![0u8; 4096].into_boxed_slice(),
            last_damaged: None,
            last_rx: None,
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> &LinkStats {
        &self.stats
    }

    /// The timing in force.
    pub fn timing(&self) -> &Timing {
        &self.timing
    }

    /// The packet-id state (for diagnostics and tests).
    pub fn ids(&self) -> &HostIds {
        &self.ids
    }

    /// Mutable access to the id state (RESET handling lives in the session layer).
    pub fn ids_mut(&mut self) -> &mut HostIds {
        &mut self.ids
    }

    /// The event sink.
    pub fn sink(&self) -> &EventSink {
        &self.sink
    }

    /// Gives the stream back.
    pub fn into_inner(self) -> S {
        self.io
    }

    async fn write_all(&mut self, bytes: &[u8]) -> Result<(), KdError> {
        self.io.write_all(bytes).await.map_err(KdError::io)?;
        self.io.flush().await.map_err(KdError::io)?;
        self.stats.bytes_tx += bytes.len() as u64;
        Ok(())
    }

    /// Sends a control packet.
    pub async fn send_control(&mut self, packet: Packet) -> Result<(), KdError> {
        tracing::trace!(
            kind = packet_type::name(packet.packet_type),
            id = format_args!("{:#010x}", packet.id),
            "tx control"
        );
        self.write_all(&packet.encode()).await
    }

    /// Sends the break-in byte.
    pub async fn send_break_in(&mut self) -> Result<(), KdError> {
        tracing::debug!("tx break-in");
        self.write_all(&[BREAKIN_PACKET_BYTE]).await
    }

    /// Drops everything buffered: bytes already in the stream (read until the line is quiet for
    /// `quiet`), the decoder's partial frame and decoded-but-unread packets. Stale RESET ACKs in
    /// a VM pipe otherwise cause endless RESET ping-pong (kd-protocol.md 5).
    pub async fn discard_input(&mut self, quiet: Duration) -> Result<u64, KdError> {
        let mut dropped = 0u64;
        loop {
            match tokio::time::timeout(quiet, self.io.read(&mut self.buf)).await {
                Ok(Ok(0)) => return Err(KdError::LinkLost("end of stream".into())),
                Ok(Ok(n)) => {
                    dropped += n as u64;
                    self.stats.bytes_rx += n as u64;
                }
                Ok(Err(e)) => return Err(KdError::io(e)),
                Err(_) => break,
            }
        }
        self.decoder = Decoder::new();
        self.events.clear();
        self.inbox.clear();
        if dropped > 0 {
            tracing::debug!(dropped, "discarded stale input");
        }
        Ok(dropped)
    }

    /// Next decoder event, reading from the stream until `deadline`. `Ok(None)` on timeout.
    pub async fn next_event(&mut self, deadline: Instant) -> Result<Option<DecodeEvent>, KdError> {
        loop {
            if let Some(ev) = self.events.pop_front() {
                return Ok(Some(ev));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            // Inside a frame the line may only pause for `inter_byte`.
            let limit = if self.decoder.is_idle() {
                deadline
            } else {
                deadline.min(now + self.timing.inter_byte + self.timing.transfer(64))
            };
            match tokio::time::timeout_at(limit, self.io.read(&mut self.buf)).await {
                Ok(Ok(0)) => {
                    return Err(KdError::LinkLost(
                        "the target side closed the connection".into(),
                    ))
                }
                Ok(Ok(n)) => {
                    self.stats.bytes_rx += n as u64;
                    let mut out = Vec::new();
                    self.decoder
                        .feed(self.buf.get(..n).unwrap_or(&[]), &mut out);
                    self.events.extend(out);
                }
                Ok(Err(e)) => return Err(KdError::io(e)),
                Err(_) => {
                    if let Some(ev) = self.decoder.abandon_partial() {
                        self.events.push_back(ev);
                    }
                }
            }
        }
    }

    /// Handles one event of the link layer itself. Returns the data packet to pass up, if any.
    /// `waiting_ack` is our unacknowledged packet, if any.
    async fn absorb(&mut self, ev: DecodeEvent) -> Result<Absorbed, KdError> {
        match ev {
            DecodeEvent::BreakIn => Ok(Absorbed::Nothing),
            DecodeEvent::Error(e) => {
                self.stats.frame_errors += 1;
                if let Some(id) = e.packet_id() {
                    self.last_damaged = Some(id);
                }
                tracing::debug!(error = %e, "damaged frame, asking for a resend");
                self.sink.emit(ClientEvent::FrameError(e.to_string()));
                self.send_control(Packet::resend()).await?;
                Ok(Absorbed::Nothing)
            }
            DecodeEvent::Packet(p) if p.leader == Leader::Control => match p.packet_type {
                packet_type::KD_ACKNOWLEDGE => Ok(Absorbed::Ack(p.id)),
                packet_type::KD_RESEND => Ok(Absorbed::Resend),
                packet_type::KD_RESET => {
                    self.stats.resets_rx += 1;
                    // Its id is garbage on real targets (0x0005f863, 0xdeadbeef): never check it.
                    tracing::debug!(id = format_args!("{:#010x}", p.id), "target sent RESET");
                    self.ids.reset();
                    Ok(Absorbed::Reset)
                }
                other => {
                    tracing::debug!(packet_type = other, "ignoring unknown control packet");
                    Ok(Absorbed::Nothing)
                }
            },
            DecodeEvent::Packet(p) if !plausible_data_header(p.id, p.packet_type) => {
                // The checksum covers the payload only: a flipped bit in the id or the type
                // passes it. A target only ever sends ids 0x80800000/1 (with or without the
                // SYNC bit) and the data types below; anything else is damage. ACKing it would
                // acknowledge an id the target never sent (it keeps waiting for its ACK), so
                // ask for the packet again instead, as kdcom does with a host packet.
                self.stats.frame_errors += 1;
                tracing::debug!(
                    id = format_args!("{:#010x}", p.id),
                    packet_type = p.packet_type,
                    "damaged header (id or type), asking for a resend"
                );
                self.sink.emit(ClientEvent::FrameError(format!(
                    "damaged header: id {:#010x}, type {}",
                    p.id, p.packet_type
                )));
                self.send_control(Packet::resend()).await?;
                Ok(Absorbed::Nothing)
            }
            DecodeEvent::Packet(p) if !payload_fits(p.packet_type, &p.payload) => {
                // A plausible header over a payload that is not of its type: the type took a
                // bit flip the checksum does not cover (a DbgPrint read as a FILE_IO request,
                // a print read as a state change). Ask for it again, as for a damaged header.
                self.stats.frame_errors += 1;
                tracing::debug!(
                    id = format_args!("{:#010x}", p.id),
                    packet_type = p.packet_type,
                    len = p.payload.len(),
                    "payload does not fit its packet type (damaged type), asking for a resend"
                );
                self.sink.emit(ClientEvent::FrameError(format!(
                    "payload of {} bytes is not a {}: damaged packet type",
                    p.payload.len(),
                    packet_type::name(p.packet_type)
                )));
                self.send_control(Packet::resend()).await?;
                Ok(Absorbed::Nothing)
            }
            DecodeEvent::Packet(p) => {
                self.stats.packets_rx += 1;
                self.send_control(Packet::ack(p.id)).await?;
                let mut verdict = self.ids.on_data(p.id);
                if verdict == Incoming::Duplicate
                    && self
                        .last_rx
                        .as_ref()
                        .is_some_and(|(t, pl)| *t != p.packet_type || *pl != p.payload)
                {
                    // Same id as the last packet, other content: the target took a packet of
                    // ours as the ACK of one we never received intact (kdcom does, kd-protocol.md
                    // 1.5) and moved on. What it sends now is new.
                    tracing::debug!(
                        id = format_args!("{:#010x}", p.id),
                        "new packet under a duplicate id: the target moved on"
                    );
                    self.ids.accept(p.id);
                    verdict = Incoming::New;
                }
                match verdict {
                    Incoming::New => {
                        self.last_rx = Some((p.packet_type, p.payload.clone()));
                        tracing::trace!(
                            kind = packet_type::name(p.packet_type),
                            id = format_args!("{:#010x}", p.id),
                            len = p.payload.len(),
                            "rx data"
                        );
                        Ok(Absorbed::Data(p))
                    }
                    Incoming::Duplicate => {
                        self.stats.duplicates += 1;
                        tracing::debug!(
                            id = format_args!("{:#010x}", p.id),
                            "duplicate packet dropped"
                        );
                        Ok(Absorbed::Nothing)
                    }
                }
            }
        }
    }

    /// Sends a data packet and waits for its ACK, retransmitting on timeout and on RESEND.
    ///
    /// A target RESET while waiting restarts the exchange with id 0x80800000. A new data packet
    /// arriving instead of the ACK means the ACK was lost (the target only answers what it
    /// received) if `is_reply` says it answers this packet: it is kept for [`KdLink::recv`] and
    /// the send counts as done. Other data packets (a state change resent after a RESET, a
    /// DbgPrint, a stale reply) are kept for `recv` too, but acknowledge nothing.
    pub async fn send(
        &mut self,
        ptype: u16,
        payload: Vec<u8>,
        is_reply: Option<&dyn Fn(&Packet) -> bool>,
    ) -> Result<(), KdError> {
        let mut packet = Packet::data(ptype, self.ids.next_send_id(), payload)
            .map_err(|e| KdError::Protocol(e.to_string()))?;
        let mut attempts = 0u32;
        'transmit: loop {
            if attempts > self.timing.retries {
                return Err(KdError::Timeout {
                    what: format!(
                        "the ACK of a {} packet after {} attempts",
                        packet_type::name(ptype),
                        attempts
                    ),
                });
            }
            if attempts > 0 {
                self.stats.retransmits += 1;
            }
            attempts += 1;
            packet.id = self.ids.next_send_id();
            self.stats.packets_tx += 1;
            let bytes = packet.encode();
            self.write_all(&bytes).await?;
            self.last_sent = Some(packet.clone());
            let mut deadline = Instant::now() + self.timing.ack_wait(bytes.len());
            if attempts % 4 == 3 {
                // Copies that keep going unanswered may be read as the payload of an earlier
                // copy whose byte count took a bit flip (the header is not checksummed): the
                // target reads on while bytes keep coming. A silence longer than its per-byte
                // timeout makes it drop that partial packet, so the next copy is read as one.
                deadline += TARGET_BYTE_TIMEOUT;
            }
            loop {
                let Some(ev) = self.next_event(deadline).await? else {
                    tracing::debug!(attempt = attempts, "no ACK in time, retransmitting");
                    continue 'transmit;
                };
                let damaged_new = match &ev {
                    DecodeEvent::Error(e) => e
                        .packet_id()
                        .is_some_and(|id| self.ids.expected_id() == Some(id)),
                    _ => false,
                };
                match self.absorb(ev).await? {
                    Absorbed::Ack(id) => {
                        if self.ids.on_ack(id) {
                            return Ok(());
                        }
                    }
                    Absorbed::Nothing if damaged_new && is_reply.is_some() => {
                        // The target is sending its next packet (damaged on the way): it only
                        // does that after taking ours, so our ACK was lost. The reply itself
                        // is recovered by the caller (RESEND, or giving it up).
                        tracing::debug!("a damaged reply shows the request arrived");
                        self.ids.assume_acked();
                        return Ok(());
                    }
                    Absorbed::Resend => continue 'transmit,
                    Absorbed::Reset => continue 'transmit,
                    Absorbed::Data(p) => {
                        let answers = is_reply.is_some_and(|f| f(&p));
                        self.inbox.push_back(p);
                        if answers {
                            self.ids.assume_acked();
                            return Ok(());
                        }
                    }
                    Absorbed::Nothing => {}
                }
            }
        }
    }

    /// Receives the next new data packet (ACKed), waiting until `deadline`. `Ok(None)` on
    /// timeout. A RESEND from the target makes us retransmit our last packet; RESET from the
    /// target is reported as [`Received::Reset`] so the session can re-sequence.
    pub async fn recv(&mut self, deadline: Instant) -> Result<Option<Received>, KdError> {
        if let Some(p) = self.inbox.pop_front() {
            return Ok(Some(Received::Packet(p)));
        }
        loop {
            let Some(ev) = self.next_event(deadline).await? else {
                return Ok(None);
            };
            match self.absorb(ev).await? {
                Absorbed::Data(p) => return Ok(Some(Received::Packet(p))),
                Absorbed::Reset => return Ok(Some(Received::Reset)),
                Absorbed::Resend => {
                    if let Some(p) = self.last_sent.clone() {
                        tracing::debug!("target asked for a resend");
                        self.stats.retransmits += 1;
                        self.stats.packets_tx += 1;
                        self.write_all(&p.encode()).await?;
                    }
                }
                Absorbed::Ack(_) | Absorbed::Nothing => {}
            }
        }
    }

    /// Drops the received packets not yet handed up that `stale` says are stale; returns how
    /// many.
    pub fn discard_received(&mut self, stale: impl Fn(&Packet) -> bool) -> usize {
        let before = self.inbox.len();
        self.inbox.retain(|p| !stale(p));
        before - self.inbox.len()
    }

    /// Takes the id of the last damaged data packet seen (and forgets it).
    pub fn take_damaged_id(&mut self) -> Option<u32> {
        self.last_damaged.take()
    }

    /// Gives up on a packet the target keeps sending damaged: ACKs `id` so the target stops
    /// retransmitting it, and counts it as received. Used when a reply is too large to cross
    /// a noisy line intact; the caller asks again for less.
    pub async fn abandon(&mut self, id: u32) -> Result<(), KdError> {
        self.send_control(Packet::ack(id)).await?;
        self.ids.on_data(id);
        self.decoder.abandon_partial();
        Ok(())
    }
}

/// The target's per-byte read timeout with some margin (kd-protocol.md 1.4: "about 1 s"):
/// after this much silence a target drops a partial packet.
const TARGET_BYTE_TIMEOUT: Duration = Duration::from_millis(1200);

/// What [`KdLink::recv`] yields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Received {
    /// A new data packet (already ACKed).
    Packet(Packet),
    /// The target sent RESET: ids are back to 0x80800000, and a stopped target resends its
    /// pending packet next.
    Reset,
}

enum Absorbed {
    Nothing,
    Ack(u32),
    Resend,
    Reset,
    Data(Packet),
}

/// Whether a data packet's header (not covered by the checksum) is one a target can send:
/// id 0x80800000 or 0x80800001, with or without the SYNC bit, and a data packet type.
/// Whether a data packet's payload decodes as its type says: the types the client acts on
/// (state changes, manipulate replies, prints and prompts, file requests) must.
fn payload_fits(ptype: u16, payload: &[u8]) -> bool {
    match ptype {
        packet_type::KD_STATE_CHANGE64 => crate::state_change::StateChange::parse(payload).is_ok(),
        packet_type::KD_STATE_MANIPULATE => crate::api::Manipulate::parse(payload).is_ok(),
        packet_type::KD_DEBUG_IO => crate::debug_io::DebugIo::parse(payload).is_ok(),
        packet_type::KD_FILE_IO => crate::file_io::FileIo::parse(payload).is_ok(),
        _ => true,
    }
}

fn plausible_data_header(id: u32, ptype: u16) -> bool {
    use crate::wire::consts::{INITIAL_PACKET_ID, SYNC_PACKET_ID};
    let id_ok = (id & !SYNC_PACKET_ID & !1) == INITIAL_PACKET_ID;
    let type_ok = matches!(
        ptype,
        packet_type::KD_STATE_CHANGE32
            | packet_type::KD_STATE_MANIPULATE
            | packet_type::KD_DEBUG_IO
            | packet_type::KD_STATE_CHANGE64
            | packet_type::KD_TRACE_IO
            | packet_type::KD_CONTROL_REQUEST
            | packet_type::KD_FILE_IO
    );
    id_ok && type_ok
}

#[cfg(test)]
mod header_tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The target writes `bad`, then `good`; the link must hand up `good` only, after asking
    /// for `bad` again: returns what it handed up, and checks what it wrote (RESEND, then the
    /// ACK of `good`).
    async fn bad_then_good(bad: Packet, good: Packet) -> (Option<Received>, LinkStats) {
        let (host, mut target) = tokio::io::duplex(4096);
        let mut link = KdLink::new(host, Timing::default(), EventSink::none());
        target.write_all(&bad.encode()).await.unwrap();
        target.write_all(&good.encode()).await.unwrap();
        let deadline = Instant::now() + std::time::Duration::from_secs(2);
        let got = link.recv(deadline).await.unwrap();
        let stats = link.stats().clone();
        drop(link);
        let mut sent = Vec::new();
        target.read_to_end(&mut sent).await.unwrap();
        let mut expected = Packet::resend().encode();
        expected.extend(Packet::ack(good.id).encode());
        assert_eq!(
            sent, expected,
            "RESEND for the bad packet, then the ACK of the good one"
        );
        (got, stats)
    }

    /// A reply whose id took a bit flip (the checksum does not cover it) is asked again with
    /// RESEND, never ACKed; the good copy that follows is ACKed and delivered.
    #[tokio::test]
    async fn a_damaged_id_is_asked_again_not_acked() {
        let payload = crate::api::Manipulate::request(0x3130, 0).encode();
        let bad = Packet::data(
            packet_type::KD_STATE_MANIPULATE,
            0x8180_0000,
            payload.clone(),
        )
        .unwrap();
        let good = Packet::data(
            packet_type::KD_STATE_MANIPULATE,
            0x8080_0000,
            payload.clone(),
        )
        .unwrap();
        let (got, _) = bad_then_good(bad, good).await;
        assert!(
            matches!(&got, Some(Received::Packet(p)) if p.id == 0x8080_0000 && p.payload == payload),
            "{got:?}"
        );
    }

    /// A DbgPrint whose packet type took a bit flip (DEBUG_IO 3 read as FILE_IO 11; the header
    /// is not checksummed) does not decode as a file request: it is asked again with RESEND,
    /// never ACKed or handed up, and the good copy that follows is delivered. Before, the
    /// decode error ended the capture (found by `cargo xtask soak`).
    #[tokio::test]
    async fn a_payload_that_does_not_fit_its_type_is_asked_again() {
        let print =
            crate::debug_io::PrintString::new(b"a print of 47 bytes, one short of a FILE_IO...\n")
                .to_debug_io()
                .encode();
        assert_eq!(print.len(), 63);
        let bad = Packet::data(packet_type::KD_FILE_IO, 0x8080_0000, print.clone()).unwrap();
        let good = Packet::data(packet_type::KD_DEBUG_IO, 0x8080_0000, print.clone()).unwrap();
        let (got, stats) = bad_then_good(bad, good).await;
        assert!(
            matches!(&got, Some(Received::Packet(p)) if p.packet_type == packet_type::KD_DEBUG_IO && p.payload == print),
            "{got:?}"
        );
        assert_eq!(stats.frame_errors, 1);
    }
}
