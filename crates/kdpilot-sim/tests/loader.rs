//! The PE loader against the clang/lld-link fixtures and against images the PE builder writes:
//! sections where the headers say, relocations applied for the base delta, imports resolved
//! against the kernel's exports, ImageBase rewritten, and no panic on damaged files.
#![allow(
    clippy::unusual_byte_groupings,
    reason = "addresses are grouped as WinDbg prints them: fffff806`1f200000"
)]

mod common;

use std::sync::Arc;

use common::*;
use kdpilot_kd::Arch;
use kdpilot_sim::loader::{load_image, ImageSource, LoadError, LoadedImage};
use kdpilot_sim::memory::Memory;
use kdpilot_sim::pe_builder::{PeBuilder, SCN_CODE, SCN_DATA};
use object::read::pe::{ImageNtHeaders, RelocationBlockIterator};
use object::LittleEndian as LE;

fn read(arch: Arch, flavour: &str, name: &str) -> Arc<[u8]> {
    std::fs::read(fixture_dir(arch, flavour).join(name))
        .expect("fixture")
        .into()
}

/// Every section's bytes as the file has them (raw data, up to VirtualSize).
fn file_sections(file: &[u8]) -> Vec<(u32, Vec<u8>)> {
    let pe = object::read::pe::PeFile64::parse(file)
        .map(|f| {
            f.section_table()
                .iter()
                .map(|s| {
                    let raw = s.pe_data(file).unwrap_or(&[]);
                    let n = raw.len().min(s.virtual_size.get(LE) as usize);
                    (s.virtual_address.get(LE), raw[..n].to_vec())
                })
                .collect::<Vec<_>>()
        })
        .ok();
    pe.unwrap_or_else(|| {
        let f = object::read::pe::PeFile32::parse(file).expect("PE32");
        f.section_table()
            .iter()
            .map(|s| {
                let raw = s.pe_data(file).unwrap_or(&[]);
                let n = raw.len().min(s.virtual_size.get(LE) as usize);
                (s.virtual_address.get(LE), raw[..n].to_vec())
            })
            .collect()
    })
}

/// The file's section containing `rva`, as (section RVA, raw bytes).
fn file_u32(file: &[u8], rva: u32) -> u32 {
    for (srva, bytes) in file_sections(file) {
        if rva >= srva && ((rva - srva) as usize) + 4 <= bytes.len() {
            let o = (rva - srva) as usize;
            return u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
        }
    }
    panic!("RVA {rva:#x} not in a section");
}

/// RVAs of the file's base relocations (HIGHLOW/DIR64), read from `.reloc` in the file.
fn reloc_sites(file: &[u8]) -> Vec<u32> {
    let (rva, size) = {
        let lfanew = u32::from_le_bytes(file[0x3C..0x40].try_into().unwrap()) as usize;
        let magic = u16::from_le_bytes(file[lfanew + 24..lfanew + 26].try_into().unwrap());
        let dd = lfanew + 24 + if magic == 0x20b { 112 } else { 96 } + 5 * 8;
        (
            file_dir(file, dd),
            u32::from_le_bytes(file[dd + 4..dd + 8].try_into().unwrap()),
        )
    };
    if size == 0 {
        return Vec::new();
    }
    let mut data = Vec::new();
    for (srva, bytes) in file_sections(file) {
        if rva >= srva && ((rva - srva) as usize) < bytes.len() {
            let o = (rva - srva) as usize;
            data = bytes[o..o + size as usize].to_vec();
        }
    }
    let mut out = Vec::new();
    let mut it = RelocationBlockIterator::new(&data);
    while let Some(block) = it.next().expect("reloc block") {
        for r in block {
            if r.typ.0 != 0 {
                out.push(r.virtual_address);
            }
        }
    }
    out
}

fn file_dir(file: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(file[at..at + 4].try_into().unwrap())
}

