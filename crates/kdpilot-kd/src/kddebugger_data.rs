//! KDDEBUGGER_DATA64, the "KDBG" block (kd-protocol.md 2.3), and the loaded-module list
//! entries it leads to.
//!
//! The block is read from target memory: GetVersion's DebuggerDataList -> Flink -> the
//! DBGKD_DEBUG_DATA_HEADER64 at offset 0 of the block -> read `Size` bytes. Its layout grew
//! with every Windows release, so [`KdDebuggerData64`] keeps the raw bytes and answers each
//! field only if it lies inside both `Size` and the bytes actually read.

use crate::wire::bytes::{Fields, FieldsMut};
use crate::{Arch, PayloadError};

/// Size of DBGKD_DEBUG_DATA_HEADER64.
pub const DEBUG_DATA_HEADER_SIZE: usize = 24;
/// OwnerTag of the kernel's block: 'KDBG'.
pub const KDBG_TAG: u32 = 0x4742_444B;
/// Size of KDDEBUGGER_DATA64 on Windows 7 (what the sheet's offsets were checked against).
pub const KDDEBUGGER_DATA64_SIZE_WIN7: u32 = 0x340;

/// KDDEBUGGER_DATA64 field offsets from the start of the block, header included (R2
/// wdbgexts.h, computed with natural alignment; Windows 7 ends at 0x340, RS5 at 0x37C).
/// Pointer fields are 64-bit on every architecture (sign-extended on x86); the width of each
/// field is noted.
pub mod offsets {
    /// KernBase (u64).
    pub const KERN_BASE: usize = 0x18;
    /// BreakpointWithStatus (u64).
    pub const BREAKPOINT_WITH_STATUS: usize = 0x20;
    /// SavedContext (u64).
    pub const SAVED_CONTEXT: usize = 0x28;
    /// ThCallbackStack (u16).
    pub const TH_CALLBACK_STACK: usize = 0x30;
    /// NextCallback (u16).
    pub const NEXT_CALLBACK: usize = 0x32;
    /// FramePointer (u16).
    pub const FRAME_POINTER: usize = 0x34;
    /// PaeEnabled (u16).
    pub const PAE_ENABLED: usize = 0x36;
    /// KiCallUserMode (u64).
    pub const KI_CALL_USER_MODE: usize = 0x38;
    /// KeUserCallbackDispatcher (u64).
    pub const KE_USER_CALLBACK_DISPATCHER: usize = 0x40;
    /// PsLoadedModuleList (u64).
    pub const PS_LOADED_MODULE_LIST: usize = 0x48;
    /// PsActiveProcessHead (u64).
    pub const PS_ACTIVE_PROCESS_HEAD: usize = 0x50;
    /// PspCidTable (u64).
    pub const PSP_CID_TABLE: usize = 0x58;
    /// ExpSystemResourcesList (u64).
    pub const EXP_SYSTEM_RESOURCES_LIST: usize = 0x60;
    /// ExpPagedPoolDescriptor (u64).
    pub const EXP_PAGED_POOL_DESCRIPTOR: usize = 0x68;
    /// ExpNumberOfPagedPools (u64).
    pub const EXP_NUMBER_OF_PAGED_POOLS: usize = 0x70;
    /// KeTimeIncrement (u64).
    pub const KE_TIME_INCREMENT: usize = 0x78;
    /// KeBugCheckCallbackListHead (u64).
    pub const KE_BUG_CHECK_CALLBACK_LIST_HEAD: usize = 0x80;
    /// KiBugcheckData (u64).
    pub const KI_BUGCHECK_DATA: usize = 0x88;
    /// IopErrorLogListHead (u64).
    pub const IOP_ERROR_LOG_LIST_HEAD: usize = 0x90;
    /// ObpRootDirectoryObject (u64).
    pub const OBP_ROOT_DIRECTORY_OBJECT: usize = 0x98;
    /// ObpTypeObjectType (u64).
    pub const OBP_TYPE_OBJECT_TYPE: usize = 0xa0;
    /// MmSystemCacheStart (u64).
    pub const MM_SYSTEM_CACHE_START: usize = 0xa8;
    /// MmSystemCacheEnd (u64).
    pub const MM_SYSTEM_CACHE_END: usize = 0xb0;
    /// MmSystemCacheWs (u64).
    pub const MM_SYSTEM_CACHE_WS: usize = 0xb8;
    /// MmPfnDatabase (u64).
    pub const MM_PFN_DATABASE: usize = 0xc0;
    /// MmSystemPtesStart (u64).
    pub const MM_SYSTEM_PTES_START: usize = 0xc8;
    /// MmSystemPtesEnd (u64).
    pub const MM_SYSTEM_PTES_END: usize = 0xd0;
    /// MmSubsectionBase (u64).
    pub const MM_SUBSECTION_BASE: usize = 0xd8;
    /// MmNumberOfPagingFiles (u64).
    pub const MM_NUMBER_OF_PAGING_FILES: usize = 0xe0;
    /// MmLowestPhysicalPage (u64).
    pub const MM_LOWEST_PHYSICAL_PAGE: usize = 0xe8;
    /// MmHighestPhysicalPage (u64).
    pub const MM_HIGHEST_PHYSICAL_PAGE: usize = 0xf0;
    /// MmNumberOfPhysicalPages (u64).
    pub const MM_NUMBER_OF_PHYSICAL_PAGES: usize = 0xf8;
    /// MmMaximumNonPagedPoolInBytes (u64).
    pub const MM_MAXIMUM_NON_PAGED_POOL_IN_BYTES: usize = 0x100;
    /// MmNonPagedSystemStart (u64).
    pub const MM_NON_PAGED_SYSTEM_START: usize = 0x108;
    /// MmNonPagedPoolStart (u64).
    pub const MM_NON_PAGED_POOL_START: usize = 0x110;
    /// MmNonPagedPoolEnd (u64).
    pub const MM_NON_PAGED_POOL_END: usize = 0x118;
    /// MmPagedPoolStart (u64).
    pub const MM_PAGED_POOL_START: usize = 0x120;
    /// MmPagedPoolEnd (u64).
    pub const MM_PAGED_POOL_END: usize = 0x128;
    /// MmPagedPoolInformation (u64).
    pub const MM_PAGED_POOL_INFORMATION: usize = 0x130;
    /// MmPageSize (u64).
    pub const MM_PAGE_SIZE: usize = 0x138;
    /// MmSizeOfPagedPoolInBytes (u64).
    pub const MM_SIZE_OF_PAGED_POOL_IN_BYTES: usize = 0x140;
    /// MmTotalCommitLimit (u64).
    pub const MM_TOTAL_COMMIT_LIMIT: usize = 0x148;
    /// MmTotalCommittedPages (u64).
    pub const MM_TOTAL_COMMITTED_PAGES: usize = 0x150;
    /// MmSharedCommit (u64).
    pub const MM_SHARED_COMMIT: usize = 0x158;
    /// MmDriverCommit (u64).
    pub const MM_DRIVER_COMMIT: usize = 0x160;
    /// MmProcessCommit (u64).
    pub const MM_PROCESS_COMMIT: usize = 0x168;
    /// MmPagedPoolCommit (u64).
    pub const MM_PAGED_POOL_COMMIT: usize = 0x170;
    /// MmExtendedCommit (u64).
    pub const MM_EXTENDED_COMMIT: usize = 0x178;
    /// MmZeroedPageListHead (u64).
    pub const MM_ZEROED_PAGE_LIST_HEAD: usize = 0x180;
    /// MmFreePageListHead (u64).
    pub const MM_FREE_PAGE_LIST_HEAD: usize = 0x188;
    /// MmStandbyPageListHead (u64).
    pub const MM_STANDBY_PAGE_LIST_HEAD: usize = 0x190;
    /// MmModifiedPageListHead (u64).
    pub const MM_MODIFIED_PAGE_LIST_HEAD: usize = 0x198;
    /// MmModifiedNoWritePageListHead (u64).
    pub const MM_MODIFIED_NO_WRITE_PAGE_LIST_HEAD: usize = 0x1a0;
    /// MmAvailablePages (u64).
    pub const MM_AVAILABLE_PAGES: usize = 0x1a8;
    /// MmResidentAvailablePages (u64).
    pub const MM_RESIDENT_AVAILABLE_PAGES: usize = 0x1b0;
    /// PoolTrackTable (u64).
    pub const POOL_TRACK_TABLE: usize = 0x1b8;
    /// NonPagedPoolDescriptor (u64).
    pub const NON_PAGED_POOL_DESCRIPTOR: usize = 0x1c0;
    /// MmHighestUserAddress (u64).
    pub const MM_HIGHEST_USER_ADDRESS: usize = 0x1c8;
    /// MmSystemRangeStart (u64).
    pub const MM_SYSTEM_RANGE_START: usize = 0x1d0;
    /// MmUserProbeAddress (u64).
    pub const MM_USER_PROBE_ADDRESS: usize = 0x1d8;
    /// KdPrintCircularBuffer (u64).
    pub const KD_PRINT_CIRCULAR_BUFFER: usize = 0x1e0;
    /// KdPrintCircularBufferEnd (u64).
    pub const KD_PRINT_CIRCULAR_BUFFER_END: usize = 0x1e8;
    /// KdPrintWritePointer (u64).
    pub const KD_PRINT_WRITE_POINTER: usize = 0x1f0;
    /// KdPrintRolloverCount (u64).
    pub const KD_PRINT_ROLLOVER_COUNT: usize = 0x1f8;
    /// MmLoadedUserImageList (u64).
    pub const MM_LOADED_USER_IMAGE_LIST: usize = 0x200;
    /// NtBuildLab (u64).
    pub const NT_BUILD_LAB: usize = 0x208;
    /// KiNormalSystemCall (u64).
    pub const KI_NORMAL_SYSTEM_CALL: usize = 0x210;
    /// KiProcessorBlock (u64).
    pub const KI_PROCESSOR_BLOCK: usize = 0x218;
    /// MmUnloadedDrivers (u64).
    pub const MM_UNLOADED_DRIVERS: usize = 0x220;
    /// MmLastUnloadedDriver (u64).
    pub const MM_LAST_UNLOADED_DRIVER: usize = 0x228;
    /// MmTriageActionTaken (u64).
    pub const MM_TRIAGE_ACTION_TAKEN: usize = 0x230;
    /// MmSpecialPoolTag (u64).
    pub const MM_SPECIAL_POOL_TAG: usize = 0x238;
    /// KernelVerifier (u64).
    pub const KERNEL_VERIFIER: usize = 0x240;
    /// MmVerifierData (u64).
    pub const MM_VERIFIER_DATA: usize = 0x248;
    /// MmAllocatedNonPagedPool (u64).
    pub const MM_ALLOCATED_NON_PAGED_POOL: usize = 0x250;
    /// MmPeakCommitment (u64).
    pub const MM_PEAK_COMMITMENT: usize = 0x258;
    /// MmTotalCommitLimitMaximum (u64).
    pub const MM_TOTAL_COMMIT_LIMIT_MAXIMUM: usize = 0x260;
    /// CmNtCSDVersion (u64).
    pub const CM_NT_CSD_VERSION: usize = 0x268;
    /// MmPhysicalMemoryBlock (u64).
    pub const MM_PHYSICAL_MEMORY_BLOCK: usize = 0x270;
    /// MmSessionBase (u64).
    pub const MM_SESSION_BASE: usize = 0x278;
    /// MmSessionSize (u64).
    pub const MM_SESSION_SIZE: usize = 0x280;
    /// MmSystemParentTablePage (u64).
    pub const MM_SYSTEM_PARENT_TABLE_PAGE: usize = 0x288;
    /// MmVirtualTranslationBase (u64).
    pub const MM_VIRTUAL_TRANSLATION_BASE: usize = 0x290;
    /// OffsetKThreadNextProcessor (u16).
    pub const OFFSET_KTHREAD_NEXT_PROCESSOR: usize = 0x298;
    /// OffsetKThreadTeb (u16).
    pub const OFFSET_KTHREAD_TEB: usize = 0x29a;
    /// OffsetKThreadKernelStack (u16).
    pub const OFFSET_KTHREAD_KERNEL_STACK: usize = 0x29c;
    /// OffsetKThreadInitialStack (u16).
    pub const OFFSET_KTHREAD_INITIAL_STACK: usize = 0x29e;
    /// OffsetKThreadApcProcess (u16).
    pub const OFFSET_KTHREAD_APC_PROCESS: usize = 0x2a0;
    /// OffsetKThreadState (u16).
    pub const OFFSET_KTHREAD_STATE: usize = 0x2a2;
    /// OffsetKThreadBStore (u16).
    pub const OFFSET_KTHREAD_BSTORE: usize = 0x2a4;
    /// OffsetKThreadBStoreLimit (u16).
    pub const OFFSET_KTHREAD_BSTORE_LIMIT: usize = 0x2a6;
    /// SizeEProcess (u16).
    pub const SIZE_EPROCESS: usize = 0x2a8;
    /// OffsetEprocessPeb (u16).
    pub const OFFSET_EPROCESS_PEB: usize = 0x2aa;
    /// OffsetEprocessParentCID (u16).
    pub const OFFSET_EPROCESS_PARENT_CID: usize = 0x2ac;
    /// OffsetEprocessDirectoryTableBase (u16).
    pub const OFFSET_EPROCESS_DIRECTORY_TABLE_BASE: usize = 0x2ae;
    /// SizePrcb (u16).
    pub const SIZE_PRCB: usize = 0x2b0;
    /// OffsetPrcbDpcRoutine (u16).
    pub const OFFSET_PRCB_DPC_ROUTINE: usize = 0x2b2;
    /// OffsetPrcbCurrentThread (u16).
    pub const OFFSET_PRCB_CURRENT_THREAD: usize = 0x2b4;
    /// OffsetPrcbMhz (u16).
    pub const OFFSET_PRCB_MHZ: usize = 0x2b6;
    /// OffsetPrcbCpuType (u16).
    pub const OFFSET_PRCB_CPU_TYPE: usize = 0x2b8;
    /// OffsetPrcbVendorString (u16).
    pub const OFFSET_PRCB_VENDOR_STRING: usize = 0x2ba;
    /// OffsetPrcbProcStateContext (u16).
    pub const OFFSET_PRCB_PROC_STATE_CONTEXT: usize = 0x2bc;
    /// OffsetPrcbNumber (u16).
    pub const OFFSET_PRCB_NUMBER: usize = 0x2be;
    /// SizeEThread (u16).
    pub const SIZE_ETHREAD: usize = 0x2c0;
    /// KdPrintCircularBufferPtr (u64).
    pub const KD_PRINT_CIRCULAR_BUFFER_PTR: usize = 0x2c8;
    /// KdPrintBufferSize (u64).
    pub const KD_PRINT_BUFFER_SIZE: usize = 0x2d0;
    /// KeLoaderBlock (u64).
    pub const KE_LOADER_BLOCK: usize = 0x2d8;
    /// SizePcr (u16).
    pub const SIZE_PCR: usize = 0x2e0;
    /// OffsetPcrSelfPcr (u16).
    pub const OFFSET_PCR_SELF_PCR: usize = 0x2e2;
    /// OffsetPcrCurrentPrcb (u16).
    pub const OFFSET_PCR_CURRENT_PRCB: usize = 0x2e4;
    /// OffsetPcrContainedPrcb (u16).
    pub const OFFSET_PCR_CONTAINED_PRCB: usize = 0x2e6;
    /// OffsetPcrInitialBStore (u16).
    pub const OFFSET_PCR_INITIAL_BSTORE: usize = 0x2e8;
    /// OffsetPcrBStoreLimit (u16).
    pub const OFFSET_PCR_BSTORE_LIMIT: usize = 0x2ea;
    /// OffsetPcrInitialStack (u16).
    pub const OFFSET_PCR_INITIAL_STACK: usize = 0x2ec;
    /// OffsetPcrStackLimit (u16).
    pub const OFFSET_PCR_STACK_LIMIT: usize = 0x2ee;
    /// OffsetPrcbPcrPage (u16).
    pub const OFFSET_PRCB_PCR_PAGE: usize = 0x2f0;
    /// OffsetPrcbProcStateSpecialReg (u16).
    pub const OFFSET_PRCB_PROC_STATE_SPECIAL_REG: usize = 0x2f2;
    /// GdtR0Code (u16).
    pub const GDT_R0_CODE: usize = 0x2f4;
    /// GdtR0Data (u16).
    pub const GDT_R0_DATA: usize = 0x2f6;
    /// GdtR0Pcr (u16).
    pub const GDT_R0_PCR: usize = 0x2f8;
    /// GdtR3Code (u16).
    pub const GDT_R3_CODE: usize = 0x2fa;
    /// GdtR3Data (u16).
    pub const GDT_R3_DATA: usize = 0x2fc;
    /// GdtR3Teb (u16).
    pub const GDT_R3_TEB: usize = 0x2fe;
    /// GdtLdt (u16).
    pub const GDT_LDT: usize = 0x300;
    /// GdtTss (u16).
    pub const GDT_TSS: usize = 0x302;
    /// Gdt64R3CmCode (u16).
    pub const GDT64_R3_CM_CODE: usize = 0x304;
    /// Gdt64R3CmTeb (u16).
    pub const GDT64_R3_CM_TEB: usize = 0x306;
    /// IopNumTriageDumpDataBlocks (u64).
    pub const IOP_NUM_TRIAGE_DUMP_DATA_BLOCKS: usize = 0x308;
    /// IopTriageDumpDataBlocks (u64).
    pub const IOP_TRIAGE_DUMP_DATA_BLOCKS: usize = 0x310;
    /// VfCrashDataBlock (u64).
    pub const VF_CRASH_DATA_BLOCK: usize = 0x318;
    /// MmBadPagesDetected (u64).
    pub const MM_BAD_PAGES_DETECTED: usize = 0x320;
    /// MmZeroedPageSingleBitErrorsDetected (u64).
    pub const MM_ZEROED_PAGE_SINGLE_BIT_ERRORS_DETECTED: usize = 0x328;
    /// EtwpDebuggerData (u64).
    pub const ETWP_DEBUGGER_DATA: usize = 0x330;
    /// OffsetPrcbContext (u16).
    pub const OFFSET_PRCB_CONTEXT: usize = 0x338;
    /// OffsetPrcbMaxBreakpoints (u16).
    pub const OFFSET_PRCB_MAX_BREAKPOINTS: usize = 0x33a;
    /// OffsetPrcbMaxWatchpoints (u16).
    pub const OFFSET_PRCB_MAX_WATCHPOINTS: usize = 0x33c;
    /// OffsetKThreadStackLimit (u32).
    pub const OFFSET_KTHREAD_STACK_LIMIT: usize = 0x340;
    /// OffsetKThreadStackBase (u32).
    pub const OFFSET_KTHREAD_STACK_BASE: usize = 0x344;
    /// OffsetKThreadQueueListEntry (u32).
    pub const OFFSET_KTHREAD_QUEUE_LIST_ENTRY: usize = 0x348;
    /// OffsetEThreadIrpList (u32).
    pub const OFFSET_ETHREAD_IRP_LIST: usize = 0x34c;
    /// OffsetPrcbIdleThread (u16).
    pub const OFFSET_PRCB_IDLE_THREAD: usize = 0x350;
    /// OffsetPrcbNormalDpcState (u16).
    pub const OFFSET_PRCB_NORMAL_DPC_STATE: usize = 0x352;
    /// OffsetPrcbDpcStack (u16).
    pub const OFFSET_PRCB_DPC_STACK: usize = 0x354;
    /// OffsetPrcbIsrStack (u16).
    pub const OFFSET_PRCB_ISR_STACK: usize = 0x356;
    /// SizeKDPC_STACK_FRAME (u16).
    pub const SIZE_KDPC_STACK_FRAME: usize = 0x358;
    /// OffsetKPriQueueThreadListHead (u16).
    pub const OFFSET_KPRIQUEUE_THREAD_LIST_HEAD: usize = 0x35a;
    /// OffsetKThreadWaitReason (u16).
    pub const OFFSET_KTHREAD_WAIT_REASON: usize = 0x35c;
    /// PteBase (u64).
    pub const PTE_BASE: usize = 0x360;
    /// RetpolineStubFunctionTable (u64).
    pub const RETPOLINE_STUB_FUNCTION_TABLE: usize = 0x368;
    /// RetpolineStubFunctionTableSize (u32).
    pub const RETPOLINE_STUB_FUNCTION_TABLE_SIZE: usize = 0x370;
    /// RetpolineStubOffset (u32).
    pub const RETPOLINE_STUB_OFFSET: usize = 0x374;
    /// RetpolineStubSize (u32).
    pub const RETPOLINE_STUB_SIZE: usize = 0x378;
    /// End of the last known field (Windows 10 RS5).
    pub const END_RS5: usize = 0x37c;
}

