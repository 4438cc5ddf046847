//! The kernel's debugger loop: run and poll for break-in, report a stop, serve requests until
//! continued (KdpReportExceptionStateChange / KdpSendWaitContinue, kd-protocol.md 3-4).

use std::time::Duration;

use kdpilot_kd::api::Manipulate;
use kdpilot_kd::debug_io::{DebugIo, GetString, PrintString};
use kdpilot_kd::file_io::{CreateFile, FileIo, FileIoOp};
use kdpilot_kd::state_change::StateChange;
use kdpilot_kd::wire::{packet_type, status};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::kernel::{Action, Machine};
use crate::link::{LinkError, RecvOutcome, SendOutcome, TargetLink, TargetLinkConfig};

/// How the simulated target starts and misbehaves.
#[derive(Clone, Debug, Default)]
pub struct TargetOptions {
    /// Bytes written to the host before anything else (line noise, a previous session's tail).
    pub garbage_before_sync: Vec<u8>,
    /// Link-layer behaviour (RESET reply id, ACK timeout).
    pub link: TargetLinkConfig,
    /// Stop with a state change right away (a target that booted with `/break` or is stopped
    /// already) instead of running until the host breaks in.
    pub start_stopped: bool,
    /// What the running kernel says on its own after every resume.
    pub chatter: Chatter,
}

/// Unsolicited traffic of a running kernel: DbgPrint, DbgPrompt, .kdfiles requests.
#[derive(Clone, Debug, Default)]
pub struct Chatter {
    /// DbgPrint strings sent after every resume (dropped if nobody ACKs, as the kernel does).
    pub prints: Vec<String>,
    /// A DbgPrompt asked after every resume; the kernel waits for the answer.
    pub prompt: Option<String>,
    /// A FILE_IO CreateFile request for this name sent after every resume.
    pub file_request: Option<String>,
}

/// What the host answered, for tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChatterLog {
    /// DbgPrint strings delivered (ACKed).
    pub prints_delivered: u64,
    /// Answers to DbgPrompt.
    pub prompt_answers: Vec<Vec<u8>>,
    /// Statuses of FILE_IO replies.
    pub file_replies: Vec<u32>,
}

/// What ended a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionEnd {
    /// The host closed the link; the target keeps running.
    HostGone,
    /// The host asked for a reboot.
    Reboot,
}

/// Runs the target against one host connection until the host goes away or reboots it.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    io: S,
    machine: &mut Machine,
    options: &TargetOptions,
) -> Result<SessionEnd, LinkError> {
    let mut link = TargetLink::new(io, options.link.clone());
    if !options.garbage_before_sync.is_empty() {
        link.write_raw(&options.garbage_before_sync).await?;
    }
    let mut stop_now = options.start_stopped;
    let mut chat = !stop_now;
    loop {
        if std::mem::take(&mut chat) && chatter(&mut link, machine, &options.chatter).await.is_err()
        {
            return Ok(SessionEnd::HostGone);
        }
        if !stop_now {
            match link.poll_break_in(Duration::from_millis(10)).await {
                Ok(true) => {}
                Ok(false) => continue,
                Err(_) => return Ok(SessionEnd::HostGone),
            }
        }
        stop_now = false;
        let sc = machine.break_in_state_change();
        match report_and_serve(&mut link, machine, sc).await {
            Ok(Some(end)) => return Ok(end),
            Ok(None) => chat = true,
            Err(_) => return Ok(SessionEnd::HostGone),
        }
    }
}

/// Sends a state change (retrying forever, as for exceptions) and serves requests until a
/// continue. `Some(end)` when the session ends.
async fn report_and_serve<S: AsyncRead + AsyncWrite + Unpin>(
    link: &mut TargetLink<S>,
    machine: &mut Machine,
    sc: StateChange,
) -> Result<Option<SessionEnd>, LinkError> {
    let payload = sc.encode();
    machine.on_stop();
    'send: loop {
        while link.send(packet_type::KD_STATE_CHANGE64, &payload).await?
            == SendOutcome::NotDelivered
        {}
        loop {
            match link
                .recv(packet_type::KD_STATE_MANIPULATE, Duration::from_secs(3600))
                .await?
            {
                RecvOutcome::NeedsResend => continue 'send,
                RecvOutcome::Timeout => continue,
                RecvOutcome::Packet(p) => {
                    let Ok(req) = Manipulate::parse(&p.payload) else {
                        continue;
                    };
                    match machine.handle(&req) {
                        Action::Reply(reply) => {
                            link.send(packet_type::KD_STATE_MANIPULATE, &reply.encode())
                                .await?;
                        }
                        Action::Resume => return Ok(None),
                        Action::Reboot => return Ok(Some(SessionEnd::Reboot)),
                    }
                }
            }
        }
    }
}

/// Sends the configured unsolicited traffic, as a running kernel would.
async fn chatter<S: AsyncRead + AsyncWrite + Unpin>(
    link: &mut TargetLink<S>,
    machine: &mut Machine,
    chatter: &Chatter,
) -> Result<(), LinkError> {
    for text in &chatter.prints {
        let io = PrintString::new(text.as_bytes()).to_debug_io();
        if link
            .send_or_give_up(packet_type::KD_DEBUG_IO, &io.encode())
            .await?
            == SendOutcome::Delivered
        {
            machine.chatter_log.prints_delivered += 1;
        }
    }
    if let Some(prompt) = &chatter.prompt {
        let io = GetString::new(prompt.as_bytes(), 80).to_debug_io().encode();
        'ask: loop {
            while link.send(packet_type::KD_DEBUG_IO, &io).await? == SendOutcome::NotDelivered {}
            loop {
                match link
                    .recv(packet_type::KD_DEBUG_IO, Duration::from_secs(3600))
                    .await?
                {
                    RecvOutcome::NeedsResend => continue 'ask,
                    RecvOutcome::Timeout => continue,
                    RecvOutcome::Packet(p) => {
                        let answer = DebugIo::parse(&p.payload)
                            .ok()
                            .and_then(|d| d.reply().ok())
                            .map(|r| r.answer)
                            .unwrap_or_default();
                        machine.chatter_log.prompt_answers.push(answer);
                        break 'ask;
                    }
                }
            }
        }
    }
    if let Some(name) = &chatter.file_request {
        let io = FileIoOp::Create(CreateFile::open(name))
            .to_file_io()
            .encode();
        'file: loop {
            while link.send(packet_type::KD_FILE_IO, &io).await? == SendOutcome::NotDelivered {}
            loop {
                match link
                    .recv(packet_type::KD_FILE_IO, Duration::from_secs(3600))
                    .await?
                {
                    RecvOutcome::NeedsResend => continue 'file,
                    RecvOutcome::Timeout => continue,
                    RecvOutcome::Packet(p) => {
                        let st = FileIo::parse(&p.payload)
                            .map(|f| f.status)
                            .unwrap_or(u32::MAX);
                        machine.chatter_log.file_replies.push(st);
                        break 'file;
                    }
                }
            }
        }
    }
    Ok(())
}

/// The reply a kernel gives to an API it does not implement.
pub fn unsuccessful(req: &Manipulate) -> Manipulate {
    let mut m = req.clone();
    m.return_status = status::UNSUCCESSFUL;
    m.data.clear();
    m
}
