//! The real x86 (Windows XP, ntkrnlpa) KDCOM LoadSymbols state change (kd-protocol.md 6).

mod common;

use common::*;
use kdpilot_kd::state_change::{ControlReport, StateChange, X86ControlReport};
use kdpilot_kd::wire::{checksum, packet_type, DecodeEvent, Decoder, Packet};
use kdpilot_kd::Arch;

#[test]
fn decodes_to_the_sheet_values() {
    let raw = xp_loadsymbols();
    assert_eq!(raw.len(), 271);
    assert_eq!(checksum(raw), 0x3344);
    let s = StateChange::parse(raw).unwrap();
    assert_eq!(s.new_state, 0x3031);
    assert_eq!(
        (s.processor_level, s.processor, s.number_processors),
        (0, 0, 1)
    );
    assert_eq!(s.thread, 0xFFFF_FFFF_8055_3740);
    assert_eq!(s.program_counter, 0xFFFF_FFFF_8052_F4C4);
    let l = s.load_symbols().unwrap();
    assert_eq!(l.path_name_length, 31);
    assert_eq!(l.base_of_dll, 0xFFFF_FFFF_804D_8000);
    // Not sign-extended: the kernel stores a 32-bit -1 process id.
    assert_eq!(l.process_id, 0x0000_0000_FFFF_FFFF);
    assert_eq!(l.checksum, 0x20_50D3);
    assert_eq!(l.size_of_image, 0x1F_8480);
    assert!(!l.is_unload());
    assert_eq!(l.path_str(), "\\WINDOWS\\system32\\ntkrnlpa.exe");
    assert_eq!(l.path.last(), Some(&0));
    assert!(s.extra.is_empty());
    assert!(!s.is_unload_all());

    let ControlReport::X86(r) = s.control_report(Arch::X86) else {
        panic!("x86")
    };
    assert_eq!(
        r,
        X86ControlReport {
            dr6: 0xFFFF_0FF0,
            dr7: 0x400,
            instruction_count: 16,
            report_flags: 3,
            instruction_stream: [
                0xCC, 0x5D, 0xC2, 0x0C, 0x00, 0xCC, 0xCC, 0xCC, 0xCC, 0xCC, 0x8B, 0xFF, 0x55, 0x8B,
                0xEC, 0xFF
            ],
            seg_cs: 0x08,
            seg_ds: 0x23,
            seg_es: 0x23,
            seg_fs: 0x30,
            eflags: 0x82,
        }
    );
    let rep = s.control_report(Arch::X86);
    assert_eq!(rep.dr7(), 0x400);
    assert_eq!(rep.instructions()[0], 0xCC); // DbgBreakPointWithStatus's int3
                                             // The last 8 bytes of the AMD64-sized report area are unused on x86.
    assert_eq!(s.control_report_bytes[40..], [0; 8]);
}

#[test]
fn reencodes_byte_identical() {
    let raw = xp_loadsymbols();
    let s = StateChange::parse(raw).unwrap();
    assert_eq!(s.encode(), raw);
    // And through a fresh control report write (the x86 layout writer is exact too).
    let mut t = s.clone();
    t.control_report_bytes = [0; 48];
    t.set_control_report(&s.control_report(Arch::X86));
    assert_eq!(t.encode(), raw);
}

#[test]
fn through_the_kdcom_decoder() {
    // As on the wire: data leader, type 7, 271 bytes, id 0x80800800, checksum 0x3344, 0xAA.
    let raw = xp_loadsymbols();
    let mut wire = vec![
        0x30, 0x30, 0x30, 0x30, 0x07, 0x00, 0x0F, 0x01, 0x00, 0x08, 0x80, 0x80, 0x44, 0x33, 0, 0,
    ];
    wire.extend_from_slice(raw);
    wire.push(0xAA);
    let mut d = Decoder::new();
    let mut ev = Vec::new();
    d.feed(&wire, &mut ev);
    let want = Packet::data(packet_type::KD_STATE_CHANGE64, 0x8080_0800, raw.to_vec()).unwrap();
    assert_eq!(ev, [DecodeEvent::Packet(want.clone())]);
    assert_eq!(want.encode(), wire);
}