/// DBGKD_DEBUG_DATA_HEADER64 (24 bytes): the start of every debugger data block.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DebugDataHeader64 {
    /// List.Flink @0 (next block, or the list head).
    pub flink: u64,
    /// List.Blink @8.
    pub blink: u64,
    /// OwnerTag @16 ([`KDBG_TAG`] for the kernel's block).
    pub owner_tag: u32,
    /// Size @20: bytes of the whole block, header included.
    pub size: u32,
}

impl DebugDataHeader64 {
    /// Parses the 24-byte header.
    pub fn parse(bytes: &[u8]) -> Result<Self, PayloadError> {
        let f = Fields::new(bytes, "DBGKD_DEBUG_DATA_HEADER64");
        Ok(Self {
            flink: f.u64(0)?,
            blink: f.u64(8)?,
            owner_tag: f.u32(16)?,
            size: f.u32(20)?,
        })
    }

    /// The 24 bytes.
    pub fn encode(&self) -> [u8; DEBUG_DATA_HEADER_SIZE] {
        let mut out = [0u8; DEBUG_DATA_HEADER_SIZE];
        let mut w = FieldsMut::new(&mut out);
        w.u64(0, self.flink);
        w.u64(8, self.blink);
        w.u32(16, self.owner_tag);
        w.u32(20, self.size);
        out
    }

