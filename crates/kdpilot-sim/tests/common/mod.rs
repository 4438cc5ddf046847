//! Helpers shared by the simulator's integration tests: fixture machines, a target on a duplex
//! line, the real client, and a raw host that speaks the wire by hand (for what the client
//! hides: packet ids, APIs without a reply).
#![allow(dead_code)]

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use kdpilot_kd::client::{
    ClientConfig, Connection, EventSink, Running, Stopped, Timing, WaitOutcome,
};
use kdpilot_kd::wire::{packet_type, DecodeEvent, Decoder, Leader, Packet};
use kdpilot_kd::Arch;
use kdpilot_sim::{
    serve_with, Activity, Machine, MachineConfig, NoActivity, SessionEnd, TargetOptions,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Every scenario must finish within this.
pub const LIMIT: Duration = Duration::from_secs(60);

/// Runs `f` with a hard time limit.
pub async fn bounded<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, f)
        .await
        .expect("scenario finished in time")
}

/// `fixtures/out/<x64|x86>/<flavour>`.
pub fn fixture_dir(arch: Arch, flavour: &str) -> PathBuf {
    let a = match arch {
        Arch::Amd64 => "x64",
        Arch::X86 => "x86",
    };
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/out")
        .join(a)
        .join(flavour)
}

/// A machine booted from the fixture images.
pub fn fixture_machine(arch: Arch, flavour: &str, cpus: u32, seed: u64) -> Machine {
    let config = MachineConfig::from_dir(arch, 22621, cpus, seed, &fixture_dir(arch, flavour))
        .expect("fixture images readable");
    Machine::boot(config).expect("fixture images load")
}

/// The simulated target on its end of a duplex pair.
pub struct Sim {
    /// Yields how the session ended and the machine.
    pub task: JoinHandle<(SessionEnd, Machine)>,
}

/// Starts `machine` with `activity` on a duplex pair; returns the host's end.
pub fn start_with(
    mut machine: Machine,
    options: TargetOptions,
    mut activity: Box<dyn Activity>,
) -> (DuplexStream, Sim) {
    let (host, target) = tokio::io::duplex(256 * 1024);
    let task = tokio::spawn(async move {
        let end = serve_with(target, &mut machine, &options, activity.as_mut())
            .await
            .expect("target link");
        (end, machine)
    });
    (host, Sim { task })
}

/// Starts `machine` with nothing running on it.
pub fn start(machine: Machine, options: TargetOptions) -> (DuplexStream, Sim) {
    start_with(machine, options, Box::new(NoActivity))
}

/// Fast client timeouts for an in-process line.
pub fn config() -> ClientConfig {
    let timing = Timing {
        latency: Duration::from_millis(300),
        ..Timing::default()
    };
    ClientConfig {
        timing,
        sink: EventSink::none(),
        ..ClientConfig::default()
    }
}

/// Connects the real client.
pub async fn connect(io: DuplexStream, config: ClientConfig) -> Stopped<DuplexStream> {
    Connection::new(io, config)
        .connect(Duration::from_secs(30))
        .await
        .expect("connect")
}

/// Waits for the next stop of a running target.
pub async fn next_stop(r: Running<DuplexStream>) -> Stopped<DuplexStream> {
    match r.wait_stop(Duration::from_secs(30)).await.expect("wait") {
        WaitOutcome::Stopped(s) => s,
        WaitOutcome::StillRunning(_) => panic!("the target did not stop"),
    }
}

/// A host that speaks KDCOM by hand: it sends data packets with the host's ids and waits for
/// their ACK, ACKs every data packet it receives (id with SYNC cleared), and hands packets to
/// the test as they are.
pub struct RawHost {
    pub io: DuplexStream,
    decoder: Decoder,
    queue: std::collections::VecDeque<Packet>,
    pub next_id: u32,
}

impl RawHost {
    pub fn new(io: DuplexStream) -> Self {
        Self {
            io,
            decoder: Decoder::new(),
            queue: Default::default(),
            next_id: 0x8080_0000,
        }
    }

    async fn write(&mut self, p: &Packet) {
        self.io.write_all(&p.encode()).await.expect("write");
    }

    async fn read_more(&mut self, deadline: Instant) -> bool {
        let mut buf = [0u8; 4096];
        match tokio::time::timeout_at(deadline, self.io.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {
                let mut out = Vec::new();
                self.decoder.feed(&buf[..n], &mut out);
                for ev in out {
                    if let DecodeEvent::Packet(p) = ev {
                        // ACK at once, with the SYNC bit cleared (sheet 1.6).
                        if p.leader == Leader::Data {
                            self.write(&Packet::ack(p.id & !0x800)).await;
                        }
                        self.queue.push_back(p);
                    }
                }
                true
            }
            _ => false,
        }
    }

    /// The next packet of any kind (data packets are ACKed), within `wait`.
    pub async fn packet(&mut self, wait: Duration) -> Option<Packet> {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(p) = self.queue.pop_front() {
                return Some(p);
            }
            if !self.read_more(deadline).await {
                return None;
            }
        }
    }

    /// The next data packet of `ptype` (others are ACKed and skipped).
    pub async fn data(&mut self, ptype: u16) -> Packet {
        loop {
            let p = self
                .packet(Duration::from_secs(20))
                .await
                .expect("a packet from the target");
            if p.leader == Leader::Data && p.packet_type == ptype {
                return p;
            }
        }
    }

    /// RESET exchange: returns once the target answered with its RESET.
    pub async fn reset(&mut self) {
        self.write(&Packet::reset()).await;
        loop {
            let p = self
                .packet(Duration::from_secs(20))
                .await
                .expect("RESET answered");
            if p.leader == Leader::Control && p.packet_type == packet_type::KD_RESET {
                self.next_id = 0x8080_0000;
                return;
            }
        }
    }

    /// Sends a data packet and waits for its ACK (data packets arriving meanwhile are queued).
    pub async fn send(&mut self, ptype: u16, payload: Vec<u8>) {
        let p = Packet::data(ptype, self.next_id, payload).expect("packet");
        self.write(&p).await;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(pos) = self.queue.iter().position(|q| {
                q.leader == Leader::Control && q.packet_type == packet_type::KD_ACKNOWLEDGE
            }) {
                let ack = self.queue.remove(pos).expect("ack");
                assert_eq!(ack.id, self.next_id, "ACK for the packet sent");
                self.next_id ^= 1;
                break;
            }
            assert!(self.read_more(deadline).await, "no ACK from the target");
        }
    }

    /// Sends a break-in byte.
    pub async fn break_in(&mut self) {
        self.io.write_all(b"b").await.expect("write");
    }
}
