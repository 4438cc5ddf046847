//! Stack walks over the fixture images, checked against the forward-executed stack model at
//! many stop points: entry, mid-prologue, after the prologue, mid-body, in the epilogue, leaf
//! functions, frame-pointer functions, chained unwind info, machine frames; x64 and x86.

use kdpilot_symbols::unwind::{StackTrace, WalkEnd};
use kdpilot_symbols::{
    Arch, CachedReader, FrameTrust, MockMemory, ModuleSet, Registers, StackWalker, WalkConfig,
};

use crate::common::*;
use crate::stack_model::{run, Model, Step, Stop};

static HOOK: std::sync::Mutex<()> = std::sync::Mutex::new(());

const X64_STACK: u64 = 0xFFFF_F880_0321_0000;
const X86_STACK: u64 = 0xFFFF_FFFF_8A21_0000;

/// Nonvolatile registers (encoding order indexes).
const X64_NONVOLATILE: [usize; 8] = [3, 5, 6, 7, 12, 13, 14, 15];
const X86_NONVOLATILE: [usize; 4] = [3, 5, 6, 7];

pub fn setup(arch: Arch, flavour: &str) -> (MockMemory, ModuleSet) {
    let mut mem = MockMemory::new();
    let set = loaded_set(arch, flavour, &mut mem, true, true);
    (mem, set)
}

fn model(
    arch: Arch,
    flavour: &str,
    entry: &'static str,
    path: &[Step],
    stop: Stop,
) -> (Model, ModuleSet) {
    let (mem, set) = setup(arch, flavour);
    let (bits, top) = match arch {
        Arch::Amd64 => (64, X64_STACK),
        Arch::X86 => (32, X86_STACK),
    };
    (run(&set, mem, bits, top, entry, path, stop), set)
}

fn walk(
    set: &ModuleSet,
    m: &Model,
    config: WalkConfig,
) -> (StackTrace, kdpilot_symbols::ReadStats) {
    let mut reader = CachedReader::new(m.mem.clone());
    let trace = block_on(StackWalker::with_config(set, config).walk(&mut reader, m.start)).unwrap();
    (trace, reader.stats())
}

fn function_of(set: &ModuleSet, pc: u64, is_ret: bool) -> String {
    let loc = set.describe(pc, is_ret);
    format!(
        "{}!{}",
        loc.module.unwrap_or_default(),
        loc.symbol.as_deref().unwrap_or("?")
    )
}

fn show(set: &ModuleSet, t: &StackTrace) -> String {
    t.frames
        .iter()
        .enumerate()
        .map(|(i, f)| {
            format!(
                "{i:02} sp={:#x} pc={:#x} {} [{}]\n",
                f.sp,
                f.pc,
                set.describe(f.pc, f.pc_is_return_address),
                f.trust
            )
        })
        .collect::<String>()
        + &format!("end: {:?}", t.end)
}

