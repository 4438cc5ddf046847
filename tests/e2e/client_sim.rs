//! The client and the simulator together: sessions, faults, chatter, slow lines.

use std::time::Duration;

use kdpilot_kd::api::{self, Continue2, GetContext, GetContextEx};
use kdpilot_kd::client::{ClientEvent, EventSink, Running, WaitOutcome};
use kdpilot_kd::context::ContextRange;
use kdpilot_kd::wire::status;
use kdpilot_kd::Arch;
use kdpilot_sim::{Chatter, LineModel, SessionEnd, TargetOptions};

use crate::support::*;

async fn resume<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: kdpilot_kd::client::Stopped<S>,
) -> Running<S> {
    let dr7 = s.state().control_report(s.arch()).dr7();
    s.resume(&Continue2::go().with_dr7(dr7))
        .await
        .expect("resume")
}

#[tokio::test]
async fn a_whole_session_on_a_clean_line() {
    bounded(async {
        for arch in [Arch::Amd64, Arch::X86] {
            let (io, sim) = start(machine(arch), TargetOptions::default(), LineModel::clean());
            let mut s = connect(io, config(&LineModel::clean(), EventSink::none())).await;
            assert_eq!(s.arch(), arch);
            let v = s.version().unwrap().clone();
            assert_eq!(v.minor_version, 22621);
            assert_eq!(v.kern_base, arch.canonical_address(0xfffff807_3aa00000));

            // Chunked read across pages, then a read that runs into an unmapped page.
            let got = s.read_virtual(PATTERN_AT + 100, 9000).await.unwrap();
            assert_eq!(got, pattern(PATTERN_LEN)[100..9100]);
            let tail = s
                .read_virtual(PATTERN_AT + PATTERN_LEN as u64 - 10, 100)
                .await
                .unwrap();
            assert_eq!(tail, pattern(PATTERN_LEN)[PATTERN_LEN - 10..]);
            let unmapped = s
                .request(&api::ReadVirtualMemory {
                    address: 0x1000,
                    count: 16,
                })
                .await;
            assert!(
                unmapped.is_err(),
                "reading unmapped memory must fail: {unmapped:?}"
            );

            // Writes land and read back.
            let n = s
                .request(&api::WriteVirtualMemory {
                    address: PATTERN_AT,
                    data: b"kdpilot".to_vec(),
                })
                .await
                .unwrap();
            assert_eq!(n, 7);
            assert_eq!(s.read_virtual(PATTERN_AT, 7).await.unwrap(), b"kdpilot");

            // Registers: full context and the partial one.
            let ctx = s.request(&GetContext).await.unwrap();
            assert_eq!(ctx.pc(), s.state().program_counter);
            let part = s
                .request(&GetContextEx {
                    range: ContextRange::pc_sp_fp(arch),
                })
                .await
                .unwrap();
            assert_eq!(
                part.bytes.len() as u32,
                ContextRange::pc_sp_fp(arch).byte_count
            );

            // A breakpoint plants an int3 and its removal restores the byte.
            let addr = v.kern_base + 0x2000;
            let before = s.read_virtual(addr, 1).await.unwrap();
            let h = s
                .request(&api::WriteBreakPoint { address: addr })
                .await
                .unwrap();
            assert_eq!(s.read_virtual(addr, 1).await.unwrap(), [0xCC]);
            s.request(&api::RestoreBreakPoint { handle: h })
                .await
                .unwrap();
            assert_eq!(s.read_virtual(addr, 1).await.unwrap(), before);
            assert!(s
                .request(&api::RestoreBreakPoint { handle: h })
                .await
                .is_err());

            // Break in and resume a few times.
            let mut r = resume(s).await;
            for _ in 0..5 {
                let s = r.break_in(Duration::from_secs(10)).await.unwrap();
                assert_eq!(s.state().info.new_state(), 0x3030);
                r = resume(s).await;
            }
            drop(r);
            let (end, m) = sim.task.await.unwrap();
            assert_eq!(end, SessionEnd::HostGone);
            assert_eq!(m.stops, 6);
            assert!(m.running, "target left stopped");
            assert!(m.planted().is_empty());
        }
    })
    .await;
}

