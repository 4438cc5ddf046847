//! `cargo xtask fuzz [SECONDS] [TARGET...]`: build every cargo-fuzz target on stable
//! (`--sanitizer none`), seed the corpora from the real WinDbg traffic, and run each target for
//! SECONDS (default 30; 0 only builds).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// One line for `cargo xtask help`.
pub const ABOUT: &str = "build the fuzz targets, seed them from kd-vectors, run each for N seconds";

/// The packet types whose payloads seed each target (by KD_PACKET PacketType).
const SEEDS: &[(&str, u16)] = &[
    ("manipulate", 2),
    ("state_change", 7),
    ("debug_io", 3),
    ("file_io", 11),
];

/// Runs the subcommand.
pub fn run(args: &[String]) -> Result<()> {
    let root = crate::workspace_root();
    let fuzz_dir = root.join("fuzz");
    let seconds: u64 = match args.first() {
        Some(s) => s
            .parse()
            .with_context(|| format!("`{s}` is not a number of seconds"))?,
        None => 30,
    };
    if !has_cargo_fuzz() {
        bail!("cargo-fuzz is not installed: cargo install cargo-fuzz --version 0.13.2 --locked");
    }
    let targets: Vec<String> = match args.get(1..) {
        Some(t) if !t.is_empty() => t.to_vec(),
        _ => list_targets(&fuzz_dir)?,
    };
    seed_corpora(&root, &fuzz_dir)?;
    let status = Command::new("cargo")
        .args(["fuzz", "build", "--sanitizer", "none"])
        .current_dir(&fuzz_dir)
        .status()?;
    if !status.success() {
        bail!("cargo fuzz build failed");
    }
    println!("built {} fuzz targets", targets.len());
    if seconds == 0 {
        return Ok(());
    }
    for t in &targets {
        println!("fuzzing {t} for {seconds} s");
        let status = Command::new("cargo")
            .args(["fuzz", "run", t, "--sanitizer", "none", "--"])
            .arg(format!("-max_total_time={seconds}"))
            .arg("-print_final_stats=1")
            .current_dir(&fuzz_dir)
            .status()?;
        if !status.success() {
            bail!("fuzz target {t} found a crash: see fuzz/artifacts/{t}/");
        }
    }
    Ok(())
}

fn has_cargo_fuzz() -> bool {
    Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn list_targets(fuzz_dir: &Path) -> Result<Vec<String>> {
    let mut t: Vec<String> = std::fs::read_dir(fuzz_dir.join("fuzz_targets"))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let p = e.path();
            (p.extension()? == "rs").then(|| p.file_stem()?.to_str().map(str::to_owned))?
        })
        .collect();
    t.sort();
    Ok(t)
}

/// Writes every real packet payload into the corpus of the target that parses it, and the whole
/// framed stream into the decoder's.
fn seed_corpora(root: &Path, fuzz_dir: &Path) -> Result<()> {
    let json = root.join("crates/kdpilot-kd/tests/vectors/kdnet-windbg-win10.json");
    let packets: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json)?)?;
    let packets = packets.as_array().context("vectors: expected an array")?;
    let corpus = |t: &str| -> Result<PathBuf> {
        let d = fuzz_dir.join("corpus").join(t);
        std::fs::create_dir_all(&d)?;
        Ok(d)
    };
    let mut stream = Vec::new();
    for p in packets {
        let ptype = p["type"].as_u64().unwrap_or(0) as u16;
        let frame = p["frame"].as_u64().unwrap_or(0);
        let payload = hex(p["payload"].as_str().unwrap_or(""))?;
        for (target, t) in SEEDS {
            if *t == ptype {
                std::fs::write(corpus(target)?.join(format!("frame{frame}")), &payload)?;
            }
        }
        if ptype == 2 && payload.len() == 56 + 1232 {
            std::fs::write(
                corpus("context")?.join(format!("frame{frame}")),
                &payload[56..],
            )?;
        }
        let leader = u32::from_str_radix(p["leader"].as_str().unwrap_or("0"), 16)?;
        let id = u32::from_str_radix(p["id"].as_str().unwrap_or("0"), 16)?;
        stream.extend_from_slice(&leader.to_le_bytes());
        stream.extend_from_slice(&ptype.to_le_bytes());
        stream.extend_from_slice(&(payload.len() as u16).to_le_bytes());
        stream.extend_from_slice(&id.to_le_bytes());
        let sum: u32 = payload.iter().map(|&b| u32::from(b)).sum();
        stream.extend_from_slice(&sum.to_le_bytes());
        if leader == 0x3030_3030 {
            stream.extend_from_slice(&payload);
            stream.push(0xAA);
        }
        if stream.len() > 8000 {
            std::fs::write(corpus("decoder")?.join(format!("stream{frame}")), &stream)?;
            stream.clear();
        }
    }
    seed_symbols(root, &corpus)?;
    Ok(())
}

/// The fixtures' PDBs for `symbols_pdb`; CodeView records (RSDS and NB10, the fixtures' names
/// and hostile ones) and target file names for `symbols_file_names`.
fn seed_symbols(root: &Path, corpus: &dyn Fn(&str) -> Result<PathBuf>) -> Result<()> {
    let pdbs = corpus("symbols_pdb")?;
    for arch in ["x64", "x86"] {
        for flavour in ["classic", "modern"] {
            let dir = root.join("fixtures/out").join(arch).join(flavour);
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "pdb") {
                    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("pdb");
                    std::fs::copy(&p, pdbs.join(format!("{arch}-{flavour}-{name}")))?;
                }
            }
        }
    }
    let names = corpus("symbols_file_names")?;
    let rsds = |path: &str| {
        let mut v = b"RSDS".to_vec();
        v.extend((0u8..16).map(|i| i.wrapping_mul(37)));
        v.extend(1u32.to_le_bytes());
        v.extend(path.as_bytes());
        v.push(0);
        v
    };
    let mut nb10 = b"NB10".to_vec();
    nb10.extend(0u32.to_le_bytes());
    nb10.extend(0x3B6D_CB75u32.to_le_bytes());
    nb10.extend(2u32.to_le_bytes());
    nb10.extend(b"ntkrpamp.pdb\0");
    let seeds: Vec<Vec<u8>> = vec![
        rsds("ntkrnlmp.pdb"),
        rsds(r"d:\os\obj\amd64fre\minkernel\ntos\init\mp\objfre\amd64\ntkrnlmp.pdb"),
        rsds(r"..\..\..\evil.pdb"),
        rsds("NUL.pdb"),
        rsds("x.pdb:stream"),
        nb10,
        br"\SystemRoot\system32\drivers\leakydrv.sys".to_vec(),
        b"halmacpi.dll".to_vec(),
        "\u{1b}[2Jevil\u{202e}sys.pdb".as_bytes().to_vec(),
    ];
    for (i, seed) in seeds.iter().enumerate() {
        std::fs::write(names.join(format!("seed{i}")), seed)?;
    }
    Ok(())
}

fn hex(s: &str) -> Result<Vec<u8>> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).context("vectors: bad hex"))
        .collect()
}
