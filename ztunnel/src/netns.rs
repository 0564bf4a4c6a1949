//! Running code inside a pod's network namespace.
//!
//! In-pod mode means every socket the proxy uses for a pod (its listeners and its upstream
//! connections) is created inside that pod's netns. Namespace membership is per thread, so
//! [`InpodNetns::run`] switches the *calling* thread in, runs a short synchronous closure
//! (typically `socket()`), and switches back before returning. Sockets keep their netns.
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use nix::sched::{setns, CloneFlags};

/// `SO_NETNS_COOKIE` (missing from the libc crate): the kernel's stable id for a netns,
/// the same value `bpf_get_netns_cookie` returns in the kernel programs.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// A pod's network namespace: an open fd plus its cookie.
#[derive(Debug)]
pub struct InpodNetns {
    file: File,
    cookie: u64,
}

impl InpodNetns {
    /// Takes ownership of a netns fd, verifying that it really is a network namespace.
    pub fn new(file: File) -> io::Result<Self> {
        let cookie = run_in(&file, netns_cookie_here).map_err(|e| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("fd is not a network namespace: {e}"))
        })??;
        Ok(Self { file, cookie })
    }

    /// The netns cookie (the key the kernel programs use for enrolled pods).
    pub fn cookie(&self) -> u64 {
        self.cookie
    }

    /// Runs `f` on the current thread while it is inside this namespace.
    pub fn run<R>(&self, f: impl FnOnce() -> R) -> io::Result<R> {
        run_in(&self.file, f)
    }

    /// The namespace fd, e.g. to attach an `sk_lookup` program to it.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

thread_local! {
    /// The calling thread's own namespace, opened on its first switch and kept: opening
    /// `/proc/thread-self/ns/net` (a path walk through procfs, then a close) for every
    /// socket made in a pod was two of the agent's system calls per inbound connection.
    static HOME: std::cell::OnceCell<File> = const { std::cell::OnceCell::new() };
    /// How many [`run_in`] calls the thread is inside: only at depth 0 is the thread in its
    /// own namespace, so only then may it be recorded as home.
    static DEPTH: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Switches the calling thread into `target`, runs `f`, and switches back. Threads switch
/// namespaces only through here (the cached home relies on it).
pub fn run_in<R>(target: &File, f: impl FnOnce() -> R) -> io::Result<R> {
    if DEPTH.get() > 0 {
        // Nested (`f` switched again): return to wherever the outer call put the thread.
        let here = File::open("/proc/thread-self/ns/net")?;
        return switched(target, &here, f);
    }
    HOME.with(|home| {
        let home = match home.get() {
            Some(h) => h,
            None => {
                let opened = File::open("/proc/thread-self/ns/net")?;
                home.get_or_init(|| opened)
            }
        };
        switched(target, home, f)
    })
}

fn switched<R>(target: &File, back: &File, f: impl FnOnce() -> R) -> io::Result<R> {
    setns(target.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
    DEPTH.set(DEPTH.get() + 1);
    // Returns even when `f` panics, so an unwinding thread is not left in the pod.
    let _back = Back(back);
    Ok(f())
}

/// Switches the thread back when dropped.
struct Back<'a>(&'a File);

impl Drop for Back<'_> {
    fn drop(&mut self) {
        DEPTH.set(DEPTH.get() - 1);
        // Failing to return would leave a runtime worker in a pod's namespace, and a panic
        // can be caught (tokio catches a task's): never continue.
        if let Err(e) = setns(self.0.as_fd(), CloneFlags::CLONE_NEWNET) {
            eprintln!("cannot return to the agent's network namespace: {e}");
            std::process::abort();
        }
    }
}

/// Cookie of the namespace the calling thread is in.
pub fn netns_cookie_here() -> io::Result<u64> {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").or_else(|_| std::net::UdpSocket::bind("[::1]:0"))?;
    socket_netns_cookie(&sock)
}

/// Cookie of the namespace a socket lives in.
pub fn socket_netns_cookie(sock: &impl AsRawFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, out-pointer to a u64 of the given length.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Addresses assigned inside the calling thread's namespace, excluding loopback and
/// link-local: the pod's IPs.
pub fn pod_addresses_here() -> io::Result<Vec<std::net::IpAddr>> {
    let mut out = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs().map_err(io::Error::from)? {
        let Some(addr) = ifa.address else { continue };
        let ip: std::net::IpAddr = if let Some(v4) = addr.as_sockaddr_in() {
            v4.ip().into()
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            v6.ip().into()
        } else {
            continue;
        };
        let skip = match ip {
            std::net::IpAddr::V4(a) => a.is_loopback() || a.is_link_local(),
            std::net::IpAddr::V6(a) => a.is_loopback() || a.is_unicast_link_local(),
        };
        if !skip && !out.contains(&ip) {
            out.push(ip);
        }
    }
    Ok(out)
}
