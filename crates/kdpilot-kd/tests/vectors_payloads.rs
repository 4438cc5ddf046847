//! Every payload of the real capture through the typed parsers (kd-protocol.md 2.x).

mod common;

use common::*;
use kdpilot_kd::api::*;
use kdpilot_kd::debug_io::{DebugIo, DebugIoMessage};
use kdpilot_kd::file_io::{FileIo, FileIoOp};
use kdpilot_kd::state_change::StateChange;
use kdpilot_kd::wire::packet_type;
use kdpilot_kd::{Arch, PayloadError};

const ARCH: Arch = Arch::Amd64;

macro_rules! dispatch {
    ($api:expr, $f:ident, $($t:ty),* $(,)?) => {
        match $api {
            $(<$t as Api>::NUMBER => Some($f::<$t>),)*
            _ => None,
        }
    };
}

fn req_roundtrip<A: Api>(m: &Manipulate) -> Result<Manipulate, PayloadError> {
    let typed = A::decode_request(m, ARCH)?;
    let again = A::decode_request(&typed.encode_request(ARCH), ARCH)?;
    assert_eq!(
        format!("{:?}", typed.encode_request(ARCH)),
        format!("{:?}", again.encode_request(ARCH))
    );
    Ok(typed.encode_request(ARCH))
}

fn reply_decode<A: Api>(req: &Manipulate, reply: &Manipulate) -> Result<String, PayloadError>
where
    A::Reply: std::fmt::Debug,
{
    let typed = A::decode_request(req, ARCH)?;
    typed.decode_reply(reply, ARCH).map(|r| format!("{r:?}"))
}

type ReqFn = fn(&Manipulate) -> Result<Manipulate, PayloadError>;
type ReplyFn = fn(&Manipulate, &Manipulate) -> Result<String, PayloadError>;

fn request_fn(api: u32) -> Option<ReqFn> {
    dispatch!(
        api,
        req_roundtrip,
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
        QueryMemory,
    )
}

fn reply_fn(api: u32) -> Option<ReplyFn> {
    dispatch!(
        api,
        reply_decode,
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
        QueryMemory,
    )
}

/// Bytes of a host request that the typed request defines (besides the ApiNumber and, except
/// for ReadVirtualMemory, ReturnStatus). WinDbg fills everything else from an uninitialised
/// buffer, so only these must match when a typed request is re-encoded.
#[allow(clippy::single_range_in_vec_init)]
fn defined(api: u32) -> Vec<std::ops::Range<usize>> {
    match api {
        // TargetBaseAddress, TransferCount, ActualBytes (0 in a request), data.
        number::READ_VIRTUAL_MEMORY | number::READ_CONTROL_SPACE | number::WRITE_CONTROL_SPACE => {
            vec![16..28, 56..usize::MAX]
        }
        // Nothing: the union is unused (WinDbg leaves GetContextEx's 0x4D0 ByteCount in it).
        number::GET_VERSION | number::GET_CONTEXT => vec![56..usize::MAX],
        // ContextFlags and the CONTEXT.
        number::SET_CONTEXT => vec![16..20, 56..usize::MAX],
        number::RESTORE_BREAKPOINT | number::CONTINUE => vec![16..20],
        // DBGKD_CONTINUE2 is 32 bytes: 48..56 is junk (a WinDbg user-mode pointer in T1).
        number::CONTINUE2 => vec![16..48],
        number::GET_CONTEXT_EX => vec![16..28],
        other => panic!("no request of api {other:#x} in the capture"),
    }
}

/// Host requests that the typed form reproduces byte for byte, junk included (given the
/// header's ProcessorLevel, Processor and padding, which the caller owns, and for
/// ReadVirtualMemory the ReturnStatus, which WinDbg leaves uninitialised).
const TYPED_EXACT: &[u32] = &[
    190, 218, 380, 432, 436, 440, 444, 448, 452, 456, 460, 464, 492, 496, 500, 504, 508, 512,
];

