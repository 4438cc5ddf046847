//! The workload's stacks against an independent unwinder: for every driver path of the x64
//! fixture kernels (classic and modern), stop at each function of the allocator path, then
//! unwind the synthesized registers and stack with `pe-unwind-info` over the mapped images and
//! check that it recovers exactly the ground-truth frames (module, function, offset).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use kdpilot_kd::context::{Amd64Reg, Context};
use kdpilot_kd::Arch;
use kdpilot_sim::frames::MappedImage;
use kdpilot_sim::loader::{load_image, ImageSource, LoadedImage};
use kdpilot_sim::memory::Memory;
use kdpilot_sim::pdbmap::PdbMap;
use kdpilot_sim::workload::{
    AllocApi, AllocationSpec, FreeApi, KernelView, OpKind, TruthFrame, Workload,
};
use pe_unwind_info::x86_64::{FunctionTableEntries, Register, UnwindState, XmmRegister};

const LEAK: u32 = u32::from_le_bytes(*b"Leak");

fn fixture(arch: &str, flavour: &str, file: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/out")
        .join(arch)
        .join(flavour)
        .join(file);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

struct Kernel {
    mem: Memory,
    images: Vec<(String, LoadedImage)>,
    bps: BTreeSet<u64>,
    contexts: Vec<Context>,
}

impl KernelView for Kernel {
    fn arch(&self) -> Arch {
        Arch::Amd64
    }
    fn memory(&mut self) -> &mut Memory {
        &mut self.mem
    }
    fn image(&self, module: &str) -> Option<MappedImage> {
        self.images
            .iter()
            .find(|(m, _)| m == module)
            .map(|(_, i)| MappedImage {
                base: i.base,
                size: i.size,
            })
    }
    fn boot_id(&self) -> u64 {
        1
    }
    fn breakpoint_at(&self, va: u64) -> bool {
        self.bps.contains(&va)
    }
    fn hardware_breakpoint_at(&self, _va: u64) -> Option<u8> {
        None
    }
    fn processors(&self) -> u32 {
        2
    }
    fn context(&self, cpu: u16) -> Option<&Context> {
        self.contexts.get(usize::from(cpu))
    }
    fn set_context(&mut self, cpu: u16, ctx: Context) {
        if let Some(c) = self.contexts.get_mut(usize::from(cpu)) {
            *c = ctx;
        }
    }
}

fn boot(flavour: &str) -> (Kernel, BTreeMap<String, PdbMap>) {
    let mut mem = Memory::new();
    let mut images: Vec<(String, LoadedImage)> = Vec::new();
    let mut pdbs = BTreeMap::new();
    for (module, file, pdb, base) in [
        ("nt", "ntoskrnl.exe", "ntkrnlmp.pdb", 0xfffff804_1c600000u64),
        ("hal", "hal.dll", "hal.pdb", 0xfffff804_1c400000),
        (
            "leakydrv",
            "leakydrv.sys",
            "leakydrv.pdb",
            0xfffff804_2a010000,
        ),
    ] {
        let src = if module == "leakydrv" {
            ImageSource::driver(file, fixture("x64", flavour, file))
        } else {
            ImageSource::system(file, fixture("x64", flavour, file))
        };
        let loaded: Vec<LoadedImage> = images.iter().map(|(_, i)| i.clone()).collect();
        let img = load_image(&mut mem, Arch::Amd64, &src, base, &loaded).expect("load");
        images.push((module.to_string(), img));
        pdbs.insert(
            module.to_string(),
            PdbMap::parse(&fixture("x64", flavour, pdb)).expect("pdb"),
        );
    }
    let contexts = vec![Context::zeroed(Arch::Amd64), Context::zeroed(Arch::Amd64)];
    (
        Kernel {
            mem,
            images,
            bps: BTreeSet::new(),
            contexts,
        },
        pdbs,
    )
}

struct State<'a> {
    regs: BTreeMap<u8, u64>,
    mem: &'a Memory,
}

fn reg_index(r: Register) -> u8 {
    r as u8
}

impl UnwindState for State<'_> {
    fn read_register(&mut self, register: Register) -> u64 {
        self.regs.get(&reg_index(register)).copied().unwrap_or(0)
    }
    fn read_stack(&mut self, addr: u64) -> Option<u64> {
        self.mem
            .read(addr, 8)
            .try_into()
            .ok()
            .map(u64::from_le_bytes)
    }
    fn write_register(&mut self, register: Register, value: u64) {
        self.regs.insert(reg_index(register), value);
    }
    fn write_xmm_register(&mut self, _register: XmmRegister, _value: u128) {}
}

