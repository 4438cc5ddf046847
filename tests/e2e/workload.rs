//! The simulated machine with real fixture images and a workload, driven by the real client the
//! way a capture does it: break in, plant a breakpoint on the special-pool allocator, and for
//! each hit read the registers and the stack, unwind with the image files from disk (never over
//! the line), step over, re-plant, resume. Every captured stack must equal the simulator's
//! ground truth.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use kdpilot_kd::api::{self, Continue2, GetContext};
use kdpilot_kd::client::{EventSink, Running, Stopped, WaitOutcome};
use kdpilot_kd::context::{Amd64Reg, Context};
use kdpilot_kd::state_change::StateInfo;
use kdpilot_kd::wire::status;
use kdpilot_kd::Arch;
use kdpilot_sim::pdbmap::PdbMap;
use kdpilot_sim::workload::TruthFrame;
use kdpilot_sim::{
    serve_with, AllocationActivity, FaultyLine, LineModel, Machine, MachineConfig, TargetOptions,
};
use pe_unwind_info::x86_64::{FunctionTableEntries, Register, UnwindState, XmmRegister};
use tokio::io::DuplexStream;

use crate::support::*;

const LEAK: u32 = u32::from_le_bytes(*b"Leak");

fn fixture_dir(flavour: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/out/x64")
        .join(flavour)
}

/// Host-side knowledge of one module: its file, PDB and where it is loaded.
struct HostModule {
    name: String,
    base: u64,
    file: Vec<u8>,
    pdb: PdbMap,
}

struct Regs(BTreeMap<u8, u64>, Vec<(u64, Vec<u8>)>);

impl UnwindState for Regs {
    fn read_register(&mut self, r: Register) -> u64 {
        self.0.get(&(r as u8)).copied().unwrap_or(0)
    }
    fn read_stack(&mut self, addr: u64) -> Option<u64> {
        self.1.iter().find_map(|(base, bytes)| {
            let off = addr.checked_sub(*base)? as usize;
            bytes
                .get(off..off + 8)
                .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
        })
    }
    fn write_register(&mut self, r: Register, v: u64) {
        self.0.insert(r as u8, v);
    }
    fn write_xmm_register(&mut self, _r: XmmRegister, _v: u128) {}
}

/// Maps a file's RVA to its bytes (sections from the headers).
fn rva_bytes(file: &[u8], rva: u32) -> Option<&[u8]> {
    let pe = u32::from_le_bytes(file.get(0x3c..0x40)?.try_into().ok()?) as usize;
    let nsec = u16::from_le_bytes(file.get(pe + 6..pe + 8)?.try_into().ok()?) as usize;
    let opt = u16::from_le_bytes(file.get(pe + 20..pe + 22)?.try_into().ok()?) as usize;
    let secs = pe + 24 + opt;
    for i in 0..nsec {
        let s = file.get(secs + i * 40..secs + i * 40 + 40)?;
        let va = u32::from_le_bytes(s[12..16].try_into().ok()?);
        let size = u32::from_le_bytes(s[16..20].try_into().ok()?);
        let raw = u32::from_le_bytes(s[20..24].try_into().ok()?);
        if rva >= va && rva < va + size {
            return file.get((raw + rva - va) as usize..(raw + size) as usize);
        }
    }
    (rva < 0x1000).then(|| file.get(rva as usize..)).flatten()
}

