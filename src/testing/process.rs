//! The `courier` binary as child processes, as users and orchestrators run it: a
//! `dev-broker` with its bootstrap address, `consumer` and `producer` services with their
//! ops port. A child is killed and reaped when its handle drops (a failing test leaves no
//! process behind), signals go through the `kill` command (no libc), and every wait for a
//! child has a deadline.

use std::io::{BufRead, BufReader};
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use super::env::ServiceEnv;
use super::http::{free_port, try_http_get};

/// How long a child may take to print its first line or to exit when told to.
const CHILD_DEADLINE: Duration = Duration::from_secs(30);

/// The `courier` binary cargo builds for integration tests and benches, next to the running
/// test binary (`target/<profile>/deps/<test>` → `target/<profile>/courier`).
pub fn courier_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("CARGO_BIN_EXE_courier") {
        return path.into();
    }
    let exe = std::env::current_exe().expect("the path of the test binary");
    let mut dir = exe
        .parent()
        .expect("the test binary's folder")
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join(format!("courier{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "no courier binary at {} (cargo builds it for tests and benches)",
        bin.display()
    );
    bin
}

/// `courier <args>`, without a configuration file from the caller's environment
/// (`COURIER_CONFIG`): a test sets every variable it means.
pub fn courier_command<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut cmd = Command::new(courier_bin());
    cmd.args(args).env_remove("COURIER_CONFIG");
    cmd
}

/// Runs `cmd` to its end, capturing stdout and stderr; kills it and fails the test when it
/// runs longer than `timeout`.
pub fn output_within(cmd: &mut Command, timeout: Duration) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?} starts: {e}"));
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(output) => output.unwrap_or_else(|e| panic!("the output of {cmd:?}: {e}")),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("{cmd:?} did not end within {timeout:?}");
        }
    }
}

/// The stdout and stderr of a child as text; fails the test, showing both, unless it exited
/// with 0.
pub fn successful_output(output: &Output) -> (String, String) {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        output.status.success(),
        "exit {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    (stdout, stderr)
}

/// The last `lines` lines of the file at `path` (empty when it cannot be read).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A child process that is killed (SIGKILL) and reaped if the test ends before it does.
pub struct ChildProcess(Option<Child>);