/// Checks a walk against the model: every frame's function, pc, sp, return-address slot, kb
/// arguments, and (for frames reached through unwind data only) the nonvolatile registers.
fn check(what: &str, set: &ModuleSet, m: &Model, t: &StackTrace, exact_registers: bool) {
    let shown = show(set, t);
    assert_eq!(
        t.frames.len(),
        m.frames.len(),
        "{what}: frame count\n{shown}\nmodel: {:#?}",
        m.frames.iter().map(|f| &f.function).collect::<Vec<_>>()
    );
    assert_eq!(t.end, WalkEnd::Bottom, "{what}\n{shown}");
    let mut all_exact = true;
    for (i, (f, truth)) in t.frames.iter().zip(&m.frames).enumerate() {
        assert_eq!(
            function_of(set, f.pc, f.pc_is_return_address),
            truth.function,
            "{what}: frame {i}\n{shown}"
        );
        assert_eq!(f.pc, truth.pc, "{what}: frame {i} pc\n{shown}");
        assert_eq!(f.sp, truth.sp, "{what}: frame {i} sp\n{shown}");
        assert_eq!(
            f.return_address_slot, truth.ra_slot,
            "{what}: frame {i} return address slot\n{shown}"
        );
        if i + 1 < t.frames.len() {
            assert_eq!(
                f.caller_via_machine_frame, truth.via_interrupt,
                "{what}: frame {i} machine frame\n{shown}"
            );
            let (width, count) = match f.registers {
                Registers::X64(_) => (8usize, 4usize),
                Registers::X86(_) => (4, 3),
            };
            let slot = truth.ra_slot.unwrap();
            let words: Vec<u64> = m
                .mem
                .peek(slot + width as u64, width * count)
                .chunks(width)
                .map(|c| {
                    let mut b = [0u8; 8];
                    b[..width].copy_from_slice(c);
                    u64::from_le_bytes(b)
                })
                .collect();
            assert_eq!(f.args, words, "{what}: frame {i} kb args");
        }
        if i > 0
            && !matches!(
                f.trust,
                FrameTrust::UnwindInfo | FrameTrust::FrameData | FrameTrust::CodeAnalysis
            )
        {
            all_exact = false;
        }
        if exact_registers && all_exact {
            match f.registers {
                Registers::X64(r) => {
                    for ix in X64_NONVOLATILE {
                        assert_eq!(
                            r.gpr[ix], truth.regs[ix],
                            "{what}: frame {i} register {ix}\n{shown}"
                        );
                    }
                }
                Registers::X86(r) => {
                    let got = [0, 0, 0, r.ebx, 0, r.ebp, r.esi, r.edi];
                    for ix in X86_NONVOLATILE {
                        assert_eq!(
                            u64::from(got[ix]),
                            truth.regs[ix] & 0xFFFF_FFFF,
                            "{what}: frame {i} register {ix}\n{shown}"
                        );
                    }
                }
            }
        }
    }
}

/// The boot path into the driver, then `tail`.
fn driver_path(tail: &[Step]) -> Vec<Step> {
    let mut p = vec![
        Step::Call("nt!KiInitializeKernel"),
        Step::Call("nt!IopLoadDriver"),
        Step::Call("nt!KiCallDriverEntry"),
        Step::CallIndirect("leakydrv!DriverEntry"),
        Step::Call("leakydrv!LeakyWorker"),
    ];
    p.extend_from_slice(tail);
    p
}

fn stops_for_function() -> Vec<Stop> {
    let mut v = vec![Stop::Entry, Stop::AfterPrologue];
    v.extend((1..=6).map(Stop::Instructions));
    v.extend((0..=5).map(Stop::BeforeRet));
    v
}

fn try_stop(
    arch: Arch,
    flavour: &str,
    path: &[Step],
    stop: Stop,
    exact: bool,
) -> Option<(Model, ModuleSet)> {
    // Some stop points do not exist in a short function (fewer instructions than asked):
    // the model panics there; skip those.
    let p = path.to_vec();
    let flavour = flavour.to_string();
    let _ = exact;
    let _guard = HOOK.lock().unwrap_or_else(|p| p.into_inner());
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(move || model(arch, &flavour, "nt!KiSystemStartup", &p, stop));
    std::panic::set_hook(hook);
    r.ok()
}

fn walk_all_stops(arch: Arch, flavour: &str, path: &[Step], label: &str) -> usize {
    let mut checked = 0;
    for stop in stops_for_function() {
        let Some((m, set)) = try_stop(arch, flavour, path, stop, true) else {
            continue;
        };
        let (t, _) = walk(&set, &m, WalkConfig::default());
        check(
            &format!("{arch} {flavour} {label} at {stop:?}"),
            &set,
            &m,
            &t,
            true,
        );
        checked += 1;
    }
    assert!(checked >= 6, "{label}: only {checked} stop points");
    checked
}

