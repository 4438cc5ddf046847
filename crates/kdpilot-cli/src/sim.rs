//! `kdpilot sim`: serve the simulated Windows target, for trying kdpilot (or another debugger)
//! without a Windows machine.

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use kdpilot_kd::Arch;
use std::path::PathBuf;
use std::time::Duration;

use kdpilot_sim::{
    serve_with, Activity, AllocationActivity, Fault, FaultyLine, LineModel, Machine, MachineConfig,
    NoActivity, RebootOptions, Scenario, ScheduledFault, SessionEnd, TargetOptions,
};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::error::CliError;

/// Target architecture of the simulated machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SimArch {
    /// x64 (AMD64).
    X64,
    /// 32-bit x86.
    X86,
}

/// The workload the simulated driver runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SimWorkload {
    /// The leaky driver: four paths leak the tag, one frees it, noise of another tag.
    Leaky,
    /// A leak hunt: most allocations of the tag are freed, two known paths
    /// (LeakyAllocPushes, LeakyAllocViaPool2) leak.
    LeakHunt,
}

impl SimWorkload {
    fn scenario(self) -> Scenario {
        match self {
            SimWorkload::Leaky => Scenario::Leaky,
            SimWorkload::LeakHunt => Scenario::LeakHunt,
        }
    }
}

/// Arguments of `kdpilot sim`.
#[derive(Debug, Args)]
pub struct SimArgs {
    /// Where to serve the target's debug port: `pty` (a pseudo-terminal that kdpilot opens as a
    /// COM port), `tcp:HOST:PORT`, `unix:PATH`, or on Windows `pipe:\\.\pipe\NAME`
    #[arg(long, value_name = "WHERE", default_value = "pty")]
    pub listen: String,

    /// Processor architecture of the simulated machine
    #[arg(long, value_enum, default_value_t = SimArch::X64)]
    pub arch: SimArch,

    /// Windows build number the target reports
    #[arg(long, default_value_t = 19041)]
    pub build: u16,

    /// Number of processors
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub cpus: u32,

    /// Throttle the line to this baud rate (ptys and sockets have none of their own)
    #[arg(long, value_name = "BAUD")]
    pub baud: Option<u32>,

    /// Probability that a byte is corrupted on the line (e.g. 0.001)
    #[arg(long, value_name = "RATE", default_value_t = 0.0)]
    pub corrupt: f64,

    /// Probability that a byte is lost on the line
    #[arg(long = "drop", value_name = "RATE", default_value_t = 0.0)]
    pub drop_rate: f64,

    /// Seed of the line faults and of the kernel base (KASLR)
    #[arg(long, default_value_t = 1)]
    pub seed: u64,

    /// Start stopped in the debugger (as a target booted with /break) instead of running
    #[arg(long)]
    pub start_stopped: bool,

    /// Kernel images to run: `classic` (allocations reach nt!MmAllocateSpecialPool, Windows
    /// XP..10 1803), `modern` (the segment-heap kernel of Windows 10 1903+, where
    /// nt!ExAllocateHeapSpecialPool serves special pool), `synthetic` (no code, no workload), or a
    /// directory with ntoskrnl.exe, hal.dll, drivers and their PDBs
    #[arg(long, value_name = "KERNEL", default_value = "modern")]
    pub kernel: String,

    /// Special pool tag configured on the target (the registry's PoolTag), e.g. Leak
    #[arg(long, value_name = "TAG", default_value = "Leak")]
    pub pool_tag: String,

    /// Allocations per second the leaky driver makes (0: none)
    #[arg(long, value_name = "N", default_value_t = 5.0)]
    pub rate: f64,

    /// What the leaky driver does: `leaky` (its paths leak the tag) or `leak-hunt` (most
    /// allocations of the tag are freed, two known paths leak)
    #[arg(long, value_enum, value_name = "NAME", default_value_t = SimWorkload::Leaky)]
    pub workload: SimWorkload,

    /// Special pool holds at most N blocks per boot; when full, allocations silently fall back
    /// to normal pool until blocks are freed (default: unlimited)
    #[arg(long, value_name = "N")]
    pub special_pool_blocks: Option<u64>,

    /// Start with a boot: LoadSymbols stops for ntoskrnl, hal and the drivers
    #[arg(long)]
    pub boot: bool,

