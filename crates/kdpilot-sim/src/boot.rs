//! Building a kernel: images mapped at KASLR bases (a new draw every boot), relocated and
//! linked; PsLoadedModuleList; KDDEBUGGER_DATA64 and its list head; KPCR/KPRCB, threads and
//! stacks for every processor; packet ids back to INITIAL|SYNC (done by the link at boot).
//! What a boot reports to the debugger (KdInitSystem's LoadSymbols, KdBreakAfterSymbolLoad)
//! is driven by `target.rs`.
//!
//! Structures in target memory are laid out from the sheet's offsets (kd-protocol.md 2.3) by
//! the simulator itself.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use kdpilot_kd::context::{flags, Amd64Reg, Context, X86Reg};
use kdpilot_kd::Arch;

use crate::kernel::{
    Cpu, Layout, Machine, Phase, Thread, AMD64_SPECIAL_SIZE, BREAKPOINT_MAX, DR6_IDLE, KDBG_SIZE,
    X86_SPECIAL_SIZE,
};
use crate::loader::{load_image, ImageSource, LoadError, LoadedImage};
use crate::memory::{Memory, Pool, PAGE_SIZE};
use crate::modules::{write_module_list, write_ptr};
use crate::pe_builder::{PeBuilder, SCN_CODE, SCN_DATA};

/// What a machine is made of; kept across reboots (each boot draws new bases).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MachineConfig {
    /// Architecture.
    pub arch: Arch,
    /// Build number GetVersion reports.
    pub build: u16,
    /// Processors.
    pub processors: u32,
    /// Seed of the KASLR generator.
    pub seed: u64,
    /// Images in load order: the kernel, hal.dll, then drivers. Empty: the built-in synthetic
    /// kernel and hal (no code beyond a break instruction and a few stubs).
    pub images: Vec<ImageSource>,
    /// Kernel symbols that are not exports, as RVAs in the kernel image (from its PDB):
    /// `PoolHitTag`, `MmSpecialPoolTag`, `RtlpBreakWithStatusInstruction`,
    /// `KdDebuggerDataBlock`, `PsLoadedModuleList`, `KiInitialThread`, `KiIdleLoop`...
    /// Where neither a symbol nor an export exists the simulator places the structure in its
    /// own pool.
    pub kernel_symbols: BTreeMap<String, u32>,
    /// The kernel base of the first boot (None: drawn like every later one).
    pub first_kernel_base: Option<u64>,
    /// The registry's `PoolTag` (special pool for this tag), written into
    /// nt!MmSpecialPoolTag at every boot; 0: special pool off.
    pub special_pool_tag: u32,
}

impl MachineConfig {
    /// A machine of the built-in synthetic images.
    pub fn synthetic(arch: Arch, build: u16, processors: u32, seed: u64) -> Self {
        Self {
            arch,
            build,
            processors,
            seed,
            images: Vec::new(),
            kernel_symbols: BTreeMap::new(),
            first_kernel_base: None,
            special_pool_tag: 0,
        }
    }

    /// A machine of the image files in `dir`: `ntoskrnl.exe`, `hal.dll`, then every `*.sys`
    /// in name order (the fixtures' layout: `fixtures/out/<arch>/<flavour>/`).
    pub fn from_dir(
        arch: Arch,
        build: u16,
        processors: u32,
        seed: u64,
        dir: &Path,
    ) -> std::io::Result<Self> {
        let read = |name: &str| -> std::io::Result<Arc<[u8]>> {
            Ok(std::fs::read(dir.join(name))?.into())
        };
        let mut images = vec![
            ImageSource::system("ntoskrnl.exe", read("ntoskrnl.exe")?),
            ImageSource::system("hal.dll", read("hal.dll")?),
        ];
        let mut drivers: Vec<String> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.to_ascii_lowercase().ends_with(".sys"))
            .collect();
        drivers.sort();
        for d in drivers {
            let file = read(&d)?;
            images.push(ImageSource::driver(&d, file));
        }
        let mut config = Self {
            images,
            ..Self::synthetic(arch, build, processors, seed)
        };
        for pdb in ["ntkrnlmp.pdb", "ntkrpamp.pdb", "ntoskrnl.pdb"] {
            if let Ok(bytes) = std::fs::read(dir.join(pdb)) {
                config.add_kernel_symbols_from_pdb(&bytes);
                break;
            }
        }
        Ok(config)
    }

    /// Takes the kernel symbols the simulator uses (PoolHitTag, MmSpecialPoolTag,
    /// KiBugCheckData, KiIdleLoop, RtlpBreakWithStatusInstruction, ...) from the kernel's PDB,
    /// where it has them. Returns how many were found; an unreadable PDB adds none.
    pub fn add_kernel_symbols_from_pdb(&mut self, pdb: &[u8]) -> usize {
        let Ok(map) = crate::pdbmap::PdbMap::parse(pdb) else {
            return 0;
        };
        let mut n = 0;
        for name in KERNEL_SYMBOLS {
            let rva = map
                .data
                .get(*name)
                .copied()
                .or_else(|| map.function(name).map(|(rva, _)| rva));
            if let Some(rva) = rva {
                self.kernel_symbols.entry(name.to_string()).or_insert(rva);
                n += 1;
            }
        }
        n
    }
}

