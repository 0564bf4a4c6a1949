//! A tiny packet sniffer for tests that assert on what crosses the wire: an `AF_PACKET`
//! socket opened inside a node's netns records frames while traffic flows.
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::{InNetns, Node};

/// Frames captured on every interface of a namespace.
pub struct Capture {
    pub frames: Vec<Vec<u8>>,
}

impl Capture {
    /// Whether any frame contains `needle`.
    pub fn contains(&self, needle: &[u8]) -> bool {
        self.frames.iter().any(|f| f.windows(needle.len()).any(|w| w == needle))
    }

    /// Frames whose TCP source or destination port is `port` (IPv4 or IPv6, Ethernet).
    pub fn tcp_payloads(&self, port: u16) -> Vec<&[u8]> {
        self.frames.iter().filter_map(|f| tcp_payload(f, port)).filter(|p| !p.is_empty()).collect()
    }
}

fn tcp_payload(f: &[u8], port: u16) -> Option<&[u8]> {
    let ethertype = u16::from_be_bytes([*f.get(12)?, *f.get(13)?]);
    let (l4, proto) = match ethertype {
        0x0800 => {
            let ihl = (f.get(14)? & 0x0f) as usize * 4;
            (14 + ihl, *f.get(14 + 9)?)
        }
        0x86dd => (14 + 40, *f.get(14 + 6)?),
        _ => return None,
    };
    if proto != 6 {
        return None;
    }
    let sport = u16::from_be_bytes([*f.get(l4)?, *f.get(l4 + 1)?]);
    let dport = u16::from_be_bytes([*f.get(l4 + 2)?, *f.get(l4 + 3)?]);
    if sport != port && dport != port {
        return None;
    }
    let off = ((f.get(l4 + 12)? >> 4) as usize) * 4;
    f.get(l4 + off..)
}

/// Records frames in `node`'s netns while `traffic` runs (plus a short tail).
pub fn sniff<R>(node: &Node, traffic: impl FnOnce() -> R) -> Result<(Capture, R)> {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let handle = node.spawn_thread(move || -> Vec<Vec<u8>> {
        // SAFETY: plain socket syscalls on fds we own.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, (libc::ETH_P_ALL as u16).to_be() as i32) };
        if fd < 0 {
            let _ = ready_tx.send(Err(std::io::Error::last_os_error().to_string()));
            return vec![];
        }
        let tv = libc::timeval { tv_sec: 0, tv_usec: 50_000 };
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        let _ = ready_tx.send(Ok(()));
        let mut frames = vec![];
        let mut buf = vec![0u8; 65536];
        let mut stop_at: Option<Instant> = None;
        loop {
            if stop_at.is_none() && rx.try_recv().is_ok() {
                stop_at = Some(Instant::now() + Duration::from_millis(200));
            }
            if stop_at.is_some_and(|t| Instant::now() > t) {
                break;
            }
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n > 0 {
                frames.push(buf[..n as usize].to_vec());
            }
        }
        unsafe { libc::close(fd) };
        frames
    });
    if let Err(e) = ready_rx.recv()? {
        bail!("packet socket: {e}");
    }
    let out = traffic();
    let _ = tx.send(());
    let frames = handle.join().map_err(|_| anyhow::anyhow!("sniffer panicked"))?;
    Ok((Capture { frames }, out))
}
