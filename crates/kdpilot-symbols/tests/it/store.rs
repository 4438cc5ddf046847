//! Symbol path + store: a loopback HTTP symbol server serving a store with the fixture PDBs and
//! images (one CAB-compressed with gcab), mismatches, hostile names, offline mode, stalls.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kdpilot_symbols::{
    Guid, ImageId, PdbId, PdbSignature, PeFile, ProgressEvent, ProgressSink, StoreError,
    StoreOptions, SymbolPath, SymbolStore,
};

use crate::common::*;
use crate::http::Server;

#[derive(Default)]
struct Events(Mutex<Vec<ProgressEvent>>);

impl ProgressSink for Events {
    fn event(&self, e: &ProgressEvent) {
        self.0.lock().unwrap().push(e.clone());
    }
}

pub fn ids(arch: &str, image: &str) -> (PdbId, ImageId) {
    let pe = PeFile::parse(fixture_bytes(arch, "classic", image)).unwrap();
    (
        pe.codeview().unwrap().pdb_id().unwrap(),
        pe.headers().image_id(image).unwrap(),
    )
}

pub fn put(root: &Path, name: &str, key: &str, bytes: &[u8]) -> PathBuf {
    let dir = root.join(name).join(key);
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Lays out the x64 classic set plainly, and x86's ntkrpamp.pdb as a `.pd_` made with gcab.
/// Returns whether the CAB could be made.
pub fn build_store(root: &Path) -> bool {
    for (image, pdb) in [
        ("ntoskrnl.exe", "ntkrnlmp.pdb"),
        ("hal.dll", "hal.pdb"),
        ("leakydrv.sys", "leakydrv.pdb"),
    ] {
        let (p, i) = ids("x64", image);
        put(
            root,
            pdb,
            &p.store_key(),
            &fixture_bytes("x64", "classic", pdb),
        );
        put(
            root,
            image,
            &i.store_key(),
            &fixture_bytes("x64", "classic", image),
        );
    }
    let (p, _) = ids("x86", "ntoskrnl.exe");
    let dir = root.join(&p.name).join(p.store_key());
    std::fs::create_dir_all(&dir).unwrap();
    let src = fixture("x86", "classic", "ntkrpamp.pdb");
    let work = tempfile::tempdir().unwrap();
    std::fs::copy(&src, work.path().join("ntkrpamp.pdb")).unwrap();
    let made = std::process::Command::new("gcab")
        .current_dir(work.path())
        .args(["-c", "-z", "-n", "ntkrpamp.pd_", "ntkrpamp.pdb"])
        .status()
        .is_ok_and(|s| s.success());
    if made {
        std::fs::copy(work.path().join("ntkrpamp.pd_"), dir.join("ntkrpamp.pd_")).unwrap();
    } else {
        eprintln!("note: gcab is not installed; the CAB (.pd_) case is skipped (apt install gcab)");
        std::fs::copy(&src, dir.join("ntkrpamp.pdb")).unwrap();
    }
    made
}

fn store(path: &str, offline: bool, sink: Option<Arc<Events>>, stall: Duration) -> SymbolStore {
    let options = StoreOptions {
        default_downstream: None,
        offline,
        stall_timeout: stall,
        total_timeout: Duration::from_secs(60),
        ..StoreOptions::default()
    };
    SymbolStore::new(
        SymbolPath::parse(path).unwrap(),
        options,
        sink.map(|s| s as Arc<dyn ProgressSink>),
    )
}

#[test]
fn downloads_pdbs_images_and_cabs_into_a_windbg_layout_cache() {
    let served = tempfile::tempdir().unwrap();
    let cab = build_store(served.path());
    let server = Server::start(served.path(), None);
    let cache = tempfile::tempdir().unwrap();
    let path = format!("srv*{}*{}", cache.path().display(), server.url);
    let events = Arc::new(Events::default());
    let s = store(&path, false, Some(events.clone()), Duration::from_secs(10));
    block_on(async {
        let (pdb, image) = ids("x64", "ntoskrnl.exe");
        let t = Instant::now();
        let (p, syms) = s.find_pdb(&pdb).await.unwrap();
        let pdb_time = t.elapsed();
        assert_eq!(
            p,
            cache
                .path()
                .join("ntkrnlmp.pdb")
                .join(pdb.store_key())
                .join("ntkrnlmp.pdb")
        );
        assert!(syms.rva_of("MmAllocateSpecialPool").is_some());
        let t = Instant::now();
        let (ip, pe) = s.find_image(&image).await.unwrap();
        let image_time = t.elapsed();
        assert_eq!(
            ip,
            cache
                .path()
                .join("ntoskrnl.exe")
                .join("16EC56B9f000")
                .join("ntoskrnl.exe")
        );
        assert_eq!(
            pe.bytes(),
            &fixture_bytes("x64", "classic", "ntoskrnl.exe")[..]
        );

        let (x86pdb, _) = ids("x86", "ntoskrnl.exe");
        let t = Instant::now();
        let (cp, csyms) = s.find_pdb(&x86pdb).await.unwrap();
        let cab_time = t.elapsed();
        assert!(csyms.is_x86());
        assert_eq!(
            std::fs::read(&cp).unwrap(),
            fixture_bytes("x86", "classic", "ntkrpamp.pdb"),
            "CAB extracted byte for byte"
        );
        eprintln!(
            "loopback: ntkrnlmp.pdb (80 KiB) {pdb_time:?}, ntoskrnl.exe {image_time:?}, ntkrpamp.pd_ {} {cab_time:?}",
            if cab { "(CAB)" } else { "(plain: no gcab)" }
        );

        // A second lookup is served from the cache: no new requests.
        let before = server.requests().len();
        s.find_pdb(&pdb).await.unwrap();
        assert_eq!(server.requests().len(), before);
    });
    let ev = events.0.lock().unwrap().clone();
    assert!(ev
        .iter()
        .any(|e| matches!(e, ProgressEvent::DownloadStarted { .. })));
    assert!(ev
        .iter()
        .any(|e| matches!(e, ProgressEvent::DownloadFinished { bytes, .. } if *bytes > 0)));
    assert!(ev
        .iter()
        .any(|e| matches!(e, ProgressEvent::Found { file, .. } if file == "ntkrnlmp.pdb")));
    if cab {
        assert!(server
            .requests()
            .iter()
            .any(|r| r.ends_with("ntkrpamp.pd_")));
        assert!(ev
            .iter()
            .any(|e| matches!(e, ProgressEvent::Extracting { .. })));
    }
}

#[test]
fn a_mismatched_pdb_is_refused_naming_both_identities() {
    let served = tempfile::tempdir().unwrap();
    let (pdb, _) = ids("x64", "leakydrv.sys");
    // The server has hal.pdb under leakydrv.pdb's key.
    put(
        served.path(),
        "leakydrv.pdb",
        &pdb.store_key(),
        &fixture_bytes("x64", "classic", "hal.pdb"),
    );
    let server = Server::start(served.path(), None);
    let cache = tempfile::tempdir().unwrap();
    let s = store(
        &format!("srv*{}*{}", cache.path().display(), server.url),
        false,
        None,
        Duration::from_secs(10),
    );
    let err = block_on(s.find_pdb(&pdb)).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, StoreError::Mismatch { .. }), "{msg}");
    // The wanted GUID, from the store key (GUID digits then the age).
    let key = pdb.store_key();
    let wanted = format!(
        "{{{}-{}-{}-{}-{}}}",
        &key[0..8],
        &key[8..12],
        &key[12..16],
        &key[16..20],
        &key[20..32]
    );
    assert_eq!(wanted.len(), 38);
    assert!(msg.contains(&wanted), "wanted GUID {wanted} named: {msg}");
    assert!(
        msg.contains("{998B7C8A-3064-6C0E-4C4C-44205044422E}"),
        "found GUID named: {msg}"
    );

    // A flat directory with the wrong file is skipped with the same message.
    let flat = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("x64", "classic", "hal.pdb"),
        flat.path().join("leakydrv.pdb"),
    )
    .unwrap();
    let s = store(
        &flat.path().display().to_string(),
        true,
        None,
        Duration::from_secs(10),
    );
    assert!(matches!(
        block_on(s.find_pdb(&pdb)),
        Err(StoreError::Mismatch { .. })
    ));
}