/// Unwinds with pe-unwind-info and names every frame from the PDBs.
fn unwind(k: &Kernel, pdbs: &BTreeMap<String, PdbMap>, ctx: &Context) -> Vec<TruthFrame> {
    let Context::Amd64(c) = ctx else {
        panic!("x64 context")
    };
    let order = Amd64Reg::GPR_ORDER;
    let regs = order
        .iter()
        .enumerate()
        .map(|(i, r)| (i as u8, c.get(*r)))
        .collect();
    let mut st = State { regs, mem: &k.mem };
    let mut pc = ctx.pc();
    let mut out = Vec::new();
    for depth in 0..32 {
        let Some((module, img)) = k.images.iter().find(|(_, i)| i.contains(pc)) else {
            break;
        };
        let rva = (pc - img.base) as u32;
        let lookup_rva = if depth == 0 { rva } else { rva - 1 };
        let (name, off) = pdbs[module].function_at(lookup_rva).expect("named");
        let off = if depth == 0 { off } else { off + 1 };
        out.push(TruthFrame {
            module: module.clone(),
            function: name.to_string(),
            offset: u64::from(off),
        });
        let bytes = k.mem.read(img.base, img.size as usize);
        let (dir, size) = img.exception_directory;
        let table = FunctionTableEntries::parse(&bytes[dir as usize..(dir + size) as usize]);
        let next = table.unwind_frame(&mut st, |r| bytes.get(r as usize..), lookup_rva);
        match next {
            Some(ret) if ret != 0 => pc = ret,
            _ => break,
        }
    }
    out
}

fn driver_paths() -> Vec<(Vec<&'static str>, AllocApi)> {
    let base = [
        "nt!KiCallDriverEntry",
        "leakydrv!DriverEntry",
        "leakydrv!LeakyWorker",
    ];
    let with = |f: &'static str| base.iter().copied().chain([f]).collect::<Vec<_>>();
    vec![
        (
            with("leakydrv!LeakyAllocFramePointer"),
            AllocApi::PoolWithTag,
        ),
        (with("leakydrv!LeakyAllocPushes"), AllocApi::PoolWithTag),
        (
            with("leakydrv!LeakyAllocLargeLocals"),
            AllocApi::PoolWithTag,
        ),
        (with("leakydrv!LeakyAllocViaPool2"), AllocApi::Pool2),
        (
            kdpilot_sim::activity::DEEP_PATH.to_vec(),
            AllocApi::PoolWithTag,
        ),
    ]
}

#[test]
fn unwinding_the_synthesized_stacks_gives_the_ground_truth() {
    for flavour in ["classic", "modern"] {
        for (path, api) in driver_paths() {
            let (mut k, pdbs) = boot(flavour);
            // Plant "breakpoints" on every function of the path: each allocation stops at each.
            let spec = AllocationSpec {
                path: path.iter().map(|s| s.to_string()).collect(),
                api,
                tag: LEAK,
                size: 0x40,
                pool_type: 0x200,
                weight: 1,
                free: None,
            };
            let mut w = Workload::new(vec![spec], pdbs.clone(), 7);
            // Resolve every function on the full path and plant a breakpoint at each entry.
            let probe = w.step(&mut k).expect("first step"); // no breakpoints yet: runs through
            assert!(probe.is_none());
            let full = w.truth[0].path.clone();
            for name in &full {
                let (m, f) = name.split_once('!').unwrap();
                let img = k.image(m).unwrap();
                let (rva, _) = pdbs[m]
                    .function(f)
                    .unwrap_or_else(|| panic!("{name} not in the PDB"));
                k.bps.insert(img.base + u64::from(rva));
            }
            let mut stops = 0;
            while let Some(stop) = w.step(&mut k).expect("step") {
                // The host would step over; here: remove the breakpoint so it runs on.
                k.bps.remove(&stop.pc);
                let ctx = k.context(stop.cpu).unwrap().clone();
                let got = unwind(&k, &pdbs, &ctx);
                let want = w.truth[1].stops.last().unwrap().clone();
                assert_eq!(got, want, "{flavour} {path:?} stop {stops}");
                assert_eq!(
                    got.len(),
                    stops + 1,
                    "every frame down to the stop is recovered"
                );
                if std::env::var_os("SHOW_FRAMES").is_some() {
                    eprintln!("{got:?}");
                }
                stops += 1;
                if !w.in_flight() {
                    break;
                }
            }
            assert_eq!(
                stops,
                full.len(),
                "{flavour} {path:?}: one stop per function"
            );
        }
    }
}

