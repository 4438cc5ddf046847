//! The session as types: connect, stopped, running (kd-protocol.md 3-5).

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use super::link::{KdLink, LinkStats, Received};
use super::{unsolicited, ClientEvent, EventSink, KdError, Timing};
use crate::api::{self, Api, Manipulate, MAX_TRANSFER};
use crate::kddebugger_data::{DebugDataHeader64, KdDebuggerData64, DEBUG_DATA_HEADER_SIZE};
use crate::state_change::StateChange;
use crate::version::GetVersion64;
use crate::wire::packet_type;
use crate::Arch;

/// How a [`Connection`] behaves.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Timeouts (scale them with the line rate: [`Timing::for_baud`]).
    pub timing: Timing,
    /// RESET packets to send while synchronising; 0 = unlimited (kd's `resets=0`, for VM
    /// pipes that drop bytes).
    pub resets: u32,
    /// Send the break-in byte if the target does not report a stop by itself.
    pub break_in: bool,
    /// What to answer a DbgPrompt with ("i" = ignore, the answer that keeps an assertion or
    /// verifier prompt from stopping the machine).
    pub prompt_answer: String,
    /// Where [`ClientEvent`]s go.
    pub sink: EventSink,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            timing: Timing::default(),
            resets: 5,
            break_in: true,
            prompt_answer: "i".into(),
            sink: EventSink::none(),
        }
    }
}

/// A link to a target whose state is not known yet.
#[derive(Debug)]
pub struct Connection<S> {
    link: KdLink<S>,
    config: ClientConfig,
    version: Option<GetVersion64>,
    /// Current size of one memory read (shrinks on a noisy line).
    read_chunk: usize,
    /// Reads in a row that crossed the line intact at the current size.
    clean_reads: u32,
    /// Damaged frames counted so far, and the received-packet count when the last one came.
    errors_seen: u64,
    quiet_since: u64,
}

/// Packets without damage after which a line counts as clean again.
const NOISY_WINDOW: u64 = 500;

/// Smallest read chunk on a noisy line.
const MIN_READ_CHUNK: usize = 128;

/// A stopped target: it serves requests until it is resumed.
#[derive(Debug)]
pub struct Stopped<S> {
    conn: Connection<S>,
    state: StateChange,
    raw: Vec<u8>,
    /// Set when a request found the target in another stop ([`KdError::StopChanged`]).
    changed: bool,
}

/// A running target: it can only report a stop or be broken into.
#[derive(Debug)]
pub struct Running<S> {
    conn: Connection<S>,
    /// Payload of the state change we last continued from (to spot a resend of it).
    last_stop: Option<Vec<u8>>,
    /// The continue that left `last_stop`: sent again when the target turns out to be still
    /// in that stop (see [`Running::wait_stop`]).
    last_continue: Option<Manipulate>,
    /// Since when the target has said nothing, and how much more silence makes us ask.
    quiet_since: Instant,
    probe_after: Duration,
    /// Continues sent again for `last_stop` (bounded).
    continues_resent: u32,
    /// A RESET went out because of silence, and nothing was heard since.
    probed: bool,
    /// The target answered that RESET with its own: it is stopped (a running kernel only
    /// polls for the break-in byte and never answers). Only then can a stop that repeats the
    /// one we continued from be that stop resent: the same breakpoint hit again by the same
    /// thread on the same processor is byte for byte the same state change.
    answered: bool,
    /// A break-in byte went out since the continue: a stop that looks like `last_stop` may be
    /// a new one (a break-in lands where the last one did).
    broke_in: bool,
    /// The last continue got no ACK: the target is taken as running, but may still be in its
    /// stop until a silence RESET finds out ([`Running::continue_unconfirmed`]).
    unconfirmed: bool,
}

/// Silence after a continue that makes the host ask whether the target really runs, at first;
/// it doubles up to [`PROBE_MAX`] while the target stays silent.
const PROBE_FIRST: Duration = Duration::from_secs(2);
const PROBE_MAX: Duration = Duration::from_secs(60);