#[test]
fn x64_leak_paths_at_every_stop_point() {
    let mut total = 0;
    let cases: Vec<(&str, Vec<Step>)> = vec![
        (
            "FramePointer->ExAllocatePoolWithTag",
            driver_path(&[
                Step::Call("leakydrv!LeakyAllocFramePointer"),
                Step::Call("nt!ExAllocatePoolWithTag"),
            ]),
        ),
        (
            "Pushes->ExAllocatePoolWithTag",
            driver_path(&[
                Step::Call("leakydrv!LeakyAllocPushes"),
                Step::Call("nt!ExAllocatePoolWithTag"),
            ]),
        ),
        (
            "LargeLocals->ExAllocatePoolWithTag",
            driver_path(&[
                Step::Call("leakydrv!LeakyAllocLargeLocals"),
                Step::Call("nt!ExAllocatePoolWithTag"),
            ]),
        ),
        (
            "ViaPool2->ExAllocatePool2->ExAllocatePoolWithTag",
            driver_path(&[
                Step::Call("leakydrv!LeakyAllocViaPool2"),
                Step::Call("nt!ExAllocatePool2"),
                Step::Call("nt!ExAllocatePoolWithTag"),
            ]),
        ),
        (
            "MsvcPrologue->ExAllocatePoolWithTag",
            driver_path(&[
                Step::Call("leakydrv!LeakyAllocMsvcPrologue"),
                Step::Call("nt!ExAllocatePoolWithTag"),
            ]),
        ),
        (
            "MsvcPrologue itself",
            driver_path(&[Step::Call("leakydrv!LeakyAllocMsvcPrologue")]),
        ),
        (
            "LargeLocals itself",
            driver_path(&[Step::Call("leakydrv!LeakyAllocLargeLocals")]),
        ),
        (
            "FramePointer itself",
            driver_path(&[Step::Call("leakydrv!LeakyAllocFramePointer")]),
        ),
        (
            "leaf LeakyLeafTag",
            driver_path(&[
                Step::Call("leakydrv!LeakyAllocPushes"),
                Step::Call("leakydrv!LeakyLeafTag"),
            ]),
        ),
        (
            "FreeBalanced->ExFreePoolWithTag",
            driver_path(&[
                Step::Call("leakydrv!LeakyFreeBalanced"),
                Step::Call("nt!ExFreePoolWithTag"),
            ]),
        ),
        (
            "ExAllocatePoolWithTag->MmAllocateSpecialPool",
            driver_path(&[
                Step::Call("leakydrv!LeakyAllocPushes"),
                Step::Call("nt!ExAllocatePoolWithTag"),
                Step::Call("nt!MmAllocateSpecialPool"),
            ]),
        ),
    ];
    for (label, path) in &cases {
        total += walk_all_stops(Arch::Amd64, "classic", path, label);
    }
    let modern: Vec<(&str, Vec<Step>)> = vec![
        (
            "modern ViaPool2->ExAllocatePool2->ExAllocateHeapPool",
            driver_path(&[
                Step::Call("leakydrv!LeakyAllocViaPool2"),
                Step::Call("nt!ExAllocatePool2"),
                Step::Call("nt!ExAllocateHeapPool"),
            ]),
        ),
        (
            "modern Pushes->ExAllocatePoolWithTag",
            driver_path(&[
                Step::Call("leakydrv!LeakyAllocPushes"),
                Step::Call("nt!ExAllocatePoolWithTag"),
            ]),
        ),
    ];
    for (label, path) in &modern {
        total += walk_all_stops(Arch::Amd64, "modern", path, label);
    }
    eprintln!("x64: {total} stops checked");
}

#[test]
fn x64_chained_unwind_info_in_ki_call_driver_entry() {
    let path = [
        Step::Call("nt!KiInitializeKernel"),
        Step::Call("nt!IopLoadDriver"),
        Step::Call("nt!KiCallDriverEntry"),
    ];
    let mut checked = 0;
    // Every instruction of KiCallDriverEntry up to its call (primary and chained regions), and
    // its tail (chained with no codes of its own).
    let stops: Vec<Stop> = (0..=8)
        .map(Stop::Instructions)
        .chain((0..=3).map(Stop::BeforeRet))
        .collect();
    for stop in stops {
        let Some((m, set)) = try_stop(Arch::Amd64, "classic", &path, stop, true) else {
            continue;
        };
        let (t, _) = walk(&set, &m, WalkConfig::default());
        check(
            &format!("KiCallDriverEntry at {stop:?}"),
            &set,
            &m,
            &t,
            true,
        );
        assert!(t.frames[1..]
            .iter()
            .all(|f| f.trust == FrameTrust::UnwindInfo));
        checked += 1;
    }
    assert!(checked >= 11, "{checked}");
}