/// IAT slots of `file` (RVA, imported name), read with `object` directly from the file.
fn iat_slots<Pe: ImageNtHeaders>(file: &[u8]) -> Vec<(u32, String, String)> {
    let f = object::read::pe::PeFile::<Pe>::parse(file).expect("PE");
    let dirs = f.data_directories();
    let Some(table) = dirs
        .import_table(file, &f.section_table())
        .expect("import table")
    else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut ds = table.descriptors().expect("descriptors");
    while let Some(d) = ds.next().expect("descriptor") {
        let dll = String::from_utf8_lossy(table.name(d.name.get(LE)).expect("name")).into_owned();
        let mut thunks = table
            .thunks(d.original_first_thunk.get(LE))
            .expect("thunks");
        let mut i = 0;
        while let Some(t) = thunks.next::<Pe>().expect("thunk") {
            let name = match table.import::<Pe>(t).expect("import") {
                object::read::pe::Import::Name(_, n) => String::from_utf8_lossy(n).into_owned(),
                object::read::pe::Import::Ordinal(o) => format!("#{o}"),
            };
            let slot = d.first_thunk.get(LE) + i * std::mem::size_of::<Pe::ImageThunkData>() as u32;
            out.push((slot, dll.clone(), name));
            i += 1;
        }
    }
    out
}

#[test]
fn fixture_images_map_relocate_and_link() {
    for arch in [Arch::Amd64, Arch::X86] {
        for flavour in ["classic", "modern"] {
            let mut mem = Memory::new();
            let (kbase, hbase, dbase) = match arch {
                Arch::Amd64 => (
                    0xfffff803_2a600000u64,
                    0xfffff803_2b000000u64,
                    0xfffff806_4e3e0000u64,
                ),
                Arch::X86 => (
                    0xffffffff_82a00000,
                    0xffffffff_82c00000,
                    0xffffffff_8c710000,
                ),
            };
            let mut loaded: Vec<LoadedImage> = Vec::new();
            for (name, base) in [
                ("ntoskrnl.exe", kbase),
                ("hal.dll", hbase),
                ("leakydrv.sys", dbase),
            ] {
                let src = if name.ends_with(".sys") {
                    ImageSource::driver(name, read(arch, flavour, name))
                } else {
                    ImageSource::system(name, read(arch, flavour, name))
                };
                let img = load_image(&mut mem, arch, &src, base, &loaded)
                    .unwrap_or_else(|e| panic!("{arch} {flavour} {name}: {e}"));
                assert_eq!(img.base, base);
                assert!(mem.is_range_mapped(base, u64::from(img.size)));
                assert_eq!(mem.read(base, 2), b"MZ");
                // The mapped headers carry the new base.
                let lfanew = u64::from(mem.read_u32(base + 0x3C).unwrap());
                let image_base = match arch {
                    Arch::Amd64 => mem.read_u64(base + lfanew + 24 + 24).unwrap(),
                    Arch::X86 => arch.canonical_address(u64::from(
                        mem.read_u32(base + lfanew + 24 + 28).unwrap(),
                    )),
                };
                assert_eq!(image_base, base, "{name}: ImageBase rewritten");
                loaded.push(img);
            }
            let kernel = &loaded[0];
            for export in [
                "ExAllocatePoolWithTag",
                "ExAllocatePool2",
                "ExFreePoolWithTag",
                "KeBugCheckEx",
                "DbgBreakPointWithStatus",
            ] {
                let at = kernel.export(export).unwrap_or_else(|| panic!("{export}"));
                assert!(kernel.contains(at));
            }
            // x64: DbgBreakPointWithStatus is `int3; ret`.
            if arch == Arch::Amd64 {
                let at = kernel.export("DbgBreakPointWithStatus").unwrap();
                assert_eq!(mem.read(at, 2), [0xCC, 0xC3]);
            }
            // The driver's IAT holds the kernel's export addresses.
            let drv = &loaded[2];
            let slots = match arch {
                Arch::Amd64 => iat_slots::<object::pe::ImageNtHeaders64>(&drv.file),
                Arch::X86 => iat_slots::<object::pe::ImageNtHeaders32>(&drv.file),
            };
            assert!(slots.len() >= 6, "{slots:?}");
            for (rva, dll, name) in &slots {
                assert!(dll.eq_ignore_ascii_case("ntoskrnl.exe"));
                let at = drv.base + u64::from(*rva);
                let value = match arch {
                    Arch::Amd64 => mem.read_u64(at).unwrap(),
                    Arch::X86 => arch.canonical_address(u64::from(mem.read_u32(at).unwrap())),
                };
                assert_eq!(
                    Some(value),
                    kernel.export(name),
                    "{arch} {flavour} import {name}"
                );
            }
            // Section bytes equal the file's except at relocation sites (value + delta) and
            // the driver's IAT slots.
            let width = arch.pointer_size() as u32;
            for img in &loaded {
                let delta = img.base.wrapping_sub(img.preferred_base);
                let sites = reloc_sites(&img.file);
                assert_eq!(
                    sites.len(),
                    img.relocations_applied,
                    "{arch} {flavour} {}",
                    img.name
                );
                let mut patched = std::collections::BTreeSet::new();
                for &r in &sites {
                    patched.extend(r..r + width);
                    let at = img.base + u64::from(r);
                    let file_v = file_u32(&img.file, r);
                    let mem_v = mem.read_u32(at).unwrap();
                    assert_eq!(
                        mem_v,
                        file_v.wrapping_add(delta as u32),
                        "{} reloc {r:#x}",
                        img.name
                    );
                }
                if img.name == "leakydrv.sys" {
                    for (rva, _, _) in &slots {
                        patched.extend(*rva..*rva + width);
                    }
                }
                for (rva, bytes) in file_sections(&img.file) {
                    let mapped = mem.read(img.base + u64::from(rva), bytes.len());
                    for (i, (m, f)) in mapped.iter().zip(&bytes).enumerate() {
                        let at = rva + i as u32;
                        assert!(
                            m == f || patched.contains(&at),
                            "{} byte {at:#x} changed",
                            img.name
                        );
                    }
                }
                if arch == Arch::Amd64 {
                    assert_eq!(img.relocations_applied, 0, "x64 fixtures have no .reloc");
                }
            }
            if arch == Arch::X86 {
                assert!(loaded.iter().any(|i| i.relocations_applied > 0));
            }
        }
    }
}

