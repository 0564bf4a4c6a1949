//! The sockmap shortcut on a live kernel: both in-pod legs (app to the proxy's 15001, the
//! proxy to the app) are paired and carry bytes past the loopback TCP stack, intact at every
//! size from 1 byte to 16 MiB with half-close and reset passed on; many connections at
//! once; the kill switch flipped under load completes every connection; a full map falls
//! back without dropping; and no entry outlives its socket.
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use mesh_tests::mesh::{sweep_pins, workload_yaml, write_mesh_config, MeshNode};
use mesh_tests::{Cluster, InNetns, Pod};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(10);
const ECHO_PORT: u16 = 9000;

/// Two nodes, `client` on node 0 and `server` (running an echo server) on node 1, both
/// agents with the shortcut on.
struct Mesh {
    _c: Cluster,
    n0: MeshNode,
    n1: MeshNode,
    client: Pod,
    server: Pod,
}

fn mesh(max_sockets: u32) -> Mesh {
    sweep_pins();
    let mut c = Cluster::new(2).expect("mini-cluster (needs root)");
    let client = c.add_pod(0, "client").unwrap();
    let server = c.add_pod(1, "server").unwrap();
    let n0 = MeshNode::start_with_shortcut(&c, 0, max_sockets).unwrap();
    let n1 = MeshNode::start_with_shortcut(&c, 1, max_sockets).unwrap();
    let yaml = format!(
        "workloads:\n{}{}",
        workload_yaml(&client, "default", "client", ""),
        workload_yaml(&server, "default", "server", "")
    );
    write_mesh_config(&c, &yaml, &[&n0, &n1]).unwrap();
    n0.enroll(&client).unwrap();
    n1.enroll(&server).unwrap();
    let listener = server.run(|| TcpListener::bind(("::", ECHO_PORT))).unwrap();
    thread::spawn(move || echo(listener));
    Mesh { _c: c, n0, n1, client, server }
}

/// Echoes every connection until its client half-closes, then half-closes back. Like an
/// event-loop server, it reads and writes non-blocking and waits in poll(2); a plain
/// read/write loop, since `std::io::copy` between sockets uses splice(2). (Both matter on a
/// shortcut socket: see "Sockmap shortcut" in docs/decisions.md.)
fn echo(listener: TcpListener) {
    for conn in listener.incoming().flatten() {
        thread::spawn(move || {
            conn.set_nonblocking(true).unwrap();
            let mut s = conn;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match read_polled(&mut s, &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if write_all_polled(&mut s, &buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = s.shutdown(Shutdown::Write);
        });
    }
}

/// Waits (up to `WAIT`) until `s` is readable or writable, as `events` asks.
fn wait_for(s: &TcpStream, events: i16) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd { fd: s.as_raw_fd(), events, revents: 0 };
    // SAFETY: one valid pollfd.
    match unsafe { libc::poll(&mut p, 1, WAIT.as_millis() as i32) } {
        0 => Err(std::io::ErrorKind::TimedOut.into()),
        n if n < 0 => Err(std::io::Error::last_os_error()),
        _ => Ok(()),
    }
}

/// One read on a non-blocking socket, waiting in poll(2) while there is nothing to read.
fn read_polled(s: &mut TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match s.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => wait_for(s, libc::POLLIN)?,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            r => return r,
        }
    }
}