impl ChildProcess {
    /// Spawns `cmd`; fails the test when it cannot start.
    pub fn spawn(cmd: &mut Command) -> Self {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("{cmd:?} starts: {e}"));
        ChildProcess(Some(child))
    }

    /// Its process id (0 once reaped).
    pub fn id(&self) -> u32 {
        self.0.as_ref().map_or(0, Child::id)
    }

    /// Its stdout, if piped (once).
    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.0.as_mut()?.stdout.take()
    }

    /// Its stderr, if piped (once).
    pub fn take_stderr(&mut self) -> Option<ChildStderr> {
        self.0.as_mut()?.stderr.take()
    }

    /// Sends `signal` (e.g. `TERM`, `KILL`) with the `kill` command.
    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.id().to_string())
            .status()
            .expect("kill runs");
        assert!(ok.success(), "kill -{signal} {}", self.id());
    }

    /// SIGKILL from this process at once (no `kill` command in between); the moment it was
    /// sent. The child is reaped by a later wait (or on drop).
    pub fn sigkill(&mut self) -> Instant {
        self.0
            .as_mut()
            .expect("a running child")
            .kill()
            .expect("SIGKILL");
        Instant::now()
    }

    /// [`ChildProcess::sigkill`], then reaps it.
    pub fn kill_9(&mut self) -> ExitStatus {
        self.sigkill();
        let mut child = self.0.take().expect("a running child");
        child.wait().expect("reap the killed child")
    }

    /// `Some(Some(status))` once it has exited; `Some(None)` once `deadline` passed (it is
    /// killed and reaped then); None while it runs.
    fn poll_exit(&mut self, deadline: Instant) -> Option<Option<ExitStatus>> {
        let child = self.0.as_mut().expect("a running child");
        if let Some(status) = child.try_wait().expect("try_wait") {
            self.0 = None;
            return Some(Some(status));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            self.0 = None;
            return Some(None);
        }
        None
    }

    /// Waits for it to exit, at most `timeout`; kills it and fails the test after that.
    pub async fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let pid = self.id();
        self.wait_or_kill(timeout)
            .await
            .unwrap_or_else(|| panic!("process {pid} did not exit within {timeout:?}"))
    }

    /// Waits for it to exit, at most `timeout`: its exit status, or None when it did not
    /// exit in time (it is killed and reaped then), for a test that reports before it
    /// asserts.
    pub async fn wait_or_kill(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(exit) = self.poll_exit(deadline) {
                return exit;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// [`ChildProcess::wait`] for a test without a runtime.
    pub fn wait_blocking(&mut self, timeout: Duration) -> ExitStatus {
        let (pid, deadline) = (self.id(), Instant::now() + timeout);
        loop {
            if let Some(exit) = self.poll_exit(deadline) {
                return exit
                    .unwrap_or_else(|| panic!("process {pid} did not exit within {timeout:?}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The first line `stdout` prints, waiting at most `timeout`.
fn first_line(stdout: ChildStdout, timeout: Duration) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    rx.recv_timeout(timeout)
        .unwrap_or_else(|_| panic!("no line on stdout within {timeout:?}"))
}

/// Where a service child's stderr (its log) goes; its stdout is discarded.
#[derive(Debug, Clone)]
pub enum Log {
    /// Discarded.
    Null,
    /// A pipe the test reads ([`ChildProcess::take_stderr`]).
    Piped,
    /// This file (kept for a post-mortem).
    File(PathBuf),
}

/// `courier consumer` or `courier producer` as a child, with its ops server on a port of
/// its own. Derefs to its [`ChildProcess`] for signals and waits.
pub struct ServiceProcess {
    process: ChildProcess,
    /// Its log file's stem (`consumer-3`), or the subcommand.
    pub name: String,
    /// The port of `/metrics`, `/healthz` and `/readyz`.
    pub ops_port: u16,
    /// Its log file, if it has one.
    pub log: Option<PathBuf>,
}

impl ServiceProcess {
    /// Spawns `courier <subcommand>` with `env` and `OPS_ADDR` on a free loopback port.
    pub fn spawn(subcommand: &str, env: &ServiceEnv, log: Log) -> ServiceProcess {
        let ops_port = free_port();
        let mut cmd = courier_command([subcommand]);
        cmd.envs(env.iter())
            .env("OPS_ADDR", format!("127.0.0.1:{ops_port}"))
            .stdout(Stdio::null());
        let (name, path) = match log {
            Log::Null => {
                cmd.stderr(Stdio::null());
                (subcommand.to_owned(), None)
            }
            Log::Piped => {
                cmd.stderr(Stdio::piped());
                (subcommand.to_owned(), None)
            }
            Log::File(path) => {
                let file = std::fs::File::create(&path)
                    .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
                cmd.stderr(file);
                let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned());
                (stem.unwrap_or_else(|| subcommand.to_owned()), Some(path))
            }
        };
        ServiceProcess {
            process: ChildProcess::spawn(&mut cmd),
            name,
            ops_port,
            log: path,
        }
    }

    /// `http://127.0.0.1:{ops_port}{path}`.
    pub fn ops_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.ops_port)
    }

    /// The value of the unlabelled series `name` in its `/metrics`, if it answers within a
    /// second.
    pub async fn gauge(&self, name: &str) -> Option<f64> {
        let (_, text) = try_http_get(&self.ops_url("/metrics"), Duration::from_secs(1)).await?;
        super::http::metric_value(&text, name)
    }

    /// Waits until its `/readyz` answers 200; fails the test after `timeout`.
    pub async fn wait_ready(&self, timeout: Duration) {
        super::http::wait_ready(&self.ops_url("/readyz"), timeout).await
    }

    /// The last `lines` lines of its log file (empty without one).
    pub fn tail(&self, lines: usize) -> String {
        self.log
            .as_deref()
            .map_or_else(String::new, |p| tail(p, lines))
    }
}

impl Deref for ServiceProcess {
    type Target = ChildProcess;

    fn deref(&self) -> &ChildProcess {
        &self.process
    }
}

impl DerefMut for ServiceProcess {
    fn deref_mut(&mut self) -> &mut ChildProcess {
        &mut self.process
    }
}

/// `courier dev-broker` as a child: the in-memory broker, in a process of its own, with
/// the topics of a [`ServiceEnv`]. Derefs to its [`ChildProcess`].
pub struct DevBrokerProcess {
    process: ChildProcess,
    /// Its bootstrap address, the first line it printed.
    pub bootstrap: String,
    /// The file it was told to write its bootstrap address to (`--bootstrap-file`).
    pub bootstrap_file: PathBuf,
}

impl DevBrokerProcess {
    /// Starts it with the topics of `env` at `partitions` partitions each, logging to
    /// `dir/broker.log` and writing its address to `dir/bootstrap`; waits for the address.
    pub fn start(env: &ServiceEnv, partitions: i32, dir: &Path) -> DevBrokerProcess {
        let bootstrap_file = dir.join("bootstrap");
        let log = dir.join("broker.log");
        let mut process = ChildProcess::spawn(
            courier_command(["dev-broker", "--bootstrap-file"])
                .arg(&bootstrap_file)
                .envs(env.iter())
                .env("KAFKA_TOPIC_PARTITIONS", partitions.to_string())
                .stdout(Stdio::piped())
                .stderr(
                    std::fs::File::create(&log)
                        .unwrap_or_else(|e| panic!("create {}: {e}", log.display())),
                ),
        );
        let stdout = process.take_stdout().expect("piped stdout");
        let line = first_line(stdout, CHILD_DEADLINE);
        let bootstrap = line.trim().to_owned();
        assert!(
            bootstrap.contains(':'),
            "dev-broker's first line is its address, not {line:?}; its log:\n{}",
            tail(&log, 20)
        );
        DevBrokerProcess {
            process,
            bootstrap,
            bootstrap_file,
        }
    }
}

impl Deref for DevBrokerProcess {
    type Target = ChildProcess;

    fn deref(&self) -> &ChildProcess {
        &self.process
    }
}

impl DerefMut for DevBrokerProcess {
    fn deref_mut(&mut self) -> &mut ChildProcess {
        &mut self.process
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_within_gives_the_output_or_fails_at_the_deadline() {
        let out = output_within(
            Command::new("sh").args(["-c", "echo out; echo err >&2"]),
            Duration::from_secs(10),
        );
        assert_eq!(successful_output(&out), ("out\n".into(), "err\n".into()));
        let hang = std::panic::catch_unwind(|| {
            output_within(Command::new("sleep").arg("30"), Duration::from_millis(200))
        });
        assert!(hang.is_err(), "a child past its deadline fails the test");
    }

    #[test]
    fn a_child_is_killed_and_reaped() {
        let mut child = ChildProcess::spawn(Command::new("sleep").arg("30"));
        assert!(child.id() > 0);
        let status = child.kill_9();
        assert!(!status.success());
        assert_eq!(child.id(), 0, "reaped");
        let mut child = ChildProcess::spawn(Command::new("sleep").arg("30"));
        child.signal("TERM");
        assert!(!child.wait_blocking(Duration::from_secs(10)).success());
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        let path = std::env::temp_dir().join(format!("courier-tail-{}", super::super::rand_id()));
        std::fs::write(&path, "a\nb\nc\n").unwrap();
        assert_eq!(tail(&path, 2), "b\nc");
        assert_eq!(tail(&path, 9), "a\nb\nc");
        std::fs::remove_file(&path).unwrap();
        assert_eq!(tail(&path, 2), "");
    }
}
