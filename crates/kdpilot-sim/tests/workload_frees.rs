//! What a host tracking frees relies on: stops at the return addresses on the way back out of
//! an allocation (the block in rax/eax, a stack that unwinds to the driver's callers), PoolHitTag
//! free stops that carry the block, special pool that fills up and falls back to normal pool,
//! and the leak-hunt workload that frees all but known paths.
//!
//! The return addresses are found here independently of the simulator: by decoding the caller's
//! code for a `call` whose target (direct, or through the import slot) is the callee.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use iced_x86::{Decoder, DecoderOptions, Mnemonic, OpKind as IcedOp, Register as IcedReg};
use kdpilot_kd::api::{Continue2, GetContext, WriteBreakPoint};
use kdpilot_kd::context::{Amd64Reg, Context, X86Reg};
use kdpilot_kd::wire::status;
use kdpilot_kd::Arch;
use kdpilot_sim::frames::MappedImage;
use kdpilot_sim::kernel::Stop;
use kdpilot_sim::loader::{load_image, ImageSource, LoadedImage};
use kdpilot_sim::memory::Memory;
use kdpilot_sim::pdbmap::PdbMap;
use kdpilot_sim::workload::{
    AllocApi, AllocationSpec, FreeApi, KernelView, OpKind, TruthFrame, TruthRecord, Workload,
};
use kdpilot_sim::{Activity, AllocationActivity, Machine, Scenario, TargetOptions};
use pe_unwind_info::x86_64::{FunctionTableEntries, Register, UnwindState, XmmRegister};

const LEAK: u32 = u32::from_le_bytes(*b"Leak");
const NOIS: u32 = u32::from_le_bytes(*b"Nois");

