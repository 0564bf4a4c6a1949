//! The app sees the real client's address, as under Istio's ztunnel, with no iptables. The
//! inbound paths (HBONE and plaintext) dial the app from the client's own IP: a transparent
//! socket bound to it, marked [`KEEP_SOURCE_MARK`]. Three things make that work:
//! - the steering program must not send this dial back to the proxy: the proxy registers it
//!   in `PROXY_DIALS` (netns, client address and port, app port) for the connect's duration;
//! - the app's replies go to the client's address, which is not in the pod: the pod's netns
//!   has `tcp_fwmark_accept` on, so the app's accepted socket carries the dial's mark, and a
//!   policy rule (`fwmark 0x10539/0x10fff`) sends such packets to a table whose only route is
//!   `local default dev lo`,
//!   so they come back to the proxy's socket instead of leaving the pod;
//! - the proxy's own connects stay uncaptured (the mark's low bits are still the proxy's).
//!
//! Where the kernel refuses (no transparent bind, no rule), the app is dialled as before,
//! from 127.0.0.6 (IPv4) or the pod's own address (IPv6), and `ztunnel_inbound_source_not_kept`
//! counts it.
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;

use tokio::net::{TcpSocket, TcpStream};
use ztunnel_common::{KEEP_SOURCE_MARK, PROXY_MARK, PROXY_MARK_MASK};

use super::socket::{self, INBOUND_SOURCE_V4};
use super::ProxyContext;
use crate::netns::InpodNetns;
use crate::redirect::ProxyDials;

/// The routing table the reply rule points to (`0x539`, the proxy mark, as a number).
pub const REPLY_TABLE: u32 = 1337;
/// The reply rule's priority: before the main table's (32766).
pub const REPLY_RULE_PRIORITY: u32 = 1337;

/// Prepares `netns` so replies to dials from clients' addresses come back to the proxy:
/// `tcp_fwmark_accept`, then the rule and the local route for IPv4 and IPv6.
pub fn prepare_pod(netns: &InpodNetns) -> std::io::Result<()> {
    netns.run(|| -> std::io::Result<()> {
        // Per netns: /proc/sys/net shows the namespace of the thread that opens it.
        std::fs::write("/proc/sys/net/ipv4/tcp_fwmark_accept", "1")?;
        let mut nl = crate::netlink::Rtnetlink::open()?;
        for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
            nl.add_fwmark_rule(
                family,
                KEEP_SOURCE_MARK | PROXY_MARK,
                KEEP_SOURCE_MARK | PROXY_MARK_MASK,
                REPLY_RULE_PRIORITY,
                REPLY_TABLE,
            )?;
            nl.add_local_default_route(family, REPLY_TABLE)?;
        }
        Ok(())
    })?
}

/// Dials the app at `dst` inside the pod: from `client` when the pod keeps sources and the
/// kernel allows it, otherwise from the proxy's fixed inbound source.
pub async fn dial_app(ctx: &ProxyContext, dst: SocketAddr, client: IpAddr) -> std::io::Result<TcpStream> {
    let usable = client.is_ipv4() == dst.is_ipv4() && !client.is_loopback() && !ctx.pod.ips.contains(&client);
    match ctx.pod.keep_source.as_ref() {
        Some(dials) if usable => match transparent_socket(&ctx.pod.netns, dst, client) {
            Ok(sock) => {
                let from = sock.local_addr()?;
                let _registered = Registered::new(dials, ctx.pod.netns.cookie(), from, dst.port())?;
                return socket::connect(sock, dst).await;
            }
            Err(e) => {
                ctx.mesh.metrics.source_not_kept();
                tracing::debug!(pod = %ctx.pod.uid, %client, error = %e, "client address not kept");
            }
        },
        // Wanted, but the pod's steering or routing could not be set up.
        None if usable && ctx.pod.wants_source => ctx.mesh.metrics.source_not_kept(),
        _ => {}
    }
    let bind = dst.is_ipv4().then_some(IpAddr::V4(INBOUND_SOURCE_V4));
    socket::dial(&ctx.pod.netns, dst, bind).await
}

/// A dial registered in `PROXY_DIALS` until dropped, whether the connect finished, failed or
/// its task was cancelled: a stale entry must not outlive the dial.
struct Registered<'a> {
    dials: &'a ProxyDials,
    cookie: u64,
    from: SocketAddr,
    app_port: u16,
}

impl<'a> Registered<'a> {
    fn new(dials: &'a ProxyDials, cookie: u64, from: SocketAddr, app_port: u16) -> std::io::Result<Self> {
        dials.insert(cookie, from, app_port).map_err(std::io::Error::other)?;
        Ok(Self { dials, cookie, from, app_port })
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.dials.remove(self.cookie, self.from, self.app_port);
    }
}

/// A socket in the pod's netns bound (transparently) to `client`, marked for the reply rule.
fn transparent_socket(netns: &InpodNetns, dst: SocketAddr, client: IpAddr) -> std::io::Result<TcpSocket> {
    let sock = socket::marked_socket(netns, dst, PROXY_MARK | KEEP_SOURCE_MARK)?;
    let (level, opt) =
        if dst.is_ipv4() { (libc::SOL_IP, libc::IP_TRANSPARENT) } else { (libc::SOL_IPV6, libc::IPV6_TRANSPARENT) };
    set_transparent(&sock, level, opt)?;
    sock.bind(SocketAddr::new(client, 0))?;
    Ok(sock)
}

/// `IP_TRANSPARENT` / `IPV6_TRANSPARENT` (nix has no IPv6 one).
fn set_transparent(sock: &TcpSocket, level: libc::c_int, opt: libc::c_int) -> std::io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: setsockopt on an fd we own, with a properly sized int.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            opt,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
