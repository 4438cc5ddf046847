//! The simulator against real traffic. It answers the requests real WinDbg sent (T1: kdnet-windbg-win10.json, a Windows
//! 10 boot debugger then kernel, x64) with replies of the same API, status class and size.
//!
//! Every host->target manipulate request is fed to `Machine::handle`; the real reply is the
//! next target->host manipulate packet of the same API. Memory the real target could read is
//! loaded into the simulator first (the bytes of the real replies, at their addresses), so a
//! read succeeds or fails where it did on the real machine.
//!
//! Expected differences, each checked as such:
//! - GetContextEx (0x315F): the boot debugger refused it (STATUS_UNSUCCESSFUL, 56 bytes); the
//!   simulated Windows 10 kernel serves it (56 + 1232).
//! - GetVersion: same size and fields' meaning, but MajorVersion 0x000F (a kernel) where the
//!   boot debugger says 0x040F, and the simulator's own bases.
#![allow(
    clippy::unusual_byte_groupings,
    reason = "addresses are grouped as WinDbg prints them: fffff806`1f200000"
)]

mod common;

use std::collections::BTreeMap;

use common::*;
use kdpilot_kd::api::{number, Manipulate};
use kdpilot_kd::state_change::{ControlReport, StateChange};
use kdpilot_kd::wire::packet_type;
use kdpilot_kd::Arch;
use kdpilot_sim::kernel::Action;
use kdpilot_sim::Machine;
use kdpilot_sim::TargetOptions;
use serde_json::Value;

struct Frame {
    frame: u64,
    to_target: bool,
    m: Manipulate,
}

fn frames() -> Vec<Frame> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../kdpilot-kd/tests/vectors/kdnet-windbg-win10.json"
    );
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).expect("vectors")).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"] == 2)
        .map(|p| {
            let hex = p["payload"].as_str().unwrap();
            let bytes: Vec<u8> = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect();
            Frame {
                frame: p["frame"].as_u64().unwrap(),
                to_target: p["dir"] == "host->target",
                m: Manipulate::parse(&bytes).unwrap(),
            }
        })
        .collect()
}

#[test]
fn real_windbg_requests_get_replies_of_the_same_shape() {
    let all = frames();
    let mut machine = Machine::new(Arch::Amd64, 10586, 1, 0xfffff801_7b600000);
    // Memory the real target served, where it served it.
    for f in all
        .iter()
        .filter(|f| !f.to_target && f.m.api == number::READ_VIRTUAL_MEMORY)
    {
        if f.m.succeeded() {
            let addr = f.m.body().u64(0).unwrap();
            machine.memory.load(addr, &f.m.data);
        }
    }
    let mut checked: BTreeMap<u32, usize> = BTreeMap::new();
    let mut last_request: Option<Vec<u8>> = None;
    for (i, f) in all.iter().enumerate() {
        if !f.to_target {
            continue;
        }
        // WinDbg resent some requests while the reply was on its way (frames 197, 199).
        let enc = f.m.encode();
        if last_request.as_ref() == Some(&enc) {
            continue;
        }
        last_request = Some(enc);
        let real = all[i + 1..]
            .iter()
            .find(|r| !r.to_target && r.m.api == f.m.api)
            .map(|r| &r.m);
        match machine.handle(&f.m) {
            Action::Resume(_) => {
                assert!(
                    matches!(f.m.api, number::CONTINUE | number::CONTINUE2),
                    "frame {}",
                    f.frame
                );
                // No reply follows a continue on the wire either: the next target packet is a
                // state change. The machine is stopped again for the next requests.
                machine.running = false;
                machine.context_sent = false;
            }
            Action::Reply(sim) => {
                let real = real.unwrap_or_else(|| panic!("frame {}: no real reply", f.frame));
                assert_eq!(sim.api, real.api, "frame {}", f.frame);
                if f.m.api == number::GET_CONTEXT_EX {
                    assert!(!real.succeeded(), "the boot debugger refused GetContextEx");
                    assert!(sim.succeeded());
                    assert_eq!(real.encode().len(), 56);
                    assert_eq!(sim.encode().len(), 56 + 1232);
                } else {
                    assert_eq!(
                        sim.succeeded(),
                        real.succeeded(),
                        "frame {} ({}): status {:#x} vs real {:#x}",
                        f.frame,
                        number::name(f.m.api),
                        sim.return_status,
                        real.return_status
                    );
                    assert_eq!(
                        sim.encode().len(),
                        real.encode().len(),
                        "frame {} ({})",
                        f.frame,
                        number::name(f.m.api)
                    );
                }
                // The union echoes the request's address/count fields where the real one does.
                if matches!(
                    f.m.api,
                    number::READ_VIRTUAL_MEMORY | number::READ_CONTROL_SPACE
                ) {
                    assert_eq!(sim.body().u64(0), real.body().u64(0));
                    assert_eq!(sim.body().u32(8), real.body().u32(8));
                    assert_eq!(sim.body().u32(12), real.body().u32(12), "ActualBytesRead");
                }
                if f.m.api == number::READ_VIRTUAL_MEMORY && real.succeeded() {
                    assert_eq!(sim.data, real.data, "frame {}", f.frame);
                }
                if f.m.api == number::GET_VERSION {
                    assert_eq!(sim.body().u16(8), real.body().u16(8), "MachineType");
                    assert_eq!(sim.body().u8(4), real.body().u8(4), "ProtocolVersion");
                }
                assert_eq!(sim.processor, f.m.processor, "Processor echoed");
                *checked.entry(f.m.api).or_default() += 1;
            }
            other => panic!("frame {}: unexpected {other:?}", f.frame),
        }
    }
    // Every API WinDbg used in the capture was answered.
    for api in [
        number::GET_VERSION,
        number::READ_VIRTUAL_MEMORY,
        number::GET_CONTEXT,
        number::SET_CONTEXT,
        number::RESTORE_BREAKPOINT,
        number::READ_CONTROL_SPACE,
        number::WRITE_CONTROL_SPACE,
        number::GET_CONTEXT_EX,
    ] {
        assert!(
            checked.get(&api).copied().unwrap_or(0) > 0,
            "{}",
            number::name(api)
        );
    }
    assert_eq!(checked[&number::RESTORE_BREAKPOINT], 32);
}

