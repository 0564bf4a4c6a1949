//! A stand-in for a CNI's socket load balancer (Cilium's `socketLB`, Calico eBPF's
//! connect-time load balancing): a `connect4` program at a cgroup that rewrites one service
//! VIP:port to a backend address, as those do for every service. Capture must still see the
//! VIP, whichever of the two was attached first; tests attach this one to prove it.
//!
//! The program is ten instructions assembled here and loaded with raw bpf(2), so it is
//! exactly the foreign program the test means and nothing of ours. Dropping it detaches it
//! (the link is never pinned, so a crashed test detaches it too).
use std::net::SocketAddrV4;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use anyhow::{bail, Context, Result};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const BPF_CGROUP_INET4_CONNECT: u32 = 10;
/// Offsets in `struct bpf_sock_addr`.
const USER_IP4: i16 = 4;
const USER_PORT: i16 = 24;

/// One eBPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn { code, regs: (src << 4) | dst, off, imm }
}

/// `dst = *(u32 *)(src + off)`
const fn ldx_w(dst: u8, src: u8, off: i16) -> Insn {
    insn(0x61, dst, src, off, 0)
}
/// `*(u32 *)(dst + off) = src`
const fn stx_w(dst: u8, src: u8, off: i16) -> Insn {
    insn(0x63, dst, src, off, 0)
}
/// `if (u32)dst != imm goto +off`
const fn jne32(dst: u8, imm: i32, off: i16) -> Insn {
    insn(0x56, dst, 0, off, imm)
}
/// `(u32)dst = imm`
const fn mov32(dst: u8, imm: i32) -> Insn {
    insn(0xb4, dst, 0, 0, imm)
}
/// `dst = imm`
const fn mov64(dst: u8, imm: i32) -> Insn {
    insn(0xb7, dst, 0, 0, imm)
}
const EXIT: Insn = insn(0x95, 0, 0, 0, 0);

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    _rest: [u64; 2],
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<OwnedFd> {
    // SAFETY: attr is a zero-padded bpf_attr prefix for `cmd`.
    let rc =
        unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T as *mut libc::c_void, std::mem::size_of::<T>()) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a fresh fd.
    Ok(unsafe { OwnedFd::from_raw_fd(rc as i32) })
}

/// A VIP-rewriting `connect4` program attached to a cgroup; detached on drop.
pub struct ForeignLb {
    _prog: OwnedFd,
    _link: OwnedFd,
}

impl ForeignLb {
    /// Attaches, the way Cilium does (a plain link, appended after what is there), a
    /// `connect4` at `cgroup` that sends every TCP or UDP connect to `vip` to `backend`.
    pub fn attach(cgroup: &Path, vip: SocketAddrV4, backend: SocketAddrV4) -> Result<Self> {
        let be32 = |ip: std::net::Ipv4Addr| u32::from_ne_bytes(ip.octets()) as i32;
        let be_port = |p: u16| u32::from(p.to_be()) as i32;
        let prog = [
            ldx_w(2, 1, USER_IP4),
            jne32(2, be32(*vip.ip()), 6),
            ldx_w(2, 1, USER_PORT),
            jne32(2, be_port(vip.port()), 4),
            mov32(3, be32(*backend.ip())),
            stx_w(1, 3, USER_IP4),
            mov32(3, be_port(backend.port())),
            stx_w(1, 3, USER_PORT),
            mov64(0, 1),
            EXIT,
        ];
        let license = c"GPL";
        let mut log = vec![0u8; 64 * 1024];
        let mut name = [0u8; 16];
        name[..9].copy_from_slice(b"foreignlb");
        let mut load = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
            insn_cnt: prog.len() as u32,
            insns: prog.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: 1,
            log_size: log.len() as u32,
            log_buf: log.as_mut_ptr() as u64,
            prog_name: name,
            expected_attach_type: BPF_CGROUP_INET4_CONNECT,
            ..Default::default()
        };
        let prog_fd = match bpf(BPF_PROG_LOAD, &mut load) {
            Ok(fd) => fd,
            Err(e) => {
                let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
                bail!("loading the foreign connect4: {e}: {}", String::from_utf8_lossy(&log[..end]));
            }
        };
        let cg = std::fs::File::open(cgroup).with_context(|| format!("open {}", cgroup.display()))?;
        let mut link = LinkCreateAttr {
            prog_fd: prog_fd.as_raw_fd() as u32,
            target_fd: cg.as_fd().as_raw_fd() as u32,
            attach_type: BPF_CGROUP_INET4_CONNECT,
            ..Default::default()
        };
        let link = bpf(BPF_LINK_CREATE, &mut link).context("attaching the foreign connect4")?;
        Ok(Self { _prog: prog_fd, _link: link })
    }
}
