//! The target-side commands that enable special pool for a tag and serial kernel debugging,
//! as readable text (`--setup`) or as a Windows batch script (`--out FILE.cmd`).

use std::fmt::Write as _;

use super::tag::{parse_arg, PoolTag};

/// The registry key that holds the `PoolTag` value.
pub const MEMORY_MANAGEMENT_KEY: &str =
    r"HKLM\SYSTEM\CurrentControlSet\Control\Session Manager\Memory Management";

/// The baud rates Windows KD supports on a serial port.
pub const SUPPORTED_BAUD_RATES: [u32; 5] = [9600, 19200, 38400, 57600, 115200];

/// Parses and checks a `--baud` value (a clap value parser).
pub fn parse_baud(value: &str) -> Result<u32, String> {
    let rates = SUPPORTED_BAUD_RATES.map(|r| r.to_string()).join(", ");
    match value.parse::<u32>() {
        Ok(baud) if SUPPORTED_BAUD_RATES.contains(&baud) => Ok(baud),
        _ => Err(format!("Windows KD supports these baud rates: {rates}")),
    }
}

/// One target set-up: special pool for `tag`, the kernel debugger on COM`port` at `baud`.
#[derive(Clone, Copy, Debug)]
pub struct Setup {
    /// The tag (or allocation size) for special pool.
    pub tag: PoolTag,
    /// The target's COM port number (1 = COM1).
    pub port: u8,
    /// The serial speed, one of [`SUPPORTED_BAUD_RATES`].
    pub baud: u32,
}

impl Setup {
    /// `reg add ... /v PoolTag ...`: sets the value; runs on the target.
    pub fn reg_add(&self) -> String {
        format!(
            "reg add \"{MEMORY_MANAGEMENT_KEY}\" /v PoolTag /t REG_DWORD /d 0x{:08x} /f",
            self.tag.value()
        )
    }

    /// `reg delete ... /v PoolTag`: removes the value again.
    pub fn reg_delete(&self) -> String {
        format!("reg delete \"{MEMORY_MANAGEMENT_KEY}\" /v PoolTag /f")
    }

    /// The bcdedit command that selects the serial port and speed.
    pub fn dbgsettings(&self) -> String {
        format!(
            "bcdedit /dbgsettings serial debugport:{} baudrate:{}",
            self.port, self.baud
        )
    }

    /// The boot.ini switches of Windows XP and Server 2003.
    pub fn boot_ini_switches(&self) -> String {
        format!("/debug /debugport=com{} /baudrate={}", self.port, self.baud)
    }

    /// The host-side endpoint for a cable on the host's port with the same number.
    pub fn host_endpoint(&self) -> String {
        format!("com:port=COM{},baud={}", self.port, self.baud)
    }

    /// The `kdpilot capture` command line for the host.
    pub fn capture_command(&self) -> String {
        format!(
            "kdpilot capture --target {} --tag {}",
            self.host_endpoint(),
            tag_for_command_line(self.tag)
        )
    }

    /// What special pool will catch, e.g. `pool tag "Ddk " (PoolTag 0x206b6444)`.
    pub fn what(&self) -> String {
        let value = self.tag.value();
        if self.tag.is_size() {
            format!("allocations of {value} bytes (PoolTag 0x{value:08x})")
        } else {
            format!("pool tag {} (PoolTag 0x{value:08x})", self.tag)
        }
    }

    fn summary(&self) -> String {
        format!(
            "Special pool for {}, kernel debugger on COM{} at {} baud.",
            self.what(),
            self.port,
            self.baud
        )
    }