/// Writes all of `data` to a non-blocking socket, waiting in poll(2) while it is full.
fn write_all_polled(s: &mut TcpStream, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        match s.write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => wait_for(s, libc::POLLOUT)?,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Mesh {
    fn dst(&self) -> SocketAddr {
        SocketAddr::new(self.server.ip4().into(), ECHO_PORT)
    }

    /// A non-blocking connection from `client` to the echo server.
    fn connect(&self) -> TcpStream {
        let dst = self.dst();
        let s = self.client.run(move || TcpStream::connect_timeout(&dst, WAIT)).unwrap();
        s.set_nonblocking(true).unwrap();
        s
    }

    /// `GET /shortcut` (or `POST` with `enabled`) on node `n`'s admin port.
    fn shortcut(&self, n: usize, enabled: Option<bool>) -> Value {
        let node = if n == 0 { &self.n0 } else { &self.n1 };
        let admin = node.agent().admin().expect("admin").admin_addr;
        let (method, path) = match enabled {
            Some(on) => ("POST", format!("/shortcut?enabled={on}")),
            None => ("GET", "/shortcut".to_string()),
        };
        let mut s = TcpStream::connect_timeout(&admin, WAIT).unwrap();
        write!(s, "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{out}");
        serde_json::from_str(body.trim()).unwrap_or_else(|e| panic!("{e}: {body}"))
    }

    fn count(&self, n: usize, what: &str) -> u64 {
        self.shortcut(n, None)[what].as_u64().unwrap_or_else(|| panic!("no {what}"))
    }

    /// Waits until neither agent tracks a socket (every closed socket left the maps).
    fn wait_untracked(&self) {
        let deadline = Instant::now() + WAIT;
        while self.count(0, "trackedSockets") + self.count(1, "trackedSockets") > 0 {
            assert!(
                Instant::now() < deadline,
                "entries outlived their sockets: {} / {}",
                self.shortcut(0, None),
                self.shortcut(1, None)
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Deterministic pseudo-random bytes (xorshift), different per `seed`.
fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Sends `data` in one thread (then half-closes) while reading the echo to EOF in this one.
fn round_trip(s: TcpStream, data: Vec<u8>) -> Vec<u8> {
    let mut w = s.try_clone().unwrap();
    let writer = thread::spawn(move || {
        for chunk in data.chunks(61 * 1024 + 17) {
            write_all_polled(&mut w, chunk).unwrap();
        }
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut back = Vec::new();
    let mut r = s;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match read_polled(&mut r, &mut buf).unwrap() {
            0 => break,
            n => back.extend_from_slice(&buf[..n]),
        }
    }
    writer.join().unwrap();
    back
}

#[test]
fn shortcut_pairs_both_legs_on_both_nodes_and_redirects() {
    let m = mesh(1024);
    let back = round_trip(m.connect(), b"hello through the shortcut".to_vec());
    assert_eq!(back, b"hello through the shortcut");
    for n in [0, 1] {
        let r = m.shortcut(n, None);
        assert_eq!((r["installed"].as_bool(), r["enabled"].as_bool()), (Some(true), Some(true)), "{r}");
        // Node 0: the app and the proxy's 15001 socket; node 1: the proxy's dial and the app.
        assert!(r["paired"].as_u64().unwrap() >= 2, "node {n}: {r}");
        assert!(r["redirected"].as_u64().unwrap() >= 1, "node {n}: {r}");
    }
    let metrics = m.n0.agent().metrics().encode();
    let redirected = metrics
        .lines()
        .find(|l| l.starts_with("ztunnel_sockmap_shortcut_events_total{event=\"redirected\"}"))
        .unwrap_or_else(|| panic!("no redirected series:\n{metrics}"));
    assert!(!redirected.ends_with(" 0"), "{redirected}");
    m.wait_untracked();
}

#[test]
fn payloads_from_1_byte_to_16_mib_cross_the_shortcut_intact_with_half_close() {
    let m = mesh(1024);
    let before = m.count(0, "redirected") + m.count(1, "redirected");
    for (i, len) in [1usize, 2, 1000, 16 * 1024, 65536 + 7, 1024 * 1024 + 3, 16 * 1024 * 1024].into_iter().enumerate() {
        let data = payload(len, i as u64 + 1);
        let back = round_trip(m.connect(), data.clone());
        assert_eq!(back.len(), len, "{len}-byte payload came back as {} bytes", back.len());
        assert!(back == data, "{len}-byte payload came back corrupted");
    }
    let after = m.count(0, "redirected") + m.count(1, "redirected");
    assert!(after - before >= 14, "sends did not take the shortcut: {before} -> {after}");
    let r0 = m.shortcut(0, None);
    assert_eq!(r0["redirectFailed"].as_u64(), Some(0), "{r0}");
    m.wait_untracked();
}

#[test]
fn sixty_four_concurrent_connections_arrive_checksummed() {
    let m = mesh(1024);
    let conns: Vec<TcpStream> = (0..64).map(|_| m.connect()).collect();
    let workers: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            thread::spawn(move || {
                let data = payload(200 * 1024 + i, 1000 + i as u64);
                let back = round_trip(s, data.clone());
                back == data
            })
        })
        .collect();
    let ok = workers.into_iter().map(|w| w.join().unwrap()).filter(|ok| *ok).count();
    assert_eq!(ok, 64, "some connections came back wrong");
    assert!(m.count(0, "paired") >= 128, "{}", m.shortcut(0, None));
    m.wait_untracked();
}

#[test]
fn a_reset_from_the_app_reaches_the_client_across_the_shortcut() {
    let m = mesh(1024);
    // An app that reads one line and resets (SO_LINGER 0) instead of answering.
    let listener = m.server.run(|| TcpListener::bind(("::", 9001))).unwrap();
    thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            let mut b = [0u8; 8];
            let _ = s.read(&mut b);
            let linger = libc::linger { l_onoff: 1, l_linger: 0 };
            // SAFETY: setsockopt on a socket we own, with a correctly sized value.
            unsafe {
                use std::os::fd::AsRawFd;
                let len = std::mem::size_of::<libc::linger>() as libc::socklen_t;
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&linger as *const libc::linger).cast(),
                    len,
                );
            }
        }
    });
    let dst = SocketAddr::new(m.server.ip4().into(), 9001);
    let mut s = m.client.run(move || TcpStream::connect_timeout(&dst, WAIT)).unwrap();
    s.set_nonblocking(true).unwrap();
    write_all_polled(&mut s, b"bye\n").unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 16];
    let ended = match read_polled(&mut s, &mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::TimedOut,
    };
    assert!(ended && started.elapsed() < WAIT, "the client's connection outlived the app's reset");
    drop(s);
    m.wait_untracked();
}

