//! StateChange::parse on arbitrary bytes: byte-exact re-encode, the control report in both
//! layouts, and every helper.
#![no_main]

use kdpilot_kd::state_change::{StateChange, StateInfo};
use kdpilot_kd::Arch;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = StateChange::parse(data) else {
        return;
    };
    assert_eq!(s.encode(), data);
    assert_eq!(StateChange::parse(&s.encode()).unwrap(), s);
    for arch in [Arch::Amd64, Arch::X86] {
        let r = s.control_report(arch);
        let _ = (r.dr6(), r.dr7(), r.eflags(), r.report_flags(), r.segments());
        assert!(r.instructions().len() <= 16);
        let mut t = s.clone();
        t.set_control_report(&r);
        assert_eq!(t.encode(), data);
    }
    let _ = (
        s.kind(),
        s.is_alternate(),
        s.is_breakpoint(),
        s.is_single_step(),
        s.is_unload_all(),
        s.is_hibernate(),
        s.exception_code(),
    );
    match &s.info {
        StateInfo::Exception(e) => {
            assert!(e.record.parameters().len() <= 15);
        }
        StateInfo::LoadSymbols(l) => {
            assert!(l.path.len() <= l.path_name_length as usize);
            let _ = l.path_str();
        }
        StateInfo::CommandString(c) => {
            let _ = (c.name(), c.command());
        }
        StateInfo::Unknown => {}
    }
});
