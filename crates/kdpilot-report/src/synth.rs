//! Synthetic capture logs, for tests and benchmarks: a [`SynthCapture`] writes what a capture
//! would (connected, boots with their own kernel bases, hits with real-looking stacks, reboots,
//! the end) through the capture's own record types, with times and addresses fixed by its
//! inputs, so the same calls give the same bytes.
//!
//! The expected results of a test come from what it asked the builder to write (which stack,
//! how many hits, which boot), never from the report under test.

use std::io::{self, Write};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kdpilot_capture::log::json_line;
use kdpilot_capture::record::{Arch, EventRecord, FrameRecord, HitRecord, LogLine};

/// 2026-11-22 01:00:00 UTC, the default start of a synthetic capture.
pub const START: u64 = 1_795_309_200;

/// The start of a synthetic capture as a time: [`START`] plus `seconds`.
pub fn at(seconds: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(START + seconds)
}

/// A frame of a synthetic stack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SynthFrame {
    /// The module (`None`: outside every module).
    pub module: Option<String>,
    /// The function (`None`: no symbols).
    pub function: Option<String>,
    /// The function's start from the module's base.
    pub rva: u64,
    /// The frame's offset in the function.
    pub offset: u64,
}

impl SynthFrame {
    /// `module!function+offset`, with the function at `rva` in the module.
    pub fn new(module: &str, function: &str, rva: u64, offset: u64) -> Self {
        SynthFrame {
            module: Some(module.into()),
            function: Some(function.into()),
            rva,
            offset,
        }
    }

    /// A frame in `module` without a function name, `offset` from its base.
    pub fn unnamed(module: &str, offset: u64) -> Self {
        SynthFrame {
            module: Some(module.into()),
            function: None,
            rva: 0,
            offset,
        }
    }

    /// A frame outside every module, at `address` plus a per-boot shift.
    pub fn outside(address: u64) -> Self {
        SynthFrame {
            module: None,
            function: None,
            rva: address,
            offset: 0,
        }
    }

    /// What the report calls this frame: `module!function+0xoff`, `module+0xoff`, or `None`
    /// for a frame outside every module (its address changes with the boot).
    pub fn call_site(&self) -> Option<String> {
        match (&self.module, &self.function) {
            (Some(m), Some(f)) if self.offset == 0 => Some(format!("{m}!{f}")),
            (Some(m), Some(f)) => Some(format!("{m}!{f}+{:#x}", self.offset)),
            (Some(m), None) => Some(format!("{m}+{:#x}", self.offset)),
            _ => None,
        }
    }
}

/// A module's base in a boot: the kernel and drivers move with every boot (KASLR).
pub fn module_base(module: &str, boot: u64) -> u64 {
    let name = module
        .bytes()
        .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
    let slot = (boot
        .wrapping_mul(7919)
        .wrapping_add(name.wrapping_mul(104_729)))
        % 4096;
    0xffff_f800_0000_0000 + (slot << 24)
}

/// The allocator's frames at the top of every stack of the `special-pool` strategy on a
/// segment-heap kernel, innermost first.
pub fn allocator_frames() -> Vec<SynthFrame> {
    vec![
        SynthFrame::new("nt", "ExAllocateHeapSpecialPool", 0x1a1230, 0),
        SynthFrame::new("nt", "ExAllocateHeapPool", 0x1a1040, 0x1a2),
        SynthFrame::new("nt", "ExAllocatePoolWithTag", 0x1a0f40, 0x3b),
    ]
}

/// The system-call frames at the bottom of a stack that came from user mode, innermost first.
pub fn syscall_frames() -> Vec<SynthFrame> {
    vec![
        SynthFrame::new("nt", "IofCallDriver", 0x31000, 0x55),
        SynthFrame::new("nt", "IopSynchronousServiceTail", 0x62000, 0x1a8),
        SynthFrame::new("nt", "NtDeviceIoControlFile", 0x64000, 0x56),
        SynthFrame::new("nt", "KiSystemServiceCopyEnd", 0x20a000, 0x25),
    ]
}

