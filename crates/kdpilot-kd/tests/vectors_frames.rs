//! Specific frames of the real capture, checked field by field against the sheet.

mod common;

use common::*;
use kdpilot_kd::api::*;
use kdpilot_kd::context::{flags, Amd64Reg, Context, ContextRange};
use kdpilot_kd::debug_io::DebugIo;
use kdpilot_kd::file_io::{FileIo, FileIoOp};
use kdpilot_kd::state_change::{ControlReport, StateChange, StateInfo};
use kdpilot_kd::wire::{packet_type, DecodeEvent, Decoder, Leader};
use kdpilot_kd::{Arch, PayloadError};

fn frame(n: u32) -> Vector {
    vectors().into_iter().find(|v| v.frame == n).expect("frame")
}

fn manip(n: u32) -> Manipulate {
    Manipulate::parse(&frame(n).payload).unwrap()
}

#[test]
fn frame_12_get_version_reply() {
    let req = GetVersion::decode_request(&manip(10), Arch::Amd64).unwrap();
    let m = manip(12);
    assert_eq!(m.return_status, 0);
    let v = req.decode_reply(&m, Arch::Amd64).unwrap();
    assert_eq!(v.major_version, 0x040F); // boot debugger, free build
    assert_eq!(v.minor_version, 10586);
    assert_eq!(v.minor_version, 0x295A);
    assert_eq!(v.protocol_version, 6);
    assert_eq!(v.kd_secondary_version, 2);
    assert_eq!(v.flags, 0x0002); // DATA only: not MP, and no PTR64 bit on an x64 target
    assert_eq!(v.machine_type, 0x8664);
    assert_eq!(v.arch(), Some(Arch::Amd64));
    assert_eq!(v.max_packet_type, 0x0C);
    assert_eq!(v.max_state_change, 0x32);
    assert_eq!(v.max_manipulate, 0x59);
    assert_eq!(v.simulation, 0);
    assert_eq!(v.kern_base, 0x96_F000);
    assert_eq!(v.ps_loaded_module_list, 0xAD_5E60);
    // Flags says DATA, yet the boot debugger has no debugger data list.
    assert_eq!(v.debugger_data_list, 0);
    assert!(!v.has_debugger_data());
    assert!(v.is_boot_debugger());
    // Request and reply carry ProcessorLevel and Processor 0xffff, and 0x25 in the padding.
    assert_eq!(
        (m.processor_level, m.processor, m.padding),
        (0xFFFF, 0xFFFF, 0x25)
    );
}

#[test]
fn frames_190_to_196_get_context_ex_refused_then_get_context() {
    let req = manip(190);
    let ex = GetContextEx::decode_request(&req, Arch::Amd64).unwrap();
    assert_eq!(ex.range, ContextRange::full(Arch::Amd64));
    assert_eq!(ex.range.byte_count, 1232);
    assert_eq!(req.processor, 0);
    assert_eq!(
        ex.decode_reply(&manip(192), Arch::Amd64),
        Err(PayloadError::Failed {
            api: "GetContextEx",
            status: 0xC000_0001
        })
    );

    let get = GetContext::decode_request(&manip(194), Arch::Amd64).unwrap();
    let reply = frame(196);
    assert_eq!(reply.count, 1288);
    let ctx = get.decode_reply(&manip(196), Arch::Amd64).unwrap();
    let Context::Amd64(c) = &ctx else {
        panic!("not amd64")
    };
    assert_eq!(ctx.as_bytes().len(), 1232);
    assert_eq!(ctx.as_bytes()[..], reply.payload[56..]);
    assert_eq!(
        ctx.context_flags(),
        flags::AMD64
            | flags::CONTROL
            | flags::INTEGER
            | flags::FLOATING_POINT
            | flags::DEBUG_REGISTERS
    );
    // RIP is the PC of the LoadSymbols stop being served (frame 8), RSP a boot stack.
    let stop = StateChange::parse(&frame(8).payload).unwrap();
    assert_eq!(ctx.pc(), stop.program_counter);
    assert_eq!(ctx.pc(), 0xA7_9685);
    assert_eq!(ctx.sp(), 0x1A_6D98);
    assert_eq!(ctx.fp(), 0x1A_6E30);
    assert_eq!(c.get(Amd64Reg::SegCs), 0x10);
    assert_eq!(ctx.eflags(), 0x6);
    assert_eq!(c.get(Amd64Reg::Rax), 3);

    // What GetContextEx would have returned for a stack walk, merged into an empty context.
    let r = ContextRange::pc_sp_fp(Arch::Amd64);
    let mut partial = Context::zeroed(Arch::Amd64);
    partial.apply_partial(r.offset, ctx.range_bytes(r));
    assert_eq!(
        (partial.pc(), partial.sp(), partial.fp()),
        (ctx.pc(), ctx.sp(), ctx.fp())
    );
}

