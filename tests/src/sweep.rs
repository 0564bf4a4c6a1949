//! Naming scheme for cluster resources and removal of leftovers from
//! crashed/killed test processes.

use std::sync::atomic::{AtomicU32, Ordering};

use nix::errno::Errno;
use nix::sys::signal::kill;
use nix::unistd::Pid;

use crate::cgroup::{cgroup2_root, remove_cgroup_tree};
use crate::netns::{delete_netns, list_netns};

/// Leading tag of every resource name the harness creates.
pub const PREFIX_TAG: &str = "zt";

/// Allocates a fresh cluster prefix `zt{pid}x{counter}`.
///
/// Why: the pid makes names unique across concurrently running test
/// processes and lets [`sweep_leftovers`] tell whether the owner is still
/// alive; the counter makes them unique across threads of one process.
pub fn new_prefix() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{PREFIX_TAG}{}x{n}", std::process::id())
}

/// Parses a resource name created by the harness and returns its creator pid.
///
/// Accepts `zt{pid}x{counter}` optionally followed by `-anything`.
/// Why: the sweeper must only ever touch names matching our exact pattern.
pub fn owner_pid(name: &str) -> Option<i32> {
    let rest = name.strip_prefix(PREFIX_TAG)?;
    let (pid, rest) = rest.split_once('x')?;
    let counter = match rest.split_once('-') {
        Some((c, _)) => c,
        None => rest,
    };
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(pid) || !all_digits(counter) {
        return None;
    }
    pid.parse().ok().filter(|&p: &i32| p > 0)
}

/// Whether a process with this pid currently exists.
fn pid_alive(pid: i32) -> bool {
    !matches!(kill(Pid::from_raw(pid), None), Err(Errno::ESRCH))
}

/// Deletes netns and cgroup directories left behind by dead test processes.
///
/// Why: a test binary killed mid-run (SIGKILL, timeout) never runs `Drop`, and
/// stale namespaces/cgroups would pile up. Only names matching our pattern
/// whose creating pid is gone are removed, so concurrently running test
/// processes are never disturbed. Errors are reported to stderr, not raised:
/// a leftover we cannot remove must not break unrelated tests.
pub fn sweep_leftovers() {
    for name in list_netns() {
        if let Some(pid) = owner_pid(&name) {
            if !pid_alive(pid) {
                if let Err(e) = delete_netns(&name) {
                    // Another sweeper may have won the race.
                    if crate::netns::netns_path(&name).exists() {
                        eprintln!("mesh-tests: sweep: {e:#}");
                    }
                }
            }
        }
    }
    let root = match cgroup2_root() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mesh-tests: sweep: {e:#}");
            return;
        }
    };
    let Ok(rd) = std::fs::read_dir(root) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        // Cluster cgroups are exactly the prefix, no suffix.
        if name.contains('-') || !e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            continue;
        }
        if let Some(pid) = owner_pid(name) {
            if !pid_alive(pid) {
                if let Err(err) = remove_cgroup_tree(&e.path()) {
                    eprintln!("mesh-tests: sweep: {err:#}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_names() {
        assert_eq!(owner_pid("zt123x0"), Some(123));
        assert_eq!(owner_pid("zt123x45-node0"), Some(123));
        assert_eq!(owner_pid("zt123x45-pod-a-b"), Some(123));
        assert_eq!(owner_pid("zt123"), None);
        assert_eq!(owner_pid("ztx1"), None);
        assert_eq!(owner_pid("zt12x"), None);
        assert_eq!(owner_pid("ztunnel"), None);
        assert_eq!(owner_pid("zt1a2x3"), None);
        let p = new_prefix();
        assert_eq!(owner_pid(&p), Some(std::process::id() as i32));
    }
}