    /// Whether OwnerTag is 'KDBG'.
    pub fn is_kdbg(&self) -> bool {
        self.owner_tag == KDBG_TAG
    }
}

/// A KDDEBUGGER_DATA64 block as read from the target: raw bytes with bounded field access.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KdDebuggerData64 {
    bytes: Vec<u8>,
}

impl KdDebuggerData64 {
    /// Wraps the bytes read from the block's address. Needs at least the 24-byte header;
    /// `Size` may be smaller or larger than what was read.
    pub fn parse(bytes: &[u8]) -> Result<Self, PayloadError> {
        DebugDataHeader64::parse(bytes)?;
        Ok(Self {
            bytes: bytes.to_vec(),
        })
    }

    /// A zeroed block of `size` bytes with a 'KDBG' header (simulator). Fill it with
    /// [`Self::set_u64`] / [`Self::set_u16`] / [`Self::set_u32`].
    pub fn new(size: u32, flink: u64, blink: u64) -> Self {
        let len = (size as usize).max(DEBUG_DATA_HEADER_SIZE);
        let mut bytes = vec![0u8; len];
        let header = DebugDataHeader64 {
            flink,
            blink,
            owner_tag: KDBG_TAG,
            size,
        };
        FieldsMut::new(&mut bytes).put(0, &header.encode());
        Self { bytes }
    }