/// Unwinds with the local image files; names frames from the PDBs.
async fn capture_stack(
    s: &mut Stopped<FaultyLine<DuplexStream>>,
    modules: &[HostModule],
) -> Vec<TruthFrame> {
    let ctx = s.request(&GetContext).await.expect("GetContext");
    let Context::Amd64(c) = &ctx else {
        panic!("x64")
    };
    let order = Amd64Reg::GPR_ORDER;
    let sp = c.get(Amd64Reg::Rsp);
    // One read of the stack above SP (the unwinder's reads are served from it).
    let stack = s.read_virtual(sp, 0x1000).await.expect("stack");
    let mut st = Regs(
        order
            .iter()
            .enumerate()
            .map(|(i, r)| (i as u8, c.get(*r)))
            .collect(),
        vec![(sp, stack)],
    );
    let mut pc = ctx.pc();
    let mut out = Vec::new();
    for depth in 0..32 {
        let Some(m) = modules
            .iter()
            .find(|m| pc >= m.base && pc < m.base + 0x100000)
        else {
            break;
        };
        let rva = (pc - m.base) as u32;
        let lookup = if depth == 0 { rva } else { rva - 1 };
        let Some((name, off)) = m.pdb.function_at(lookup) else {
            break;
        };
        out.push(TruthFrame {
            module: m.name.clone(),
            function: name.to_string(),
            offset: u64::from(off + u32::from(depth > 0)),
        });
        let dir = {
            let pe = u32::from_le_bytes(m.file[0x3c..0x40].try_into().unwrap()) as usize;
            let d = pe + 24 + 0x70 + 3 * 8;
            (
                u32::from_le_bytes(m.file[d..d + 4].try_into().unwrap()),
                u32::from_le_bytes(m.file[d + 4..d + 8].try_into().unwrap()),
            )
        };
        let pdata = rva_bytes(&m.file, dir.0)
            .map(|b| &b[..(dir.1 as usize).min(b.len())])
            .unwrap_or(&[]);
        let table = FunctionTableEntries::parse(pdata);
        match table.unwind_frame(&mut st, |r| rva_bytes(&m.file, r), lookup) {
            Some(ret) if ret != 0 => pc = ret,
            _ => break,
        }
    }
    out
}