#[test]
fn x64_machine_frames() {
    // int3 in DbgBreakPoint (reached from ExAllocatePoolWithTag when the tag is PoolHitTag),
    // through KiBreakpointTrap into KiDispatchException.
    let path = driver_path(&[
        Step::Call("leakydrv!LeakyAllocPushes"),
        Step::Call("nt!ExAllocatePoolWithTag"),
        Step::Call("nt!DbgBreakPoint"),
        Step::Interrupt {
            handler: "nt!KiBreakpointTrap",
            stop: Stop::Entry,
            error_code: false,
            after: true,
        },
        Step::Call("nt!KiDispatchException"),
    ]);
    for stop in [Stop::Entry, Stop::Instructions(1)] {
        let (m, set) = model(Arch::Amd64, "classic", "nt!KiSystemStartup", &path, stop);
        let (t, _) = walk(&set, &m, WalkConfig::default());
        check(&format!("breakpoint trap at {stop:?}"), &set, &m, &t, true);
        assert!(t.frames[1].caller_via_machine_frame, "{}", show(&set, &t));
        assert!(
            !t.frames[2].pc_is_return_address,
            "the interrupted pc is exact"
        );
    }
    // A page fault (error code) in LeakyAllocLargeLocals, through KiPageFault into MmAccessFault.
    let path = driver_path(&[
        Step::Call("leakydrv!LeakyAllocLargeLocals"),
        Step::Interrupt {
            handler: "nt!KiPageFault",
            stop: Stop::AfterPrologue,
            error_code: true,
            after: false,
        },
        Step::Call("nt!MmAccessFault"),
    ]);
    let (m, set) = model(
        Arch::Amd64,
        "classic",
        "nt!KiSystemStartup",
        &path,
        Stop::Entry,
    );
    let (t, _) = walk(&set, &m, WalkConfig::default());
    check("page fault", &set, &m, &t, true);
}

#[test]
fn x64_without_local_images_reads_unwind_data_from_the_target() {
    let path = driver_path(&[
        Step::Call("leakydrv!LeakyAllocPushes"),
        Step::Call("nt!ExAllocatePoolWithTag"),
    ]);
    let (m, set) = model(
        Arch::Amd64,
        "classic",
        "nt!KiSystemStartup",
        &path,
        Stop::Entry,
    );
    let (local, local_stats) = walk(&set, &m, WalkConfig::default());
    let mut remote_set = set.clone();
    for module in remote_set.modules_mut() {
        module.image = None;
    }
    let (remote, remote_stats) = walk(&remote_set, &m, WalkConfig::default());
    assert_eq!(
        local
            .frames
            .iter()
            .map(|f| (f.pc, f.sp))
            .collect::<Vec<_>>(),
        remote
            .frames
            .iter()
            .map(|f| (f.pc, f.sp))
            .collect::<Vec<_>>()
    );
    eprintln!(
        "x64 leak stack ({} frames): local images {} reads / {} bytes; unwind data from the target {} reads / {} bytes",
        local.frames.len(),
        local_stats.underlying_reads,
        local_stats.bytes_read,
        remote_stats.underlying_reads,
        remote_stats.bytes_read
    );
    assert!(local_stats.bytes_read < remote_stats.bytes_read);
}