#[test]
fn hostile_pdb_names_stay_inside_the_cache() {
    let served = tempfile::tempdir().unwrap();
    let server = Server::start(served.path(), None);
    let outer = tempfile::tempdir().unwrap();
    let cache = outer.path().join("cache");
    let s = store(
        &format!("srv*{}*{}", cache.display(), server.url),
        false,
        None,
        Duration::from_secs(10),
    );
    let guid = PdbSignature::Guid(Guid([7; 16]));
    // Traversal is cut to the file name: the lookup stays in cache/evil.pdb/...
    let mut cv = kdpilot_symbols::CodeViewInfo {
        signature: guid,
        age: 1,
        pdb_path: "..\\..\\..\\..\\evil.pdb".into(),
    };
    let id = cv.pdb_id().unwrap();
    assert_eq!(id.name, "evil.pdb");
    let err = block_on(s.find_pdb(&id)).unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err}");
    for r in server.requests() {
        assert!(r.starts_with("/evil.pdb/"), "request {r} escaped");
    }
    // Drive letters, NULs, streams and bare dots are refused before any lookup.
    for bad in ["C:evil.pdb", "evil\0.pdb", "x.pdb:ads", "..", "/"] {
        cv.pdb_path = bad.into();
        assert!(cv.pdb_id().is_err(), "{bad:?}");
    }
    // Nothing was created next to the cache.
    let names: Vec<_> = std::fs::read_dir(outer.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(names.iter().all(|n| n == "cache"), "{names:?}");
}

