//! Stack walks over the real fixture images (x64 unwind info, x86 frame data) with an arbitrary
//! stack and registers: they end, within the depth cap, always making progress.
#![no_main]

use std::future::Future;
use std::pin::pin;
use std::sync::OnceLock;
use std::task::{Context, Poll, Waker};

use kdpilot_symbols::{
    Arch, MockMemory, Module, ModuleSet, ModuleSymbols, PeFile, Registers, StackWalker, WalkConfig,
    X64Register, X64Registers, X86Registers,
};
use libfuzzer_sys::fuzz_target;

fn ready<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
}

const X64_NT: &[u8] = include_bytes!("../../fixtures/out/x64/classic/ntoskrnl.exe");
const X64_DRV: &[u8] = include_bytes!("../../fixtures/out/x64/classic/leakydrv.sys");
const X86_NT: &[u8] = include_bytes!("../../fixtures/out/x86/classic/ntoskrnl.exe");
const X86_NT_PDB: &[u8] = include_bytes!("../../fixtures/out/x86/classic/ntkrpamp.pdb");
const X86_DRV: &[u8] = include_bytes!("../../fixtures/out/x86/classic/leakydrv.sys");
const X86_DRV_PDB: &[u8] = include_bytes!("../../fixtures/out/x86/classic/leakydrv.pdb");

fn module(name: &str, file: &str, base: u64, image: &[u8], pdb: Option<&[u8]>) -> Module {
    let pe = PeFile::parse(image.to_vec()).unwrap();
    let mut m = Module::new(name, file, base, pe.headers().size_of_image);
    m.headers = Some(pe.headers().clone());
    m.codeview = pe.codeview();
    m.attach_image(pe).unwrap();
    if let Some(pdb) = pdb {
        m.attach_symbols(
            ModuleSymbols::parse(pdb.to_vec(), None).unwrap(),
            "fuzz".into(),
        );
    }
    m
}

fn sets() -> &'static (ModuleSet, ModuleSet) {
    static SETS: OnceLock<(ModuleSet, ModuleSet)> = OnceLock::new();
    SETS.get_or_init(|| {
        let x64 = ModuleSet::new(
            Some(Arch::Amd64),
            vec![
                module("nt", "ntoskrnl.exe", 0xFFFF_F800_0240_0000, X64_NT, None),
                module(
                    "leakydrv",
                    "leakydrv.sys",
                    0xFFFF_F880_0110_0000,
                    X64_DRV,
                    None,
                ),
            ],
        );
        let x86 = ModuleSet::new(
            Some(Arch::X86),
            vec![
                module(
                    "nt",
                    "ntoskrnl.exe",
                    0xFFFF_FFFF_8040_0000,
                    X86_NT,
                    Some(X86_NT_PDB),
                ),
                module(
                    "leakydrv",
                    "leakydrv.sys",
                    0xFFFF_FFFF_8F10_0000,
                    X86_DRV,
                    Some(X86_DRV_PDB),
                ),
            ],
        );
        (x64, x86)
    })
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 17 {
        return;
    }
    let (x64, x86) = sets();
    let x86_mode = data[0] & 1 == 1;
    let pick = u64::from(u32::from_le_bytes([data[1], data[2], data[3], data[4]]));
    let fp_off = u64::from(u32::from_le_bytes([data[5], data[6], data[7], data[8]]));
    let stack = &data[9..];
    let (set, sp) = if x86_mode {
        (x86, 0xFFFF_FFFF_8A00_0000u64)
    } else {
        (x64, 0xFFFF_F880_0320_0000u64)
    };
    let mut mem = MockMemory::new();
    mem.write(sp, stack);
    let m = &set.modules()[(pick as usize) % set.modules().len()];
    let pc = m.base + 0x1000 + pick % 0x800;
    let regs = if x86_mode {
        Registers::X86(X86Registers::new(
            pc as u32,
            sp as u32,
            (sp + fp_off % 0x2000) as u32,
        ))
    } else {
        let mut r = X64Registers::new(pc, sp, sp.wrapping_add(fp_off));
        r.set(X64Register::RBX, fp_off);
        Registers::X64(r)
    };
    let config = WalkConfig {
        max_frames: 32,
        ..Default::default()
    };
    let trace = ready(StackWalker::with_config(set, config).walk(&mut mem, regs)).unwrap();
    assert!(trace.frames.len() <= 32);
    for w in trace.frames.windows(2) {
        assert!(w[1].sp > w[0].sp || w[0].caller_via_machine_frame);
    }
    let _ = trace.format_kb(set, false);
});
