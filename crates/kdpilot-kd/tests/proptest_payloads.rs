//! Property tests: every typed payload round-trips (request and reply), and no parser panics on
//! arbitrary bytes.

use kdpilot_kd::api::*;
use kdpilot_kd::context::{Amd64Reg, Context, ContextRange, X86Reg};
use kdpilot_kd::debug_io::{DebugIo, DebugIoMessage, GetString, PrintString};
use kdpilot_kd::file_io::{CloseFile, CreateFile, FileIo, FileIoOp, FileTransfer};
use kdpilot_kd::kddebugger_data::{offsets, KdDebuggerData64, LdrEntry};
use kdpilot_kd::state_change::{
    CommandString64, ControlReport, Exception64, ExceptionRecord64, LoadSymbols64, StateChange,
    StateInfo,
};
use kdpilot_kd::Arch;
use proptest::prelude::*;

fn arch() -> impl Strategy<Value = Arch> {
    prop_oneof![Just(Arch::Amd64), Just(Arch::X86)]
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..max)
}

fn context(arch: Arch) -> impl Strategy<Value = Context> {
    proptest::collection::vec(any::<u8>(), arch.context_size())
        .prop_map(move |b| Context::parse(arch, &b).unwrap())
}

/// encode_request -> payload -> parse -> decode_request gives the request back; the same for
/// the reply.
fn round_trip<A: Api + PartialEq + std::fmt::Debug>(req: &A, reply: &A::Reply, arch: Arch)
where
    A::Reply: PartialEq + std::fmt::Debug,
{
    let wire = req.encode_request(arch).encode();
    let m = Manipulate::parse(&wire).unwrap();
    assert_eq!(m.api, A::NUMBER);
    assert_eq!(&A::decode_request(&m, arch).unwrap(), req);
    if A::HAS_REPLY {
        let wire = req.encode_reply(reply, arch).encode();
        let m = Manipulate::parse(&wire).unwrap();
        assert_eq!(&req.decode_reply(&m, arch).unwrap(), reply);
    }
}