/// Kernel symbols the simulator places its structures at (or reads) when the kernel has them.
pub const KERNEL_SYMBOLS: &[&str] = &[
    "KdDebuggerDataBlock",
    "KdpDebuggerDataListHead",
    "PsLoadedModuleList",
    "PsActiveProcessHead",
    "KdDebuggerNotPresent",
    "PoolHitTag",
    "MmSpecialPoolTag",
    "KiProcessorBlock",
    "KiBugCheckData",
    "KiInitialThread",
    "KiIdleLoop",
    "RtlpBreakWithStatusInstruction",
];

/// A small deterministic generator (xorshift64*) for KASLR draws.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rng(u64);

impl Rng {
    /// Seeded.
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// Next value.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A value below `n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// Bases for one boot.
struct Bases {
    images: Vec<u64>,
    pool: u64,
}

/// Pool size reserved per boot.
const POOL_SIZE: u64 = 0x100_0000;
/// Kernel stacks: KERNEL_STACK_SIZE.
fn stack_size(arch: Arch) -> u64 {
    match arch {
        Arch::Amd64 => 0x6000,
        Arch::X86 => 0x3000,
    }
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

/// Draws this boot's bases: the kernel 2 MiB aligned at 0xfffff800_00000000 + up to 32 GiB
/// (x86: 0x80400000 + up to 32 MiB, 128 KiB aligned), hal right after it with a gap, drivers
/// 64 KiB aligned in a separate range (x64 0xfffff808_.., x86 0x8c000000..), the pool in
/// nonpaged-pool space (x64 0xffffc000_.., x86 0x84000000..0x88000000).
fn draw_bases(arch: Arch, rng: &mut Rng, sizes: &[u32], first_kernel: Option<u64>) -> Bases {
    let size = |i: usize| u64::from(sizes.get(i).copied().unwrap_or(0x1000));
    let (kernel, driver_start, pool) = match arch {
        Arch::Amd64 => (
            0xffff_f800_0000_0000 + rng.below(0x4000) * 0x20_0000,
            0xffff_f808_0000_0000 + rng.below(0x4000) * 0x10_0000,
            0xffff_c000_0000_0000 + rng.below(0x1_0000) * 0x1000_0000,
        ),
        Arch::X86 => (
            0x8040_0000 + rng.below(0x100) * 0x2_0000,
            0x8c00_0000 + rng.below(0x100) * 0x10_0000,
            0x8400_0000 + rng.below(0x4) * 0x100_0000,
        ),
    };
    let kernel = first_kernel.map_or(kernel, |k| arch.canonical_address(k) & !(PAGE_SIZE - 1));
    let mut images = vec![kernel];
    if !sizes.is_empty() {
        // hal.dll follows the kernel (as on real x64 Windows 10), a few pages apart.
        let hal = align_up(kernel + size(0), 0x1_0000) + rng.below(16) * 0x1_0000;
        images.push(hal);
        let mut next = driver_start;
        for i in 2..sizes.len() {
            images.push(next);
            next = align_up(next + size(i), 0x1_0000) + rng.below(16) * 0x1_0000;
        }
    }
    // No two images overlap, whatever the draw (a late kernel slot, a given first base).
    for i in 1..images.len() {
        while let Some(end) = (0..i)
            .filter(|&j| images[i] < images[j] + size(j) && images[j] < images[i] + size(i))
            .map(|j| images[j] + size(j))
            .max()
        {
            images[i] = align_up(end, 0x1_0000);
        }
    }
    Bases {
        images: images
            .into_iter()
            .map(|b| arch.canonical_address(b))
            .collect(),
        pool: arch.canonical_address(pool),
    }
}

/// The synthetic kernel's code, at RVA 0x1000: offsets of its functions.
mod synth {
    /// RtlpBreakWithStatusInstruction: int3; ret.
    pub const BREAK: u32 = 0x1000;
    /// DbgBreakPointWithStatus: int3; ret (the stub itself breaks).
    pub const DBG_BREAK: u32 = 0x1010;
    /// KiIdleLoop: pause; jmp KiIdleLoop.
    pub const IDLE: u32 = 0x1020;
    /// A function with a frame, a call and a return, for stepping.
    pub const STEP_SAMPLE: u32 = 0x1030;
    /// Its callee.
    pub const LEAF: u32 = 0x1060;
    /// Stubs: xor eax,eax; ret (ExAllocatePoolWithTag, ExFreePoolWithTag, DbgPrint).
    pub const STUB: u32 = 0x1070;
    /// KeBugCheckEx: int3; ret.
    pub const BUGCHECK: u32 = 0x1080;
    /// .data RVA.
    pub const DATA: u32 = 0x20000;
    /// KdDebuggerDataBlock.
    pub const KDBG: u32 = 0x20000;
    /// KdpDebuggerDataListHead.
    pub const DATA_LIST: u32 = 0x21000;
    /// PsLoadedModuleList.
    pub const MODULE_LIST: u32 = 0x21100;
    /// KdDebuggerNotPresent.
    pub const NOT_PRESENT: u32 = 0x21200;
    /// PoolHitTag.
    pub const POOL_HIT_TAG: u32 = 0x21210;
    /// MmSpecialPoolTag.
    pub const SPECIAL_POOL_TAG: u32 = 0x21214;
    /// KiInitialThread.
    pub const INITIAL_THREAD: u32 = 0x30000;
}

/// The built-in ntoskrnl.exe: `.text` with the break instruction, an idle loop and a
/// stepping sample, `.data` (0x20000 bytes at RVA 0x20000) holding KDBG and friends, exports
/// for everything the simulator looks up.
pub fn synthetic_kernel(arch: Arch) -> Vec<u8> {
    let base = match arch {
        Arch::Amd64 => 0x1_4000_0000,
        Arch::X86 => 0x40_0000,
    };
    let mut b = PeBuilder::new(arch, "ntoskrnl.exe", base);
    let mut text = vec![0xCCu8; 0x100];
    let mut put = |rva: u32, bytes: &[u8]| {
        let at = (rva - synth::BREAK) as usize;
        text[at..at + bytes.len()].copy_from_slice(bytes);
    };
    put(synth::BREAK, &[0xCC, 0xC3]);
    put(synth::DBG_BREAK, &[0xCC, 0xC3]);
    put(synth::IDLE, &[0xF3, 0x90, 0xEB, 0xFC]);
    // call rel32 from STEP_SAMPLE+off to LEAF.
    let call_at = synth::STEP_SAMPLE
        + match arch {
            Arch::Amd64 => 8,
            Arch::X86 => 6,
        };
    let rel = (synth::LEAF as i64 - (call_at as i64 + 5)) as i32;
    let mut sample = match arch {
        // push rbp; mov rbp,rsp; sub rsp,0x20
        Arch::Amd64 => vec![0x55, 0x48, 0x89, 0xE5, 0x48, 0x83, 0xEC, 0x20],
        // push ebp; mov ebp,esp; sub esp,0x20
        Arch::X86 => vec![0x55, 0x89, 0xE5, 0x83, 0xEC, 0x20],
    };
    sample.push(0xE8);
    sample.extend_from_slice(&rel.to_le_bytes());
    match arch {
        // add rsp,0x20; pop rbp; ret
        Arch::Amd64 => sample.extend_from_slice(&[0x48, 0x83, 0xC4, 0x20, 0x5D, 0xC3]),
        // add esp,0x20; pop ebp; ret
        Arch::X86 => sample.extend_from_slice(&[0x83, 0xC4, 0x20, 0x5D, 0xC3]),
    }
    put(synth::STEP_SAMPLE, &sample);
    put(synth::LEAF, &[0x31, 0xC0, 0xC3]);
    put(synth::STUB, &[0x31, 0xC0, 0xC3]);
    put(synth::BUGCHECK, &[0xCC, 0xC3]);
    let text_rva = b.section(".text", text, 0x100, SCN_CODE);
    debug_assert_eq!(text_rva, synth::BREAK);
    b.section_at(".data", synth::DATA, Vec::new(), 0x20000, SCN_DATA);
    for (name, rva) in [
        ("RtlpBreakWithStatusInstruction", synth::BREAK),
        ("DbgBreakPointWithStatus", synth::DBG_BREAK),
        ("KiIdleLoop", synth::IDLE),
        ("SimStepSample", synth::STEP_SAMPLE),
        ("SimStepLeaf", synth::LEAF),
        ("ExAllocatePoolWithTag", synth::STUB),
        ("ExFreePoolWithTag", synth::STUB),
        ("DbgPrint", synth::STUB),
        ("KeBugCheckEx", synth::BUGCHECK),
        ("KdDebuggerDataBlock", synth::KDBG),
        ("KdpDebuggerDataListHead", synth::DATA_LIST),
        ("PsLoadedModuleList", synth::MODULE_LIST),
        ("KdDebuggerNotPresent", synth::NOT_PRESENT),
        ("PoolHitTag", synth::POOL_HIT_TAG),
        ("MmSpecialPoolTag", synth::SPECIAL_POOL_TAG),
        ("KiInitialThread", synth::INITIAL_THREAD),
    ] {
        b.export(name, rva);
    }
    b.entry(synth::IDLE);
    b.build().file
}

/// The built-in hal.dll: HalProcessorIdle and HalReturnToFirmware.
pub fn synthetic_hal(arch: Arch) -> Vec<u8> {
    let base = match arch {
        Arch::Amd64 => 0x1_8000_0000,
        Arch::X86 => 0x1_0000_0000 - 0x1000_0000,
    };
    let mut b = PeBuilder::new(arch, "hal.dll", base);
    // sti; hlt; ret / int3; ret
    let mut text = vec![0xFB, 0xF4, 0xC3];
    text.resize(0x10, 0xCC);
    text.extend_from_slice(&[0xCC, 0xC3]);
    let rva = b.section(".text", text, 0, SCN_CODE);
    b.export("HalProcessorIdle", rva);
    b.export("HalReturnToFirmware", rva + 0x10);
    b.build().file
}

fn first_cc(memory: &Memory, start: u64, len: usize) -> Option<u64> {
    memory
        .read(start, len)
        .iter()
        .position(|&b| b == 0xCC)
        .map(|i| start + i as u64)
}

impl Machine {
    /// A machine with the built-in synthetic kernel and hal at `kern_base` (later boots draw
    /// their own bases), running. KDDEBUGGER_DATA64 is at kern_base + 0x20000, as before.
    pub fn new(arch: Arch, build: u16, processors: u32, kern_base: u64) -> Self {
        let mut config = MachineConfig::synthetic(arch, build, processors, kern_base);
        config.first_kernel_base = Some(kern_base);
        match Self::boot(config) {
            Ok(m) => m,
            // The synthetic images are built above and always load; this is unreachable
            // unless the builder and loader disagree, which their tests catch.
            Err(e) => unreachable!("the built-in kernel failed to load: {e}"),
        }
    }

    /// Boots a machine from `config`: images at KASLR bases drawn from the seed, relocated
    /// and linked, module list, KDBG, processors. The machine starts running; a caller that
    /// wants the boot notifications serves it with `TargetOptions::boot`.
    pub fn boot(config: MachineConfig) -> Result<Self, LoadError> {
        let mut m = Machine {
            arch: config.arch,
            build: config.build,
            processors: config.processors.max(1),
            memory: Memory::new(),
            layout: Layout::default(),
            images: Vec::new(),
            module_entries: Vec::new(),
            breakpoints: [None; BREAKPOINT_MAX],
            cpus: Vec::new(),
            context_sent: false,
            running: true,
            stops: 0,
            boots: 0,
            debugger_not_present: false,
            phase: Phase::Running,
            chatter_log: Default::default(),
            pool: Pool::new(0, 0),
            rng: Rng::new(config.seed),
            config,
            requests: VecDeque::new(),
            faults_fired: BTreeSet::new(),
            booted_at: Instant::now(),
            started: false,
            break_after_symbols_polled: false,
        };
        m.build_kernel(true)?;
        Ok(m)
    }

    /// A new kernel in place of the old one: memory cleared, new bases for every image, an
    /// empty breakpoint table, fresh processors; the machine runs (the caller reports the
    /// boot). On failure the machine is left as it was.
    pub fn reboot(&mut self) -> Result<(), LoadError> {
        let saved = self.clone();
        self.memory.clear();
        self.breakpoints = [None; BREAKPOINT_MAX];
        self.requests.clear();
        self.faults_fired.clear();
        self.booted_at = Instant::now();
        self.debugger_not_present = false;
        self.break_after_symbols_polled = false;
        self.context_sent = false;
        self.running = true;
        self.phase = Phase::Running;
        if let Err(e) = self.build_kernel(false) {
            *self = saved;
            return Err(e);
        }
        Ok(())
    }

    fn build_kernel(&mut self, first: bool) -> Result<(), LoadError> {
        let arch = self.arch;
        let sources: Vec<ImageSource> = if self.config.images.is_empty() {
            vec![
                ImageSource::system("ntoskrnl.exe", synthetic_kernel(arch)),
                ImageSource::system("hal.dll", synthetic_hal(arch)),
            ]
        } else {
            self.config.images.clone()
        };
        let sizes: Vec<u32> = sources.iter().map(|s| image_size(&s.file)).collect();
        let first_base = if first {
            self.config.first_kernel_base
        } else {
            None
        };
        let bases = draw_bases(arch, &mut self.rng, &sizes, first_base);
        let mut memory = Memory::new();
        let mut images: Vec<LoadedImage> = Vec::new();
        for (src, &base) in sources.iter().zip(&bases.images) {
            let img = load_image(&mut memory, arch, src, base, &images)?;
            images.push(img);
        }
        self.memory = memory;
        self.images = images;
        self.boots += 1;
        self.pool = Pool::new(bases.pool, POOL_SIZE);
        self.layout = Layout {
            pool: (bases.pool, bases.pool + POOL_SIZE),
            ..Layout::default()
        };
        self.build_structures();
        Ok(())
    }

    /// A kernel data structure: at its symbol if the kernel has one, else in the pool.
    fn place(&mut self, symbol: &str, len: u64) -> u64 {
        match self.kernel_symbol(symbol) {
            Some(a) if self.memory.is_range_mapped(a, len) => a,
            _ => self.allocate(len),
        }
    }

    fn build_structures(&mut self) {
        let arch = self.arch;
        let p = arch.pointer_size() as u64;
        let kern_base = self.images.first().map_or(0, |k| k.base);
        self.layout.kern_base = kern_base;
        self.layout.kdbg = self.place("KdDebuggerDataBlock", u64::from(KDBG_SIZE));
        self.layout.debugger_data_list = self.place("KdpDebuggerDataListHead", 2 * p);
        self.layout.ps_loaded_module_list = self.place("PsLoadedModuleList", 2 * p);
        self.layout.kd_debugger_not_present = self.place("KdDebuggerNotPresent", 1);
        self.layout.mm_special_pool_tag = self.place("MmSpecialPoolTag", 4);
        let tag = self.config.special_pool_tag;
        self.memory
            .write(self.layout.mm_special_pool_tag, &tag.to_le_bytes());
        self.layout.pool_hit_tag = self.kernel_symbol("PoolHitTag");
        self.layout.ki_processor_block =
            self.place("KiProcessorBlock", p * u64::from(self.processors));
        self.layout.ki_bugcheck_data = self.place("KiBugCheckData", 5 * p);
        self.layout.break_instruction = self.find_break_instruction();
        self.layout.idle_loop = self
            .kernel_symbol("KiIdleLoop")
            .or_else(|| {
                self.image("hal.dll")
                    .and_then(|h| h.export("HalProcessorIdle"))
            })
            .unwrap_or(self.layout.break_instruction + 1);

        // PsLoadedModuleList (modules.rs), in load order.
        let head = self.layout.ps_loaded_module_list;
        let images = self.images.clone();
        self.module_entries =
            write_module_list(&mut self.memory, &mut self.pool, arch, head, &images);

        // PsActiveProcessHead: an empty list (no processes are modelled).
        let procs = self.place("PsActiveProcessHead", 2 * p);
        write_ptr(&mut self.memory, arch, procs, procs);
        write_ptr(&mut self.memory, arch, procs + p, procs);
        let build_lab = format!(
            "{}.1.{}fre.sim_release.000000-0000",
            self.build,
            match arch {
                Arch::Amd64 => "amd64",
                Arch::X86 => "x86",
            }
        );
        let lab = self.allocate(build_lab.len() as u64 + 1);
        self.memory.write(lab, build_lab.as_bytes());

        self.build_cpus();
        self.write_kdbg(procs, lab);
    }

    /// RtlpBreakWithStatusInstruction, or the first int3 of DbgBreakPointWithStatus /
    /// DbgBreakPoint, or an int3 of the kernel's padding after a `ret`, or a stub in the pool.
    fn find_break_instruction(&mut self) -> u64 {
        if let Some(a) = self.kernel_symbol("RtlpBreakWithStatusInstruction") {
            if self.memory.read(a, 1) == [0xCC] {
                return a;
            }
        }
        for f in ["DbgBreakPointWithStatus", "DbgBreakPoint"] {
            if let Some(a) = self
                .kernel_symbol(f)
                .and_then(|a| first_cc(&self.memory, a, 32))
            {
                return a;
            }
        }
        if let Some(k) = self.kernel().cloned() {
            for s in k.sections.iter().filter(|s| s.characteristics & 0x20 != 0) {
                let bytes = self.memory.read(k.base + u64::from(s.rva), s.size as usize);
                if let Some(i) = bytes.windows(2).position(|w| w == [0xC3, 0xCC]) {
                    return k.base + u64::from(s.rva) + i as u64 + 1;
                }
            }
        }
        let stub = self.allocate(16);
        self.memory.write(stub, &[0xCC, 0xC3]);
        stub
    }

    fn build_cpus(&mut self) {
        let arch = self.arch;
        let p = arch.pointer_size() as u64;
        let initial_thread = self.kernel_symbol("KiInitialThread");
        let (pcr_size, prcb_size) = match arch {
            Arch::Amd64 => (0x180u64, 0x600u64),
            Arch::X86 => (0x120, 0x340),
        };
        self.cpus.clear();
        for n in 0..self.processors {
            let kpcr = self
                .pool
                .alloc_aligned(&mut self.memory, pcr_size + prcb_size, PAGE_SIZE);
            let kprcb = kpcr + pcr_size;
            let t = match (n, initial_thread) {
                (0, Some(th)) if self.memory.is_range_mapped(th, 0x400) => {
                    let (base, limit) = self.new_stack();
                    fill_thread(self, th, base, limit);
                    Thread {
                        kthread: th,
                        stack_base: base,
                        stack_limit: limit,
                    }
                }
                _ => create_thread(self),
            };
            // KPCR: Self/SelfPcr and CurrentPrcb/Prcb; KPRCB: CurrentThread, IdleThread, Number.
            let (self_off, prcb_off, cur, idle, number) = match arch {
                Arch::Amd64 => (0x18, 0x20, 0x8, 0x18, 0x24),
                Arch::X86 => (0x1C, 0x20, 0x4, 0xC, 0x10),
            };
            write_ptr(&mut self.memory, arch, kpcr + self_off, kpcr);
            write_ptr(&mut self.memory, arch, kpcr + prcb_off, kprcb);
            write_ptr(&mut self.memory, arch, kprcb + cur, t.kthread);
            write_ptr(&mut self.memory, arch, kprcb + idle, t.kthread);
            self.memory.write_u16(kprcb + number, n as u16);
            write_ptr(
                &mut self.memory,
                arch,
                self.layout.ki_processor_block + p * u64::from(n),
                kprcb,
            );
            let pc = if n == 0 {
                self.layout.break_instruction
            } else {
                self.layout.idle_loop
            };
            let context = initial_context(arch, pc, t.stack_base - 0x38);
            self.cpus.push(Cpu {
                context,
                special: initial_special(arch, kpcr),
                kpcr,
                kprcb,
                thread: t.kthread,
                idle_thread: t.kthread,
                stack_top: t.stack_base,
            });
        }
        self.layout.thread = self.cpus.first().map_or(0, |c| c.thread);
    }

    fn new_stack(&mut self) -> (u64, u64) {
        let size = stack_size(self.arch);
        let limit = self.pool.alloc_aligned(&mut self.memory, size, PAGE_SIZE);
        (limit + size, limit)
    }

    /// KDDEBUGGER_DATA64: header (List, OwnerTag 'KDBG', Size), then the fields a debugger
    /// reads (offsets: kd-protocol.md 2.3 and R2). Pointer fields are 64-bit even on x86
    /// (sign-extended). KdpDebuggerDataListHead is a one-entry circular list.
    fn write_kdbg(&mut self, procs: u64, build_lab: u64) {
        let arch = self.arch;
        let k = self.layout.kdbg;
        let l = self.layout.clone();
        let m = &mut self.memory;
        m.write(k, &vec![0u8; KDBG_SIZE as usize]);
        m.write_u64(k, l.debugger_data_list);
        m.write_u64(k + 8, l.debugger_data_list);
        m.write_u32(k + 0x10, 0x4742_444B);
        m.write_u32(k + 0x14, KDBG_SIZE);
        m.write_u64(k + 0x18, l.kern_base);
        m.write_u64(k + 0x20, l.break_instruction);
        m.write_u16(k + 0x36, u16::from(arch == Arch::X86)); // PaeEnabled
        m.write_u64(k + 0x48, l.ps_loaded_module_list);
        m.write_u64(k + 0x50, procs);
        m.write_u64(k + 0x88, l.ki_bugcheck_data);
        // MmPageSize holds the value itself (R4 kddata.c: PAGE_SIZE).
        m.write_u64(k + 0x138, PAGE_SIZE);
        let (highest_user, system_start) = match arch {
            Arch::Amd64 => (0x7FFF_FFFE_FFFF, 0xFFFF_8000_0000_0000),
            Arch::X86 => (0x7FFE_FFFF, arch.canonical_address(0x8000_0000)),
        };
        m.write_u64(k + 0x1C8, highest_user);
        m.write_u64(k + 0x1D0, system_start);
        m.write_u64(k + 0x208, build_lab);
        m.write_u64(k + 0x218, l.ki_processor_block);
        m.write_u64(k + 0x238, l.mm_special_pool_tag);
        // Offsets the simulator's KTHREAD/KPCR/KPRCB follow.
        let offsets: &[(u64, u16)] = match arch {
            Arch::Amd64 => &[
                (0x29C, 0x58),  // OffsetKThreadKernelStack
                (0x29E, 0x28),  // OffsetKThreadInitialStack
                (0x2B0, 0x600), // SizePrcb
                (0x2B4, 0x8),   // OffsetPrcbCurrentThread
                (0x2BC, 0x120), // OffsetPrcbProcStateContext
                (0x2BE, 0x24),  // OffsetPrcbNumber
                (0x2E0, 0x780), // SizePcr
                (0x2E2, 0x18),  // OffsetPcrSelfPcr
                (0x2E4, 0x20),  // OffsetPcrCurrentPrcb
                (0x2E6, 0x180), // OffsetPcrContainedPrcb
                (0x2F2, 0x40),  // OffsetPrcbProcStateSpecialReg
                (0x2F4, 0x10),  // GdtR0Code
                (0x2F6, 0x18),  // GdtR0Data
                (0x2FA, 0x33),  // GdtR3Code
                (0x2FC, 0x2B),  // GdtR3Data
                (0x302, 0x40),  // GdtTss
            ],
            Arch::X86 => &[
                (0x29C, 0x30),
                (0x29E, 0x18),
                (0x2B0, 0x340),
                (0x2B4, 0x4),
                (0x2BC, 0x18),
                (0x2BE, 0x10),
                (0x2E0, 0x460),
                (0x2E2, 0x1C),
                (0x2E4, 0x20),
                (0x2E6, 0x120),
                (0x2F2, 0x18 + 0x2CC),
                (0x2F4, 0x08),
                (0x2F6, 0x10),
                (0x2F8, 0x30),
                (0x2FA, 0x1B),
                (0x2FC, 0x23),
                (0x302, 0x28),
            ],
        };
        for &(off, v) in offsets {
            m.write_u16(k + off, v);
        }
        let head = self.ptr_bytes(k);
        self.memory.write(l.debugger_data_list, &head);
        self.memory
            .write(l.debugger_data_list + arch.pointer_size() as u64, &head);
    }
}

fn image_size(file: &[u8]) -> u32 {
    // SizeOfImage for placement only; the loader validates it properly.
    let lfanew = file
        .get(0x3C..0x40)
        .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])) as usize;
    file.get(lfanew + 24 + 56..lfanew + 24 + 60)
        .map_or(0x1000, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .clamp(0x1000, crate::loader::MAX_IMAGE_SIZE)
}