#[test]
fn x64_fallbacks_without_unwind_data() {
    let path = driver_path(&[
        Step::Call("leakydrv!LeakyAllocPushes"),
        Step::Call("nt!ExAllocatePoolWithTag"),
    ]);
    let (m, set) = model(
        Arch::Amd64,
        "classic",
        "nt!KiSystemStartup",
        &path,
        Stop::Entry,
    );
    let mut bare = set.clone();
    for module in bare.modules_mut() {
        module.image = None;
    }
    let config = WalkConfig {
        remote_unwind_info: false,
        ..Default::default()
    };
    let (t, _) = walk(&bare, &m, config);
    // At an entry the return address is at [rsp]: the scan finds the true caller first.
    assert!(t.frames.len() >= 2, "{}", show(&set, &t));
    assert_eq!(t.frames[1].trust, FrameTrust::Scan);
    assert_eq!(t.frames[1].pc, m.frames[1].pc);
    assert!(
        t.frames.windows(2).all(|w| w[1].sp > w[0].sp),
        "always makes progress"
    );
}

#[test]
fn x86_leak_paths_at_every_stop_point() {
    let mut total = 0;
    let cases: Vec<(&str, Vec<Step>, bool)> = vec![
        (
            "Pushes(FPO)->ExAllocatePoolWithTag",
            driver_path(&[
                Step::Call("leakydrv!LeakyAllocPushes"),
                Step::Call("nt!ExAllocatePoolWithTag"),
            ]),
            true,
        ),
        (
            "ViaPool2(FPO)->ExAllocatePool2->ExAllocatePoolWithTag",
            driver_path(&[
                Step::Call("leakydrv!LeakyAllocViaPool2"),
                Step::Call("nt!ExAllocatePool2"),
                Step::Call("nt!ExAllocatePoolWithTag"),
            ]),
            true,
        ),
        (
            "FramePointer(realigned)->ExAllocatePoolWithTag",
            driver_path(&[
                Step::Call("leakydrv!LeakyAllocFramePointer"),
                Step::Call("nt!ExAllocatePoolWithTag"),
            ]),
            true,
        ),
        (
            "LargeLocals->ExAllocatePoolWithTag",
            driver_path(&[
                Step::Call("leakydrv!LeakyAllocLargeLocals"),
                Step::Call("nt!ExAllocatePoolWithTag"),
            ]),
            true,
        ),
        (
            "MsvcPrologue(EBP only)->ExAllocatePoolWithTag",
            driver_path(&[
                Step::Call("leakydrv!LeakyAllocMsvcPrologue"),
                Step::Call("nt!ExAllocatePoolWithTag"),
            ]),
            false,
        ),
        (
            "MsvcPrologue itself",
            driver_path(&[Step::Call("leakydrv!LeakyAllocMsvcPrologue")]),
            false,
        ),
        (
            "Pushes itself",
            driver_path(&[Step::Call("leakydrv!LeakyAllocPushes")]),
            true,
        ),
        (
            "leaf LeakyLeafTag",
            driver_path(&[
                Step::Call("leakydrv!LeakyAllocPushes"),
                Step::Call("leakydrv!LeakyLeafTag"),
            ]),
            true,
        ),
        (
            "FreeBalanced->ExFreePoolWithTag",
            driver_path(&[
                Step::Call("leakydrv!LeakyFreeBalanced"),
                Step::Call("nt!ExFreePoolWithTag"),
            ]),
            true,
        ),
    ];
    for (label, path, exact) in &cases {
        let mut checked = 0;
        for stop in stops_for_function() {
            let Some((m, set)) = try_stop(Arch::X86, "classic", path, stop, *exact) else {
                continue;
            };
            let (t, _) = walk(&set, &m, WalkConfig::default());
            check(&format!("x86 {label} at {stop:?}"), &set, &m, &t, *exact);
            checked += 1;
        }
        assert!(checked >= 6, "{label}: {checked}");
        total += checked;
    }
    eprintln!("x86: {total} stops checked");
}

