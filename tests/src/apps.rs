//! Tiny in-process apps that run inside pods: a server that tells the client which peer
//! address it saw (so a test can tell proxied from direct), and a matching client.
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::{InNetns, Pod};

/// A running peer-reporting server; stops when dropped.
pub struct PeerServer {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PeerServer {
    /// Listens on `[::]:port` (dual-stack) inside `pod`. Each connection: read one line,
    /// answer `peer=<addr> got=<line>`.
    pub fn start(pod: &Pod, port: u16) -> Result<Self> {
        let listener = pod.run(move || -> std::io::Result<TcpListener> {
            let l = TcpListener::bind(("::", port))?;
            l.set_nonblocking(true)?;
            Ok(l)
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, peer)) => {
                        std::thread::spawn(move || {
                            let _ = answer(s, peer);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(Self { stop, thread: Some(thread) })
    }
}

fn answer(s: TcpStream, peer: SocketAddr) -> std::io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line)?;
    let peer = ztunnel::proxy::canonical(peer);
    (&s).write_all(format!("peer={peer} got={}\n", line.trim_end()).as_bytes())
}

impl Drop for PeerServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What the server reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerReply {
    /// Source address the server saw.
    pub peer: SocketAddr,
    /// The line it received.
    pub got: String,
}

/// Connects from inside `pod` (so capture applies) and exchanges one line.
pub fn request(pod: &Pod, dst: SocketAddr, msg: &str) -> Result<PeerReply> {
    let msg = msg.to_string();
    pod.run(move || -> Result<PeerReply> {
        let s = TcpStream::connect_timeout(&dst, Duration::from_secs(5)).with_context(|| format!("connect {dst}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        (&s).write_all(format!("{msg}\n").as_bytes())?;
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).context("reading reply")?;
        parse_reply(&line).with_context(|| format!("bad reply {line:?} from {dst}"))
    })
}

/// Like [`request`] but from any thread already in the right namespace (e.g. a node).
pub fn request_here(dst: SocketAddr, msg: &str) -> Result<PeerReply> {
    let s = TcpStream::connect_timeout(&dst, Duration::from_secs(5)).with_context(|| format!("connect {dst}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    (&s).write_all(format!("{msg}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line)?;
    parse_reply(&line).with_context(|| format!("bad reply {line:?}"))
}

fn parse_reply(line: &str) -> Option<PeerReply> {
    let rest = line.trim_end().strip_prefix("peer=")?;
    let (peer, got) = rest.split_once(" got=")?;
    Some(PeerReply { peer: peer.parse().ok()?, got: got.to_string() })
}

/// Like [`request`], but from a chosen source address inside `pod` (e.g. one added to the
/// pod for the test) and to any destination, link-local ones included (`dst` carries the
/// scope id).
pub fn request_from(pod: &Pod, src: Option<std::net::IpAddr>, dst: SocketAddr, msg: &str) -> Result<PeerReply> {
    let msg = msg.to_string();
    pod.run(move || -> Result<PeerReply> {
        let s = connect_bound(src, dst).with_context(|| format!("connect {dst} from {src:?}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        (&s).write_all(format!("{msg}\n").as_bytes())?;
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).context("reading reply")?;
        parse_reply(&line).with_context(|| format!("bad reply {line:?} from {dst}"))
    })
}

/// A blocking TCP connection from `src` (any address when `None`) to `dst`, giving up
/// after 5 s, made in the calling thread's network namespace.
pub fn connect_bound(src: Option<std::net::IpAddr>, dst: SocketAddr) -> std::io::Result<TcpStream> {
    use nix::sys::socket::{
        bind, connect, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrStorage,
    };
    let family = if dst.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::SendTimeout, &nix::sys::time::TimeVal::new(5, 0))?;
    if let Some(ip) = src {
        use std::os::fd::AsRawFd;
        bind(fd.as_raw_fd(), &SockaddrStorage::from(SocketAddr::new(ip, 0)))?;
    }
    use std::os::fd::AsRawFd;
    connect(fd.as_raw_fd(), &SockaddrStorage::from(dst))?;
    Ok(TcpStream::from(fd))
}

/// An open echo connection from inside a pod: proves bytes flow, then can be watched for a
/// policy change cutting it.
pub struct OpenEcho(pub TcpStream);

impl OpenEcho {
    /// Connects from `pod` to an echo server at `dst` and checks one round trip.
    pub fn new(pod: &Pod, dst: SocketAddr) -> std::io::Result<OpenEcho> {
        let wait = std::time::Duration::from_secs(5);
        let s = pod.run(move || TcpStream::connect_timeout(&dst, wait))?;
        s.set_read_timeout(Some(wait))?;
        let mut o = OpenEcho(s);
        o.0.write_all(b"E")?;
        o.ping()?;
        Ok(o)
    }

    /// One echoed round trip.
    pub fn ping(&mut self) -> std::io::Result<()> {
        self.0.write_all(b"ping")?;
        let mut buf = [0u8; 4];
        self.0.read_exact(&mut buf)?;
        assert_eq!(&buf, b"ping");
        Ok(())
    }

    /// True when the connection ends (EOF or reset) within the read timeout.
    pub fn is_cut(&mut self) -> bool {
        let _ = self.0.write_all(b"ping");
        let mut buf = [0u8; 4];
        match self.0.read(&mut buf) {
            Ok(0) => true,
            Ok(_) => self.is_cut(),
            Err(e) => !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
        }
    }
}
