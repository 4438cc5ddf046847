//! PsLoadedModuleList walks over arbitrary memory, x64 and x86: cycles, limits and broken
//! links end the walk; names stay within their bound; the module set builds from whatever came
//! back.
#![no_main]

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use kdpilot_symbols::{walk_module_list, Arch, KernelInfo, MockMemory, ModuleSet, WalkLimits};
use libfuzzer_sys::fuzz_target;

fn ready<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let arch = if selector & 1 == 0 {
        Arch::Amd64
    } else {
        Arch::X86
    };
    // The input is memory at a base chosen so that pointers in it can point back into it.
    let base = match arch {
        Arch::Amd64 => 0xFFFF_F800_0000_0000u64,
        Arch::X86 => 0xFFFF_FFFF_8000_0000,
    };
    let mut mem = MockMemory::new();
    mem.write(base, rest);
    let limits = WalkLimits {
        max_modules: 64,
        max_name_bytes: 256,
    };
    let Ok(walk) = ready(walk_module_list(&mut mem, arch, base, &limits)) else {
        return;
    };
    assert!(walk.entries.len() <= limits.max_modules);
    for e in &walk.entries {
        assert!(e.base_name.encode_utf16().count() * 2 <= limits.max_name_bytes);
        assert!(e.full_name.encode_utf16().count() * 2 <= limits.max_name_bytes);
    }
    let kernel = KernelInfo {
        arch,
        kern_base: walk.entries.first().map(|e| e.base).unwrap_or(0),
        ps_loaded_module_list: base,
    };
    if let Ok(set) = ready(ModuleSet::from_entries(&mut mem, &kernel, &walk.entries)) {
        let _ = set.stable_ranges();
        for m in set.modules() {
            let _ = (m.pdb_id(), m.image_id());
            let _ = set.describe(m.base, false);
        }
    }
});