#[test]
fn offline_mode_reads_the_cache_only() {
    let served = tempfile::tempdir().unwrap();
    build_store(served.path());
    let server = Server::start(served.path(), None);
    let cache = tempfile::tempdir().unwrap();
    let path = format!("srv*{}*{}", cache.path().display(), server.url);
    let (pdb, _) = ids("x64", "hal.dll");
    let (missing, _) = ids("x64", "leakydrv.sys");
    block_on(async {
        // Offline before anything is cached: not found, with a hint, and no requests.
        let off = store(&path, true, None, Duration::from_secs(10));
        let err = off.find_pdb(&pdb).await.unwrap_err();
        assert!(err.to_string().contains("offline"), "{err}");
        assert!(server.requests().is_empty());
        // Online fills the cache; offline then finds it.
        store(&path, false, None, Duration::from_secs(10))
            .find_pdb(&pdb)
            .await
            .unwrap();
        let n = server.requests().len();
        off.find_pdb(&pdb).await.unwrap();
        assert!(off.find_pdb(&missing).await.is_err());
        assert_eq!(server.requests().len(), n, "offline made requests");
    });
}

#[test]
fn a_stalled_download_times_out() {
    let served = tempfile::tempdir().unwrap();
    build_store(served.path());
    let server = Server::start(served.path(), Some("hal.pdb"));
    let cache = tempfile::tempdir().unwrap();
    let s = store(
        &format!("srv*{}*{}", cache.path().display(), server.url),
        false,
        None,
        Duration::from_millis(400),
    );
    let (pdb, _) = ids("x64", "hal.dll");
    let t = Instant::now();
    let err = block_on(s.find_pdb(&pdb)).unwrap_err();
    assert!(matches!(err, StoreError::Timeout { .. }), "{err}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // No half-written file is left where WinDbg would take it for the PDB.
    let final_path = cache
        .path()
        .join("hal.pdb")
        .join(pdb.store_key())
        .join("hal.pdb");
    assert!(!final_path.exists());
}

#[test]
fn not_found_names_the_file_and_what_to_do() {
    let empty = tempfile::tempdir().unwrap();
    let s = store(
        &empty.path().display().to_string(),
        false,
        None,
        Duration::from_secs(10),
    );
    let (pdb, _) = ids("x64", "ntoskrnl.exe");
    let msg = block_on(s.find_pdb(&pdb)).unwrap_err().to_string();
    assert!(
        msg.contains("ntkrnlmp.pdb") && msg.contains(&pdb.store_key()),
        "{msg}"
    );
    assert!(msg.contains("srv*"), "suggests a server: {msg}");
}

#[test]
fn flat_directories_work_like_a_build_output_folder() {
    let dir = fixture("x64", "classic", "");
    let s = store(
        &dir.display().to_string(),
        true,
        None,
        Duration::from_secs(10),
    );
    let (pdb, image) = ids("x64", "leakydrv.sys");
    block_on(async {
        let (p, _) = s.find_pdb(&pdb).await.unwrap();
        assert_eq!(p, dir.join("leakydrv.pdb"));
        let (ip, _) = s.find_image(&image).await.unwrap();
        assert_eq!(ip, dir.join("leakydrv.sys"));
    });
}

#[test]
fn drivers_come_through_the_fallback_fetcher_plain_and_compressed() {
    // symsrv 0.5 knows .exe/.dll/.pdb/.dbg only: .sys files (and .sy_ CABs) take our path.
    let served = tempfile::tempdir().unwrap();
    let (_, image) = ids("x64", "leakydrv.sys");
    let bytes = fixture_bytes("x64", "classic", "leakydrv.sys");
    let dir = served.path().join("leakydrv.sys").join(image.store_key());
    std::fs::create_dir_all(&dir).unwrap();
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("leakydrv.sys"), &bytes).unwrap();
    let cab = std::process::Command::new("gcab")
        .current_dir(work.path())
        .args(["-c", "-z", "-n", "leakydrv.sy_", "leakydrv.sys"])
        .status()
        .is_ok_and(|s| s.success());
    if cab {
        std::fs::copy(work.path().join("leakydrv.sy_"), dir.join("leakydrv.sy_")).unwrap();
    } else {
        eprintln!("note: gcab is not installed; the .sy_ case is served plain");
        std::fs::write(dir.join("leakydrv.sys"), &bytes).unwrap();
    }
    // An upper-case name too (symsrv refuses "SYS").
    let upper = ImageId {
        name: "LEAKYDRV.SYS".into(),
        ..image.clone()
    };
    put(served.path(), "LEAKYDRV.SYS", &upper.store_key(), &bytes);
    let server = Server::start(served.path(), None);
    let cache = tempfile::tempdir().unwrap();
    let events = Arc::new(Events::default());
    let s = store(
        &format!("srv*{}*{}", cache.path().display(), server.url),
        false,
        Some(events.clone()),
        Duration::from_secs(10),
    );
    block_on(async {
        let (p, pe) = s.find_image(&image).await.unwrap();
        assert_eq!(
            p,
            cache
                .path()
                .join("leakydrv.sys")
                .join(image.store_key())
                .join("leakydrv.sys")
        );
        assert_eq!(pe.bytes(), &bytes[..]);
        let (p, _) = s.find_image(&upper).await.unwrap();
        assert!(p.ends_with("LEAKYDRV.SYS"));
        // Cached now: offline finds both without the server.
        let n = server.requests().len();
        let off = store(
            &format!("srv*{}*{}", cache.path().display(), server.url),
            true,
            None,
            Duration::from_secs(10),
        );
        off.find_image(&image).await.unwrap();
        assert_eq!(server.requests().len(), n);
    });
    if cab {
        assert!(
            server
                .requests()
                .iter()
                .any(|r| r.ends_with("leakydrv.sy_")),
            "{:?}",
            server.requests()
        );
    }
    assert!(events
        .0
        .lock()
        .unwrap()
        .iter()
        .any(|e| matches!(e, ProgressEvent::DownloadFinished { .. })));
    // No partial files left behind.
    let leftovers: Vec<_> = walk(cache.path())
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
