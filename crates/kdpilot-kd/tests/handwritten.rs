//! Structures checked against byte arrays written by hand from the reference sheet, so an
//! encoder and a decoder that agree on the same wrong offset cannot pass.

use kdpilot_kd::api::*;
use kdpilot_kd::context::{Amd64Reg, Context, ContextRange, X86Reg};
use kdpilot_kd::debug_io::{DebugIo, GetString};
use kdpilot_kd::kddebugger_data::{DebugDataHeader64, KdDebuggerData64, LdrEntry};
use kdpilot_kd::state_change::{
    Amd64ControlReport, ControlReport, ExceptionRecord64, StateChange, StateInfo,
};
use kdpilot_kd::Arch;

/// 56-byte manipulate packet: header fields, then (offset, bytes) patches.
fn manip(api: u16, status: u32, patches: &[(usize, &[u8])]) -> Vec<u8> {
    let mut v = vec![0u8; 56];
    v[0..2].copy_from_slice(&api.to_le_bytes());
    v[8..12].copy_from_slice(&status.to_le_bytes());
    for (off, b) in patches {
        if v.len() < off + b.len() {
            v.resize(off + b.len(), 0);
        }
        v[*off..off + b.len()].copy_from_slice(b);
    }
    v
}

#[test]
fn continue2_x86_layout() {
    let want = manip(
        0x313C,
        0x0001_0002,
        &[
            (16, &[0x02, 0x00, 0x01, 0x00]), // ContinueStatus
            (20, &[0x01, 0x00, 0x00, 0x00]), // TraceFlag
            (24, &[0x00, 0x04, 0x00, 0x00]), // Dr7 (u32 on x86)
            (28, &[0x01, 0x00, 0x00, 0x00]), // CurrentSymbolStart
            (32, &[0x00, 0x00, 0x00, 0x00]), // CurrentSymbolEnd
        ],
    );
    let c = Continue2::single_step();
    assert_eq!(c.encode_request(Arch::X86).encode(), want);
    let m = Manipulate::parse(&want).unwrap();
    assert_eq!(Continue2::decode_request(&m, Arch::X86).unwrap(), c);
}

#[test]
fn continue2_amd64_layout() {
    let want = manip(
        0x313C,
        0x8001_0001,
        &[
            (16, &[0x01, 0x00, 0x01, 0x80]),
            (20, &[0, 0, 0, 0]),
            (24, &[0x55, 0x04, 0, 0, 0, 0, 0, 0]),
            (32, &[0x01, 0, 0, 0, 0, 0, 0, 0]),
            (40, &[0, 0, 0, 0, 0, 0, 0, 0]),
        ],
    );
    let c = Continue2::go().with_status(0x8001_0001).with_dr7(0x455);
    assert_eq!(c.encode_request(Arch::Amd64).encode(), want);
}

#[test]
fn write_breakpoint_request_and_reply() {
    let addr = [0x78, 0x56, 0x34, 0x12, 0x00, 0xF8, 0xFF, 0xFF];
    let req = manip(0x3134, 0x103, &[(16, &addr)]);
    let w = WriteBreakPoint {
        address: 0xFFFF_F800_1234_5678,
    };
    assert_eq!(w.encode_request(Arch::Amd64).encode(), req);
    let reply = manip(0x3134, 0, &[(16, &addr), (24, &[3, 0, 0, 0])]);
    let m = Manipulate::parse(&reply).unwrap();
    assert_eq!(w.decode_reply(&m, Arch::Amd64), Ok(3));
    // Handle 0 with a success status is still a failure.
    let zero = Manipulate::parse(&manip(0x3134, 0, &[(16, &addr)])).unwrap();
    assert!(w.decode_reply(&zero, Arch::Amd64).is_err());
    let rb = manip(0x3135, 0x103, &[(16, &[3, 0, 0, 0])]);
    assert_eq!(
        RestoreBreakPoint { handle: 3 }
            .encode_request(Arch::Amd64)
            .encode(),
        rb
    );
}