/// KTHREAD stack fields at the offsets KDBG advertises (x64 InitialStack 0x28, StackLimit
/// 0x30, StackBase 0x38, KernelStack 0x58; x86 InitialStack 0x18, StackLimit 0x1C,
/// KernelStack 0x30).
fn fill_thread(m: &mut Machine, kthread: u64, base: u64, limit: u64) {
    let arch = m.arch;
    let fields: &[(u64, u64)] = match arch {
        Arch::Amd64 => &[
            (0x28, base),
            (0x30, limit),
            (0x38, base),
            (0x58, base - 0x38),
        ],
        Arch::X86 => &[(0x18, base), (0x1C, limit), (0x30, base - 0x38)],
    };
    for &(off, v) in fields {
        write_ptr(&mut m.memory, arch, kthread + off, v);
    }
}

/// A KTHREAD (0x800 bytes, as large as an ETHREAD) and a kernel stack from the pool.
pub(crate) fn create_thread(m: &mut Machine) -> Thread {
    let kthread = m.allocate(0x800);
    let (base, limit) = m.new_stack();
    fill_thread(m, kthread, base, limit);
    Thread {
        kthread,
        stack_base: base,
        stack_limit: limit,
    }
}

fn initial_context(arch: Arch, pc: u64, sp: u64) -> Context {
    let mut c = Context::zeroed(arch);
    match &mut c {
        Context::Amd64(x) => {
            x.set(
                Amd64Reg::ContextFlags,
                u64::from(flags::AMD64 | flags::CONTROL | flags::INTEGER | flags::SEGMENTS),
            );
            x.set(Amd64Reg::MxCsr, 0x1F80);
            x.set(Amd64Reg::SegCs, 0x10);
            x.set(Amd64Reg::SegDs, 0x2B);
            x.set(Amd64Reg::SegEs, 0x2B);
            x.set(Amd64Reg::SegFs, 0x53);
            x.set(Amd64Reg::SegGs, 0x2B);
            x.set(Amd64Reg::SegSs, 0x18);
            x.set(Amd64Reg::EFlags, 0x86);
        }
        Context::X86(x) => {
            x.set(
                X86Reg::ContextFlags,
                u64::from(flags::I386 | flags::CONTROL | flags::INTEGER | flags::SEGMENTS),
            );
            x.set(X86Reg::SegCs, 0x8);
            x.set(X86Reg::SegDs, 0x23);
            x.set(X86Reg::SegEs, 0x23);
            x.set(X86Reg::SegFs, 0x30);
            x.set(X86Reg::SegGs, 0);
            x.set(X86Reg::SegSs, 0x10);
            x.set(X86Reg::EFlags, 0x246);
        }
    }
    c.set_pc(pc);
    c.set_sp(sp);
    c
}