    /// Reboot every SECS seconds of uptime ("unload all", new KASLR bases, a new boot)
    #[arg(long, value_name = "SECS")]
    pub reboot_every: Option<f64>,

    /// Reboot after every N breakpoint hits of the workload
    #[arg(long, value_name = "N")]
    pub reboot_every_hits: Option<u64>,

    /// On a reboot, drop the link (a VM's pipe or socket goes away) for SECS seconds
    #[arg(long, value_name = "SECS")]
    pub reboot_disconnect: Option<f64>,

    /// Hang (ignore the line completely) for SECS seconds, after --hang-after seconds of uptime
    #[arg(long, value_name = "SECS", requires = "hang_after")]
    pub hang_for: Option<f64>,

    /// Uptime at which the hang starts
    #[arg(long, value_name = "SECS")]
    pub hang_after: Option<f64>,

    /// Bugcheck (0xE2, MANUALLY_INITIATED_CRASH) after SECS seconds of uptime
    #[arg(long, value_name = "SECS")]
    pub bugcheck_after: Option<f64>,
}

/// Scenarios, for `kdpilot sim --help`.
pub const AFTER_HELP: &str = "\
Scenarios:
  kdpilot sim                                   a running Windows 10 x64 (modern kernel) on a pty;
                                                a driver leaks 'Leak' allocations, 5 per second
  kdpilot sim --kernel classic --arch x86       an XP-era 32-bit kernel (MmAllocateSpecialPool)
  kdpilot sim --baud 19200 --corrupt 0.001      a slow, noisy null-modem cable
  kdpilot sim --boot --reboot-every 60          a target that boots (LoadSymbols stops) and
                                                reboots every minute with new kernel bases
  kdpilot sim --listen unix:/tmp/com1 --reboot-every 30 --reboot-disconnect 5
                                                a VM whose COM-port socket vanishes on restart
  kdpilot sim --hang-after 20 --hang-for 60     a target that stops answering for a minute
  kdpilot sim --bugcheck-after 30               a crash (KeBugCheckEx), then a reboot
  kdpilot sim --workload leak-hunt --special-pool-blocks 50
                                                most 'Leak' allocations are freed, two paths
                                                leak; special pool fills up after 50 blocks

The target keeps running when a host detaches; a new host can attach at any time.";

impl SimArgs {
    fn arch(&self) -> Arch {
        match self.arch {
            SimArch::X64 => Arch::Amd64,
            SimArch::X86 => Arch::X86,
        }
    }

    /// The directory of kernel images, or None for the synthetic kernel.
    fn image_dir(&self) -> anyhow::Result<Option<PathBuf>> {
        let arch = match self.arch {
            SimArch::X64 => "x64",
            SimArch::X86 => "x86",
        };
        match self.kernel.as_str() {
            "synthetic" => Ok(None),
            flavour @ ("classic" | "modern") => {
                let dir = fixtures_root().join(arch).join(flavour);
                if dir.join("ntoskrnl.exe").is_file() {
                    Ok(Some(dir))
                } else {
                    Err(CliError::usage(anyhow::anyhow!(
                        "the {flavour} kernel images are not at {} (they come with the kdpilot source tree, \
                         fixtures/out/); pass --kernel DIR or --kernel synthetic",
                        dir.display()
                    ))
                    .into())
                }
            }
            dir => Ok(Some(PathBuf::from(dir))),
        }
    }

    fn machine(&self) -> anyhow::Result<(Machine, Option<AllocationActivity>)> {
        let arch = self.arch();
        let tag = parse_tag(&self.pool_tag)?;
        let Some(dir) = self.image_dir()? else {
            return Ok((
                Machine::new(arch, self.build, self.cpus, kaslr_base(arch, self.seed)),
                None,
            ));
        };
        let mut config = MachineConfig::from_dir(arch, self.build, self.cpus, self.seed, &dir)
            .with_context(|| format!("could not read the kernel images in {}", dir.display()))?;
        config.special_pool_tag = tag;
        let machine = Machine::boot(config)
            .with_context(|| format!("could not load the images in {}", dir.display()))?;
        if self.rate <= 0.0 {
            return Ok((machine, None));
        }
        let specs = self.workload.scenario().specs(tag);
        let mut activity = AllocationActivity::from_fixture_dir(&dir, specs, self.seed, self.rate)
            .with_context(|| format!("could not read the PDBs in {}", dir.display()))?
            .with_special_pool_blocks(self.special_pool_blocks);
        activity.reboot_every_hits = self.reboot_every_hits;
        Ok((machine, Some(activity)))
    }

