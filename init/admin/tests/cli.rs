//! The built admin CLI against a fake PID 1 (a unix listener in a temporary directory): what it
//! sends, in which order, with stdin as a script would give it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Serves `answers.len()` connections: each gets the answer whose request prefix matches its
/// first line. Returns every line received.
fn fake_pid1(answers: Vec<(&'static str, &'static str)>) -> (tempfile::TempDir, mpsc::Receiver<Vec<String>>) {
    let dir = tempfile::tempdir().unwrap();
    let listener = UnixListener::bind(dir.path().join("control")).unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        for _ in 0..answers.len() {
            let Ok((stream, _)) = listener.accept() else { break };
            let mut line = String::new();
            BufReader::new(&stream).read_line(&mut line).unwrap();
            let line = line.trim_end().to_string();
            let answer = answers.iter().find(|(p, _)| line.starts_with(p)).map_or("{\"ok\":false}", |a| a.1);
            (&stream).write_all(format!("{answer}\n").as_bytes()).unwrap();
            seen.push(line);
        }
        let _ = tx.send(seen);
    });
    (dir, rx)
}

fn admin(dir: &std::path::Path, args: &[&str], stdin: &str) -> std::process::Output {
    let socket = dir.join("control");
    let mut child = Command::new(env!("CARGO_BIN_EXE_cloister-admin"))
        .arg("--control-socket")
        .arg(&socket)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    // A CLI that hangs (waiting on itself for stdin, say) fails the test instead of stalling it.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("cloister-admin {args:?} did not finish within 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// An enrolled admin's CLI sends the code from stdin's first line before the command.
#[test]
fn a_code_comes_first_from_stdin() {
    let (dir, seen) = fake_pid1(vec![
        ("totp status", r#"{"ok":true,"enrolled":true,"passed":false}"#),
        ("totp code", r#"{"ok":true}"#),
        ("status", r#"{"ok":true,"uptime_ms":1000,"services":[]}"#),
    ]);
    let out = admin(dir.path(), &["-c", "status"], "123 456\n");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let seen = seen.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(seen, ["totp status", "totp code 123456", "status"]);
}

/// Without a code nothing is sent but the status question.
#[test]
fn no_code_no_command() {
    let (dir, _seen) = fake_pid1(vec![("totp status", r#"{"ok":true,"enrolled":true,"passed":false}"#)]);
    let out = admin(dir.path(), &["-c", "user list"], "");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no code given"));
}

/// At the prompt, `totp enrol` reads its code from the same stdin the prompt reads its lines
/// from, and the prompt goes on after it.
#[test]
fn enrolment_at_the_prompt_reads_the_code_and_goes_on() {
    let (dir, seen) = fake_pid1(vec![
        ("totp status", r#"{"ok":true,"enrolled":false,"passed":true}"#),
        ("totp enrol", r#"{"ok":true,"uri":"otpauth://totp/Cloister:ops?secret=GEZDGNBV","qr":["x"]}"#),
        ("totp confirm", r#"{"ok":true}"#),
        ("status", r#"{"ok":true,"uptime_ms":1000,"services":[]}"#),
    ]);
    let out = admin(dir.path(), &[], "totp enrol\n654321\nstatus\nexit\n");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("or type this key into it: GEZD GNBV"), "{text}");
    assert!(text.contains("two-factor login is on") && text.contains("up 0h 00m 01s"), "{text}");
    let seen = seen.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(seen, ["totp status", "totp enrol", "totp confirm 654321", "status"]);
}

/// The kill switch asks twice; a wrong answer sends nothing, the right ones send the phrase.
#[test]
fn kill_system_needs_both_confirmations() {
    for refused in ["no\n", "yes\ndestroy\n", "yes\n"] {
        let (dir, seen) = fake_pid1(vec![("totp status", r#"{"ok":true,"enrolled":false,"passed":true}"#)]);
        let out = admin(dir.path(), &["-c", "kill-system"], refused);
        assert_eq!(out.status.code(), Some(1), "{refused:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("nothing happened") || refused == "yes\n");
        assert_eq!(seen.recv_timeout(Duration::from_secs(10)).unwrap(), ["totp status"]);
    }
    let (dir, seen) = fake_pid1(vec![
        ("totp status", r#"{"ok":true,"enrolled":false,"passed":true}"#),
        ("kill-system", r#"{"ok":true}"#),
    ]);
    let out = admin(dir.path(), &["-c", "kill-system"], "yes\ndestroy this appliance\n");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let seen = seen.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(seen, ["totp status", "kill-system destroy this appliance"]);
}