async fn run_capture(flavour: &str, model: LineModel, hits: usize) {
    let dir = fixture_dir(flavour);
    let mut config = MachineConfig::from_dir(Arch::Amd64, 19041, 2, 5, &dir).expect("fixtures");
    config.special_pool_tag = LEAK;
    let mut machine = Machine::boot(config).expect("boot");
    let specs = AllocationActivity::leakydrv_specs(LEAK);
    let mut activity =
        AllocationActivity::from_fixture_dir(&dir, specs, 11, 200.0).expect("workload");
    let (host, target) = tokio::io::duplex(64 * 1024);
    let target_model = LineModel {
        seed: model.seed + 1,
        ..model.clone()
    };
    let sim = tokio::spawn(async move {
        let _ = serve_with(
            FaultyLine::new(target, target_model),
            &mut machine,
            &TargetOptions::default(),
            &mut activity,
        )
        .await;
        (machine, activity)
    });
    let mut s = connect(FaultyLine::new(host, model.clone()), config_for(&model)).await;
    let kern = s.version().unwrap().kern_base;
    // Module bases: the kernel from GetVersion; the driver from the module list would be the
    // symbols crate's job: here the test reads the module list with raw reads.
    let list = s.version().unwrap().ps_loaded_module_list;
    let mut modules = Vec::new();
    let mut entry = u64::from_le_bytes(s.read_virtual(list, 8).await.unwrap().try_into().unwrap());
    while entry != list {
        let e = s.read_virtual(entry, 0x68).await.unwrap();
        let base = u64::from_le_bytes(e[0x30..0x38].try_into().unwrap());
        let name_len = u16::from_le_bytes(e[0x58..0x5a].try_into().unwrap()) as usize;
        let name_ptr = u64::from_le_bytes(e[0x60..0x68].try_into().unwrap());
        let raw = s.read_virtual(name_ptr, name_len).await.unwrap();
        let name: String =
            char::decode_utf16(raw.chunks(2).map(|c| u16::from_le_bytes([c[0], c[1]])))
                .map(|c| c.unwrap_or('?'))
                .collect();
        let (module, file, pdb) = match name.to_ascii_lowercase().as_str() {
            "ntoskrnl.exe" => ("nt", "ntoskrnl.exe", "ntkrnlmp.pdb"),
            "hal.dll" => ("hal", "hal.dll", "hal.pdb"),
            _ => ("leakydrv", "leakydrv.sys", "leakydrv.pdb"),
        };
        modules.push(HostModule {
            name: module.into(),
            base,
            file: std::fs::read(dir.join(file)).unwrap(),
            pdb: PdbMap::parse(&std::fs::read(dir.join(pdb)).unwrap()).unwrap(),
        });
        entry = u64::from_le_bytes(e[0..8].try_into().unwrap());
    }
    assert_eq!(modules[0].base, kern);
    let target_fn = if flavour == "modern" {
        "ExAllocateHeapSpecialPool"
    } else {
        "MmAllocateSpecialPool"
    };
    let bp = kern + u64::from(modules[0].pdb.function(target_fn).unwrap().0);
    s.request(&api::WriteBreakPoint { address: bp })
        .await
        .expect("plant");
    let mut r: Running<_> = s.resume(&Continue2::go()).await.unwrap();
    let mut captured = Vec::new();
    while captured.len() < hits {
        let mut s = match r.wait_stop(Duration::from_secs(20)).await.unwrap() {
            WaitOutcome::Stopped(s) => s,
            WaitOutcome::StillRunning(_) => panic!("no hit within 20 s"),
        };
        let StateInfo::Exception(e) = &s.state().info else {
            panic!("not an exception: {:?}", s.state())
        };
        assert_eq!(e.record.code, status::BREAKPOINT);
        assert_eq!(s.state().program_counter, bp);
        captured.push(capture_stack(&mut s, &modules).await);
        // The kernel consumed the breakpoint at the stop: step over the instruction, re-plant.
        let r1 = s.resume(&Continue2::single_step()).await.unwrap();
        let WaitOutcome::Stopped(mut s) = r1.wait_stop(Duration::from_secs(10)).await.unwrap()
        else {
            panic!("no step")
        };
        let StateInfo::Exception(e) = &s.state().info else {
            panic!("step")
        };
        assert_eq!(e.record.code, status::SINGLE_STEP);
        s.request(&api::WriteBreakPoint { address: bp })
            .await
            .expect("re-plant");
        r = s.resume(&Continue2::go()).await.unwrap();
    }
    // Leave the target running with no breakpoint: break in, remove, resume.
    let mut s = r.break_in(Duration::from_secs(10)).await.unwrap();
    let _ = s.request(&api::RestoreBreakPoint { handle: 1 }).await;
    drop(s.resume(&Continue2::go()).await.unwrap());
    let (machine, activity) = sim.await.unwrap();
    assert!(
        machine.planted().is_empty(),
        "a breakpoint was left planted"
    );
    assert!(activity.error.is_none(), "{:?}", activity.error);
    let truth: Vec<Vec<TruthFrame>> = activity
        .workload
        .truth
        .iter()
        .flat_map(|t| {
            t.stops
                .iter()
                .filter(|s| s.first().is_some_and(|f| f.function == target_fn))
                .cloned()
        })
        .collect();
    assert!(truth.len() >= hits);
    assert_eq!(
        captured,
        truth[..captured.len()],
        "{flavour}: captured stacks differ from the ground truth"
    );
    // Every special-pool allocation of the tag while armed was caught: no truth record of the
    // tag went to special pool without a stop at the breakpoint (until the last capture).
    let deepest = captured.iter().map(Vec::len).max().unwrap();
    assert!(
        deepest >= 7,
        "stacks go from the allocator down to KiCallDriverEntry: {deepest}"
    );
}

fn config_for(model: &LineModel) -> kdpilot_kd::client::ClientConfig {
    config(model, EventSink::none())
}

#[tokio::test]
async fn capture_loop_on_modern_kernel_matches_ground_truth() {
    bounded(run_capture("modern", LineModel::clean(), 12)).await;
}

#[tokio::test]
async fn capture_loop_on_classic_kernel_matches_ground_truth() {
    bounded(run_capture("classic", LineModel::clean(), 12)).await;
}

#[tokio::test]
async fn capture_loop_on_a_noisy_line_matches_ground_truth() {
    let model = LineModel {
        corrupt_rate: 1.0 / 2000.0,
        drop_rate: 1.0 / 10000.0,
        seed: 3,
        baud: None,
    };
    bounded(run_capture("modern", model, 8)).await;
}
