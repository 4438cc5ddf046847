//! `cargo xtask fixtures [--check] [-v]`: build the fake Windows kernel images of `fixtures/`
//! from C and assembly with clang and lld-link, each with its PDB.
//!
//! Everything is built in a fresh temporary directory from a copy of `fixtures/src/`, with
//! relative paths only, so the bytes depend on the toolchain and the sources, not on where the
//! tree lives. Then either:
//! - (default) `fixtures/out/` is replaced by the new outputs plus `MANIFEST.txt` (sizes,
//!   SHA-256, the symbol-store keys of every image, the toolchain that built them), or
//! - `--check`: the new outputs are compared byte for byte with the committed ones; every file
//!   that differs, is missing or is extra is named, and the command fails.
//!
//! Without clang or lld-link the command says so and succeeds. `--check` also skips when the
//! toolchain differs from the one `MANIFEST.txt` names: other versions give other bytes (which is
//! why the binaries are committed). `KDPILOT_CLANG` and `KDPILOT_LLD_LINK` choose the tools;
//! otherwise `clang-14`/`lld-link-14` are preferred over `clang`/`lld-link`. `-v` prints every
//! command. `fixtures/README.md` describes the images.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Instant;

use anyhow::{bail, Context, Result};

/// One line for `cargo xtask help`.
pub const ABOUT: &str =
    "build the fake kernel/HAL/driver fixtures (clang + lld-link) into fixtures/out, or --check them";

/// Where lld-link pretends the build ran (`/pdbsourcepath`): it prefixes the object and source
/// paths in the PDBs, which would otherwise be this machine's absolute temporary paths.
const PDB_SOURCE_PATH: &str = r"C:\kdpilot\fixtures";

/// The manifest's name inside `fixtures/out/`.
const MANIFEST: &str = "MANIFEST.txt";

/// clang flags for every C file. `-fasynchronous-unwind-tables` because `-ffreestanding` turns
/// unwind tables off for windows-msvc; `-fno-optimize-sibling-calls` keeps every frame of the
/// call chains the tests expect; `-ffile-compilation-dir=.` keeps the build directory out of the
/// objects.
const CFLAGS: &[&str] = &[
    "-O2",
    "-g",
    "-gcodeview",
    "-ffreestanding",
    "-fasynchronous-unwind-tables",
    "-fno-stack-protector",
    "-mno-stack-arg-probe",
    "-fno-optimize-sibling-calls",
    "-ffile-compilation-dir=.",
    "-Wall",
    "-Wextra",
    "-Isrc/include",
];

/// lld-link flags for every image. `/Brepro` makes the TimeDateStamp and the PDB GUID hashes of
/// the content, so rebuilds are byte-identical.
const LINKFLAGS: &[&str] = &[
    "/nologo",
    "/nodefaultlib",
    "/driver",
    "/subsystem:native",
    "/Brepro",
    "/debug",
];

/// A target architecture and what differs between them.
struct Arch {
    /// Directory name under `out/` and `obj/`.
    name: &'static str,
    /// clang `--target`.
    triple: &'static str,
    /// lld-link `/machine`.
    machine: &'static str,
    /// Assembly sources live in `src/*/<asm_dir>/`.
    asm_dir: &'static str,
    /// The kernel's PDB name, as on real kernels.
    kernel_pdb: &'static str,
    kernel_base: &'static str,
    hal_base: &'static str,
    driver_base: &'static str,
    /// Entry-point symbols as lld-link wants them (x86 names carry the stdcall decoration).
    kernel_entry: &'static str,
    driver_entry: &'static str,
    /// Extra clang flags for the kernel, for leakydrv.c and for leakyfpo.c.
    kernel_cflags: &'static [&'static str],
    frame_cflags: &'static [&'static str],
    fpo_cflags: &'static [&'static str],
    /// Extra lld-link flags.
    linkflags: &'static [&'static str],
    /// Where the kernel's and the HAL's export lists with decorated names live, if the
    /// architecture decorates stdcall names (x86). The kernel's import library then comes from a
    /// second link with the undecorated list, which resolves the names through aliases (and so
    /// doubles the exported publics of that link's PDB, which is thrown away).
    decorated_defs: Option<&'static str>,
}

