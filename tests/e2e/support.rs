//! Small helpers shared by the scenarios.

use std::future::Future;
use std::time::Duration;

use kdpilot_kd::client::{ClientConfig, Connection, EventSink, Stopped, Timing};
use kdpilot_kd::Arch;
use kdpilot_sim::{serve, FaultyLine, LineModel, Machine, SessionEnd, TargetOptions};
use tokio::io::DuplexStream;
use tokio::task::JoinHandle;

/// Every scenario must finish within this.
pub const LIMIT: Duration = Duration::from_secs(120);

/// Scenarios run one at a time: their line timing (retransmission timers of 200 ms on the
/// simulated target) is what they test, and two of them competing for the CPU of a 2-core
/// machine turn timing into noise.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs `f` with a hard time limit (and `RUST_LOG` tracing to the test's output), one scenario
/// at a time.
pub async fn bounded<T>(f: impl Future<Output = T>) -> T {
    let _turn = ONE_AT_A_TIME.lock().await;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    tokio::time::timeout(LIMIT, f)
        .await
        .expect("scenario finished in time")
}

/// A simulated x64 machine with a pattern in memory at `PATTERN_AT`.
pub fn machine(arch: Arch) -> Machine {
    let mut m = Machine::new(arch, 22621, 4, 0xfffff807_3aa00000);
    m.memory.load(PATTERN_AT, &pattern(PATTERN_LEN));
    m
}

/// Where the test pattern lives, and how long it is (ends at an unmapped page).
pub const PATTERN_AT: u64 = 0xffffffff_a0100000;
/// Length of the test pattern.
pub const PATTERN_LEN: usize = 5 * 4096;

/// Deterministic test bytes.
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

/// The simulated target, served on its end of a duplex line.
pub struct Sim {
    /// The target task; yields the machine when the host hangs up.
    pub task: JoinHandle<(SessionEnd, Machine)>,
}

/// Starts a target on a duplex pair with `model` applied to both directions; returns the
/// host's end.
pub fn start(
    mut machine: Machine,
    options: TargetOptions,
    model: LineModel,
) -> (FaultyLine<DuplexStream>, Sim) {
    let (host, target) = tokio::io::duplex(64 * 1024);
    let target_model = LineModel {
        seed: model.seed.wrapping_add(1),
        ..model.clone()
    };
    let task = tokio::spawn(async move {
        let line = FaultyLine::new(target, target_model);
        let end = serve(line, &mut machine, &options)
            .await
            .expect("target link");
        (end, machine)
    });
    (FaultyLine::new(host, model), Sim { task })
}

/// Client settings for tests: fast timeouts unless the line is throttled.
pub fn config(model: &LineModel, sink: EventSink) -> ClientConfig {
    let mut timing = model.baud.map(Timing::for_baud).unwrap_or_default();
    timing.latency = Duration::from_millis(300);
    ClientConfig {
        timing,
        sink,
        ..ClientConfig::default()
    }
}

/// Connects a client over `io`.
pub async fn connect(
    io: FaultyLine<DuplexStream>,
    config: ClientConfig,
) -> Stopped<FaultyLine<DuplexStream>> {
    Connection::new(io, config)
        .connect(Duration::from_secs(60))
        .await
        .expect("connect")
}
