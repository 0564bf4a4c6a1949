//! Test helper: tries to connect to a unix `SOCK_SEQPACKET` socket (the agent's enrollment
//! or handoff socket) and exits 0 if it could, 1 if not, printing why. Tests run it as
//! another user to check that only the agent's user can reach those sockets.
use std::os::fd::AsRawFd;

use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};

fn main() {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: uds_probe <socket path>");
        std::process::exit(2);
    };
    let result = socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None)
        .and_then(|fd| UnixAddr::new(path.as_str()).and_then(|addr| connect(fd.as_raw_fd(), &addr)));
    match result {
        Ok(()) => println!("connected"),
        Err(e) => {
            println!("refused: {e}");
            std::process::exit(1);
        }
    }
}