    /// The header.
    pub fn header(&self) -> DebugDataHeader64 {
        DebugDataHeader64::parse(&self.bytes).unwrap_or_default()
    }

    /// Whether OwnerTag is 'KDBG' (check before trusting anything else: the block may be
    /// encoded on Win8+ x64 when no debugger was enabled at boot).
    pub fn is_valid(&self) -> bool {
        self.header().is_kdbg()
    }

    /// The raw bytes, as read (or built).
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Bytes usable for fields: the smaller of `Size` and what was read.
    pub fn usable_len(&self) -> usize {
        (self.header().size as usize).min(self.bytes.len())
    }

    fn fields(&self) -> Fields<'_> {
        Fields::new(
            self.bytes.get(..self.usable_len()).unwrap_or(&[]),
            "KDDEBUGGER_DATA64",
        )
    }

    /// The 64-bit field at `offset` (see [`offsets`]), if inside the block.
    pub fn u64_at(&self, offset: usize) -> Option<u64> {
        self.fields().u64(offset).ok()
    }

    /// The 32-bit field at `offset`, if inside the block.
    pub fn u32_at(&self, offset: usize) -> Option<u32> {
        self.fields().u32(offset).ok()
    }

    /// The 16-bit field at `offset`, if inside the block.
    pub fn u16_at(&self, offset: usize) -> Option<u16> {
        self.fields().u16(offset).ok()
    }

    /// Sets a 64-bit field (ignored past the buffer).
    pub fn set_u64(&mut self, offset: usize, v: u64) {
        FieldsMut::new(&mut self.bytes).u64(offset, v);
    }

    /// Sets a 32-bit field (ignored past the buffer).
    pub fn set_u32(&mut self, offset: usize, v: u32) {
        FieldsMut::new(&mut self.bytes).u32(offset, v);
    }

    /// Sets a 16-bit field (ignored past the buffer).
    pub fn set_u16(&mut self, offset: usize, v: u16) {
        FieldsMut::new(&mut self.bytes).u16(offset, v);
    }

    /// KernBase @0x18.
    pub fn kern_base(&self) -> Option<u64> {
        self.u64_at(offsets::KERN_BASE)
    }
    /// BreakpointWithStatus @0x20.
    pub fn breakpoint_with_status(&self) -> Option<u64> {
        self.u64_at(offsets::BREAKPOINT_WITH_STATUS)
    }
    /// SavedContext @0x28.
    pub fn saved_context(&self) -> Option<u64> {
        self.u64_at(offsets::SAVED_CONTEXT)
    }
    /// PaeEnabled @0x36 (bit 0).
    pub fn pae_enabled(&self) -> Option<bool> {
        self.u16_at(offsets::PAE_ENABLED).map(|v| v & 1 != 0)
    }
    /// KiCallUserMode @0x38.
    pub fn ki_call_user_mode(&self) -> Option<u64> {
        self.u64_at(offsets::KI_CALL_USER_MODE)
    }
    /// PsLoadedModuleList @0x48 (address of the LIST_ENTRY head).
    pub fn ps_loaded_module_list(&self) -> Option<u64> {
        self.u64_at(offsets::PS_LOADED_MODULE_LIST)
    }
    /// PsActiveProcessHead @0x50.
    pub fn ps_active_process_head(&self) -> Option<u64> {
        self.u64_at(offsets::PS_ACTIVE_PROCESS_HEAD)
    }
    /// PspCidTable @0x58.
    pub fn psp_cid_table(&self) -> Option<u64> {
        self.u64_at(offsets::PSP_CID_TABLE)
    }
    /// MmPfnDatabase @0xC0.
    pub fn mm_pfn_database(&self) -> Option<u64> {
        self.u64_at(offsets::MM_PFN_DATABASE)
    }
    /// MmPageSize @0x138 (address of the variable).
    pub fn mm_page_size(&self) -> Option<u64> {
        self.u64_at(offsets::MM_PAGE_SIZE)
    }
    /// MmHighestUserAddress @0x1C8.
    pub fn mm_highest_user_address(&self) -> Option<u64> {
        self.u64_at(offsets::MM_HIGHEST_USER_ADDRESS)
    }
    /// MmSystemRangeStart @0x1D0.
    pub fn mm_system_range_start(&self) -> Option<u64> {
        self.u64_at(offsets::MM_SYSTEM_RANGE_START)
    }
    /// NtBuildLab @0x208 (address of the build-lab string).
    pub fn nt_build_lab(&self) -> Option<u64> {
        self.u64_at(offsets::NT_BUILD_LAB)
    }
    /// KiProcessorBlock @0x218 (address of the KPRCB pointer array).
    pub fn ki_processor_block(&self) -> Option<u64> {
        self.u64_at(offsets::KI_PROCESSOR_BLOCK)
    }
    /// MmUnloadedDrivers @0x220.
    pub fn mm_unloaded_drivers(&self) -> Option<u64> {
        self.u64_at(offsets::MM_UNLOADED_DRIVERS)
    }
    /// MmSpecialPoolTag @0x238 (address of the variable).
    pub fn mm_special_pool_tag(&self) -> Option<u64> {
        self.u64_at(offsets::MM_SPECIAL_POOL_TAG)
    }
    /// CmNtCSDVersion @0x268.
    pub fn cm_nt_csd_version(&self) -> Option<u64> {
        self.u64_at(offsets::CM_NT_CSD_VERSION)
    }
    /// OffsetKThreadNextProcessor @0x298.
    pub fn offset_kthread_next_processor(&self) -> Option<u16> {
        self.u16_at(offsets::OFFSET_KTHREAD_NEXT_PROCESSOR)
    }
    /// OffsetPrcbCurrentThread @0x2B4.
    pub fn offset_prcb_current_thread(&self) -> Option<u16> {
        self.u16_at(offsets::OFFSET_PRCB_CURRENT_THREAD)
    }
    /// OffsetPrcbProcStateContext @0x2BC.
    pub fn offset_prcb_proc_state_context(&self) -> Option<u16> {
        self.u16_at(offsets::OFFSET_PRCB_PROC_STATE_CONTEXT)
    }
    /// KeLoaderBlock @0x2D8.
    pub fn ke_loader_block(&self) -> Option<u64> {
        self.u64_at(offsets::KE_LOADER_BLOCK)
    }
    /// SizePcr @0x2E0.
    pub fn size_pcr(&self) -> Option<u16> {
        self.u16_at(offsets::SIZE_PCR)
    }
    /// OffsetPrcbProcStateSpecialReg @0x2F2.
    pub fn offset_prcb_proc_state_special_reg(&self) -> Option<u16> {
        self.u16_at(offsets::OFFSET_PRCB_PROC_STATE_SPECIAL_REG)
    }
    /// OffsetPrcbContext @0x338 (Windows 7 and later).
    pub fn offset_prcb_context(&self) -> Option<u16> {
        self.u16_at(offsets::OFFSET_PRCB_CONTEXT)
    }
    /// PteBase @0x360 (Windows 10 RS1 and later).
    pub fn pte_base(&self) -> Option<u64> {
        self.u64_at(offsets::PTE_BASE)
    }
}

