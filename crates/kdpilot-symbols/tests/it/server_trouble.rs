//! A symbol server in trouble, on loopback: unreachable, failing with an error status, slow,
//! stalled, a 404, a corrupt or truncated download, a corrupt CAB. Every case is time-boxed,
//! ends in a message that names the file, the server and what to do, and leaves the cache with
//! whole, right files only; a server that failed is not asked again for the cooldown, and a
//! file that could not be had is not downloaded again meanwhile.

use std::path::Path;
use std::time::{Duration, Instant};

use kdpilot_symbols::{StoreError, StoreOptions, SymbolPath, SymbolStore};

use crate::common::*;
use crate::http::{Server, Trouble};
use crate::store::{build_store, ids, put, walk};

fn store(path: &str, stall: Duration) -> SymbolStore {
    SymbolStore::new(
        SymbolPath::parse(path).unwrap(),
        StoreOptions {
            default_downstream: None,
            offline: false,
            stall_timeout: stall,
            total_timeout: Duration::from_secs(30),
            ..StoreOptions::default()
        },
        None,
    )
}

/// Files in the cache that are not whole store files: partial downloads, lock files.
fn leftovers(cache: &Path) -> Vec<String> {
    walk(cache)
        .into_iter()
        .map(|p| p.display().to_string())
        .filter(|p| p.ends_with(".part") || p.ends_with(".lock") || p.contains("partial"))
        .collect()
}

/// A loopback port nobody listens on. Port 1 (tcpmux, never served here) refuses at once; a
/// port taken from the ephemeral range and released could be handed to another test's
/// loopback server running in parallel (that made this test flaky).
fn closed_port() -> String {
    let refused = std::net::TcpStream::connect_timeout(
        &"127.0.0.1:1".parse().unwrap(),
        Duration::from_millis(500),
    )
    .is_err();
    assert!(
        refused,
        "something listens on 127.0.0.1:1; this test needs it closed"
    );
    "http://127.0.0.1:1/".to_string()
}

#[test]
fn an_unreachable_server_fails_fast_says_so_and_is_skipped_for_the_cooldown() {
    let cache = tempfile::tempdir().unwrap();
    let url = closed_port();
    let s = store(
        &format!("srv*{}*{url}", cache.path().display()),
        Duration::from_secs(5),
    );
    let (nt, _) = ids("x64", "ntoskrnl.exe");
    let (hal, _) = ids("x64", "hal.dll");
    block_on(async {
        let t = Instant::now();
        let e = s.find_pdb(&nt).await.unwrap_err();
        let msg = e.to_string();
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert!(matches!(e, StoreError::NotFound { .. }), "{msg}");
        assert!(msg.contains("ntkrnlmp.pdb") && msg.contains(&url), "{msg}");
        assert!(
            msg.contains("could not be reached"),
            "says what to check: {msg}"
        );
        // The next module's lookup does not try the server again, and says why.
        let msg = s.find_pdb(&hal).await.unwrap_err().to_string();
        assert!(msg.contains("not asked"), "{msg}");
        eprintln!("unreachable server: {msg}");
    });
    assert!(walk(cache.path()).is_empty(), "{:?}", walk(cache.path()));
}

#[test]
fn a_failing_server_is_skipped_and_the_cache_still_serves() {
    let served = tempfile::tempdir().unwrap();
    build_store(served.path());
    let server = Server::with_trouble(
        served.path(),
        Trouble {
            status: Some(500),
            ..Trouble::default()
        },
    );
    let cache = tempfile::tempdir().unwrap();
    // hal.pdb was downloaded on an earlier night.
    let (hal, _) = ids("x64", "hal.dll");
    put(
        cache.path(),
        "hal.pdb",
        &hal.store_key(),
        &fixture_bytes("x64", "classic", "hal.pdb"),
    );
    let s = store(
        &format!("srv*{}*{}", cache.path().display(), server.url),
        Duration::from_secs(5),
    );
    let (nt, _) = ids("x64", "ntoskrnl.exe");
    let (drv, _) = ids("x64", "leakydrv.sys");
    block_on(async {
        let msg = s.find_pdb(&nt).await.unwrap_err().to_string();
        assert!(msg.contains("500"), "the status is named: {msg}");
        let asked = server.requests().len();
        assert!(asked > 0);
        // Down for the cooldown: no more requests, the cache still answers.
        s.find_pdb(&hal).await.unwrap();
        let msg = s.find_pdb(&drv).await.unwrap_err().to_string();
        assert!(msg.contains("not asked") && msg.contains("500"), "{msg}");
        assert_eq!(server.requests().len(), asked, "{:?}", server.requests());
    });
}