/// `n` distinct stacks of 10 to 12 frames, spread over five drivers: the allocator, two or
/// three driver frames, the I/O manager and the system call. Stack `i` is the same for every
/// call.
pub fn stacks(n: usize) -> Vec<Vec<SynthFrame>> {
    const DRIVERS: [&str; 5] = ["leakydrv", "netfoo", "fsfilt", "usbbar", "gpuqux"];
    (0..n)
        .map(|i| {
            let driver = DRIVERS
                .get(i % DRIVERS.len())
                .copied()
                .unwrap_or("leakydrv");
            let variant = (i / DRIVERS.len()) as u64;
            let mut frames = allocator_frames();
            frames.push(SynthFrame::new(
                driver,
                "AllocateContext",
                0x1040,
                0x20 + (variant % 16) * 8,
            ));
            frames.push(SynthFrame::new(
                driver,
                &format!("Handler{}", variant / 16),
                0x2000 + (variant / 16) * 0x100,
                0x46,
            ));
            if i % 3 == 0 {
                frames.push(SynthFrame::new(driver, "DispatchIoctl", 0x3000, 0x11c));
            }
            frames.push(SynthFrame::new(
                driver,
                "DispatchDeviceControl",
                0x3400,
                0x2f,
            ));
            frames.extend(syscall_frames());
            frames
        })
        .collect()
}

/// Writes a capture's JSON-lines log, record by record.
pub struct SynthCapture<W: Write> {
    out: W,
    hit: u64,
    boot: u64,
    time: SystemTime,
}

impl<W: Write> SynthCapture<W> {
    /// Starts a capture at `time`: writes its `connected` event.
    pub fn new(out: W, time: SystemTime) -> io::Result<Self> {
        let mut c = SynthCapture {
            out,
            hit: 0,
            boot: 0,
            time,
        };
        c.connected()?;
        Ok(c)
    }

    /// The current time of the capture.
    pub fn time(&self) -> SystemTime {
        self.time
    }

    /// The current boot (0 before the first).
    pub fn boot_number(&self) -> u64 {
        self.boot
    }

    /// Moves the clock on.
    pub fn advance(&mut self, by: Duration) {
        self.time += by;
    }

    fn write(&mut self, line: &LogLine) -> io::Result<()> {
        let bytes = json_line(line)?;
        self.out.write_all(&bytes)
    }