    /// The set-up as text to read and copy from (`--setup`), LF line endings.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        let mut line = |s: &str| {
            out.push_str(s);
            out.push('\n');
        };
        line(&self.summary());
        line("");
        line("On the target, in an elevated command prompt (Windows Vista and later):");
        line(&format!("    {}", self.reg_add()));
        line("    bcdedit /debug on");
        line(&format!("    {}", self.dbgsettings()));
        line("Windows XP and Server 2003 have no bcdedit: run the reg command, then add these");
        line("switches to the Windows line in C:\\boot.ini instead:");
        line(&format!("    {}", self.boot_ini_switches()));
        line("Reboot the target: PoolTag and the debugger settings take effect at boot.");
        line("If bcdedit refuses to change the settings, suspend BitLocker and turn off Secure Boot.");
        line("");
        line(&format!(
            "On the host, with the null-modem cable on COM{} (for a VM, see docs/target-setup.md):",
            self.port
        ));
        line(&format!("    {}", self.capture_command()));
        line("");
        line("To undo, on the target (then reboot):");
        line(&format!("    {}", self.reg_delete()));
        line("    bcdedit /debug off");
        line(&format!(
            "    on XP / Server 2003: remove {} from C:\\boot.ini",
            self.boot_ini_switches()
        ));
        out
    }

    /// The set-up as a Windows batch script to run on the target (`--out`), CRLF line endings.
    pub fn render_batch(&self) -> String {
        let rem = |s: &str| format!("REM {s}").trim_end().to_owned();
        let lines = [
            "@echo off".to_owned(),
            rem("Written by kdpilot pooltag --setup."),
            rem(&self.summary()),
            rem("Run it on the target from an elevated (Administrator) command prompt,"),
            rem("then reboot: PoolTag and the debugger settings take effect at boot."),
            rem(""),
            rem("Windows XP and Server 2003 have no bcdedit: run the reg command, then add"),
            rem("these switches to the Windows line in C:\\boot.ini instead:"),
            rem(&format!("    {}", self.boot_ini_switches())),
            rem(""),
            rem(&format!(
                "After the reboot, on the host (null-modem cable on COM{}):",
                self.port
            )),
            rem(&format!("    {}", self.capture_command())),
            rem(""),
            rem("To undo (then reboot):"),
            rem(&format!("    {}", self.reg_delete())),
            rem("    bcdedit /debug off"),
            rem(&format!(
                "    on XP / Server 2003: remove {} from C:\\boot.ini",
                self.boot_ini_switches()
            )),
            String::new(),
            self.reg_add(),
            "if errorlevel 1 goto failed".to_owned(),
            "bcdedit /debug on".to_owned(),
            "if errorlevel 1 goto failed".to_owned(),
            self.dbgsettings(),
            "if errorlevel 1 goto failed".to_owned(),
            "echo Done. Reboot the target: PoolTag and the debugger settings take effect at boot."
                .to_owned(),
            "exit /b 0".to_owned(),
            String::new(),
            ":failed".to_owned(),
            "echo Failed, see the message above. Run this script as Administrator; if bcdedit refuses, suspend BitLocker and turn off Secure Boot. 1>&2"
                .to_owned(),
            "exit /b 1".to_owned(),
        ];
        let mut out = String::new();
        for l in lines {
            // cmd expands %...% even in REM lines; a tag may contain '%'.
            let _ = write!(out, "{}\r\n", l.replace('%', "%%"));
        }
        out
    }
}