/// x86: no independent unwinder here (the symbols crate has one), so check what any x86
/// unwinder relies on: [ESP] is the return address into the caller, every caller's return
/// address sits higher on the stack in path order, and the EBP chain of the EBP-frame functions
/// links the frames as the code built them.
#[test]
fn x86_stacks_hold_the_return_addresses_in_order() {
    for flavour in ["classic", "modern"] {
        let mut mem = Memory::new();
        let mut images: Vec<(String, LoadedImage)> = Vec::new();
        let mut pdbs = BTreeMap::new();
        for (module, file, pdb, base) in [
            ("nt", "ntoskrnl.exe", "ntkrpamp.pdb", 0x8280_0000u64),
            ("hal", "hal.dll", "hal.pdb", 0x8260_0000),
            ("leakydrv", "leakydrv.sys", "leakydrv.pdb", 0x9a01_0000),
        ] {
            let bytes = fixture("x86", flavour, file);
            let src = if module == "leakydrv" {
                ImageSource::driver(file, bytes)
            } else {
                ImageSource::system(file, bytes)
            };
            let loaded: Vec<LoadedImage> = images.iter().map(|(_, i)| i.clone()).collect();
            let img = load_image(
                &mut mem,
                Arch::X86,
                &src,
                Arch::X86.canonical_address(base),
                &loaded,
            )
            .expect("load");
            images.push((module.to_string(), img));
            pdbs.insert(
                module.to_string(),
                PdbMap::parse(&fixture("x86", flavour, pdb)).expect("pdb"),
            );
        }
        let contexts = vec![Context::zeroed(Arch::X86), Context::zeroed(Arch::X86)];
        let mut k = Kernel32 {
            inner: Kernel {
                mem,
                images,
                bps: BTreeSet::new(),
                contexts,
            },
        };
        for (path, api) in driver_paths() {
            let spec = AllocationSpec {
                path: path.iter().map(|s| s.to_string()).collect(),
                api,
                tag: LEAK,
                size: 0x40,
                pool_type: 0x200,
                weight: 1,
                free: None,
            };
            let mut w = Workload::new(vec![spec], pdbs.clone(), 9);
            assert!(w.step(&mut k).expect("first step").is_none());
            let full = w.truth[0].path.clone();
            let innermost = full.last().unwrap().clone();
            let (m, f) = innermost.split_once('!').unwrap();
            let entry = k.image(m).unwrap().base + u64::from(pdbs[m].function(f).unwrap().0);
            k.inner.bps.insert(entry);
            let stop = w
                .step(&mut k)
                .expect("step")
                .expect("stops at the innermost function");
            assert_eq!(stop.pc, entry);
            let truth = w.truth[1].stops.last().unwrap().clone();
            let ctx = k.context(stop.cpu).unwrap().clone();
            let mut sp = Arch::X86.canonical_address(ctx.sp());
            for (depth, frame) in truth.iter().enumerate().skip(1) {
                let img = k.image(&frame.module).unwrap();
                let ret = img.base
                    + u64::from(pdbs[&frame.module].function(&frame.function).unwrap().0)
                    + frame.offset;
                // The next return address on the stack, at or above `sp`.
                let found = (0..0x1000u64).step_by(4).map(|o| sp + o).find(|a| {
                    let v: Option<[u8; 4]> = k.inner.mem.read(*a, 4).try_into().ok();
                    v.is_some_and(|v| {
                        Arch::X86.canonical_address(u64::from(u32::from_le_bytes(v))) == ret
                    })
                });
                let at = found.unwrap_or_else(|| panic!("{flavour} {path:?}: return address of frame {depth} ({frame:?}) not on the stack"));
                if depth == 1 {
                    assert_eq!(
                        at,
                        Arch::X86.canonical_address(ctx.sp()),
                        "[ESP] is the return address at a function entry"
                    );
                }
                sp = at + 4;
            }
            k.inner.bps.clear();
        }
    }
}

