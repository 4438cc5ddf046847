//! Boots, reboots, hangs and bugchecks, seen by the real client (and, for packet ids, by a
//! raw host): KdInitSystem's LoadSymbols stops with the SYNC id first (kd-protocol.md 3, 1.5),
//! a boot nobody ACKs (KdDebuggerNotPresent) and a host that breaks in later, "unload all" and
//! new KASLR bases after a reboot (sheet 5), DbgKdRebootApi, the bugcheck sequence, a hang.
#![allow(
    clippy::unusual_byte_groupings,
    reason = "addresses are grouped as WinDbg prints them: fffff806`1f200000"
)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use kdpilot_kd::api::{self, Continue2, GetContext};
use kdpilot_kd::client::{ClientEvent, EventSink, Stopped};
use kdpilot_kd::context::{Amd64Reg, Context};
use kdpilot_kd::state_change::StateChange;
use kdpilot_kd::wire::{packet_type, status};
use kdpilot_kd::Arch;
use kdpilot_sim::link::TargetLinkConfig;
use kdpilot_sim::{
    Activity, Fault, Machine, RebootOptions, ScheduledFault, SessionEnd, Stop, TargetOptions,
};
use tokio::io::DuplexStream;

/// (name, path, base, size) of every image, in load order.
fn images(m: &Machine) -> Vec<(String, String, u64, u32)> {
    m.images
        .iter()
        .map(|i| (i.name.clone(), i.path.clone(), i.base, i.size))
        .collect()
}

/// PsLoadedModuleList walked with raw reads at the sheet's offsets: (name, base, size).
async fn walk_modules(s: &mut Stopped<DuplexStream>) -> Vec<(String, u64, u32)> {
    let arch = s.arch();
    let head = s.version().unwrap().ps_loaded_module_list;
    let p = arch.pointer_size();
    let ptr = |b: &[u8]| match arch {
        Arch::Amd64 => u64::from_le_bytes(b[..8].try_into().unwrap()),
        Arch::X86 => {
            arch.canonical_address(u64::from(u32::from_le_bytes(b[..4].try_into().unwrap())))
        }
    };
    let (dll_base, size_of_image, base_dll_name, len) = match arch {
        Arch::Amd64 => (0x30, 0x40, 0x58, 0x68),
        Arch::X86 => (0x18, 0x20, 0x2C, 0x34),
    };
    let mut out = Vec::new();
    let mut e = ptr(&s.read_virtual(head, p).await.unwrap());
    while e != head && out.len() < 64 {
        let b = s.read_virtual(e, len).await.unwrap();
        let name_len = u16::from_le_bytes(b[base_dll_name..base_dll_name + 2].try_into().unwrap());
        let buf = ptr(&b[base_dll_name + p..]);
        let raw = s.read_virtual(buf, usize::from(name_len)).await.unwrap();
        let utf16: Vec<u16> = raw
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        out.push((
            String::from_utf16_lossy(&utf16),
            ptr(&b[dll_base..]),
            u32::from_le_bytes(b[size_of_image..size_of_image + 4].try_into().unwrap()),
        ));
        e = ptr(&b);
    }
    out
}

fn load_symbols_of(s: &StateChange) -> (String, u64, bool) {
    let l = s.load_symbols().expect("a LoadSymbols state change");
    (l.path_str(), l.base_of_dll, l.is_unload())
}