const ARCHES: &[Arch] = &[
    Arch {
        name: "x64",
        triple: "x86_64-pc-windows-msvc",
        machine: "x64",
        asm_dir: "amd64",
        kernel_pdb: "ntkrnlmp.pdb",
        kernel_base: "0x140000000",
        hal_base: "0x1C0000000",
        driver_base: "0x1C0000000",
        kernel_entry: "KiSystemStartup",
        driver_entry: "DriverEntry",
        kernel_cflags: &[],
        frame_cflags: &[],
        fpo_cflags: &[],
        linkflags: &[],
        decorated_defs: None,
    },
    Arch {
        name: "x86",
        triple: "i686-pc-windows-msvc",
        machine: "x86",
        asm_dir: "i386",
        kernel_pdb: "ntkrpamp.pdb",
        kernel_base: "0x400000",
        hal_base: "0x10000",
        driver_base: "0x10000",
        kernel_entry: "KiSystemStartup@4",
        driver_entry: "DriverEntry@8",
        // The x86 kernel keeps EBP frames, as Windows has since XP SP2.
        kernel_cflags: &["-fno-omit-frame-pointer"],
        frame_cflags: &["-fno-omit-frame-pointer"],
        fpo_cflags: &["-fomit-frame-pointer"],
        linkflags: &["/safeseh:no"],
        decorated_defs: Some("i386"),
    },
];

/// A kernel flavour: the allocator shape and the build number it claims.
struct Flavour {
    name: &'static str,
    build: u32,
}

const FLAVOURS: &[Flavour] = &[
    // Windows 7 SP1: ExAllocatePoolWithTag -> MmAllocateSpecialPool.
    Flavour {
        name: "classic",
        build: 7601,
    },
    // Windows 11 22H2: everything -> ExAllocateHeapPool.
    Flavour {
        name: "modern",
        build: 22621,
    },
];

/// Entry point for `cargo xtask fixtures [--check] [-v]`.
pub fn run(args: &[String]) -> Result<()> {
    let mut check = false;
    let mut verbose = false;
    for arg in args {
        match arg.as_str() {
            "--check" => check = true,
            "-v" | "--verbose" => verbose = true,
            other => bail!("unknown argument `{other}` (accepted: --check, -v)"),
        }
    }
    let fixtures = crate::workspace_root().join("fixtures");
    let started = Instant::now();
    if check {
        return match check_fixtures(&fixtures, verbose)? {
            Checked::Skipped(why) => {
                say(&format!("skipped: {why}"));
                Ok(())
            }
            Checked::Same(count) => {
                say(&format!(
                    "fixtures/out matches a fresh build ({count} files, {:.1} s)",
                    started.elapsed().as_secs_f64()
                ));
                Ok(())
            }
            Checked::Differ(problems) => {
                for p in &problems {
                    eprintln!("[fixtures] {p}");
                }
                bail!(
                    "{} file(s) of fixtures/out differ from a fresh build: run `cargo xtask fixtures` \
                     and commit fixtures/out if the change is intended",
                    problems.len()
                )
            }
        };
    }
    let Some(tools) = Toolchain::find() else {
        say("skipped: clang and lld-link are needed (apt install clang lld)");
        return Ok(());
    };
    if let Ok(manifest) = std::fs::read_to_string(fixtures.join("out").join(MANIFEST)) {
        let before = (
            manifest_field(&manifest, "clang").unwrap_or("?"),
            manifest_field(&manifest, "lld-link").unwrap_or("?"),
        );
        if before != (tools.clang_version.as_str(), tools.lld_version.as_str()) {
            say(&format!(
                "note: the committed fixtures were built with {} / {}; expect every byte to change",
                before.0, before.1
            ));
        }
    }
    let work = WorkDir::new()?;
    let built = build(&tools, &fixtures.join("src"), &work.0, verbose)?;
    install(&built, &fixtures.join("out"))?;
    say(&format!(
        "wrote {} files to fixtures/out in {:.1} s with {} / {}",
        built.files.len(),
        started.elapsed().as_secs_f64(),
        tools.clang_version,
        tools.lld_version
    ));
    Ok(())
}

