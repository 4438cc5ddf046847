//! Link-layer tests: framing, the byte-pump decoder and the packet-id rules.
//!
//! The expected wire bytes below are written out by hand from kd-protocol.md 1.2/1.7, not
//! produced by the encoder, so an encoder and decoder that share a mistake cannot pass.

use kdpilot_kd::wire::{
    checksum, packet_type, DecodeEvent, Decoder, FrameError, HostIds, Incoming, Leader, Packet,
    TargetIds, TargetIncoming,
};
use proptest::prelude::*;

/// A RESET control packet as WinDbg sends it (T2 begins with five of these).
const RESET_BYTES: [u8; 16] = [
    0x69, 0x69, 0x69, 0x69, 0x06, 0x00, 0x00, 0x00, 0, 0, 0, 0, 0, 0, 0, 0,
];

/// A 3-byte DEBUG_IO data packet with id 0x80800001 written by hand.
fn hand_data_packet() -> Vec<u8> {
    vec![
        0x30, 0x30, 0x30, 0x30, // leader
        0x03, 0x00, // DEBUG_IO
        0x03, 0x00, // ByteCount
        0x01, 0x00, 0x80, 0x80, // id
        0x06, 0x00, 0x00, 0x00, // checksum 1+2+3
        0x01, 0x02, 0x03, 0xAA,
    ]
}

fn decode_all(bytes: &[u8]) -> Vec<DecodeEvent> {
    let mut d = Decoder::new();
    let mut out = Vec::new();
    d.feed(bytes, &mut out);
    out
}

#[test]
fn encodes_reset_exactly() {
    assert_eq!(Packet::reset().encode(), RESET_BYTES);
}

#[test]
fn encodes_data_exactly() {
    let p = Packet::data(packet_type::KD_DEBUG_IO, 0x8080_0001, vec![1, 2, 3]).unwrap();
    assert_eq!(p.encode(), hand_data_packet());
    assert_eq!(p.wire_len(), 20);
}

#[test]
fn ack_clears_sync_bit() {
    let ack = Packet::ack(0x8080_0800);
    assert_eq!(ack.id, 0x8080_0000);
    assert_eq!(
        ack.encode(),
        [0x69, 0x69, 0x69, 0x69, 4, 0, 0, 0, 0x00, 0x00, 0x80, 0x80, 0, 0, 0, 0]
    );
}

#[test]
fn rejects_oversized_payload() {
    assert!(Packet::data(2, 0x8080_0000, vec![0; 4000]).is_ok());
    assert!(Packet::data(2, 0x8080_0000, vec![0; 4001]).is_err());
}

#[test]
fn decodes_hand_packets() {
    let mut bytes = RESET_BYTES.to_vec();
    bytes.extend(hand_data_packet());
    let ev = decode_all(&bytes);
    assert_eq!(
        ev,
        vec![
            DecodeEvent::Packet(Packet::reset()),
            DecodeEvent::Packet(Packet {
                leader: Leader::Data,
                packet_type: 3,
                id: 0x8080_0001,
                payload: vec![1, 2, 3]
            })
        ]
    );
}

#[test]
fn skips_garbage_and_partial_leaders() {
    // "000" then 'i' restarts the count; "iii0" likewise; random bytes in between.
    let mut bytes = b"\x00\xffhello000i00x0ii0".to_vec();
    bytes.extend(hand_data_packet());
    let mut d = Decoder::new();
    let mut ev = Vec::new();
    d.feed(&bytes, &mut ev);
    assert_eq!(ev.len(), 1);
    assert!(matches!(&ev[0], DecodeEvent::Packet(p) if p.payload == [1, 2, 3]));
    assert_eq!(d.skipped_bytes(), 18);
    assert!(d.is_idle());
}

