//! Records with fixed values for the log tests.

#![allow(dead_code)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kdpilot_capture::record::{tag_text, Arch, EventRecord, FrameRecord, HitRecord};

/// 2026-11-22T01:02:03.456Z.
pub fn t0() -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(1_795_309_323_456)
}

/// `t0` plus `ms` milliseconds.
pub fn t(ms: u64) -> SystemTime {
    t0() + Duration::from_millis(ms)
}

#[allow(clippy::too_many_arguments)]
fn frame(
    address: u64,
    module: Option<&str>,
    function: Option<&str>,
    offset: u64,
    child_sp: u64,
    return_address: u64,
    args: &[u64],
    trust: &str,
) -> FrameRecord {
    FrameRecord {
        address,
        module: module.map(str::to_string),
        function: function.map(str::to_string),
        offset,
        child_sp,
        return_address,
        frame_pointer: None,
        args: args.to_vec(),
        trust: trust.to_string(),
    }
}

/// An x64 hit with `n` frames (at most 10): the modern special-pool path from a leaky driver.
pub fn x64_hit(n: usize) -> HitRecord {
    let tag = 0x6b61_654c;
    let all = [
        frame(
            0xffff_f801_0f5a_1230,
            Some("nt"),
            Some("ExAllocateHeapSpecialPool"),
            0,
            0xffff_f880_0100_ee48,
            0xffff_f801_0f5a_11e2,
            &[0x6b61_654c, 0x40, 0x200, 0],
            "context",
        ),
        frame(
            0xffff_f801_0f5a_11e2,
            Some("nt"),
            Some("ExAllocateHeapPool"),
            0x1a2,
            0xffff_f880_0100_ee50,
            0xffff_f801_0f5a_0f7b,
            &[0, 0x40, 0x6b61_654c, 0xffff_c0e7_8000_1780],
            "unwind info",
        ),
        frame(
            0xffff_f801_0f5a_0f7b,
            Some("nt"),
            Some("ExAllocatePoolWithTag"),
            0x3b,
            0xffff_f880_0100_eef0,
            0xffff_f801_1234_1046,
            &[0x200, 0x40, 0x6b61_654c, 0],
            "unwind info",
        ),
        frame(
            0xffff_f801_1234_1046,
            Some("leakydrv"),
            Some("LeakyAllocate"),
            0x46,
            0xffff_f880_0100_ef30,
            0xffff_f801_1234_10d9,
            &[0x40, 0, 0, 0],
            "unwind info",
        ),
        frame(
            0xffff_f801_1234_10d9,
            Some("leakydrv"),
            Some("LeakyWorkItem"),
            0x29,
            0xffff_f880_0100_ef70,
            0xffff_f801_1234_2000,
            &[0xffff_c0e7_8123_4560, 0, 0, 0],
            "unwind info",
        ),
        frame(
            0xffff_f801_1234_2000,
            Some("leakydrv"),
            None,
            0x2000,
            0xffff_f880_0100_efb0,
            0xffff_f801_0f41_3a55,
            &[0, 0, 0, 0],
            "frame pointer",
        ),
        frame(
            0xffff_f801_0f41_3a55,
            Some("nt"),
            Some("IopProcessWorkItem"),
            0xf5,
            0xffff_f880_0100_eff0,
            0xffff_f801_0f43_9e25,
            &[0xffff_c0e7_8123_4560, 0, 0, 0],
            "unwind info",
        ),
        frame(
            0xffff_f801_0f43_9e25,
            Some("nt"),
            Some("ExpWorkerThread"),
            0x105,
            0xffff_f880_0100_f050,
            0xffff_f801_0f52_6d25,
            &[0, 0, 0, 0],
            "unwind info",
        ),
        frame(
            0xffff_f801_0f52_6d25,
            Some("nt"),
            Some("PspSystemThreadStartup"),
            0x55,
            0xffff_f880_0100_f0f0,
            0xffff_f801_0f5f_f778,
            &[0, 0, 0, 0],
            "unwind info",
        ),
        frame(
            0xffff_f801_0f5f_f778,
            Some("nt"),
            Some("KiStartSystemThread"),
            0x28,
            0xffff_f880_0100_f140,
            0,
            &[],
            "unwind info",
        ),
    ];
    HitRecord {
        hit: 17,
        boot: 2,
        time: t0(),
        tag: tag_text(tag),
        tag_value: tag,
        size: 0x40,
        pool_type: 0x200,
        processor: 1,
        thread: 0xffff_c0e7_8000_1780,
        arch: Arch::X64,
        breakpoint: "nt!ExAllocateHeapSpecialPool".into(),
        strategy: "special-pool".into(),
        frames: all.into_iter().take(n).collect(),
        same_stack_as: None,
    }
}

