//! `kdpilot sim`: serve the simulated Windows target, for trying kdpilot (or another debugger)
//! without a Windows machine.

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use kdpilot_kd::Arch;
use kdpilot_sim::{serve, FaultyLine, LineModel, Machine, SessionEnd, TargetOptions};
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
}

impl SimArgs {
    fn machine(&self) -> Machine {
        let arch = match self.arch {
            SimArch::X64 => Arch::Amd64,
            SimArch::X86 => Arch::X86,
        };
        Machine::new(arch, self.build, self.cpus, kaslr_base(arch, self.seed))
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
    let mut machine = args.machine();
    let options = TargetOptions {
        start_stopped: args.start_stopped,
        ..TargetOptions::default()
    };
    let serving = serve_on(&args.listen, &mut machine, &options, &model);
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
) -> anyhow::Result<()> {
    let describe = |m: &Machine| {
        format!(
            "simulated Windows build {} {} with {} CPU(s), kernel at {:#x}",
            m.build, m.arch, m.processors, m.layout.kern_base
        )
    };
    if listen == "pty" {
        return serve_pty(machine, options, model, &describe(machine)).await;
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
            session(sock, machine, options, model).await;
        }
    }
    #[cfg(unix)]
    if let Some(path) = listen.strip_prefix("unix:") {
        let _ = std::fs::remove_file(path);
        let listener = tokio::net::UnixListener::bind(path)
            .with_context(|| format!("could not listen on Unix socket {path}"))?;
        eprintln!("kdpilot sim: {}", describe(machine));
        eprintln!("kdpilot sim: connect with --target unix:{path}");
        loop {
            let (sock, _) = listener.accept().await?;
            eprintln!("kdpilot sim: host attached");
            session(sock, machine, options, model).await;
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
            session(server, machine, options, model).await;
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
) {
    match serve(FaultyLine::new(io, model.clone()), machine, options).await {
        Ok(SessionEnd::HostGone) | Err(_) => {
            eprintln!("kdpilot sim: host detached; the target keeps running")
        }
        Ok(SessionEnd::Reboot) => eprintln!("kdpilot sim: the host asked for a reboot"),
    }
}

#[cfg(unix)]
async fn serve_pty(
    machine: &mut Machine,
    options: &TargetOptions,
    model: &LineModel,
    what: &str,
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
        let _ = serve(
            FaultyLine::new(&mut master, model.clone()),
            machine,
            options,
        )
        .await;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[cfg(not(unix))]
async fn serve_pty(
    _machine: &mut Machine,
    _options: &TargetOptions,
    _model: &LineModel,
    _what: &str,
) -> anyhow::Result<()> {
    Err(CliError::usage(anyhow::anyhow!(
        "--listen pty needs a Unix host; use --listen tcp:127.0.0.1:4555"
    ))
    .into())
}
