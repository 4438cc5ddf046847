//! The workload running inside the simulated machine: an [`Activity`] that makes allocations at
//! a configured rate and turns the workload's stops into kernel stops.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use kdpilot_kd::context::Context;
use kdpilot_kd::Arch;

use crate::frames::MappedImage;
use crate::kernel::{Machine, Stop};
use crate::memory::Memory;
use crate::pdbmap::PdbMap;
use crate::target::Activity;
use crate::workload::{AllocApi, AllocationSpec, FreeApi, KernelView, Workload};

/// The workload as seen from the machine.
struct View<'m>(&'m mut Machine);

/// The image file of a WinDbg module name.
fn image_file(module: &str) -> String {
    match module {
        "nt" => "ntoskrnl.exe".into(),
        "hal" => "hal.dll".into(),
        m => format!("{m}.sys"),
    }
}

impl KernelView for View<'_> {
    fn arch(&self) -> Arch {
        self.0.arch
    }
    fn memory(&mut self) -> &mut Memory {
        &mut self.0.memory
    }
    fn image(&self, module: &str) -> Option<MappedImage> {
        let i = self.0.image(&image_file(module))?;
        Some(MappedImage {
            base: i.base,
            size: i.size,
        })
    }
    fn boot_id(&self) -> u64 {
        self.0.boots
    }
    fn breakpoint_at(&self, va: u64) -> bool {
        self.0.planted_at(va)
    }
    fn hardware_breakpoint_at(&self, va: u64) -> Option<u8> {
        self.0.hardware_breakpoint(0, va).map(|i| i as u8)
    }
    fn processors(&self) -> u32 {
        self.0.processors
    }
    fn context(&self, cpu: u16) -> Option<&Context> {
        self.0.cpu(cpu).map(|c| &c.context)
    }
    fn set_context(&mut self, cpu: u16, ctx: Context) {
        self.0.set_context(cpu, ctx);
    }
}

/// The leaky driver's deepest call path, DriverEntry to the function that allocates.
pub const DEEP_PATH: [&str; 7] = [
    "nt!KiCallDriverEntry",
    "leakydrv!DriverEntry",
    "leakydrv!LeakyDeepDispatch",
    "leakydrv!LeakyDeepSubmit",
    "leakydrv!LeakyDeepQueue",
    "leakydrv!LeakyDeepBuild",
    "leakydrv!LeakyAllocDeep",
];

/// Allocations at a steady rate, each walking its path and stopping where the debugger says.
#[derive(Debug)]
pub struct AllocationActivity {
    /// The workload and its ground truth.
    pub workload: Workload,
    /// Time between two allocations.
    pub interval: Duration,
    /// Stop making new allocations after this many (the ones in flight finish).
    pub limit: Option<u64>,
    /// Set when the workload cannot build a stop (a fixture or path mistake): shown once.
    pub error: Option<String>,
    /// Reboot the machine after this many stops in a boot (a scenario: "reboot every N hits").
    pub reboot_every_hits: Option<u64>,
    hits_this_boot: (u64, u64),
    next: Option<Instant>,
    started: u64,
}

impl AllocationActivity {
    /// `rate` allocations per second.
    pub fn new(workload: Workload, rate: f64) -> Self {
        Self {
            workload,
            interval: Duration::from_secs_f64(1.0 / rate.max(0.001)),
            limit: None,
            error: None,
            reboot_every_hits: None,
            hits_this_boot: (0, 0),
            next: None,
            started: 0,
        }
    }

