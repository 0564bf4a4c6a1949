//! Sockets made inside a pod's network namespace, all carrying the proxy mark so the
//! capture programs never capture the proxy's own traffic.
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsFd;

use nix::sys::socket::{setsockopt, sockopt};
use tokio::net::TcpSocket;
use ztunnel_common::PROXY_MARK;

use crate::netns::InpodNetns;

/// Source address for connections the inbound path makes to the app (as Istio does), so
/// the inbound steering program recognises and skips them.
pub const INBOUND_SOURCE_V4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);

/// An unconnected TCP socket in the pod's netns, of `dst`'s family, carrying `mark`.
pub fn marked_socket(netns: &InpodNetns, dst: SocketAddr, mark: u32) -> std::io::Result<TcpSocket> {
    let sock = netns.run(|| if dst.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() })??;
    setsockopt(&sock.as_fd(), sockopt::Mark, &mark).map_err(std::io::Error::from)?;
    sock.set_nodelay(true)?;
    Ok(sock)
}

/// An unconnected, marked TCP socket in the pod's netns, ready to dial `dst`.
pub fn upstream_socket(netns: &InpodNetns, dst: SocketAddr, bind: Option<IpAddr>) -> std::io::Result<TcpSocket> {
    let sock = marked_socket(netns, dst, PROXY_MARK)?;
    if let Some(ip) = bind {
        sock.bind(SocketAddr::new(ip, 0))?;
    }
    Ok(sock)
}

/// A marked listener in the pod's netns. `[::]` listeners accept IPv4 too.
pub fn listener(netns: &InpodNetns, addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let sock = netns.run(|| socket2_like(addr))??;
    Ok(sock)
}

fn socket2_like(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use nix::sys::socket::{bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage};
    let family = if addr.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK, None)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    setsockopt(&fd, sockopt::Mark, &PROXY_MARK)?;
    if addr.is_ipv6() {
        setsockopt(&fd, sockopt::Ipv6V6Only, &false)?;
    }
    bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrStorage::from(addr))?;
    listen(&fd, Backlog::new(1024).unwrap_or(Backlog::MAXCONN))?;
    Ok(std::net::TcpListener::from(fd))
}

/// Connects to `dst` from inside the pod (optionally from `bind`), marked, with a timeout.
pub async fn dial(netns: &InpodNetns, dst: SocketAddr, bind: Option<IpAddr>) -> std::io::Result<tokio::net::TcpStream> {
    connect(upstream_socket(netns, dst, bind)?, dst).await
}

/// Connects `sock` to `dst`, giving up after 10 s.
pub async fn connect(sock: TcpSocket, dst: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    tokio::time::timeout(std::time::Duration::from_secs(10), sock.connect(dst))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
}

/// Makes dropping the socket send RST instead of FIN (how a denied plaintext connection
/// is refused).
pub fn reset(stream: tokio::net::TcpStream) {
    let _ = stream.set_zero_linger();
}
