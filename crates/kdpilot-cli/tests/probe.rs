//! `kdpilot probe` against the simulated target over TCP, a Unix socket and a pseudo-terminal,
//! including a target that sends garbage before syncing and one whose RESET carries a junk id.
//! Every test is bounded in time and kills what it starts.

use std::process::Output;
use std::time::Duration;

use kdpilot_kd::Arch;
use kdpilot_sim::{serve, Machine, SessionEnd, TargetOptions};
use tokio::process::Command;

const LIMIT: Duration = Duration::from_secs(60);

fn machine(arch: Arch) -> Machine {
    Machine::new(arch, 19041, 2, 0xfffff806_1f200000)
}

async fn run_probe(target: &str, timeout_secs: u32) -> Output {
    let child = Command::new(env!("CARGO_BIN_EXE_kdpilot"))
        .args([
            "probe",
            "--target",
            target,
            "--timeout",
            &timeout_secs.to_string(),
        ])
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(LIMIT, child)
        .await
        .expect("kdpilot probe finished in time")
        .expect("kdpilot runs")
}

fn check_report(out: &Output, arch: Arch) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "probe failed: {stderr}\n{stdout}");
    assert!(
        stdout.contains("Windows build 19041 free kernel"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(", {arch}, multiprocessor")),
        "{stdout}"
    );
    let base = arch.canonical_address(0xfffff806_1f200000);
    assert!(
        stdout.contains(&format!("kernel base     {base:#018x}")),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "KDBG            found at {:#018x}",
            base + 0x20000
        )),
        "{stdout}"
    );
    assert!(stdout.contains("(break-in)"), "{stdout}");
    assert!(
        stdout.contains("resumed         the target is running"),
        "{stdout}"
    );
}

async fn probe_over_tcp(arch: Arch, options: TargetOptions) -> (Output, Machine) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let target = tokio::spawn(async move {
        let (sock, _) = listener.accept().await.unwrap();
        let mut m = machine(arch);
        let end = serve(sock, &mut m, &options).await.unwrap();
        assert_eq!(end, SessionEnd::HostGone);
        m
    });
    let out = run_probe(&format!("tcp:127.0.0.1:{port}"), 20).await;
    let m = tokio::time::timeout(LIMIT, target).await.unwrap().unwrap();
    (out, m)
}

#[tokio::test]
async fn probe_over_tcp_x64() {
    let (out, m) = probe_over_tcp(Arch::Amd64, TargetOptions::default()).await;
    check_report(&out, Arch::Amd64);
    assert!(m.running, "the target was left stopped");
    assert_eq!(m.stops, 1, "the target broke in more than once");
}

#[tokio::test]
async fn probe_over_tcp_x86() {
    let (out, m) = probe_over_tcp(Arch::X86, TargetOptions::default()).await;
    check_report(&out, Arch::X86);
    assert!(m.running);
}

#[tokio::test]
async fn probe_survives_garbage_and_a_junk_reset_id() {
    let mut options = TargetOptions {
        garbage_before_sync: b"\x00\xff0000garbage iii 00\xaa\x55".repeat(20),
        ..TargetOptions::default()
    };
    options.link.reset_reply_id = 0xdead_beef;
    let (out, m) = probe_over_tcp(Arch::Amd64, options).await;
    check_report(&out, Arch::Amd64);
    assert!(m.running);
}

#[tokio::test]
async fn probe_a_target_that_is_already_stopped() {
    // A target sitting in the debugger (booted with /break, or the last host died): the RESET
    // makes it resend its state change; no break-in byte must be sent (it would cause a second
    // stop after the continue).
    let options = TargetOptions {
        start_stopped: true,
        ..TargetOptions::default()
    };
    let (out, m) = probe_over_tcp(Arch::Amd64, options).await;
    check_report(&out, Arch::Amd64);
    assert!(m.running);
    assert_eq!(m.stops, 1);
}

#[cfg(unix)]
#[tokio::test]
async fn probe_over_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("com1");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let target = tokio::spawn(async move {
        let (sock, _) = listener.accept().await.unwrap();
        let mut m = machine(Arch::Amd64);
        // A VM's COM port socket, with some line damage.
        let model = kdpilot_sim::LineModel {
            corrupt_rate: 1.0 / 3000.0,
            drop_rate: 1.0 / 8000.0,
            seed: 5,
            baud: None,
        };
        serve(
            kdpilot_sim::FaultyLine::new(sock, model),
            &mut m,
            &TargetOptions::default(),
        )
        .await
        .unwrap();
        m
    });
    // kd's own syntax for a VM pipe, as VirtualBox/VMware/QEMU expose it on a Linux host.
    let out = run_probe(
        &format!("com:pipe,port={},resets=0,reconnect", path.display()),
        20,
    )
    .await;
    check_report(&out, Arch::Amd64);
    let m = tokio::time::timeout(LIMIT, target).await.unwrap().unwrap();
    assert!(m.running);
}

