//! A DestinationRule's traffic policy applied to live requests: per cluster (service,
//! subset, port) the waypoint keeps a load balancer, the endpoints' outlier state and the
//! connection-pool limits, and hands the request path one [`Cluster`] per request, which
//! picks an endpoint among the healthy ones and records how each attempt went. The
//! algorithms themselves are pure ([`super::lb`], [`super::outlier`], [`super::circuit`]);
//! this module is where they meet the state store and the clock.
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use super::circuit::{Breaker, Overflow, Permit};
use super::lb::{Balancers, Caller, ClusterKey, LbEndpoint, Locality, Pick, RequestView};
use super::outlier::{Outcome, Outliers};
use super::routes::RouteTable;
use super::upstream::Endpoint;
use crate::routing::traffic_policy::{EffectivePolicy, PoolLimits};
use crate::state::{Service, Snapshot, Workload};

/// How long a request waits (as a pending request) for a connection under
/// `tcp.maxConnections` before it is refused with `UO`.
const PENDING_WAIT: Duration = Duration::from_secs(10);

/// The per-cluster state of one proxy.
#[derive(Default)]
pub(crate) struct Traffic {
    balancers: Balancers,
    outliers: Mutex<HashMap<ClusterKey, Arc<Outliers>>>,
    breakers: Mutex<HashMap<ClusterKey, (PoolLimits, Arc<Breaker>)>>,
    built: Mutex<Built>,
}

/// One request's view of its destination cluster.
pub(crate) struct Cluster {
    pub service: Arc<Service>,
    endpoints: Vec<(Arc<Workload>, SocketAddr)>,
    balancer: Arc<super::lb::Balancer>,
    outliers: Arc<Outliers>,
    pub breaker: Arc<Breaker>,
}

/// The endpoint an attempt goes to, and what holds its place while it runs.
pub(crate) struct Chosen {
    pub endpoint: Endpoint,
    /// A `Set-Cookie` for the response (a generated consistent-hash cookie).
    pub set_cookie: Option<String>,
    _in_flight: super::lb::InFlight,
}

fn locality(w: &Workload) -> Locality {
    let (region, zone, subzone) = w.locality();
    Locality::new(region, zone, subzone)
}

/// Clusters built for one state snapshot and one route table, keyed by what a request
/// resolved to: the service and subset (by address, stable within that snapshot and table),
/// the port, the address family and the proxy's own address. Building a cluster compares
/// endpoint lists and policies and allocates; a request now does that only when the state or
/// routes changed since a request last went to the same place.
#[derive(Default)]
struct Built {
    snapshot: Weak<Snapshot>,
    routes: Weak<RouteTable>,
    clusters: HashMap<BuiltKey, Arc<Cluster>>,
}

/// What a cached cluster was built for. The addresses are of objects the snapshot and
/// route table own (and the cached cluster holds the service), so they name the same
/// objects for as long as the cache is current.
#[derive(Hash, PartialEq, Eq)]
struct BuiltKey {
    service: usize,
    subset: usize,
    /// Which DestinationRule gives the policy (`None`: the defaults).
    policy: Option<usize>,
    port: u16,
    v4: bool,
    me: IpAddr,
}

/// More cached clusters than this starts the cache over (the key space is the config's).
const MAX_BUILT: usize = 4096;

