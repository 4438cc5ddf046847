//! Arbitrary bytes through the KDCOM byte-pump decoder: whole, byte at a time, and in the
//! split sizes the input's first byte picks. All three must yield the same events, and every
//! packet must re-encode to a frame that decodes to itself.
#![no_main]

use kdpilot_kd::wire::{DecodeEvent, Decoder, Leader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (split, data) = match data.split_first() {
        Some((s, rest)) => (usize::from(*s % 64) + 1, rest),
        None => (1, data),
    };

    let mut whole = Decoder::new();
    let mut a = Vec::new();
    whole.feed(data, &mut a);

    let mut bytewise = Decoder::new();
    let mut b = Vec::new();
    for &x in data {
        if let Some(e) = bytewise.push(x) {
            b.push(e);
        }
    }
    assert_eq!(a, b);
    assert_eq!(whole.skipped_bytes(), bytewise.skipped_bytes());

    let mut chunked = Decoder::new();
    let mut c = Vec::new();
    for chunk in data.chunks(split) {
        chunked.feed(chunk, &mut c);
    }
    assert_eq!(a, c);
    let _ = chunked.partial_len();
    let _ = chunked.abandon_partial();

    for e in &a {
        if let DecodeEvent::Packet(p) = e {
            let wire = p.encode();
            assert_eq!(wire.len(), p.wire_len());
            let mut d = Decoder::new();
            let mut out = Vec::new();
            d.feed(&wire, &mut out);
            match p.leader {
                Leader::Data => assert_eq!(out, [DecodeEvent::Packet(p.clone())]),
                Leader::Control => assert_eq!(out.len(), 1),
            }
        }
    }
});