fn say(message: &str) {
    println!("[fixtures] {message}");
}

/// The outcome of `--check`.
#[derive(Debug)]
pub enum Checked {
    /// Nothing compared, and why (no toolchain, or not the one that built the fixtures).
    Skipped(String),
    /// Every file matched; how many.
    Same(usize),
    /// One line per file that differs, is missing, or is extra.
    Differ(Vec<String>),
}

/// Rebuilds the fixtures in a temporary directory and compares them with `fixtures/out`.
pub fn check_fixtures(fixtures: &Path, verbose: bool) -> Result<Checked> {
    let Some(tools) = Toolchain::find() else {
        return Ok(Checked::Skipped(
            "clang and lld-link are needed (apt install clang lld)".into(),
        ));
    };
    let committed = fixtures.join("out");
    if let Ok(manifest) = std::fs::read_to_string(committed.join(MANIFEST)) {
        let wanted = (
            manifest_field(&manifest, "clang"),
            manifest_field(&manifest, "lld-link"),
        );
        if wanted.0 != Some(tools.clang_version.as_str())
            || wanted.1 != Some(tools.lld_version.as_str())
        {
            return Ok(Checked::Skipped(format!(
                "fixtures/out was built with {} / {}, this machine has {} / {}: \
                 other versions give other bytes",
                wanted.0.unwrap_or("?"),
                wanted.1.unwrap_or("?"),
                tools.clang_version,
                tools.lld_version
            )));
        }
    }
    let work = WorkDir::new()?;
    let built = build(&tools, &fixtures.join("src"), &work.0, verbose)?;
    let mut problems = Vec::new();
    for (rel, bytes) in &built.files {
        match std::fs::read(committed.join(rel)) {
            Ok(old) if old == *bytes => {}
            Ok(old) => problems.push(format!(
                "differs: fixtures/out/{rel} ({} bytes committed, {} bytes built)",
                old.len(),
                bytes.len()
            )),
            Err(_) => problems.push(format!("missing: fixtures/out/{rel} is not committed")),
        }
    }
    for rel in list_files(&committed)? {
        if !built.files.contains_key(&rel) {
            problems.push(format!(
                "extra: fixtures/out/{rel} is not produced by the build"
            ));
        }
    }
    Ok(if problems.is_empty() {
        Checked::Same(built.files.len())
    } else {
        Checked::Differ(problems)
    })
}

/// The value of a `# name: value` header line of the manifest.
fn manifest_field<'m>(manifest: &'m str, name: &str) -> Option<&'m str> {
    manifest.lines().find_map(|line| {
        let rest = line.strip_prefix("# ")?.strip_prefix(name)?;
        Some(rest.strip_prefix(':')?.trim())
    })
}

/// The compiler and linker, and the first line of their `--version`.
struct Toolchain {
    clang: String,
    lld_link: String,
    clang_version: String,
    lld_version: String,
}

impl Toolchain {
    fn find() -> Option<Self> {
        let (clang, clang_version) = find_tool("KDPILOT_CLANG", &["clang-14", "clang"])?;
        let (lld_link, lld_version) = find_tool("KDPILOT_LLD_LINK", &["lld-link-14", "lld-link"])?;
        Some(Self {
            clang,
            lld_link,
            clang_version,
            lld_version,
        })
    }
}

