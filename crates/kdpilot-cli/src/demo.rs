//! `kdpilot demo`: the whole thing against the built-in simulator, for a first look.
//!
//! Starts a simulated Windows target, throttled to a real serial line's speed, on a
//! pseudo-terminal (Unix: kdpilot opens it through the same serial transport a COM port uses)
//! or a named pipe (Windows: as a VM's COM port), and runs `kdpilot probe` against it.

use std::time::Duration;

use clap::Args;
use kdpilot_kd::Arch;
use kdpilot_sim::{serve, FaultyLine, LineModel, Machine, TargetOptions};
use kdpilot_transport::Endpoint;

use crate::output::print;
use crate::probe::probe;
use crate::sim::kaslr_base;

/// Arguments of `kdpilot demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Baud rate of the simulated serial line
    #[arg(long, default_value_t = 115_200)]
    pub baud: u32,
}

/// Runs the demo.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let mut machine = Machine::new(
        Arch::Amd64,
        19041,
        2,
        kaslr_base(Arch::Amd64, std::process::id().into()),
    );
    let model = LineModel {
        baud: Some(args.baud),
        ..LineModel::clean()
    };
    print(&format!(
        "Simulated target: Windows build {} {}, {} CPUs, kernel at {:#x} (KASLR), running.\n",
        machine.build, machine.arch, machine.processors, machine.layout.kern_base
    ))?;
    let (endpoint, target) = start_target(&mut machine, model).await?;
    print(&format!("$ kdpilot probe --target {endpoint}\n"))?;
    let report = probe(&endpoint, Duration::from_secs(30)).await;
    target.abort();
    let report = report?;
    print(&report)?;
    print("\nThe target was broken into, identified and resumed over a KD link.\n")?;
    Ok(())
}

#[cfg(unix)]
async fn start_target(
    machine: &mut Machine,
    model: LineModel,
) -> anyhow::Result<(Endpoint, tokio::task::JoinHandle<()>)> {
    use anyhow::Context as _;
    use tokio_serial::SerialPort as _;
    let (master, slave) =
        tokio_serial::SerialStream::pair().context("could not create a pseudo-terminal")?;
    let name = slave.name().context("the pseudo-terminal has no path")?;
    let baud = model.baud.unwrap_or(115_200);
    let mut machine = machine.clone();
    let task = tokio::spawn(async move {
        let _slave = slave;
        let _ = serve(
            FaultyLine::new(master, model),
            &mut machine,
            &TargetOptions::default(),
        )
        .await;
    });
    let endpoint: Endpoint = format!("com:port={name},baud={baud}").parse()?;
    Ok((endpoint, task))
}

/// On Windows the simulated VM's COM port is a named pipe, as Hyper-V and VMware make it.
#[cfg(windows)]
async fn start_target(
    machine: &mut Machine,
    model: LineModel,
) -> anyhow::Result<(Endpoint, tokio::task::JoinHandle<()>)> {
    use tokio::net::windows::named_pipe::ServerOptions;
    let name = format!(r"\\.\pipe\kdpilot-demo-{}", std::process::id());
    let server = ServerOptions::new()
        .first_pipe_instance(true)
        .create(&name)?;
    let mut machine = machine.clone();
    let task = tokio::spawn(async move {
        if server.connect().await.is_ok() {
            let _ = serve(
                FaultyLine::new(server, model),
                &mut machine,
                &TargetOptions::default(),
            )
            .await;
        }
    });
    let endpoint: Endpoint = format!("com:pipe,port={name}").parse()?;
    Ok((endpoint, task))
}

#[cfg(not(any(unix, windows)))]
async fn start_target(
    machine: &mut Machine,
    model: LineModel,
) -> anyhow::Result<(Endpoint, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let mut machine = machine.clone();
    let task = tokio::spawn(async move {
        if let Ok((sock, _)) = listener.accept().await {
            let _ = serve(
                FaultyLine::new(sock, model),
                &mut machine,
                &TargetOptions::default(),
            )
            .await;
        }
    });
    let endpoint: Endpoint = format!("tcp:{addr}").parse()?;
    Ok((endpoint, task))
}