fn fixture(arch: Arch, flavour: &str, file: &str) -> Vec<u8> {
    let p = common::fixture_dir(arch, flavour).join(file);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A kernel for the workload alone: images mapped, breakpoints as a set, a boot number the
/// test can change.
struct Kernel {
    arch: Arch,
    mem: Memory,
    images: Vec<(String, LoadedImage)>,
    bps: BTreeSet<u64>,
    contexts: Vec<Context>,
    boot: u64,
}

impl KernelView for Kernel {
    fn arch(&self) -> Arch {
        self.arch
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
        self.boot
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

impl Kernel {
    fn boot(arch: Arch, flavour: &str) -> (Kernel, BTreeMap<String, PdbMap>) {
        let mut mem = Memory::new();
        let mut images: Vec<(String, LoadedImage)> = Vec::new();
        let mut pdbs = BTreeMap::new();
        let (nt_pdb, bases) = match arch {
            Arch::Amd64 => (
                "ntkrnlmp.pdb",
                [
                    0xfffff804_1c600000u64,
                    0xfffff804_1c400000,
                    0xfffff804_2a010000,
                ],
            ),
            Arch::X86 => ("ntkrpamp.pdb", [0x8280_0000, 0x8260_0000, 0x9a01_0000]),
        };
        for ((module, file, pdb), base) in [
            ("nt", "ntoskrnl.exe", nt_pdb),
            ("hal", "hal.dll", "hal.pdb"),
            ("leakydrv", "leakydrv.sys", "leakydrv.pdb"),
        ]
        .into_iter()
        .zip(bases)
        {
            let bytes = fixture(arch, flavour, file);
            let src = if module == "leakydrv" {
                ImageSource::driver(file, bytes)
            } else {
                ImageSource::system(file, bytes)
            };
            let loaded: Vec<LoadedImage> = images.iter().map(|(_, i)| i.clone()).collect();
            let img = load_image(&mut mem, arch, &src, arch.canonical_address(base), &loaded)
                .expect("load");
            images.push((module.to_string(), img));
            pdbs.insert(
                module.to_string(),
                PdbMap::parse(&fixture(arch, flavour, pdb)).expect("pdb"),
            );
        }
        let contexts = vec![Context::zeroed(arch), Context::zeroed(arch)];
        let k = Kernel {
            arch,
            mem,
            images,
            bps: BTreeSet::new(),
            contexts,
            boot: 1,
        };
        (k, pdbs)
    }

    fn entry(&self, pdbs: &BTreeMap<String, PdbMap>, name: &str) -> u64 {
        let (m, f) = name.split_once('!').unwrap();
        let (rva, _) = pdbs[m]
            .function(f)
            .unwrap_or_else(|| panic!("{name} not in the PDB"));
        self.image(m).unwrap().base + u64::from(rva)
    }

    /// Writes a u32 kernel global (PoolHitTag, MmSpecialPoolTag).
    fn set_global(&mut self, pdbs: &BTreeMap<String, PdbMap>, name: &str, value: u32) {
        let rva = pdbs["nt"].data[name];
        let base = self.image("nt").unwrap().base;
        self.mem.write(base + u64::from(rva), &value.to_le_bytes());
    }

    /// The return address of `caller`'s call to `callee`, by decoding `caller`'s code.
    fn return_address(&self, pdbs: &BTreeMap<String, PdbMap>, caller: &str, callee: &str) -> u64 {
        let (m, f) = caller.split_once('!').unwrap();
        let (rva, len) = pdbs[m].function(f).unwrap();
        let start = self.image(m).unwrap().base + u64::from(rva);
        let target = self.entry(pdbs, callee);
        let code = self.mem.read(start, len as usize);
        let bits = if self.arch == Arch::Amd64 { 64 } else { 32 };
        let ptr = |at: u64| -> u64 {
            let b = self.mem.read(at, bits / 8);
            match self.arch {
                Arch::Amd64 => u64::from_le_bytes(b.try_into().unwrap()),
                Arch::X86 => Arch::X86
                    .canonical_address(u64::from(u32::from_le_bytes(b.try_into().unwrap()))),
            }
        };
        let calls: Vec<_> = Decoder::with_ip(bits as u32, &code, start, DecoderOptions::NONE)
            .into_iter()
            .filter(|i| i.mnemonic() == Mnemonic::Call)
            .collect();
        // A call through a register (a function pointer: how the kernel calls DriverEntry)
        // counts when no call names the callee.
        let indirect = |i: &iced_x86::Instruction| {
            i.op0_kind() == IcedOp::Register
                || (i.op0_kind() == IcedOp::Memory
                    && !matches!(i.memory_base(), IcedReg::None | IcedReg::RIP))
        };
        calls
            .iter()
            .find(|i| {
                let to = match i.op0_kind() {
                    IcedOp::NearBranch64 | IcedOp::NearBranch32 => i.near_branch_target(),
                    IcedOp::Memory if i.memory_base() == IcedReg::RIP => {
                        ptr(i.ip_rel_memory_address())
                    }
                    IcedOp::Memory
                        if i.memory_base() == IcedReg::None
                            && i.memory_index() == IcedReg::None =>
                    {
                        ptr(Arch::X86.canonical_address(i.memory_displacement64()))
                    }
                    _ => return false,
                };
                self.arch.canonical_address(to) == target
            })
            .or_else(|| calls.iter().find(|i| indirect(i)))
            .map(|i| self.arch.canonical_address(i.next_ip()))
            .unwrap_or_else(|| panic!("{caller} has no call to {callee}"))
    }
}

struct State<'a> {
    regs: BTreeMap<u8, u64>,
    mem: &'a Memory,
}

impl UnwindState for State<'_> {
    fn read_register(&mut self, register: Register) -> u64 {
        self.regs.get(&(register as u8)).copied().unwrap_or(0)
    }
    fn read_stack(&mut self, addr: u64) -> Option<u64> {
        self.mem
            .read(addr, 8)
            .try_into()
            .ok()
            .map(u64::from_le_bytes)
    }
    fn write_register(&mut self, register: Register, value: u64) {
        self.regs.insert(register as u8, value);
    }
    fn write_xmm_register(&mut self, _register: XmmRegister, _value: u128) {}
}

/// Unwinds an x64 context with pe-unwind-info over the mapped images, naming frames from the
/// PDBs. `at_return`: the first PC is a return address (the call is at PC - 1).
fn unwind(k: &Kernel, pdbs: &BTreeMap<String, PdbMap>, ctx: &Context) -> Vec<TruthFrame> {
    let Context::Amd64(c) = ctx else {
        panic!("x64 context")
    };
    let regs = Amd64Reg::GPR_ORDER
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
        match table.unwind_frame(&mut st, |r| bytes.get(r as usize..), lookup_rva) {
            Some(ret) if ret != 0 => pc = ret,
            _ => break,
        }
    }
    out
}