/// The first candidate (or the environment's choice) that answers `--version`.
fn find_tool(var: &str, candidates: &[&str]) -> Option<(String, String)> {
    let chosen: Vec<String> = match std::env::var(var) {
        Ok(v) if !v.is_empty() => vec![v],
        _ => candidates.iter().map(|c| (*c).to_string()).collect(),
    };
    chosen.into_iter().find_map(|program| {
        let out = Command::new(&program).arg("--version").output().ok()?;
        if !out.status.success() {
            return None;
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let first = text.lines().next()?.trim().to_string();
        Some((program, first))
    })
}

/// A temporary directory removed on drop.
struct WorkDir(PathBuf);

impl WorkDir {
    fn new() -> Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!(
            "kdpilot-fixtures-{}-{nanos:08x}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One tool invocation, run in the work directory with relative paths.
struct Step {
    linker: bool,
    args: Vec<String>,
}

impl Step {
    fn compile(arch: &Arch, flags: &[&str], source: &str, object: &str) -> Self {
        let mut args = vec![format!("--target={}", arch.triple)];
        args.extend(flags.iter().map(|f| (*f).to_string()));
        args.extend(["-c".into(), source.into(), "-o".into(), object.into()]);
        Self {
            linker: false,
            args,
        }
    }

    fn link(arch: &Arch, flags: &[String], inputs: &[String]) -> Self {
        let mut args: Vec<String> = LINKFLAGS.iter().map(|f| (*f).to_string()).collect();
        args.push(format!("/machine:{}", arch.machine));
        args.extend(arch.linkflags.iter().map(|f| (*f).to_string()));
        args.push(format!("/pdbsourcepath:{PDB_SOURCE_PATH}"));
        args.extend(flags.iter().cloned());
        args.extend(inputs.iter().cloned());
        Self { linker: true, args }
    }

    fn display(&self, tools: &Toolchain) -> String {
        let program = if self.linker {
            &tools.lld_link
        } else {
            &tools.clang
        };
        format!("{program} {}", self.args.join(" "))
    }
}

/// The build in phases: the steps of one phase are independent and run in parallel.
struct Plan {
    phases: Vec<Vec<Step>>,
    /// (file in the work directory, path under `out/`)
    outputs: Vec<(String, String)>,
}

/// Every command, for every architecture and flavour.
fn plan() -> Plan {
    let mut compile = Vec::new();
    let mut link_kernels = Vec::new();
    let mut link_drivers = Vec::new();
    let mut outputs = Vec::new();
    for arch in ARCHES {
        let a = arch.name;
        for flavour in FLAVOURS {
            let f = flavour.name;
            let build = format!("-DNT_BUILD={}", flavour.build);
            let kflags = cflags(&[arch.kernel_cflags, &[build.as_str()]]);
            let mut objects = Vec::new();
            for unit in ["init", "pool_common", &format!("pool_{f}")] {
                let object = format!("obj/{a}/{f}/{unit}.obj");
                compile.push(Step::compile(
                    arch,
                    &kflags,
                    &format!("src/ntoskrnl/{unit}.c"),
                    &object,
                ));
                objects.push(object);
            }
            let trap = format!("obj/{a}/{f}/trap.obj");
            compile.push(Step::compile(
                arch,
                &[],
                &format!("src/ntoskrnl/{}/trap.S", arch.asm_dir),
                &trap,
            ));
            objects.push(trap);
            let kernel_link = |def: String, dir: &str, implib: &str| {
                Step::link(
                    arch,
                    &[
                        format!("/entry:{}", arch.kernel_entry),
                        format!("/base:{}", arch.kernel_base),
                        "/opt:noref,noicf".into(),
                        format!("/def:{def}"),
                        format!("/pdb:{dir}/{}", arch.kernel_pdb),
                        format!("/pdbaltpath:{}", arch.kernel_pdb),
                        format!("/implib:{implib}"),
                        format!("/out:{dir}/ntoskrnl.exe"),
                    ],
                    &objects,
                )
            };
            let dir = format!("out/{a}/{f}");
            let plain_def = format!("src/ntoskrnl/ntoskrnl-{f}.def");
            let implib = format!("obj/{a}/{f}/ntoskrnl.lib");
            match arch.decorated_defs {
                None => link_kernels.push(kernel_link(plain_def, &dir, &implib)),
                Some(defs) => {
                    link_kernels.push(kernel_link(
                        format!("src/ntoskrnl/{defs}/ntoskrnl-{f}.def"),
                        &dir,
                        &format!("obj/{a}/{f}/unused.lib"),
                    ));
                    link_kernels.push(kernel_link(
                        plain_def,
                        &format!("obj/{a}/{f}/implib"),
                        &implib,
                    ));
                }
            }
            for file in ["ntoskrnl.exe", arch.kernel_pdb] {
                outputs.push((format!("{dir}/{file}"), format!("{a}/{f}/{file}")));
            }
        }

        // The HAL and the driver do not depend on the flavour: one build per architecture,
        // copied into both flavour directories.
        let hal_obj = format!("obj/{a}/hal/hal.obj");
        compile.push(Step::compile(arch, CFLAGS, "src/hal/hal.c", &hal_obj));
        link_kernels.push(Step::link(
            arch,
            &[
                "/dll".into(),
                "/noentry".into(),
                format!("/base:{}", arch.hal_base),
                "/opt:noref,noicf".into(),
                match arch.decorated_defs {
                    None => "/def:src/hal/hal.def".into(),
                    Some(defs) => format!("/def:src/hal/{defs}/hal.def"),
                },
                format!("/pdb:obj/{a}/hal/hal.pdb"),
                "/pdbaltpath:hal.pdb".into(),
                format!("/implib:obj/{a}/hal/hal.lib"),
                format!("/out:obj/{a}/hal/hal.dll"),
            ],
            &[hal_obj],
        ));

        let d = format!("obj/{a}/leakydrv");
        let units: [(&str, Vec<&str>); 4] = [
            ("leakydrv.c", cflags(&[arch.frame_cflags])),
            ("leakyfpo.c", cflags(&[arch.fpo_cflags])),
            (&format!("{}/msvcstyle.S", arch.asm_dir), Vec::new()),
            ("leakydeep.c", cflags(&[arch.frame_cflags])),
        ];
        let mut objects = Vec::new();
        for (source, flags) in &units {
            let stem = source.rsplit('/').next().unwrap_or(source);
            let object = format!("{d}/{}.obj", stem.split('.').next().unwrap_or(stem));
            compile.push(Step::compile(
                arch,
                flags,
                &format!("src/leakydrv/{source}"),
                &object,
            ));
            objects.push(object);
        }
        // Imports come from the import library the classic kernel's link wrote (its exports
        // are a subset of the modern kernel's, so the driver loads on both).
        objects.push(format!("obj/{a}/classic/ntoskrnl.lib"));
        link_drivers.push(Step::link(
            arch,
            &[
                format!("/entry:{}", arch.driver_entry),
                format!("/base:{}", arch.driver_base),
                "/opt:ref,noicf".into(),
                format!("/pdb:{d}/leakydrv.pdb"),
                "/pdbaltpath:leakydrv.pdb".into(),
                format!("/out:{d}/leakydrv.sys"),
            ],
            &objects,
        ));
        for flavour in FLAVOURS {
            let f = flavour.name;
            for (dir, file) in [
                ("hal", "hal.dll"),
                ("hal", "hal.pdb"),
                ("leakydrv", "leakydrv.sys"),
                ("leakydrv", "leakydrv.pdb"),
            ] {
                outputs.push((format!("obj/{a}/{dir}/{file}"), format!("{a}/{f}/{file}")));
            }
        }
    }
    Plan {
        phases: vec![compile, link_kernels, link_drivers],
        outputs,
    }
}

/// [`CFLAGS`] followed by `extra`.
fn cflags<'a>(extra: &[&[&'a str]]) -> Vec<&'a str> {
    let mut flags = CFLAGS.to_vec();
    for more in extra {
        flags.extend_from_slice(more);
    }
    flags
}