proptest! {
    #[test]
    fn continue_apis(a in arch(), status in any::<u32>(), trace in any::<u32>(),
                     dr7 in any::<u64>(), start in any::<u64>(), end in any::<u64>(), cpu in any::<u16>()) {
        let (dr7, start, end) = match a {
            Arch::Amd64 => (dr7, start, end),
            Arch::X86 => (dr7 & 0xFFFF_FFFF, start & 0xFFFF_FFFF, end & 0xFFFF_FFFF),
        };
        let c2 = Continue2 { continue_status: status, trace_flag: trace, dr7, current_symbol_start: start, current_symbol_end: end };
        round_trip(&c2, &(), a);
        prop_assert_eq!(c2.encode_request(a).return_status, status);
        round_trip(&Continue { status }, &(), a);
        round_trip(&Reboot, &(), a);
        round_trip(&SwitchProcessor { processor: cpu }, &(), a);
    }

    #[test]
    fn breakpoints(a in arch(), address in any::<u64>(), handle in 1..=u32::MAX) {
        round_trip(&WriteBreakPoint { address }, &handle, a);
        round_trip(&RestoreBreakPoint { handle }, &(), a);
    }

    #[test]
    fn get_set_context(a in arch(), seed in any::<u64>(), off in 0u32..0x500, n in 0u32..0x500, flags in any::<u32>()) {
        let ctx = {
            let mut b = vec![0u8; a.context_size()];
            for (i, x) in b.iter_mut().enumerate() {
                *x = (seed.rotate_left(i as u32 % 64) as u8) ^ (i as u8);
            }
            Context::parse(a, &b).unwrap()
        };
        round_trip(&GetContext, &ctx, a);
        round_trip(&SetContext { context_flags: flags, context: ctx.clone() }, &(), a);
        round_trip(&SetContext::new(ctx.clone()), &(), a);
        let range = ContextRange { offset: off, byte_count: n };
        let part = ContextBytes { offset: off, bytes: ctx.range_bytes(range).to_vec() };
        round_trip(&GetContextEx { range }, &part, a);
        round_trip(&SetContextEx { offset: off, bytes: part.bytes.clone() }, &n, a);
    }

    #[test]
    fn full_context_bytes(a in arch(), ctx in arch().prop_flat_map(context)) {
        let _ = a;
        let again = Context::parse(ctx.arch(), ctx.as_bytes()).unwrap();
        prop_assert_eq!(&again, &ctx);
        prop_assert_eq!(again.as_bytes().len(), ctx.arch().context_size());
    }

    #[test]
    fn registers(v in any::<u64>(), pick in any::<prop::sample::Index>()) {
        let r = *pick.get(Amd64Reg::ALL);
        let mut c = Context::zeroed(Arch::Amd64);
        let Context::Amd64(a) = &mut c else { unreachable!() };
        a.set(r, v);
        let mask = if r.size() == 8 { u64::MAX } else { (1u64 << (8 * r.size())) - 1 };
        prop_assert_eq!(a.get(r), v & mask);
        let bytes = a.as_bytes();
        prop_assert!(bytes.iter().enumerate().all(|(i, &b)| b == 0 || (r.offset()..r.offset() + r.size()).contains(&i)));

        let r = *pick.get(X86Reg::ALL);
        let mut x = Context::zeroed(Arch::X86);
        let Context::X86(xx) = &mut x else { unreachable!() };
        xx.set(r, v);
        prop_assert_eq!(xx.get(r), v & 0xFFFF_FFFF);
    }

    #[test]
    fn memory_search_msr_query(a in arch(), address in any::<u64>(), length in any::<u64>(),
                               pattern in bytes(200), found in any::<Option<u64>>(), msr in any::<u32>(),
                               value in any::<u64>(), space in any::<u32>(), qflags in any::<u32>()) {
        round_trip(&SearchMemory { address, length, pattern }, &found, a);
        round_trip(&ReadMsr { msr }, &value, a);
        round_trip(&WriteMsr { msr, value }, &(), a);
        round_trip(&QueryMemory { address }, &MemoryInfo { address_space: space, flags: qflags }, a);
        round_trip(&GetVersion, &kdpilot_kd::version::GetVersion64 { kern_base: address, ..Default::default() }, a);
    }

    #[test]
    fn read_write_memory(a in arch(), address in any::<u64>(), data in bytes(3944)) {
        let count = data.len() as u32;
        let reply = ReadReply { status: 0, data: data.clone() };
        round_trip(&ReadVirtualMemory { address, count }, &reply, a);
        round_trip(&ReadControlSpace { address, count }, &reply, a);
        round_trip(&WriteVirtualMemory { address, data: data.clone() }, &count, a);
        round_trip(&WritePhysicalMemory { address, data }, &count, a);
    }
}

fn exception() -> impl Strategy<Value = StateInfo> {
    (any::<[u32; 3]>(), any::<[u64; 2]>(), any::<[u64; 15]>()).prop_map(|(w, q, information)| {
        StateInfo::Exception(Exception64 {
            record: ExceptionRecord64 {
                code: w[0],
                flags: w[1],
                record: q[0],
                address: q[1],
                number_parameters: w[2],
                information,
            },
            first_chance: w[2] & 1,
        })
    })
}

fn load_symbols() -> impl Strategy<Value = StateInfo> {
    (
        any::<[u64; 2]>(),
        any::<[u32; 2]>(),
        any::<u8>(),
        bytes(300),
    )
        .prop_map(|(q, w, unload, path)| {
            StateInfo::LoadSymbols(LoadSymbols64 {
                path_name_length: path.len() as u32,
                base_of_dll: q[0],
                process_id: q[1],
                checksum: w[0],
                size_of_image: w[1],
                unload_symbols: unload,
                path,
            })
        })
}

fn command_string() -> impl Strategy<Value = StateInfo> {
    (any::<[u32; 2]>(), any::<[u64; 7]>(), bytes(300)).prop_map(|(w, reserved2, strings)| {
        StateInfo::CommandString(CommandString64 {
            flags: w[0],
            reserved1: w[1],
            reserved2,
            strings,
        })
    })
}

fn state_change() -> impl Strategy<Value = StateChange> {
    (
        prop_oneof![
            exception(),
            load_symbols(),
            command_string(),
            Just(StateInfo::Unknown)
        ],
        any::<bool>(),
        any::<[u64; 2]>(),
        any::<[u16; 2]>(),
        any::<[u32; 2]>(),
        any::<[u8; 48]>(),
        bytes(200),
        any::<u32>(),
    )
        .prop_map(|(info, alt, q, h, w, report, extra, unknown_state)| {
            let mut s = StateChange::new(info, q[0], q[1]);
            if matches!(s.info, StateInfo::Unknown) {
                // Any NewState that is not one of the three known ones.
                s.new_state = 0x4000_0000 | unknown_state;
            }
            if alt {
                s.new_state |= 0x1_0000;
            }
            s.processor_level = h[0];
            s.processor = h[1];
            s.number_processors = w[0];
            s.padding = w[1];
            s.control_report_bytes = report;
            // CommandString owns all trailing data; for the others it is `extra`.
            if !matches!(s.info, StateInfo::CommandString(_)) {
                s.extra = extra;
            }
            s
        })
}

