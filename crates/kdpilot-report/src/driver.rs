//! Which driver is responsible for a stack: the first frame, innermost first, in a named
//! module that is neither the kernel nor the HAL.

/// The names the kernel and the HAL go by in module lists: WinDbg says `nt` and `hal`, but a
/// list read without WinDbg's aliasing has the image names (`ntkrnlmp`, `halmacpi`).
const KERNEL_MODULES: [&str; 12] = [
    "nt", "ntoskrnl", "ntkrnlmp", "ntkrnlpa", "ntkrpamp", "ntkrla57", "hal", "halacpi", "halmacpi",
    "halaacpi", "halapic", "halmps",
];

/// The label of a stack that has frames, all in the kernel or the HAL.
pub const KERNEL: &str = "(kernel)";
/// The label of a stack whose frames outside the kernel are all outside every known module.
pub const UNKNOWN: &str = "(unknown module)";
/// The label of a hit without frames.
pub const NO_FRAMES: &str = "(no frames)";

/// Whether a module name (WinDbg's, or an image name with or without its extension, in any
/// case) is the kernel or the HAL.
pub fn is_kernel_module(name: &str) -> bool {
    let stem = match name.rsplit_once('.') {
        Some((stem, ext))
            if ["exe", "dll", "sys"]
                .iter()
                .any(|e| e.eq_ignore_ascii_case(ext)) =>
        {
            stem
        }
        _ => name,
    };
    KERNEL_MODULES.iter().any(|k| k.eq_ignore_ascii_case(stem))
}

/// The responsible driver of a stack given its frames' modules, innermost first: the index of
/// the first frame in a named module outside the kernel and the HAL, and that module's name.
/// Frames outside every known module are passed over (a stack scan's guess, or code of an
/// unloaded image); when no frame qualifies the label is [`KERNEL`], [`UNKNOWN`] or
/// [`NO_FRAMES`] and there is no index.
pub fn responsible<'a>(
    modules: impl IntoIterator<Item = Option<&'a str>>,
) -> (Option<usize>, &'a str) {
    let mut any = false;
    let mut unknown = false;
    for (i, module) in modules.into_iter().enumerate() {
        any = true;
        match module {
            Some(m) if !is_kernel_module(m) => return (Some(i), m),
            Some(_) => {}
            None => unknown = true,
        }
    }
    let label = match (any, unknown) {
        (false, _) => NO_FRAMES,
        (true, true) => UNKNOWN,
        (true, false) => KERNEL,
    };
    (None, label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_names() {
        for k in [
            "nt",
            "NT",
            "ntoskrnl.exe",
            "ntkrnlmp",
            "ntkrnlpa",
            "ntkrpamp",
            "hal",
            "HAL.DLL",
        ] {
            assert!(is_kernel_module(k), "{k}");
        }
        for d in [
            "leakydrv", "ntfs", "Ntfs.sys", "nt.foo", "halo", "tcpip", "",
        ] {
            assert!(!is_kernel_module(d), "{d}");
        }
    }

    #[test]
    fn first_frame_outside_nt_and_hal() {
        let frames = [
            Some("nt"),
            Some("hal"),
            None,
            Some("fltmgr"),
            Some("leakydrv"),
        ];
        assert_eq!(responsible(frames), (Some(3), "fltmgr"));
        assert_eq!(responsible([Some("nt"), Some("ntkrnlmp")]), (None, KERNEL));
        assert_eq!(responsible([Some("nt"), None]), (None, UNKNOWN));
        assert_eq!(responsible([]), (None, NO_FRAMES));
    }
}
