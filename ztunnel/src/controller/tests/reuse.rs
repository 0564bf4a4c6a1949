//! A model built on the previous one (taking over unchanged pods and workloads) must equal a model built from
//! scratch, edit after edit; and it must really take over what did not change. Each edit re-reads one file, as the
//! directory source does, so every other object is the same `Arc` as before.
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use super::super::model::{Model, Options, TunnelProtocol};
use super::super::source::{parse_text, Snapshot};
use super::{namespace, pod, yaml};

/// Files by name, each parsed once per change, like the directory source's cache.
struct Files(BTreeMap<&'static str, Snapshot>);

impl Files {
    fn new(files: &[(&'static str, String)]) -> Self {
        Files(files.iter().map(|(n, t)| (*n, parse_text(Path::new(n), t))).collect())
    }

    fn set(&mut self, name: &'static str, text: String) {
        self.0.insert(name, parse_text(Path::new(name), &text));
    }

    fn snapshot(&self) -> Snapshot {
        let mut s = Snapshot::default();
        for part in self.0.values() {
            s.objects.extend(part.objects.iter().cloned());
            s.skipped.extend(part.skipped.iter().cloned());
        }
        s
    }
}

/// Builds on `prev` and from scratch; fails unless the two agree in everything served and reported.
fn build_both(files: &Files, prev: &Model, step: &str) -> Model {
    let fresh = Model::build(files.snapshot(), Options::default());
    let next = Model::build_after(files.snapshot(), Options::default(), Some(prev));
    assert_eq!(next.workloads, fresh.workloads, "{step}: workloads");
    assert_eq!(next.services, fresh.services, "{step}: services");
    assert_eq!(next.authorizations, fresh.authorizations, "{step}: policies");
    assert_eq!(next.waypoints, fresh.waypoints, "{step}: waypoints");
    assert_eq!(next.status(), fresh.status(), "{step}: status");
    next
}

const UID: &str = "Kubernetes//Pod/app/";

fn base() -> Files {
    let pods = [
        pod("app", "web-1", "10.0.0.1", &[("app", "web")]),
        pod("app", "web-2", "10.0.0.2", &[("app", "web")]),
        pod("app", "db-1", "10.0.0.3", &[("app", "db")]),
        pod("other", "solo", "10.0.1.1", &[("app", "solo")]),
    ];
    let services = yaml(
        "
        apiVersion: v1
        kind: Service
        metadata: {name: web, namespace: app}
        spec:
          clusterIP: 10.96.0.1
          selector: {app: web}
          ports: [{port: 80, targetPort: http}]
        ",
    );
    Files::new(&[
        ("namespaces.yaml", namespace("app", &[("istio.io/dataplane-mode", "ambient")]) + &namespace("other", &[])),
        ("pods.yaml", pods.concat()),
        ("services.yaml", services),
        ("sa.yaml", "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: sa-web-1, namespace: app}\n".into()),
    ])
}

fn db_service() -> String {
    yaml(
        "
        apiVersion: v1
        kind: Service
        metadata: {name: db, namespace: app}
        spec:
          clusterIP: 10.96.0.2
          selector: {app: db}
          ports: [{port: 5432}]
        ",
    )
}

#[test]
fn a_new_service_rebuilds_only_the_workloads_it_selects() {
    let mut files = base();
    let first = Model::build(files.snapshot(), Options::default());
    files.set("db.yaml", db_service());
    let next = build_both(&files, &first, "db service added");
    let db = &next.workloads[&format!("{UID}db-1")];
    assert!(db.services.contains_key("app/db.app.svc.cluster.local"), "the new service is joined");
    let web = format!("{UID}web-1");
    assert!(Arc::ptr_eq(&next.workloads[&web], &first.workloads[&web]), "an unselected workload is taken over");
}

#[test]
fn a_removed_service_leaves_its_workloads() {
    let mut files = base();
    files.set("db.yaml", db_service());
    let first = Model::build(files.snapshot(), Options::default());
    files.set("db.yaml", String::new());
    let next = build_both(&files, &first, "db service removed");
    assert!(next.workloads[&format!("{UID}db-1")].services.is_empty());
}

#[test]
fn a_changed_pod_is_rebuilt_and_its_address_checked_again() {
    let mut files = base();
    let first = Model::build(files.snapshot(), Options::default());
    let pods = [
        pod("app", "web-1", "10.0.0.1", &[("app", "db")]),
        pod("app", "web-2", "10.0.0.2", &[("app", "web")]),
        pod("app", "db-1", "10.0.0.3", &[("app", "db")]),
        pod("other", "solo", "10.0.1.1", &[("app", "solo")]),
    ];
    files.set("pods.yaml", pods.concat());
    let next = build_both(&files, &first, "pod relabelled");
    assert!(next.workloads[&format!("{UID}web-1")].services.is_empty(), "web no longer selects it");
    files.set("z-late.yaml", pod("app", "late", "10.0.0.2", &[("app", "web")]));
    let after = build_both(&files, &next, "a pod takes a used address");
    assert!(!after.workloads.contains_key(&format!("{UID}late")), "the second claim on an address is refused");
}

#[test]
fn a_new_policy_is_listed_by_the_workloads_it_selects() {
    let mut files = base();
    let first = Model::build(files.snapshot(), Options::default());
    let deny = yaml(
        "
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: deny-web, namespace: app}
        spec:
          selector: {matchLabels: {app: web}}
          action: DENY
          rules: [{to: [{operation: {ports: ['80']}}]}]
        ",
    );
    files.set("policy.yaml", deny);
    let next = build_both(&files, &first, "DENY added");
    assert_eq!(next.workloads[&format!("{UID}web-1")].authorization_policies, ["app/deny-web"]);
    assert!(next.workloads[&format!("{UID}db-1")].authorization_policies.is_empty());
    files.set("policy.yaml", String::new());
    let after = build_both(&files, &next, "DENY removed");
    assert!(after.workloads[&format!("{UID}web-1")].authorization_policies.is_empty());
}

#[test]
fn a_namespace_label_flip_changes_its_workloads() {
    let mut files = base();
    let first = Model::build(files.snapshot(), Options::default());
    let solo = "Kubernetes//Pod/other/solo";
    assert_eq!(first.workloads[solo].tunnel_protocol, TunnelProtocol::None);
    files.set(
        "namespaces.yaml",
        namespace("app", &[("istio.io/dataplane-mode", "ambient")])
            + &namespace("other", &[("istio.io/dataplane-mode", "ambient")]),
    );
    let next = build_both(&files, &first, "namespace enrolled");
    assert_eq!(next.workloads[solo].tunnel_protocol, TunnelProtocol::Hbone);
    files.set("namespaces.yaml", namespace("other", &[]));
    let after = build_both(&files, &next, "namespace removed");
    assert_eq!(after.workloads[&format!("{UID}web-1")].tunnel_protocol, TunnelProtocol::None);
}

#[test]
fn a_new_waypoint_is_taken_up_by_the_workloads_that_use_it() {
    let mut files = base();
    let first = Model::build(files.snapshot(), Options::default());
    let gateway = yaml(
        "
        apiVersion: gateway.networking.k8s.io/v1
        kind: Gateway
        metadata: {name: wp, namespace: app, labels: {istio.io/waypoint-for: all}}
        spec:
          gatewayClassName: istio-waypoint
          listeners: [{name: mesh, port: 15008, protocol: HBONE}]
        ",
    );
    files.set(
        "namespaces.yaml",
        namespace("app", &[("istio.io/dataplane-mode", "ambient"), ("istio.io/use-waypoint", "wp")])
            + &namespace("other", &[]),
    );
    let missing = build_both(&files, &first, "namespace names a waypoint that does not exist");
    assert!(missing.workloads[&format!("{UID}web-1")].waypoint.is_none());
    files.set("gateway.yaml", gateway);
    let next = build_both(&files, &missing, "waypoint added");
    assert!(next.workloads[&format!("{UID}web-1")].waypoint.is_some());
}

#[test]
fn a_node_and_a_deployment_change_rebuild_what_reads_them() {
    let mut files = base();
    let first = Model::build(files.snapshot(), Options::default());
    let node = yaml(
        "
        apiVersion: v1
        kind: Node
        metadata: {name: node-a, labels: {topology.kubernetes.io/region: r1, topology.kubernetes.io/zone: z1}}
        ",
    );
    files.set("node.yaml", node);
    let next = build_both(&files, &first, "node labelled");
    assert_eq!(next.workloads[&format!("{UID}web-1")].locality.zone, "z1");
    let deployment = yaml(
        "
        apiVersion: apps/v1
        kind: Deployment
        metadata:
          name: api
          namespace: app
          annotations: {mesh.local/pod-ips: 10.0.0.9, mesh.local/nodes: node-a}
        spec:
          selector: {matchLabels: {app: api}}
          template:
            metadata: {labels: {app: api}}
            spec: {serviceAccountName: api}
        ",
    );
    files.set("deployment.yaml", deployment);
    let after = build_both(&files, &next, "deployment added");
    assert!(after.workloads.values().any(|w| w.workload_name == "api"));
}

#[test]
fn nothing_is_taken_over_when_the_options_change() {
    let files = base();
    let first = Model::build(files.snapshot(), Options::default());
    let options = Options { cluster_id: "Other".into(), ..Options::default() };
    let next = Model::build_after(files.snapshot(), options.clone(), Some(&first));
    assert_eq!(next.workloads, Model::build(files.snapshot(), options).workloads);
    assert!(next.workloads.keys().all(|uid| uid.starts_with("Other//")));
}

#[test]
fn a_context_object_sent_again_unchanged_keeps_the_workloads() {
    // An API server re-sends a Namespace (or a Deployment, a Node) on updates to fields the model does not read.
    let mut files = base();
    let first = Model::build(files.snapshot(), Options::default());
    files
        .set("namespaces.yaml", namespace("app", &[("istio.io/dataplane-mode", "ambient")]) + &namespace("other", &[]));
    let next = build_both(&files, &first, "namespaces re-read unchanged");
    let web = format!("{UID}web-1");
    assert!(Arc::ptr_eq(&next.workloads[&web], &first.workloads[&web]), "taken over");
}
