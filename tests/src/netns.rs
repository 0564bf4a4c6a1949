//! Network-namespace helpers.
//!
//! Netns membership is per *thread*, and test binaries run many tests on many
//! threads at once. Therefore nothing here ever calls `setns` on the caller's
//! thread: work inside a namespace always happens on a fresh thread (or in a
//! freshly forked child process).

use std::fs::{File, OpenOptions};
use std::future::Future;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sched::{setns, CloneFlags};

use crate::cmd::{ip, ip_in, ip_retry, wait_until};

/// Directory where iproute2 keeps named network namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// How long to wait for links/addresses to become usable.
pub(crate) const SETTLE_TIMEOUT: Duration = Duration::from_secs(15);

/// Runs `f` on a fresh thread that first joins `netns`, and returns its result.
///
/// Why: lets in-process code (listeners, clients, netlink calls) run inside a
/// pod or node without ever moving the calling thread. Sockets created inside
/// keep their namespace after being returned. Panics in `f` (and a failing
/// `setns`) are propagated to the caller.
pub fn in_netns<R: Send + 'static>(netns: &File, f: impl FnOnce() -> R + Send + 'static) -> R {
    let result = std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("in-netns".into())
            .spawn_scoped(s, move || {
                setns(netns, CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("setns(CLONE_NEWNET) failed: {e}"));
                f()
            })
            .expect("failed to spawn netns thread")
            .join()
    });
    match result {
        Ok(r) => r,
        Err(payload) => std::panic::resume_unwind(payload),
    }
}

/// Like [`in_netns`] but does not wait: returns the thread's handle.
///
/// Why: long-lived in-process servers must keep running while the test drives
/// clients. The netns fd is duplicated so the caller may drop its `File`.
/// A failing `setns` panics the spawned thread (visible via `join`).
pub fn spawn_in_netns<R: Send + 'static>(
    netns: &File,
    f: impl FnOnce() -> R + Send + 'static,
) -> std::thread::JoinHandle<R> {
    let fd: OwnedFd = netns.try_clone().expect("failed to dup netns fd").into();
    std::thread::Builder::new()
        .name("netns-thread".into())
        .spawn(move || {
            setns(&fd, CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("setns(CLONE_NEWNET) failed: {e}"));
            drop(fd);
            f()
        })
        .expect("failed to spawn netns thread")
}

/// Runs an async closure on a current-thread tokio runtime inside `netns`.
///
/// Why: handy for in-process async servers/clients; the runtime lives on the
/// netns thread so every socket it creates belongs to that namespace.
pub fn run_async_in_netns<F, Fut, R>(netns: &File, f: F) -> R
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = R>,
    R: Send + 'static,
{
    in_netns(netns, move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("failed to build tokio runtime")
            .block_on(f())
    })
}

