//! What `lm`, `stack` (and later `capture`) share: open the endpoint, synchronise, read the
//! target's modules through the KD link, find their symbols.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
pub use kdpilot_capture::engine::TargetMemory;
use kdpilot_kd::client::{ClientConfig, Connection, Stopped, Timing};
use kdpilot_symbols::{
    KernelInfo, ModuleSet, ProgressEvent, ProgressSink, StoreOptions, SymbolPath, SymbolStore,
    WalkLimits,
};
use kdpilot_transport::{open_waiting, Endpoint, Link, WaitOptions};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::error::{CliError, ResultExt as _};

/// Options of every command that talks to a target and needs symbols.
#[derive(Debug, Args)]
pub struct TargetArgs {
    /// Where the target's debug port is, in kd's -k syntax: com:port=COM1,baud=19200,
    /// com:pipe,port=\\.\pipe\com_1,resets=0,reconnect, unix:/tmp/com1, tcp:127.0.0.1:4555
    #[arg(long, value_name = "ENDPOINT")]
    pub target: String,

    /// Symbol path in WinDbg syntax (srv*C:\symbols*https://server, cache*DIR, plain folders,
    /// ;-separated); default: _NT_SYMBOL_PATH
    #[arg(long, value_name = "SYMPATH", env = "_NT_SYMBOL_PATH")]
    pub symbols: Option<String>,

    /// Use only what the symbol caches already hold (no downloads)
    #[arg(long)]
    pub offline: bool,

    /// Give up if the target does not answer within SECS seconds
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub timeout: u64,
}

impl TargetArgs {
    /// The endpoint, or a usage error that lists the accepted forms.
    pub fn endpoint(&self) -> anyhow::Result<Endpoint> {
        self.target.parse().map_err(|e| CliError::usage(e).into())
    }

    /// The timeout.
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout.max(1))
    }
}

/// Opens the endpoint and gets the target stopped and identified.
pub async fn connect(args: &TargetArgs) -> anyhow::Result<Stopped<Link>> {
    connect_endpoint(&args.endpoint()?, args.timeout()).await
}

/// Opens `endpoint` (waiting for it with `reconnect`), then synchronises and breaks in,
/// giving up after `timeout`. Timeouts scale with the line rate.
pub async fn connect_endpoint(
    endpoint: &Endpoint,
    timeout: Duration,
) -> anyhow::Result<Stopped<Link>> {
    let link = open_endpoint(endpoint, timeout).await.target_err()?;
    tracing::info!("connecting to {}", endpoint.description());
    Connection::new(link, client_config(endpoint))
        .connect(timeout)
        .await
        .map_err(|e| anyhow::anyhow!(no_answer(endpoint, timeout, &e)))
        .target_err()
}

/// Opens `endpoint`, waiting up to `timeout` for it to appear when it says `reconnect`.
pub async fn open_endpoint(endpoint: &Endpoint, timeout: Duration) -> anyhow::Result<Link> {
    let wait = WaitOptions {
        give_up_after: Some(timeout),
        ..WaitOptions::default()
    };
    open_waiting(endpoint, &wait, |ev| tracing::info!("{ev}"))
        .await
        .with_context(|| format!("could not open {}", endpoint.description()))
}

/// The KD client's settings for `endpoint`: timing for its line rate, its `resets=`.
pub fn client_config(endpoint: &Endpoint) -> ClientConfig {
    ClientConfig {
        timing: timing_for(endpoint),
        resets: endpoint.resets().unwrap_or(5),
        ..ClientConfig::default()
    }
}

/// The message for a target that did not synchronise, with what to check.
pub fn no_answer(endpoint: &Endpoint, timeout: Duration, error: &dyn std::fmt::Display) -> String {
    format!(
        "no KD target answered on {} within {} s ({error}). Check that the target booted with \
         kernel debugging on the same port and rate (bcdedit /debug on; bcdedit /dbgsettings serial \
         debugport:1 baudrate:{}), the cable or the VM's pipe, and that no other debugger holds the port",
        endpoint.description(),
        timeout.as_secs(),
        endpoint.baud().unwrap_or(115_200)
    )
}

/// Link timing for an endpoint: scaled to the baud rate on serial lines.
pub fn timing_for(endpoint: &Endpoint) -> Timing {
    let mut timing = endpoint.baud().map(Timing::for_baud).unwrap_or_default();
    timing.latency = timing.latency.max(Duration::from_millis(300));
    timing
}

/// The modules of the stopped target (PsLoadedModuleList walk, PE headers, CodeView).
pub async fn modules<S: AsyncRead + AsyncWrite + Unpin>(
    stopped: &mut Stopped<S>,
) -> anyhow::Result<ModuleSet> {
    let v = stopped
        .version()
        .cloned()
        .context("the target did not report its version")?;
    let kernel = KernelInfo {
        arch: stopped.arch(),
        kern_base: v.kern_base,
        ps_loaded_module_list: v.ps_loaded_module_list,
    };
    let (set, warnings) =
        ModuleSet::from_target(&mut TargetMemory(stopped), &kernel, &WalkLimits::default())
            .await
            .context("reading the loaded-module list")
            .target_err()?;
    for w in warnings {
        tracing::warn!("module list: {w}");
    }
    Ok(set)
}

/// Symbol lookups and downloads drawn as a progress bar on stderr (plain lines when stderr is
/// not a terminal).
struct BarProgress(indicatif::ProgressBar);

impl BarProgress {
    fn new() -> Self {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} symbols: {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        bar.enable_steady_tick(Duration::from_millis(120));
        Self(bar)
    }
}

impl ProgressSink for BarProgress {
    fn event(&self, event: &ProgressEvent) {
        let (text, _) = crate::status::progress_text(event);
        if self.0.is_hidden() {
            tracing::info!("symbols: {text}");
        } else {
            self.0.set_message(text);
        }
    }
}

impl Drop for BarProgress {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

/// Finds symbols (PDB and image) for every module through the symbol path.
pub async fn load_symbols(args: &TargetArgs, set: &mut ModuleSet) -> anyhow::Result<()> {
    let text = args.symbols.clone().unwrap_or_default();
    if text.trim().is_empty() {
        tracing::warn!(
            "no symbol path: set _NT_SYMBOL_PATH or pass --symbols srv*C:\\symbols*https://msdl.microsoft.com/download/symbols; frames will be module+offset"
        );
        return Ok(());
    }
    let path = SymbolPath::parse(&text).map_err(CliError::usage)?;
    let options = StoreOptions {
        offline: args.offline,
        ..StoreOptions::default()
    };
    let progress = Arc::new(BarProgress::new());
    let store = SymbolStore::new(path, options, Some(progress.clone()));
    for module in set.modules_mut() {
        progress
            .0
            .set_message(format!("looking up {}", module.file_name));
        let load = store.load_module(module).await;
        tracing::debug!(module = %module.name, status = %module.symbol_status, "{load:?}");
        if let Err(e) = &load.pdb {
            tracing::warn!("{}: {e}", module.name);
        }
    }
    Ok(())
}
