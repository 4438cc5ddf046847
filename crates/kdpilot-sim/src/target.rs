//! The kernel's debugger loop as a state machine over [`Phase`]: run and poll for break-in
//! (running the workload's [`Activity`] every tick), report a stop and serve requests until
//! continued (KdpReportExceptionStateChange / KdpSendWaitContinue, kd-protocol.md 3-4), boot
//! (KdInitSystem's LoadSymbols, KdBreakAfterSymbolLoad, driver loads), reboot ("unload all",
//! link down, new boot: sheet 5), hang and bugcheck.
//!
//! The phase lives in the [`Machine`], so a host that goes away and a new one that attaches
//! find the kernel where it was: a stopped kernel resends its state change.

use std::time::{Duration, Instant};

use kdpilot_kd::api::Manipulate;
use kdpilot_kd::debug_io::{DebugIo, GetString, PrintString};
use kdpilot_kd::file_io::{CreateFile, FileIo, FileIoOp};
use kdpilot_kd::state_change::StateInfo;
use kdpilot_kd::wire::{packet_type, status};
use kdpilot_kd::Arch;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::kernel::{
    Action, AfterStop, Fault, Machine, PendingStop, Phase, Resume, Stop, DBG_STATUS_BUGCHECK_FIRST,
    EFLAGS_TF, KMODE_EXCEPTION_NOT_HANDLED,
};
use crate::link::{LinkError, RecvOutcome, SendOutcome, TargetLink, TargetLinkConfig};
use crate::modules::write_ptr;
use crate::step::{single_step, StepOutcome};

/// How often the running kernel polls the line and runs the [`Activity`] (the clock tick
/// KdPollBreakIn runs from).
pub const TICK: Duration = Duration::from_millis(10);

/// The running system's work, as the simulator drives it: called every tick while the kernel
/// runs. Returning a [`Stop`] makes the kernel report that exception on that CPU (the
/// activity has already set the CPU's registers and stack memory). An activity may also call
/// [`Machine::request`] (reboot, hang, bugcheck); the kernel acts on it at the next tick.
pub trait Activity: Send {
    /// One tick of the running system.
    fn poll(&mut self, machine: &mut Machine, now: Instant) -> Option<Stop>;
}

/// A system that does nothing but run (the default).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoActivity;

impl Activity for NoActivity {
    fn poll(&mut self, _machine: &mut Machine, _now: Instant) -> Option<Stop> {
        None
    }
}

/// A fault that happens at a given uptime, once per boot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScheduledFault {
    /// Time since the boot.
    pub after: Duration,
    /// What happens.
    pub fault: Fault,
}

/// What a reboot does to the link.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RebootOptions {
    /// How long the line is dead between the old kernel going down and the new one starting.
    pub downtime: Duration,
    /// End the session when the kernel goes down ([`SessionEnd::Reboot`]): a socket target
    /// closes the connection, as a VM's pipe does on restart; serving the machine again
    /// continues with the new boot once the downtime is over.
    pub disconnect: bool,
}

/// How the simulated target starts and misbehaves. The default is a target that is already
/// running (the host must break in) and never faults.
#[derive(Clone, Debug, Default)]
pub struct TargetOptions {
    /// Bytes written to the host before anything else (line noise, a previous session's tail).
    pub garbage_before_sync: Vec<u8>,
    /// Link-layer behaviour (RESET reply id, ACK timeout).
    pub link: TargetLinkConfig,
    /// Stop with a state change right away (a target that booted with `/break` or is stopped
    /// already) instead of running until the host breaks in. With `boot`: break after the
    /// boot images' symbols are reported (KdBreakAfterSymbolLoad).
    pub start_stopped: bool,
    /// Start with a boot: LoadSymbols for ntoskrnl and hal (KdInitSystem), a break-in if a
    /// 'b' arrived meanwhile, then LoadSymbols for every driver, then run.
    pub boot: bool,
    /// Faults at given uptimes, once per boot (a reboot every N seconds, a hang, a bugcheck).
    pub faults: Vec<ScheduledFault>,
    /// What a reboot does to the link.
    pub reboot: RebootOptions,
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
    /// The host closed the link; the target keeps running (or stays in the debugger).
    HostGone,
    /// The kernel went down for a reboot and took the link with it
    /// ([`RebootOptions::disconnect`]): close the connection and serve the machine again on
    /// the next one; the new boot starts when the downtime is over.
    Reboot,
}