#[test]
fn manipulate_packets() {
    let v = vectors();
    let mut last_request: std::collections::HashMap<u32, Manipulate> = Default::default();
    let mut exact = Vec::new();
    let mut n = 0;
    for x in v
        .iter()
        .filter(|x| x.packet_type == packet_type::KD_STATE_MANIPULATE)
    {
        n += 1;
        let m = Manipulate::parse(&x.payload).unwrap_or_else(|e| panic!("frame {}: {e}", x.frame));
        assert_eq!(
            m.encode(),
            x.payload,
            "frame {}: generic re-encode",
            x.frame
        );
        if x.host_to_target {
            // WinDbg puts STATUS_PENDING in ReturnStatus, except: Continue/Continue2 copy the
            // ContinueStatus there, and ReadVirtualMemory requests carry whatever was in the
            // buffer (0, 1, 0x10, 0x4e, 0x80000000, stack addresses...).
            let f =
                request_fn(m.api).unwrap_or_else(|| panic!("frame {}: api {:#x}", x.frame, m.api));
            let mut typed = f(&m).unwrap_or_else(|e| panic!("frame {}: {e}", x.frame));
            if m.api == number::READ_VIRTUAL_MEMORY {
                typed.return_status = m.return_status;
            } else {
                assert_eq!(
                    typed.return_status, m.return_status,
                    "frame {}: ReturnStatus",
                    x.frame
                );
                let want = match m.api {
                    number::CONTINUE | number::CONTINUE2 => m.body().u32(0).unwrap(),
                    _ => 0x103,
                };
                assert_eq!(
                    m.return_status, want,
                    "frame {}: WinDbg's ReturnStatus",
                    x.frame
                );
            }
            typed.processor_level = m.processor_level;
            typed.processor = m.processor;
            typed.padding = m.padding;
            let a = typed.encode();
            assert_eq!(a.len(), x.payload.len(), "frame {}: length", x.frame);
            let diff: Vec<usize> = (0..a.len()).filter(|&i| a[i] != x.payload[i]).collect();
            for i in &diff {
                assert!(
                    !defined(m.api).iter().any(|r| r.contains(i)),
                    "frame {} ({}): typed re-encode differs at defined byte {i}",
                    x.frame,
                    number::name(m.api)
                );
            }
            if diff.is_empty() {
                exact.push(x.frame);
            }
            last_request.insert(m.api, m);
        } else {
            let req = last_request
                .get(&m.api)
                .unwrap_or_else(|| panic!("frame {}: reply without request", x.frame));
            let f = reply_fn(m.api).unwrap();
            match f(req, &m) {
                Ok(_) => assert!(m.succeeded(), "frame {}", x.frame),
                Err(PayloadError::Failed { status, .. }) => {
                    assert_eq!(status, m.return_status, "frame {}", x.frame)
                }
                Err(e) => panic!("frame {}: {e}", x.frame),
            }
        }
    }
    assert_eq!(n, 187);
    assert_eq!(exact, TYPED_EXACT);
}

#[test]
fn state_change_packets() {
    let v = vectors();
    let sc: Vec<_> = v
        .iter()
        .filter(|x| x.packet_type == packet_type::KD_STATE_CHANGE64)
        .collect();
    assert_eq!(
        sc.iter().map(|x| x.frame).collect::<Vec<_>>(),
        [8, 378, 952]
    );
    for x in sc {
        let s = StateChange::parse(&x.payload).unwrap_or_else(|e| panic!("frame {}: {e}", x.frame));
        assert_eq!(s.encode(), x.payload, "frame {}: re-encode", x.frame);
        // The typed view alone (no kept junk) still re-encodes to a valid state change with
        // the same typed view.
        let mut clean = s.clone();
        clean.union_bytes = [0; 160];
        assert_eq!(StateChange::parse(&clean.encode()).unwrap(), clean);
    }
}

#[test]
fn debug_io_packets() {
    let v = vectors();
    let mut n = 0;
    for x in v
        .iter()
        .filter(|x| x.packet_type == packet_type::KD_DEBUG_IO)
    {
        n += 1;
        assert!(!x.host_to_target);
        let d = DebugIo::parse(&x.payload).unwrap_or_else(|e| panic!("frame {}: {e}", x.frame));
        assert_eq!(d.encode(), x.payload, "frame {}", x.frame);
        let DebugIoMessage::Print(p) = d.message().unwrap() else {
            panic!("frame {}: not a print", x.frame)
        };
        // Every print in the capture carries exactly LengthOfString bytes.
        assert_eq!(p.string.len(), x.payload.len() - 16, "frame {}", x.frame);
        assert_eq!(p.string, d.string());
        // The typed form drops only @12 (LengthOfStringRead), which PrintString does not use.
        let mut again = p.to_debug_io();
        again.length_of_string_read = d.length_of_string_read;
        assert_eq!(again.encode(), x.payload, "frame {}: typed", x.frame);
    }
    assert_eq!(n, 7);
}

#[test]
fn file_io_packets_and_windbg_replies() {
    let v = vectors();
    let fio: Vec<_> = v
        .iter()
        .filter(|x| x.packet_type == packet_type::KD_FILE_IO)
        .collect();
    assert_eq!(fio.len(), 66);
    let mut pending: Option<FileIo> = None;
    for x in fio {
        let f = FileIo::parse(&x.payload).unwrap_or_else(|e| panic!("frame {}: {e}", x.frame));
        assert_eq!(f.encode(), x.payload, "frame {}", x.frame);
        let FileIoOp::Create(c) = f.op().unwrap() else {
            panic!("frame {}: only CreateFile in the capture", x.frame)
        };
        if x.host_to_target {
            // WinDbg's answer is exactly reply_no_such_file() of the request before it.
            let req = pending.take().expect("reply without a request");
            assert_eq!(
                req.reply_no_such_file().encode(),
                x.payload,
                "frame {}",
                x.frame
            );
            assert_eq!(c.status, 0xC000_000F);
        } else {
            assert!(
                pending.is_none(),
                "frame {}: two requests in a row",
                x.frame
            );
            assert_eq!(c.status, 0);
            let name = f.file_name().unwrap();
            assert!(!name.is_empty(), "frame {}", x.frame);
            assert_eq!(c.name_str(), name);
            // The name is NUL-terminated UTF-16 filling the rest of the packet.
            assert_eq!(
                kdpilot_kd::file_io::utf16z(&name),
                f.data,
                "frame {}",
                x.frame
            );
            pending = Some(f);
        }
    }
    assert!(pending.is_none());
}