/// What a build produced: every file of `out/` (manifest included) by relative path.
struct Built {
    files: BTreeMap<String, Vec<u8>>,
}

/// Copies `src` into `work`, runs the plan there, and reads the outputs back.
fn build(tools: &Toolchain, src: &Path, work: &Path, verbose: bool) -> Result<Built> {
    copy_tree(src, &work.join("src"))?;
    let plan = plan();
    for phase in &plan.phases {
        let mut running: Vec<(&Step, Child)> = Vec::new();
        for step in phase {
            for dir in step.args.iter().filter_map(|arg| output_dir_of(arg)) {
                std::fs::create_dir_all(work.join(dir))?;
            }
            if verbose {
                println!("{}", step.display(tools));
            }
            let program = if step.linker {
                &tools.lld_link
            } else {
                &tools.clang
            };
            let child = Command::new(program)
                .args(&step.args)
                .current_dir(work)
                .spawn()
                .with_context(|| format!("starting {program}"))?;
            running.push((step, child));
        }
        let mut failed = Vec::new();
        for (step, mut child) in running {
            if !child.wait()?.success() {
                failed.push(step.display(tools));
            }
        }
        if let Some(first) = failed.first() {
            bail!("{} command(s) failed, the first: {first}", failed.len());
        }
    }
    let mut files = BTreeMap::new();
    for (from, to) in &plan.outputs {
        let bytes = std::fs::read(work.join(from)).with_context(|| format!("reading {from}"))?;
        files.insert(to.clone(), bytes);
    }
    let manifest = manifest(tools, &files)?;
    files.insert(MANIFEST.to_string(), manifest.into_bytes());
    Ok(Built { files })
}

