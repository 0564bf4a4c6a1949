//! cgroup v2 helpers.
//!
//! The host may use a hybrid hierarchy (v2 mounted at e.g.
//! `/sys/fs/cgroup/unified`), so the cgroup2 mount point is always discovered
//! from `/proc/self/mounts`, never hard-coded.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Returns the cgroup2 mount point (first `cgroup2` entry of `/proc/self/mounts`).
///
/// Why: the harness must work on pure-v2 and hybrid hosts alike.
pub fn cgroup2_root() -> Result<&'static Path> {
    static ROOT: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    ROOT.get_or_init(|| find_cgroup2_mount().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map(|p| p.as_path())
        .map_err(|e| anyhow!("{e}"))
}

fn find_cgroup2_mount() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts").context("read /proc/self/mounts")?;
    for line in mounts.lines() {
        let mut it = line.split_whitespace();
        let (_src, dst, fstype) = match (it.next(), it.next(), it.next()) {
            (Some(s), Some(d), Some(t)) => (s, d, t),
            _ => continue,
        };
        if fstype == "cgroup2" {
            return Ok(PathBuf::from(unescape_mount_path(dst)));
        }
    }
    bail!("no cgroup2 filesystem found in /proc/self/mounts")
}

/// Decodes the octal escapes (`\040` etc.) used in `/proc/self/mounts`.
fn unescape_mount_path(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let d = |c: u8| u32::from(c - b'0');
            let v = d(b[i + 1]) * 64 + d(b[i + 2]) * 8 + d(b[i + 3]);
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Creates a cgroup directory (parents included).
///
/// Why: pods get their own cgroup so eBPF cgroup programs and the proxy can
/// tell workloads apart.
pub fn create_cgroup(path: &Path) -> Result<()> {
    fs::create_dir_all(path).with_context(|| format!("mkdir cgroup {}", path.display()))
}

/// PIDs currently in the cgroup (its `cgroup.procs`, not descendants).
///
/// Why: needed to empty a cgroup before it can be removed.
pub fn cgroup_procs(path: &Path) -> Result<Vec<i32>> {
    let p = path.join("cgroup.procs");
    let s = fs::read_to_string(&p).with_context(|| format!("read {}", p.display()))?;
    Ok(s.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// Removes a cgroup subtree: empties it, then `rmdir`s bottom-up.
///
/// Why: `rmdir` of a populated cgroup fails with EBUSY. Our own process (if it
/// somehow ended up inside) is moved to the parent; every other process is a
/// leftover of the test and is killed (`cgroup.kill`, or SIGKILL per pid on
/// older kernels). A missing directory counts as success.
pub fn remove_cgroup_tree(path: &Path) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let mut errors = Vec::new();
    if let Ok(rd) = fs::read_dir(path) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                if let Err(err) = remove_cgroup_tree(&e.path()) {
                    errors.push(format!("{err:#}"));
                }
            }
        }
    }
    if let Err(err) = empty_cgroup(path) {
        errors.push(format!("{err:#}"));
    }
    // rmdir may briefly fail with EBUSY while killed tasks finish exiting.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match fs::remove_dir(path) {
            Ok(()) => break,
            Err(e) if e.kind() == ErrorKind::NotFound => break,
            Err(e) if Instant::now() < deadline && e.raw_os_error() == Some(libc::EBUSY) => {
                // Processes may have been forked into it meanwhile; kill again.
                let _ = empty_cgroup(path);
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                errors.push(format!("rmdir {}: {e}", path.display()));
                break;
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        bail!("removing cgroup {}: {}", path.display(), errors.join("; "))
    }
}

/// Moves our own process out of `path` and kills everything else in it.
fn empty_cgroup(path: &Path) -> Result<()> {
    let me = std::process::id() as i32;
    let procs = match cgroup_procs(path) {
        Ok(p) => p,
        Err(_) if !path.exists() => return Ok(()),
        Err(e) => return Err(e),
    };
    if procs.is_empty() {
        return Ok(());
    }
    if procs.contains(&me) {
        let parent = path.parent().ok_or_else(|| anyhow!("cgroup {} has no parent", path.display()))?;
        let pp = parent.join("cgroup.procs");
        fs::write(&pp, me.to_string()).with_context(|| format!("move self ({me}) to {}", pp.display()))?;
    }
    let kill_file = path.join("cgroup.kill");
    if kill_file.exists() {
        fs::write(&kill_file, "1").with_context(|| format!("write {}", kill_file.display()))?;
    } else {
        for pid in procs.into_iter().filter(|&p| p != me) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
    wait_unpopulated(path, Duration::from_secs(10))
}

/// Waits until `cgroup.events` reports `populated 0`.
fn wait_unpopulated(path: &Path, timeout: Duration) -> Result<()> {
    let ev = path.join("cgroup.events");
    let deadline = Instant::now() + timeout;
    loop {
        let s = match fs::read_to_string(&ev) {
            Ok(s) => s,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("read {}", ev.display())),
        };
        if s.lines().any(|l| l.trim() == "populated 0") {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("cgroup {} still populated after {timeout:?}", path.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescape() {
        assert_eq!(unescape_mount_path("/a\\040b"), "/a b");
        assert_eq!(unescape_mount_path("/sys/fs/cgroup/unified"), "/sys/fs/cgroup/unified");
        assert_eq!(unescape_mount_path("/x\\"), "/x\\");
    }
}