impl Traffic {
    /// The cluster of `svc`'s endpoints on `port` (those carrying `subset`'s labels), under
    /// the traffic policy the routes give `host` (the destination host as the route named
    /// it), in `like`'s address family, as seen from the proxy's own address `me`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn cluster(
        &self,
        (snap, routes): (&Arc<Snapshot>, &Arc<RouteTable>),
        host: &str,
        svc: &Arc<Service>,
        port: u16,
        like: IpAddr,
        subset: Option<(&str, &BTreeMap<String, String>)>,
        me: IpAddr,
    ) -> Arc<Cluster> {
        let key = BuiltKey {
            service: Arc::as_ptr(svc) as usize,
            subset: subset.map_or(0, |(_, l)| l as *const _ as usize),
            policy: routes.traffic_policy_index(host),
            port,
            v4: like.is_ipv4(),
            me,
        };
        let mut built = self.built.lock().unwrap_or_else(|e| e.into_inner());
        let current = Weak::ptr_eq(&built.snapshot, &Arc::downgrade(snap))
            && Weak::ptr_eq(&built.routes, &Arc::downgrade(routes));
        if !current {
            *built = Built { snapshot: Arc::downgrade(snap), routes: Arc::downgrade(routes), clusters: HashMap::new() };
        }
        if let Some(c) = built.clusters.get(&key) {
            return c.clone();
        }
        if built.clusters.len() >= MAX_BUILT {
            built.clusters.clear();
        }
        let policy = routes.traffic_policy(host, subset.map(|(n, _)| n), port);
        let own = snap.workload_by_ip(me);
        let c = Arc::new(self.build(snap, svc, port, like, subset, &policy, own.as_deref()));
        built.clusters.insert(key, c.clone());
        c
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        &self,
        snap: &Snapshot,
        svc: &Arc<Service>,
        port: u16,
        like: IpAddr,
        subset: Option<(&str, &BTreeMap<String, String>)>,
        policy: &EffectivePolicy,
        me: Option<&Workload>,
    ) -> Cluster {
        let keep = |w: &Workload| {
            subset.is_none_or(|(_, want)| {
                let have = w.subset_labels();
                want.iter().all(|(k, v)| have.get(k) == Some(v))
            })
        };
        let endpoints = snap.service_endpoints(svc, like, port, keep);
        let key = ClusterKey { service: svc.hostname.clone(), subset: subset.map(|(n, _)| n.to_string()), port };
        let lb: Vec<LbEndpoint> = endpoints
            .iter()
            .map(|(w, a)| {
                let mut e = LbEndpoint::new(*a, locality(w));
                e.labels = w.subset_labels();
                e
            })
            .collect();
        let caller = Caller {
            locality: me.map(locality).unwrap_or_default(),
            labels: me.map(|w| w.subset_labels()).unwrap_or_default(),
        };
        let balancer = self.balancers.get(&key, policy, &lb, &caller);
        let outliers = {
            let mut map = self.outliers.lock().unwrap_or_else(|e| e.into_inner());
            let o = map.entry(key.clone()).or_insert_with(|| Arc::new(Outliers::new(policy.outlier.clone()))).clone();
            o.set_policy(policy.outlier.clone());
            o
        };
        let addrs: Vec<SocketAddr> = endpoints.iter().map(|(_, a)| *a).collect();
        outliers.sync(&addrs);
        let breaker = {
            let mut map = self.breakers.lock().unwrap_or_else(|e| e.into_inner());
            match map.get(&key) {
                Some((limits, b)) if *limits == policy.connection_pool => b.clone(),
                _ => {
                    let b = Breaker::new(&policy.connection_pool);
                    map.insert(key, (policy.connection_pool.clone(), b.clone()));
                    b
                }
            }
        };
        Cluster { service: svc.clone(), endpoints, balancer, outliers, breaker }
    }
}

impl Cluster {
    /// An endpoint for this attempt among those not ejected; `None`: no healthy endpoint.
    pub(crate) fn pick(&self, view: &RequestView<'_>) -> Option<Chosen> {
        let usable = self.outliers.usable(self.endpoints.iter().map(|(_, a)| a), Instant::now());
        let mut rng = fastrand::Rng::new();
        let Pick { index, addr, set_cookie, in_flight } = self.balancer.pick(view, &usable, &mut rng)?;
        let (workload, _) = self.endpoints.get(index)?;
        Some(Chosen {
            endpoint: Endpoint { workload: workload.clone(), service: self.service.clone(), addr },
            set_cookie,
            _in_flight: in_flight,
        })
    }

    /// Records how an attempt to `addr` ended, for outlier detection.
    pub(crate) fn record(&self, addr: SocketAddr, outcome: Outcome) {
        if let Some(e) = self.outliers.record(addr, outcome, Instant::now()) {
            tracing::info!(endpoint = %addr, ejection = ?e, service = %self.service.hostname, "outlier detection");
        }
    }