    /// Writes raw bytes (a bad line, a truncated record).
    pub fn raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)
    }

    /// A `connected` event (the start, or a reconnection after [`SynthCapture::link_lost`]).
    pub fn connected(&mut self) -> io::Result<()> {
        self.write(&LogLine::Event(EventRecord::Connected {
            time: self.time,
            target: "com:port=/dev/ttyS0,baud=115200".into(),
            version: "0.1.0".into(),
        }))
    }

    /// The next boot: `boot` and `armed` events, the kernel at this boot's base.
    pub fn boot(&mut self) -> io::Result<()> {
        self.boot += 1;
        let kernel_base = module_base("nt", self.boot);
        self.write(&LogLine::Event(EventRecord::Boot {
            time: self.time,
            boot: self.boot,
            build: 19041,
            arch: Arch::X64,
            kernel_base,
            kaslr: self.boot > 1,
        }))?;
        self.write(&LogLine::Event(EventRecord::Armed {
            time: self.time,
            boot: self.boot,
            breakpoint: "nt!ExAllocateHeapSpecialPool".into(),
            address: kernel_base + 0x1a1230,
            strategy: "special-pool".into(),
            reason: "the kernel has the segment-heap pool".into(),
        }))
    }

    /// The end of the current boot.
    pub fn reboot(&mut self) -> io::Result<()> {
        self.write(&LogLine::Event(EventRecord::Reboot {
            time: self.time,
            boot: self.boot,
            reason: "unload all".into(),
        }))
    }

    /// The link went away (a reconnection continues the same capture).
    pub fn link_lost(&mut self) -> io::Result<()> {
        self.write(&LogLine::Event(EventRecord::LinkLost {
            time: self.time,
            boot: Some(self.boot),
            reason: "the socket closed".into(),
        }))
    }

    /// The end of the capture.
    pub fn detached(&mut self) -> io::Result<()> {
        self.write(&LogLine::Event(EventRecord::Detached {
            time: self.time,
            reason: "max-hits".into(),
            hits: self.hit,
            clean: true,
            left_planted: Vec::new(),
        }))
    }

    /// The hit record of an allocation of `size` bytes with `stack` (innermost first) in the
    /// current boot, at the current time; the capture's hit count goes up by one.
    pub fn hit_record(&mut self, stack: &[SynthFrame], size: u64) -> HitRecord {
        self.hit += 1;
        let boot = self.boot;
        let mut sp = 0xffff_f880_0100_ee48u64;
        let frames: Vec<FrameRecord> = stack
            .iter()
            .map(|f| {
                let address = match &f.module {
                    Some(m) => module_base(m, boot) + f.rva + f.offset,
                    None => f.rva + (boot << 32),
                };
                let offset = match (&f.module, &f.function) {
                    (_, Some(_)) => f.offset,
                    (Some(_), None) => f.offset,
                    (None, None) => 0,
                };
                sp += 0x40;
                FrameRecord {
                    address,
                    module: f.module.clone(),
                    function: f.function.clone(),
                    offset,
                    child_sp: sp,
                    return_address: 0,
                    frame_pointer: None,
                    args: vec![0x6b61654c, size, 0x200, 0],
                    trust: "unwind info".into(),
                }
            })
            .collect();
        HitRecord {
            hit: self.hit,
            boot,
            time: self.time,
            tag: "Leak".into(),
            tag_value: 0x6b61654c,
            size,
            pool_type: 0x200,
            processor: (self.hit % 4) as u16,
            thread: 0xffff_c0e7_8000_1780 + (self.hit % 16) * 0x1000,
            arch: Arch::X64,
            breakpoint: "nt!ExAllocateHeapSpecialPool".into(),
            strategy: "special-pool".into(),
            frames,
            same_stack_as: None,
        }
    }

    /// Writes a hit (see [`SynthCapture::hit_record`]).
    pub fn hit(&mut self, stack: &[SynthFrame], size: u64) -> io::Result<()> {
        let record = self.hit_record(stack, size);
        self.write(&LogLine::Hit(record))
    }

    /// The number of the last hit written (0 before the first).
    pub fn hit_number(&self) -> u64 {
        self.hit
    }

    /// A hit past the per-stack cap: no frames, `same_stack_as: first`.
    pub fn hit_same_stack_as(&mut self, first: u64, size: u64) -> io::Result<()> {
        let mut record = self.hit_record(&[], size);
        record.same_stack_as = Some(first);
        self.write(&LogLine::Hit(record))
    }

    /// The address a synthetic allocation of hit `hit` gets.
    pub fn address_of(hit: u64) -> u64 {
        0xffff_c900_0000_0fb0 + (hit << 13)
    }

    /// `--track-frees`: the `allocated` record of hit `hit` (at [`SynthCapture::address_of`]),
    /// or of a failed allocation (address 0) when `failed`.
    pub fn allocated(&mut self, hit: u64, failed: bool) -> io::Result<()> {
        self.write(&LogLine::Event(EventRecord::Allocated {
            time: self.time,
            boot: self.boot,
            hit,
            address: if failed { 0 } else { Self::address_of(hit) },
        }))
    }

    /// `--track-frees`: the `free` record of hit `hit`, freed by `stack`.
    pub fn free(&mut self, hit: u64, stack: &[SynthFrame]) -> io::Result<()> {
        let frames = self.hit_record(stack, 0).frames;
        self.hit -= 1;
        self.write(&LogLine::Event(EventRecord::Free {
            time: self.time,
            boot: self.boot,
            hit,
            address: Self::address_of(hit),
            processor: 0,
            thread: 0xffff_a000_0000_1080,
            arch: Arch::X64,
            breakpoint: "nt!ExFreeHeapSpecialPool".into(),
            frames,
            same_stack_as: None,
        }))
    }

    /// A `sampled` record: from now on 1 hit in `one_in`, `skipped` hits resumed without a
    /// record since the previous one.
    pub fn sampled(&mut self, one_in: u64, skipped: u64) -> io::Result<()> {
        self.write(&LogLine::Event(EventRecord::Sampled {
            time: self.time,
            boot: Some(self.boot),
            one_in,
            reason: "the target was frozen 40 s in the last minute".into(),
            skipped,
        }))
    }

    /// A `special_pool_exhausted` record.
    pub fn special_pool_exhausted(&mut self, quiet_secs: u64, switched: bool) -> io::Result<()> {
        self.write(&LogLine::Event(EventRecord::SpecialPoolExhausted {
            time: self.time,
            boot: self.boot,
            quiet_secs,
            switched,
        }))
    }

    /// The writer back.
    pub fn into_inner(self) -> W {
        self.out
    }
}