proptest! {
    #[test]
    fn state_change_built_round_trips(s in state_change()) {
        let bytes = s.encode();
        let back = StateChange::parse(&bytes).unwrap();
        prop_assert_eq!(&back, &s);
        prop_assert_eq!(back.encode(), bytes);
    }

    #[test]
    fn state_change_bytes_round_trip(raw in proptest::collection::vec(any::<u8>(), 240..600),
                                     kind in 0u32..4) {
        let mut raw = raw;
        if kind < 3 {
            raw[0..4].copy_from_slice(&(0x3030 + kind).to_le_bytes());
        }
        let s = StateChange::parse(&raw).unwrap();
        prop_assert_eq!(s.encode(), raw);
        for a in [Arch::Amd64, Arch::X86] {
            let r = s.control_report(a);
            let mut t = s.clone();
            t.set_control_report(&r);
            prop_assert_eq!(t.encode(), s.encode());
            prop_assert!(r.instructions().len() <= 16);
        }
    }

    #[test]
    fn control_report_round_trip(a in arch(), raw in any::<[u8; 48]>()) {
        let r = ControlReport::parse(a, &raw);
        let mut out = [0u8; 48];
        r.write(&mut out);
        let used = if a == Arch::Amd64 { 48 } else { 40 };
        prop_assert_eq!(&out[..used], &raw[..used]);
        prop_assert_eq!(ControlReport::parse(a, &out), r);
    }

    #[test]
    fn debug_io_round_trips(raw in proptest::collection::vec(any::<u8>(), 16..400),
                            text in bytes(300), max in any::<u32>(), level in any::<u16>(), cpu in any::<u16>(),
                            answer in bytes(300)) {
        let d = DebugIo::parse(&raw).unwrap();
        prop_assert_eq!(d.encode(), raw);
        prop_assert!(d.string().len() <= d.data.len());

        let p = PrintString { processor_level: level, processor: cpu, string: text.clone() };
        let back = DebugIo::parse(&p.to_debug_io().encode()).unwrap();
        prop_assert_eq!(back.message().unwrap(), DebugIoMessage::Print(p));

        let g = GetString { processor_level: level, processor: cpu, prompt: text, max_response: max };
        let prompt = DebugIo::parse(&g.to_debug_io().encode()).unwrap();
        prop_assert_eq!(prompt.message().unwrap(), DebugIoMessage::GetString(g));
        let reply = DebugIo::parse(&prompt.prompt_reply(&answer).encode()).unwrap();
        let got = reply.reply().unwrap().answer;
        prop_assert_eq!(&got[..], &answer[..answer.len().min(max as usize)]);
    }

    #[test]
    fn file_io_round_trips(raw in proptest::collection::vec(any::<u8>(), 64..400),
                           w in any::<[u32; 6]>(), q in any::<[u64; 2]>(), data in bytes(300), pick in 0..4u8) {
        let f = FileIo::parse(&raw).unwrap();
        prop_assert_eq!(f.encode(), raw);
        let r = f.reply_no_such_file().encode();
        prop_assert_eq!(r.len(), 64);
        prop_assert_eq!(&r[8..64], &f.encode()[8..64]);

        let op = match pick {
            0 => FileIoOp::Create(CreateFile { status: w[0], desired_access: w[1], file_attributes: w[2], share_access: w[3],
                                               create_disposition: w[4], create_options: w[5], handle: q[0], length: q[1], name: data }),
            1 => FileIoOp::Read(FileTransfer { status: w[0], handle: q[0], offset: q[1], length: w[1], data }),
            2 => FileIoOp::Write(FileTransfer { status: w[0], handle: q[0], offset: q[1], length: w[1], data }),
            _ => FileIoOp::Close(CloseFile { status: w[0], handle: q[0] }),
        };
        let back = FileIo::parse(&op.to_file_io().encode()).unwrap();
        prop_assert_eq!(back.op().unwrap(), op);
    }

    #[test]
    fn kdbg_round_trip(size in 0u32..0x400, v in any::<u64>(), fl in any::<u64>()) {
        let mut k = KdDebuggerData64::new(size, fl, fl);
        k.set_u64(offsets::KERN_BASE, v);
        let back = KdDebuggerData64::parse(k.as_bytes()).unwrap();
        prop_assert_eq!(&back, &k);
        prop_assert!(back.is_valid());
        let has = size as usize >= offsets::KERN_BASE + 8;
        prop_assert_eq!(back.kern_base(), has.then_some(v));
    }
}

