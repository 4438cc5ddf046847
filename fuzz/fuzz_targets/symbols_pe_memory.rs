//! PE headers, CodeView records and export tables read from target memory that holds arbitrary
//! bytes: bounded reads, no panics, and what parses from memory parses the same from a file.
#![no_main]

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use kdpilot_symbols::pe::{self, PeFile, PeHeaders};
use kdpilot_symbols::MockMemory;
use libfuzzer_sys::fuzz_target;

/// MockMemory never waits: one poll finishes any future over it.
fn ready<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
}

const BASE: u64 = 0xFFFF_F800_0100_0000;

fuzz_target!(|data: &[u8]| {
    let mut mem = MockMemory::new();
    mem.write(BASE, data);
    let from_memory = ready(pe::read_headers(&mut mem, BASE));
    assert!(mem.reads().iter().all(|&(_, n)| n <= pe::MAX_HEADER_BYTES));
    if let Ok(h) = &from_memory {
        assert!(h.sections.len() <= pe::MAX_SECTIONS);
        assert!(h.size_of_image <= pe::MAX_IMAGE_SIZE);
        let _ = ready(pe::read_codeview(&mut mem, BASE, h)).map(|cv| cv.map(|c| c.pdb_id()));
        let _ = ready(pe::read_exports(&mut mem, BASE, h, 1 << 16));
        let _ = h.stable_rva_ranges();
        let _ = h.rva_to_file_offset(h.entry_point);
        assert!(mem.reads().iter().all(|&(_, n)| n <= 1 << 16));
    }
    let from_bytes = PeHeaders::parse(data);
    if let (Ok(a), Ok(b)) = (&from_memory, &from_bytes) {
        assert_eq!(a, b);
    }
    if let Ok(f) = PeFile::parse(data.to_vec()) {
        let _ = f.codeview();
        let _ = f.exports();
        let _ = f.exception_directory();
        for rva in [0u32, 0x1000, f.headers().entry_point, u32::MAX] {
            let _ = f.at_rva(rva);
            let _ = f.read_rva(rva, 64);
        }
    }
});