/// Runs the target against one host connection until the host goes away (or a reboot takes
/// the link down), with nothing running on the machine.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    io: S,
    machine: &mut Machine,
    options: &TargetOptions,
) -> Result<SessionEnd, LinkError> {
    serve_with(io, machine, options, &mut NoActivity).await
}

/// [`serve`] with a workload: `activity` is polled every tick while the kernel runs.
pub async fn serve_with<S: AsyncRead + AsyncWrite + Unpin>(
    io: S,
    machine: &mut Machine,
    options: &TargetOptions,
    activity: &mut dyn Activity,
) -> Result<SessionEnd, LinkError> {
    let mut link = TargetLink::new(io, options.link.clone());
    if !options.garbage_before_sync.is_empty() {
        link.write_raw(&options.garbage_before_sync).await?;
    }
    if !machine.started {
        machine.started = true;
        if options.boot {
            machine.phase = Phase::Booting(0);
        } else if options.start_stopped {
            let state = machine.break_in();
            machine.phase = stopped(0, state, AfterStop::Run);
        }
    }
    let mut chat = matches!(machine.phase, Phase::Running);
    loop {
        let step = match machine.phase.clone() {
            Phase::Running => run_tick(&mut link, machine, options, activity, &mut chat).await,
            Phase::Debugger(_) => {
                let r = in_debugger(&mut link, machine, options).await;
                chat |= matches!(machine.phase, Phase::Running);
                r
            }
            Phase::Booting(i) => {
                let r = boot_step(&mut link, machine, options, i).await;
                chat |= matches!(machine.phase, Phase::Running);
                r
            }
            Phase::Hung(until) => {
                // A hung kernel does not look at the line at all.
                tokio::time::sleep_until(until.into()).await;
                machine.phase = Phase::Running;
                Ok(None)
            }
            Phase::Rebooting { until, disconnect } => {
                if disconnect {
                    machine.phase = Phase::Rebooting {
                        until,
                        disconnect: false,
                    };
                    return Ok(SessionEnd::Reboot);
                }
                tokio::time::sleep_until(until.into()).await;
                if let Err(e) = machine.reboot() {
                    tracing::warn!(error = %e, "the simulated kernel could not be rebuilt");
                }
                // A new kernel: packet ids start again at INITIAL|SYNC (sheet 5).
                link.reset_ids_to_boot();
                machine.phase = Phase::Booting(0);
                Ok(None)
            }
            Phase::BugCheck { code, parameters } => {
                bugcheck(&mut link, machine, code, parameters).await
            }
        };
        match step {
            Ok(None) => {}
            Ok(Some(end)) => return Ok(end),
            Err(_) => return Ok(SessionEnd::HostGone),
        }
    }
}

fn stopped(cpu: u16, state: kdpilot_kd::state_change::StateChange, after: AfterStop) -> Phase {
    Phase::Debugger(Box::new(PendingStop {
        cpu,
        state,
        after,
        give_up: false,
    }))
}

fn load_symbols(state: kdpilot_kd::state_change::StateChange, after: AfterStop) -> Phase {
    Phase::Debugger(Box::new(PendingStop {
        cpu: 0,
        state,
        after,
        give_up: true,
    }))
}

/// One clock tick of a running kernel.
async fn run_tick<S: AsyncRead + AsyncWrite + Unpin>(
    link: &mut TargetLink<S>,
    machine: &mut Machine,
    options: &TargetOptions,
    activity: &mut dyn Activity,
    chat: &mut bool,
) -> Result<Option<SessionEnd>, LinkError> {
    if std::mem::take(chat) {
        chatter(link, machine, &options.chatter).await?;
    }
    if let Some(fault) = due_fault(machine, options) {
        start_fault(machine, options, fault);
        return Ok(None);
    }
    if link.poll_break_in(TICK).await? {
        let state = machine.break_in();
        machine.phase = stopped(0, state, AfterStop::Run);
        return Ok(None);
    }
    if let Some(stop) = activity.poll(machine, Instant::now()) {
        let state = machine.report_stop(stop.cpu, stop.code, stop.pc, stop.thread);
        machine.phase = stopped(stop.cpu, state, AfterStop::Run);
    }
    Ok(None)
}

fn due_fault(machine: &mut Machine, options: &TargetOptions) -> Option<Fault> {
    if let Some(f) = machine.requests.pop_front() {
        return Some(f);
    }
    let up = machine.uptime();
    let (i, f) = options
        .faults
        .iter()
        .enumerate()
        .find(|(i, f)| up >= f.after && !machine.faults_fired.contains(i))?;
    machine.faults_fired.insert(i);
    Some(f.fault.clone())
}