/// Every parser and accessor, on any bytes, both architectures. Errors are fine; panics are not.
fn exercise(raw: &[u8]) {
    macro_rules! apis {
        ($m:expr, $($t:ty),*) => {
            $(for a in [Arch::Amd64, Arch::X86] {
                if let Ok(r) = <$t>::decode_request($m, a) {
                    let _ = r.decode_reply($m, a);
                    let _ = r.encode_request(a).encode();
                }
            })*
        };
    }
    if let Ok(m) = Manipulate::parse(raw) {
        apis!(
            &m,
            GetVersion,
            ReadVirtualMemory,
            WriteVirtualMemory,
            ReadPhysicalMemory,
            WritePhysicalMemory,
            ReadControlSpace,
            WriteControlSpace,
            GetContext,
            SetContext,
            GetContextEx,
            SetContextEx,
            WriteBreakPoint,
            RestoreBreakPoint,
            Continue,
            Continue2,
            Reboot,
            SwitchProcessor,
            SearchMemory,
            ReadMsr,
            WriteMsr,
            QueryMemory
        );
        // Also with the ApiNumber forced to each known API, so the typed paths run.
        for api in 0x3130..=0x3162u32 {
            let mut m2 = m.clone();
            m2.api = api;
            apis!(
                &m2,
                GetContext,
                SetContext,
                GetContextEx,
                SetContextEx,
                WriteBreakPoint,
                RestoreBreakPoint,
                Continue,
                Continue2,
                SearchMemory,
                ReadMsr,
                WriteMsr,
                QueryMemory
            );
        }
    }
    if let Ok(s) = StateChange::parse(raw) {
        for a in [Arch::Amd64, Arch::X86] {
            let r = s.control_report(a);
            let _ = (r.instructions(), r.dr7(), r.segments());
        }
        let _ = (
            s.is_unload_all(),
            s.is_breakpoint(),
            s.is_single_step(),
            s.encode(),
        );
        if let StateInfo::LoadSymbols(l) = &s.info {
            let _ = l.path_str();
        }
        if let StateInfo::CommandString(c) = &s.info {
            let _ = (c.name(), c.command());
        }
        if let StateInfo::Exception(e) = &s.info {
            let _ = e.record.parameters();
        }
    }
    if let Ok(d) = DebugIo::parse(raw) {
        let _ = (
            d.text(),
            d.message(),
            d.reply(),
            d.prompt_reply(raw).encode(),
        );
    }
    if let Ok(f) = FileIo::parse(raw) {
        let _ = (f.op(), f.file_name(), f.reply_no_such_file().encode());
    }
    if let Ok(k) = KdDebuggerData64::parse(raw) {
        for off in 0..raw.len() + 8 {
            let _ = (k.u64_at(off), k.u32_at(off), k.u16_at(off));
        }
        let _ = (k.kern_base(), k.pte_base(), k.pae_enabled(), k.usable_len());
    }
    for a in [Arch::Amd64, Arch::X86] {
        if let Ok(mut c) = Context::parse(a, raw) {
            let _ = (c.pc(), c.sp(), c.fp(), c.eflags(), c.context_flags());
            c.apply_partial(raw.len() as u32, raw);
            let _ = c.range_bytes(ContextRange {
                offset: u32::MAX,
                byte_count: u32::MAX,
            });
        }
        let _ = LdrEntry::parse(a, raw);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn parsers_never_panic(raw in bytes(1400)) {
        exercise(&raw);
    }

    #[test]
    fn parsers_never_panic_on_manipulate_like(api in 0x3130u32..0x3162, rest in bytes(1400)) {
        let mut raw = api.to_le_bytes().to_vec();
        raw.extend_from_slice(&rest);
        exercise(&raw);
    }
}