#[tokio::test]
async fn a_host_attached_at_boot_sees_nt_hal_and_the_driver_load() {
    bounded(async {
        for arch in [Arch::Amd64, Arch::X86] {
            let m = fixture_machine(arch, "classic", 2, 7);
            let imgs = images(&m);
            let options = TargetOptions {
                boot: true,
                ..TargetOptions::default()
            };
            let (io, sim) = start(m, options);
            // The first packet of a new kernel carries INITIAL|SYNC (sheet 1.5).
            let mut raw = RawHost::new(io);
            let first = raw.data(packet_type::KD_STATE_CHANGE64).await;
            assert_eq!(first.id, 0x8080_0800, "{arch}: first id");
            let sc = StateChange::parse(&first.payload).unwrap();
            assert_eq!(
                load_symbols_of(&sc),
                (
                    r"\SystemRoot\system32\ntoskrnl.exe".into(),
                    imgs[0].2,
                    false
                )
            );
            let ls = sc.load_symbols().unwrap();
            assert_eq!(ls.size_of_image, imgs[0].3);
            // KdInitSystem passes ProcessId -1 (T1 x64 all ones, T2 x86 0x00000000ffffffff).
            let minus_one = if arch == Arch::Amd64 {
                u64::MAX
            } else {
                0xFFFF_FFFF
            };
            assert_eq!(ls.process_id, minus_one);
            assert_eq!(ls.path_name_length as usize, ls.path.len());
            assert_eq!(first.payload.len(), 240 + ls.path.len());

            // The client RESETs: the same notification again, now with id 0x80800000.
            let s = connect(raw.io, config()).await;
            assert_eq!(s.state().encode(), first.payload);
            assert_eq!(s.version().unwrap().kern_base, imgs[0].2);
            let mut s = s;
            let mut seen = vec![load_symbols_of(s.state())];
            for _ in 0..2 {
                s = next_stop(s.resume(&Continue2::go()).await.unwrap()).await;
                seen.push(load_symbols_of(s.state()));
            }
            assert_eq!(
                seen,
                vec![
                    (imgs[0].1.clone(), imgs[0].2, false),
                    (r"\SystemRoot\system32\hal.dll".into(), imgs[1].2, false),
                    (
                        r"\SystemRoot\system32\drivers\leakydrv.sys".into(),
                        imgs[2].2,
                        false
                    ),
                ]
            );
            // A driver loaded after KdInitSystem reports the System process.
            assert_eq!(s.state().load_symbols().unwrap().process_id, 4);
            // Then the kernel runs: a break-in works.
            let r = s.resume(&Continue2::go()).await.unwrap();
            let s = r.break_in(Duration::from_secs(10)).await.unwrap();
            assert!(s.state().is_breakpoint());
            drop(s.resume(&Continue2::go()).await.unwrap());
            let (end, m) = sim.task.await.unwrap();
            assert_eq!(end, SessionEnd::HostGone);
            assert!(m.running);
            assert_eq!(m.stops, 4);
        }
    })
    .await;
}

/// Records whether the running kernel had KdDebuggerNotPresent set.
struct WatchNotPresent(Arc<AtomicBool>);

impl Activity for WatchNotPresent {
    fn poll(&mut self, machine: &mut Machine, _now: Instant) -> Option<Stop> {
        if machine.debugger_not_present {
            self.0.store(true, Ordering::SeqCst);
        }
        None
    }
}