    /// A place for one more request under the connection-pool limits: a connection, or a
    /// pending request that waits for one. `Err`: overflow (answer 503 `UO`).
    pub(crate) async fn admit(&self) -> Result<(Permit, Permit), Overflow> {
        let request = self.breaker.request()?;
        if let Ok(conn) = self.breaker.connection() {
            return Ok((request, conn));
        }
        let _pending = self.breaker.pending()?;
        let deadline = tokio::time::Instant::now() + PENDING_WAIT;
        loop {
            tokio::time::sleep(Duration::from_millis(2)).await;
            match self.breaker.connection() {
                Ok(conn) => return Ok((request, conn)),
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                Err(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::parse_local_config;

    const SERVICE: &str = "services:\n- name: reviews\n  namespace: default\n  hostname: reviews.default.svc.cluster.local\n  vips: [\"10.96.0.30\"]\n  ports:\n    9080: 9080\n";

    fn endpoint(i: u8, version: &str) -> String {
        format!(
            "- uid: r{i}\n  name: reviews-{i}\n  namespace: default\n  workloadIps: [\"10.0.0.{i}\"]\n  protocol: HBONE\n  services:\n    default/reviews.default.svc.cluster.local:\n      9080: 9080\n  labels: {{app: reviews, version: {version}}}\n"
        )
    }

    fn snapshot(endpoints: &[(u8, &str)]) -> Arc<Snapshot> {
        let mut yaml = String::from("workloads:\n");
        for (i, v) in endpoints {
            yaml += &endpoint(*i, v);
        }
        yaml += SERVICE;
        let (cfg, errors) = parse_local_config(&yaml);
        assert!(errors.is_empty(), "{errors:?}");
        Arc::new(Snapshot::new(cfg))
    }

    fn routes(lb: &str) -> Arc<RouteTable> {
        let text = format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: reviews, namespace: default}}\nspec:\n  host: reviews\n  trafficPolicy:\n    loadBalancer: {{simple: {lb}}}\n  subsets:\n  - name: v1\n    labels: {{version: v1}}\n"
        );
        let docs: Vec<serde_yaml_ng::Value> =
            serde_yaml_ng::Deserializer::from_str(&text).map(|d| serde::Deserialize::deserialize(d).unwrap()).collect();
        Arc::new(RouteTable::load(&docs, &RouteTable::default()))
    }

    fn cluster_of(t: &Traffic, snap: &Arc<Snapshot>, table: &Arc<RouteTable>, subset: Option<&str>) -> Arc<Cluster> {
        let svc = snap.service_by_host("reviews", "default").expect("service");
        let subset = subset.map(|s| (s, table.subset_labels("reviews", s).expect("subset")));
        t.cluster(
            (snap, table),
            "reviews",
            &svc,
            9080,
            "10.96.0.30".parse().unwrap(),
            subset,
            "10.0.0.99".parse().unwrap(),
        )
    }

    fn addrs(c: &Cluster) -> Vec<SocketAddr> {
        c.endpoints.iter().map(|(_, a)| *a).collect()
    }

    #[test]
    fn the_same_state_and_routes_give_the_same_cluster() {
        let (t, snap, table) = (Traffic::default(), snapshot(&[(1, "v1"), (2, "v2")]), routes("ROUND_ROBIN"));
        let a = cluster_of(&t, &snap, &table, None);
        assert!(Arc::ptr_eq(&a, &cluster_of(&t, &snap, &table, None)));
        let v1 = cluster_of(&t, &snap, &table, Some("v1"));
        assert!(!Arc::ptr_eq(&a, &v1), "a subset is a cluster of its own");
        assert_eq!(addrs(&v1), vec!["10.0.0.1:9080".parse().unwrap()]);
    }

    #[test]
    fn a_new_endpoint_in_the_state_is_in_the_next_cluster() {
        let (t, table) = (Traffic::default(), routes("ROUND_ROBIN"));
        let before = cluster_of(&t, &snapshot(&[(1, "v1")]), &table, Some("v1"));
        assert_eq!(addrs(&before).len(), 1);
        let after = cluster_of(&t, &snapshot(&[(1, "v1"), (3, "v1")]), &table, Some("v1"));
        assert_eq!(addrs(&after).len(), 2);
    }

    #[test]
    fn a_changed_destination_rule_is_in_the_next_cluster() {
        let (t, snap) = (Traffic::default(), snapshot(&[(1, "v1"), (2, "v2")]));
        let rr = cluster_of(&t, &snap, &routes("ROUND_ROBIN"), None);
        let random = cluster_of(&t, &snap, &routes("RANDOM"), None);
        assert!(!Arc::ptr_eq(&rr, &random));
        assert!(!Arc::ptr_eq(&rr.balancer, &random.balancer), "the balancer follows the new policy");
    }
}
