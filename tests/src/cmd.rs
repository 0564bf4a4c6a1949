//! Running external commands (mostly iproute2 `ip`) with loud, descriptive errors.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Path of the iproute2 binary; absolute so tests do not depend on `$PATH`.
pub const IP: &str = "/usr/sbin/ip";

/// Runs `program args...` and returns its stdout.
///
/// Why: every setup step must fail loudly with the exact command line and the
/// tool's stderr, so a broken environment is a test failure, never a skip.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("failed to execute `{}`", render(program, args)))?;
    if !out.status.success() {
        bail!("`{}` failed ({}): {}", render(program, args), out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `ip args...`, returning stdout (see [`run`]).
pub fn ip(args: &[&str]) -> Result<String> {
    run(IP, args)
}

/// Runs `ip -n <netns> args...`, i.e. the command inside a named netns.
///
/// Why: `ip -n` switches namespaces inside the child process, so the calling
/// thread's own namespace is never touched.
pub fn ip_in(netns: &str, args: &[&str]) -> Result<String> {
    let mut full = Vec::with_capacity(args.len() + 2);
    full.push("-n");
    full.push(netns);
    full.extend_from_slice(args);
    ip(&full)
}

/// Like [`ip`], but retries a few times on failure.
///
/// Why: `ip netns add` from several processes at once can race while
/// setting up the shared `/run/netns` mount; a short retry absorbs that.
pub fn ip_retry(args: &[&str]) -> Result<String> {
    let mut last = None;
    for attempt in 0..5 {
        match ip(args) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(20 * (attempt + 1)));
    }
    Err(last.expect("at least one attempt"))
}

/// Polls `check` until it returns `Ok(true)` or `timeout` elapses.
///
/// Why: link state and address flags settle asynchronously in the kernel;
/// tests must start only when the topology is really usable.
pub fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if check()? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn render(program: &str, args: &[&str]) -> String {
    let mut s = program.to_string();
    for a in args {
        s.push(' ');
        s.push_str(a);
    }
    s
}