#[test]
fn reports_break_in_byte_between_packets_only() {
    let ev = decode_all(b"xxbyy");
    assert_eq!(ev, vec![DecodeEvent::BreakIn]);
    // A 'b' inside a payload is data.
    let p = Packet::data(3, 0x8080_0000, b"bbb".to_vec()).unwrap();
    let ev = decode_all(&p.encode());
    assert!(matches!(&ev[..], [DecodeEvent::Packet(q)] if q.payload == b"bbb"));
}

#[test]
fn bad_checksum_is_an_event_and_next_packet_survives() {
    let mut bad = hand_data_packet();
    bad[17] ^= 0x10; // payload byte flipped
    bad.extend(hand_data_packet());
    let ev = decode_all(&bad);
    assert_eq!(ev.len(), 2);
    assert_eq!(
        ev[0],
        DecodeEvent::Error(FrameError::BadChecksum {
            id: 0x8080_0001,
            expected: 6,
            actual: 22
        })
    );
    assert!(matches!(ev[1], DecodeEvent::Packet(_)));
}

#[test]
fn dropped_payload_byte_does_not_lose_the_next_packet() {
    let mut bytes = hand_data_packet();
    bytes.remove(17); // one payload byte lost on the line
    bytes.extend(hand_data_packet());
    let ev = decode_all(&bytes);
    // The trailer position now holds the next packet's first '0': reported, then reused.
    assert!(matches!(
        ev[0],
        DecodeEvent::Error(FrameError::BadTrailer { byte: 0x30, .. })
    ));
    assert!(matches!(&ev[1], DecodeEvent::Packet(p) if p.payload == [1, 2, 3]));
    assert_eq!(ev.len(), 2);
}

#[test]
fn too_long_count_is_rejected_without_reading_it() {
    let mut bytes = hand_data_packet();
    bytes[6] = 0xA1; // ByteCount 0x0FA1 = 4001
    bytes[7] = 0x0F;
    let ev = decode_all(&bytes[..16]);
    assert_eq!(
        ev,
        vec![DecodeEvent::Error(FrameError::TooLong {
            id: 0x8080_0001,
            count: 4001,
            limit: 4000
        })]
    );
}

#[test]
fn control_packet_ignores_byte_count() {
    let mut bytes = RESET_BYTES.to_vec();
    bytes[6] = 5; // nonsense count on a control packet: no payload follows
    bytes.extend(hand_data_packet());
    let ev = decode_all(&bytes);
    assert_eq!(ev.len(), 2);
}

#[test]
fn abandon_partial_reports_truncation() {
    let mut d = Decoder::new();
    let mut ev = Vec::new();
    d.feed(&hand_data_packet()[..10], &mut ev);
    assert!(ev.is_empty());
    assert_eq!(
        d.abandon_partial(),
        Some(DecodeEvent::Error(FrameError::Truncated {
            received: 10,
            id: None
        }))
    );
    d.feed(&hand_data_packet(), &mut ev);
    assert_eq!(ev.len(), 1);
    assert_eq!(d.abandon_partial(), None);
}

#[test]
fn zero_length_data_packet() {
    let p = Packet::data(3, 0x8080_0000, vec![]).unwrap();
    let ev = decode_all(&p.encode());
    assert_eq!(ev, vec![DecodeEvent::Packet(p)]);
}

#[test]
fn host_ids_follow_the_sheet() {
    let mut h = HostIds::new();
    assert_eq!(h.next_send_id(), 0x8080_0000);
    assert!(!h.on_ack(0x8080_0001));
    assert!(h.on_ack(0x8080_0000));
    assert_eq!(h.next_send_id(), 0x8080_0001);
    // SYNC id from a booting target: new sequence, and our own ids start over too.
    assert_eq!(h.next_send_id(), 0x8080_0001);
    assert_eq!(h.on_data(0x8080_0800), Incoming::New);
    assert_eq!(h.expected_id(), Some(0x8080_0001));
    assert_eq!(h.next_send_id(), 0x8080_0000);
    // After a RESET exchange the same state change comes again with 0x80800000: it is the
    // other id of the pair, i.e. a duplicate, unless the caller resets (it must: see client).
    assert_eq!(h.on_data(0x8080_0000), Incoming::Duplicate);
    assert_eq!(h.on_data(0x8080_0001), Incoming::New);
    assert_eq!(h.on_data(0x8080_0001), Incoming::Duplicate);
    assert_eq!(h.on_data(0x8080_0000), Incoming::New);
    h.reset();
    assert_eq!(h.next_send_id(), 0x8080_0000);
    assert_eq!(h.expected_id(), Some(0x8080_0000));
    h.forget_expected();
    assert_eq!(h.on_data(0x8080_0001), Incoming::New);
    assert_eq!(h.expected_id(), Some(0x8080_0000));
}