/// An x64 and an x86 driver written by the PE builder: absolute pointers relocated, imports
/// resolved, a missing import refused, images that must move without relocations refused.
#[test]
fn built_images_relocate_and_resolve() {
    for arch in [Arch::Amd64, Arch::X86] {
        let kernel = kdpilot_sim::boot::synthetic_kernel(arch);
        let mut mem = Memory::new();
        let kbase = arch.canonical_address(0xffff_f800_0120_0000);
        let k = load_image(
            &mut mem,
            arch,
            &ImageSource::system("ntoskrnl.exe", kernel),
            kbase,
            &[],
        )
        .expect("kernel");
        let pref = match arch {
            Arch::Amd64 => 0x1_c000_0000u64,
            Arch::X86 => 0x1_0000,
        };
        let mut b = PeBuilder::new(arch, "drv.sys", pref);
        let w = arch.pointer_size();
        // .data: three absolute pointers to .text (what a jump table or a global holds).
        let text = b.section(".text", vec![0x90, 0x90, 0xC3], 0, SCN_CODE);
        let mut data = Vec::new();
        for off in [0u64, 1, 2] {
            let v = pref + u64::from(text) + off;
            data.extend_from_slice(&v.to_le_bytes()[..w]);
        }
        let data_rva = b.section(".data", data, 0x100, SCN_DATA);
        for i in 0..3 {
            b.relocation(data_rva + (i * w) as u32);
        }
        b.import("ntoskrnl.exe", "ExAllocatePoolWithTag")
            .import("ntoskrnl.exe", "KeBugCheckEx")
            .entry(text);
        let built = b.build();
        let base = arch.canonical_address(0xffff_f806_4e3e_0000);
        let d = load_image(
            &mut mem,
            arch,
            &ImageSource::driver("drv.sys", built.file.clone()),
            base,
            std::slice::from_ref(&k),
        )
        .expect("driver");
        assert_eq!(d.relocations_applied, 3);
        for i in 0..3u64 {
            let at = base + u64::from(data_rva) + i * w as u64;
            let v = match arch {
                Arch::Amd64 => mem.read_u64(at).unwrap(),
                Arch::X86 => arch.canonical_address(u64::from(mem.read_u32(at).unwrap())),
            };
            assert_eq!(
                v,
                base + u64::from(text) + i,
                "{arch} pointer {i} relocated"
            );
        }
        for (_, f, slot) in &built.iat {
            let at = base + u64::from(*slot);
            let v = match arch {
                Arch::Amd64 => mem.read_u64(at).unwrap(),
                Arch::X86 => arch.canonical_address(u64::from(mem.read_u32(at).unwrap())),
            };
            assert_eq!(Some(v), k.export(f));
        }
        assert_eq!(d.entry_point(), Some(base + u64::from(text)));

        // A missing import fails the load and maps nothing.
        let mut b2 = PeBuilder::new(arch, "bad.sys", pref);
        b2.section(".text", vec![0xC3], 0, SCN_CODE);
        b2.import("ntoskrnl.exe", "NoSuchRoutine");
        let bad = b2.build().file;
        let mut m2 = Memory::new();
        let e = load_image(
            &mut m2,
            arch,
            &ImageSource::driver("bad.sys", bad),
            base,
            std::slice::from_ref(&k),
        )
        .unwrap_err();
        assert!(
            matches!(e, LoadError::UnresolvedImport { ref import, .. } if import == "NoSuchRoutine"),
            "{e}"
        );
        assert_eq!(m2.mapped_pages(), 0);

        // The wrong architecture is refused.
        let other = if arch == Arch::Amd64 {
            Arch::X86
        } else {
            Arch::Amd64
        };
        let e = load_image(
            &mut Memory::new(),
            other,
            &ImageSource::driver("drv.sys", built.file.clone()),
            other.canonical_address(0x8c00_0000),
            &[],
        )
        .unwrap_err();
        assert!(matches!(e, LoadError::WrongMachine { .. }), "{e}");

        // RELOCS_STRIPPED and not at its base: refused.
        let mut f = built.file.clone();
        let lfanew = u32::from_le_bytes(f[0x3C..0x40].try_into().unwrap()) as usize;
        // Drop the relocation directory and set IMAGE_FILE_RELOCS_STRIPPED.
        let dd = lfanew + 24 + if arch == Arch::Amd64 { 112 } else { 96 };
        f[dd + 5 * 8..dd + 5 * 8 + 8].fill(0);
        f[lfanew + 4 + 18] |= 1;
        let e = load_image(
            &mut Memory::new(),
            arch,
            &ImageSource::driver("s.sys", f.clone()),
            base,
            &[],
        )
        .unwrap_err();
        assert!(matches!(e, LoadError::RelocsStripped { .. }), "{e}");
        // ... but fine at its preferred base.
        load_image(
            &mut Memory::new(),
            arch,
            &ImageSource::driver("s.sys", f),
            arch.canonical_address(pref),
            std::slice::from_ref(&k),
        )
        .expect("at its own base");
    }
}

