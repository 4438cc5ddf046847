//! The command line as a whole: help, usage errors, logging flags, exit codes.

use crate::util::run;

#[test]
fn help() {
    let r = run(&["--help"]);
    assert_eq!(r.code, 0);
    insta::assert_snapshot!(r.stdout);
}

#[test]
fn no_subcommand_prints_help_and_is_a_usage_error() {
    let r = run(&[]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("Usage: kdpilot"), "{}", r.stderr);
}

#[test]
fn unknown_subcommand_is_a_usage_error() {
    let r = run(&["frobnicate"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("unrecognized subcommand"), "{}", r.stderr);
}

#[test]
fn version() {
    let r = run(&["--version"]);
    assert_eq!(r.code, 0);
    assert!(r.stdout.starts_with("kdpilot "), "{}", r.stdout);
}

#[test]
fn verbose_and_quiet_conflict() {
    let r = run(&["-v", "-q", "pooltag", "Ddk"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("cannot be used with"), "{}", r.stderr);
}

#[test]
fn global_flags_work_after_the_subcommand() {
    let r = run(&["pooltag", "-vv", "Ddk"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = run(&["pooltag", "Ddk", "--quiet"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

#[test]
fn probe_needs_a_target() {
    let r = run(&["probe"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("--target <ENDPOINT>"), "{}", r.stderr);
}
