//! PE headers, CodeView records, exports and PDB names of the real fixture files, checked
//! against the `object` crate's independent parser and the fixture README's table.

use kdpilot_symbols::pe::{self, PeFile};
use kdpilot_symbols::{Arch, MockMemory, ModuleSymbols, PdbSignature};
use object::{Object, ObjectSection};

use crate::common::*;

const ARCHES: [&str; 2] = ["x64", "x86"];
const FLAVOURS: [&str; 2] = ["classic", "modern"];

#[test]
fn headers_agree_with_object() {
    for arch in ARCHES {
        for flavour in FLAVOURS {
            for file in ["ntoskrnl.exe", "hal.dll", "leakydrv.sys"] {
                let bytes = fixture_bytes(arch, flavour, file);
                let ours = PeFile::parse(bytes.clone()).unwrap();
                let theirs = object::File::parse(&*bytes).unwrap();
                let h = ours.headers();
                assert_eq!(
                    h.image_base,
                    theirs.relative_address_base(),
                    "{arch}/{file}"
                );
                assert_eq!(h.is_pe32_plus, theirs.is_64());
                let sections: Vec<_> = theirs.sections().collect();
                assert_eq!(h.sections.len(), sections.len());
                for (a, b) in h.sections.iter().zip(&sections) {
                    assert_eq!(a.name, b.name().unwrap());
                    assert_eq!(u64::from(a.virtual_address) + h.image_base, b.address());
                }
                let cv = ours.codeview().expect("codeview");
                let ocv = theirs.pdb_info().unwrap().unwrap();
                assert_eq!(cv.age, ocv.age());
                assert_eq!(cv.pdb_path.as_bytes(), ocv.path());
                let PdbSignature::Guid(g) = cv.signature else {
                    panic!()
                };
                assert_eq!(g.0, ocv.guid());
                let mut ours_exports: Vec<_> = ours
                    .exports()
                    .into_iter()
                    .filter_map(|e| Some((e.name?, e.rva)))
                    .collect();
                let mut their_exports: Vec<_> = theirs
                    .exports()
                    .unwrap()
                    .map(|e| e.unwrap())
                    .filter_map(|e| {
                        let object::NameOrOrdinal::Name(name) = e.name() else {
                            return None;
                        };
                        let object::ExportTarget::Address { address } = e.target() else {
                            return None;
                        };
                        Some((
                            String::from_utf8_lossy(name).into_owned(),
                            (address - h.image_base) as u32,
                        ))
                    })
                    .collect();
                ours_exports.sort();
                their_exports.sort();
                assert_eq!(ours_exports, their_exports, "{arch}/{flavour}/{file}");
            }
        }
    }
}

#[test]
fn store_keys_match_the_manifest() {
    let manifest = std::fs::read_to_string(fixture("", "", "MANIFEST.txt")).unwrap();
    let mut checked = 0;
    for line in manifest.lines().filter_map(|l| l.strip_prefix("# ")) {
        let parts: Vec<&str> = line.split_whitespace().collect();
        if parts.len() != 3 || !parts[0].contains('/') || !parts[0].starts_with('x') {
            continue;
        }
        let (arch, rest) = parts[0].split_once('/').unwrap();
        let (flavour, file) = rest.split_once('/').unwrap();
        let pe = PeFile::parse(fixture_bytes(arch, flavour, file)).unwrap();
        let image = pe.headers().image_id(file).unwrap();
        assert_eq!(format!("{}/{}", image.name, image.store_key()), parts[1]);
        let pdb = pe.codeview().unwrap().pdb_id().unwrap();
        assert_eq!(
            format!("{}/{}/{}", pdb.name, pdb.store_key(), pdb.name),
            parts[2]
        );
        checked += 1;
    }
    assert_eq!(checked, 12);
}

#[test]
fn headers_and_codeview_from_memory() {
    block_on(async {
        let mut mem = MockMemory::new();
        let file = fixture_bytes("x64", "classic", "ntoskrnl.exe");
        let base = 0xFFFF_F800_0240_0000;
        let pe = map_image(&mut mem, base, &file);
        mem.clear_reads();
        let h = pe::read_headers(&mut mem, base).await.unwrap();
        assert_eq!(&h, pe.headers());
        let cv = pe::read_codeview(&mut mem, base, &h)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(Some(cv), pe.codeview());
        let reads = mem.reads().to_vec();
        assert!(reads.len() <= 3, "{reads:x?}");
        let exports = pe::read_exports(&mut mem, base, &h, 4096).await.unwrap();
        assert_eq!(exports, pe.exports());
        assert!(
            pe::read_exports(&mut mem, base, &h, 16).await.is_err(),
            "budget honoured"
        );
    });
}