#[tokio::test]
async fn a_noisy_line_costs_retries_never_wrong_data() {
    bounded(async {
        let mut total_faults = 0;
        let mut total_retries = 0;
        for seed in 1..=3u64 {
            let model = LineModel {
                corrupt_rate: 1.0 / 1000.0,
                drop_rate: 1.0 / 5000.0,
                seed,
                baud: None,
            };
            let (io, sim) = start(
                machine(Arch::Amd64),
                TargetOptions::default(),
                model.clone(),
            );
            let mut s = connect(io, config(&model, EventSink::none())).await;
            for i in 0..6u64 {
                let off = (i * 997) % 4096;
                let got = s
                    .read_virtual(PATTERN_AT + off, 3000)
                    .await
                    .expect("read on a noisy line");
                assert_eq!(
                    got,
                    pattern(PATTERN_LEN)[off as usize..off as usize + 3000],
                    "seed {seed} read {i}"
                );
            }
            let st = s.stats().clone();
            total_retries += st.retransmits + st.frame_errors;
            let mut r = resume(s).await;
            for _ in 0..3 {
                let s = r
                    .break_in(Duration::from_secs(20))
                    .await
                    .expect("break in on a noisy line");
                r = resume(s).await;
            }
            drop(r);
            let (_, m) = sim.task.await.unwrap();
            assert!(m.running, "seed {seed}: target left stopped");
            total_faults += 1;
        }
        assert!(
            total_retries > 0,
            "the line model injected no faults that mattered"
        );
        assert_eq!(total_faults, 3);
    })
    .await;
}

#[tokio::test]
async fn prints_prompts_and_file_requests_are_answered() {
    bounded(async {
        let options = TargetOptions {
            chatter: Chatter {
                prints: vec![
                    "Hello from the kernel\n".into(),
                    "\x1b[31mred\x1b[0m\n".into(),
                ],
                prompt: Some(
                    "Break, Ignore, Terminate Process or Terminate Thread (bipt)? ".into(),
                ),
                file_request: Some(r"\SystemRoot\system32\drivers\leakydrv.sys".into()),
            },
            ..TargetOptions::default()
        };
        let (io, sim) = start(machine(Arch::Amd64), options, LineModel::clean());
        let (sink, mut events) = EventSink::channel();
        let s = connect(io, config(&LineModel::clean(), sink)).await;
        let r = resume(s).await;
        let WaitOutcome::StillRunning(r) = r.wait_stop(Duration::from_secs(2)).await.unwrap()
        else {
            panic!("chatter must not look like a stop");
        };
        drop(r);
        let (_, m) = sim.task.await.unwrap();
        let mut got = Vec::new();
        while let Ok(ev) = events.try_recv() {
            got.push(ev);
        }
        let prints: Vec<_> = got
            .iter()
            .filter_map(|e| match e {
                ClientEvent::DebugPrint(p) => Some(p.clone()),
                _ => None,
            })
            .collect();
        // Printed once at boot (before the break-in) and once after the resume.
        assert!(
            prints.iter().any(|p| p == b"Hello from the kernel\n"),
            "{got:?}"
        );
        assert!(got
            .iter()
            .any(|e| matches!(e, ClientEvent::Prompt { answer, .. } if answer == "i")));
        assert!(got.iter().any(
            |e| matches!(e, ClientEvent::FileRequest { name } if name.ends_with("leakydrv.sys"))
        ));
        assert!(m.chatter_log.prompt_answers.iter().all(|a| a == b"i"));
        assert!(!m.chatter_log.prompt_answers.is_empty());
        assert!(m
            .chatter_log
            .file_replies
            .iter()
            .all(|&s| s == status::NO_SUCH_FILE));
        assert!(!m.chatter_log.file_replies.is_empty());
    })
    .await;
}

#[tokio::test]
async fn timeouts_scale_with_a_19200_baud_line() {
    bounded(async {
        // A 3944-byte read is a 4017-byte packet: 2.1 s at 19200 baud. Fixed socket-style
        // timeouts would call the target dead; line-rate timing must not.
        let model = LineModel {
            baud: Some(19200),
            ..LineModel::clean()
        };
        let (io, sim) = start(
            machine(Arch::Amd64),
            TargetOptions::default(),
            model.clone(),
        );
        let mut s = connect(io, config(&model, EventSink::none())).await;
        let t = std::time::Instant::now();
        let got = s
            .request(&api::ReadVirtualMemory {
                address: PATTERN_AT,
                count: 3944,
            })
            .await
            .unwrap();
        let took = t.elapsed();
        assert_eq!(got.data, pattern(PATTERN_LEN)[..3944]);
        assert!(
            took >= Duration::from_millis(1900),
            "the line model did not throttle: {took:?}"
        );
        assert_eq!(
            s.stats().retransmits,
            0,
            "a slow reply was mistaken for a lost one"
        );
        drop(resume(s).await);
        let (_, m) = sim.task.await.unwrap();
        assert!(m.running);
    })
    .await;
}