#[test]
fn target_ids_follow_the_sheet() {
    let mut t = TargetIds::boot();
    assert_eq!(t.next_send_id(), 0x8080_0800);
    assert!(t.ack_matches(0x8080_0000));
    assert!(!t.ack_matches(0x8080_0800));
    t.on_sent();
    assert_eq!(t.next_send_id(), 0x8080_0001);
    assert_eq!(t.on_data(0x8080_0000), TargetIncoming::New);
    assert_eq!(t.on_data(0x8080_0000), TargetIncoming::Duplicate);
    assert_eq!(t.on_data(0x1234_5678), TargetIncoming::Invalid);
    assert_eq!(t.on_data(0x8080_0001), TargetIncoming::New);
    t.reset();
    assert_eq!(t.next_send_id(), 0x8080_0000);
    assert_eq!(t.expected_id(), 0x8080_0000);
}

fn arb_packet() -> impl Strategy<Value = Packet> {
    prop_oneof![
        (
            0u16..12,
            any::<u32>(),
            proptest::collection::vec(any::<u8>(), 0..300)
        )
            .prop_map(|(t, id, p)| Packet::data(t, id, p).unwrap()),
        (4u16..7, any::<u32>()).prop_map(|(t, id)| Packet::control(t, id)),
    ]
}

proptest! {
    #[test]
    fn round_trip_in_any_split(
        packets in proptest::collection::vec(arb_packet(), 1..8),
        garbage in proptest::collection::vec(any::<u8>().prop_filter("no leader bytes", |b| *b != b'0' && *b != b'i' && *b != b'b'), 0..20),
        splits in proptest::collection::vec(1usize..50, 1..20),
    ) {
        let mut bytes = garbage.clone();
        for p in &packets { p.encode_into(&mut bytes); }
        let mut d = Decoder::new();
        let mut ev = Vec::new();
        let mut rest = &bytes[..];
        let mut i = 0;
        while !rest.is_empty() {
            let n = splits[i % splits.len()].min(rest.len());
            d.feed(&rest[..n], &mut ev);
            rest = &rest[n..];
            i += 1;
        }
        let got: Vec<Packet> = ev.into_iter().map(|e| match e { DecodeEvent::Packet(p) => p, other => panic!("{other:?}") }).collect();
        prop_assert_eq!(got, packets);
        prop_assert_eq!(d.skipped_bytes(), garbage.len() as u64);
    }

    #[test]
    fn never_panics_and_recovers(noise in proptest::collection::vec(any::<u8>(), 0..2000)) {
        let mut d = Decoder::new();
        let mut ev = Vec::new();
        d.feed(&noise, &mut ev);
        d.abandon_partial();
        // Whatever the noise did, a good packet afterwards is decoded.
        ev.clear();
        d.feed(&hand_data_packet(), &mut ev);
        prop_assert!(ev.iter().any(|e| matches!(e, DecodeEvent::Packet(p) if p.payload == [1,2,3])));
    }

    #[test]
    fn checksum_is_byte_sum(p in proptest::collection::vec(any::<u8>(), 0..4000)) {
        prop_assert_eq!(checksum(&p), p.iter().map(|&b| u32::from(b)).sum::<u32>());
    }
}