#[test]
fn pdb_names_and_identity() {
    for (arch, pdb, image) in [
        ("x64", "ntkrnlmp.pdb", "ntoskrnl.exe"),
        ("x86", "ntkrpamp.pdb", "ntoskrnl.exe"),
    ] {
        for flavour in FLAVOURS {
            let pe = PeFile::parse(fixture_bytes(arch, flavour, image)).unwrap();
            let id = pe.codeview().unwrap().pdb_id().unwrap();
            let syms = ModuleSymbols::parse(fixture_bytes(arch, flavour, pdb), Some(&id)).unwrap();
            assert_eq!(syms.is_x86(), arch == "x86");
            // Every named export resolves through the PDB to the export's RVA.
            for e in pe.exports() {
                let Some(name) = e.name else { continue };
                assert_eq!(syms.rva_of(&name), Some(e.rva), "{arch}/{flavour} {name}");
                if name != "NtBuildNumber" {
                    let f = syms.function_at(e.rva).unwrap();
                    assert_eq!(
                        &*f.name,
                        name.as_str(),
                        "{arch}/{flavour} function at {:#x}",
                        e.rva
                    );
                    assert_eq!(f.rva, e.rva);
                }
            }
            // PDB-only data and functions.
            for name in [
                "PoolHitTag",
                "MmSpecialPoolTag",
                "MmAllocateSpecialPool",
                "KiSystemStartup",
                "KiCallDriverEntry",
            ] {
                assert!(syms.rva_of(name).is_some(), "{arch}/{flavour} {name}");
            }
            assert_eq!(
                syms.rva_of("mmallocatespecialpool"),
                syms.rva_of("MmAllocateSpecialPool")
            );
            if arch == "x86" {
                assert_eq!(
                    syms.rva_of("_ExAllocatePoolWithTag@12"),
                    syms.rva_of("ExAllocatePoolWithTag")
                );
                assert!(!syms.frame_records().is_empty());
            }
            // Lines: the first instruction of ExAllocatePoolWithTag is in pool_*.c.
            let rva = syms.rva_of("ExAllocatePoolWithTag").unwrap();
            let line = syms.source_line(rva).expect("line info");
            assert!(
                line.file.ends_with(&format!("pool_{flavour}.c")),
                "{line:?}"
            );
        }
    }
}

#[test]
fn mismatched_pdb_is_refused_naming_both() {
    let pe = PeFile::parse(fixture_bytes("x64", "classic", "ntoskrnl.exe")).unwrap();
    let id = pe.codeview().unwrap().pdb_id().unwrap();
    let err = ModuleSymbols::parse(fixture_bytes("x64", "modern", "ntkrnlmp.pdb"), Some(&id))
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("{FA86738F-CEDE-2B21-4C4C-44205044422E}"),
        "{msg}"
    );
    assert!(
        msg.contains("{8794B7A4-B563-990E-4C4C-44205044422E}"),
        "{msg}"
    );
    let _ = Arch::Amd64;
}

/// The `symbols_pdb` fuzz target's first finding: one byte changed in a line table of the x86
/// fixture kernel's PDB makes pdb2 panic (a debug assertion) when lines are looked up. A PDB
/// comes from a symbol server: the panic is caught, the lines are given up with a warning, the
/// names stay.
#[test]
fn a_pdb_that_trips_the_pdb_crates_gives_no_lines_and_no_panic() {
    let mut bytes = fixture_bytes("x86", "classic", "ntkrpamp.pdb");
    assert_eq!(bytes[47528], 0x40);
    bytes[47528] = 0x8D;
    let s = kdpilot_symbols::ModuleSymbols::parse(bytes, None).expect("names still parse");
    assert!(s.rva_of("MmAllocateSpecialPool").is_some());
    let rvas: Vec<u32> = s.functions().iter().map(|f| f.rva).collect();
    let lines = s.source_lines(&rvas);
    assert_eq!(lines.len(), rvas.len());
    // Given up once, not tried again.
    assert!(s.source_line(rvas[0]).is_none());
}

/// Absurd counts in headers read from target memory: 0xFFFF sections is refused without
/// reading past the header limit; export and debug directories that claim millions of entries
/// are cut to their bounds.
#[test]
fn absurd_counts_in_memory_headers_are_bounded() {
    block_on(async {
        let file = fixture_bytes("x64", "classic", "ntoskrnl.exe");
        let base = 0xFFFF_F800_0240_0000;
        let e_lfanew = u32::from_le_bytes(file[0x3C..0x40].try_into().unwrap()) as u64;

        let mut mem = MockMemory::new();
        let pe = map_image(&mut mem, base, &file);
        mem.write(base + e_lfanew + 6, &0xFFFFu16.to_le_bytes()); // NumberOfSections
        mem.clear_reads();
        let err = pe::read_headers(&mut mem, base).await.unwrap_err();
        assert!(err.to_string().contains("too many sections"), "{err}");
        assert!(mem.reads().iter().all(|&(_, n)| n <= pe::MAX_HEADER_BYTES));

        // Exports: NumberOfFunctions and NumberOfNames 0xFFFFFFFF.
        let mut mem = MockMemory::new();
        map_image(&mut mem, base, &file);
        let h = pe.headers().clone();
        let dir = h.directory(pe::DIR_EXPORT).expect("the kernel exports");
        let at = base + u64::from(dir.rva);
        mem.write(at + 0x14, &u32::MAX.to_le_bytes());
        mem.write(at + 0x18, &u32::MAX.to_le_bytes());
        mem.clear_reads();
        let exports = pe::read_exports(&mut mem, base, &h, 1 << 16).await;
        if let Ok(list) = &exports {
            assert!(list.len() <= pe::MAX_EXPORTS);
        }
        assert!(
            mem.reads().iter().all(|&(_, n)| n <= 1 << 16),
            "{:x?}",
            mem.reads()
        );

        // Debug directory claiming 4 GiB of entries.
        let mut h2 = h.clone();
        if let Some(d) = h2.data_directories.get_mut(pe::DIR_DEBUG) {
            d.size = u32::MAX;
        }
        mem.clear_reads();
        let _ = pe::read_codeview(&mut mem, base, &h2).await;
        assert!(
            mem.reads()
                .iter()
                .all(|&(_, n)| n <= pe::MAX_DEBUG_ENTRIES * 28 || n <= pe::MAX_CODEVIEW_BYTES),
            "{:x?}",
            mem.reads()
        );
    });
}
