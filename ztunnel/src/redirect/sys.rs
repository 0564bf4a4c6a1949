//! The raw bpf(2) commands aya 0.14 does not expose: open a pin and detach a link
//! explicitly (a forked child can hold copies of a link fd, so dropping our copy does not
//! guarantee the program is gone), and create a cgroup link with ordering flags (aya's
//! attach takes only the override/multi mode) and pin it, and swap a pinned link's program.
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_DETACH: libc::c_long = 34;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// Attach flag (6.15 for prog attach; for links with the cgroup multi-program API, 2025): runs before
/// the non-preorder programs of its own cgroup and of every cgroup below.
pub const BPF_F_PREORDER: u32 = 1 << 6;
/// Attach flag (cgroup multi-program API, same kernels): with no relative program, put
/// this one first in its cgroup's list.
pub const BPF_F_BEFORE: u32 = 1 << 3;

#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    relative_fd: u32,
    _pad: u32,
    expected_revision: u64,
}

#[repr(C)]
#[derive(Default)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

#[repr(C)]
#[derive(Default)]
struct LinkDetachAttr {
    link_fd: u32,
    _pad: [u32; 3],
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: attr is a properly sized, zero-padded bpf_attr prefix for `cmd`.
    let rc =
        unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T as *mut libc::c_void, std::mem::size_of::<T>()) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Opens a pinned bpf object (link, map or program).
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = ObjAttr { pathname: c.as_ptr() as u64, ..Default::default() };
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a fresh fd we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Creates a link attaching `prog` to `target` (a cgroup) with `flags`.
pub fn link_create(prog: BorrowedFd<'_>, target: BorrowedFd<'_>, attach_type: u32, flags: u32) -> io::Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: target.as_raw_fd() as u32,
        attach_type,
        flags,
        ..Default::default()
    };
    let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: the kernel returned a fresh fd we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Pins a bpf object (here, a link) at `path` on bpffs.
pub fn obj_pin(fd: &impl AsRawFd, path: &Path) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = ObjAttr { pathname: c.as_ptr() as u64, bpf_fd: fd.as_raw_fd() as u32, ..Default::default() };
    bpf(BPF_OBJ_PIN, &mut attr).map(|_| ())
}

/// Swaps the program of the link pinned at `path` for `prog` in one step (no moment with
/// no program attached).
pub fn link_update_pinned(path: &Path, prog: BorrowedFd<'_>) -> io::Result<()> {
    let link = obj_get(path)?;
    let mut attr =
        LinkUpdateAttr { link_fd: link.as_raw_fd() as u32, new_prog_fd: prog.as_raw_fd() as u32, ..Default::default() };
    bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

/// Detaches a link now, whoever else holds an fd to it.
pub fn link_detach(fd: &impl AsRawFd) -> io::Result<()> {
    let mut attr = LinkDetachAttr { link_fd: fd.as_raw_fd() as u32, ..Default::default() };
    bpf(BPF_LINK_DETACH, &mut attr).map(|_| ())
}

/// Detaches the link pinned at `path` and removes the pin. Missing pins are fine.
pub fn detach_pinned(path: &Path) -> io::Result<()> {
    match obj_get(path) {
        Ok(fd) => {
            // A link whose target is already gone (netns deleted) reports ENOLINK/EINVAL.
            let _ = link_detach(&fd);
            std::fs::remove_file(path)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}