fn driver_path(function: &str) -> Vec<String> {
    [
        "nt!KiCallDriverEntry",
        "leakydrv!DriverEntry",
        "leakydrv!LeakyWorker",
    ]
    .into_iter()
    .map(String::from)
    .chain([format!("leakydrv!{function}")])
    .collect()
}

fn spec(function: &str, api: AllocApi, tag: u32, free: Option<FreeApi>) -> AllocationSpec {
    AllocationSpec {
        path: driver_path(function),
        api,
        tag,
        size: 0x40,
        pool_type: 0x200,
        weight: 1,
        free,
    }
}

fn u32_at(mem: &Memory, at: u64) -> u32 {
    u32::from_le_bytes(mem.read(at, 4).try_into().unwrap())
}

/// x64: a breakpoint at every return address of the path stops there, innermost caller first,
/// with rax = the block and registers that unwind to exactly the callers; an int3 still in
/// memory at the PC executes again; the entry stops (`stops`) stay empty.
#[test]
fn return_stops_x64_carry_the_block_and_unwind_to_the_callers() {
    for flavour in ["classic", "modern"] {
        for (function, api) in [
            ("LeakyAllocPushes", AllocApi::PoolWithTag),
            ("LeakyAllocViaPool2", AllocApi::Pool2),
        ] {
            let (mut k, pdbs) = Kernel::boot(Arch::Amd64, flavour);
            let mut w = Workload::new(vec![spec(function, api, LEAK, None)], pdbs.clone(), 5);
            // A first allocation without breakpoints: the path, and no stops at all.
            assert!(w.step(&mut k).unwrap().is_none());
            assert!(w.truth[0].returns.is_empty());
            let path = w.truth[0].path.clone();
            let rets: Vec<u64> = path
                .windows(2)
                .map(|p| k.return_address(&pdbs, &p[0], &p[1]))
                .collect();
            k.bps.extend(rets.iter().copied());
            let driver = format!("leakydrv!{function}");
            let api_name = format!("nt!{}", path[4].split_once('!').unwrap().1);
            let into_driver = k.return_address(&pdbs, &driver, &api_name);
            assert!(rets.contains(&into_driver));

            let mut pcs = Vec::new();
            let mut retriggered = false;
            while let Some(stop) = w.step(&mut k).unwrap() {
                let rec = w.truth[1].clone();
                assert_eq!(stop.code, status::BREAKPOINT);
                let ctx = k.context(stop.cpu).unwrap().clone();
                let Context::Amd64(c) = &ctx else { panic!() };
                assert_eq!(c.get(Amd64Reg::Rip), stop.pc);
                assert_eq!(
                    c.get(Amd64Reg::Rax),
                    rec.address,
                    "{flavour} {function}: rax at {:#x}",
                    stop.pc
                );
                assert_ne!(rec.address, 0);
                // The return address just popped is right below RSP.
                let rsp = c.get(Amd64Reg::Rsp);
                assert_eq!(k.mem.read(rsp - 8, 8), stop.pc.to_le_bytes());
                let got = unwind(&k, &pdbs, &ctx);
                let want = rec.returns.last().unwrap();
                assert_eq!(got, want.stack, "{flavour} {function} at {:#x}", stop.pc);
                assert_eq!(want.value, rec.address);
                // The caller chain, innermost first, ends at the thread's start.
                let names: Vec<String> = got
                    .iter()
                    .map(|f| format!("{}!{}", f.module, f.function))
                    .collect();
                let mut callers: Vec<String> = path[..names.len()].to_vec();
                callers.reverse();
                assert_eq!(names, callers);
                if stop.pc == into_driver && !retriggered {
                    // An int3 re-planted at the PC (memory says 0xCC) executes again.
                    retriggered = true;
                    let orig = k.mem.read(stop.pc, 1);
                    k.mem.write(stop.pc, &[0xCC]);
                    let again = w.step(&mut k).unwrap().expect("the int3 executes again");
                    assert_eq!(again.pc, stop.pc);
                    assert_eq!(w.truth[1].returns.len(), pcs.len() + 2);
                    let ctx2 = k.context(stop.cpu).unwrap();
                    assert_eq!(ctx2.pc(), stop.pc);
                    k.mem.write(stop.pc, &orig);
                    pcs.push(stop.pc);
                }
                k.bps.remove(&stop.pc);
                pcs.push(stop.pc);
                if !w.in_flight() {
                    break;
                }
            }
            assert!(retriggered, "{flavour} {function}: stopped in the driver");
            // Innermost caller first: the return addresses in reverse path order.
            let mut want: Vec<u64> = rets.clone();
            want.reverse();
            pcs.dedup();
            assert_eq!(pcs, want, "{flavour} {function}");
            assert!(w.truth[1].stops.is_empty(), "return stops are not in stops");
            assert!(!w.in_flight());
        }
    }
}

