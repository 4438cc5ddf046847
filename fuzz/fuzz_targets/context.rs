//! CONTEXT parsing and register access on arbitrary bytes, both layouts; partial updates at
//! offsets taken from the input.
#![no_main]

use kdpilot_kd::context::{Amd64Reg, Context, ContextRange, X86Reg};
use kdpilot_kd::Arch;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let offset = data
        .get(..4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .unwrap_or(0);
    for arch in [Arch::Amd64, Arch::X86] {
        let mut c = match Context::parse(arch, data) {
            Ok(c) => {
                assert_eq!(c.as_bytes(), &data[..arch.context_size()]);
                c
            }
            Err(_) => Context::zeroed(arch),
        };
        let _ = (c.pc(), c.sp(), c.fp(), c.eflags(), c.context_flags());
        let n = c.apply_partial(offset, data);
        assert!(n <= data.len());
        let r = ContextRange {
            offset,
            byte_count: data.len() as u32,
        };
        assert!(c.range_bytes(r).len() <= arch.context_size());
        match &mut c {
            Context::Amd64(a) => {
                for reg in Amd64Reg::ALL {
                    let v = a.get(*reg);
                    a.set(*reg, v);
                    assert_eq!(a.get(*reg), v);
                }
            }
            Context::X86(x) => {
                for reg in X86Reg::ALL {
                    let v = x.get(*reg);
                    x.set(*reg, v);
                    assert_eq!(x.get(*reg), v);
                }
            }
        }
    }
    let _ = ContextRange::pc_sp_fp(Arch::Amd64).fits(Arch::Amd64);
});