#[test]
fn the_kill_switch_under_load_completes_every_connection() {
    let m = mesh(1024);
    // 16 connections, each streaming 8 MiB in pieces while the switch flips off mid-way.
    let workers: Vec<_> = (0..16)
        .map(|i| {
            let s = m.connect();
            thread::spawn(move || {
                let data = payload(8 * 1024 * 1024, 77 + i);
                round_trip(s, data.clone()) == data
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(150));
    for n in [0, 1] {
        let r = m.shortcut(n, Some(false));
        assert_eq!(r["enabled"].as_bool(), Some(false), "{r}");
    }
    let ok = workers.into_iter().map(|w| w.join().unwrap()).filter(|ok| *ok).count();
    assert_eq!(ok, 16, "connections in flight when the switch flipped did not complete intact");
    let switched = m.count(0, "switchedOff") + m.count(1, "switchedOff");
    assert!(switched > 0, "no send saw the switch off: {} {}", m.shortcut(0, None), m.shortcut(1, None));
    // Off: new connections are not paired, and still work.
    let paired = m.count(0, "paired");
    assert_eq!(round_trip(m.connect(), b"after".to_vec()), b"after");
    assert_eq!(m.count(0, "paired"), paired, "a socket was paired with the switch off");
    // On again: new connections are paired again, without a restart.
    m.shortcut(0, Some(true));
    assert_eq!(round_trip(m.connect(), b"again".to_vec()), b"again");
    assert!(m.count(0, "paired") > paired, "{}", m.shortcut(0, None));
    m.wait_untracked();
}

#[test]
fn a_full_map_falls_back_to_tcp_without_dropping() {
    // Room for one leg's two sockets: the rest of 8 concurrent connections cannot be tracked.
    let m = mesh(2);
    let conns: Vec<TcpStream> = (0..8).map(|_| m.connect()).collect();
    let workers: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            thread::spawn(move || round_trip(s, payload(300 * 1024, i as u64 + 5)) == payload(300 * 1024, i as u64 + 5))
        })
        .collect();
    let ok = workers.into_iter().map(|w| w.join().unwrap()).filter(|ok| *ok).count();
    assert_eq!(ok, 8, "a connection was lost when the shortcut's map was full");
    let full = m.count(0, "mapFull") + m.count(1, "mapFull");
    assert!(full > 0, "the map never filled: {} {}", m.shortcut(0, None), m.shortcut(1, None));
    m.wait_untracked();
}

/// An app's own loopback traffic (to a local cache or a helper process in the pod) is not a
/// proxy leg: the shortcut must not pair it, or any app could fill the socket map and push
/// the mesh's own legs off the shortcut. Holds for IPv4 and IPv6 loopback.
#[test]
fn the_apps_own_loopback_connections_are_not_paired() {
    let m = mesh(1024);
    let before = m.count(0, "paired");
    for host in ["127.0.0.1", "::1"] {
        let open = m
            .client
            .run(move || -> std::io::Result<(TcpStream, TcpStream)> {
                let l = TcpListener::bind((host, 0))?;
                let c = TcpStream::connect_timeout(&l.local_addr()?, WAIT)?;
                let (s, _) = l.accept()?;
                Ok((c, s))
            })
            .unwrap_or_else(|e| panic!("loopback pair on {host}: {e}"));
        let (mut c, mut s) = open;
        c.write_all(b"local").unwrap();
        let mut got = [0u8; 5];
        s.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"local");
        // Both ends are open now: a paired one would be in the map.
        let r = m.shortcut(0, None);
        assert_eq!(r["trackedSockets"].as_u64(), Some(0), "{host}: the app's own connection is tracked: {r}");
    }
    assert_eq!(m.count(0, "paired"), before, "an app's loopback connection was paired: {}", m.shortcut(0, None));
    // The mesh's own legs are still paired.
    assert_eq!(round_trip(m.connect(), b"mesh".to_vec()), b"mesh");
    assert!(m.count(0, "paired") > before, "{}", m.shortcut(0, None));
    m.wait_untracked();
}