fn start_fault(machine: &mut Machine, options: &TargetOptions, fault: Fault) {
    let _ = options;
    machine.phase = match fault {
        Fault::Hang(d) => Phase::Hung(Instant::now() + d),
        Fault::BugCheck { code, parameters } => Phase::BugCheck { code, parameters },
        Fault::Reboot => {
            let state = machine.unload_all_state_change();
            load_symbols(state, AfterStop::Reboot)
        }
    };
}

/// KdInitSystem and the boot drivers: LoadSymbols for image `i`; after hal,
/// `KdBreakAfterSymbolLoad = KdPollBreakIn()`.
async fn boot_step<S: AsyncRead + AsyncWrite + Unpin>(
    link: &mut TargetLink<S>,
    machine: &mut Machine,
    options: &TargetOptions,
    i: usize,
) -> Result<Option<SessionEnd>, LinkError> {
    if i >= 2.min(machine.images.len()) && !machine.break_after_symbols_polled {
        machine.break_after_symbols_polled = true;
        let asked = options.start_stopped && machine.boots == 1;
        if link.poll_break_in(Duration::from_millis(1)).await? || asked {
            let state = machine.break_in();
            machine.phase = stopped(0, state, AfterStop::Boot(i));
            return Ok(None);
        }
    }
    machine.phase = match machine.load_symbols_state_change(i) {
        Some(state) => load_symbols(state, AfterStop::Boot(i + 1)),
        None => Phase::Running,
    };
    Ok(None)
}

/// KeBugCheckEx with a debugger: the "Fatal System Error" DbgPrint, then
/// DbgBreakPointWithStatus(DBG_STATUS_BUGCHECK_FIRST).
async fn bugcheck<S: AsyncRead + AsyncWrite + Unpin>(
    link: &mut TargetLink<S>,
    machine: &mut Machine,
    code: u32,
    parameters: [u64; 4],
) -> Result<Option<SessionEnd>, LinkError> {
    let arch = machine.arch;
    let p = |v: u64| match arch {
        Arch::Amd64 => format!("0x{v:016X}"),
        Arch::X86 => format!("0x{:08X}", v as u32),
    };
    let text = format!(
        "\n*** Fatal System Error: 0x{code:08x}\n                       ({},{},{},{})\n\n",
        p(parameters[0]),
        p(parameters[1]),
        p(parameters[2]),
        p(parameters[3])
    );
    let io = PrintString::new(text.as_bytes()).to_debug_io();
    if link
        .send_or_give_up(packet_type::KD_DEBUG_IO, &io.encode())
        .await?
        == SendOutcome::NotDelivered
    {
        machine.set_debugger_not_present(true);
    } else {
        machine.chatter_log.prints_delivered += 1;
    }
    let data = machine.layout.ki_bugcheck_data;
    let ps = arch.pointer_size() as u64;
    write_ptr(&mut machine.memory, arch, data, u64::from(code));
    for (i, v) in parameters.iter().enumerate() {
        write_ptr(&mut machine.memory, arch, data + ps * (i as u64 + 1), *v);
    }
    let state = machine.break_with_status(DBG_STATUS_BUGCHECK_FIRST);
    machine.phase = stopped(0, state, AfterStop::BugCheckDone);
    Ok(None)
}