/// Truncated, garbage and mutated files give errors, never a panic, and never map memory on
/// failure.
#[test]
fn damaged_files_are_refused_without_panics() {
    let arch = Arch::Amd64;
    let kfile = read(arch, "classic", "ntoskrnl.exe");
    let mut mem = Memory::new();
    let k = load_image(
        &mut mem,
        arch,
        &ImageSource::system("ntoskrnl.exe", kfile.clone()),
        0xfffff800_00200000,
        &[],
    )
    .unwrap();
    let drv = read(arch, "classic", "leakydrv.sys");
    for len in [0usize, 1, 2, 0x3C, 0x40, 0x80, 0x100, 0x200, drv.len() / 2] {
        let cut: Arc<[u8]> = drv[..len].to_vec().into();
        let mut m = Memory::new();
        let r = load_image(
            &mut m,
            arch,
            &ImageSource::driver("cut.sys", cut),
            0xfffff806_00000000,
            std::slice::from_ref(&k),
        );
        if r.is_err() {
            assert_eq!(m.mapped_pages(), 0, "length {len}");
        }
    }
    // Seeded mutations of every header and table byte region.
    let mut x: u64 = 0x1234_5678_9abc_def1;
    let mut rng = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut refused = 0;
    for _ in 0..3000 {
        let mut f = drv.to_vec();
        for _ in 0..1 + rng() % 4 {
            let at = (rng() % f.len() as u64) as usize;
            f[at] = rng() as u8;
        }
        // SizeOfImage beyond the cap must be refused before any allocation.
        if rng() % 50 == 0 {
            let lfanew = u32::from_le_bytes(f[0x3C..0x40].try_into().unwrap()) as usize;
            if lfanew + 24 + 60 <= f.len() {
                f[lfanew + 24 + 56..lfanew + 24 + 60].copy_from_slice(&u32::MAX.to_le_bytes());
            }
        }
        let mut m = Memory::new();
        match load_image(
            &mut m,
            arch,
            &ImageSource::driver("m.sys", f),
            0xfffff806_00000000,
            std::slice::from_ref(&k),
        ) {
            Ok(img) => assert!(m.is_range_mapped(img.base, u64::from(img.size))),
            Err(_) => {
                refused += 1;
                assert_eq!(m.mapped_pages(), 0);
            }
        }
    }
    assert!(refused > 0);
    // A header claiming a huge image is refused as such.
    let mut f = drv.to_vec();
    let lfanew = u32::from_le_bytes(f[0x3C..0x40].try_into().unwrap()) as usize;
    f[lfanew + 24 + 56..lfanew + 24 + 60].copy_from_slice(&0x4000_0000u32.to_le_bytes());
    let e = load_image(
        &mut Memory::new(),
        arch,
        &ImageSource::driver("big.sys", f),
        0xfffff806_00000000,
        std::slice::from_ref(&k),
    )
    .unwrap_err();
    assert!(matches!(e, LoadError::BadSize { .. }), "{e}");
}