/// x86: at the return into the driver from the allocator, eip is the return address, eax the
/// block, ESP is above the popped return address and the stdcall arguments the API popped
/// (3 dwords for ExAllocatePoolWithTag; ExAllocatePool2's 64-bit Flags makes 4), and the
/// callers' return addresses follow on the stack in order.
#[test]
fn return_stops_x86_pop_the_stdcall_arguments() {
    for flavour in ["classic", "modern"] {
        for (function, api, popped) in [
            ("LeakyAllocPushes", AllocApi::PoolWithTag, 12u64),
            ("LeakyAllocViaPool2", AllocApi::Pool2, 16),
        ] {
            let (mut k, pdbs) = Kernel::boot(Arch::X86, flavour);
            let mut w = Workload::new(vec![spec(function, api, LEAK, None)], pdbs.clone(), 6);
            assert!(w.step(&mut k).unwrap().is_none());
            let driver = format!("leakydrv!{function}");
            let api_name = format!("nt!{}", w.truth[0].path[4].split_once('!').unwrap().1);
            let ret = k.return_address(&pdbs, &driver, &api_name);
            k.bps.insert(ret);
            let stop = w
                .step(&mut k)
                .unwrap()
                .expect("stops at the return address");
            assert_eq!(stop.pc, ret);
            let rec = w.truth[1].clone();
            let Context::X86(c) = k.context(stop.cpu).unwrap().clone() else {
                panic!()
            };
            assert_eq!(Arch::X86.canonical_address(c.get(X86Reg::Eip)), ret);
            assert_eq!(
                Arch::X86.canonical_address(c.get(X86Reg::Eax)),
                rec.address,
                "{flavour} {function}"
            );
            let esp = Arch::X86.canonical_address(c.get(X86Reg::Esp));
            assert_eq!(
                Arch::X86.canonical_address(u64::from(u32_at(&k.mem, esp - 4 - popped))),
                ret,
                "{flavour} {function}: the return address sits below the popped arguments"
            );
            // The stack of the truth: the driver function at the return address, then callers
            // whose return addresses lie above ESP in order.
            let stack = &rec.returns[0].stack;
            assert_eq!(stack[0].function, function);
            assert_eq!(
                k.entry(&pdbs, &driver) + stack[0].offset,
                ret,
                "frame 0 is the return address"
            );
            let mut sp = esp;
            for frame in &stack[1..] {
                let at =
                    k.entry(&pdbs, &format!("{}!{}", frame.module, frame.function)) + frame.offset;
                let found = (0..0x1000u64)
                    .step_by(4)
                    .map(|o| sp + o)
                    .find(|a| Arch::X86.canonical_address(u64::from(u32_at(&k.mem, *a))) == at);
                sp = found.unwrap_or_else(|| panic!("{flavour}: {frame} not on the stack")) + 4;
            }
            k.bps.clear();
            assert!(w.step(&mut k).unwrap().is_none());
            assert!(!w.in_flight());
        }
    }
}

