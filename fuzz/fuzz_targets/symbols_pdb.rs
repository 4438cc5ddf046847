//! PDB files as a symbol server or a cache could hand them over: arbitrary bytes, seeded with
//! the fixtures' real PDBs (x64 and x86, with x86 frame data). Parsing ends with symbols or an
//! error, never a panic that escapes or a hang, and every lookup on what parsed is answered.
//!
//! The PDB crates (pdb2, pdb-addr2line) do panic on some corrupt inputs (a debug assertion in
//! pdb2's line tables); `ModuleSymbols` catches those and gives the part up. libFuzzer's panic
//! hook would abort on them before the catch: panics raised inside those crates are let
//! through to it, any other panic aborts as before.
#![no_main]

use std::sync::Once;

use kdpilot_symbols::{Guid, ModuleSymbols, PdbId, PdbSignature};
use libfuzzer_sys::fuzz_target;

static HOOK: Once = Once::new();

fn strict_hook_outside_the_pdb_crates() {
    HOOK.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            let file = info.location().map(|l| l.file()).unwrap_or("");
            if file.contains("/pdb2-") || file.contains("/pdb-addr2line-") {
                return; // caught by ModuleSymbols
            }
            eprintln!("{info}");
            std::process::abort();
        }));
    });
}

fuzz_target!(|data: &[u8]| {
    strict_hook_outside_the_pdb_crates();
    // With an identity to check against (the store's path), and without (a flat directory).
    let expected = PdbId {
        name: "ntkrnlmp.pdb".into(),
        signature: PdbSignature::Guid(Guid([0x42; 16])),
        age: 1,
    };
    let _ = ModuleSymbols::parse(data.to_vec(), Some(&expected));
    let Ok(s) = ModuleSymbols::parse(data.to_vec(), None) else {
        return;
    };
    let _ = (s.signature(), s.age(), s.is_x86());
    let mut rvas: Vec<u32> = s.functions().iter().take(64).map(|f| f.rva).collect();
    rvas.extend([0, 1, 0x1000, 0x7fff_ffff, u32::MAX]);
    for &rva in &rvas {
        if let Some(f) = s.function_at(rva) {
            assert!(f.rva <= rva, "function_at({rva:#x}) starts after it");
            assert_eq!(s.rva_of(&f.name).is_some(), true);
        }
        let _ = s.frame_record(rva);
        let _ = s.frame_record(rva.wrapping_add(1));
    }
    let _ = s.source_lines(&rvas);
    for f in s.frame_records().iter().take(64) {
        let _ = f.program.as_deref().map(str::len);
    }
    let _ = s.names().take(256).count();
});