/// An x86 hit: the classic special-pool path, values sign-extended as KD reports them, one
/// frame outside every module.
pub fn x86_hit() -> HitRecord {
    let sx = |v: u32| v as i32 as i64 as u64;
    let tag = u32::from_le_bytes(*b"Le\x01k");
    let mut frames = vec![
        frame(
            sx(0x82a8_b000),
            Some("nt"),
            Some("MmAllocateSpecialPool"),
            0,
            sx(0x8d5a_fb20),
            sx(0x82a8_b5f1),
            &[0x40, tag as u64, 0],
            "context",
        ),
        frame(
            sx(0x82a8_b5f1),
            Some("nt"),
            Some("ExAllocatePoolWithTag"),
            0x5f1,
            sx(0x8d5a_fb2c),
            sx(0x9a41_1046),
            &[0, 0x40, tag as u64],
            "frame data",
        ),
        frame(
            sx(0x9a41_1046),
            Some("leakydrv"),
            Some("LeakyAllocate"),
            0x16,
            sx(0x8d5a_fb48),
            sx(0x9a41_10d9),
            &[0x40],
            "frame pointer",
        ),
        frame(
            sx(0x9a41_10d9),
            None,
            None,
            0,
            sx(0x8d5a_fb60),
            0,
            &[],
            "stack scan",
        ),
    ];
    frames[0].frame_pointer = Some(sx(0x8d5a_fb44));
    frames[1].frame_pointer = Some(sx(0x8d5a_fb44));
    frames[2].frame_pointer = Some(sx(0x8d5a_fb5c));
    HitRecord {
        hit: 3,
        boot: 1,
        time: t(1),
        tag: tag_text(tag),
        tag_value: tag,
        size: 0x40,
        pool_type: 0,
        processor: 0,
        thread: sx(0x8a3c_2020),
        arch: Arch::X86,
        breakpoint: "nt!MmAllocateSpecialPool".into(),
        strategy: "breakpoint".into(),
        frames,
        same_stack_as: None,
    }
}

/// One event of every kind (two for sampling and detaching).
pub fn events() -> Vec<EventRecord> {
    vec![
        EventRecord::Connected {
            time: t(0),
            target: "com:port=/dev/ttyS0,baud=19200".into(),
            version: "0.1.0".into(),
        },
        EventRecord::Boot {
            time: t(1000),
            boot: 2,
            build: 19041,
            arch: Arch::X64,
            kernel_base: 0xffff_f801_0f40_0000,
            kaslr: true,
        },
        EventRecord::Armed {
            time: t(2000),
            boot: 2,
            breakpoint: "nt!ExAllocateHeapSpecialPool".into(),
            address: 0xffff_f801_0f5a_1230,
            strategy: "special-pool".into(),
            reason: "the kernel does not call nt!MmAllocateSpecialPool".into(),
        },
        EventRecord::Armed {
            time: t(2001),
            boot: 1,
            breakpoint: "nt!MmAllocateSpecialPool".into(),
            address: 0xffff_ffff_82a8_b000,
            strategy: "special-pool".into(),
            reason: String::new(),
        },
        EventRecord::Reboot {
            time: t(3000),
            boot: 2,
            reason: "unload all".into(),
        },
        EventRecord::LinkLost {
            time: t(4000),
            boot: Some(3),
            reason: "the socket closed".into(),
        },
        EventRecord::Warning {
            time: t(5000),
            boot: None,
            message: "DbgPrint: \u{1b}[31mred\nnext line".into(),
        },
        EventRecord::Sampled {
            time: t(6000),
            boot: Some(3),
            one_in: 4,
            reason: "the target was frozen 12 s in the last minute".into(),
            skipped: 0,
        },
        EventRecord::Sampled {
            time: t(7000),
            boot: Some(3),
            one_in: 1,
            reason: String::new(),
            skipped: 37,
        },
        EventRecord::Allocated {
            time: t(7100),
            boot: 3,
            hit: 17,
            address: 0xffff_c900_0001_2fb0,
        },
        EventRecord::Free {
            time: t(7200),
            boot: 3,
            hit: 17,
            address: 0xffff_c900_0001_2fb0,
            processor: 1,
            thread: 0xffff_a000_0000_1080,
            arch: Arch::X64,
            breakpoint: "nt!ExFreeHeapSpecialPool".into(),
            frames: x64_hit(3).frames,
            same_stack_as: None,
        },
        EventRecord::Free {
            time: t(7300),
            boot: 3,
            hit: 18,
            address: 0xffff_c900_0001_4fb0,
            processor: 0,
            thread: 0xffff_a000_0000_1080,
            arch: Arch::X64,
            breakpoint: "nt!ExFreeHeapSpecialPool".into(),
            frames: Vec::new(),
            same_stack_as: Some(17),
        },
        EventRecord::SpecialPoolExhausted {
            time: t(7400),
            boot: 3,
            quiet_secs: 600,
            switched: true,
        },
        EventRecord::Detached {
            time: t(8000),
            reason: "interrupted".into(),
            hits: 17,
            clean: true,
            left_planted: vec![],
        },
        EventRecord::Detached {
            time: t(9000),
            reason: "the link was gone".into(),
            hits: 1,
            clean: false,
            left_planted: vec![
                "nt!ExAllocateHeapSpecialPool".into(),
                "nt!PoolHitTag".into(),
            ],
        },
    ]
}