    /// The leaky driver's paths of the fixtures, with `tag` on the leaking ones and another tag
    /// (`Nois`) on a frequent noise path.
    pub fn leakydrv_specs(tag: u32) -> Vec<AllocationSpec> {
        let base = [
            "nt!KiCallDriverEntry",
            "leakydrv!DriverEntry",
            "leakydrv!LeakyWorker",
        ];
        let path = |f: &str| {
            base.iter()
                .map(|s| s.to_string())
                .chain([format!("leakydrv!{f}")])
                .collect()
        };
        let spec = |f: &str, api, tag, size, pool_type, weight, free| AllocationSpec {
            path: path(f),
            api,
            tag,
            size,
            pool_type,
            weight,
            free,
        };
        let noise = u32::from_le_bytes(*b"Nois");
        let (with_tag, pool2) = (AllocApi::PoolWithTag, AllocApi::Pool2);
        let freed = Some(FreeApi::PoolWithTag);
        vec![
            spec(
                "LeakyAllocFramePointer",
                with_tag,
                tag,
                0x28,
                0x200,
                3,
                None,
            ),
            spec("LeakyAllocPushes", with_tag, tag, 0x40, 0x200, 3, None),
            spec("LeakyAllocLargeLocals", with_tag, tag, 0x100, 1, 2, None),
            spec("LeakyAllocViaPool2", pool2, tag, 0x30, 0x40, 2, None),
            spec("LeakyFreeBalanced", with_tag, tag, 0x50, 0x200, 3, freed),
            spec("LeakyNoise", with_tag, noise, 0x40, 0x200, 2, freed),
            spec(
                "LeakyNoise",
                pool2,
                noise,
                0x18,
                0x100,
                2,
                Some(FreeApi::Pool),
            ),
        ]
    }

    /// The fixture driver's deepest path: `leakydrv!LeakyAllocDeep`, five calls below
    /// DriverEntry, leaking `tag` through ExAllocatePoolWithTag ([`DEEP_PATH`]). At the
    /// special-pool allocator its x64 stack has 10 frames (the depth the performance goal is
    /// stated for).
    pub fn deep_spec(tag: u32) -> AllocationSpec {
        AllocationSpec {
            path: DEEP_PATH.iter().map(|s| s.to_string()).collect(),
            api: AllocApi::PoolWithTag,
            tag,
            size: 0x60,
            pool_type: 0x200,
            weight: 1,
            free: None,
        }
    }

    /// A leak hunt: most allocations of `tag` are freed (`leakydrv!LeakyFreeBalanced`, heavy)
    /// and two known paths leak, never freed (`leakydrv!LeakyAllocPushes` through
    /// ExAllocatePoolWithTag and `leakydrv!LeakyAllocViaPool2` through ExAllocatePool2, light),
    /// with noise of another tag (`Nois`, `leakydrv!LeakyNoise`) that is always freed. Only
    /// driver functions that really call the free API free (the workload finds the calls in
    /// their code).
    pub fn leak_hunt_specs(tag: u32) -> Vec<AllocationSpec> {
        let path = |f: &str| -> Vec<String> {
            [
                "nt!KiCallDriverEntry",
                "leakydrv!DriverEntry",
                "leakydrv!LeakyWorker",
            ]
            .iter()
            .map(|s| s.to_string())
            .chain([format!("leakydrv!{f}")])
            .collect()
        };
        let noise = u32::from_le_bytes(*b"Nois");
        let spec = |f: &str, api, tag, size, weight, free| AllocationSpec {
            path: path(f),
            api,
            tag,
            size,
            pool_type: if api == AllocApi::Pool2 { 0x40 } else { 0x200 },
            weight,
            free,
        };
        vec![
            spec(
                "LeakyFreeBalanced",
                AllocApi::PoolWithTag,
                tag,
                0x50,
                8,
                Some(FreeApi::PoolWithTag),
            ),
            spec(
                "LeakyAllocPushes",
                AllocApi::PoolWithTag,
                tag,
                0x40,
                1,
                None,
            ),
            spec("LeakyAllocViaPool2", AllocApi::Pool2, tag, 0x30, 1, None),
            spec(
                "LeakyNoise",
                AllocApi::PoolWithTag,
                noise,
                0x40,
                3,
                Some(FreeApi::PoolWithTag),
            ),
            spec(
                "LeakyNoise",
                AllocApi::Pool2,
                noise,
                0x18,
                2,
                Some(FreeApi::Pool),
            ),
        ]
    }

