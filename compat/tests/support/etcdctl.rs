//! Debian's etcdctl (3.4, package etcd-client; `.ci/run` installs it), the client most of
//! the compat tests drive raftkv and etcd with: run once to the end ([`etcdctl_run`] and
//! its shorthands), or left running ([`Running`]: `watch`, `lock`, `elect`, `lease
//! keep-alive`) with its output read as it comes, until the test stops or interrupts it.
//! Either way the test gets an [`Output`]: stdout, stderr and exit code.

use super::normalize::messages;
use super::processes::{interrupt, KillOnDrop};
use std::io::{Read, Write};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a running etcdctl is given to print what a test waits for, or to end.
pub const PATIENCE: Duration = Duration::from_secs(15);

const MISSING: &str = "etcdctl is installed (Debian package etcd-client; see .ci/run)";

/// etcdctl speaking the v3 API to `endpoints` (comma-separated `host:port`), giving up on a
/// request after `timeout_secs`.
pub fn etcdctl_cmd(endpoints: &str, timeout_secs: u32) -> Command {
    let mut c = Command::new("etcdctl");
    c.env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoints}"))
        .arg(format!("--command-timeout={timeout_secs}s"));
    c
}

/// What an etcdctl run printed and how it ended.
#[derive(Clone, Debug)]
pub struct Output {
    pub stdout: String,
    /// Everything on stderr, its log lines too (see [`Output::messages`]).
    pub stderr: String,
    /// The exit code; None when a signal ended it (a running one the test stopped).
    pub code: Option<i32>,
}

impl Output {
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }

    /// What etcdctl said to its user on stderr, without its log lines.
    pub fn messages(&self) -> String {
        messages(&self.stderr)
    }

    /// The whole of it as a differential transcript shows one step: stdout, etcdctl's
    /// messages, the exit code.
    pub fn shown(&self) -> String {
        format!(
            "{}--- stderr:\n{}--- exit: {:?}",
            self.stdout,
            self.messages(),
            self.code
        )
    }
}

/// Run `cmd` (an [`etcdctl_cmd`] with its arguments, or another tool) to the end, `input`
/// on its stdin (all of it, then the end of input: etcdctl reads a transaction to the end).
pub fn run_to_end(cmd: &mut Command, input: &str) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            let program = cmd.get_program().to_string_lossy().into_owned();
            panic!("start {program}: {e} (see .ci/run for the packages)")
        });
    let mut stdin = child.stdin.take().unwrap();
    if !input.is_empty() {
        stdin.write_all(input.as_bytes()).unwrap();
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    Output {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        code: out.status.code(),
    }
}

/// `etcdctl ARGS` against `endpoints`, to the end, `input` on its stdin.
pub fn etcdctl_run(endpoints: &str, timeout_secs: u32, args: &[&str], input: &str) -> Output {
    run_to_end(etcdctl_cmd(endpoints, timeout_secs).args(args), input)
}

/// `etcdctl ARGS`, which must succeed: its stdout.
pub fn etcdctl_ok(endpoints: &str, timeout_secs: u32, args: &[&str], input: &str) -> String {
    let out = etcdctl_run(endpoints, timeout_secs, args, input);
    assert!(out.ok(), "etcdctl {args:?}: {}{}", out.stdout, out.stderr);
    out.stdout
}

/// `etcdctl ARGS`: whether it succeeded, and its stdout then stderr.
pub fn etcdctl_result(endpoints: &str, timeout_secs: u32, args: &[&str]) -> (bool, String) {
    let out = etcdctl_run(endpoints, timeout_secs, args, "");
    (out.ok(), out.stdout + &out.stderr)
}

/// A running etcdctl, its stdout and stderr read as they come by a thread each.
pub struct Running {
    child: KillOnDrop,
    /// Open while the test may type more (`watch -i`).
    stdin: Option<ChildStdin>,
    out: Arc<Mutex<String>>,
    err: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
    /// `etcdctl ARGS`, for a transcript.
    pub what: String,
    /// `what`, and which server it talks to, for a failure message.
    on: String,
}