/// KSPECIAL_REGISTERS at reset: Cr0/Cr3/Cr4 of a paging kernel, KernelDr6 idle, KernelDr7
/// 0x400 (reserved bit 10 set, nothing enabled), MxCsr, GS base = KPCR on x64.
fn initial_special(arch: Arch, kpcr: u64) -> Vec<u8> {
    let mut s = match arch {
        Arch::Amd64 => vec![0u8; AMD64_SPECIAL_SIZE],
        Arch::X86 => vec![0u8; X86_SPECIAL_SIZE],
    };
    let mut put = |at: usize, v: &[u8]| s[at..at + v.len()].copy_from_slice(v);
    match arch {
        Arch::Amd64 => {
            put(0x00, &0x8005_0033u64.to_le_bytes()); // Cr0
            put(0x10, &0x001A_D000u64.to_le_bytes()); // Cr3
            put(0x18, &0x0015_06F8u64.to_le_bytes()); // Cr4
            put(0x40, &DR6_IDLE.to_le_bytes()); // KernelDr6
            put(0x48, &0x400u64.to_le_bytes()); // KernelDr7
            put(0x56, &0x57u16.to_le_bytes()); // Gdtr.Limit
            put(0x66, &0xFFFu16.to_le_bytes()); // Idtr.Limit
            put(0x70, &0x40u16.to_le_bytes()); // Tr
            put(0x74, &0x1F80u32.to_le_bytes()); // MxCsr
            put(0xA8, &kpcr.to_le_bytes()); // MsrGsBase
            put(0xD8, &7u64.to_le_bytes()); // Xcr0
        }
        Arch::X86 => {
            put(0x00, &0x8001_003Bu32.to_le_bytes());
            put(0x08, &0x0018_5000u32.to_le_bytes());
            put(0x0C, &0x0000_06F9u32.to_le_bytes());
            put(0x20, &(DR6_IDLE as u32).to_le_bytes());
            put(0x24, &0x400u32.to_le_bytes());
            put(0x2A, &0x3FFu16.to_le_bytes());
            put(0x32, &0x7FFu16.to_le_bytes());
            put(0x38, &0x28u16.to_le_bytes());
        }
    }
    s
}

/// KiSaveProcessorControlState's visible result: every KPRCB gets its CPU's current thread and
/// a copy of KPROCESSOR_STATE (x64: KSPECIAL_REGISTERS @0x40, CONTEXT @0x120; x86: CONTEXT
/// @0x18, KSPECIAL_REGISTERS @0x2E4), as KDBG's OffsetPrcbProcState* say.
pub(crate) fn save_processor_state(m: &mut Machine) {
    let arch = m.arch;
    for i in 0..m.cpus.len() {
        let c = m.cpus[i].clone();
        let (cur, special_at, context_at) = match arch {
            Arch::Amd64 => (0x8, 0x40, 0x120),
            Arch::X86 => (0x4, 0x18 + 0x2CC, 0x18),
        };
        write_ptr(&mut m.memory, arch, c.kprcb + cur, c.thread);
        m.memory.write(c.kprcb + special_at, &c.special);
        m.memory.write(c.kprcb + context_at, c.context.as_bytes());
    }
    let nb = u8::from(m.debugger_not_present);
    m.memory.write(m.layout.kd_debugger_not_present, &[nb]);
}
