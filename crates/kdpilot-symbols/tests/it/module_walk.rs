//! PsLoadedModuleList walks over lists laid out here from kd-protocol.md's offsets (not through
//! the crate's own layout table), with the real fixture images mapped behind them.

use kdpilot_symbols::{
    walk_module_list, Arch, CachedReader, KernelInfo, MockMemory, ModuleSet, WalkLimits,
    WalkWarning,
};

use crate::common::*;

/// Writes a KLDR_DATA_TABLE_ENTRY at `at` (links filled in later) and its two names.
fn write_entry(
    mem: &mut MockMemory,
    arch: Arch,
    at: u64,
    base: u64,
    size: u32,
    full: &str,
    name: &str,
) {
    let (dll_base, entry_point, size_of_image, full_name, base_name, ptr) = match arch {
        Arch::Amd64 => (0x30, 0x38, 0x40, 0x48, 0x58, 8),
        Arch::X86 => (0x18, 0x1C, 0x20, 0x24, 0x2C, 4),
    };
    let put_ptr = |mem: &mut MockMemory, a: u64, v: u64| {
        if ptr == 8 {
            mem.write_u64(a, v)
        } else {
            mem.write_u32(a, v as u32)
        }
    };
    put_ptr(mem, at + dll_base, base);
    put_ptr(mem, at + entry_point, base + 0x1000);
    mem.write_u32(at + size_of_image, size);
    for (off, text, buf) in [(full_name, full, at + 0x200), (base_name, name, at + 0x400)] {
        let utf16: Vec<u8> = text.encode_utf16().flat_map(u16::to_le_bytes).collect();
        mem.write(at + off, &(utf16.len() as u16).to_le_bytes());
        mem.write(at + off + 2, &(utf16.len() as u16 + 2).to_le_bytes());
        put_ptr(mem, at + off + ptr, buf);
        mem.write(buf, &utf16);
    }
}

/// Links `head` and `entries` into a circular list.
fn link(mem: &mut MockMemory, arch: Arch, head: u64, entries: &[u64]) {
    let ptr = arch.pointer_size() as u64;
    let all: Vec<u64> = std::iter::once(head)
        .chain(entries.iter().copied())
        .collect();
    for (i, &e) in all.iter().enumerate() {
        let next = all[(i + 1) % all.len()];
        let prev = all[(i + all.len() - 1) % all.len()];
        if ptr == 8 {
            mem.write_u64(e, next);
            mem.write_u64(e + 8, prev);
        } else {
            mem.write_u32(e, next as u32);
            mem.write_u32(e + 4, prev as u32);
        }
    }
}

/// A fixture boot: images mapped, a three-entry list. Returns (memory, kernel info, entries).
pub fn boot(arch: Arch) -> (MockMemory, KernelInfo, Vec<u64>) {
    let mut mem = MockMemory::new();
    let (head, pool) = match arch {
        Arch::Amd64 => (0xFFFF_F800_0241_0000u64, 0xFFFF_FA80_0000_0000u64),
        Arch::X86 => (0xFFFF_FFFF_8041_0000, 0xFFFF_FFFF_8500_0000),
    };
    let mut entries = Vec::new();
    for (i, l) in standard_loads(arch).iter().enumerate() {
        let file = fixture_bytes(arch_dir(arch), "classic", l.file);
        let pe = map_image(&mut mem, l.base, &file);
        let at = pool + i as u64 * 0x1000;
        let full = format!("\\SystemRoot\\system32\\{}", l.file);
        write_entry(
            &mut mem,
            arch,
            at,
            l.base,
            pe.headers().size_of_image,
            &full,
            l.file,
        );
        entries.push(at);
    }
    mem.map_zeroed(head, 16);
    link(&mut mem, arch, head, &entries);
    let kernel = KernelInfo {
        arch,
        kern_base: standard_loads(arch)[0].base,
        ps_loaded_module_list: head,
    };
    (mem, kernel, entries)
}