/// The byte at offset `i` of the stream `a_destination_that_stops_reading_...` sends.
fn stream_byte(i: usize) -> u8 {
    (i as u8).wrapping_mul(31) ^ (i >> 16) as u8
}

/// A connection from the client pod to a new app on `port` of the server pod that accepts
/// and does not read; the app's socket arrives on the receiver when accepted.
fn connect_to_an_app_that_does_not_read(m: &Mesh, port: u16) -> (TcpStream, std::sync::mpsc::Receiver<TcpStream>) {
    let listener = m.server.run(move || TcpListener::bind(("::", port))).unwrap();
    let (held_tx, held) = std::sync::mpsc::channel();
    thread::spawn(move || {
        if let Ok((s, _)) = listener.accept() {
            let _ = held_tx.send(s);
        }
    });
    let dst = SocketAddr::new(m.server.ip4().into(), port);
    (m.client.run(move || TcpStream::connect_timeout(&dst, WAIT)).unwrap(), held)
}

/// The kernel charges redirected bytes to no receive buffer: without the queue limit, a
/// destination app that stops reading let its client queue without end (1.5 GB here, then
/// the connection broke as the node's TCP memory ran out). With it, the client is pushed
/// back as over TCP, and every byte still arrives, in order, once the app reads again.
#[test]
fn a_destination_that_stops_reading_pushes_its_client_back_and_loses_nothing() {
    let m = mesh(1024);
    let (mut s, held) = connect_to_an_app_that_does_not_read(&m, 9002);
    s.set_nonblocking(true).unwrap();
    // Write until the socket takes nothing more for 2 s (or far past any sane bound).
    const CAP: usize = 1 << 30;
    let mut chunk = vec![0u8; 256 * 1024];
    let mut total = 0usize;
    let mut last_progress = Instant::now();
    while total < CAP && last_progress.elapsed() < Duration::from_secs(2) {
        for (j, b) in chunk.iter_mut().enumerate() {
            *b = stream_byte(total + j);
        }
        match s.write(&chunk) {
            Ok(n) => {
                total += n;
                last_progress = Instant::now();
                // Partial write: the next chunk restarts at the new offset.
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("write failed after {total} bytes: {e}"),
        }
    }
    eprintln!("an app that reads nothing held {} KiB", total >> 10);
    // About 18 MiB here: TCP's and HTTP/2's buffers on the way, plus at most 4 MiB per leg.
    assert!(total < 48 << 20, "the client queued {} MiB at an app that reads nothing", total >> 20);
    // Both legs were held back: the proxy's into the app that stopped (node 1), and the
    // client app's into its proxy once the tunnel's window was full (node 0).
    for n in [0, 1] {
        assert!(m.count(n, "queueLimit") > 0, "node {n} queued without limit: {}", m.shortcut(n, None));
    }
    // The app reads again: every byte arrives, in order.
    s.shutdown(Shutdown::Write).unwrap();
    let mut app = held.recv_timeout(WAIT).expect("the app never got the connection");
    app.set_nonblocking(true).unwrap();
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0usize;
    loop {
        match read_polled(&mut app, &mut buf).unwrap() {
            0 => break,
            n => {
                let bad = (0..n).find(|&j| buf[j] != stream_byte(got + j));
                assert!(bad.is_none(), "byte {} arrived wrong", got + bad.unwrap());
                got += n;
            }
        }
    }
    assert_eq!(got, total, "the app got {got} of the {total} bytes sent");
    drop((s, app));
    m.wait_untracked();
}

/// A connect from 127.0.0.6 (the inbound proxy's address) inside the pod, with TCP Fast Open
/// on and `data` in the SYN when the kernel has a cookie; returns the connected socket.
fn fast_open_connect(pod: &Pod, port: u16, data: &'static [u8]) -> TcpStream {
    pod.run(move || -> std::io::Result<TcpStream> {
        use std::os::fd::{AsRawFd, FromRawFd};
        // SAFETY: a fresh socket we own; options and addresses with correctly sized values.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let s = TcpStream::from_raw_fd(fd);
            let on: libc::c_int = 1;
            let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            if libc::setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_FASTOPEN_CONNECT, (&on as *const i32).cast(), len) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            let sin = |ip: [u8; 4], port: u16| libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: port.to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(ip) },
                sin_zero: [0; 8],
            };
            let slen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            let src = sin([127, 0, 0, 6], 0);
            if libc::bind(fd, (&src as *const libc::sockaddr_in).cast(), slen) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let dst = sin([127, 0, 0, 1], port);
            if libc::connect(s.as_raw_fd(), (&dst as *const libc::sockaddr_in).cast(), slen) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // With TCP_FASTOPEN_CONNECT the connect is deferred: this write sends the SYN.
            let mut w = &s;
            w.write_all(data)?;
            Ok(s)
        }
    })
    .expect("fast-open connect")
}