    fn options(&self) -> TargetOptions {
        let secs = Duration::from_secs_f64;
        let mut faults = Vec::new();
        if let Some(s) = self.reboot_every {
            faults.push(ScheduledFault {
                after: secs(s.max(1.0)),
                fault: Fault::Reboot,
            });
        }
        if let (Some(after), Some(len)) = (self.hang_after, self.hang_for) {
            faults.push(ScheduledFault {
                after: secs(after),
                fault: Fault::Hang(secs(len)),
            });
        }
        if let Some(after) = self.bugcheck_after {
            faults.push(ScheduledFault {
                after: secs(after),
                fault: Fault::BugCheck {
                    code: 0xE2,
                    parameters: [0; 4],
                },
            });
        }
        TargetOptions {
            start_stopped: self.start_stopped,
            boot: self.boot,
            faults,
            reboot: RebootOptions {
                downtime: self.reboot_disconnect.map(secs).unwrap_or_default(),
                disconnect: self.reboot_disconnect.is_some(),
            },
            ..TargetOptions::default()
        }
    }

    fn line(&self) -> anyhow::Result<LineModel> {
        for (name, rate) in [("--corrupt", self.corrupt), ("--drop", self.drop_rate)] {
            if !(0.0..=0.5).contains(&rate) {
                return Err(CliError::usage(anyhow::anyhow!(
                    "{name} {rate} is not a probability between 0 and 0.5"
                ))
                .into());
            }
        }
        Ok(LineModel {
            baud: self.baud,
            corrupt_rate: self.corrupt,
            drop_rate: self.drop_rate,
            seed: self.seed,
        })
    }
}

/// A kernel base in the range Windows uses, different for every seed (KASLR).
pub fn kaslr_base(arch: Arch, seed: u64) -> u64 {
    let slot = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 52; // 4096 slots
    match arch {
        Arch::Amd64 => 0xfffff800_00000000 + slot * 0x20_0000,
        Arch::X86 => 0x8040_0000 + (slot % 256) * 0x2_0000,
    }
}

/// Runs `kdpilot sim` until Ctrl-C.
pub async fn run(args: SimArgs) -> anyhow::Result<()> {
    let model = args.line()?;
    let (mut machine, activity) = args.machine()?;
    let options = args.options();
    let mut activity: Box<dyn Activity> = match activity {
        Some(a) => Box::new(a),
        None => Box::new(NoActivity),
    };
    let serving = serve_on(
        &args.listen,
        &mut machine,
        &options,
        &model,
        activity.as_mut(),
    );
    tokio::select! {
        r = serving => r,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("kdpilot sim: stopped");
            Ok(())
        }
    }
}

