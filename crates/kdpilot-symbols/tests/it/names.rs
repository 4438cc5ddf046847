//! Names in both directions through a module set: PDB publics and procedures, x86 decorated
//! publics from plain names, exports without a PDB, `module+0xoff` without anything.

use kdpilot_symbols::{Arch, MockMemory, ModuleSet, NameError, PeFile};

use crate::common::*;

fn set(arch: Arch, pdbs: bool, images: bool) -> ModuleSet {
    let mut mem = MockMemory::new();
    loaded_set(arch, "classic", &mut mem, pdbs, images)
}

#[test]
fn name_to_address_from_pdbs() {
    for arch in [Arch::Amd64, Arch::X86] {
        let s = set(arch, true, true);
        let nt = s.by_name("nt").unwrap();
        let image = nt.image.clone().unwrap();
        let export = |n: &str| {
            image
                .exports()
                .into_iter()
                .find(|e| e.name.as_deref() == Some(n))
                .map(|e| nt.base + u64::from(e.rva))
                .unwrap()
        };
        assert_eq!(
            s.resolve("nt!ExAllocatePoolWithTag").unwrap(),
            export("ExAllocatePoolWithTag")
        );
        assert_eq!(
            s.resolve("nt!ExAllocatePoolWithTag+0x10").unwrap(),
            export("ExAllocatePoolWithTag") + 0x10
        );
        assert_eq!(
            s.resolve("nt!ExAllocatePoolWithTag+10").unwrap(),
            export("ExAllocatePoolWithTag") + 0x10
        );
        assert_eq!(
            s.resolve("NT!exallocatepoolwithtag").unwrap(),
            export("ExAllocatePoolWithTag")
        );
        assert_eq!(
            s.resolve("ntoskrnl.exe!ExFreePool").unwrap(),
            export("ExFreePool")
        );
        // PDB-only names, code and data.
        for n in [
            "nt!MmAllocateSpecialPool",
            "nt!PoolHitTag",
            "nt!MmSpecialPoolTag",
            "leakydrv!LeakyAllocViaPool2",
            "leakydrv!LeakyStats",
            "hal!HalpQueryTimer",
        ] {
            let a = s.resolve(n).unwrap_or_else(|e| panic!("{arch} {n}: {e}"));
            assert!(s.find(a).is_some());
        }
        assert_eq!(
            s.resolve("leakydrv").unwrap(),
            s.by_name("leakydrv").unwrap().base
        );
        assert_eq!(
            s.resolve("MmAllocateSpecialPool").unwrap(),
            s.resolve("nt!MmAllocateSpecialPool").unwrap()
        );
        if arch == Arch::X86 {
            // Decorated and plain forms resolve alike.
            assert_eq!(
                s.resolve("nt!_ExAllocatePoolWithTag@12").unwrap(),
                export("ExAllocatePoolWithTag")
            );
            assert_eq!(
                s.resolve("nt!KiCallDriverEntry").unwrap(),
                s.resolve("nt!_KiCallDriverEntry@12").unwrap()
            );
        }
        assert!(matches!(
            s.resolve("nope!X"),
            Err(NameError::UnknownModule(_))
        ));
        assert!(matches!(
            s.resolve("nt!NoSuchFunction"),
            Err(NameError::UnknownSymbol { .. })
        ));
        assert!(matches!(s.resolve("nt!"), Err(NameError::BadExpression(_))));
        assert!(matches!(
            s.resolve("nt!X+zz"),
            Err(NameError::BadExpression(_))
        ));
    }
}

#[test]
fn address_to_name_with_lines() {
    for arch in [Arch::Amd64, Arch::X86] {
        let s = set(arch, true, true);
        let f = s.resolve("nt!MmAllocateSpecialPool").unwrap();
        assert_eq!(s.describe(f, false).to_string(), "nt!MmAllocateSpecialPool");
        let loc = s.describe(f + 3, false);
        assert_eq!(loc.to_string(), "nt!MmAllocateSpecialPool+0x3");
        let src = loc.source.clone().expect("line info");
        assert!(src.file.ends_with("pool_classic.c"), "{src:?}");
        assert!(loc.with_source().contains(" @ "), "{}", loc.with_source());
        // A return address at the very start of the next function belongs to the call's
        // function.
        let next = s.resolve("nt!MmFreeSpecialPool").unwrap();
        let as_ret = s.describe(next, true);
        assert_ne!(
            as_ret.symbol.as_deref(),
            Some("MmFreeSpecialPool"),
            "{as_ret}"
        );
        // x86 names are shown undecorated.
        let d = s.describe(s.resolve("nt!ExAllocatePoolWithTag").unwrap(), false);
        assert_eq!(d.to_string(), "nt!ExAllocatePoolWithTag");
        // Outside every module: the bare address.
        assert_eq!(s.describe(0x1234, false).to_string(), "0x1234");
    }
}

#[test]
fn exports_when_there_is_no_pdb_and_module_offsets_when_nothing() {
    let mut s = set(Arch::Amd64, false, true);
    let base = s.by_name("nt").unwrap().base;
    let pe: PeFile = (*s.by_name("nt").unwrap().image.clone().unwrap()).clone();
    s.by_name_mut("nt").unwrap().attach_exports(pe.exports());
    let a = s.resolve("nt!ExAllocatePool2").unwrap();
    assert_eq!(
        s.describe(a + 5, false).to_string(),
        "nt!ExAllocatePool2+0x5"
    );
    assert!(
        s.resolve("nt!MmAllocateSpecialPool").is_err(),
        "not exported"
    );
    let err = s.resolve("leakydrv!LeakyWorker").unwrap_err().to_string();
    assert!(err.contains("no symbols"), "{err}");
    // leakydrv has neither: module+offset.
    let l = s.by_name("leakydrv").unwrap().base;
    assert_eq!(s.describe(l + 0x1234, false).to_string(), "leakydrv+0x1234");
    assert!(base != l);
}
