//! Node-wide pieces shared by every pod's proxy: the mesh context (whose pool dials from
//! the right pod netns through the registry of local pods), and the admin server with its
//! config dump and scrape-time metrics.
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use tokio::sync::broadcast;

use super::{NodeConfig, Shared};
use crate::admin::{AdminConfig, AdminServer};
use crate::hbone::{CertManagerTls, ConnectionPool, PoolConfig, PoolKey};
use crate::identity::{CertManager, CertManagerConfig};
use crate::proxy::{socket, ConnectionRecord, LocalPods, MeshContext};
use crate::state::StateStore;

/// Builds the shared mesh context. HBONE connections are dialled from inside the source
/// pod's netns (in-pod mode), found through the registry by the pool key's source IP.
pub(super) fn mesh_context(
    cfg: &NodeConfig,
    registry: LocalPods,
    metrics: Arc<crate::metrics::Metrics>,
    events: broadcast::Sender<ConnectionRecord>,
    draining: tokio::sync::watch::Receiver<bool>,
    tracer: crate::spans::Tracer,
) -> MeshContext {
    let certs = CertManager::new(cfg.ca.clone(), CertManagerConfig::default());
    let local_pods = registry.clone();
    let dialer = move |key: PoolKey| {
        let registry = registry.clone();
        async move {
            let pod = registry
                .get(key.src_ip)
                .ok_or_else(|| std::io::Error::other(format!("no enrolled pod owns {}", key.src_ip)))?;
            socket::dial(&pod.netns, key.dst, None).await
        }
    };
    let pool =
        ConnectionPool::new(PoolConfig::default(), Arc::new(dialer), Arc::new(CertManagerTls { certs: certs.clone() }));
    MeshContext {
        trust_domain: cfg.trust_domain.clone(),
        state: Arc::new(match &cfg.xds {
            Some(xds) => StateStore::awaiting_sync(&xds.node_name),
            None => StateStore::default(),
        }),
        certs,
        pool,
        metrics,
        events,
        connections: Default::default(),
        tracer,
        limits: cfg.limits,
        draining,
        local_pods,
        same_node_fast_path: cfg.same_node_fast_path,
    }
}

/// Starts the admin/metrics/readiness server (its own thread and runtime).
pub(super) fn start_admin(
    cfg: AdminConfig,
    shared: &Arc<Shared>,
    log: Option<Arc<crate::admin::LogControl>>,
    ready: Arc<AtomicBool>,
) -> std::io::Result<AdminServer> {
    let weak = Arc::downgrade(shared);
    let dump = Arc::new(move || match weak.upgrade() {
        Some(s) => config_dump(&s),
        None => serde_json::json!({}),
    });
    register_collectors(shared);
    let on_quit = Arc::new(|| {
        tracing::info!("/quitquitquit: exiting");
        std::process::exit(0);
    });
    // A record-only control when the process installed no reloadable filter, so the kernel
    // programs' logging can still be switched from `/logging`.
    let log = log.unwrap_or_else(|| {
        let initial = tracing::level_filters::LevelFilter::current().to_string().to_ascii_lowercase();
        Arc::new(crate::admin::LogControl::record_only(initial))
    });
    let weak = Arc::downgrade(shared);
    log.on_change(move |directives| {
        let on = crate::admin::directive_enables(directives, crate::redirect::KERNEL_LOG_TARGET, "debug");
        if let Some(s) = weak.upgrade() {
            match s.capture.set_kernel_logging(on) {
                Ok(()) => tracing::info!(enabled = on, "kernel-side capture logging switched"),
                Err(e) => tracing::warn!(error = %e, "switching kernel-side capture logging failed"),
            }
        }
    });
    let server = crate::admin::start_with_logging(cfg, shared.mesh.metrics.clone(), dump, ready, on_quit, log)?;
    let weak = Arc::downgrade(shared);
    server.serve_shortcut_switch(Arc::new(move |wanted| {
        let s = weak.upgrade().ok_or("the agent is stopping")?;
        if let Some(on) = wanted {
            s.capture.set_shortcut(on).map_err(|e| e.to_string())?;
            tracing::info!(enabled = on, "sockmap shortcut switched");
        }
        let report = s.capture.shortcut().map_err(|e| e.to_string())?;
        serde_json::to_value(report).map_err(|e| e.to_string())
    }));
    Ok(server)
}

