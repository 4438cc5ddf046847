//! A capture whose symbol server is in trouble: the server accepts connections and never
//! answers. The kernel's and the HAL's PDBs are in the local cache (an earlier night), the
//! driver's are not. The capture arms after one stall timeout, says which module has no symbols
//! and why, records every hit with the driver's frames as `module+offset` (equal to the truth's
//! function+offset through the driver's PDB), and after a reboot re-arms without waiting on the
//! server again.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kdpilot_capture::engine::{Capture, CaptureEvent, CaptureOptions};
use kdpilot_capture::strategy::StrategyChoice;
use kdpilot_kd::client::EventSink;
use kdpilot_kd::Arch;
use kdpilot_sim::{
    serve_with, AllocationActivity, FaultyLine, LineModel, Machine, MachineConfig, TargetOptions,
};
use kdpilot_symbols::pdb::ModuleSymbols;
use kdpilot_symbols::PeFile;

use crate::support::*;

const LEAK: u32 = u32::from_le_bytes(*b"Leak");

/// A symbol server that takes connections and never says a word.
struct Blackhole {
    url: String,
    stop: Arc<AtomicBool>,
    addr: std::net::SocketAddr,
}

impl Blackhole {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                held.extend(conn.ok());
            }
        });
        Blackhole {
            url: format!("http://{addr}/"),
            stop,
            addr,
        }
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
    }
}

/// Puts `pdb` (the PDB of `image`) into `cache` under its store key.
fn cache_pdb(cache: &Path, dir: &Path, image: &str) {
    let pe = PeFile::parse(std::fs::read(dir.join(image)).unwrap()).unwrap();
    let id = pe.codeview().unwrap().pdb_id().unwrap();
    let to = cache.join(&id.name).join(id.store_key());
    std::fs::create_dir_all(&to).unwrap();
    std::fs::copy(dir.join(&id.name), to.join(&id.name)).unwrap();
}

#[tokio::test]
async fn a_capture_with_a_dead_symbol_server_records_module_offset_frames_and_says_so() {
    bounded(async {
        let d = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/out/x64/modern");
        let cache = tempfile::tempdir().unwrap();
        cache_pdb(cache.path(), &d, "ntoskrnl.exe");
        cache_pdb(cache.path(), &d, "hal.dll");
        let server = Blackhole::start();

        let mut mconfig = MachineConfig::from_dir(Arch::Amd64, 19041, 2, 5, &d).unwrap();
        mconfig.special_pool_tag = LEAK;
        let mut machine = Machine::boot(mconfig).unwrap();
        let mut activity = AllocationActivity::from_fixture_dir(
            &d,
            AllocationActivity::leakydrv_specs(LEAK),
            5,
            200.0,
        )
        .unwrap();
        activity.reboot_every_hits = Some(4);
        let (host, target) = tokio::io::duplex(64 * 1024);
        let sim = tokio::spawn(async move {
            let _ = serve_with(target, &mut machine, &TargetOptions::default(), &mut activity)
                .await;
            (machine, activity)
        });
        let stopped = connect(
            FaultyLine::new(host, LineModel::clean()),
            config(&LineModel::clean(), EventSink::none()),
        )
        .await;
        let started = Instant::now();
        let mut events: Vec<(Duration, CaptureEvent)> = Vec::new();
        let options = CaptureOptions {
            tag: LEAK,
            strategy: StrategyChoice::Auto,
            symbols: format!("srv*{}*{}", cache.path().display(), server.url),
            offline: false,
            max_hits: Some(8),
            duration: Some(Duration::from_secs(100)),
            hardware_breakpoint: true,
            measure: false,
        track_frees: false,
        guards: kdpilot_capture::engine::Guards::default(),
        };
        let mut capture =
            Capture::new(options, |e| events.push((started.elapsed(), e.clone()))).unwrap();
        let stop = AtomicBool::new(false);
        let hits = capture.run(stopped, &stop).await.expect("capture");
        drop(capture);
        let (machine, activity) = sim.await.unwrap();
        assert_eq!(hits, 8);
        assert!(machine.running && machine.planted().is_empty());

        // It says which module has no symbols, and why.
        let warnings: Vec<&String> = events
            .iter()
            .filter_map(|(_, e)| match e {
                CaptureEvent::Warning(w) => Some(w),
                _ => None,
            })
            .collect();
        assert!(
            warnings
                .iter()
                .any(|w| w.starts_with("leakydrv: ") && w.contains("leakydrv.pdb")),
            "{warnings:#?}"
        );
        assert!(
            warnings
                .iter()
                .any(|w| w.contains("timed out") || w.contains("not asked")),
            "{warnings:#?}"
        );

        // Time-boxed: one stall timeout (30 s) before the first arming, none after a reboot.
        let armed: Vec<Duration> = events
            .iter()
            .filter(|(_, e)| matches!(e, CaptureEvent::Armed { .. }))
            .map(|(t, _)| *t)
            .collect();
        let reboots: Vec<Duration> = events
            .iter()
            .filter(|(_, e)| matches!(e, CaptureEvent::Reboot { .. }))
            .map(|(t, _)| *t)
            .collect();
        assert!(armed.len() >= 2 && !reboots.is_empty(), "{armed:?} {reboots:?}");
        assert!(armed[0] < Duration::from_secs(45), "first armed at {:?}", armed[0]);
        let rearm = armed[1] - reboots[0];
        assert!(rearm < Duration::from_secs(10), "re-armed {rearm:?} after the reboot");
        eprintln!(
            "dead symbol server: armed after {:?}, re-armed {rearm:?} after a reboot; warnings: {warnings:#?}",
            armed[0]
        );

        // Every hit recorded; the driver's frames as module+offset, at the truth's places.
        let drv = ModuleSymbols::parse(std::fs::read(d.join("leakydrv.pdb")).unwrap(), None)
            .unwrap();
        let truth: Vec<Vec<String>> = activity
            .workload
            .truth
            .iter()
            .flat_map(|t| t.stops.iter())
            .filter(|s| s.first().is_some_and(|f| f.function == "ExAllocateHeapSpecialPool"))
            .map(|s| {
                s.iter()
                    .map(|f| {
                        if f.module == "leakydrv" {
                            let rva = drv.rva_of(&f.function).unwrap();
                            format!("leakydrv+{:#x}", u64::from(rva) + f.offset)
                        } else {
                            f.to_string()
                        }
                    })
                    .collect()
            })
            .collect();
        let got: Vec<Vec<String>> = events
            .iter()
            .filter_map(|(_, e)| match e {
                CaptureEvent::Hit(h) => Some(
                    h.frames
                        .iter()
                        .map(|f| f.call_site())
                        .take_while(|s| !s.starts_with("0x"))
                        .collect(),
                ),
                _ => None,
            })
            .collect();
        assert_eq!(got.len(), 8);
        assert!(got.iter().all(|s| s.iter().any(|f| f.starts_with("leakydrv+0x"))));
        assert_eq!(got, truth[..8], "module+offset frames, every hit once");
        // Nothing half-written in the cache.
        let mut stack = vec![cache.path().to_path_buf()];
        while let Some(p) = stack.pop() {
            for e in std::fs::read_dir(&p).unwrap() {
                let p = e.unwrap().path();
                let s = p.display().to_string();
                assert!(!s.ends_with(".part") && !s.ends_with(".lock"), "{s}");
                if p.is_dir() {
                    stack.push(p);
                }
            }
        }
    })
    .await;
}