/// The directory a build argument writes into, for arguments that name an output
/// (`obj/...` object files, `/out:`, `/pdb:`, `/implib:`).
fn output_dir_of(arg: &str) -> Option<&str> {
    let path = ["/out:", "/pdb:", "/implib:"]
        .iter()
        .find_map(|p| arg.strip_prefix(p))
        .or_else(|| arg.starts_with("obj/").then_some(arg))?;
    path.rsplit_once('/').map(|(dir, _)| dir)
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// Every file under `dir`, as `/`-separated paths relative to it (empty if `dir` is absent).
fn list_files(dir: &Path) -> Result<Vec<String>> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                walk(base, &entry.path(), out)?;
            } else {
                let rel = entry.path();
                let rel = rel.strip_prefix(base).unwrap_or(&rel);
                let parts: Vec<_> = rel.iter().map(|p| p.to_string_lossy()).collect();
                out.push(parts.join("/"));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    if dir.is_dir() {
        walk(dir, dir, &mut out)?;
    }
    out.sort();
    Ok(out)
}

/// Replaces the contents of `out` with the built files.
fn install(built: &Built, out: &Path) -> Result<()> {
    if out.exists() {
        std::fs::remove_dir_all(out).with_context(|| format!("removing {}", out.display()))?;
    }
    for (rel, bytes) in &built.files {
        let path = out.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// `MANIFEST.txt`: the toolchain, then size and SHA-256 of every file, then the symbol-store
/// keys of every image.
fn manifest(tools: &Toolchain, files: &BTreeMap<String, Vec<u8>>) -> Result<String> {
    let mut m = String::new();
    m.push_str(
        "# Fake Windows kernel images and PDBs for kdpilot's tests (see fixtures/README.md).\n\
         # Regenerate: cargo xtask fixtures. Verify: cargo xtask fixtures --check.\n",
    );
    let _ = writeln!(m, "# clang: {}", tools.clang_version);
    let _ = writeln!(m, "# lld-link: {}", tools.lld_version);
    m.push_str("#\n# sha256 size path\n");
    for (rel, bytes) in files {
        let _ = writeln!(m, "{} {:>6} {rel}", hex(&sha256(bytes)), bytes.len());
    }
    m.push_str("#\n# symbol-store keys: image path, image key, PDB key\n");
    for (rel, bytes) in files {
        if !(rel.ends_with(".exe") || rel.ends_with(".dll") || rel.ends_with(".sys")) {
            continue;
        }
        let keys = ImageKeys::parse(bytes).with_context(|| format!("reading the PE of {rel}"))?;
        let image = rel.rsplit('/').next().unwrap_or(rel);
        let _ = writeln!(
            m,
            "# {rel} {image}/{} {}/{}/{}",
            keys.image_key(),
            keys.pdb_name,
            keys.pdb_key(),
            keys.pdb_name
        );
    }
    Ok(m)
}

/// What a symbol store files an image and its PDB under.
#[derive(Debug, PartialEq, Eq)]
pub struct ImageKeys {
    /// COFF header TimeDateStamp (a content hash with `/Brepro`).
    pub time_date_stamp: u32,
    /// Optional header SizeOfImage.
    pub size_of_image: u32,
    /// CodeView (RSDS) GUID, as stored.
    pub guid: [u8; 16],
    /// CodeView age.
    pub age: u32,
    /// CodeView PDB file name.
    pub pdb_name: String,
}

impl ImageKeys {
    /// Reads the keys from a PE image file.
    pub fn parse(pe: &[u8]) -> Result<Self> {
        let u16_at = |o: usize| -> Result<u16> {
            let b = pe.get(o..o + 2).context("truncated")?;
            Ok(u16::from_le_bytes([b[0], b[1]]))
        };
        let u32_at = |o: usize| -> Result<u32> {
            let b = pe.get(o..o + 4).context("truncated")?;
            Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        let pe_off = u32_at(0x3c)? as usize;
        if pe.get(pe_off..pe_off + 4) != Some(b"PE\0\0") {
            bail!("no PE signature");
        }
        let coff = pe_off + 4;
        let sections = u16_at(coff + 2)? as usize;
        let time_date_stamp = u32_at(coff + 4)?;
        let opt = coff + 20;
        let opt_size = u16_at(coff + 16)? as usize;
        let size_of_image = u32_at(opt + 56)?;
        let dirs = match u16_at(opt)? {
            0x10b => opt + 96,
            0x20b => opt + 112,
            magic => bail!("unknown optional header magic {magic:#x}"),
        };
        let (debug_rva, debug_size) = (u32_at(dirs + 6 * 8)?, u32_at(dirs + 6 * 8 + 4)?);
        let section_table = opt + opt_size;
        let to_offset = |rva: u32| -> Result<usize> {
            for i in 0..sections {
                let s = section_table + i * 40;
                let (vsize, va, raw) = (u32_at(s + 8)?, u32_at(s + 12)?, u32_at(s + 20)?);
                if rva >= va && rva < va + vsize {
                    return Ok((rva - va + raw) as usize);
                }
            }
            bail!("RVA {rva:#x} is in no section")
        };
        let debug = to_offset(debug_rva)?;
        for entry in 0..debug_size as usize / 28 {
            let e = debug + entry * 28;
            if u32_at(e + 12)? != 2 {
                continue; // not IMAGE_DEBUG_TYPE_CODEVIEW
            }
            let (size, raw) = (u32_at(e + 16)? as usize, u32_at(e + 24)? as usize);
            let cv = pe
                .get(raw..raw + size)
                .context("CodeView record truncated")?;
            if cv.get(..4) != Some(b"RSDS") || cv.len() < 25 {
                bail!("CodeView record is not RSDS");
            }
            let mut guid = [0; 16];
            guid.copy_from_slice(&cv[4..20]);
            let age = u32::from_le_bytes([cv[20], cv[21], cv[22], cv[23]]);
            let name = &cv[24..];
            let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
            return Ok(Self {
                time_date_stamp,
                size_of_image,
                guid,
                age,
                pdb_name: String::from_utf8_lossy(name).into_owned(),
            });
        }
        bail!("no CodeView debug directory entry")
    }

    /// `%08X%x` of TimeDateStamp and SizeOfImage: the image's directory in a symbol store.
    pub fn image_key(&self) -> String {
        format!("{:08X}{:x}", self.time_date_stamp, self.size_of_image)
    }

    /// The GUID (Data1-3 little-endian, as Windows prints it) in upper-case hex, then the age
    /// in hex: the PDB's directory in a symbol store.
    pub fn pdb_key(&self) -> String {
        let g = &self.guid;
        let mut key = format!(
            "{:08X}{:04X}{:04X}",
            u32::from_le_bytes([g[0], g[1], g[2], g[3]]),
            u16::from_le_bytes([g[4], g[5]]),
            u16::from_le_bytes([g[6], g[7]])
        );
        for b in &g[8..] {
            let _ = write!(key, "{b:02X}");
        }
        let _ = write!(key, "{:x}", self.age);
        key
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// SHA-256 (FIPS 180-4), enough for a manifest without a dependency.
fn sha256(data: &[u8]) -> [u8; 32] {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];
    let mut h: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    let mut message = data.to_vec();
    message.push(0x80);
    while message.len() % 64 != 56 {
        message.push(0);
    }
    message.extend_from_slice(&((data.len() as u64) * 8).to_be_bytes());
    for block in message.chunks_exact(64) {
        let mut w = [0u32; 64];
        for (i, word) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16]
                .wrapping_add(s0)
                .wrapping_add(w[i - 7])
                .wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
        for i in 0..64 {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(K[i])
                .wrapping_add(w[i]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            hh = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0; 32];
    for (chunk, word) in out.chunks_exact_mut(4).zip(h) {
        chunk.copy_from_slice(&word.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_known_answers() {
        assert_eq!(
            hex(&sha256(b"")),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            hex(&sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        // Two blocks, and a length that pads into a third.
        assert_eq!(
            hex(&sha256(
                b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
            )),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
        );
        assert_eq!(
            hex(&sha256(&[b'a'; 1000])),
            "41edece42d63e8d9bf515a9ba6932e1c20cbc9f5a5d134645adb5db1b9737ea3"
        );
    }

    #[test]
    fn manifest_header_fields() {
        let m = "# x\n# clang: Debian clang version 14.0.6\n# lld-link: Debian LLD 14.0.6\n";
        assert_eq!(
            manifest_field(m, "clang"),
            Some("Debian clang version 14.0.6")
        );
        assert_eq!(manifest_field(m, "lld-link"), Some("Debian LLD 14.0.6"));
        assert_eq!(manifest_field(m, "gcc"), None);
    }

    #[test]
    fn committed_images_have_the_expected_pdb_names() {
        let out = crate::workspace_root().join("fixtures/out");
        for (rel, pdb) in [
            ("x64/classic/ntoskrnl.exe", "ntkrnlmp.pdb"),
            ("x64/modern/ntoskrnl.exe", "ntkrnlmp.pdb"),
            ("x86/classic/ntoskrnl.exe", "ntkrpamp.pdb"),
            ("x86/modern/ntoskrnl.exe", "ntkrpamp.pdb"),
            ("x64/modern/hal.dll", "hal.pdb"),
            ("x86/modern/leakydrv.sys", "leakydrv.pdb"),
        ] {
            let bytes = std::fs::read(out.join(rel)).expect(rel);
            let keys = ImageKeys::parse(&bytes).expect(rel);
            assert_eq!(keys.pdb_name, pdb, "{rel}");
            assert_eq!(keys.age, 1, "{rel}");
            // lld's GUIDs end in "LLD PDB." when /Brepro hashes the content.
            assert_eq!(&keys.guid[8..], b"LLD PDB.", "{rel}");
            assert!(
                out.join(rel).with_file_name(pdb).is_file(),
                "{rel}: its PDB is committed next to it"
            );
        }
    }

    #[test]
    fn committed_manifest_lists_every_file() {
        let out = crate::workspace_root().join("fixtures/out");
        let manifest = std::fs::read_to_string(out.join(MANIFEST)).expect("MANIFEST.txt");
        for rel in list_files(&out).expect("listing fixtures/out") {
            if rel == MANIFEST {
                continue;
            }
            let bytes = std::fs::read(out.join(&rel)).expect(&rel);
            let line = format!("{} {:>6} {rel}", hex(&sha256(&bytes)), bytes.len());
            assert!(manifest.contains(&line), "MANIFEST.txt lacks `{line}`");
        }
    }

    /// Rebuilds everything and compares with the committed bytes (about 2 s); a note and a pass
    /// when clang/lld-link are missing or are not the versions that built the fixtures.
    #[test]
    fn committed_fixtures_match_a_fresh_build() {
        let fixtures = crate::workspace_root().join("fixtures");
        match check_fixtures(&fixtures, false).expect("building the fixtures") {
            Checked::Skipped(why) => eprintln!("note: fixture check skipped: {why}"),
            Checked::Same(count) => assert!(count > 0),
            Checked::Differ(problems) => panic!(
                "fixtures/out differs from a fresh build (run `cargo xtask fixtures`):\n{}",
                problems.join("\n")
            ),
        }
    }
}