/// Bytes a proxy sends in its SYN (TCP Fast Open) reach the app by TCP before the socket can
/// be tracked; if it were paired then, its next send would be redirected and read first (the
/// redirected queue is drained before TCP's). Such a socket stays on TCP (`tcpData`), and
/// the app reads the bytes in the order they were sent.
#[test]
fn a_proxy_socket_that_sent_data_in_its_syn_is_not_paired_and_keeps_its_order() {
    let m = mesh(1024);
    let listener = m
        .server
        .run(|| -> std::io::Result<TcpListener> {
            std::fs::write("/proc/sys/net/ipv4/tcp_fastopen", "3")?;
            let l = TcpListener::bind(("127.0.0.1", 9010))?;
            use std::os::fd::AsRawFd;
            let qlen: libc::c_int = 16;
            let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: setsockopt on a listener we own, with a correctly sized value.
            if unsafe {
                libc::setsockopt(
                    l.as_raw_fd(),
                    libc::IPPROTO_TCP,
                    libc::TCP_FASTOPEN,
                    (&qlen as *const i32).cast(),
                    len,
                )
            } != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(l)
        })
        .expect("fast-open listener in the server pod");
    // The first connection fetches the cookie (its SYN carries none of the data).
    drop(fast_open_connect(&m.server, 9010, b"cookie"));
    let (mut first, _) = listener.accept().unwrap();
    let mut sink = Vec::new();
    first.read_to_end(&mut sink).unwrap();
    drop(first);
    let before = m.count(1, "tcpData");
    // The second sends "first-" in its SYN, then "second" once the handshake is done; the
    // app reads only after both were sent.
    let mut s = fast_open_connect(&m.server, 9010, b"first-");
    thread::sleep(Duration::from_millis(100));
    s.write_all(b"second").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    thread::sleep(Duration::from_millis(100));
    let (mut app, _) = listener.accept().unwrap();
    app.set_nonblocking(true).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    loop {
        match read_polled(&mut app, &mut buf).unwrap() {
            0 => break,
            n => got.extend_from_slice(&buf[..n]),
        }
    }
    assert_eq!(String::from_utf8_lossy(&got), "first-second", "the app read the proxy's bytes out of order");
    assert!(m.count(1, "tcpData") > before, "the SYN's data was not seen: {}", m.shortcut(1, None));
    drop((s, app));
    m.wait_untracked();
}

