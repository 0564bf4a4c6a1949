//! Test helper, run inside a pod as an app would be: connects to `<addr>` with `SO_MARK`
//! set to `<mark>` (the mark the node agent's own sockets carry), sends one line and prints
//! the reply. Tests use it to check that an app cannot skip capture by copying the mark.
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;

use nix::sys::socket::{connect, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrStorage};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(addr), Some(mark)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: marked_client <ip:port> <mark>");
        std::process::exit(2);
    };
    let dst: SocketAddr = addr.parse().expect("ip:port");
    let mark: u32 = mark.parse().expect("mark");
    let family = if dst.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).expect("socket");
    setsockopt(&fd, sockopt::Mark, &mark).expect("SO_MARK (needs CAP_NET_ADMIN or CAP_NET_RAW)");
    connect(fd.as_raw_fd(), &SockaddrStorage::from(dst)).expect("connect");
    let s = TcpStream::from(fd);
    (&s).write_all(b"marked\n").expect("write");
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).expect("read");
    print!("{line}");
}