/// Through the real client: a one-shot breakpoint written at the return address of
/// ExAllocatePoolWithTag into the driver stops there with rax = the block the truth records.
#[tokio::test]
async fn a_breakpoint_at_the_allocator_return_address_reads_the_block_over_kd() {
    common::bounded(async {
        let arch = Arch::Amd64;
        let dir: PathBuf = common::fixture_dir(arch, "modern");
        let machine = common::fixture_machine(arch, "modern", 2, 11);
        let pdbs: BTreeMap<String, PdbMap> = [("nt", "ntkrnlmp.pdb"), ("leakydrv", "leakydrv.pdb")]
            .into_iter()
            .map(|(m, f)| {
                (
                    m.to_string(),
                    PdbMap::parse(&std::fs::read(dir.join(f)).unwrap()).unwrap(),
                )
            })
            .collect();
        // The return address, decoded from the machine's memory.
        let (rva, len) = pdbs["leakydrv"].function("LeakyAllocPushes").unwrap();
        let start = machine.image("leakydrv.sys").unwrap().base + u64::from(rva);
        let api = machine.image("ntoskrnl.exe").unwrap().base
            + u64::from(pdbs["nt"].function("ExAllocatePoolWithTag").unwrap().0);
        let code = machine.read(start, len as usize);
        let ret = Decoder::with_ip(64, &code, start, DecoderOptions::NONE)
            .into_iter()
            .find(|i| {
                i.mnemonic() == Mnemonic::Call
                    && match i.op0_kind() {
                        IcedOp::NearBranch64 => i.near_branch_target() == api,
                        IcedOp::Memory if i.memory_base() == IcedReg::RIP => {
                            machine.read(i.ip_rel_memory_address(), 8) == api.to_le_bytes()
                        }
                        _ => false,
                    }
            })
            .map(|i| i.next_ip())
            .expect("LeakyAllocPushes calls ExAllocatePoolWithTag");
        let activity = AllocationActivity::from_fixture_dir(
            &dir,
            vec![spec("LeakyAllocPushes", AllocApi::PoolWithTag, LEAK, None)],
            3,
            50.0,
        )
        .unwrap();
        let shared = Arc::new(Mutex::new(activity));
        let (io, sim) = common::start_with(
            machine,
            TargetOptions::default(),
            Box::new(Shared(shared.clone())),
        );
        let mut s = common::connect(io, common::config()).await;
        s.request(&WriteBreakPoint { address: ret }).await.unwrap();
        let mut s = common::next_stop(s.resume(&Continue2::go()).await.unwrap()).await;
        let st = s.state().clone();
        assert!(st.is_breakpoint());
        assert_eq!(st.program_counter, ret);
        let ctx = s.request_on(st.processor, &GetContext).await.unwrap();
        let Context::Amd64(c) = &ctx else { panic!() };
        let rax = c.get(Amd64Reg::Rax);
        let truth: Vec<TruthRecord> = shared.lock().unwrap().workload.truth.clone();
        let rec = truth
            .iter()
            .find(|t| !t.returns.is_empty())
            .expect("a return stop in the truth");
        assert_eq!(rax, rec.address);
        assert_eq!(rec.returns[0].value, rax);
        assert_eq!(rec.returns[0].stack[0].function, "LeakyAllocPushes");
        assert_eq!(rec.returns[0].stack.len(), 4);
        // The stack holds the callers' return addresses as the truth says: [rsp] onwards
        // contains the return into LeakyWorker.
        let rsp = c.get(Amd64Reg::Rsp);
        let words = s.read_virtual(rsp, 0x400).await.unwrap();
        let worker = &rec.returns[0].stack[1];
        let driver_base = start - u64::from(rva);
        let leakyworker_ret = driver_base
            + u64::from(pdbs["leakydrv"].function(&worker.function).unwrap().0)
            + worker.offset;
        assert!(
            words
                .chunks_exact(8)
                .any(|w| u64::from_le_bytes(w.try_into().unwrap()) == leakyworker_ret),
            "the return into LeakyWorker is on the stack"
        );
        drop(s.resume(&Continue2::go()).await.unwrap());
        drop(sim);
    })
    .await;
}

