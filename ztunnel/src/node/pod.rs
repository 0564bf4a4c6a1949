//! One enrolled pod: its in-pod listeners (opened inside the pod's netns) and the tasks
//! serving them. Dropping a `PodProxy` stops the tasks and closes the listeners.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use ztunnel_common::{HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};

use super::Shared;
use crate::proxy::{inbound_passthrough, outbound, socket, PodContext, ProxyContext};

/// A pod the agent serves.
pub struct PodProxy {
    pub ctx: ProxyContext,
    pub ips: Vec<IpAddr>,
    tasks: Vec<JoinHandle<()>>,
}

impl PodProxy {
    /// Opens the pod's listeners, installs its capture and starts serving.
    pub(crate) fn start(shared: &Shared, pod: PodContext) -> Result<Self, String> {
        let netns = &pod.netns;
        let ips = pod.ips.clone();
        if ips.is_empty() {
            return Err("pod has no addresses".into());
        }
        let open = |addr: SocketAddr| {
            socket::listener(netns, addr)
                .and_then(TcpListener::from_std)
                .map_err(|e| format!("opening listener {addr} in pod netns: {e}"))
        };
        let out4 = open(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), OUTBOUND_PORT))?;
        let out6 = open(SocketAddr::new(Ipv6Addr::LOCALHOST.into(), OUTBOUND_PORT))?;
        let inbound = open(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), INBOUND_PLAINTEXT_PORT))?;
        let hbone = open(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), HBONE_PORT))?;
        shared
            .capture
            .enroll(&pod.uid, netns, &inbound)
            .map_err(|e| format!("installing capture: {e}"))?;

        let ctx = ProxyContext { pod: Arc::new(pod), mesh: shared.mesh.clone() };
        shared.registry.insert(&ctx.pod);
        let orig = shared.capture.orig_dst_table();
        let tasks = vec![
            tokio::spawn(outbound::serve(ctx.clone(), out4, orig.clone())),
            tokio::spawn(outbound::serve(ctx.clone(), out6, orig)),
            tokio::spawn(inbound_passthrough::serve(ctx.clone(), inbound)),
            tokio::spawn(crate::proxy::inbound::serve(ctx.clone(), hbone)),
        ];
        Ok(Self { ctx, ips, tasks })
    }
}

impl Drop for PodProxy {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}