#[cfg(unix)]
#[tokio::test]
async fn probe_over_a_pseudo_terminal() {
    use tokio_serial::{SerialPort, SerialStream};
    let (master, slave) = SerialStream::pair().expect("pty pair");
    let name = slave.name().expect("slave path");
    let target = tokio::spawn(async move {
        let mut master = master;
        let mut m = machine(Arch::Amd64);
        // Ends when the last slave handle closes (the master then reads EIO).
        let _ = serve(&mut master, &mut m, &TargetOptions::default()).await;
        m
    });
    let out = run_probe(&format!("com:port={name},baud=115200"), 20).await;
    // Keep our slave handle (unread) until the probe is done, so the master never sees a hangup
    // while kdpilot opens the device.
    drop(slave);
    check_report(&out, Arch::Amd64);
    let m = tokio::time::timeout(LIMIT, target).await.unwrap().unwrap();
    assert!(m.running);
}

/// A slow, noisy serial line: a pty at 19200 baud with corrupted and dropped bytes.
#[cfg(unix)]
#[tokio::test]
async fn probe_over_a_noisy_19200_baud_pseudo_terminal() {
    use kdpilot_sim::{FaultyLine, LineModel};
    use tokio_serial::{SerialPort, SerialStream};
    let (master, slave) = SerialStream::pair().expect("pty pair");
    let name = slave.name().expect("slave path");
    let model = LineModel {
        baud: Some(19200),
        corrupt_rate: 1.0 / 2000.0,
        drop_rate: 1.0 / 5000.0,
        seed: 17,
    };
    let target = tokio::spawn(async move {
        let mut m = machine(Arch::Amd64);
        let _ = serve(
            FaultyLine::new(master, model),
            &mut m,
            &TargetOptions::default(),
        )
        .await;
        m
    });
    let out = run_probe(&format!("com:port={name},baud=19200"), 40).await;
    drop(slave);
    check_report(&out, Arch::Amd64);
    let m = tokio::time::timeout(LIMIT, target).await.unwrap().unwrap();
    assert!(m.running);
}

/// TCP with line faults on the target's side.
#[tokio::test]
async fn probe_over_a_noisy_tcp_link() {
    use kdpilot_sim::{FaultyLine, LineModel};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let target = tokio::spawn(async move {
        let (sock, _) = listener.accept().await.unwrap();
        let model = LineModel {
            corrupt_rate: 1.0 / 1000.0,
            drop_rate: 1.0 / 5000.0,
            seed: 23,
            baud: None,
        };
        let mut m = machine(Arch::X86);
        let _ = serve(
            FaultyLine::new(sock, model),
            &mut m,
            &TargetOptions::default(),
        )
        .await;
        m
    });
    let out = run_probe(&format!("tcp:127.0.0.1:{port}"), 30).await;
    check_report(&out, Arch::X86);
    let m = tokio::time::timeout(LIMIT, target).await.unwrap().unwrap();
    assert!(m.running);
}

#[tokio::test]
async fn silent_target_is_a_target_error_with_exit_code_3() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hold = tokio::spawn(async move {
        let (sock, _) = listener.accept().await.unwrap();
        tokio::time::sleep(Duration::from_secs(10)).await;
        drop(sock);
    });
    let out = run_probe(&format!("tcp:127.0.0.1:{port}"), 2).await;
    hold.abort();
    assert_eq!(out.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("kdpilot: error: no KD target answered on"),
        "{stderr}"
    );
    assert!(
        stderr.contains("is it booted with debugging on"),
        "{stderr}"
    );
}

#[tokio::test]
async fn malformed_endpoint_is_a_usage_error_listing_the_forms() {
    let out = run_probe("com:prot=COM1", 2).await;
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown key `prot`"), "{stderr}");
    let out = run_probe("serial:COM1", 2).await;
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for form in ["com:port=COM1,baud=19200", "tcp:", "unix:"] {
        assert!(stderr.contains(form), "{form} missing from: {stderr}");
    }
}