    /// A workload over the images of a fixture directory (`ntoskrnl.exe` + its PDB, `hal.dll`,
    /// drivers), reading the PDBs there.
    pub fn from_fixture_dir(
        dir: &Path,
        specs: Vec<AllocationSpec>,
        seed: u64,
        rate: f64,
    ) -> std::io::Result<Self> {
        let mut pdbs = BTreeMap::new();
        for (module, names) in [
            ("nt", &["ntkrnlmp.pdb", "ntkrpamp.pdb", "ntoskrnl.pdb"][..]),
            ("hal", &["hal.pdb"][..]),
            ("leakydrv", &["leakydrv.pdb"][..]),
        ] {
            for n in names {
                if let Ok(bytes) = std::fs::read(dir.join(n)) {
                    let map =
                        PdbMap::parse(&bytes).map_err(|e| std::io::Error::other(e.to_string()))?;
                    pdbs.insert(module.to_string(), map);
                    break;
                }
            }
        }
        Ok(Self::new(Workload::new(specs, pdbs, seed), rate))
    }

    /// Gives special pool a per-boot capacity of `blocks` outstanding blocks
    /// ([`Workload::special_pool_blocks`]); `None`: unlimited (the default).
    pub fn with_special_pool_blocks(mut self, blocks: Option<u64>) -> Self {
        self.workload.special_pool_blocks = blocks;
        self
    }
}

/// The named workloads the simulator can run (`kdpilot sim --workload NAME`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Scenario {
    /// The leaky driver ([`AllocationActivity::leakydrv_specs`]): four leaking paths of the
    /// tag, one balanced path, noise.
    #[default]
    Leaky,
    /// A leak hunt ([`AllocationActivity::leak_hunt_specs`]): most allocations of the tag are
    /// freed, two known paths leak.
    LeakHunt,
}

impl Scenario {
    /// Every scenario with its name.
    pub const ALL: [(&'static str, Scenario); 2] = [
        ("leaky", Scenario::Leaky),
        ("leak-hunt", Scenario::LeakHunt),
    ];

    /// The scenario of a name (`leaky`, `leak-hunt`).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)
    }

    /// The scenario's allocations, with `tag` as the tag under investigation.
    pub fn specs(self, tag: u32) -> Vec<AllocationSpec> {
        match self {
            Scenario::Leaky => AllocationActivity::leakydrv_specs(tag),
            Scenario::LeakHunt => AllocationActivity::leak_hunt_specs(tag),
        }
    }
}

impl Activity for AllocationActivity {
    fn poll(&mut self, machine: &mut Machine, now: Instant) -> Option<Stop> {
        if self.error.is_some() {
            return None;
        }
        let resuming = self.workload.in_flight();
        if !resuming {
            if self.limit.is_some_and(|l| self.started >= l) {
                return None;
            }
            let due = *self.next.get_or_insert(now);
            if now < due {
                return None;
            }
            self.next = Some(due + self.interval);
            self.started += 1;
        }
        if self.hits_this_boot.0 != machine.boots {
            self.hits_this_boot = (machine.boots, 0);
        }
        let due = self
            .reboot_every_hits
            .is_some_and(|n| n > 0 && self.hits_this_boot.1 >= n);
        if due && !resuming {
            self.hits_this_boot.1 = 0;
            machine.request_reboot();
            return None;
        }
        let mut view = View(machine);
        match self.workload.step(&mut view) {
            Ok(Some(s)) => {
                self.hits_this_boot.1 += 1;
                Some(Stop {
                    cpu: s.cpu,
                    code: s.code,
                    pc: s.pc,
                    thread: s.thread,
                })
            }
            Ok(None) => None,
            Err(e) => {
                tracing::error!(error = %e, "workload cannot build a stop");
                self.error = Some(e.to_string());
                None
            }
        }
    }
}