/// Spawns `cmd` as a child process inside `netns` and, optionally, a cgroup.
///
/// Why: subprocesses (servers, curl, the proxy under test) must start already
/// inside the pod. All fds are prepared before `fork`; the `pre_exec` hook
/// only performs async-signal-safe syscalls (`write` to `cgroup.procs`,
/// `setns`), which is required in a multi-threaded parent.
pub fn spawn_in_netns_cmd(netns: &File, cgroup: Option<&Path>, mut cmd: Command) -> Result<Child> {
    let ns_fd: OwnedFd = netns.try_clone().context("dup netns fd")?.into();
    let procs_fd: Option<OwnedFd> = match cgroup {
        Some(cg) => {
            let p = cg.join("cgroup.procs");
            Some(OpenOptions::new().write(true).open(&p).with_context(|| format!("open {}", p.display()))?.into())
        }
        None => None,
    };
    let ns_raw = ns_fd.as_raw_fd();
    let procs_raw = procs_fd.as_ref().map(|f| f.as_raw_fd());
    // SAFETY: the hook only calls async-signal-safe syscalls on fds that stay
    // open until `spawn` returns (they are owned by this stack frame).
    unsafe {
        cmd.pre_exec(move || {
            if let Some(fd) = procs_raw {
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::setns(ns_raw, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().with_context(|| format!("failed to spawn {cmd:?} in netns"))?;
    drop(ns_fd);
    drop(procs_fd);
    Ok(child)
}

/// Path of the bind-mounted namespace file for a named netns.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Creates a named netns (`ip netns add`), brings `lo` up, disables DAD and
/// returns an open fd of it.
///
/// Why: DAD is switched off namespace-wide (besides `nodad` on each address)
/// so no address — not even link-local — sits in "tentative" state.
pub fn create_netns(name: &str) -> Result<File> {
    ip_retry(&["netns", "add", name])?;
    let path = netns_path(name);
    let file = File::open(&path).with_context(|| format!("open {}", path.display()))?;
    set_sysctls(&file, &[("net/ipv6/conf/all/accept_dad", "0"), ("net/ipv6/conf/default/accept_dad", "0")])
        .with_context(|| format!("sysctls in netns {name}"))?;
    ip_in(name, &["link", "set", "lo", "up"])?;
    Ok(file)
}

/// Deletes a named netns (`ip netns del`).
///
/// Why: cleanup must work both from `Drop` and from the leftover sweeper.
pub fn delete_netns(name: &str) -> Result<()> {
    ip(&["netns", "del", name]).map(|_| ())
}

/// Names of all named network namespaces (entries of `/run/netns`).
pub fn list_netns() -> Vec<String> {
    match std::fs::read_dir(NETNS_DIR) {
        Ok(rd) => rd.filter_map(|e| e.ok()).filter_map(|e| e.file_name().into_string().ok()).collect(),
        Err(_) => Vec::new(),
    }
}

/// Writes `(key, value)` sysctls (keys relative to `/proc/sys`) inside `netns`.
///
/// Why: `net.*` sysctls are per namespace and resolved from the writing
/// thread's netns, so a netns thread is enough (no `ip netns exec` fork).
pub fn set_sysctls(netns: &File, kv: &[(&str, &str)]) -> Result<()> {
    let kv: Vec<(String, String)> = kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    in_netns(netns, move || -> Result<()> {
        for (k, v) in &kv {
            let p = Path::new("/proc/sys").join(k);
            std::fs::write(&p, v).with_context(|| format!("write {v} to {}", p.display()))?;
            let got = std::fs::read_to_string(&p).with_context(|| format!("read back {}", p.display()))?;
            if got.trim() != v {
                bail!("sysctl {} is {:?} after writing {:?}", p.display(), got.trim(), v);
            }
        }
        Ok(())
    })
}

/// Waits until interface `dev` in netns `ns` reports operstate UP.
///
/// Why: a veth is only usable once both ends are up; returning earlier makes
/// the first connection of a test flaky.
pub fn wait_link_up(ns: &str, dev: &str) -> Result<()> {
    let mut last = String::new();
    wait_until(&format!("{dev} in netns {ns} to be UP"), SETTLE_TIMEOUT, || {
        last = ip_in(ns, &["-o", "link", "show", "dev", dev])?;
        Ok(last.contains("state UP"))
    })
    .with_context(|| format!("last state: {}", last.trim()))
}

/// Waits until netns `ns` has no tentative IPv6 address; fails on DAD failure.
///
/// Why: tentative addresses cannot be bound or used as a source yet.
pub fn wait_no_tentative(ns: &str) -> Result<()> {
    let failed = ip_in(ns, &["-6", "-o", "addr", "show", "dadfailed"])?;
    if !failed.trim().is_empty() {
        bail!("IPv6 DAD failed in netns {ns}: {}", failed.trim());
    }
    let mut last = String::new();
    wait_until(&format!("IPv6 addresses in netns {ns} to leave tentative state"), SETTLE_TIMEOUT, || {
        last = ip_in(ns, &["-6", "-o", "addr", "show", "tentative"])?;
        Ok(last.trim().is_empty())
    })
    .with_context(|| format!("still tentative: {}", last.trim()))
}