#[test]
fn fixture_boot_lists_like_lm() {
    for arch in [Arch::Amd64, Arch::X86] {
        block_on(async {
            let (mem, kernel, _) = boot(arch);
            let mut reader = CachedReader::new(mem);
            let (set, warnings) =
                ModuleSet::from_target(&mut reader, &kernel, &WalkLimits::default())
                    .await
                    .unwrap();
            assert!(warnings.is_empty(), "{warnings:?}");
            let names: Vec<&str> = set.modules().iter().map(|m| m.name.as_str()).collect();
            let mut want = vec!["nt", "hal", "leakydrv"];
            if arch == Arch::X86 {
                want = vec!["nt", "hal", "leakydrv"];
            }
            for w in &want {
                assert!(names.contains(w), "{arch}: {names:?}");
            }
            for m in set.modules() {
                assert!(m.problems.is_empty(), "{}: {:?}", m.name, m.problems);
                assert!(m.path.starts_with("\\SystemRoot\\system32\\"));
                let pdb = m.pdb_id().unwrap().unwrap();
                let expect = match (m.name.as_str(), arch) {
                    ("nt", Arch::Amd64) => "ntkrnlmp.pdb",
                    ("nt", Arch::X86) => "ntkrpamp.pdb",
                    ("hal", _) => "hal.pdb",
                    _ => "leakydrv.pdb",
                };
                assert_eq!(pdb.name, expect);
                let image = m.image_id().unwrap().unwrap();
                assert_eq!(image.name, m.file_name);
            }
            assert!(!set.stable_ranges().is_empty());
            let s = reader.stats();
            eprintln!(
                "{arch} lm: {} reads below for {} requests, {} bytes asked below for {} requested",
                s.underlying_reads, s.requests, s.bytes_read, s.bytes_requested
            );
            // Every module's headers and CodeView record, three entries and six names, in
            // well under a KD packet per item.
            assert!(s.underlying_reads <= 24, "{s:?}");
        });
    }
}

#[test]
fn cycles_limits_and_broken_links_end_the_walk_with_a_warning() {
    for arch in [Arch::Amd64, Arch::X86] {
        block_on(async {
            // A cycle that never returns to the head: 1 -> 2 -> 3 -> 2.
            let (mut mem, kernel, entries) = boot(arch);
            if arch == Arch::Amd64 {
                mem.write_u64(entries[2], entries[1]);
            } else {
                mem.write_u32(entries[2], entries[1] as u32);
            }
            let w = walk_module_list(
                &mut mem,
                arch,
                kernel.ps_loaded_module_list,
                &WalkLimits::default(),
            )
            .await
            .unwrap();
            assert_eq!(w.entries.len(), 3);
            assert_eq!(w.warnings, vec![WalkWarning::Cycle { entry: entries[1] }]);

            // The count limit.
            let (mut mem, kernel, _) = boot(arch);
            let limits = WalkLimits {
                max_modules: 2,
                ..Default::default()
            };
            let w = walk_module_list(&mut mem, arch, kernel.ps_loaded_module_list, &limits)
                .await
                .unwrap();
            assert_eq!(w.entries.len(), 2);
            assert_eq!(w.warnings, vec![WalkWarning::TooManyEntries { limit: 2 }]);

            // An unreadable entry.
            let (mut mem, kernel, entries) = boot(arch);
            mem.unmap_page(entries[1]);
            let w = walk_module_list(
                &mut mem,
                arch,
                kernel.ps_loaded_module_list,
                &WalkLimits::default(),
            )
            .await
            .unwrap();
            assert_eq!(w.entries.len(), 1);
            assert_eq!(
                w.warnings,
                vec![WalkWarning::UnreadableEntry { entry: entries[1] }]
            );

            // A NULL Flink.
            let (mut mem, kernel, entries) = boot(arch);
            mem.write(entries[0], &[0; 8]);
            let w = walk_module_list(
                &mut mem,
                arch,
                kernel.ps_loaded_module_list,
                &WalkLimits::default(),
            )
            .await
            .unwrap();
            assert_eq!(w.entries.len(), 1);
            assert_eq!(
                w.warnings,
                vec![WalkWarning::NullLink { entry: entries[0] }]
            );

            // A head that cannot be read is an error; so is a failing reader.
            let (mut mem, kernel, _) = boot(arch);
            mem.unmap_page(kernel.ps_loaded_module_list);
            assert!(walk_module_list(
                &mut mem,
                arch,
                kernel.ps_loaded_module_list,
                &WalkLimits::default()
            )
            .await
            .unwrap_err()
            .is_unreadable());
            let (mut mem, kernel, entries) = boot(arch);
            mem.fail_at(Some(entries[2] + 4));
            assert!(!walk_module_list(
                &mut mem,
                arch,
                kernel.ps_loaded_module_list,
                &WalkLimits::default()
            )
            .await
            .unwrap_err()
            .is_unreadable());
        });
    }
}

