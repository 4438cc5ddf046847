//! Strategy choice on the fixture kernels: auto picks the allocator each kernel shape really
//! calls; missing symbols name the strategies that would work.

use std::path::PathBuf;

use kdpilot_capture::strategy::{plan, Plan, StrategyChoice, StrategyError};
use kdpilot_symbols::{Arch, Module, ModuleSet, ModuleSymbols};

fn kernel(arch: &str, flavour: &str, with_pdb: bool) -> ModuleSet {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/out")
        .join(arch)
        .join(flavour);
    let pdb = if arch == "x64" {
        "ntkrnlmp.pdb"
    } else {
        "ntkrpamp.pdb"
    };
    let mut nt = Module::new("nt", "ntoskrnl.exe", 0xfffff801_0f400000, 0x10000);
    if with_pdb {
        let bytes = std::fs::read(dir.join(pdb)).unwrap();
        nt.attach_symbols(ModuleSymbols::parse(bytes, None).unwrap(), dir.join(pdb));
    }
    ModuleSet::new(
        Some(if arch == "x64" {
            Arch::Amd64
        } else {
            Arch::X86
        }),
        vec![nt],
    )
}

fn target(p: &Plan) -> String {
    p.target()
}

#[test]
fn auto_follows_the_kernel_shape() {
    for arch in ["x64", "x86"] {
        let classic = plan(&StrategyChoice::Auto, &kernel(arch, "classic", true)).unwrap();
        assert_eq!(target(&classic), "nt!MmAllocateSpecialPool", "{arch}");
        assert!(classic.why().contains("classic"));
        let modern = plan(&StrategyChoice::Auto, &kernel(arch, "modern", true)).unwrap();
        assert_eq!(target(&modern), "nt!ExAllocateHeapSpecialPool", "{arch}");
        assert!(modern.why().contains("never called"));
        // The tag is the 2nd argument of MmAllocateSpecialPool and the 3rd of the heap allocator.
        let Plan::Breakpoint { args, .. } = classic else {
            panic!()
        };
        assert_eq!(args.tag, Some(1));
        let Plan::Breakpoint { args, .. } = modern else {
            panic!()
        };
        assert_eq!(args.tag, Some(2));
    }
}

#[test]
fn pool_hit_tag_and_breakpoint_strategies() {
    let set = kernel("x64", "modern", true);
    let p = plan(&StrategyChoice::PoolHitTag, &set).unwrap();
    assert!(matches!(p, Plan::PoolHitTag { address, .. } if address > 0xfffff801_0f400000));
    let p = plan(&"breakpoint=nt!ExAllocatePool2".parse().unwrap(), &set).unwrap();
    let Plan::Breakpoint { symbol, args, .. } = p else {
        panic!()
    };
    assert_eq!(symbol, "nt!ExAllocatePool2");
    assert_eq!(args.tag, Some(2));
}

#[test]
fn missing_symbols_name_what_would_work() {
    let set = kernel("x64", "modern", true);
    let err = plan(
        &StrategyChoice::Breakpoint("nt!NoSuchFunction".into()),
        &set,
    )
    .unwrap_err();
    let StrategyError::MissingSymbol { advice, .. } = &err;
    assert!(advice.contains("--strategy special-pool"), "{err}");
    assert!(advice.contains("--strategy pool-hit-tag"), "{err}");
    let bare = kernel("x64", "modern", false);
    let err = plan(&StrategyChoice::Auto, &bare).unwrap_err().to_string();
    assert!(err.contains("--symbols"), "{err}");
    assert!(err.contains("no symbol path"), "{err}");
    // Looked for and not found: the reason (the PDB's name and identity, the path tried) is
    // in the message, not only "no symbols".
    let mut missing = kernel("x64", "modern", false);
    missing.modules_mut()[0].symbol_status = kdpilot_symbols::SymbolStatus::NotFound(
        "ntkrnlmp.pdb 8794B7A4B563990E4C4C44205044422E 1 not in /nowhere".into(),
    );
    let err = plan(&StrategyChoice::Auto, &missing)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("8794B7A4B563990E4C4C44205044422E 1 not in /nowhere"),
        "{err}"
    );
    assert!(err.contains("_NT_SYMBOL_PATH"), "{err}");
}

#[test]
fn strategy_strings() {
    assert_eq!(
        "auto".parse::<StrategyChoice>().unwrap(),
        StrategyChoice::Auto
    );
    assert_eq!(
        "special-pool".parse::<StrategyChoice>().unwrap(),
        StrategyChoice::SpecialPool
    );
    assert_eq!(
        "pool-hit-tag".parse::<StrategyChoice>().unwrap(),
        StrategyChoice::PoolHitTag
    );
    assert!("breakpoint=".parse::<StrategyChoice>().is_err());
    let e = "fast".parse::<StrategyChoice>().unwrap_err().to_string();
    assert!(
        e.contains("special-pool") && e.contains("breakpoint="),
        "{e}"
    );
}