/// An activity shared with the test, to read its truth while the target runs.
struct Shared(Arc<Mutex<AllocationActivity>>);

impl Activity for Shared {
    fn poll(&mut self, machine: &mut Machine, now: Instant) -> Option<Stop> {
        self.0.lock().unwrap().poll(machine, now)
    }
}

/// With PoolHitTag set, the free's break in DbgBreakPoint has P in rbx (x64) / as
/// ExFreePoolWithTag's first stdcall argument (x86), and the stack still unwinds.
#[test]
fn pool_hit_tag_free_stops_carry_the_block() {
    for arch in [Arch::Amd64, Arch::X86] {
        for flavour in ["classic", "modern"] {
            for free in [FreeApi::PoolWithTag, FreeApi::Pool] {
                let (mut k, pdbs) = Kernel::boot(arch, flavour);
                k.set_global(&pdbs, "PoolHitTag", LEAK);
                let s = spec("LeakyFreeBalanced", AllocApi::PoolWithTag, LEAK, Some(free));
                let s = if free == FreeApi::Pool {
                    AllocationSpec {
                        path: driver_path("LeakyNoise"),
                        api: AllocApi::Pool2,
                        ..s
                    }
                } else {
                    s
                };
                let mut w = Workload::new(vec![s], pdbs.clone(), 8);
                let mut free_stops = 0;
                for _ in 0..4 {
                    let Some(stop) = w.step(&mut k).unwrap() else {
                        continue;
                    };
                    let rec = w.truth.last().unwrap().clone();
                    assert_eq!(rec.path.last().unwrap(), "nt!DbgBreakPoint");
                    let mut ctx = k.context(stop.cpu).unwrap().clone();
                    if rec.kind == OpKind::Free {
                        free_stops += 1;
                        // The free of the allocation just before it.
                        let alloc = &w.truth[w.truth.len() - 2];
                        assert_eq!(alloc.kind, OpKind::Alloc);
                        assert_eq!(rec.address, alloc.address);
                        match &ctx {
                            Context::Amd64(c) => {
                                assert_eq!(c.get(Amd64Reg::Rbx), rec.address, "{flavour}");
                                assert_eq!(
                                    unwind(&k, &pdbs, &ctx),
                                    *rec.stops.last().unwrap(),
                                    "{flavour} {free:?}: still unwinds"
                                );
                            }
                            Context::X86(c) => {
                                // Frame 1 is ExFreePoolWithTag; its return address (into its
                                // caller, frame 2) is at its entry ESP, P right above it.
                                let stack = rec.stops.last().unwrap();
                                assert_eq!(stack[1].function, "ExFreePoolWithTag");
                                let ra2 = k.entry(
                                    &pdbs,
                                    &format!("{}!{}", stack[2].module, stack[2].function),
                                ) + stack[2].offset;
                                let esp = Arch::X86.canonical_address(c.get(X86Reg::Esp));
                                let slot = (4..0x400u64)
                                    .step_by(4)
                                    .map(|o| esp + o)
                                    .find(|a| {
                                        Arch::X86.canonical_address(u64::from(u32_at(&k.mem, *a)))
                                            == ra2
                                    })
                                    .expect("ExFreePoolWithTag's return address");
                                assert_eq!(
                                    Arch::X86
                                        .canonical_address(u64::from(u32_at(&k.mem, slot + 4))),
                                    rec.address,
                                    "{flavour} {free:?}: P is frame 1's first argument"
                                );
                                let tag = if free == FreeApi::Pool { 0 } else { LEAK };
                                assert_eq!(u32_at(&k.mem, slot + 8), tag);
                            }
                        }
                    }
                    // Step past the kernel's int3, as WinDbg does.
                    ctx.set_pc(stop.pc + 1);
                    k.set_context(stop.cpu, ctx);
                    while w.in_flight() {
                        assert!(w.step(&mut k).unwrap().is_none());
                    }
                }
                assert_eq!(free_stops, 2, "{arch} {flavour} {free:?}");
            }
        }
    }
}