#[test]
fn hostile_names_are_bounded() {
    block_on(async {
        let arch = Arch::Amd64;
        let (mut mem, kernel, entries) = boot(arch);
        // BaseDllName: Length 0xFFFF (odd, huge) over a mapped buffer; FullDllName: a buffer
        // that runs into an unmapped page.
        let e = entries[2];
        mem.write(e + 0x58, &0xFFFFu16.to_le_bytes());
        mem.map_zeroed(e + 0x400, 0x10000);
        mem.write(e + 0x48, &0x400u16.to_le_bytes());
        mem.write_u64(e + 0x48 + 8, 0xFFFF_F8FF_FFFF_FFF0);
        mem.write(0xFFFF_F8FF_FFFF_FFF0, &[b'a', 0, b'b', 0]);
        mem.clear_reads();
        let limits = WalkLimits::default();
        let w = walk_module_list(&mut mem, arch, kernel.ps_loaded_module_list, &limits)
            .await
            .unwrap();
        assert_eq!(w.entries.len(), 3);
        assert!(
            w.warnings.contains(&WalkWarning::BadName { entry: e }),
            "{:?}",
            w.warnings
        );
        assert!(w.entries[2].base_name.encode_utf16().count() * 2 <= limits.max_name_bytes);
        assert!(
            mem.reads().iter().all(|&(_, n)| n <= 0x1000),
            "bounded reads"
        );
        // The set still names it (a hostile name cannot become a path: see store tests).
        let set = ModuleSet::from_entries(&mut mem, &kernel, &w.entries)
            .await
            .unwrap();
        assert_eq!(set.modules().len(), 3);
    });
}

/// Bounds the night depends on, each with its warning: an entry whose Flink points at itself,
/// and a UNICODE_STRING of Length 0xFFFF whose Buffer is unmapped.
#[test]
fn a_self_loop_and_a_huge_name_over_unmapped_memory_are_bounded() {
    block_on(async {
        let arch = Arch::Amd64;
        let (mut mem, kernel, entries) = boot(arch);
        mem.write_u64(entries[1], entries[1]); // hal's Flink: itself
        let e = entries[1];
        mem.write(e + 0x58, &0xFFFFu16.to_le_bytes());
        mem.write_u64(e + 0x58 + 8, 0xFFFF_F8DE_AD00_0000); // nothing mapped there
        mem.clear_reads();
        let limits = WalkLimits::default();
        let w = walk_module_list(&mut mem, arch, kernel.ps_loaded_module_list, &limits)
            .await
            .unwrap();
        assert_eq!(w.entries.len(), 2, "{:?}", w.entries);
        assert!(
            w.warnings.contains(&WalkWarning::Cycle { entry: e }),
            "{:?}",
            w.warnings
        );
        assert!(
            w.warnings.contains(&WalkWarning::BadName { entry: e }),
            "{:?}",
            w.warnings
        );
        assert!(w.entries[1].base_name.is_empty());
        assert!(
            mem.reads()
                .iter()
                .all(|&(_, n)| n <= limits.max_name_bytes.max(0x1000)),
            "bounded reads: {:x?}",
            mem.reads()
        );
    });
}
