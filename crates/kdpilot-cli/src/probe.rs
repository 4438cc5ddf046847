//! `kdpilot probe`: connect, synchronise, break in, identify the target, resume, exit.
//!
//! The quickest check that cable, port, baud and the target's debug settings are right.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use kdpilot_kd::api::Continue2;
use kdpilot_kd::client::Stopped;
use kdpilot_kd::state_change::StateInfo;
use kdpilot_kd::wire::status;
use kdpilot_transport::Endpoint;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::error::{CliError, ResultExt as _};

/// Arguments of `kdpilot probe`.
#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// Where the target's debug port is, in kd's -k syntax: com:port=COM1,baud=19200,
    /// com:pipe,port=\\.\pipe\com_1,resets=0,reconnect, unix:/tmp/com1, tcp:127.0.0.1:4555
    #[arg(long, value_name = "ENDPOINT")]
    pub target: String,

    /// Give up if the target does not answer within SECS seconds
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub timeout: u64,
}

/// Runs `kdpilot probe`.
pub async fn run(args: ProbeArgs) -> anyhow::Result<()> {
    let endpoint: Endpoint = args.target.parse().map_err(CliError::usage)?;
    let report = probe(&endpoint, Duration::from_secs(args.timeout.max(1))).await?;
    crate::output::print(&report)
}

/// Connects to `endpoint`, identifies the target, resumes it and returns the report.
pub async fn probe(endpoint: &Endpoint, timeout: Duration) -> anyhow::Result<String> {
    let stopped = crate::session::connect_endpoint(endpoint, timeout).await?;
    identify(stopped).await.target_err()
}

/// Reads what the target is, resumes it, and returns the report text.
async fn identify<S: AsyncRead + AsyncWrite + Unpin>(
    mut stopped: Stopped<S>,
) -> anyhow::Result<String> {
    let mut out = String::new();
    let arch = stopped.arch();
    let v = stopped
        .version()
        .cloned()
        .context("the target did not report its version")?;
    let kind = if v.is_boot_debugger() {
        "boot debugger (bootmgr/winload)"
    } else if v.is_checked_build() {
        "checked kernel"
    } else {
        "free kernel"
    };
    let mp = if v.is_mp() {
        "multiprocessor"
    } else {
        "uniprocessor"
    };
    let sc = stopped.state().clone();
    writeln!(
        out,
        "target          Windows build {} {kind}, {arch}, {mp}",
        v.minor_version
    )?;
    writeln!(
        out,
        "protocol        KD version {}, secondary {}, flags {:#06x}",
        v.protocol_version, v.kd_secondary_version, v.flags
    )?;
    writeln!(out, "kernel base     {:#018x}", v.kern_base)?;
    writeln!(out, "module list     {:#018x}", v.ps_loaded_module_list)?;
    writeln!(
        out,
        "processors      {} (stopped on CPU {}, thread {:#018x})",
        sc.number_processors, sc.processor, sc.thread
    )?;
    let why = match &sc.info {
        StateInfo::Exception(e) => format!(
            "exception {:#010x} at {:#018x}{}",
            e.record.code,
            e.record.address,
            if e.record.code == status::BREAKPOINT {
                " (break-in)"
            } else {
                ""
            }
        ),
        StateInfo::LoadSymbols(_) if sc.is_unload_all() => {
            "unload all symbols: the target is going down for a reboot".to_string()
        }
        StateInfo::LoadSymbols(l) => format!("load symbols for {}", l.path_str()),
        StateInfo::CommandString(_) => "command string".to_string(),
        StateInfo::Unknown => format!("state {:#06x}", sc.new_state),
    };
    writeln!(out, "stopped by      {why}")?;
    match stopped.read_debugger_data().await {
        Ok(Some((addr, kdbg))) => writeln!(
            out,
            "KDBG            found at {addr:#018x} (size {:#x}, kernel base {})",
            kdbg.header().size,
            kdbg.kern_base()
                .map(|b| format!("{b:#018x}"))
                .unwrap_or_else(|| "missing".into())
        )?,
        Ok(None) => writeln!(
            out,
            "KDBG            not found (no data list, or the block is encoded)"
        )?,
        Err(e) if !e.is_fatal() => writeln!(out, "KDBG            unreadable: {e}")?,
        Err(e) => return Err(e).context("reading KDDEBUGGER_DATA64"),
    }
    let dr7 = sc.control_report(arch).dr7();
    let stats = stopped.stats().clone();
    stopped
        .resume(&Continue2::go().with_dr7(dr7))
        .await
        .context("resuming the target")?;
    writeln!(
        out,
        "resumed         the target is running (link: {} bytes sent, {} received)",
        stats.bytes_tx, stats.bytes_rx
    )?;
    Ok(out)
}