/// The tag as a `--tag` argument that reads the same in cmd and in a POSIX shell: the text if it
/// needs no quoting, the text in double quotes if that is safe in both, else the 0x value.
fn tag_for_command_line(tag: PoolTag) -> String {
    let hex = format!("0x{:08x}", tag.value());
    let Some(text) = tag.typed_text() else {
        return hex;
    };
    // The text must parse back to the same tag (not as a 0x/0n value) and must not look like a flag.
    let reparses = parse_arg(&text, false).is_ok_and(|arg| arg.tag == tag);
    if text.is_empty() || text.starts_with('-') || !reparses {
        return hex;
    }
    let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
    // Inside double quotes these still mean something to cmd or sh.
    let special_in_quotes = |c: char| matches!(c, '"' | '%' | '$' | '`' | '\\' | '!');
    if text.chars().all(plain) {
        text
    } else if !text.chars().any(special_in_quotes) {
        format!("\"{text}\"")
    } else {
        hex
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(tag: &str) -> Setup {
        Setup {
            tag: parse_arg(tag, false).unwrap().tag,
            port: 1,
            baud: 19200,
        }
    }

    #[test]
    fn commands_for_ddk() {
        let s = setup("Ddk");
        assert_eq!(
            s.reg_add(),
            r#"reg add "HKLM\SYSTEM\CurrentControlSet\Control\Session Manager\Memory Management" /v PoolTag /t REG_DWORD /d 0x206b6444 /f"#
        );
        assert_eq!(
            s.dbgsettings(),
            "bcdedit /dbgsettings serial debugport:1 baudrate:19200"
        );
        assert_eq!(
            s.boot_ini_switches(),
            "/debug /debugport=com1 /baudrate=19200"
        );
        assert_eq!(
            s.capture_command(),
            "kdpilot capture --target com:port=COM1,baud=19200 --tag Ddk"
        );
    }

    #[test]
    fn port_and_baud_reach_every_command() {
        let s = Setup {
            port: 2,
            baud: 115200,
            ..setup("Ddk")
        };
        assert_eq!(
            s.dbgsettings(),
            "bcdedit /dbgsettings serial debugport:2 baudrate:115200"
        );
        assert_eq!(
            s.boot_ini_switches(),
            "/debug /debugport=com2 /baudrate=115200"
        );
        assert_eq!(s.host_endpoint(), "com:port=COM2,baud=115200");
    }

    #[test]
    fn baud_rates() {
        for rate in SUPPORTED_BAUD_RATES {
            assert_eq!(parse_baud(&rate.to_string()), Ok(rate));
        }
        for bad in ["0", "9601", "230400", "fast", ""] {
            let err = parse_baud(bad).unwrap_err();
            assert!(err.contains("9600, 19200, 38400, 57600, 115200"), "{err}");
        }
    }

    #[test]
    fn tags_on_the_command_line() {
        let arg = |t: &str| tag_for_command_line(parse_arg(t, false).unwrap().tag);
        assert_eq!(arg("Ddk"), "Ddk");
        assert_eq!(arg("0x206b6444"), "Ddk");
        assert_eq!(arg("Fr?d"), "\"Fr?d\"");
        assert_eq!(arg("Fat*"), "\"Fat*\"");
        assert_eq!(arg("D k"), "\"D k\"");
        assert_eq!(arg("a%b"), "0x20622561");
        assert_eq!(arg("-ab"), "0x2062612d");
        assert_eq!(arg("0x100"), "0x00000100");
        assert_eq!(arg("0xff000041"), "0xff000041");
        assert_eq!(arg("0x20202020"), "0x20202020");
        // Text that would read back as a number keeps its value.
        assert_eq!(
            tag_for_command_line(PoolTag::from_text("0x12").unwrap()),
            "0x32317830"
        );
    }

    #[test]
    fn sizes_are_described_as_sizes() {
        assert_eq!(
            setup("0x100").what(),
            "allocations of 256 bytes (PoolTag 0x00000100)"
        );
        assert_eq!(
            setup("Ddk").what(),
            "pool tag \"Ddk \" (PoolTag 0x206b6444)"
        );
    }

    #[test]
    fn batch_script_uses_crlf_and_escapes_percent() {
        let script = setup("a%b").render_batch();
        assert!(script.starts_with("@echo off\r\n"));
        assert!(script.ends_with("exit /b 1\r\n"));
        assert_eq!(script.matches('\n').count(), script.matches("\r\n").count());
        assert!(script.contains("\"a%%b \""), "{script}");
        assert!(!script.contains("REM \r\n"), "no trailing spaces");
    }
}