#[test]
fn get_context_ex_for_a_stack_walk() {
    let req = manip(
        0x315F,
        0x103,
        &[(16, &[0x98, 0, 0, 0]), (20, &[0x68, 0, 0, 0])],
    );
    let g = GetContextEx {
        range: ContextRange::pc_sp_fp(Arch::Amd64),
    };
    assert_eq!(g.encode_request(Arch::Amd64).encode(), req);
    // Reply: BytesCopied 0x68, data = Rsp, Rbp, Rsi, Rdi, R8..R15, Rip.
    let mut data = vec![0u8; 0x68];
    data[0..8].copy_from_slice(&0x1A_6D98u64.to_le_bytes()); // Rsp @0x98
    data[8..16].copy_from_slice(&0x1A_6E30u64.to_le_bytes()); // Rbp @0xA0
    data[0x60..0x68].copy_from_slice(&0xA7_9685u64.to_le_bytes()); // Rip @0xF8
    let mut reply = manip(
        0x315F,
        0,
        &[
            (16, &[0x98, 0, 0, 0]),
            (20, &[0x68, 0, 0, 0]),
            (24, &[0x68, 0, 0, 0]),
        ],
    );
    reply.extend_from_slice(&data);
    let part = g
        .decode_reply(&Manipulate::parse(&reply).unwrap(), Arch::Amd64)
        .unwrap();
    assert_eq!(part.bytes.len(), 0x68);
    let mut c = Context::zeroed(Arch::Amd64);
    c.apply_partial(part.offset, &part.bytes);
    assert_eq!((c.pc(), c.sp(), c.fp()), (0xA7_9685, 0x1A_6D98, 0x1A_6E30));
    // A reply claiming more bytes than were asked for is cut to the request.
    let mut long = reply.clone();
    long[24] = 0xFF;
    long.extend_from_slice(&[0xEE; 32]);
    let p = g
        .decode_reply(&Manipulate::parse(&long).unwrap(), Arch::Amd64)
        .unwrap();
    assert_eq!(p.bytes, data);
    // A reply for another offset is refused.
    let mut other = reply.clone();
    other[16] = 0x90;
    assert!(g
        .decode_reply(&Manipulate::parse(&other).unwrap(), Arch::Amd64)
        .is_err());
}

#[test]
fn search_memory_and_msr() {
    let req = manip(
        0x3156,
        0x103,
        &[
            (16, &[0, 0, 0x40, 0, 0, 0xF8, 0xFF, 0xFF]),
            (24, &[0, 0x10, 0, 0, 0, 0, 0, 0]),
            (32, &[2, 0, 0, 0]),
            (56, b"MZ"),
        ],
    );
    let s = SearchMemory {
        address: 0xFFFF_F800_0040_0000,
        length: 0x1000,
        pattern: b"MZ".to_vec(),
    };
    assert_eq!(s.encode_request(Arch::Amd64).encode(), req);
    let found = manip(0x3156, 0, &[(16, &[0x10, 0, 0x40, 0, 0, 0xF8, 0xFF, 0xFF])]);
    assert_eq!(
        s.decode_reply(&Manipulate::parse(&found).unwrap(), Arch::Amd64),
        Ok(Some(0xFFFF_F800_0040_0010))
    );
    let none = manip(0x3156, 0x8000_001A, &[]);
    assert_eq!(
        s.decode_reply(&Manipulate::parse(&none).unwrap(), Arch::Amd64),
        Ok(None)
    );
    let unsupported = manip(0x3156, 0xC000_0001, &[]);
    assert!(s
        .decode_reply(&Manipulate::parse(&unsupported).unwrap(), Arch::Amd64)
        .is_err());

    let r = ReadMsr { msr: 0xC000_0082 };
    assert_eq!(
        r.encode_request(Arch::Amd64).encode(),
        manip(0x3152, 0x103, &[(16, &[0x82, 0, 0, 0xC0])])
    );
    let reply = manip(
        0x3152,
        0,
        &[
            (16, &[0x82, 0, 0, 0xC0]),
            (20, &[0x78, 0x56, 0x34, 0x12]),
            (24, &[0x00, 0xF8, 0xFF, 0xFF]),
        ],
    );
    assert_eq!(
        r.decode_reply(&Manipulate::parse(&reply).unwrap(), Arch::Amd64),
        Ok(0xFFFF_F800_1234_5678)
    );
    let w = WriteMsr {
        msr: 0xC000_0082,
        value: 0xFFFF_F800_1234_5678,
    };
    let wreq = manip(
        0x3153,
        0x103,
        &[
            (16, &[0x82, 0, 0, 0xC0]),
            (20, &[0x78, 0x56, 0x34, 0x12]),
            (24, &[0x00, 0xF8, 0xFF, 0xFF]),
        ],
    );
    assert_eq!(w.encode_request(Arch::Amd64).encode(), wreq);
}

