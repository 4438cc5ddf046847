//! Manipulate::parse, then every typed decode_request / decode_reply for both architectures
//! (once as parsed, once with the ApiNumber forced to each typed API). Whatever decodes must
//! re-encode and decode to the same value.
#![no_main]

use kdpilot_kd::api::*;
use kdpilot_kd::Arch;
use libfuzzer_sys::fuzz_target;

fn check<A: Api + PartialEq + std::fmt::Debug>(m: &Manipulate) {
    for arch in [Arch::Amd64, Arch::X86] {
        if let Ok(req) = A::decode_request(m, arch) {
            let again = Manipulate::parse(&req.encode_request(arch).encode()).unwrap();
            assert_eq!(A::decode_request(&again, arch).unwrap(), req);
            let _ = req.decode_reply(m, arch);
        }
    }
}

macro_rules! all {
    ($m:expr) => {
        check::<GetVersion>($m);
        check::<ReadVirtualMemory>($m);
        check::<WriteVirtualMemory>($m);
        check::<ReadPhysicalMemory>($m);
        check::<WritePhysicalMemory>($m);
        check::<ReadControlSpace>($m);
        check::<WriteControlSpace>($m);
        check::<GetContext>($m);
        check::<SetContext>($m);
        check::<GetContextEx>($m);
        check::<SetContextEx>($m);
        check::<WriteBreakPoint>($m);
        check::<RestoreBreakPoint>($m);
        check::<Continue>($m);
        check::<Continue2>($m);
        check::<Reboot>($m);
        check::<SwitchProcessor>($m);
        check::<SearchMemory>($m);
        check::<ReadMsr>($m);
        check::<WriteMsr>($m);
        check::<QueryMemory>($m);
    };
}

fuzz_target!(|data: &[u8]| {
    let Ok(m) = Manipulate::parse(data) else {
        return;
    };
    assert_eq!(m.encode(), data);
    let _ = (m.succeeded(), m.check(m.api), number::name(m.api));
    all!(&m);
    for api in [
        0x3130u32, 0x3131, 0x3132, 0x3133, 0x3134, 0x3135, 0x3136, 0x3137, 0x3138, 0x313B, 0x313C,
        0x313D, 0x313E, 0x3146, 0x3150, 0x3152, 0x3153, 0x3156, 0x315C, 0x315F, 0x3160,
    ] {
        let mut forced = m.clone();
        forced.api = api;
        all!(&forced);
    }
});