#[test]
fn frames_201_to_204_reset_exchange() {
    let mut d = Decoder::new();
    let mut ev = Vec::new();
    for n in [201, 202, 203, 204] {
        d.feed(&kdcom_bytes(&frame(n)), &mut ev);
    }
    let p: Vec<_> = ev
        .into_iter()
        .map(|e| match e {
            DecodeEvent::Packet(p) => p,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(p.len(), 4);
    // 202: host RESET (KDNET numbering: id 0x80000060, where KDCOM WinDbg sends 0).
    assert_eq!(
        (p[1].leader, p[1].packet_type, p[1].id),
        (Leader::Control, packet_type::KD_RESET, 0x8000_0060)
    );
    assert!(frame(202).host_to_target);
    // 203: the target's RESET back.
    assert_eq!(
        (p[2].leader, p[2].packet_type, p[2].id),
        (Leader::Control, packet_type::KD_RESET, 0x62)
    );
    assert!(!frame(203).host_to_target);
    // 204: the pending GetContext reply again, same id and bytes as before the reset.
    assert_eq!(p[3], p[0]);
    assert_eq!(p[3].packet_type, packet_type::KD_STATE_MANIPULATE);
}

#[test]
fn frame_234_continue2_as_windbg_sends_it() {
    let m = manip(234);
    let c = Continue2::decode_request(&m, Arch::Amd64).unwrap();
    assert_eq!(c.continue_status, 0x0001_0002);
    assert_eq!(c.trace_flag, 0);
    assert_eq!(c.dr7, 0x400);
    assert_eq!(c.current_symbol_start, 1);
    assert_eq!(c.current_symbol_end, 0);
    assert_eq!(c, Continue2::go());
    assert_eq!(
        m.return_status, 0x0001_0002,
        "WinDbg copies ContinueStatus into ReturnStatus"
    );

    let mut ours = Continue2::go().encode_request(Arch::Amd64);
    assert_eq!(ours.return_status, 0x0001_0002);
    // Only WinDbg's junk differs: ProcessorLevel 0x25 and the 8 union bytes after the 32-byte
    // DBGKD_CONTINUE2 (a WinDbg user-mode pointer).
    ours.processor_level = 0x25;
    let mut bytes = ours.encode();
    assert_eq!(bytes[..48], frame(234).payload[..48]);
    bytes[48..56].copy_from_slice(&frame(234).payload[48..56]);
    assert_eq!(bytes, frame(234).payload);
    const { assert!(!Continue2::HAS_REPLY) };
}

#[test]
fn frame_950_continue2_after_the_breakpoint_is_exception_handled() {
    let c = Continue2::decode_request(&manip(950), Arch::Amd64).unwrap();
    assert_eq!(c, Continue2::go().with_status(0x0001_0001));
    assert_eq!(manip(950).return_status, 0x0001_0001);
}

#[test]
fn frames_236_238_file_io_no_such_file() {
    let req = FileIo::parse(&frame(236).payload).unwrap();
    let FileIoOp::Create(c) = req.op().unwrap() else {
        panic!()
    };
    assert_eq!(c.desired_access, 0x0012_0089);
    assert_eq!(c.file_attributes, 0x80);
    assert_eq!(c.share_access, 1);
    assert_eq!(c.create_disposition, 1);
    assert_eq!(c.create_options, 0);
    assert_eq!((c.handle, c.length), (0, 0));
    assert_eq!(c.name_str(), "\\Windows\\system32\\en-GB\\winload.efi.MUI");
    assert_eq!(frame(236).count, 144);

    // Independent of the encoder: WinDbg's reply is the request's 64 bytes with Status
    // 0xC000000F.
    let mut want = frame(236).payload[..64].to_vec();
    want[4..8].copy_from_slice(&[0x0F, 0x00, 0x00, 0xC0]);
    assert_eq!(frame(238).payload, want);
    assert_eq!(req.reply_no_such_file().encode(), want);
}

#[test]
fn frame_378_breakpoint_exception() {
    let x = frame(378);
    assert_eq!(x.count, 240);
    let s = StateChange::parse(&x.payload).unwrap();
    assert_eq!(s.new_state, 0x3030);
    assert!(s.is_breakpoint());
    assert!(!s.is_single_step());
    let e = s.exception_info().unwrap();
    assert_eq!(e.record.code, 0x8000_0003);
    assert!(e.is_first_chance());
    assert_eq!(e.record.address, 0x9C_F07D);
    // The boot debugger's hard-coded int3: PC is one past ExceptionAddress.
    assert_eq!(s.program_counter, e.record.address + 1);
    assert_eq!(e.record.number_parameters, 1);
    assert_eq!(e.record.parameters(), &[0]);
    assert_eq!((s.processor, s.number_processors, s.thread), (0, 1, 0));
    let ControlReport::Amd64(r) = s.control_report(Arch::Amd64) else {
        panic!()
    };
    assert_eq!(r.dr6, 0xFFFE_0FF0);
    assert_eq!(r.dr7, 0x400);
    assert_eq!(r.eflags, 0x2);
    assert_eq!(r.instruction_count, 16);
    assert_eq!(r.report_flags, 1);
    assert_eq!(r.instruction_stream[0], 0xCC);
    assert_eq!(
        (r.seg_cs, r.seg_ds, r.seg_es, r.seg_fs),
        (0x10, 0x30, 0x30, 0x30)
    );
    assert_eq!(s.encode(), x.payload);
}

#[test]
fn frame_8_load_symbols_winload() {
    let x = frame(8);
    assert_eq!(x.count, 252);
    let s = StateChange::parse(&x.payload).unwrap();
    let l = s.load_symbols().unwrap();
    assert_eq!(l.path_name_length, 12);
    assert_eq!(l.path, b"winload.efi\0");
    assert_eq!(l.path_str(), "winload.efi");
    assert_eq!(l.base_of_dll, 0x96_F000);
    assert_eq!(l.process_id, u64::MAX);
    assert_eq!(l.checksum, 0x14_9E3F);
    assert_eq!(l.size_of_image, 0x17_D000);
    assert!(!l.is_unload());
    assert!(!s.is_unload_all());
    assert!(s.extra.is_empty());
}

#[test]
fn frames_952_954_unload_all_and_continue() {
    let x = frame(952);
    assert_eq!(x.count, 240);
    let s = StateChange::parse(&x.payload).unwrap();
    assert_eq!(s.new_state, 0x3031);
    assert!(s.is_unload_all());
    assert!(!s.is_hibernate());
    let StateInfo::LoadSymbols(l) = &s.info else {
        panic!()
    };
    assert_eq!(l.path_name_length, 0);
    assert_eq!(l.base_of_dll, 0xFFFF_FFFF_FFFF_FFFF);
    assert_eq!(l.process_id, 0);
    assert_eq!(l.unload_symbols, 1);
    assert!(l.path.is_empty());
    // Junk the kernel left in the LoadSymbols padding is kept for the byte-exact re-encode.
    assert_eq!(s.union_bytes[4..8], [0x01, 0xF8, 0xFF, 0xFF]);
    assert_eq!(s.union_bytes[33..36], [0xED, 0xFF, 0x7F]);
    assert_eq!(s.encode(), x.payload);

    let m = manip(954);
    assert!(frame(954).host_to_target);
    let c = Continue::decode_request(&m, Arch::Amd64).unwrap();
    assert_eq!(c, Continue::dbg_continue());
    assert_eq!(m.return_status, 0x0001_0002);
    assert_eq!(
        Continue::dbg_continue()
            .encode_request(Arch::Amd64)
            .return_status,
        0x0001_0002
    );
    const { assert!(!Continue::HAS_REPLY) };
}

#[test]
fn frame_4_debug_print() {
    let d = DebugIo::parse(&frame(4).payload).unwrap();
    assert!(d.is_print());
    assert_eq!(d.text(), "BD: Boot Debugger Initialized\n");
    assert_eq!(d.length, 30);
    assert_eq!(d.length_of_string_read, 0x7FF); // junk in an unused field
}

#[test]
fn frames_58_60_restore_breakpoint_fails_after_boot() {
    let req = RestoreBreakPoint::decode_request(&manip(58), Arch::Amd64).unwrap();
    assert_eq!(req.handle, 1);
    assert_eq!(
        req.decode_reply(&manip(60), Arch::Amd64),
        Err(PayloadError::Failed {
            api: "RestoreBreakPoint",
            status: 0xC000_0001
        })
    );
}

#[test]
fn frames_214_to_228_set_context_moves_rip_past_the_int3() {
    let set = SetContext::decode_request(&manip(214), Arch::Amd64).unwrap();
    assert_eq!(set.context.pc(), 0xA7_9686);
    assert_eq!(set.decode_reply(&manip(216), Arch::Amd64), Ok(()));
    let got = GetContext.decode_reply(&manip(228), Arch::Amd64).unwrap();
    assert_eq!(got.pc(), 0xA7_9686);
    assert_eq!(got, set.context);
}