#[test]
fn single_step_state_change_from_scratch() {
    // An AMD64 single-step stop on CPU 1 of 2, built by hand.
    let mut want = vec![0u8; 240];
    want[0..4].copy_from_slice(&0x3030u32.to_le_bytes());
    want[6..8].copy_from_slice(&1u16.to_le_bytes());
    want[8..12].copy_from_slice(&2u32.to_le_bytes());
    want[16..24].copy_from_slice(&0xFFFF_E000_1111_2222u64.to_le_bytes()); // Thread
    want[24..32].copy_from_slice(&0xFFFF_F800_0000_1001u64.to_le_bytes()); // PC
    want[32..36].copy_from_slice(&0x8000_0004u32.to_le_bytes()); // ExceptionCode
    want[48..56].copy_from_slice(&0xFFFF_F800_0000_1001u64.to_le_bytes()); // ExceptionAddress
    want[184..188].copy_from_slice(&1u32.to_le_bytes()); // FirstChance @32+152
    want[192..200].copy_from_slice(&0xFFFF_4FF0u64.to_le_bytes()); // Dr6 (BS)
    want[200..208].copy_from_slice(&0x400u64.to_le_bytes()); // Dr7
    want[208..212].copy_from_slice(&0x346u32.to_le_bytes()); // EFlags
    want[212..214].copy_from_slice(&16u16.to_le_bytes()); // InstructionCount
    want[214..216].copy_from_slice(&3u16.to_le_bytes()); // ReportFlags
    want[216..219].copy_from_slice(&[0x48, 0x8B, 0xC4]); // mov rax, rsp
    want[232..240].copy_from_slice(&[0x10, 0, 0x2B, 0, 0x2B, 0, 0x53, 0]); // cs ds es fs

    let report = ControlReport::Amd64(Amd64ControlReport {
        dr6: 0xFFFF_4FF0,
        dr7: 0x400,
        eflags: 0x346,
        instruction_count: 16,
        report_flags: 3,
        instruction_stream: [0x48, 0x8B, 0xC4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        seg_cs: 0x10,
        seg_ds: 0x2B,
        seg_es: 0x2B,
        seg_fs: 0x53,
    });
    let s = StateChange::exception(
        0x8000_0004,
        0xFFFF_F800_0000_1001,
        0xFFFF_E000_1111_2222,
        0xFFFF_F800_0000_1001,
    )
    .with_processor(1, 2)
    .with_control_report(&report);
    assert_eq!(s.encode(), want);
    let back = StateChange::parse(&want).unwrap();
    assert_eq!(back, s);
    assert!(back.is_single_step());
    assert_eq!(
        back.exception_info().unwrap().record,
        ExceptionRecord64 {
            code: 0x8000_0004,
            address: 0xFFFF_F800_0000_1001,
            ..Default::default()
        }
    );
    assert_eq!(back.control_report(Arch::Amd64), report);
    assert!(matches!(back.info, StateInfo::Exception(_)));
}

#[test]
fn alternate_state_change_and_command_string() {
    let mut raw = vec![0u8; 240];
    raw[0..4].copy_from_slice(&0x0001_3032u32.to_le_bytes());
    raw.extend_from_slice(b"dbgname\0.reload\0");
    let s = StateChange::parse(&raw).unwrap();
    assert!(s.is_alternate());
    assert_eq!(s.kind(), 0x3032);
    let StateInfo::CommandString(c) = &s.info else {
        panic!()
    };
    assert_eq!(
        (c.name().as_str(), c.command().as_str()),
        ("dbgname", ".reload")
    );
    assert_eq!(s.encode(), raw);
}

#[test]
fn prompt_and_reply() {
    // Target: DbgPrompt("Break? ", 80-byte buffer) on CPU 2.
    let mut raw = vec![0x31, 0x32, 0, 0, 6, 0, 2, 0, 7, 0, 0, 0, 80, 0, 0, 0];
    raw.extend_from_slice(b"Break? ");
    let p = DebugIo::parse(&raw).unwrap();
    assert!(p.is_prompt());
    assert_eq!(p.text(), "Break? ");
    let mut g = GetString::new(b"Break? ", 80);
    g.processor_level = 6;
    g.processor = 2;
    assert_eq!(g.to_debug_io().encode(), raw);
    // Host: echo the header, LengthOfStringRead = 1, answer "i".
    let mut want = vec![0x31, 0x32, 0, 0, 6, 0, 2, 0, 7, 0, 0, 0, 1, 0, 0, 0];
    want.push(b'i');
    assert_eq!(p.prompt_reply(b"i").encode(), want);
}

#[test]
fn kdbg_block() {
    let mut raw = vec![0u8; 0x340];
    raw[0..8].copy_from_slice(&0xFFFF_F800_0222_0000u64.to_le_bytes());
    raw[8..16].copy_from_slice(&0xFFFF_F800_0222_0000u64.to_le_bytes());
    raw[16..20].copy_from_slice(b"KDBG");
    raw[20..24].copy_from_slice(&0x340u32.to_le_bytes());
    raw[0x18..0x20].copy_from_slice(&0xFFFF_F800_0260_0000u64.to_le_bytes());
    raw[0x48..0x50].copy_from_slice(&0xFFFF_F800_0285_0000u64.to_le_bytes());
    raw[0x218..0x220].copy_from_slice(&0xFFFF_F800_028E_0000u64.to_le_bytes());
    raw[0x238..0x240].copy_from_slice(&0xFFFF_F800_0290_0000u64.to_le_bytes());
    raw[0x208..0x210].copy_from_slice(&0xFFFF_F800_0270_0000u64.to_le_bytes());
    raw[0x338..0x33A].copy_from_slice(&0x4BE0u16.to_le_bytes());
    let k = KdDebuggerData64::parse(&raw).unwrap();
    assert!(k.is_valid());
    assert_eq!(
        k.header(),
        DebugDataHeader64 {
            flink: 0xFFFF_F800_0222_0000,
            blink: 0xFFFF_F800_0222_0000,
            owner_tag: 0x4742_444B,
            size: 0x340
        }
    );
    assert_eq!(k.kern_base(), Some(0xFFFF_F800_0260_0000));
    assert_eq!(k.ps_loaded_module_list(), Some(0xFFFF_F800_0285_0000));
    assert_eq!(k.ki_processor_block(), Some(0xFFFF_F800_028E_0000));
    assert_eq!(k.mm_special_pool_tag(), Some(0xFFFF_F800_0290_0000));
    assert_eq!(k.nt_build_lab(), Some(0xFFFF_F800_0270_0000));
    assert_eq!(k.offset_prcb_context(), Some(0x4BE0));
    assert_eq!(k.pte_base(), None); // past a Win7-sized block
                                    // Built by the simulator encoder: the same bytes.
    let mut b = KdDebuggerData64::new(0x340, 0xFFFF_F800_0222_0000, 0xFFFF_F800_0222_0000);
    for (off, v) in [
        (0x18, 0xFFFF_F800_0260_0000u64),
        (0x48, 0xFFFF_F800_0285_0000),
        (0x218, 0xFFFF_F800_028E_0000),
        (0x238, 0xFFFF_F800_0290_0000),
        (0x208, 0xFFFF_F800_0270_0000),
    ] {
        b.set_u64(off, v);
    }
    b.set_u16(0x338, 0x4BE0);
    assert_eq!(b.as_bytes(), &raw[..]);
    // A short read or a short Size limits the fields.
    let short = KdDebuggerData64::parse(&raw[..0x40]).unwrap();
    assert_eq!(short.kern_base(), Some(0xFFFF_F800_0260_0000));
    assert_eq!(short.ps_loaded_module_list(), None);
    assert!(KdDebuggerData64::parse(&raw[..23]).is_err());
}

#[test]
fn ldr_entries() {
    let mut x86 = vec![0u8; 0x34];
    x86[0..4].copy_from_slice(&0x8055_B1C0u32.to_le_bytes());
    x86[0x18..0x1C].copy_from_slice(&0x804D_8000u32.to_le_bytes());
    x86[0x20..0x24].copy_from_slice(&0x1F_8480u32.to_le_bytes());
    x86[0x2C..0x30].copy_from_slice(&[24, 0, 26, 0]);
    x86[0x30..0x34].copy_from_slice(&0xE100_0100u32.to_le_bytes());
    let e = LdrEntry::parse(Arch::X86, &x86).unwrap();
    assert_eq!(e.flink, 0xFFFF_FFFF_8055_B1C0);
    assert_eq!(e.dll_base, 0xFFFF_FFFF_804D_8000);
    assert_eq!(e.size_of_image, 0x1F_8480);
    assert_eq!(
        (
            e.base_dll_name.length,
            e.base_dll_name.maximum_length,
            e.base_dll_name.buffer
        ),
        (24, 26, 0xFFFF_FFFF_E100_0100)
    );

    let mut x64 = vec![0u8; 0x68];
    x64[0x30..0x38].copy_from_slice(&0xFFFF_F800_0260_0000u64.to_le_bytes());
    x64[0x40..0x44].copy_from_slice(&0x0080_0000u32.to_le_bytes());
    x64[0x58..0x5C].copy_from_slice(&[24, 0, 26, 0]);
    x64[0x60..0x68].copy_from_slice(&0xFFFF_C000_0000_1000u64.to_le_bytes());
    let e = LdrEntry::parse(Arch::Amd64, &x64).unwrap();
    assert_eq!(e.dll_base, 0xFFFF_F800_0260_0000);
    assert_eq!(e.size_of_image, 0x80_0000);
    assert_eq!(e.base_dll_name.buffer, 0xFFFF_C000_0000_1000);
    assert!(LdrEntry::parse(Arch::Amd64, &x64[..0x67]).is_err());
}

#[test]
fn context_offsets() {
    let mut raw = vec![0u8; 1232];
    raw[0x30..0x34].copy_from_slice(&0x0010_001Fu32.to_le_bytes());
    raw[0x38..0x3A].copy_from_slice(&0x10u16.to_le_bytes());
    raw[0x42..0x44].copy_from_slice(&0x18u16.to_le_bytes());
    raw[0x44..0x48].copy_from_slice(&0x246u32.to_le_bytes());
    raw[0x70..0x78].copy_from_slice(&0x400u64.to_le_bytes());
    raw[0x78..0x80].copy_from_slice(&1u64.to_le_bytes());
    raw[0xF0..0xF8].copy_from_slice(&15u64.to_le_bytes());
    raw[0xF8..0x100].copy_from_slice(&0xFFFF_F800_0000_1000u64.to_le_bytes());
    let c = Context::parse(Arch::Amd64, &raw).unwrap();
    let Context::Amd64(a) = &c else { panic!() };
    assert_eq!(c.context_flags(), 0x0010_001F);
    assert_eq!(a.get(Amd64Reg::SegCs), 0x10);
    assert_eq!(a.get(Amd64Reg::SegSs), 0x18);
    assert_eq!(c.eflags(), 0x246);
    assert_eq!(a.get(Amd64Reg::Dr7), 0x400);
    assert_eq!(a.get(Amd64Reg::Rax), 1);
    assert_eq!(a.get(Amd64Reg::R15), 15);
    assert_eq!(c.pc(), 0xFFFF_F800_0000_1000);
    assert_eq!(Amd64Reg::from_name("RIP"), Some(Amd64Reg::Rip));
    assert_eq!(X86Reg::from_name("esp"), Some(X86Reg::Esp));

    let mut x = Context::zeroed(Arch::X86);
    x.set_pc(0x8052_F4C4);
    x.set_sp(0xF789_9FF0);
    let b = x.as_bytes();
    assert_eq!(b[0xB8..0xBC], [0xC4, 0xF4, 0x52, 0x80]);
    assert_eq!(b[0xC4..0xC8], [0xF0, 0x9F, 0x89, 0xF7]);
    assert_eq!(b.len(), 716);
    let set = SetContextEx::from_context(&x, ContextRange::pc_sp_fp(Arch::X86));
    assert_eq!(set.offset, 0xB4);
    assert_eq!(set.bytes.len(), 0x14);
}