/// Result of [`Running::wait_stop`].
#[derive(Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "both variants own the whole connection; the outcome is moved once per stop"
)]
pub enum WaitOutcome<S> {
    /// The target reported a stop.
    Stopped(Stopped<S>),
    /// Nothing happened before the timeout.
    StillRunning(Running<S>),
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    /// Wraps an open byte stream.
    pub fn new(io: S, config: ClientConfig) -> Self {
        let link = KdLink::new(io, config.timing.clone(), config.sink.clone());
        Self {
            link,
            config,
            version: None,
            read_chunk: MAX_TRANSFER,
            clean_reads: 0,
            errors_seen: 0,
            quiet_since: 0,
        }
    }

    /// Link counters.
    pub fn stats(&self) -> &LinkStats {
        self.link.stats()
    }

    /// Synchronises with the target and gets it stopped: discards stale input, sends RESET
    /// (repeatedly while nothing answers), sends the break-in byte if no stop is reported, and
    /// returns the stopped target with its version read. A stop that arrives twice (with the
    /// SYNC id, then again after our RESET) is processed once.
    pub async fn connect(mut self, timeout: Duration) -> Result<Stopped<S>, KdError> {
        let overall = Instant::now() + timeout;
        let timing = self.config.timing.clone();
        self.link.discard_input(Duration::from_millis(50)).await?;
        self.link.ids_mut().forget_expected();
        let mut synced = false;
        let mut resets_sent = 0u32;
        let mut breaks_sent = 0u32;
        let mut stop: Option<Vec<u8>> = None;
        let round = timing.latency * 2 + timing.transfer(600);
        loop {
            if Instant::now() >= overall {
                return Err(KdError::Timeout {
                    what: if stop.is_some() || synced {
                        "the target to finish synchronising".into()
                    } else {
                        "any answer from the target (is it booted with debugging on, and are port and baud right?)".into()
                    },
                });
            }
            // A stopped target whose ids we do not know yet always gets another RESET: it answers
            // by resending its state change with id 0x80800000.
            let budget_left = self.config.resets == 0 || resets_sent < self.config.resets.max(1);
            if !synced && (stop.is_some() || budget_left) {
                self.link.send_control(crate::wire::Packet::reset()).await?;
                resets_sent += 1;
            }
            // Break in only when nothing says the target is stopped: a 'b' that reaches a stopped
            // target makes it break again right after the next continue.
            if self.config.break_in
                && stop.is_none()
                && (resets_sent > 1 || synced || breaks_sent > 0)
            {
                self.link.send_break_in().await?;
                breaks_sent += 1;
            }
            let deadline = (Instant::now() + round).min(overall);
            while let Some(rx) = self.link.recv(deadline).await? {
                match rx {
                    Received::Reset => {
                        synced = true;
                        self.config.sink.emit(ClientEvent::Resynchronised);
                    }
                    Received::Packet(p) if p.packet_type == packet_type::KD_STATE_CHANGE64 => {
                        if synced {
                            let state = StateChange::parse(&p.payload)?;
                            let mut stopped = Stopped {
                                conn: self,
                                state,
                                raw: p.payload,
                                changed: false,
                            };
                            stopped.refresh_version().await?;
                            return Ok(stopped);
                        }
                        stop = Some(p.payload);
                    }
                    Received::Packet(p) => {
                        unsolicited::handle(&mut self.link, &self.config, p).await?;
                    }
                }
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Stopped<S> {
    /// The state change that reported this stop.
    pub fn state(&self) -> &StateChange {
        &self.state
    }

    /// The stop's state change payload as received (its length is what the stop cost on the
    /// line, with the 16-byte header, the trailer and the ACK).
    pub fn state_bytes(&self) -> &[u8] {
        &self.raw
    }

    /// The version read at connect (or by [`Stopped::refresh_version`]).
    pub fn version(&self) -> Option<&GetVersion64> {
        self.conn.version.as_ref()
    }

    /// The target's architecture (AMD64 until a version says otherwise).
    pub fn arch(&self) -> Arch {
        self.conn
            .version
            .as_ref()
            .and_then(GetVersion64::arch)
            .unwrap_or(Arch::Amd64)
    }

    /// Link counters.
    pub fn stats(&self) -> &LinkStats {
        self.conn.link.stats()
    }

    /// Asks the target for its version again (after a reboot: new kernel base).
    pub async fn refresh_version(&mut self) -> Result<&GetVersion64, KdError> {
        let v = self.request(&api::GetVersion).await?;
        if v.arch().is_none() {
            return Err(KdError::Protocol(format!(
                "target machine type {:#06x} is not x64 or x86: kdpilot drives only those",
                v.machine_type
            )));
        }
        Ok(self.conn.version.insert(v))
    }

    /// Sends one request to the processor that reported the stop and returns its decoded reply.
    pub async fn request<A: Api>(&mut self, req: &A) -> Result<A::Reply, KdError> {
        let cpu = self.state.processor;
        self.request_on(cpu, req).await
    }

    /// Sends a request that reads (registers, memory, control space) and returns its reply; on
    /// a line that showed damage recently, asks again until two replies agree, as memory reads
    /// do. The byte-sum checksum passes compensating errors: a register taken from such a
    /// reply puts a hit's stack in the wrong place, or its tag argument makes the hit look like
    /// another tag's.
    pub async fn request_verified<A: Api>(&mut self, req: &A) -> Result<A::Reply, KdError>
    where
        A::Reply: PartialEq,
    {
        let first = self.request(req).await?;
        if !self.line_is_noisy() {
            return Ok(first);
        }
        let mut prev = first;
        for _ in 0..6 {
            let next = self.request(req).await?;
            if next == prev {
                return Ok(next);
            }
            tracing::debug!(
                api = api::number::name(A::NUMBER),
                "two replies disagree: damage passed the checksum"
            );
            self.conn.link.sink().emit(ClientEvent::FrameError(
                "a reply passed the checksum damaged".into(),
            ));
            prev = next;
        }
        Err(KdError::ReplyLost {
            api: api::number::name(A::NUMBER),
        })
    }

    /// Sends one request to `processor` and returns its decoded reply, retrying a reply that
    /// was lost to line damage.
    pub async fn request_on<A: Api>(
        &mut self,
        processor: u16,
        req: &A,
    ) -> Result<A::Reply, KdError> {
        let mut lost = 0;
        loop {
            match self.request_once(processor, req).await {
                Err(KdError::ReplyLost { .. }) if lost < 3 => lost += 1,
                other => return other,
            }
        }
    }

    /// One request/reply exchange.
    ///
    /// Recovery, in this order:
    /// - a reply that contradicts the request (another API, another address) is stale or was
    ///   damaged in a way the checksum let through: it is skipped;
    /// - a reply heard but always damaged (a large reply on a noisy line) is ACKed to release
    ///   the target and [`KdError::ReplyLost`] is returned, so the caller asks for less;
    /// - silence (the request was ACKed but dropped because its type was damaged, or ids went
    ///   out of step) is repaired with a RESET exchange, after which the target resends its
    ///   state change (ignored as a duplicate) and the request goes again with fresh ids.
    async fn request_once<A: Api>(&mut self, processor: u16, req: &A) -> Result<A::Reply, KdError> {
        debug_assert!(A::HAS_REPLY, "use resume/reboot for APIs without a reply");
        let arch = self.arch();
        let mut m = req.encode_request(arch);
        m.processor = processor;
        let payload = m.encode();
        let timing = self.conn.link.timing().clone();
        let wait = timing.reply_wait(payload.len() + 17, crate::wire::consts::PACKET_MAX_SIZE);
        let answers = |p: &crate::wire::Packet| -> bool {
            p.packet_type == packet_type::KD_STATE_MANIPULATE
                && Manipulate::parse(&p.payload).is_ok_and(|r| {
                    r.api == A::NUMBER
                        && !matches!(
                            req.decode_reply(&r, arch),
                            Err(crate::PayloadError::Invalid { .. })
                        )
                })
        };
        // The RESET that asked for the current stop already resynchronised both ends.
        let mut in_step = false;
        for attempt in 0..=timing.retries.min(4) {
            if attempt > 0 && !std::mem::take(&mut in_step) && !self.resync().await? {
                continue;
            }
            self.conn.link.take_damaged_id();
            self.conn
                .link
                .send(
                    packet_type::KD_STATE_MANIPULATE,
                    payload.clone(),
                    Some(&answers),
                )
                .await?;
            let deadline = Instant::now() + wait;
            loop {
                let Some(rx) = self.conn.link.recv(deadline).await? else {
                    if let Some(id) = self.conn.link.take_damaged_id() {
                        if self.conn.link.ids().expected_id() == Some(id) {
                            tracing::debug!(
                                api = api::number::name(A::NUMBER),
                                id = format_args!("{id:#010x}"),
                                "reply keeps arriving damaged: releasing the target"
                            );
                            self.conn.link.abandon(id).await?;
                            return Err(KdError::ReplyLost {
                                api: api::number::name(A::NUMBER),
                            });
                        }
                    }
                    tracing::debug!(
                        api = api::number::name(A::NUMBER),
                        "no reply: resynchronising"
                    );
                    break;
                };
                match rx {
                    Received::Reset => break,
                    Received::Packet(p) => match p.packet_type {
                        packet_type::KD_STATE_MANIPULATE => {
                            let reply = Manipulate::parse(&p.payload)?;
                            if reply.api != A::NUMBER {
                                tracing::debug!(
                                    got = reply.api,
                                    want = A::NUMBER,
                                    "stale reply skipped"
                                );
                                continue;
                            }
                            match req.decode_reply(&reply, arch) {
                                Ok(r) => return Ok(r),
                                Err(crate::PayloadError::Invalid { detail, .. }) => {
                                    tracing::debug!(%detail, "reply contradicts the request: skipped");
                                }
                                Err(e) => return Err(e.into()),
                            }
                        }
                        packet_type::KD_STATE_CHANGE64 => {
                            if p.payload == self.raw {
                                // The same stop again, resent after a RESET: already handled.
                                continue;
                            }
                            // Another stop: either a stale copy of one we already continued
                            // (still on the line, or resent for a RESEND of ours), or the
                            // target really moved on and the stop being served was such a
                            // copy. Only the target knows: a RESET makes it send the stop it
                            // is in.
                            match self.current_stop().await? {
                                Some(now) if now == self.raw => {
                                    tracing::debug!(
                                        api = api::number::name(A::NUMBER),
                                        "a stale copy of an earlier stop: ignored, asking again"
                                    );
                                    in_step = true;
                                    break;
                                }
                                Some(now) => {
                                    let state = StateChange::parse(&now)?;
                                    tracing::warn!(
                                        was = format_args!("{:#x}", self.state.program_counter),
                                        now = format_args!("{:#x}", state.program_counter),
                                        cpu = state.processor,
                                        "the stop being served was a stale copy: the target is in another stop"
                                    );
                                    self.state = state;
                                    self.raw = now;
                                    self.changed = true;
                                    return Err(KdError::StopChanged);
                                }
                                None => {
                                    return Err(KdError::Protocol(
                                        "the target reported a new stop while serving a request, and did not say which stop it is in after a RESET".into(),
                                    ))
                                }
                            }
                        }
                        _ => unsolicited::handle(&mut self.conn.link, &self.conn.config, p).await?,
                    },
                }
            }
        }
        Err(KdError::Timeout {
            what: format!("the reply to {}", api::number::name(A::NUMBER)),
        })
    }

    /// The stop the target is in, asked with a RESET: a kernel waiting for a request answers
    /// with its own RESET and then sends its state change again (kd-protocol.md 1.5). A
    /// kernel that was sending a reply resends the reply instead; it waits for requests
    /// after that, so the RESET goes again (three rounds at most). `None` when no state
    /// change came.
    async fn current_stop(&mut self) -> Result<Option<Vec<u8>>, KdError> {
        let t = self.conn.link.timing().clone();
        for _ in 0..3 {
            self.conn
                .link
                .send_control(crate::wire::Packet::reset())
                .await?;
            let deadline = Instant::now() + t.ack_wait(16) + t.reply_wait(16, 1024);
            let mut answered = false;
            while let Some(rx) = self.conn.link.recv(deadline).await? {
                match rx {
                    Received::Reset => {
                        answered = true;
                        self.conn.config.sink.emit(ClientEvent::Resynchronised);
                    }
                    Received::Packet(p) if p.packet_type == packet_type::KD_STATE_CHANGE64 => {
                        if answered {
                            return Ok(Some(p.payload));
                        }
                    }
                    Received::Packet(p) if p.packet_type == packet_type::KD_STATE_MANIPULATE => {
                        tracing::debug!("a reply resent after the RESET: asking again");
                        if answered {
                            break;
                        }
                    }
                    Received::Packet(p) => {
                        unsolicited::handle(&mut self.conn.link, &self.conn.config, p).await?
                    }
                }
            }
        }
        Ok(None)
    }

    /// True once after a request found the target in another stop than the one this value
    /// was serving ([`KdError::StopChanged`]): [`Stopped::state`] is the new stop now, and
    /// whatever the caller was doing for the old one is moot.
    pub fn take_stop_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// RESET exchange with a stopped target: true once the target answered with its RESET
    /// (ids are then 0x80800000 on both sides). Packets that arrive meanwhile are handled as
    /// anywhere else; the state change the target resends is the current one.
    pub async fn resync(&mut self) -> Result<bool, KdError> {
        self.conn
            .link
            .send_control(crate::wire::Packet::reset())
            .await?;
        let t = self.conn.link.timing().clone();
        let deadline = Instant::now() + t.ack_wait(16) + t.transfer(300);
        while let Some(rx) = self.conn.link.recv(deadline).await? {
            match rx {
                Received::Reset => {
                    self.conn.config.sink.emit(ClientEvent::Resynchronised);
                    return Ok(true);
                }
                Received::Packet(p) if p.packet_type == packet_type::KD_STATE_MANIPULATE => {
                    tracing::debug!("stale reply skipped while resynchronising");
                }
                Received::Packet(p) if p.packet_type == packet_type::KD_STATE_CHANGE64 => {}
                Received::Packet(p) => {
                    unsolicited::handle(&mut self.conn.link, &self.conn.config, p).await?
                }
            }
        }
        Ok(false)
    }

    /// Reads `len` bytes of virtual memory in packet-sized chunks. Stops early (short result)
    /// at the first chunk the target could not read completely. On a noisy line the chunk
    /// shrinks when large replies cannot cross it intact, and grows back after clean reads.
    pub async fn read_virtual(&mut self, address: u64, len: usize) -> Result<Vec<u8>, KdError> {
        let mut out = Vec::with_capacity(len);
        let mut lost = 0;
        while out.len() < len {
            let n = (len - out.len()).min(self.read_chunk_now());
            let req = api::ReadVirtualMemory {
                address: address.wrapping_add(out.len() as u64),
                count: n as u32,
            };
            let chunk = match self.read_chunk_checked(&req).await {
                Ok(c) => c,
                Err(KdError::ReplyLost { .. }) if lost < 12 => {
                    lost += 1;
                    self.conn.read_chunk = (self.conn.read_chunk / 2).max(MIN_READ_CHUNK);
                    self.conn.clean_reads = 0;
                    tracing::debug!(chunk = self.conn.read_chunk, "noisy line: smaller reads");
                    continue;
                }
                Err(KdError::Payload(crate::PayloadError::Failed { .. })) if !out.is_empty() => {
                    break
                }
                Err(e) => return Err(e),
            };
            lost = 0;
            self.conn.clean_reads += 1;
            if self.conn.clean_reads >= 8
                && self.conn.read_chunk < MAX_TRANSFER
                && !self.line_is_noisy()
            {
                self.conn.read_chunk = (self.conn.read_chunk * 2).min(MAX_TRANSFER);
                self.conn.clean_reads = 0;
            }
            let got = chunk.data.len();
            out.extend_from_slice(&chunk.data);
            if got < n {
                break;
            }
        }
        Ok(out)
    }

    /// One read. On a line that showed damage recently the read is repeated until two copies
    /// agree: the byte-sum checksum passes compensating errors (two flips of the same bit in
    /// opposite directions), and on a noisy line that happens every few hundred packets.
    async fn read_chunk_checked(
        &mut self,
        req: &api::ReadVirtualMemory,
    ) -> Result<api::ReadReply, KdError> {
        let first = self.request_once(self.state.processor, req).await?;
        if !self.line_is_noisy() {
            return Ok(first);
        }
        let mut prev = first;
        for _ in 0..6 {
            let next = self.request_once(self.state.processor, req).await?;
            if next == prev {
                return Ok(next);
            }
            tracing::debug!(
                address = format_args!("{:#x}", req.address),
                "two reads disagree: damage passed the checksum"
            );
            self.conn.link.sink().emit(ClientEvent::FrameError(
                "a reply passed the checksum damaged".into(),
            ));
            prev = next;
        }
        Err(KdError::ReplyLost {
            api: "ReadVirtualMemory",
        })
    }

    /// The chunk for the next read: on a noisy line, the size that moves the most data per
    /// byte on the line for the damage rate seen (a reply of n bytes plus ~100 bytes of
    /// headers and ACK arrives intact with probability (1-e)^(n+100); the best n is about
    /// sqrt(100/e): 256 bytes at one damaged byte in 650, 3 KiB at one in 100,000).
    fn read_chunk_now(&mut self) -> usize {
        if !self.line_is_noisy() {
            return self.conn.read_chunk;
        }
        let st = self.conn.link.stats();
        let rate = st.frame_errors as f64 / (st.bytes_rx.max(1) as f64);
        let best = (100.0 / rate.max(1e-9)).sqrt() as usize;
        self.conn.read_chunk.min(best.max(MIN_READ_CHUNK))
    }

    /// Whether the link saw a damaged frame within the last [`NOISY_WINDOW`] packets.
    fn line_is_noisy(&mut self) -> bool {
        let st = self.conn.link.stats();
        let (errors, packets) = (st.frame_errors, st.packets_rx);
        if errors != self.conn.errors_seen {
            self.conn.errors_seen = errors;
            self.conn.quiet_since = packets;
        }
        self.conn.errors_seen > 0 && packets.saturating_sub(self.conn.quiet_since) < NOISY_WINDOW
    }

    /// Follows DBGKD_GET_VERSION64.DebuggerDataList to KDDEBUGGER_DATA64 (kd-protocol.md 2.3).
    /// Returns its address and contents, or `None` when the version has no data list or the
    /// block does not carry the 'KDBG' tag (encoded, or not there). The size the target
    /// claims is bounded to 4 KiB.
    pub async fn read_debugger_data(&mut self) -> Result<Option<(u64, KdDebuggerData64)>, KdError> {
        const MAX_KDBG: usize = 0x1000;
        let arch = self.arch();
        let Some(v) = self.conn.version.clone() else {
            return Ok(None);
        };
        if !v.has_debugger_data() {
            return Ok(None);
        }
        let head = self
            .read_virtual(v.debugger_data_list, arch.pointer_size())
            .await?;
        let Some(flink) = read_pointer(&head, arch) else {
            return Ok(None);
        };
        let hdr = self.read_virtual(flink, DEBUG_DATA_HEADER_SIZE).await?;
        let Ok(header) = DebugDataHeader64::parse(&hdr) else {
            return Ok(None);
        };
        if !header.is_kdbg() {
            return Ok(None);
        }
        let size = (header.size as usize).clamp(DEBUG_DATA_HEADER_SIZE, MAX_KDBG);
        let bytes = self.read_virtual(flink, size).await?;
        Ok(KdDebuggerData64::parse(&bytes).ok().map(|d| (flink, d)))
    }

    /// Resumes the target with a Continue2 (the request WinDbg sends) and returns it running.
    pub async fn resume(self, cont: &api::Continue2) -> Result<Running<S>, KdError> {
        let arch = self.arch();
        self.resume_with(cont.encode_request(arch)).await
    }

    /// Resumes with the old DbgKdContinueApi (what WinDbg answers an "unload all" stop with).
    pub async fn continue_old(self, status: u32) -> Result<Running<S>, KdError> {
        let arch = self.arch();
        self.resume_with(api::Continue { status }.encode_request(arch))
            .await
    }

    async fn resume_with(mut self, mut m: Manipulate) -> Result<Running<S>, KdError> {
        m.processor = self.state.processor;
        let acked = send_continue(&mut self.conn, &m, &self.raw).await?;
        Ok(Running {
            unconfirmed: !acked,
            conn: self.conn,
            last_stop: Some(self.raw),
            last_continue: Some(m),
            quiet_since: Instant::now(),
            probe_after: PROBE_FIRST,
            continues_resent: 0,
            probed: false,
            answered: false,
            broke_in: false,
        })
    }

    /// Reboots the target (no reply: it goes down; expect an "unload all" stop or silence).
    pub async fn reboot(mut self) -> Result<Running<S>, KdError> {
        let m = api::Reboot.encode_request(self.arch());
        self.conn
            .link
            .send(packet_type::KD_STATE_MANIPULATE, m.encode(), None)
            .await?;
        Ok(Running {
            conn: self.conn,
            last_stop: None,
            last_continue: None,
            quiet_since: Instant::now(),
            probe_after: PROBE_FIRST,
            continues_resent: 0,
            probed: false,
            answered: false,
            broke_in: false,
            unconfirmed: false,
        })
    }
}

/// Sends a continue. A continue has no reply, and a target that got it runs and only polls for
/// the break-in byte: if its ACK was lost on the line, our copies are never ACKed. Take the
/// target as running; if it did not get the continue after all, it is stopped and silent, and
/// [`Running::wait_stop`] finds out (kd-protocol.md).
///
/// Copies of the stop being continued that arrived while the continue was on its way are
/// dropped: a stopped kernel sends its state change again when it gets a RESEND (kddll's
/// KdReceivePacket), so a RESEND of ours for some damaged frame, still on the line, makes one;
/// handed up after the continue it would look like a new stop.
async fn send_continue<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    m: &Manipulate,
    stop: &[u8],
) -> Result<bool, KdError> {
    let result = match conn
        .link
        .send(packet_type::KD_STATE_MANIPULATE, m.encode(), None)
        .await
    {
        Ok(()) => Ok(true),
        Err(KdError::Timeout { .. }) => {
            tracing::warn!("no ACK for the continue: assuming the target runs");
            conn.config.sink.emit(ClientEvent::FrameError(
                "continue not acknowledged; assuming the target runs".into(),
            ));
            Ok(false)
        }
        Err(e) => Err(e),
    };
    let stale = conn
        .link
        .discard_received(|p| p.packet_type == packet_type::KD_STATE_CHANGE64 && p.payload == stop);
    if stale > 0 {
        tracing::debug!(stale, "copies of the stop we continued from dropped");
    }
    result
}

impl<S: AsyncRead + AsyncWrite + Unpin> Running<S> {
    /// Link counters.
    pub fn stats(&self) -> &LinkStats {
        self.conn.link.stats()
    }

    /// True when the last continue was never acknowledged and nothing has been heard since:
    /// the target may still be in its stop, which [`Running::wait_stop`] finds out after 2 s
    /// of silence. A caller about to leave the target should wait that long.
    pub fn continue_unconfirmed(&self) -> bool {
        self.unconfirmed
    }

    /// Waits up to `timeout` for the target to report a stop, handling prints, prompts and file
    /// requests on the way.
    ///
    /// A continue can be lost without the host knowing: a damaged packet type makes the target
    /// ACK it and drop it (kd-protocol.md), and the target then waits in the stop while the
    /// host waits for the next one. So after a continue, silence is questioned: after 2 s
    /// (doubling up to a minute while the silence lasts) one RESET goes out, which a running
    /// target ignores and a stopped one answers by sending its stop again. If the answer to
    /// that RESET is, byte for byte, the stop we continued from (and no break-in byte went
    /// out, which could make a new stop at the same place), the continue never arrived: it is
    /// sent again (at most 3 times per stop) and the caller never sees the repeat.
    pub async fn wait_stop(mut self, timeout: Duration) -> Result<WaitOutcome<S>, KdError> {
        let deadline = Instant::now() + timeout;
        loop {
            let probe_at = self.quiet_since + self.probe_after;
            let until = match &self.last_continue {
                Some(_) => deadline.min(probe_at),
                None => deadline,
            };
            let Some(rx) = self.conn.link.recv(until).await? else {
                if Instant::now() >= deadline {
                    return Ok(WaitOutcome::StillRunning(self));
                }
                tracing::debug!(
                    silent = ?self.quiet_since.elapsed(),
                    "no word since the continue: RESET, in case the target never got it"
                );
                self.conn
                    .link
                    .send_control(crate::wire::Packet::reset())
                    .await?;
                self.quiet_since = Instant::now();
                self.probe_after = (self.probe_after * 2).min(PROBE_MAX);
                self.probed = true;
                continue;
            };
            self.quiet_since = Instant::now();
            self.unconfirmed = false;
            let probed = std::mem::take(&mut self.probed);
            let answered = std::mem::take(&mut self.answered);
            match rx {
                Received::Reset => {
                    // The target's answer to our RESET: it is stopped, and its stop comes next.
                    self.answered = probed;
                    self.conn.config.sink.emit(ClientEvent::Resynchronised)
                }
                Received::Packet(p) if p.packet_type == packet_type::KD_STATE_CHANGE64 => {
                    let state = StateChange::parse(&p.payload)?;
                    let repeat = self.last_stop.as_deref() == Some(&p.payload[..]);
                    if repeat && answered && !self.broke_in && self.continues_resent < 3 {
                        if let Some(m) = self.last_continue.clone() {
                            self.continues_resent += 1;
                            tracing::warn!(
                                pc = format_args!("{:#x}", state.program_counter),
                                "the target is still in the stop we continued from: the continue was lost; sending it again"
                            );
                            self.conn.config.sink.emit(ClientEvent::FrameError(
                                "a continue was lost on the line; sent again".into(),
                            ));
                            self.unconfirmed =
                                !send_continue(&mut self.conn, &m, &p.payload).await?;
                            self.probe_after = PROBE_FIRST;
                            continue;
                        }
                    }
                    if repeat {
                        tracing::debug!("the stop we continued from was reported again");
                    }
                    tracing::debug!(
                        state = format_args!("{:#x}", state.new_state),
                        pc = format_args!("{:#x}", state.program_counter),
                        cpu = state.processor,
                        "stop reported"
                    );
                    return Ok(WaitOutcome::Stopped(Stopped {
                        conn: self.conn,
                        state,
                        raw: p.payload,
                        changed: false,
                    }));
                }
                Received::Packet(p) => {
                    unsolicited::handle(&mut self.conn.link, &self.conn.config, p).await?
                }
            }
        }
    }

    /// Sends the break-in byte and waits for the stop; sends it again (at most once a second)
    /// while the target stays silent.
    pub async fn break_in(mut self, timeout: Duration) -> Result<Stopped<S>, KdError> {
        let deadline = Instant::now() + timeout;
        let every = self.conn.link.timing().latency * 2 + self.conn.link.timing().transfer(600);
        let mut round = 0u32;
        loop {
            if Instant::now() >= deadline {
                return Err(KdError::Timeout {
                    what: "the target to stop after a break-in".into(),
                });
            }
            // From the second round on, a RESET too: a target that never got our last continue
            // is stopped and silent (it only remembers the 'b'); a RESET makes it answer and
            // resend its state change. A running target ignores it.
            if round > 0 {
                self.conn
                    .link
                    .send_control(crate::wire::Packet::reset())
                    .await?;
            }
            round += 1;
            self.broke_in = true;
            self.conn.link.send_break_in().await?;
            let wait = every
                .max(Duration::from_secs(1))
                .min(deadline - Instant::now());
            match self.wait_stop(wait).await? {
                WaitOutcome::Stopped(s) => return Ok(s),
                WaitOutcome::StillRunning(r) => self = r,
            }
        }
    }

    /// Gives the connection back (for a fresh [`Connection::connect`] after trouble).
    pub fn into_connection(self) -> Connection<S> {
        self.conn
    }
}

impl<S> Stopped<S> {
    /// Gives the connection back without resuming (the target stays stopped).
    pub fn into_connection(self) -> Connection<S> {
        self.conn
    }
}

/// A pointer of the target's width from the start of `bytes`, canonical (sign-extended on x86).
fn read_pointer(bytes: &[u8], arch: Arch) -> Option<u64> {
    let f = crate::wire::bytes::Fields::new(bytes, "pointer");
    match arch {
        Arch::Amd64 => f.u64(0).ok(),
        Arch::X86 => f.u32(0).ok().map(|v| arch.canonical_address(u64::from(v))),
    }
}