impl Running {
    /// Start `etcdctl ARGS` against `endpoint`. With `input`, that is all its stdin
    /// (written at once, then closed); without, stdin stays open for [`Running::type_line`].
    pub fn spawn(endpoint: &str, args: &[&str], input: Option<&str>) -> Running {
        let mut child = etcdctl_cmd(endpoint, 5)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect(MISSING);
        let mut stdin = child.stdin.take();
        if let Some(text) = input {
            let mut all = stdin.take().unwrap();
            all.write_all(text.as_bytes()).unwrap();
        }
        let mut readers = Vec::new();
        let mut read = |mut r: Box<dyn Read + Send>| {
            let buf = Arc::new(Mutex::new(String::new()));
            let b = buf.clone();
            readers.push(std::thread::spawn(move || {
                let mut chunk = [0u8; 4096];
                while let Ok(n) = r.read(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    b.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&chunk[..n]));
                }
            }));
            buf
        };
        let out = read(Box::new(child.stdout.take().unwrap()));
        let err = read(Box::new(child.stderr.take().unwrap()));
        let what = format!("etcdctl {}", args.join(" "));
        Running {
            child: KillOnDrop(child),
            stdin,
            out,
            err,
            readers,
            on: format!("{what} (against {endpoint})"),
            what,
        }
    }

    /// Its stdout so far.
    pub fn stdout(&self) -> String {
        self.out.lock().unwrap().clone()
    }

    /// Wait until its stdout so far satisfies `f`; else fail, naming `what` did not come.
    pub fn wait_for(&self, what: &str, f: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let out = self.stdout();
            if f(&out) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{}: {what} did not come; it printed:\n{out}\nstderr:\n{}",
                self.on,
                self.err.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Wait until `n` lines of its stdout satisfy `f` (`what` says which, for a failure).
    pub fn wait_lines(&self, n: usize, what: &str, f: impl Fn(&str) -> bool) {
        self.wait_for(&format!("{n} lines {what}"), |out| {
            out.lines().filter(|l| f(l)).count() >= n
        });
    }

    /// Wait until its stdout holds `n` copies of the whole line `line`.
    pub fn wait_line(&self, line: &str, n: usize) {
        self.wait_lines(n, &format!("{line:?}"), |l| l == line);
    }

    /// Type a line on its stdin (one left open by [`Running::spawn`]).
    pub fn type_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin left open");
        stdin.write_all(format!("{line}\n").as_bytes()).unwrap();
        stdin.flush().unwrap();
    }

    /// Stop it (its stdin closed first), or (`ends`) wait for it to end by itself: what it
    /// printed, and its exit code (None: it was still running, and killed).
    pub fn finish(mut self, ends: bool) -> Output {
        drop(self.stdin.take());
        let deadline = Instant::now() + PATIENCE;
        let code = loop {
            if let Some(s) = self.child.0.try_wait().unwrap() {
                break s.code();
            }
            if !ends {
                break None;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not end; it printed:\n{}",
                self.on,
                self.stdout()
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        self.collect(code)
    }

    /// Interrupt it as Ctrl-C does (`lock` unlocks, `elect` resigns, then it exits); what
    /// it printed and its exit code.
    pub fn interrupt(mut self) -> Output {
        interrupt(&self.child.0);
        let deadline = Instant::now() + PATIENCE;
        let code = loop {
            if let Some(s) = self.child.0.try_wait().unwrap() {
                break s.code();
            }
            assert!(Instant::now() < deadline, "{} did not end", self.on);
            std::thread::sleep(Duration::from_millis(5));
        };
        self.collect(code)
    }

    /// Kill it if it still runs, then take all it printed: the readers are done once the
    /// pipes close (given a moment, in case something it started holds them).
    fn collect(mut self, code: Option<i32>) -> Output {
        let _ = self.child.0.kill();
        let _ = self.child.0.wait();
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.readers.iter().any(|r| !r.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        for r in self.readers.drain(..).filter(|r| r.is_finished()) {
            let _ = r.join();
        }
        Output {
            stdout: self.stdout(),
            stderr: self.err.lock().unwrap().clone(),
            code,
        }
    }
}

/// The id of the member `name` in `etcdctl member list` output (simple format), if listed.
pub fn member_id(list: &str, name: &str) -> Option<String> {
    list.lines()
        .find(|l| l.contains(&format!(", {name}, ")))
        .and_then(|l| l.split(',').next())
        .map(|id| id.trim().to_string())
}

/// The word after the first `marker` in `text` (a trailing comma left off): the id in
/// "Member 8e9e05c52164694d added to cluster …".
pub fn word_after(text: &str, marker: &str) -> String {
    let at = text
        .find(marker)
        .unwrap_or_else(|| panic!("{marker:?} in {text:?}"));
    text[at + marker.len()..]
        .split_whitespace()
        .next()
        .unwrap_or_else(|| panic!("a word after {marker:?} in {text:?}"))
        .trim_end_matches(',')
        .to_string()
}

/// The last field of each line of etcdctl's simple format (fields separated by ", "): the
/// hash in each line of `endpoint hashkv`.
pub fn last_fields(out: &str) -> Vec<String> {
    out.lines()
        .filter_map(|l| l.rsplit(", ").next())
        .map(str::to_string)
        .collect()
}
