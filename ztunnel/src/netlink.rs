//! The two rtnetlink requests keeping clients' addresses needs inside a pod's netns: a
//! policy rule (`ip rule add fwmark M/MASK lookup T`) and a local default route in that table
//! (`ip route add local default dev lo table T`), for both families. Written against the
//! kernel's rtnetlink ABI directly: two fixed messages do not justify a netlink stack.
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const NETLINK_ROUTE: libc::c_int = 0;
const RTM_NEWROUTE: u16 = 24;
const RTM_NEWRULE: u16 = 32;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const FR_ACT_TO_TBL: u8 = 1;
const FRA_PRIORITY: u16 = 6;
const FRA_FWMARK: u16 = 10;
const FRA_TABLE: u16 = 15;
const FRA_FWMASK: u16 = 16;
const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;
const RTPROT_BOOT: u8 = 3;
const RT_SCOPE_HOST: u8 = 254;
const RTN_LOCAL: u8 = 2;
/// The loopback device is ifindex 1 in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

/// An rtnetlink socket of the network namespace of the thread that opened it.
pub struct Rtnetlink {
    fd: OwnedFd,
    seq: u32,
}

impl Rtnetlink {
    /// Opens a socket in the calling thread's current network namespace.
    pub fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2); the fd is owned below.
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, NETLINK_ROUTE) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd we own.
        Ok(Self { fd: unsafe { OwnedFd::from_raw_fd(fd) }, seq: 0 })
    }

    /// `ip [-6] rule add priority P fwmark M/MASK lookup T` (an existing identical rule is fine).
    pub fn add_fwmark_rule(&mut self, family: u8, mark: u32, mask: u32, priority: u32, table: u32) -> io::Result<()> {
        let header = [family, 0, 0, 0, 0, 0, 0, FR_ACT_TO_TBL, 0, 0, 0, 0];
        let attrs = [(FRA_PRIORITY, priority), (FRA_FWMARK, mark), (FRA_FWMASK, mask), (FRA_TABLE, table)];
        self.request(RTM_NEWRULE, &header, &attrs)
    }

    /// `ip [-6] route add local default dev lo table T` (an existing one is fine).
    pub fn add_local_default_route(&mut self, family: u8, table: u32) -> io::Result<()> {
        let header = [family, 0, 0, 0, 0, RTPROT_BOOT, RT_SCOPE_HOST, RTN_LOCAL, 0, 0, 0, 0];
        self.request(RTM_NEWROUTE, &header, &[(RTA_TABLE, table), (RTA_OIF, LOOPBACK_IFINDEX)])
    }

    /// Sends one create request with u32 attributes and waits for its ack; EEXIST is success.
    fn request(&mut self, kind: u16, header: &[u8; 12], attrs: &[(u16, u32)]) -> io::Result<()> {
        self.seq += 1;
        let len = 16 + header.len() + attrs.len() * 8;
        let mut msg = Vec::with_capacity(len);
        msg.extend_from_slice(&(len as u32).to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL).to_ne_bytes());
        msg.extend_from_slice(&self.seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(header);
        for (t, v) in attrs {
            msg.extend_from_slice(&8u16.to_ne_bytes());
            msg.extend_from_slice(&t.to_ne_bytes());
            msg.extend_from_slice(&v.to_ne_bytes());
        }
        // SAFETY: sending a buffer we own to the kernel (a zeroed sockaddr_nl addresses it).
        let mut to: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        to.nl_family = libc::AF_NETLINK as u16;
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&to as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = [0u8; 1024];
        loop {
            // SAFETY: receiving into a buffer we own.
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let n = n as usize;
            if n < 20 {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "short netlink reply"));
            }
            let kind = u16::from_ne_bytes([buf[4], buf[5]]);
            let seq = u32::from_ne_bytes([buf[8], buf[9], buf[10], buf[11]]);
            if kind != NLMSG_ERROR || seq != self.seq {
                continue;
            }
            let err = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
            return match -err {
                0 => Ok(()),
                libc::EEXIST => Ok(()),
                e => Err(io::Error::from_raw_os_error(e)),
            };
        }
    }
}