struct Kernel32 {
    inner: Kernel,
}

impl KernelView for Kernel32 {
    fn arch(&self) -> Arch {
        Arch::X86
    }
    fn memory(&mut self) -> &mut Memory {
        self.inner.memory()
    }
    fn image(&self, module: &str) -> Option<MappedImage> {
        self.inner.image(module)
    }
    fn boot_id(&self) -> u64 {
        1
    }
    fn breakpoint_at(&self, va: u64) -> bool {
        self.inner.breakpoint_at(va)
    }
    fn hardware_breakpoint_at(&self, _va: u64) -> Option<u8> {
        None
    }
    fn processors(&self) -> u32 {
        2
    }
    fn context(&self, cpu: u16) -> Option<&Context> {
        self.inner.context(cpu)
    }
    fn set_context(&mut self, cpu: u16, ctx: Context) {
        self.inner.set_context(cpu, ctx)
    }
}

/// Frees walk their own kernel path (ExFreePoolWithTag and, per flavour, ExFreeHeapPool /
/// MmFreeSpecialPool / ExpCheckFree) from the driver function that frees, and every stop on it
/// unwinds to the ground truth too.
#[test]
fn free_paths_unwind_to_the_ground_truth() {
    for flavour in ["classic", "modern"] {
        let cases = [
            (
                true,
                FreeApi::PoolWithTag,
                "LeakyFreeBalanced",
                AllocApi::PoolWithTag,
                LEAK,
            ),
            (
                false,
                FreeApi::Pool,
                "LeakyNoise",
                AllocApi::Pool2,
                u32::from_le_bytes(*b"Nois"),
            ),
        ];
        for (special, free, function, api, tag) in cases {
            let (mut k, pdbs) = boot(flavour);
            if special {
                // MmSpecialPoolTag = 'Leak', as the registry's PoolTag would make it.
                let rva = pdbs["nt"].data["MmSpecialPoolTag"];
                let base = k.image("nt").unwrap().base;
                k.mem.write(base + u64::from(rva), &LEAK.to_le_bytes());
            }
            let spec = AllocationSpec {
                path: [
                    "nt!KiCallDriverEntry",
                    "leakydrv!DriverEntry",
                    "leakydrv!LeakyWorker",
                ]
                .into_iter()
                .map(String::from)
                .chain([format!("leakydrv!{function}")])
                .collect(),
                api,
                tag,
                size: 0x50,
                pool_type: 0x200,
                weight: 1,
                free: Some(free),
            };
            let mut w = Workload::new(vec![spec], pdbs.clone(), 3);
            // A first round without breakpoints, to learn both paths.
            assert!(w.step(&mut k).unwrap().is_none());
            assert!(w.step(&mut k).unwrap().is_none());
            assert_eq!(w.truth[1].kind, OpKind::Free);
            assert_eq!(w.truth[1].address, w.truth[0].address);
            assert_eq!(w.truth[0].special_pool, special);
            for name in w.truth[0].path.iter().chain(&w.truth[1].path) {
                let (m, f) = name.split_once('!').unwrap();
                let (rva, _) = pdbs[m].function(f).unwrap_or_else(|| panic!("{name}"));
                k.bps.insert(k.image(m).unwrap().base + u64::from(rva));
            }
            let mut got = Vec::new();
            for _ in 0..2 {
                while let Some(stop) = w.step(&mut k).unwrap() {
                    k.bps.remove(&stop.pc);
                    let ctx = k.context(stop.cpu).unwrap().clone();
                    got.push(unwind(&k, &pdbs, &ctx));
                    if !w.in_flight() {
                        break;
                    }
                }
            }
            let want: Vec<Vec<TruthFrame>> =
                w.truth[2..].iter().flat_map(|t| t.stops.clone()).collect();
            assert_eq!(got, want, "{flavour} special={special}");
            assert!(want.iter().any(|s| s[0].function == "ExFreePoolWithTag"));
            let sink = if special {
                if flavour == "modern" {
                    "ExFreeHeapSpecialPool"
                } else {
                    "MmFreeSpecialPool"
                }
            } else {
                "ExpCheckFree"
            };
            assert!(
                want.iter().any(|s| s[0].function == sink),
                "{flavour}: no stop in {sink}"
            );
        }
    }
}