/// Offsets in a loaded-module list entry (KLDR_DATA_TABLE_ENTRY) for one architecture.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LdrEntryLayout {
    /// InLoadOrderLinks.Flink.
    pub flink: usize,
    /// DllBase.
    pub dll_base: usize,
    /// EntryPoint.
    pub entry_point: usize,
    /// SizeOfImage (u32).
    pub size_of_image: usize,
    /// FullDllName (UNICODE_STRING).
    pub full_dll_name: usize,
    /// BaseDllName (UNICODE_STRING).
    pub base_dll_name: usize,
    /// Bytes to read to cover all of the above.
    pub read_size: usize,
}

impl LdrEntryLayout {
    /// The layout for `arch` (x64: DllBase 0x30 ... BaseDllName 0x58; x86: DllBase 0x18 ...
    /// BaseDllName 0x2C).
    pub fn for_arch(arch: Arch) -> Self {
        match arch {
            Arch::Amd64 => Self {
                flink: 0,
                dll_base: 0x30,
                entry_point: 0x38,
                size_of_image: 0x40,
                full_dll_name: 0x48,
                base_dll_name: 0x58,
                read_size: 0x68,
            },
            Arch::X86 => Self {
                flink: 0,
                dll_base: 0x18,
                entry_point: 0x1C,
                size_of_image: 0x20,
                full_dll_name: 0x24,
                base_dll_name: 0x2C,
                read_size: 0x34,
            },
        }
    }
}