#[test]
fn x86_breakpoint_in_dbg_break_point() {
    let path = driver_path(&[
        Step::Call("leakydrv!LeakyAllocPushes"),
        Step::Call("nt!ExAllocatePoolWithTag"),
        Step::Call("nt!DbgBreakPoint"),
    ]);
    let (m, set) = model(
        Arch::X86,
        "classic",
        "nt!KiSystemStartup",
        &path,
        Stop::Instructions(1),
    );
    let (t, _) = walk(&set, &m, WalkConfig::default());
    check("x86 DbgBreakPoint after int3", &set, &m, &t, true);
    assert!(
        t.frames[2..]
            .iter()
            .all(|f| f.trust == FrameTrust::FrameData),
        "{}",
        show(&set, &t)
    );
}

#[test]
fn x64_stop_in_the_middle_of_a_body() {
    // At ExAllocatePoolWithTag's call to ExpAllocateNormalPool / MmUseSpecialPool.
    for callee in ["nt!ExpAllocateNormalPool", "nt!MmUseSpecialPool"] {
        let path = driver_path(&[
            Step::Call("leakydrv!LeakyAllocPushes"),
            Step::Call("nt!ExAllocatePoolWithTag"),
        ]);
        let (m, set) = model(
            Arch::Amd64,
            "classic",
            "nt!KiSystemStartup",
            &path,
            Stop::AtCallTo(callee),
        );
        let (t, _) = walk(&set, &m, WalkConfig::default());
        check(&format!("at the call to {callee}"), &set, &m, &t, true);
    }
}

/// A xorshift generator: deterministic garbage without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn garbage_stacks_end_quickly_and_always_make_progress() {
    for arch in [Arch::Amd64, Arch::X86] {
        let (mem, set) = setup(arch, "classic");
        let code: Vec<u64> = set.modules().iter().map(|m| m.base + 0x1000).collect();
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for round in 0..200 {
            let mut mem = mem.clone();
            let top = match arch {
                Arch::Amd64 => 0xFFFF_F880_0400_0000u64,
                Arch::X86 => 0xFFFF_FFFF_8C00_0000,
            };
            // A stack of random words, a third of them pointing into module code.
            let width = arch.pointer_size() as u64;
            mem.map_zeroed(top - 0x2000, 0x2000);
            let mut a = top - 0x2000;
            while a < top {
                let r = rng.next();
                let v = if r % 3 == 0 {
                    code[(r as usize / 3) % code.len()] + (r >> 40) % 0x600
                } else {
                    rng.next()
                };
                if width == 8 {
                    mem.write_u64(a, v)
                } else {
                    mem.write_u32(a, v as u32)
                }
                a += width;
            }
            let sp = top - 0x2000 + ((rng.next() % 0x1000) & !(width - 1));
            let pc = code[round % code.len()] + rng.next() % 0x500;
            let regs = match arch {
                Arch::Amd64 => {
                    let mut r = kdpilot_symbols::X64Registers::new(pc, sp, rng.next());
                    for g in r.gpr.iter_mut().take(4) {
                        *g = rng.next();
                    }
                    r.set(
                        kdpilot_symbols::X64Register::RSP,
                        if round % 17 == 0 { u64::MAX - 7 } else { sp },
                    );
                    Registers::X64(r)
                }
                Arch::X86 => Registers::X86(kdpilot_symbols::X86Registers::new(
                    pc as u32,
                    sp as u32,
                    if round % 2 == 0 {
                        (sp + 0x40) as u32
                    } else {
                        rng.next() as u32
                    },
                )),
            };
            let config = WalkConfig {
                max_frames: 64,
                ..Default::default()
            };
            let mut reader = CachedReader::new(mem);
            let t =
                block_on(StackWalker::with_config(&set, config).walk(&mut reader, regs)).unwrap();
            assert!(t.frames.len() <= 64);
            for w in t.frames.windows(2) {
                assert!(
                    w[1].sp > w[0].sp || w[0].caller_via_machine_frame,
                    "{arch} round {round}: no progress\n{}",
                    show(&set, &t)
                );
            }
            assert!(
                reader.stats().bytes_read < 64 * 1024,
                "{arch} round {round}: {:?}",
                reader.stats()
            );
        }
    }
}
