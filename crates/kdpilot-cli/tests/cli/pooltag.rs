//! `kdpilot pooltag`.

use crate::util::{kdpilot, run, run_in};

#[test]
fn help() {
    let r = run(&["pooltag", "--help"]);
    assert_eq!(r.code, 0);
    insta::assert_snapshot!(r.stdout);
}

#[test]
fn converts_both_ways() {
    let r = run(&["pooltag", "Ddk", "Fred", "0x64657246", "0X206B6444"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stderr, "");
    assert_eq!(
        r.stdout,
        "\
Ddk        -> 0x206b6444  (tag \"Ddk \"; dword dumps show it as \" kdD\")
Fred       -> 0x64657246  (tag \"Fred\"; dword dumps show it as \"derF\")
0x64657246 -> \"Fred\"      (PoolTag 0x64657246; dword dumps show it as \"derF\")
0X206B6444 -> \"Ddk \"      (PoolTag 0x206b6444; dword dumps show it as \" kdD\")
"
    );
}

#[test]
fn wildcards_sizes_and_unprintable_values() {
    let r = run(&["pooltag", "Fr?d", "Fat*", "0x100", "0n4095", "0xff000041"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    insta::assert_snapshot!(r.stdout);
}

#[test]
fn bare_digits_are_a_tag_unless_prefixed() {
    let r = run(&["pooltag", "1234"]);
    assert!(r.stdout.starts_with("1234 -> 0x34333231 "), "{}", r.stdout);
    let r = run(&["pooltag", "--text", "0x12"]);
    assert!(r.stdout.starts_with("0x12 -> 0x32317830 "), "{}", r.stdout);
}

#[test]
fn json_lines() {
    let r = run(&["pooltag", "--json", "Ddk", "0x100"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        r.stdout,
        "{\"input\":\"Ddk\",\"value\":543908932,\"hex\":\"0x206b6444\",\"bytes\":[68,100,107,32],\"kind\":\"tag\",\"tag\":\"Ddk \",\"wildcards\":false}\n\
         {\"input\":\"0x100\",\"value\":256,\"hex\":\"0x00000100\",\"bytes\":[0,1,0,0],\"kind\":\"size\",\"wildcards\":false}\n"
    );
}

#[test]
fn invalid_tags_are_usage_errors() {
    let cases = [
        ("", "empty pool tag"),
        ("ABCDE", "pool tag \"ABCDE\" is 5 characters long"),
        ("Dдk", "which is not ASCII"),
        ("a\tb", "control character 0x09"),
        ("0xZZ", "\"0xZZ\" is not a hexadecimal value"),
        (
            "0x100000000",
            "does not fit in the 32-bit PoolTag REG_DWORD",
        ),
        ("0n12x", "is not a decimal value"),
    ];
    for (tag, message) in cases {
        let r = run(&["pooltag", "Ddk", tag]);
        assert_eq!(r.code, 2, "{tag:?}: {}", r.stderr);
        assert_eq!(
            r.stdout, "",
            "{tag:?}: nothing is printed before validation"
        );
        assert!(
            r.stderr.starts_with("kdpilot: error: "),
            "{tag:?}: {}",
            r.stderr
        );
        assert!(r.stderr.contains(message), "{tag:?}: {}", r.stderr);
        assert!(
            r.stderr.contains("1 to 4 printable ASCII characters")
                || r.stderr.contains("digits")
                || r.stderr.contains("0xffffffff"),
            "{tag:?}: the message says what is accepted: {}",
            r.stderr
        );
    }
}

#[test]
fn clap_usage_errors() {
    for args in [
        &["pooltag"][..],
        &["pooltag", "--setup", "--baud", "12345", "Ddk"],
        &["pooltag", "--setup", "--port", "0", "Ddk"],
        &["pooltag", "--port", "2", "Ddk"],
        &["pooltag", "--force", "Ddk"],
        &["pooltag", "--json", "--setup", "Ddk"],
    ] {
        let r = run(args);
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
        assert_eq!(r.stdout, "", "{args:?}");
    }
    let r = run(&["pooltag", "--setup", "--baud", "12345", "Ddk"]);
    assert!(
        r.stderr.contains("9600, 19200, 38400, 57600, 115200"),
        "{}",
        r.stderr
    );
}

#[test]
fn setup() {
    let r = run(&["pooltag", "--setup", "Ddk"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stderr, "");
    insta::assert_snapshot!(r.stdout);
}

#[test]
fn setup_with_port_and_baud() {
    let r = run(&[
        "pooltag",
        "--setup",
        "--port",
        "2",
        "--baud",
        "115200",
        "0x206b6444",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    for expected in [
        "/d 0x206b6444 /f",
        "bcdedit /dbgsettings serial debugport:2 baudrate:115200",
        "/debug /debugport=com2 /baudrate=115200",
        "kdpilot capture --target com:port=COM2,baud=115200 --tag Ddk",
    ] {
        assert!(r.stdout.contains(expected), "{expected}: {}", r.stdout);
    }
}

#[test]
fn setup_uses_the_first_tag_and_warns_about_the_rest() {
    let r = run(&["pooltag", "--setup", "Ddk", "Fred"]);
    assert_eq!(r.code, 0);
    assert!(r.stdout.contains("/d 0x206b6444 /f"), "{}", r.stdout);
    assert!(!r.stdout.contains("0x64657246"), "{}", r.stdout);
    assert_eq!(
        r.stderr,
        "kdpilot: warning: the set-up is for the first TAG only (Ddk): PoolTag holds a single value\n"
    );
    // -q keeps warnings.
    let r = run(&["-q", "pooltag", "--setup", "Ddk", "Fred"]);
    assert!(r.stderr.contains("warning"), "{}", r.stderr);
}

#[test]
fn setup_for_a_size() {
    let r = run(&["pooltag", "--setup", "0x100"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout
            .starts_with("Special pool for allocations of 256 bytes (PoolTag 0x00000100)"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("--tag 0x00000100"), "{}", r.stdout);
}

#[test]
fn out_writes_a_batch_script_with_crlf() {
    let dir = tempfile::tempdir().unwrap();
    let r = run_in(
        dir.path(),
        &["pooltag", "--setup", "--out", "enable.cmd", "Ddk"],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        r.stdout,
        "wrote enable.cmd: run it on the target as Administrator and reboot; then, on the host:\n    \
         kdpilot capture --target com:port=COM1,baud=19200 --tag Ddk\n"
    );
    let script = std::fs::read_to_string(dir.path().join("enable.cmd")).unwrap();
    assert!(script.starts_with("@echo off\r\n"), "{script:?}");
    assert!(script.ends_with("\r\n"));
    let lf = script.matches('\n').count();
    assert!(lf > 10);
    assert_eq!(
        lf,
        script.matches("\r\n").count(),
        "every line ends in CRLF"
    );
    assert!(!script.contains("\r\r"));
    // Every non-blank line is a REM comment, a label, or a command we expect.
    for line in script.lines().map(|l| l.trim_end_matches('\r')) {
        assert!(
            line.is_empty()
                || line.starts_with("REM")
                || line.starts_with("@echo off")
                || line.starts_with("reg add ")
                || line.starts_with("bcdedit ")
                || line.starts_with("if errorlevel 1 goto failed")
                || line.starts_with("echo ")
                || line.starts_with("exit /b ")
                || line == ":failed",
            "unexpected line {line:?}"
        );
    }
    // boot.ini switches are only mentioned in comments.
    assert!(script.contains("REM     /debug /debugport=com1 /baudrate=19200\r\n"));
    insta::assert_snapshot!(script.replace("\r\n", "\n"));
}

#[test]
fn out_implies_setup() {
    let dir = tempfile::tempdir().unwrap();
    let r = run_in(dir.path(), &["pooltag", "--out", "enable.cmd", "Ddk"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(dir.path().join("enable.cmd").exists());
}

#[test]
fn out_refuses_to_overwrite_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("enable.cmd");
    std::fs::write(&path, "keep me").unwrap();

    let r = run_in(dir.path(), &["pooltag", "--out", "enable.cmd", "Ddk"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(r.stdout, "");
    assert_eq!(
        r.stderr,
        "kdpilot: error: refusing to overwrite enable.cmd: the file exists (pass --force to replace it)\n"
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "keep me");

    let r = run_in(
        dir.path(),
        &["pooltag", "--out", "enable.cmd", "--force", "Ddk"],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(std::fs::read_to_string(&path)
        .unwrap()
        .starts_with("@echo off\r\n"));
}

#[test]
fn out_errors_print_the_cause_chain() {
    let dir = tempfile::tempdir().unwrap();
    let r = run_in(
        dir.path(),
        &["pooltag", "--out", "missing/enable.cmd", "Ddk"],
    );
    assert_eq!(r.code, 1);
    let mut lines = r.stderr.lines();
    assert_eq!(
        lines.next(),
        Some("kdpilot: error: could not create missing/enable.cmd")
    );
    assert!(
        lines.next().unwrap().starts_with("  caused by: "),
        "{}",
        r.stderr
    );
}

#[test]
fn out_warns_about_other_extensions() {
    let dir = tempfile::tempdir().unwrap();
    let r = run_in(dir.path(), &["pooltag", "--out", "enable.txt", "Ddk"]);
    assert_eq!(r.code, 0);
    assert!(
        r.stderr.contains("does not end in .cmd or .bat"),
        "{}",
        r.stderr
    );
}

/// `kdpilot pooltag ... | head -1`: the reader goes away, kdpilot stops quietly with 0.
#[cfg(unix)]
#[test]
fn closed_stdout_exits_quietly() {
    use std::process::Stdio;

    // ~1 MB of output, far more than a pipe buffers, so writing must hit the closed pipe.
    let tags: Vec<String> = (0..15_000).map(|i| format!("{:04}", i % 10_000)).collect();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kdpilot"))
        .arg("pooltag")
        .args(&tags)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&output.stderr), "");
}

#[test]
fn assert_cmd_style_check() {
    kdpilot()
        .args(["pooltag", "Fred"])
        .assert()
        .success()
        .stdout("Fred -> 0x64657246  (tag \"Fred\"; dword dumps show it as \"derF\")\n");
}