/// A UNICODE_STRING as stored in target memory: the text itself is at `buffer`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnicodeStringRef {
    /// Length in bytes (no NUL).
    pub length: u16,
    /// MaximumLength in bytes.
    pub maximum_length: u16,
    /// Buffer address (sign-extended on x86).
    pub buffer: u64,
}

/// The interesting fields of one KLDR_DATA_TABLE_ENTRY.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LdrEntry {
    /// InLoadOrderLinks.Flink: the next entry (the list head when done).
    pub flink: u64,
    /// Image base.
    pub dll_base: u64,
    /// Entry point.
    pub entry_point: u64,
    /// Image size.
    pub size_of_image: u32,
    /// Full path.
    pub full_dll_name: UnicodeStringRef,
    /// File name.
    pub base_dll_name: UnicodeStringRef,
}

impl LdrEntry {
    /// Parses an entry read from target memory (at least `LdrEntryLayout::read_size` bytes).
    pub fn parse(arch: Arch, bytes: &[u8]) -> Result<Self, PayloadError> {
        let l = LdrEntryLayout::for_arch(arch);
        let f = Fields::new(bytes, "KLDR_DATA_TABLE_ENTRY");
        let ptr = |off: usize| -> Result<u64, PayloadError> {
            match arch {
                Arch::Amd64 => f.u64(off),
                Arch::X86 => f.u32(off).map(|v| arch.canonical_address(u64::from(v))),
            }
        };
        let ustr = |off: usize| -> Result<UnicodeStringRef, PayloadError> {
            Ok(UnicodeStringRef {
                length: f.u16(off)?,
                maximum_length: f.u16(off + 2)?,
                buffer: ptr(off + arch.pointer_size())?,
            })
        };
        Ok(Self {
            flink: ptr(l.flink)?,
            dll_base: ptr(l.dll_base)?,
            entry_point: ptr(l.entry_point)?,
            size_of_image: f.u32(l.size_of_image)?,
            full_dll_name: ustr(l.full_dll_name)?,
            base_dll_name: ustr(l.base_dll_name)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sheet_offsets() {
        assert_eq!(offsets::KERN_BASE, 0x18);
        assert_eq!(offsets::PS_LOADED_MODULE_LIST, 0x48);
        assert_eq!(offsets::MM_PAGE_SIZE, 0x138);
        assert_eq!(offsets::NT_BUILD_LAB, 0x208);
        assert_eq!(offsets::KI_PROCESSOR_BLOCK, 0x218);
        assert_eq!(offsets::MM_SPECIAL_POOL_TAG, 0x238);
        assert_eq!(offsets::CM_NT_CSD_VERSION, 0x268);
        assert_eq!(offsets::OFFSET_KTHREAD_NEXT_PROCESSOR, 0x298);
        assert_eq!(offsets::OFFSET_PRCB_CURRENT_THREAD, 0x2B4);
        assert_eq!(offsets::OFFSET_PRCB_PROC_STATE_CONTEXT, 0x2BC);
        assert_eq!(offsets::KE_LOADER_BLOCK, 0x2D8);
        assert_eq!(offsets::SIZE_PCR, 0x2E0);
        assert_eq!(offsets::OFFSET_PRCB_PROC_STATE_SPECIAL_REG, 0x2F2);
        assert_eq!(offsets::OFFSET_PRCB_CONTEXT, 0x338);
    }

    #[test]
    fn fields_are_bounded_by_size() {
        let mut b = KdDebuggerData64::new(0x40, 0, 0);
        b.set_u64(offsets::KERN_BASE, 0xfffff800_00000000);
        b.set_u64(offsets::PS_LOADED_MODULE_LIST, 1);
        assert_eq!(b.kern_base(), Some(0xfffff800_00000000));
        assert_eq!(b.ps_loaded_module_list(), None);
    }
}