/// An x86 boot notification has the shape of the real one from Windows XP (T2,
/// xp-x86-loadsymbols.bin): 240 bytes plus the NUL-terminated path, addresses sign-extended,
/// ProcessId 0x00000000ffffffff, the x86 control report with Dr6 0xffff0ff0, Dr7 0x400,
/// ReportFlags 3, cs 8, ds/es 0x23, fs 0x30, the stream starting at the int3.
#[tokio::test]
async fn an_x86_boot_notification_has_the_shape_of_the_xp_capture() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../kdpilot-kd/tests/vectors/xp-x86-loadsymbols.bin"
    );
    let real = StateChange::parse(&std::fs::read(path).unwrap()).unwrap();
    let m = fixture_machine(Arch::X86, "classic", 1, 1);
    let options = TargetOptions {
        boot: true,
        ..TargetOptions::default()
    };
    let (io, sim) = start(m, options);
    let mut raw = RawHost::new(io);
    let p = bounded(raw.data(packet_type::KD_STATE_CHANGE64)).await;
    assert_eq!(p.id, 0x8080_0800, "T2: id 0x80800800");
    let sim_sc = StateChange::parse(&p.payload).unwrap();
    for sc in [&real, &sim_sc] {
        let ls = sc.load_symbols().unwrap();
        assert_eq!(sc.encode().len(), 240 + ls.path_name_length as usize);
        assert_eq!(ls.path.last(), Some(&0));
        assert_eq!(sc.thread >> 32, 0xFFFF_FFFF, "Thread sign-extended");
        assert_eq!(sc.program_counter >> 32, 0xFFFF_FFFF, "PC sign-extended");
        assert_eq!(ls.base_of_dll >> 32, 0xFFFF_FFFF, "BaseOfDll sign-extended");
        assert_eq!(ls.process_id, 0x0000_0000_FFFF_FFFF);
        assert_eq!((sc.processor_level, sc.processor), (0, 0));
        let ControlReport::X86(r) = sc.control_report(Arch::X86) else {
            panic!("x86 report");
        };
        assert_eq!(
            (r.dr6, r.dr7, r.instruction_count, r.report_flags),
            (0xffff0ff0, 0x400, 16, 3)
        );
        assert_eq!(
            (r.seg_cs, r.seg_ds, r.seg_es, r.seg_fs),
            (8, 0x23, 0x23, 0x30)
        );
        assert_eq!(r.instruction_stream[0], 0xCC);
    }
    drop(raw);
    let _ = sim.task.await;
}
