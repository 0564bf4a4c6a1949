//! The two raw bpf(2) commands aya 0.14 does not expose on a pinned link: open a pin and
//! detach a link explicitly. Explicit detach matters because a forked child can hold copies
//! of a link fd, so dropping our copy does not guarantee the program is gone.
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_DETACH: libc::c_long = 34;

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
