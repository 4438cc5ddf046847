//! KDDEBUGGER_DATA64 and loaded-module entries on arbitrary bytes: every accessor stays inside
//! both Size and the bytes read.
#![no_main]

use kdpilot_kd::kddebugger_data::{DebugDataHeader64, KdDebuggerData64, LdrEntry};
use kdpilot_kd::Arch;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = DebugDataHeader64::parse(data) {
        assert_eq!(h.encode()[..], data[..24]);
    }
    for arch in [Arch::Amd64, Arch::X86] {
        let _ = LdrEntry::parse(arch, data);
    }
    let Ok(k) = KdDebuggerData64::parse(data) else {
        return;
    };
    let usable = k.usable_len();
    assert!(usable <= data.len());
    for off in 0..data.len() + 16 {
        if k.u64_at(off).is_some() {
            assert!(off + 8 <= usable);
        }
        if k.u16_at(off).is_some() {
            assert!(off + 2 <= usable);
        }
        let _ = k.u32_at(off);
    }
    let _ = (
        k.is_valid(),
        k.kern_base(),
        k.ps_loaded_module_list(),
        k.ki_processor_block(),
        k.mm_special_pool_tag(),
        k.nt_build_lab(),
        k.pae_enabled(),
        k.offset_prcb_context(),
        k.pte_base(),
    );
    let mut m = k.clone();
    m.set_u64(data.len(), 1);
    m.set_u16(usize::MAX, 1);
    assert_eq!(m.as_bytes().len(), data.len());
});