/// KdpSendWaitContinue: send the state change, serve requests until a continue.
async fn in_debugger<S: AsyncRead + AsyncWrite + Unpin>(
    link: &mut TargetLink<S>,
    machine: &mut Machine,
    options: &TargetOptions,
) -> Result<Option<SessionEnd>, LinkError> {
    let Phase::Debugger(stop) = machine.phase.clone() else {
        return Ok(None);
    };
    let payload = stop.state.encode();
    'send: loop {
        if stop.give_up {
            let out = link
                .send_or_give_up(packet_type::KD_STATE_CHANGE64, &payload)
                .await?;
            if out == SendOutcome::NotDelivered {
                // Nobody ACKed: KdDebuggerNotPresent, and KdpSendWaitContinue returns as if
                // continued (sheet 1.5, 3).
                machine.set_debugger_not_present(true);
                after_continue(
                    machine,
                    *stop,
                    Resume {
                        status: status::DBG_CONTINUE,
                        trace: false,
                    },
                    options,
                );
                return Ok(None);
            }
        } else {
            while link.send(packet_type::KD_STATE_CHANGE64, &payload).await?
                == SendOutcome::NotDelivered
            {}
        }
        machine.set_debugger_not_present(false);
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
                    match machine.handle_on(stop.cpu, &req) {
                        Action::Reply(reply) => {
                            link.send(packet_type::KD_STATE_MANIPULATE, &reply.encode())
                                .await?;
                        }
                        Action::NoReply => {}
                        Action::Resume(r) => {
                            after_continue(machine, *stop, r, options);
                            return Ok(None);
                        }
                        Action::SwitchProcessor(n) => {
                            if u32::from(n) >= machine.processors || n == stop.cpu {
                                // ContinueProcessorReselected: the same CPU reports again.
                                continue 'send;
                            }
                            let state = machine.switch_state_change(n);
                            machine.phase = Phase::Debugger(Box::new(PendingStop {
                                cpu: n,
                                state,
                                after: stop.after.clone(),
                                give_up: false,
                            }));
                            return Ok(None);
                        }
                        Action::Reboot => {
                            machine.running = true;
                            machine.phase = Phase::Rebooting {
                                until: Instant::now() + options.reboot.downtime,
                                disconnect: options.reboot.disconnect,
                            };
                            return Ok(None);
                        }
                        Action::BugCheck(code) => {
                            machine.running = true;
                            machine.phase = Phase::BugCheck {
                                code,
                                parameters: [0; 4],
                            };
                            return Ok(None);
                        }
                    }
                }
            }
        }
    }
}

/// What the kernel does when KdpSendWaitContinue returns.
fn after_continue(machine: &mut Machine, stop: PendingStop, r: Resume, options: &TargetOptions) {
    let arch = machine.arch;
    let cpu = stop.cpu;
    match &stop.state.info {
        StateInfo::Exception(e) if !r.success() && stop.after != AfterStop::BugCheckDone => {
            // ContinueError: the exception is not handled and goes on being dispatched. No
            // handler in the kernel: a second chance, then KMODE_EXCEPTION_NOT_HANDLED.
            let rec = &e.record;
            machine.phase = if e.first_chance != 0 {
                let thread = machine.cpu(cpu).map_or(0, |c| c.thread);
                let state = machine.report_exception(cpu, rec.code, rec.address, thread, false);
                Phase::Debugger(Box::new(PendingStop { state, ..stop }))
            } else {
                Phase::BugCheck {
                    code: KMODE_EXCEPTION_NOT_HANDLED,
                    parameters: [
                        u64::from(rec.code),
                        rec.address,
                        rec.information[0],
                        rec.information[1],
                    ],
                }
            };
            return;
        }
        StateInfo::LoadSymbols(_) => {
            // KdpTrap: a debug service's int3 is stepped over when the PC is unchanged.
            if let Some(c) = machine.cpus.get_mut(usize::from(cpu)) {
                let pc = c.context.pc();
                if machine.memory.read(arch.canonical_address(pc), 1) == [0xCC] {
                    c.context.set_pc(pc + 1);
                }
            }
        }
        _ => {}
    }
    // EFLAGS.TF (set by Continue2's TraceFlag, left alone by Continue): one instruction, then
    // a debug trap on the same CPU.
    let traced = machine
        .cpu(cpu)
        .is_some_and(|c| c.context.eflags() & EFLAGS_TF != 0);
    if traced {
        let Some(mut c) = machine.cpu(cpu).cloned() else {
            return;
        };
        let outcome = single_step(arch, &mut c.context, &mut machine.memory);
        let code = match outcome {
            StepOutcome::Breakpoint => status::BREAKPOINT,
            StepOutcome::Stepped | StepOutcome::NoCode => status::SINGLE_STEP,
        };
        let pc = arch.canonical_address(c.context.pc());
        let thread = c.thread;
        machine.set_context(cpu, c.context);
        let state = machine.report_stop(cpu, code, pc, thread);
        machine.phase = Phase::Debugger(Box::new(PendingStop {
            cpu,
            state,
            after: stop.after,
            give_up: false,
        }));
        return;
    }
    // Breakpoints owed on memory that appeared meanwhile are planted now.
    machine.set_owed_breakpoints();
    machine.running = true;
    machine.phase = match stop.after {
        AfterStop::Run => Phase::Running,
        AfterStop::Boot(n) => Phase::Booting(n),
        AfterStop::Reboot => Phase::Rebooting {
            until: Instant::now() + options.reboot.downtime,
            disconnect: options.reboot.disconnect,
        },
        AfterStop::BugCheckDone => {
            let state = machine.unload_all_state_change();
            load_symbols(state, AfterStop::Reboot)
        }
    };
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
        } else {
            machine.set_debugger_not_present(true);
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
