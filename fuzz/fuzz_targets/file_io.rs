//! FileIo::parse on arbitrary bytes: re-encode, typed op, file name, WinDbg's reply.
#![no_main]

use kdpilot_kd::file_io::{utf16_lossy, FileIo};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = utf16_lossy(data);
    let Ok(f) = FileIo::parse(data) else {
        return;
    };
    assert_eq!(f.encode(), data);
    let _ = f.file_name();
    let r = f.reply_no_such_file().encode();
    assert_eq!(r.len(), 64);
    if let Ok(op) = f.op() {
        let again = FileIo::parse(&op.to_file_io().encode()).unwrap();
        assert_eq!(again.op().unwrap(), op);
    }
});