#[tokio::test]
async fn a_boot_nobody_acks_runs_on_and_a_later_host_breaks_in() {
    bounded(async {
        let m = fixture_machine(Arch::Amd64, "modern", 2, 11);
        let kern = m.layout.kern_base;
        let seen = Arc::new(AtomicBool::new(false));
        let options = TargetOptions {
            boot: true,
            link: TargetLinkConfig {
                ack_timeout: Duration::from_millis(30),
                retries: 2,
                ..TargetLinkConfig::default()
            },
            ..TargetOptions::default()
        };
        let t0 = Instant::now();
        let (io, sim) = start_with(m, options, Box::new(WatchNotPresent(seen.clone())));
        // Nobody reads: every LoadSymbols is given up after its retries and the kernel runs.
        while !seen.load(Ordering::SeqCst) {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "the boot never finished"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // A host that attaches now finds a running kernel and must break in.
        let s = connect(io, config()).await;
        assert!(s.state().is_breakpoint(), "{:?}", s.state().info);
        assert_eq!(s.version().unwrap().kern_base, kern);
        drop(s.resume(&Continue2::go()).await.unwrap());
        let (_, m) = sim.task.await.unwrap();
        assert!(
            !m.debugger_not_present,
            "a delivered packet clears KdDebuggerNotPresent"
        );
        assert_eq!(m.stops, 4, "three notifications and the break-in");
    })
    .await;
}

/// Requests a fault when the test says so.
struct FaultWhen(Arc<AtomicBool>, Fault);

impl Activity for FaultWhen {
    fn poll(&mut self, machine: &mut Machine, _now: Instant) -> Option<Stop> {
        if self.0.swap(false, Ordering::SeqCst) {
            machine.request(self.1.clone());
        }
        None
    }
}

#[tokio::test]
async fn a_reboot_moves_every_image_and_the_module_list_follows() {
    bounded(async {
        for arch in [Arch::Amd64, Arch::X86] {
            let m = fixture_machine(arch, "modern", 2, 99);
            let before = images(&m);
            let go = Arc::new(AtomicBool::new(false));
            let options = TargetOptions {
                reboot: RebootOptions {
                    downtime: Duration::from_millis(300),
                    disconnect: false,
                },
                ..TargetOptions::default()
            };
            let (io, sim) = start_with(m, options, Box::new(FaultWhen(go.clone(), Fault::Reboot)));
            let mut s = connect(io, config()).await;
            let v1 = s.version().unwrap().clone();
            assert_eq!(v1.kern_base, before[0].2);
            let walked = walk_modules(&mut s).await;
            let expect: Vec<(String, u64, u32)> = before
                .iter()
                .map(|(n, _, b, z)| (n.clone(), *b, *z))
                .collect();
            assert_eq!(walked, expect, "{arch}: module list before the reboot");

            go.store(true, Ordering::SeqCst);
            let s = next_stop(s.resume(&Continue2::go()).await.unwrap()).await;
            // "Unload all": LoadSymbols, UnloadSymbols=1, BaseOfDll=-1 (sign-extended on x86
            // too), no path (sheet 2.4, 5).
            assert!(s.state().is_unload_all());
            let ls = s.state().load_symbols().unwrap();
            assert_eq!(
                (ls.base_of_dll, ls.path_name_length, ls.unload_symbols),
                (u64::MAX, 0, 1)
            );
            assert_eq!(s.state().encode().len(), 240);
            // WinDbg answers it with the old DbgKdContinueApi (T1 frame 954).
            let r = s.continue_old(status::DBG_CONTINUE).await.unwrap();
            let mut s = next_stop(r).await;
            let (path, base, unload) = load_symbols_of(s.state());
            assert_eq!(
                (path.as_str(), unload),
                (r"\SystemRoot\system32\ntoskrnl.exe", false)
            );
            // The new kernel expects host id 0x80800000 again; the client's first request may
            // be dropped as a duplicate and recovered by its RESET (folklore, sheet 9).
            let v2 = s.refresh_version().await.unwrap().clone();
            assert_eq!(v2.kern_base, base);
            assert_ne!(v2.kern_base, v1.kern_base, "{arch}: KASLR moved the kernel");
            assert_ne!(v2.ps_loaded_module_list, v1.ps_loaded_module_list);
            let after = walk_modules(&mut s).await;
            assert_eq!(after.len(), 3);
            for ((n1, b1, z1), (n2, b2, z2)) in walked.iter().zip(&after) {
                assert_eq!((n1, z1), (n2, z2));
                assert_ne!(b1, b2, "{arch}: {n1} moved");
            }
            let (_, kdbg) = s
                .read_debugger_data()
                .await
                .unwrap()
                .expect("KDBG after the reboot");
            assert_eq!(kdbg.kern_base(), Some(v2.kern_base));
            assert_eq!(kdbg.ps_loaded_module_list(), Some(v2.ps_loaded_module_list));
            // hal and the driver, then running.
            for _ in 0..2 {
                s = next_stop(s.resume(&Continue2::go()).await.unwrap()).await;
                assert!(s.state().load_symbols().is_some());
            }
            drop(s.resume(&Continue2::go()).await.unwrap());
            let (_, m) = sim.task.await.unwrap();
            assert_eq!(m.boots, 2);
            assert!(m.running);
            let now = images(&m);
            assert_eq!(
                now.iter().map(|i| i.2).collect::<Vec<_>>(),
                after.iter().map(|a| a.1).collect::<Vec<_>>()
            );
        }
    })
    .await;
}

#[tokio::test]
async fn the_reboot_api_restarts_at_once_and_a_socket_target_drops_the_link() {
    bounded(async {
        // DbgKdRebootApi: HalReturnToFirmware at once (R4 kdapi.c), no "unload all"; with
        // `disconnect` the session ends and the next one continues with the new boot.
        let m = fixture_machine(Arch::Amd64, "classic", 1, 5);
        let old = m.layout.kern_base;
        let options = TargetOptions {
            reboot: RebootOptions {
                downtime: Duration::from_millis(200),
                disconnect: true,
            },
            ..TargetOptions::default()
        };
        let (io, sim) = start(m, options.clone());
        let s = connect(io, config()).await;
        let r = s.reboot().await.unwrap();
        let (end, mut m) = sim.task.await.unwrap();
        assert_eq!(end, SessionEnd::Reboot);
        drop(r);
        // A new connection: the boot goes on after the downtime.
        let (host, target) = tokio::io::duplex(256 * 1024);
        let task = tokio::spawn(async move {
            let end = kdpilot_sim::serve(target, &mut m, &options).await.unwrap();
            (end, m)
        });
        let t0 = Instant::now();
        let s = connect(host, config()).await;
        let (path, base, unload) = load_symbols_of(s.state());
        assert!(!unload, "no unload-all before a DbgKdRebootApi reboot");
        assert!(path.ends_with("ntoskrnl.exe"));
        assert_ne!(base, old);
        assert_eq!(s.version().unwrap().kern_base, base);
        assert!(t0.elapsed() >= Duration::from_millis(100));
        drop(s);
        let (_, m) = task.await.unwrap();
        assert_eq!(m.boots, 2);
    })
    .await;
}

#[tokio::test]
async fn a_bugcheck_prints_breaks_then_reboots() {
    bounded(async {
        let m = fixture_machine(Arch::Amd64, "modern", 2, 3);
        let brk = m.layout.break_instruction;
        let go = Arc::new(AtomicBool::new(false));
        let bugcheck = Fault::BugCheck {
            code: 0xD1,
            parameters: [0, 2, 0, 0xfffff806_4e3e1234],
        };
        let (io, sim) = start_with(
            m,
            TargetOptions::default(),
            Box::new(FaultWhen(go.clone(), bugcheck)),
        );
        let (sink, mut events) = EventSink::channel();
        let mut cfg = config();
        cfg.sink = sink;
        let s = connect(io, cfg).await;
        go.store(true, Ordering::SeqCst);
        let s = next_stop(s.resume(&Continue2::go()).await.unwrap()).await;
        assert!(s.state().is_breakpoint());
        assert_eq!(s.state().program_counter, brk);
        let mut prints = Vec::new();
        while let Ok(ev) = events.try_recv() {
            if let ClientEvent::DebugPrint(p) = ev {
                prints.push(String::from_utf8_lossy(&p).into_owned());
            }
        }
        let all = prints.concat();
        assert!(
            all.contains("*** Fatal System Error: 0x000000d1"),
            "{all:?}"
        );
        assert!(all.contains("0xFFFFF8064E3E1234"), "{all:?}");
        let mut s = s;
        // DbgBreakPointWithStatus(DBG_STATUS_BUGCHECK_FIRST).
        match s.request(&GetContext).await.unwrap() {
            Context::Amd64(c) => assert_eq!(c.get(Amd64Reg::Rcx), 3),
            other => panic!("{other:?}"),
        }
        let s = next_stop(s.resume(&Continue2::go()).await.unwrap()).await;
        assert!(s.state().is_unload_all());
        let s = next_stop(s.continue_old(status::DBG_CONTINUE).await.unwrap()).await;
        assert!(load_symbols_of(s.state()).0.ends_with("ntoskrnl.exe"));
        drop(s);
        let (_, m) = sim.task.await.unwrap();
        assert_eq!(m.boots, 2);
    })
    .await;
}

#[tokio::test]
async fn a_hung_kernel_does_not_read_the_line() {
    bounded(async {
        let m = Machine::new(Arch::Amd64, 19041, 1, 0xfffff806_1f200000);
        let options = TargetOptions {
            faults: vec![ScheduledFault {
                after: Duration::ZERO,
                fault: Fault::Hang(Duration::from_millis(1500)),
            }],
            ..TargetOptions::default()
        };
        let (io, sim) = start(m, options);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t0 = Instant::now();
        let mut s = connect(io, config()).await;
        assert!(
            t0.elapsed() >= Duration::from_millis(1200),
            "answered during the hang: {:?}",
            t0.elapsed()
        );
        assert!(s.state().is_breakpoint());
        s.request(&api::GetVersion).await.unwrap();
        drop(s.resume(&Continue2::go()).await.unwrap());
        let (_, m) = sim.task.await.unwrap();
        assert!(m.running);
    })
    .await;
}