/// Counts special-pool blocks outstanding after each record (frees of special blocks give
/// room back), per boot.
fn outstanding(truth: &[TruthRecord]) -> Vec<u64> {
    let mut n: BTreeMap<u64, u64> = BTreeMap::new();
    truth
        .iter()
        .map(|t| {
            let c = n.entry(t.boot).or_default();
            match (t.kind, t.special_pool) {
                (OpKind::Alloc, true) => *c += 1,
                (OpKind::Free, true) => *c -= 1,
                _ => {}
            }
            *c
        })
        .collect()
}

/// With room for N special-pool blocks and the leak-hunt workload, the special-pool allocator's
/// breakpoint fires while there is room, then stops firing while allocations of the tag go on
/// in normal pool; frees give room back, a reboot empties special pool.
#[test]
fn special_pool_fills_up_and_falls_back_to_normal_pool() {
    const N: u64 = 3;
    for flavour in ["classic", "modern"] {
        let (special_fn, normal_fn) = if flavour == "modern" {
            ("nt!ExAllocateHeapSpecialPool", "nt!RtlpHpAllocateHeap")
        } else {
            ("nt!MmAllocateSpecialPool", "nt!ExpAllocateNormalPool")
        };
        let (mut k, pdbs) = Kernel::boot(Arch::Amd64, flavour);
        k.set_global(&pdbs, "MmSpecialPoolTag", LEAK);
        let mut w = Workload::new(AllocationActivity::leak_hunt_specs(LEAK), pdbs.clone(), 21);
        w.special_pool_blocks = Some(N);
        let bp = k.entry(&pdbs, special_fn);
        k.bps.insert(bp);
        let mut hits = Vec::new(); // truth index of each stop at the special allocator
        for _ in 0..400 {
            if let Some(stop) = w.step(&mut k).unwrap() {
                assert_eq!(stop.pc, bp);
                hits.push(w.truth.len() - 1);
                while w.in_flight() {
                    assert!(w.step(&mut k).unwrap().is_none());
                }
            }
        }
        let truth = w.truth.clone();
        let out = outstanding(&truth);
        assert!(out.iter().all(|n| *n <= N), "{flavour}: never more than N");
        let full_at = out
            .iter()
            .position(|n| *n == N)
            .expect("special pool fills");
        // Every special allocation stopped at the breakpoint, and only those.
        let special: Vec<usize> = (0..truth.len())
            .filter(|i| truth[*i].kind == OpKind::Alloc && truth[*i].special_pool)
            .collect();
        assert_eq!(hits, special, "{flavour}");
        for t in &truth {
            let on_special = t.path.iter().any(|p| p == special_fn);
            assert_eq!(on_special, t.kind == OpKind::Alloc && t.special_pool);
        }
        // Frees give room back: a special allocation after special pool was full.
        assert!(
            special.iter().any(|i| *i > full_at),
            "{flavour}: room given back"
        );
        // Once the leaks hold every block, the breakpoint no longer fires, allocations of
        // the tag go on through normal pool.
        let leaked_full = (0..truth.len())
            .find(|i| {
                let leaks = truth[..=*i]
                    .iter()
                    .filter(|t| {
                        t.special_pool
                            && t.kind == OpKind::Alloc
                            && !truth
                                .iter()
                                .any(|f| f.kind == OpKind::Free && f.address == t.address)
                    })
                    .count() as u64;
                leaks == N
            })
            .expect("the leaks fill special pool");
        let after: Vec<&TruthRecord> = truth[leaked_full + 1..]
            .iter()
            .filter(|t| t.kind == OpKind::Alloc && t.tag == LEAK)
            .collect();
        assert!(after.len() > 20, "{flavour}: allocations of the tag go on");
        assert!(after.iter().all(|t| !t.special_pool));
        assert!(after.iter().all(|t| t.path.iter().any(|p| p == normal_fn)));
        assert!(hits.iter().all(|h| *h <= leaked_full));
        // A reboot empties special pool: the next allocation of the tag goes there again.
        k.boot = 2;
        let before = w.truth.len();
        for _ in 0..20 {
            if w.step(&mut k).unwrap().is_some() {
                while w.in_flight() {
                    assert!(w.step(&mut k).unwrap().is_none());
                }
            }
        }
        assert!(
            w.truth[before..]
                .iter()
                .any(|t| t.kind == OpKind::Alloc && t.special_pool && t.boot == 2),
            "{flavour}: special pool again after the reboot"
        );
    }
}