/// A socket's close callback (which removes its state) is a flag any other `sock_ops`
/// program on the cgroup can clear; state left that way would fill the maps until nothing
/// could be paired. The sweeper removes entries whose socket is no longer in the sockhash
/// and keeps those of live connections, which stay on the shortcut.
#[test]
fn state_left_by_sockets_that_are_gone_is_swept_and_live_connections_keep_the_shortcut() {
    use aya::maps::{HashMap, MapData};
    use ztunnel_common::ShortcutKey;
    let m = mesh(1024);
    // The agent sweeps on a thread of its own every 30 s; this test calls the same sweep.
    let threads: Vec<String> = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .collect();
    assert!(
        threads.iter().any(|c| c.trim() == "ztunnel-shortcu"),
        "no sweeper thread (ztunnel-shortcut-sweep) runs: {threads:?}"
    );
    let mut live = m.connect();
    write_all_polled(&mut live, b"ping").unwrap();
    let mut buf = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        got += read_polled(&mut live, &mut buf[got..]).unwrap();
    }
    assert_eq!(m.count(0, "trackedSockets"), 2, "{}", m.shortcut(0, None));
    // Entries of a socket that closed without its callback (a key no socket has).
    let capture = m.n0.agent().capture();
    let maps = capture.pin_dir().join("maps");
    let stale = ShortcutKey { netns_cookie: 1, local_port: 1, remote_port: 2, ..Default::default() };
    let mut state: HashMap<MapData, ShortcutKey, u32> =
        HashMap::try_from(aya::maps::Map::HashMap(MapData::from_pin(maps.join("SHORTCUT_STATE")).unwrap())).unwrap();
    state.insert(stale, 1, 0).unwrap();
    let mut queue: HashMap<MapData, ShortcutKey, u64> =
        HashMap::try_from(aya::maps::Map::HashMap(MapData::from_pin(maps.join("SHORTCUT_QUEUE")).unwrap())).unwrap();
    queue.insert(stale, 0, 0).unwrap();
    assert_eq!(m.count(0, "trackedSockets"), 3);
    assert_eq!(capture.sweep_shortcut().unwrap(), 1, "not exactly the stale socket's entries were swept");
    assert!(state.get(&stale, 0).is_err() && queue.get(&stale, 0).is_err(), "stale entries left");
    assert_eq!(m.count(0, "trackedSockets"), 2, "a live socket's state was swept");
    // The live connection still takes the shortcut.
    let redirected = m.count(0, "redirected");
    write_all_polled(&mut live, b"pong").unwrap();
    got = 0;
    while got < 4 {
        got += read_polled(&mut live, &mut buf[got..]).unwrap();
    }
    assert_eq!(&buf, b"pong");
    assert!(m.count(0, "redirected") > redirected, "{}", m.shortcut(0, None));
    drop(live);
    m.wait_untracked();
}

/// Each redirected send is queued by the kernel as a record of its own (about 1 KiB of slab,
/// charged nowhere) whatever its size, so the limit counts sends as well as bytes: an app
/// writing 1-byte messages to a peer that does not read is held back after a few thousand,
/// not after 4 Mi of them (about 4 GiB of kernel memory).
#[test]
fn tiny_sends_to_a_peer_that_does_not_read_meet_the_limit_after_a_few_thousand() {
    let m = mesh(1024);
    let (mut s, held) = connect_to_an_app_that_does_not_read(&m, 9003);
    s.set_nodelay(true).unwrap();
    let before = m.count(0, "queueLimit") + m.count(1, "queueLimit");
    let mut sends = 0u32;
    while m.count(0, "queueLimit") + m.count(1, "queueLimit") == before {
        for _ in 0..512 {
            s.write_all(b"x").unwrap();
        }
        sends += 512;
        assert!(sends <= 16 * 1024, "{sends} one-byte sends queued with no limit: {}", m.shortcut(0, None));
    }
    eprintln!("held back after {sends} one-byte sends");
    let app = held.recv_timeout(WAIT);
    drop((s, app));
    m.wait_untracked();
}
