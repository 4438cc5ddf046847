//! `kdpilot stack`: the stack of the stopped processor, like WinDbg's `kb`; optionally at a
//! breakpoint (`--break-at nt!ExAllocatePoolWithTag`: plant, wait for the hit, print, remove).

use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use kdpilot_capture::engine::registers;
use kdpilot_kd::api::{self, Continue2, GetContext};
use kdpilot_kd::client::{Stopped, WaitOutcome};
use kdpilot_symbols::{CachedReader, StackWalker};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::error::{CliError, ResultExt as _};
use crate::session::{self, TargetArgs, TargetMemory};

/// Arguments of `kdpilot stack`.
#[derive(Debug, Args)]
pub struct StackArgs {
    #[command(flatten)]
    target: TargetArgs,

    /// Plant a breakpoint here (module!function[+offset]), resume, and show the stack of the
    /// first hit; without it, the stack where the break-in stopped
    #[arg(long, value_name = "SYMBOL")]
    pub break_at: Option<String>,

    /// How long to wait for the breakpoint to be hit
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub wait: u64,

    /// Leave out source file and line
    #[arg(long)]
    pub no_lines: bool,
}

/// Runs `kdpilot stack`.
pub async fn run(args: StackArgs) -> anyhow::Result<()> {
    let mut stopped = session::connect(&args.target).await?;
    let mut set = session::modules(&mut stopped).await?;
    session::load_symbols(&args.target, &mut set).await?;
    let mut stopped = match &args.break_at {
        None => stopped,
        Some(symbol) => {
            let address = match set.resolve(symbol) {
                Ok(a) => a,
                Err(e) => {
                    let dr7 = stopped.state().control_report(stopped.arch()).dr7();
                    stopped
                        .resume(&Continue2::go().with_dr7(dr7))
                        .await
                        .target_err()?;
                    return Err(CliError::usage(anyhow::anyhow!("{e}")).into());
                }
            };
            hit(stopped, address, Duration::from_secs(args.wait)).await?
        }
    };
    let text = kb(&mut stopped, &set, !args.no_lines).await;
    let dr7 = stopped.state().control_report(stopped.arch()).dr7();
    stopped
        .resume(&Continue2::go().with_dr7(dr7))
        .await
        .target_err()?;
    crate::output::print(&text?)
}

/// Plants a breakpoint, resumes, waits for the stop at it. The kernel removes a breakpoint
/// when it reports a stop on it; on a timeout the target is broken into and the breakpoint
/// removed, so nothing is left planted.
async fn hit<S: AsyncRead + AsyncWrite + Unpin>(
    mut stopped: Stopped<S>,
    address: u64,
    wait: Duration,
) -> anyhow::Result<Stopped<S>> {
    let handle = stopped
        .request(&api::WriteBreakPoint { address })
        .await
        .with_context(|| format!("could not plant a breakpoint at {address:#x}"))
        .target_err()?;
    let dr7 = stopped.state().control_report(stopped.arch()).dr7();
    let running = stopped
        .resume(&Continue2::go().with_dr7(dr7))
        .await
        .target_err()?;
    match running.wait_stop(wait).await.target_err()? {
        WaitOutcome::Stopped(s) => {
            if s.state().program_counter != address {
                tracing::warn!(
                    pc = format_args!("{:#x}", s.state().program_counter),
                    "the target stopped elsewhere"
                );
            }
            Ok(s)
        }
        WaitOutcome::StillRunning(r) => {
            let mut s = r.break_in(Duration::from_secs(10)).await.target_err()?;
            let _ = s.request(&api::RestoreBreakPoint { handle }).await;
            let dr7 = s.state().control_report(s.arch()).dr7();
            s.resume(&Continue2::go().with_dr7(dr7))
                .await
                .target_err()?;
            anyhow::bail!("the breakpoint at {address:#x} was not hit within {} s (removed; the target is running)", wait.as_secs())
        }
    }
}

/// The stack of the stopped processor as `kb` prints it.
pub async fn kb<S: AsyncRead + AsyncWrite + Unpin>(
    stopped: &mut Stopped<S>,
    set: &kdpilot_symbols::ModuleSet,
    lines: bool,
) -> anyhow::Result<String> {
    let ctx = stopped
        .request(&GetContext)
        .await
        .context("reading the registers")
        .target_err()?;
    let regs = registers(&ctx);
    let mut reader = CachedReader::new(TargetMemory(stopped));
    let trace = StackWalker::new(set)
        .walk(&mut reader, regs)
        .await
        .context("walking the stack")
        .target_err()?;
    Ok(trace.format_kb(set, lines))
}