/// The leak-hunt workload frees most allocations of the tag and leaks exactly the allocations
/// of LeakyAllocPushes and LeakyAllocViaPool2; the noise tag is always freed.
#[test]
fn the_leak_hunt_frees_most_and_leaks_the_known_paths() {
    assert_eq!(
        Scenario::from_name("leak-hunt").unwrap().specs(LEAK),
        AllocationActivity::leak_hunt_specs(LEAK)
    );
    assert_eq!(
        Scenario::from_name("leaky").unwrap().specs(LEAK),
        AllocationActivity::leakydrv_specs(LEAK)
    );
    for arch in [Arch::Amd64, Arch::X86] {
        for flavour in ["classic", "modern"] {
            let (mut k, pdbs) = Kernel::boot(arch, flavour);
            let mut w = Workload::new(AllocationActivity::leak_hunt_specs(LEAK), pdbs, 13);
            for _ in 0..300 {
                assert!(w.step(&mut k).unwrap().is_none());
            }
            let truth = &w.truth;
            let freed: BTreeSet<u64> = truth
                .iter()
                .filter(|t| t.kind == OpKind::Free)
                .map(|t| t.address)
                .collect();
            let allocs: Vec<&TruthRecord> =
                truth.iter().filter(|t| t.kind == OpKind::Alloc).collect();
            let leaked: Vec<&TruthRecord> = allocs
                .iter()
                .copied()
                .filter(|t| !freed.contains(&t.address))
                .collect();
            let leak_paths: BTreeSet<&str> = leaked.iter().map(|t| t.path[3].as_str()).collect();
            assert_eq!(
                leak_paths,
                BTreeSet::from(["leakydrv!LeakyAllocPushes", "leakydrv!LeakyAllocViaPool2"]),
                "{arch} {flavour}"
            );
            assert!(leaked.iter().all(|t| t.tag == LEAK));
            // Every allocation of the other paths is freed, by a free of the same driver
            // function through the free API.
            for a in allocs.iter().filter(|t| !leaked.contains(t)) {
                let f = truth
                    .iter()
                    .find(|f| f.kind == OpKind::Free && f.address == a.address)
                    .unwrap();
                assert_eq!(f.path[3], a.path[3]);
                assert!(f.path[4] == "nt!ExFreePoolWithTag" || f.path[4] == "nt!ExFreePool");
            }
            let of_tag = allocs.iter().filter(|t| t.tag == LEAK).count();
            let leaked_n = leaked.len();
            assert!(
                leaked_n * 3 < of_tag,
                "{arch} {flavour}: most of the tag is freed ({leaked_n} of {of_tag} leak)"
            );
            assert!(leaked_n > 0);
            assert!(allocs.iter().any(|t| t.tag == NOIS));
        }
    }
}
