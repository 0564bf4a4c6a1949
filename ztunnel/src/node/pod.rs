//! One enrolled pod: its in-pod listeners (opened inside the pod's netns, or handed over by
//! the agent this one replaces) and the tasks serving them. Dropping a `PodProxy` stops
//! accepting and closes this process's copies of the listeners; connections already
//! accepted run to their end.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use ztunnel_common::{HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};

use super::Shared;
use crate::netns::InpodNetns;
use crate::proxy::{inbound_passthrough, outbound, socket, PodContext, ProxyContext};

/// A pod's four listening sockets, in the order they are handed over.
pub struct Listeners {
    pub outbound4: std::net::TcpListener,
    pub outbound6: std::net::TcpListener,
    pub inbound: std::net::TcpListener,
    pub hbone: std::net::TcpListener,
}

impl Listeners {
    /// Opens the listeners inside the pod's netns, all marked with the proxy mark.
    pub fn open(netns: &InpodNetns) -> Result<Self, String> {
        let open = |addr: SocketAddr| {
            socket::listener(netns, addr).map_err(|e| format!("opening listener {addr} in pod netns: {e}"))
        };
        Ok(Listeners {
            outbound4: open(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), OUTBOUND_PORT))?,
            outbound6: open(SocketAddr::new(Ipv6Addr::LOCALHOST.into(), OUTBOUND_PORT))?,
            inbound: open(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), INBOUND_PLAINTEXT_PORT))?,
            hbone: open(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), HBONE_PORT))?,
        })
    }

    /// Listeners received from another process, in [`Listeners::dup`] order.
    pub fn from_fds(fds: Vec<OwnedFd>) -> Result<Self, String> {
        let [a, b, c, d]: [OwnedFd; 4] =
            fds.try_into().map_err(|v: Vec<OwnedFd>| format!("expected 4 listener fds, got {}", v.len()))?;
        Ok(Listeners { outbound4: a.into(), outbound6: b.into(), inbound: c.into(), hbone: d.into() })
    }

    /// Duplicates of the four sockets (the same kernel listeners), to hand to a successor.
    pub fn dup(&self) -> std::io::Result<Vec<OwnedFd>> {
        [&self.outbound4, &self.outbound6, &self.inbound, &self.hbone]
            .iter()
            .map(|l| l.as_fd().try_clone_to_owned())
            .collect()
    }
}

/// A pod the agent serves.
pub struct PodProxy {
    pub ctx: ProxyContext,
    pub ips: Vec<IpAddr>,
    /// This process's copies of the listeners, kept to hand them to a successor.
    listeners: Listeners,
    tasks: Vec<JoinHandle<()>>,
}

impl PodProxy {
    /// Installs the pod's capture (steering to `listeners.inbound`) and starts serving.
    pub(crate) fn start(shared: &Shared, pod: PodContext, listeners: Listeners) -> Result<Self, String> {
        let ips = pod.ips.clone();
        if ips.is_empty() {
            return Err("pod has no addresses".into());
        }
        shared
            .capture
            .enroll(&pod.uid, &pod.netns, &listeners.inbound)
            .map_err(|e| format!("installing capture: {e}"))?;
        let serving = |l: &std::net::TcpListener| {
            l.try_clone()
                .and_then(|l| {
                    l.set_nonblocking(true)?;
                    TcpListener::from_std(l)
                })
                .map_err(|e| format!("serving listener: {e}"))
        };
        let (out4, out6) = (serving(&listeners.outbound4)?, serving(&listeners.outbound6)?);
        let (inbound, hbone) = (serving(&listeners.inbound)?, serving(&listeners.hbone)?);
        let mut pod = pod;
        pod.wants_source = shared.keep_source;
        if shared.keep_source {
            match crate::proxy::keep_source::prepare_pod(&pod.netns) {
                Ok(()) => pod.keep_source = Some(shared.capture.proxy_dials()),
                Err(e) => tracing::warn!(uid = %pod.uid, error = %e,
                    "cannot route replies to clients' addresses in this pod: its apps will see the proxy's address"),
            }
        }
        let ctx = ProxyContext { pod: Arc::new(pod), mesh: shared.mesh.clone() };
        shared.registry.insert(&ctx.pod);
        let orig = shared.capture.orig_dst_table();
        let tasks = vec![
            tokio::spawn(outbound::serve(ctx.clone(), out4, orig.clone())),
            tokio::spawn(outbound::serve(ctx.clone(), out6, orig)),
            tokio::spawn(inbound_passthrough::serve(ctx.clone(), inbound)),
            tokio::spawn(crate::proxy::inbound::serve(ctx.clone(), hbone)),
        ];
        Ok(Self { ctx, ips, listeners, tasks })
    }

    /// Duplicates of the pod's netns and listener fds: netns first, then the listeners.
    pub(crate) fn handover_fds(&self) -> std::io::Result<Vec<OwnedFd>> {
        let mut fds = vec![self.ctx.pod.netns.fd().try_clone_to_owned()?];
        fds.extend(self.listeners.dup()?);
        Ok(fds)
    }
}

impl Drop for PodProxy {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}
