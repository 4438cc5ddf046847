//! Loading the real-traffic vectors (tests/vectors/README.md).
#![allow(dead_code)]

use std::collections::BTreeMap;

use serde::Deserialize;

/// One packet of kdnet-windbg-win10.json.
#[derive(Clone, Debug, Deserialize)]
pub struct Record {
    pub frame: u32,
    pub dir: String,
    pub leader: String,
    #[serde(rename = "type")]
    pub packet_type: u16,
    pub count: u16,
    pub id: String,
    pub checksum: String,
    pub checksum_ok: bool,
    pub payload: String,
}

/// A record with its hex fields decoded.
#[derive(Clone, Debug)]
pub struct Vector {
    pub frame: u32,
    pub host_to_target: bool,
    pub leader: u32,
    pub packet_type: u16,
    pub count: u16,
    pub id: u32,
    pub checksum: u32,
    pub payload: Vec<u8>,
}

pub fn hex(s: &str) -> Vec<u8> {
    assert!(s.len() % 2 == 0, "odd hex length");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn hex32(s: &str) -> u32 {
    u32::from_str_radix(s, 16).expect("hex u32")
}

pub fn vectors() -> Vec<Vector> {
    let text = include_str!("../vectors/kdnet-windbg-win10.json");
    let records: Vec<Record> = serde_json::from_str(text).expect("json");
    records
        .into_iter()
        .map(|r| {
            assert!(
                r.checksum_ok,
                "frame {} recorded with a bad checksum",
                r.frame
            );
            let dir_ok = r.dir == "host->target" || r.dir == "target->host";
            assert!(dir_ok, "frame {}: dir {}", r.frame, r.dir);
            Vector {
                frame: r.frame,
                host_to_target: r.dir == "host->target",
                leader: hex32(&r.leader),
                packet_type: r.packet_type,
                count: r.count,
                id: hex32(&r.id),
                checksum: hex32(&r.checksum),
                payload: hex(&r.payload),
            }
        })
        .collect()
}

pub fn by_frame(v: &[Vector]) -> BTreeMap<u32, &Vector> {
    v.iter().map(|x| (x.frame, x)).collect()
}

pub const DATA_LEADER: u32 = 0x3030_3030;
pub const CONTROL_LEADER: u32 = 0x6969_6969;

/// KDCOM wire bytes of a recorded packet, built field by field from the record (not with the
/// crate's encoder): leader, type, count, id, checksum, payload, and 0xAA after data packets.
pub fn kdcom_bytes(v: &Vector) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&v.leader.to_le_bytes());
    out.extend_from_slice(&v.packet_type.to_le_bytes());
    out.extend_from_slice(&v.count.to_le_bytes());
    out.extend_from_slice(&v.id.to_le_bytes());
    out.extend_from_slice(&v.checksum.to_le_bytes());
    out.extend_from_slice(&v.payload);
    if v.leader == DATA_LEADER {
        out.push(0xAA);
    }
    out
}

/// The x86 XP LoadSymbols STATE_CHANGE64 payload.
pub fn xp_loadsymbols() -> &'static [u8] {
    include_bytes!("../vectors/xp-x86-loadsymbols.bin")
}

/// A small deterministic PRNG (xorshift64*), for split sizes.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
