//! Shared helpers: fixture files, mapping images into mock memory, a runtime.

use std::path::PathBuf;
use std::sync::Arc;

use kdpilot_symbols::{Arch, MockMemory, Module, ModuleSet, ModuleSymbols, PeFile};

/// `fixtures/out/<arch>/<flavour>/<file>`.
pub fn fixture(arch: &str, flavour: &str, file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/out")
        .join(arch)
        .join(flavour)
        .join(file)
}

/// The bytes of a fixture file.
pub fn fixture_bytes(arch: &str, flavour: &str, file: &str) -> Vec<u8> {
    let p = fixture(arch, flavour, file);
    std::fs::read(&p).unwrap_or_else(|e| panic!("fixture {} missing: {e}", p.display()))
}

/// A current-thread runtime for one test.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

/// Maps an image file into memory at `base` the way the loader does: headers, then each
/// section's raw data at its RVA (no relocations: the unwinders never execute code).
pub fn map_image(mem: &mut MockMemory, base: u64, file: &[u8]) -> PeFile {
    let pe = PeFile::parse(file.to_vec()).expect("fixture parses");
    let h = pe.headers().clone();
    mem.map_zeroed(base, u64::from(h.size_of_image));
    mem.write(base, &file[..h.size_of_headers as usize]);
    for s in &h.sections {
        let raw = &file[s.raw_offset as usize..(s.raw_offset + s.raw_size) as usize];
        let n = raw.len().min(s.memory_size() as usize);
        mem.write(base + u64::from(s.virtual_address), &raw[..n]);
    }
    pe
}

/// One fixture module loaded for a test: file name, WinDbg name, PDB name, base.
pub struct Load {
    pub file: &'static str,
    pub name: &'static str,
    pub pdb: &'static str,
    pub base: u64,
}

/// The standard three modules of a fixture boot.
pub fn standard_loads(arch: Arch) -> Vec<Load> {
    match arch {
        Arch::Amd64 => vec![
            Load {
                file: "ntoskrnl.exe",
                name: "nt",
                pdb: "ntkrnlmp.pdb",
                base: 0xFFFF_F800_0240_0000,
            },
            Load {
                file: "hal.dll",
                name: "hal",
                pdb: "hal.pdb",
                base: 0xFFFF_F800_0280_0000,
            },
            Load {
                file: "leakydrv.sys",
                name: "leakydrv",
                pdb: "leakydrv.pdb",
                base: 0xFFFF_F880_0110_0000,
            },
        ],
        Arch::X86 => vec![
            Load {
                file: "ntoskrnl.exe",
                name: "nt",
                pdb: "ntkrpamp.pdb",
                base: 0xFFFF_FFFF_8040_0000,
            },
            Load {
                file: "hal.dll",
                name: "hal",
                pdb: "hal.pdb",
                base: 0xFFFF_FFFF_8080_0000,
            },
            Load {
                file: "leakydrv.sys",
                name: "leakydrv",
                pdb: "leakydrv.pdb",
                base: 0xFFFF_FFFF_8F10_0000,
            },
        ],
    }
}

pub fn arch_dir(arch: Arch) -> &'static str {
    match arch {
        Arch::Amd64 => "x64",
        Arch::X86 => "x86",
    }
}

/// Maps the standard modules into `mem` and returns a set with image files and PDBs attached
/// (as a symbol store would have attached them).
pub fn loaded_set(
    arch: Arch,
    flavour: &str,
    mem: &mut MockMemory,
    with_pdbs: bool,
    with_images: bool,
) -> ModuleSet {
    let dir = arch_dir(arch);
    let mut modules = Vec::new();
    for l in standard_loads(arch) {
        let file = fixture_bytes(dir, flavour, l.file);
        let pe = map_image(mem, l.base, &file);
        let mut m = Module::new(l.name, l.file, l.base, pe.headers().size_of_image);
        m.headers = Some(pe.headers().clone());
        m.codeview = pe.codeview();
        if with_images {
            m.attach_image(pe).expect("same image");
        }
        if with_pdbs {
            let pdb = fixture_bytes(dir, flavour, l.pdb);
            let id = m.pdb_id().unwrap().unwrap();
            m.attach_symbols(
                ModuleSymbols::parse(pdb, Some(&id)).expect("pdb"),
                fixture(dir, flavour, l.pdb),
            );
        }
        modules.push(m);
    }
    ModuleSet::new(Some(arch), modules)
}

#[allow(dead_code)]
pub fn arc<T>(t: T) -> Arc<T> {
    Arc::new(t)
}
