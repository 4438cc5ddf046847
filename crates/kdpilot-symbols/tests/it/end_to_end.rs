//! The whole of `lm` and `kb` against a mock target: walk the module list, read headers over a
//! caching reader, fetch PDBs and images from a loopback symbol server, walk a stack built by
//! the forward model, print it like `kb`. Also what crossed the "link".

use std::sync::Arc;
use std::time::Duration;

use kdpilot_symbols::{
    Arch, CachedReader, ModuleSet, StackWalker, StoreOptions, SymbolPath, SymbolStatus,
    SymbolStore, WalkConfig, WalkLimits,
};

use crate::common::*;
use crate::http::Server;
use crate::module_walk::boot;
use crate::stack_model::{run, Step, Stop};
use crate::store::build_store;

#[test]
fn lm_then_kb_through_a_symbol_server() {
    let served = tempfile::tempdir().unwrap();
    build_store(served.path());
    let server = Server::start(served.path(), None);
    let cache = tempfile::tempdir().unwrap();
    let store = SymbolStore::new(
        SymbolPath::parse(&format!("srv*{}*{}", cache.path().display(), server.url)).unwrap(),
        StoreOptions {
            default_downstream: None,
            offline: false,
            stall_timeout: Duration::from_secs(10),
            total_timeout: Duration::from_secs(60),
            ..StoreOptions::default()
        },
        None,
    );
    let (mem, kernel, _) = boot(Arch::Amd64);
    block_on(async {
        let mut reader = CachedReader::new(mem);
        let (mut set, warnings) =
            ModuleSet::from_target(&mut reader, &kernel, &WalkLimits::default())
                .await
                .unwrap();
        assert!(warnings.is_empty());
        for (start, len) in set.stable_ranges() {
            reader.mark_stable(start, len);
        }
        let lm_stats = reader.stats();
        let t = std::time::Instant::now();
        for m in set.modules_mut() {
            let load = store.load_module(m).await;
            load.pdb.unwrap();
            load.image.unwrap();
            assert!(
                matches!(m.symbol_status, SymbolStatus::Pdb(_)),
                "{}",
                m.symbol_status
            );
        }
        let fetch_time = t.elapsed();

        // A stop at nt!ExAllocatePoolWithTag reached from LeakyAllocFramePointer.
        let path = [
            Step::Call("nt!KiInitializeKernel"),
            Step::Call("nt!IopLoadDriver"),
            Step::Call("nt!KiCallDriverEntry"),
            Step::CallIndirect("leakydrv!DriverEntry"),
            Step::Call("leakydrv!LeakyWorker"),
            Step::Call("leakydrv!LeakyAllocFramePointer"),
            Step::Call("nt!ExAllocatePoolWithTag"),
        ];
        let model = run(
            &set,
            reader.inner().clone(),
            64,
            0xFFFF_F880_0321_0000,
            "nt!KiSystemStartup",
            &path,
            Stop::Entry,
        );
        *reader.inner_mut() = model.mem.clone();
        reader.new_stop();
        reader.reset_stats();
        let trace = StackWalker::with_config(&set, WalkConfig::default())
            .walk(&mut reader, model.start)
            .await
            .unwrap();
        let stack_stats = reader.stats();
        let kb = trace.format_kb(&set, true);
        eprintln!("{kb}");
        let sites: Vec<String> = trace
            .frames
            .iter()
            .map(|f| {
                let l = set.describe(f.pc, f.pc_is_return_address);
                format!("{}!{}", l.module.unwrap(), l.symbol.unwrap())
            })
            .collect();
        assert_eq!(
            sites,
            [
                "nt!ExAllocatePoolWithTag",
                "leakydrv!LeakyAllocFramePointer",
                "leakydrv!LeakyWorker",
                "leakydrv!DriverEntry",
                "nt!KiCallDriverEntry",
                "nt!IopLoadDriver",
                "nt!KiInitializeKernel",
                "nt!KiSystemStartup",
            ]
        );
        assert!(kb.lines().nth(1).unwrap().ends_with(&format!("nt!ExAllocatePoolWithTag [C:\\kdpilot\\fixtures\\src\\ntoskrnl\\pool_classic.c @ {}]", kb_line(&kb))), "{kb}");
        eprintln!(
            "lm: {} reads / {} bytes below for 3 modules; symbol server: 6 files in {fetch_time:?}; kb: {} reads / {} bytes below",
            lm_stats.underlying_reads, lm_stats.bytes_read, stack_stats.underlying_reads, stack_stats.bytes_read
        );
        assert!(stack_stats.underlying_reads <= 2, "{stack_stats:?}");
        let _ = Arc::new(());
    });
}

/// The line number WinDbg-style output shows on the first frame (whatever it is: the test
/// checks the format, the line itself is checked in the names tests).
fn kb_line(kb: &str) -> String {
    let first = kb.lines().nth(1).unwrap();
    first
        .rsplit(" @ ")
        .next()
        .unwrap()
        .trim_end_matches(']')
        .to_string()
}

/// The lead's capture engine runs these on a multi-threaded tokio runtime: with a `Send`
/// reader the futures must be `Send`, and the shared types `Send + Sync`.
#[test]
fn futures_over_a_send_reader_are_send() {
    fn send<T: Send>(_: &T) {}
    fn send_sync<T: Send + Sync>() {}
    send_sync::<ModuleSet>();
    send_sync::<SymbolStore>();
    send_sync::<kdpilot_symbols::ModuleSymbols>();
    let (mem, kernel, _) = boot(Arch::Amd64);
    let mut reader = CachedReader::new(mem);
    let set = ModuleSet::default();
    {
        let limits = WalkLimits::default();
        let f = ModuleSet::from_target(&mut reader, &kernel, &limits);
        send(&f);
    }
    {
        let walker = StackWalker::new(&set);
        let f = walker.walk(
            &mut reader,
            kdpilot_symbols::Registers::X64(kdpilot_symbols::X64Registers::new(0, 0, 0)),
        );
        send(&f);
    }
    let store = SymbolStore::new(
        SymbolPath::parse("/nonexistent").unwrap(),
        StoreOptions::default(),
        None,
    );
    let mut m = kdpilot_symbols::Module::new("x", "x.sys", 0, 0);
    let f = store.load_module(&mut m);
    send(&f);
}
