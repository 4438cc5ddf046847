//! `kdpilot demo`: the whole thing against the built-in simulator, for a first look.
//!
//! Starts a simulated Windows target, throttled to a real serial line's speed, on a
//! pseudo-terminal (Unix: kdpilot opens it through the same serial transport a COM port uses)
//! or a named pipe (Windows: as a VM's COM port), and runs `kdpilot probe` against it. With the
//! fake-kernel images of the source tree, it then runs a leak hunt: a driver allocates 'Leak'
//! blocks and frees most of them but leaks on two call paths; `kdpilot capture --track-frees`
//! streams every allocation's stack to the logs and pairs it with its free (the target reboots
//! once on the way), and `kdpilot report --outstanding` names the paths that leaked; the last line gives the
//! logs' paths.

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
    capture_demo(args.baud).await
}

/// The capture part: the modern fake kernel with the leak-hunt driver, a reboot on the way,
/// then the outstanding report.
async fn capture_demo(baud: u32) -> anyhow::Result<()> {
    let dir = crate::sim::fixtures_root().join("x64/modern");
    if !dir.join("ntoskrnl.exe").is_file() {
        print(
            "(The capture demo needs the fake-kernel images of the source tree, fixtures/out/.)\n",
        )?;
        return Ok(());
    }
    let tag = u32::from_le_bytes(*b"Leak");
    let mut config = kdpilot_sim::MachineConfig::from_dir(
        Arch::Amd64,
        19041,
        2,
        std::process::id().into(),
        &dir,
    )?;
    config.special_pool_tag = tag;
    let mut machine = Machine::boot(config)?;
    let mut activity = kdpilot_sim::AllocationActivity::from_fixture_dir(
        &dir,
        kdpilot_sim::AllocationActivity::leak_hunt_specs(tag),
        // A fixed workload (the kernel base still moves with every run).
        3,
        8.0,
    )?;
    // The simulator counts every breakpoint stop: with --track-frees a hit also brings its
    // return and most of the time a free (about 3 stops a hit): one reboot on the way.
    activity.reboot_every_hits = Some(45);
    let model = LineModel {
        baud: Some(baud),
        ..LineModel::clean()
    };
    let (endpoint, target) = start_target_with(&mut machine, model, activity).await?;
    let log = kdpilot_capture::log::default_log_file_name(std::time::SystemTime::now());
    let json = kdpilot_capture::log::json_path_for(&log);
    print(&format!(
        "\nNow a leak hunt. On the target: special pool for tag 'Leak', a driver that frees most of its \
         'Leak' blocks but leaks some, a reboot on the way.\n\
         $ kdpilot capture --target {endpoint} --tag Leak --symbols {} --track-frees --max-hits 24 --log {}\n",
        dir.display(),
        log.display()
    ))?;
    let args = crate::capture::CaptureArgs {
        target: crate::session::TargetArgs {
            target: endpoint.to_string(),
            symbols: Some(dir.display().to_string()),
            offline: true,
            timeout: 30,
        },
        tag: "Leak".into(),
        strategy: "auto".into(),
        log: Some(log.clone()),
        json: None,
        max_hits: Some(24),
        duration: Some(Duration::from_secs(300)),
        report: None,
        software_breakpoint: false,
        track_frees: true,
        frozen_budget: crate::capture::Budget(Some(Duration::from_secs(30))),
        stack_cap: 1000,
        on_exhaustion: crate::capture::ExhaustionArg::Warn,
        exhaustion_quiet: Duration::from_secs(300),
    };
    let result = crate::capture::run(args, false).await;
    target.abort();
    result?;
    print(&format!(
        "\nWhich allocations were never freed?\n$ kdpilot report {} --outstanding --top 3\n",
        json.display()
    ))?;
    let outstanding = kdpilot_report::read_outstanding(&[&json])?;
    let options = kdpilot_report::ReportOptions {
        top: 3,
        ..kdpilot_report::ReportOptions::default()
    };
    print(&kdpilot_report::render_outstanding_text(
        &outstanding,
        &options,
    ))?;
    print(&format!(
        "\nThe capture's logs: {} (kb-style text) and {} (JSON lines; `kdpilot report` reads them)\n",
        log.display(),
        json.display()
    ))?;
    Ok(())
}

#[cfg(unix)]
async fn start_target_with(
    _machine: &mut Machine,
    model: LineModel,
    mut activity: kdpilot_sim::AllocationActivity,
) -> anyhow::Result<(Endpoint, tokio::task::JoinHandle<()>)> {
    use anyhow::Context as _;
    use tokio_serial::SerialPort as _;
    let (master, slave) =
        tokio_serial::SerialStream::pair().context("could not create a pseudo-terminal")?;
    let name = slave.name().context("the pseudo-terminal has no path")?;
    let baud = model.baud.unwrap_or(115_200);
    let mut machine = _machine.clone();
    let task = tokio::spawn(async move {
        let _slave = slave;
        let mut master = master;
        loop {
            let _ = kdpilot_sim::serve_with(
                FaultyLine::new(&mut master, model.clone()),
                &mut machine,
                &TargetOptions::default(),
                &mut activity,
            )
            .await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let endpoint: Endpoint = format!("com:port={name},baud={baud}").parse()?;
    Ok((endpoint, task))
}

#[cfg(not(unix))]
async fn start_target_with(
    machine: &mut Machine,
    model: LineModel,
    mut activity: kdpilot_sim::AllocationActivity,
) -> anyhow::Result<(Endpoint, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let mut machine = machine.clone();
    let task = tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let _ = kdpilot_sim::serve_with(
                FaultyLine::new(sock, model.clone()),
                &mut machine,
                &TargetOptions::default(),
                &mut activity,
            )
            .await;
        }
    });
    let endpoint: Endpoint = format!("tcp:{addr}").parse()?;
    Ok((endpoint, task))
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
