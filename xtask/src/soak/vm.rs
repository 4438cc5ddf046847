//! The soak's target: the simulator's machine running the leaky driver, served on a Unix socket
//! the way a VM serves its COM port, and the faults of a night injected into it.
//!
//! - The socket vanishes (the file is removed and nobody listens) when the harness says so, and
//!   whenever a reboot takes the link down (`RebootOptions::disconnect`), for the reboot's
//!   downtime, as a VM's pipe does when the VM restarts.
//! - Every connection gets its own line model: bytes corrupted and dropped at the night's rates,
//!   both ways, and on some connections the kernel chatters (DbgPrint strings carrying terminal
//!   escape sequences) after every resume.
//! - Reboots, bugchecks and hangs are asked of the running kernel through [`SoakActivity`], the
//!   workload's own hook ([`Machine::request`]).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kdpilot_sim::{
    serve_with, Activity, AllocationActivity, Chatter, Fault, FaultyLine, LineModel, Machine,
    RebootOptions, SessionEnd, Stop, TargetOptions,
};
use tokio::sync::mpsc;

/// A DbgPrint that tries to take over the terminal of whoever watches kdpilot: clear screen,
/// set the window title, ring the bell, a CSI in its 8-bit form.
pub const HOSTILE_PRINT: &str = "\x1b[2J\x1b]0;owned\x07soak: DbgPrint with escapes\u{9b}31m\n";

/// The workload plus faults asked for by the harness (applied when no allocation is in flight,
/// so the truth of an allocation is never cut in half by the harness itself).
pub struct SoakActivity {
    /// The allocating threads and their ground truth.
    pub inner: AllocationActivity,
    faults: Arc<Mutex<VecDeque<Fault>>>,
    /// Faults handed to the kernel: reboots, bugchecks, hangs.
    pub applied: [u64; 3],
}

impl SoakActivity {
    pub fn new(inner: AllocationActivity) -> (Self, Arc<Mutex<VecDeque<Fault>>>) {
        let faults = Arc::new(Mutex::new(VecDeque::new()));
        (
            Self {
                inner,
                faults: faults.clone(),
                applied: [0; 3],
            },
            faults,
        )
    }
}

impl Activity for SoakActivity {
    fn poll(&mut self, machine: &mut Machine, now: Instant) -> Option<Stop> {
        if !self.inner.workload.in_flight() {
            let next = self.faults.lock().ok().and_then(|mut q| q.pop_front());
            if let Some(f) = next {
                let kind = match f {
                    Fault::Reboot => 0,
                    Fault::BugCheck { .. } => 1,
                    Fault::Hang(_) => 2,
                };
                self.applied[kind] += 1;
                machine.request(f);
                return None;
            }
        }
        self.inner.poll(machine, now)
    }
}

/// What the harness tells the VM.
#[derive(Debug)]
pub enum Control {
    /// The socket goes away for this long (the connection with it), then comes back.
    Vanish(Duration),
    /// The night is over: stop serving.
    Quit,
}

/// How the VM serves its connections.
#[derive(Clone, Debug)]
pub struct VmConfig {
    pub socket: PathBuf,
    /// Bytes corrupted (one bit flipped) per byte, both ways.
    pub corrupt_rate: f64,
    /// Bytes lost per byte, both ways.
    pub drop_rate: f64,
    pub seed: u64,
    /// Downtime of a reboot that keeps the link (the line is dead meanwhile).
    pub reboot_downtime: Duration,
    /// Downtime of a reboot that takes the socket away with it.
    pub disconnect_downtime: Duration,
}

/// What the VM counted.
#[derive(Clone, Debug, Default)]
pub struct VmStats {
    pub connections: u64,
    pub vanished: u64,
    pub disconnect_reboots: u64,
    pub bytes_corrupted: u64,
    pub bytes_dropped: u64,
    pub chatty_connections: u64,
}

/// Serves `machine` on the socket until [`Control::Quit`]; returns the machine, the workload
/// and the counters.
pub async fn run(
    mut machine: Machine,
    mut activity: SoakActivity,
    config: VmConfig,
    mut control: mpsc::UnboundedReceiver<Control>,
) -> (Machine, SoakActivity, VmStats) {
    let mut stats = VmStats::default();
    'vm: loop {
        let listener = match bind(&config.socket) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("soak: cannot listen on {}: {e}", config.socket.display());
                break 'vm;
            }
        };
        let gone_for = loop {
            let sock = tokio::select! {
                r = listener.accept() => match r {
                    Ok((s, _)) => s,
                    Err(_) => continue,
                },
                c = control.recv() => match c {
                    Some(Control::Vanish(d)) => break d,
                    Some(Control::Quit) | None => break 'vm,
                },
            };
            stats.connections += 1;
            let n = stats.connections;
            let options = options_for(&config, n);
            if !options.chatter.prints.is_empty() {
                stats.chatty_connections += 1;
            }
            let model = LineModel {
                baud: None,
                corrupt_rate: config.corrupt_rate,
                drop_rate: config.drop_rate,
                seed: config.seed.wrapping_mul(31).wrapping_add(n),
            };
            let mut line = FaultyLine::new(sock, model);
            let outcome = tokio::select! {
                end = serve_with(&mut line, &mut machine, &options, &mut activity) => Ok(end),
                c = control.recv() => Err(c),
            };
            stats.bytes_corrupted += line.stats().corrupted;
            stats.bytes_dropped += line.stats().dropped;
            match outcome {
                Ok(Ok(SessionEnd::Reboot)) => {
                    stats.disconnect_reboots += 1;
                    break options.reboot.downtime;
                }
                Ok(_) => {} // the host went away: listen again
                Err(Some(Control::Vanish(d))) => break d,
                Err(Some(Control::Quit) | None) => break 'vm,
            }
        };
        // The socket vanishes: nobody listens and the file is gone, then it comes back.
        drop(listener);
        let _ = std::fs::remove_file(&config.socket);
        stats.vanished += 1;
        tokio::select! {
            () = tokio::time::sleep(gone_for) => {}
            c = control.recv() => if matches!(c, Some(Control::Quit) | None) { break 'vm },
        }
    }
    let _ = std::fs::remove_file(&config.socket);
    (machine, activity, stats)
}

fn bind(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    let _ = std::fs::remove_file(path);
    tokio::net::UnixListener::bind(path)
}

/// Connection `n`'s behaviour: every other one loses its socket when the target reboots; every
/// fourth one chatters hostile DbgPrint strings after every resume.
fn options_for(config: &VmConfig, n: u64) -> TargetOptions {
    let disconnect = n % 2 == 0;
    TargetOptions {
        reboot: RebootOptions {
            downtime: if disconnect {
                config.disconnect_downtime
            } else {
                config.reboot_downtime
            },
            disconnect,
        },
        chatter: Chatter {
            prints: if n % 4 == 1 {
                vec![HOSTILE_PRINT.to_string()]
            } else {
                Vec::new()
            },
            ..Chatter::default()
        },
        ..TargetOptions::default()
    }
}