async fn serve_on(
    listen: &str,
    machine: &mut Machine,
    options: &TargetOptions,
    model: &LineModel,
    activity: &mut dyn Activity,
) -> anyhow::Result<()> {
    let describe = |m: &Machine| {
        format!(
            "simulated Windows build {} {} with {} CPU(s), kernel at {:#x}",
            m.build, m.arch, m.processors, m.layout.kern_base
        )
    };
    if listen == "pty" {
        return serve_pty(machine, options, model, &describe(machine), activity).await;
    }
    if let Some(addr) = listen.strip_prefix("tcp:") {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("could not listen on TCP {addr}"))?;
        let local = listener.local_addr()?;
        eprintln!("kdpilot sim: {}", describe(machine));
        eprintln!("kdpilot sim: connect with --target tcp:{local}");
        loop {
            let (sock, peer) = listener.accept().await?;
            sock.set_nodelay(true)?;
            eprintln!("kdpilot sim: host {peer} attached");
            if session(sock, machine, options, model, activity).await == SessionEnd::Reboot {
                tokio::time::sleep(options.reboot.downtime).await;
            }
        }
    }
    #[cfg(unix)]
    if let Some(path) = listen.strip_prefix("unix:") {
        eprintln!("kdpilot sim: {}", describe(machine));
        eprintln!("kdpilot sim: connect with --target unix:{path}");
        loop {
            let _ = std::fs::remove_file(path);
            let listener = tokio::net::UnixListener::bind(path)
                .with_context(|| format!("could not listen on Unix socket {path}"))?;
            loop {
                let (sock, _) = listener.accept().await?;
                eprintln!("kdpilot sim: host attached");
                if session(sock, machine, options, model, activity).await == SessionEnd::Reboot {
                    break;
                }
            }
            // A VM restart: the socket goes away with the VM and comes back with it.
            drop(listener);
            let _ = std::fs::remove_file(path);
            eprintln!("kdpilot sim: the socket is gone until the target is back");
            tokio::time::sleep(options.reboot.downtime).await;
        }
    }
    #[cfg(windows)]
    if let Some(name) = listen.strip_prefix("pipe:") {
        use tokio::net::windows::named_pipe::ServerOptions;
        eprintln!("kdpilot sim: {}", describe(machine));
        eprintln!("kdpilot sim: connect with --target com:pipe,port={name},reconnect");
        let mut first = true;
        loop {
            let server = ServerOptions::new()
                .first_pipe_instance(first)
                .create(name)
                .with_context(|| format!("could not create named pipe {name}"))?;
            first = false;
            server.connect().await?;
            eprintln!("kdpilot sim: host attached");
            if session(server, machine, options, model, activity).await == SessionEnd::Reboot {
                tokio::time::sleep(options.reboot.downtime).await;
            }
        }
    }
    Err(CliError::usage(anyhow::anyhow!(
        "--listen {listen}: expected pty, tcp:HOST:PORT, unix:PATH or (Windows) pipe:\\\\.\\pipe\\NAME"
    ))
    .into())
}

async fn session<S: AsyncRead + AsyncWrite + Unpin>(
    io: S,
    machine: &mut Machine,
    options: &TargetOptions,
    model: &LineModel,
    activity: &mut dyn Activity,
) -> SessionEnd {
    match serve_with(
        FaultyLine::new(io, model.clone()),
        machine,
        options,
        activity,
    )
    .await
    {
        Ok(SessionEnd::HostGone) | Err(_) => {
            eprintln!("kdpilot sim: host detached; the target keeps running");
            SessionEnd::HostGone
        }
        Ok(SessionEnd::Reboot) => {
            eprintln!("kdpilot sim: the target is rebooting and dropped the link");
            SessionEnd::Reboot
        }
    }
}

#[cfg(unix)]
async fn serve_pty(
    machine: &mut Machine,
    options: &TargetOptions,
    model: &LineModel,
    what: &str,
    activity: &mut dyn Activity,
) -> anyhow::Result<()> {
    use tokio_serial::SerialPort as _;
    let (mut master, slave) =
        tokio_serial::SerialStream::pair().context("could not create a pseudo-terminal")?;
    let name = slave.name().context("the pseudo-terminal has no path")?;
    eprintln!("kdpilot sim: {what}");
    eprintln!("kdpilot sim: connect with --target com:port={name},baud=115200");
    // Our own slave handle stays open (and unread) so the line survives hosts that come and go,
    // as a real serial cable does.
    let _slave = slave;
    loop {
        let _ = serve_with(
            FaultyLine::new(&mut master, model.clone()),
            machine,
            options,
            activity,
        )
        .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(not(unix))]
async fn serve_pty(
    _machine: &mut Machine,
    _options: &TargetOptions,
    _model: &LineModel,
    _what: &str,
    _activity: &mut dyn Activity,
) -> anyhow::Result<()> {
    Err(CliError::usage(anyhow::anyhow!(
        "--listen pty needs a Unix host; use --listen tcp:127.0.0.1:4555"
    ))
    .into())
}

/// Where the fixture kernels live: `KDPILOT_FIXTURES`, else the source tree this binary was
/// built from.
pub fn fixtures_root() -> PathBuf {
    let root = std::env::var_os("KDPILOT_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/out"));
    root.canonicalize().unwrap_or(root)
}

/// A pool tag as text (`Leak`, padded with spaces) or `0x` hex.
fn parse_tag(text: &str) -> anyhow::Result<u32> {
    crate::pooltag::parse_tag_value(text)
        .map_err(|e| CliError::usage(anyhow::anyhow!("--pool-tag: {e}")).into())
}
