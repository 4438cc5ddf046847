//! What a hit costs on the line at the least: the bytes of the packets the protocol cannot do
//! without for the information a hit records (issue 7's lower bound), built from the kd crate's
//! own encoders so that it follows them.
//!
//! For a hit: the state change and its ACK; GetContextEx for the registers read and its reply;
//! ReadVirtualMemory of the stack bytes the unwind touched, in as few packets as allowed; for
//! an int3 breakpoint also the single step (Continue2 with TraceFlag, the single-step state
//! change) and the re-plant (WriteBreakPoint); the resume (Continue2). Every data packet is
//! answered by a 16-byte ACK.

use kdpilot_kd::api::{self, Api, Continue2, GetContextEx};
use kdpilot_kd::Arch;

use crate::engine::{hit_registers, HitCost};

/// A control packet (ACK): leader, type, count, id, checksum.
pub const ACK_BYTES: u64 = 16;

/// A data packet with `payload` bytes on the wire: 16-byte header, payload, 0xAA trailer.
pub fn data_packet_bytes(payload: usize) -> u64 {
    (16 + payload + 1) as u64
}

fn request_bytes<A: Api>(req: &A, arch: Arch) -> usize {
    req.encode_request(arch).encode().len()
}

/// The least bytes (host to target, target to host) for the information of `cost`'s hit.
pub fn lower_bound(cost: &HitCost, arch: Arch) -> (u64, u64) {
    let ctx = request_bytes(
        &GetContextEx {
            range: hit_registers(arch),
        },
        arch,
    );
    let read = request_bytes(
        &api::ReadVirtualMemory {
            address: 0,
            count: 0,
        },
        arch,
    );
    let cont = request_bytes(&Continue2::go(), arch);
    let header = api::MANIPULATE_HEADER_SIZE;
    let state = cost.state_change_len as usize;
    // The stop, ACKed.
    let mut tx = ACK_BYTES;
    let mut rx = data_packet_bytes(state);
    // The registers.
    tx += data_packet_bytes(ctx) + ACK_BYTES;
    rx += ACK_BYTES + data_packet_bytes(header + cost.context_bytes as usize);
    // The stack bytes the unwind touched.
    let mut left = cost.stack_touched as usize;
    while left > 0 {
        let n = left.min(api::MAX_TRANSFER);
        tx += data_packet_bytes(read) + ACK_BYTES;
        rx += ACK_BYTES + data_packet_bytes(header + n);
        left -= n;
    }
    if !cost.hardware {
        // Step over the consumed int3 and plant it again.
        let wbp = request_bytes(&api::WriteBreakPoint { address: 0 }, arch);
        tx += data_packet_bytes(cont) + ACK_BYTES;
        rx += ACK_BYTES + data_packet_bytes(state);
        tx += data_packet_bytes(wbp) + ACK_BYTES;
        rx += ACK_BYTES + data_packet_bytes(wbp);
    }
    // The resume.
    tx += data_packet_bytes(cont);
    rx += ACK_BYTES;
    (tx, rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The packet sizes behind the bound, from the sheet: a manipulate packet is 56 bytes of
    /// header (+ data), an x64 state change 240 bytes, GetContextEx of RAX..RIP 136 bytes.
    #[test]
    fn an_x64_hardware_hit_with_512_stack_bytes() {
        let cost = HitCost {
            state_change_len: 240,
            context_bytes: 136,
            stack_touched: 512,
            hardware: true,
            ..HitCost::default()
        };
        let (tx, rx) = lower_bound(&cost, Arch::Amd64);
        // ACK(stop) + GetContextEx(73)+ACK + Read(73)+ACK + Continue2(73)
        assert_eq!(tx, 16 + 73 + 16 + 73 + 16 + 73);
        // stop(257) + ACK + reply(16+56+136+1) + ACK + reply(16+56+512+1) + ACK(continue)
        assert_eq!(rx, 257 + 16 + 209 + 16 + 585 + 16);
        let int3 = HitCost {
            hardware: false,
            ..cost
        };
        let (tx2, rx2) = lower_bound(&int3, Arch::Amd64);
        assert_eq!(tx2 - tx, 73 + 16 + 73 + 16);
        assert_eq!(rx2 - rx, 16 + 257 + 16 + 73);
    }
}