/// Every boot draws new bases in the ranges Windows uses; images never overlap.
#[test]
fn kaslr_bases_stay_in_range_and_never_overlap() {
    for arch in [Arch::Amd64, Arch::X86] {
        let mut kernels = std::collections::BTreeSet::new();
        for seed in 0..20u64 {
            let mut m = fixture_machine(arch, "modern", 2, seed);
            for _ in 0..3 {
                let spans: Vec<(u64, u64)> = m
                    .images
                    .iter()
                    .map(|i| (i.base, i.base + u64::from(i.size)))
                    .collect();
                for (i, a) in spans.iter().enumerate() {
                    assert_eq!(a.0 % 0x1000, 0);
                    for b in &spans[i + 1..] {
                        assert!(
                            a.1 <= b.0 || b.1 <= a.0,
                            "{arch} seed {seed}: {a:x?} {b:x?}"
                        );
                    }
                }
                let k = m.layout.kern_base;
                match arch {
                    Arch::Amd64 => {
                        assert!((0xfffff800_00000000..0xfffff808_00000000).contains(&k));
                        assert_eq!(k % 0x20_0000, 0);
                        assert!(spans[2].0 >= 0xfffff808_00000000);
                        assert!(m.layout.pool.0 >= 0xffffc000_00000000);
                    }
                    Arch::X86 => {
                        assert!((0xffffffff_80400000..0xffffffff_82400000).contains(&k));
                        assert!(spans[2].0 >= 0xffffffff_8c000000);
                        assert!(
                            (0xffffffff_84000000..0xffffffff_88000000).contains(&m.layout.pool.0)
                        );
                        assert!(m.layout.pool.1 <= 0xffffffff_8c000000);
                    }
                }
                kernels.insert(k);
                m.reboot().unwrap();
            }
        }
        assert!(
            kernels.len() > 50,
            "{arch}: bases repeat too often ({})",
            kernels.len()
        );
    }
}
