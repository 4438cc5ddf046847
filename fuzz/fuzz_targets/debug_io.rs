//! DebugIo::parse on arbitrary bytes: re-encode, typed message, prompt reply (both ways).
#![no_main]

use kdpilot_kd::debug_io::DebugIo;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(d) = DebugIo::parse(data) else {
        return;
    };
    assert_eq!(d.encode(), data);
    assert!(d.string().len() <= d.data.len());
    let _ = d.text();
    if let Ok(msg) = d.message() {
        let again = DebugIo::parse(&msg.to_debug_io().encode()).unwrap();
        assert_eq!(again.message().unwrap(), msg);
    }
    let reply = d.prompt_reply(data);
    assert!(reply.data.len() <= d.length_of_string_read as usize);
    let parsed = DebugIo::parse(&reply.encode()).unwrap();
    assert_eq!(parsed.reply().unwrap().answer, reply.data);
    let _ = d.reply();
});
