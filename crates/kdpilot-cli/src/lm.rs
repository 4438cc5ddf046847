//! `kdpilot lm`: the target's loaded modules with their symbol status, like WinDbg's `lm`.

use std::fmt::Write as _;

use clap::Args;
use kdpilot_kd::api::Continue2;

use crate::error::ResultExt as _;
use crate::session::{self, TargetArgs};

/// Arguments of `kdpilot lm`.
#[derive(Debug, Args)]
pub struct LmArgs {
    #[command(flatten)]
    target: TargetArgs,
}

/// Runs `kdpilot lm`: connect, list, resume.
pub async fn run(args: LmArgs) -> anyhow::Result<()> {
    let mut stopped = session::connect(&args.target).await?;
    let listed = list(&args.target, &mut stopped).await;
    let dr7 = stopped.state().control_report(stopped.arch()).dr7();
    stopped
        .resume(&Continue2::go().with_dr7(dr7))
        .await
        .target_err()?;
    crate::output::print(&listed?)
}

async fn list<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    args: &TargetArgs,
    stopped: &mut kdpilot_kd::client::Stopped<S>,
) -> anyhow::Result<String> {
    let mut set = session::modules(stopped).await?;
    session::load_symbols(args, &mut set).await?;
    let mut out = String::from("start              end                module name\n");
    for m in set.modules() {
        let pdb = m
            .codeview
            .as_ref()
            .map(|cv| format!("  [{} {} age {}]", cv.pdb_path, cv.signature, cv.age))
            .unwrap_or_default();
        writeln!(
            out,
            "{:#018x} {:#018x} {:<10} {}{pdb}",
            m.base,
            m.base + u64::from(m.size),
            m.name,
            m.symbol_status
        )?;
    }
    Ok(out)
}