fn config_dump(s: &Shared) -> serde_json::Value {
    let snap = s.mesh.state.snapshot();
    let pods: Vec<serde_json::Value> = s
        .pods
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .map(|p| {
            let pod = &p.ctx.pod;
            serde_json::json!({
                "uid": pod.uid, "name": pod.name, "namespace": pod.namespace,
                "serviceAccount": pod.service_account, "ips": pod.ips,
                "netnsCookie": pod.netns.cookie(),
            })
        })
        .collect();
    serde_json::json!({
        // What `ztunnel ctl` checks before reading the rest (bump on layout changes).
        "dumpVersion": crate::ctl::DUMP_VERSION,
        "version": env!("CARGO_PKG_VERSION"),
        "trustDomain": s.mesh.trust_domain,
        "enrolledPods": pods,
        "workloads": snap.config.workloads,
        "services": snap.config.services,
        "policies": snap.config.policies,
        "invalidPolicies": snap.config.invalid_policies,
        "certificates": s.mesh.certs.snapshot(),
        "hbonePool": s.mesh.pool.stats(),
        "ebpfCounters": s.capture.counters().ok(),
        "ebpfLinks": s.capture.links(),
        "sockmapShortcut": s.capture.shortcut().ok(),
        "connections": s.mesh.connections.snapshot(),
        "connectionsOverflow": s.mesh.connections.overflow(),
        "configRejected": s.mesh.state.rejected_total(),
        "xds": s.xds.as_ref().map(|x| x.summary()),
    })
}

fn register_collectors(shared: &Arc<Shared>) {
    let weak = Arc::downgrade(shared);
    shared.mesh.metrics.add_collector(
        "ztunnel_ebpf_program_events",
        "Capture program outcomes, read from the kernel's per-CPU counters",
        Box::new(move || {
            let Some(s) = weak.upgrade() else { return vec![] };
            let Ok(c) = s.capture.counters() else { return vec![] };
            let mut out = vec![];
            for (prog, o) in c.by_program() {
                for (outcome, v) in [("captured", o.captured), ("bypassed", o.bypassed), ("error", o.errors)] {
                    out.push((
                        vec![("program".to_string(), prog.to_string()), ("outcome".to_string(), outcome.to_string())],
                        v,
                    ));
                }
            }
            out
        }),
    );
    let weak = Arc::downgrade(shared);
    shared.mesh.metrics.add_collector(
        "ztunnel_sockmap_shortcut_events",
        "What the sockmap shortcut did: sockets paired, sends redirected, and each reason a socket stayed on the normal path",
        Box::new(move || {
            let Some(e) = weak.upgrade().and_then(|s| s.capture.shortcut_events().ok().flatten()) else {
                return vec![];
            };
            e.labelled().into_iter().map(|(event, v)| (vec![("event".to_string(), event.to_string())], v)).collect()
        }),
    );
    if let Some(xds) = shared.xds.clone() {
        crate::xds::client::register_metrics(&shared.mesh.metrics, xds);
    }
    shared.mesh.certs.register_expiry_metric(&shared.mesh.metrics);
    let pool = shared.mesh.pool.clone();
    shared.mesh.metrics.add_collector(
        "ztunnel_hbone_pool_connections_opened",
        "HBONE (mTLS + HTTP/2) connections opened by the outbound pool",
        Box::new(move || vec![(vec![], pool.stats().connections_opened)]),
    );
}