#[test]
fn a_404_is_a_clear_not_found_and_is_not_asked_again_meanwhile() {
    let served = tempfile::tempdir().unwrap();
    let server = Server::start(served.path(), None);
    let cache = tempfile::tempdir().unwrap();
    let s = store(
        &format!("srv*{}*{}", cache.path().display(), server.url),
        Duration::from_secs(5),
    );
    let (nt, _) = ids("x64", "ntoskrnl.exe");
    let (hal, _) = ids("x64", "hal.dll");
    block_on(async {
        let e = s.find_pdb(&nt).await.unwrap_err();
        assert!(matches!(e, StoreError::NotFound { .. }), "{e}");
        assert!(e.to_string().contains("do not have it"), "{e}");
        let asked = server.requests().len();
        // The same file is not asked again (a boot later, the same module)...
        assert!(s.find_pdb(&nt).await.is_err());
        assert_eq!(server.requests().len(), asked);
        // ...but a 404 is no fault of the server: other files are still asked.
        assert!(s.find_pdb(&hal).await.is_err());
        assert!(server.requests().len() > asked);
    });
    assert!(walk(cache.path()).is_empty());
}

#[test]
fn a_slow_server_is_cut_off_by_its_rate_and_leaves_no_partial_file() {
    let served = tempfile::tempdir().unwrap();
    build_store(served.path());
    // 64 bytes every 100 ms: 640 bytes/s, below the 2048 bytes/s floor, never silent for long.
    let server = Server::with_trouble(
        served.path(),
        Trouble {
            trickle: Some(("hal.pd".into(), 64, Duration::from_millis(100))),
            ..Trouble::default()
        },
    );
    let cache = tempfile::tempdir().unwrap();
    let s = store(
        &format!("srv*{}*{}", cache.path().display(), server.url),
        Duration::from_secs(1),
    );
    let (hal, _) = ids("x64", "hal.dll");
    let (nt, _) = ids("x64", "ntoskrnl.exe");
    block_on(async {
        let t = Instant::now();
        let e = s.find_pdb(&hal).await.unwrap_err();
        assert!(matches!(e, StoreError::Timeout { .. }), "{e}");
        assert!(e.to_string().contains("slower than"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        // The server is skipped now: the next lookup is quick and says why.
        let t = Instant::now();
        let msg = s.find_pdb(&nt).await.unwrap_err().to_string();
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        assert!(msg.contains("not asked"), "{msg}");
    });
    assert!(
        leftovers(cache.path()).is_empty(),
        "{:?}",
        leftovers(cache.path())
    );
    let final_path = cache
        .path()
        .join("hal.pdb")
        .join(hal.store_key())
        .join("hal.pdb");
    assert!(!final_path.exists());
}

#[test]
fn a_stalled_download_leaves_no_partial_or_lock_file() {
    let served = tempfile::tempdir().unwrap();
    build_store(served.path());
    let server = Server::start(served.path(), Some("hal.pd"));
    let cache = tempfile::tempdir().unwrap();
    let s = store(
        &format!("srv*{}*{}", cache.path().display(), server.url),
        Duration::from_millis(400),
    );
    let (hal, _) = ids("x64", "hal.dll");
    let e = block_on(s.find_pdb(&hal)).unwrap_err();
    assert!(matches!(e, StoreError::Timeout { .. }), "{e}");
    assert!(
        leftovers(cache.path()).is_empty(),
        "{:?}",
        leftovers(cache.path())
    );
}

#[test]
fn a_corrupt_download_is_refused_and_removed_and_the_cache_stays_clean() {
    let served = tempfile::tempdir().unwrap();
    build_store(served.path());
    // The server's ntkrnlmp.pdb is garbage; its leakydrv.pdb is hal's (a wrong file).
    let (nt, _) = ids("x64", "ntoskrnl.exe");
    let (drv, _) = ids("x64", "leakydrv.sys");
    let good = fixture_bytes("x64", "classic", "ntkrnlmp.pdb");
    let mut garbage = good.clone();
    for b in garbage.iter_mut().skip(64).step_by(7) {
        *b ^= 0x5A;
    }
    put(served.path(), "ntkrnlmp.pdb", &nt.store_key(), &garbage);
    put(
        served.path(),
        "leakydrv.pdb",
        &drv.store_key(),
        &fixture_bytes("x64", "classic", "hal.pdb"),
    );
    let server = Server::start(served.path(), None);
    let cache = tempfile::tempdir().unwrap();
    let path = format!("srv*{}*{}", cache.path().display(), server.url);
    let s = store(&path, Duration::from_secs(5));
    let in_cache = |name: &str, key: &str| cache.path().join(name).join(key).join(name);
    block_on(async {
        let e = s.find_pdb(&nt).await.unwrap_err();
        assert!(matches!(e, StoreError::Unusable { .. }), "{e}");
        assert!(e.to_string().contains("removed from the cache"), "{e}");
        assert!(!in_cache("ntkrnlmp.pdb", &nt.store_key()).exists());
        let e = s.find_pdb(&drv).await.unwrap_err();
        assert!(matches!(e, StoreError::Mismatch { .. }), "{e}");
        assert!(e.to_string().contains("removed from the cache"), "{e}");
        assert!(!in_cache("leakydrv.pdb", &drv.store_key()).exists());
        // Not downloaded again at the next boot's lookup.
        let asked = server.requests().len();
        assert!(s.find_pdb(&nt).await.is_err());
        assert_eq!(server.requests().len(), asked);
    });
    assert!(walk(cache.path()).is_empty(), "{:?}", walk(cache.path()));
    // Once the server is fixed, a new capture downloads the right file: nothing was poisoned.
    put(served.path(), "ntkrnlmp.pdb", &nt.store_key(), &good);
    let s = store(&path, Duration::from_secs(5));
    let (p, _) = block_on(s.find_pdb(&nt)).unwrap();
    assert_eq!(std::fs::read(p).unwrap(), good);
}

#[test]
fn a_truncated_download_or_a_corrupt_cab_leaves_nothing_behind() {
    let served = tempfile::tempdir().unwrap();
    let cab = build_store(served.path());
    let server = Server::with_trouble(
        served.path(),
        Trouble {
            truncate: Some("hal.pdb".into()),
            ..Trouble::default()
        },
    );
    let cache = tempfile::tempdir().unwrap();
    let s = store(
        &format!("srv*{}*{}", cache.path().display(), server.url),
        Duration::from_secs(5),
    );
    let (hal, _) = ids("x64", "hal.dll");
    let e = block_on(s.find_pdb(&hal)).unwrap_err();
    eprintln!("truncated: {e}");
    assert!(walk(cache.path()).is_empty(), "{:?}", walk(cache.path()));

    if !cab {
        eprintln!("note: gcab is not installed; the corrupt CAB case is skipped");
        return;
    }
    // The x86 kernel's PDB is served as a CAB (.pd_): damage its compressed data.
    let (x86, _) = ids("x86", "ntoskrnl.exe");
    let packed = served
        .path()
        .join(&x86.name)
        .join(x86.store_key())
        .join("ntkrpamp.pd_");
    let mut bytes = std::fs::read(&packed).unwrap();
    let n = bytes.len();
    for b in bytes[n / 3..].iter_mut() {
        *b = !*b;
    }
    std::fs::write(&packed, bytes).unwrap();
    // A new store: the first one skips the server now (the truncated download).
    let s = store(
        &format!("srv*{}*{}", cache.path().display(), server.url),
        Duration::from_secs(5),
    );
    let e = block_on(s.find_pdb(&x86)).unwrap_err();
    assert!(server.requests().iter().any(|r| r.ends_with(".pd_")));
    eprintln!("corrupt CAB: {e}");
    assert!(walk(cache.path()).is_empty(), "{:?}", walk(cache.path()));
}
