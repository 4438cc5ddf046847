//! The 527 real packets of the KDNET capture, re-framed as KDCOM, through `wire::Decoder`.
//!
//! Frame 3 is KDNET's own first packet (leader 0x00000000, type UNUSED): not a KDCOM frame. A
//! serial line never carries it, and the decoder must treat its 16 bytes as noise, which is
//! what these tests check; the other 526 packets must come out intact.

mod common;

use common::*;
use kdpilot_kd::wire::{checksum, DecodeEvent, Decoder, Leader, Packet};

/// Packets the decoder must produce, in order, and the number of noise bytes it must skip.
fn expected() -> (Vec<(u32, Packet)>, u64) {
    let mut out = Vec::new();
    let mut noise = 0;
    for v in vectors() {
        let leader = match v.leader {
            DATA_LEADER => Leader::Data,
            CONTROL_LEADER => Leader::Control,
            0 => {
                assert_eq!(v.frame, 3, "only KDNET's first packet has a zero leader");
                noise += kdcom_bytes(&v).len() as u64;
                continue;
            }
            other => panic!("frame {}: leader {other:#x}", v.frame),
        };
        out.push((
            v.frame,
            Packet {
                leader,
                packet_type: v.packet_type,
                id: v.id,
                payload: v.payload.clone(),
            },
        ));
    }
    (out, noise)
}

fn stream() -> Vec<u8> {
    vectors().iter().flat_map(kdcom_bytes).collect()
}

fn check(events: Vec<DecodeEvent>, decoder: &Decoder, how: &str) {
    let (want, noise) = expected();
    let got: Vec<Packet> = events
        .into_iter()
        .map(|e| match e {
            DecodeEvent::Packet(p) => p,
            other => panic!("{how}: unexpected event {other:?}"),
        })
        .collect();
    assert_eq!(got.len(), want.len(), "{how}: packet count");
    for (g, (frame, w)) in got.iter().zip(&want) {
        assert_eq!(g, w, "{how}: frame {frame}");
    }
    assert_eq!(decoder.skipped_bytes(), noise, "{how}: noise bytes");
    assert!(decoder.is_idle(), "{how}: decoder left mid-frame");
}

#[test]
fn vector_set_is_complete() {
    let v = vectors();
    assert_eq!(v.len(), 527);
    for x in &v {
        assert_eq!(x.count as usize, x.payload.len(), "frame {}", x.frame);
        assert_eq!(
            checksum(&x.payload),
            x.checksum,
            "frame {}: checksum",
            x.frame
        );
    }
}

#[test]
fn one_stream() {
    let mut d = Decoder::new();
    let mut ev = Vec::new();
    d.feed(&stream(), &mut ev);
    check(ev, &d, "one stream");
}

#[test]
fn byte_at_a_time() {
    let mut d = Decoder::new();
    let mut ev = Vec::new();
    for b in stream() {
        if let Some(e) = d.push(b) {
            ev.push(e);
        }
    }
    check(ev, &d, "byte at a time");
}

#[test]
fn random_splits() {
    let bytes = stream();
    for seed in 1..=20u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let mut d = Decoder::new();
        let mut ev = Vec::new();
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let max = [3u64, 17, 64, 1500, 5000][(seed % 5) as usize];
            let n = (1 + rng.below(max) as usize).min(rest.len());
            d.feed(&rest[..n], &mut ev);
            rest = &rest[n..];
        }
        check(ev, &d, &format!("random splits, seed {seed}"));
    }
}

#[test]
fn every_packet_alone_and_reencoded() {
    for v in vectors() {
        let wire = kdcom_bytes(&v);
        let mut d = Decoder::new();
        let mut ev = Vec::new();
        d.feed(&wire, &mut ev);
        if v.leader == 0 {
            assert!(ev.is_empty(), "frame {}", v.frame);
            continue;
        }
        let [DecodeEvent::Packet(p)] = &ev[..] else {
            panic!("frame {}: {ev:?}", v.frame)
        };
        assert_eq!(
            p.wire_checksum(),
            if v.leader == DATA_LEADER {
                v.checksum
            } else {
                0
            }
        );
        // The crate's encoder reproduces the KDCOM bytes built independently above.
        assert_eq!(p.encode(), wire, "frame {}: encode", v.frame);
    }
}
