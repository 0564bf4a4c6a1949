//! Workloads, services, waypoints, status: how objects become the model.
use std::net::IpAddr;

use super::*;
use crate::controller::model::{AppProtocol, PortMapping, TunnelProtocol};
use crate::controller::waypoint::{WaypointAddress, WaypointDestination};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn namespace_opt_in_makes_pods_hbone() {
    let m = build(&(namespace("mesh", &[("istio.io/dataplane-mode", "ambient")]) + &pod("mesh", "a", "10.0.0.1", &[])));
    assert_no_errors(&m);
    assert_eq!(workload(&m, "mesh", "a").tunnel_protocol, TunnelProtocol::Hbone);
}

#[test]
fn pod_label_opts_in_without_namespace_label() {
    let m = build(&pod("plain", "a", "10.0.0.1", &[("istio.io/dataplane-mode", "ambient")]));
    assert_eq!(workload(&m, "plain", "a").tunnel_protocol, TunnelProtocol::Hbone);
}

#[test]
fn pod_label_none_opts_out_of_ambient_namespace() {
    let text = namespace("mesh", &[("istio.io/dataplane-mode", "ambient")])
        + &pod("mesh", "a", "10.0.0.1", &[("istio.io/dataplane-mode", "none")]);
    let m = build(&text);
    assert_eq!(workload(&m, "mesh", "a").tunnel_protocol, TunnelProtocol::None);
}

#[test]
fn pods_outside_ambient_are_plain_tcp_workloads() {
    let m = build(&pod("plain", "a", "10.0.0.1", &[]));
    let w = workload(&m, "plain", "a");
    assert_eq!(w.tunnel_protocol, TunnelProtocol::None);
    assert_eq!(w.addresses, vec![ip("10.0.0.1")]);
}

#[test]
fn pod_fields_come_from_spec_and_status() {
    let m = build(&yaml(
        "
        apiVersion: v1
        kind: Pod
        metadata: {name: p, namespace: ns}
        spec:
          nodeName: node-b
        status:
          podIPs: [{ip: 10.0.0.7}, {ip: 'fd00::7'}]
        ",
    ));
    let w = workload(&m, "ns", "p");
    assert_eq!(w.addresses, vec![ip("10.0.0.7"), ip("fd00::7")]);
    assert_eq!(w.node, "node-b");
    assert_eq!(w.service_account, "default", "no serviceAccountName means the default account");
    assert_eq!(w.uid, "Kubernetes//Pod/ns/p");
    assert!(w.healthy);
}

#[test]
fn pod_without_ip_or_terminal_is_not_a_workload() {
    let no_ip = "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\n";
    let done = "---\napiVersion: v1\nkind: Pod\nmetadata: {name: b}\nstatus: {podIP: 10.0.0.2, phase: Succeeded}\n";
    let m = build(&format!("{no_ip}{done}"));
    assert_no_errors(&m);
    assert!(m.workloads.is_empty());
}

#[test]
fn canonical_name_and_revision_follow_istio_label_order() {
    let text = pod("ns", "a", "10.0.0.1", &[("app", "shop"), ("app.kubernetes.io/name", "store"), ("version", "v2")])
        + &pod("ns", "b", "10.0.0.2", &[("service.istio.io/canonical-name", "cn"), ("app", "shop")])
        + &pod("ns", "c", "10.0.0.3", &[]);
    let m = build(&text);
    let a = workload(&m, "ns", "a");
    assert_eq!((a.canonical_name.as_str(), a.canonical_revision.as_str()), ("store", "v2"));
    let b = workload(&m, "ns", "b");
    assert_eq!((b.canonical_name.as_str(), b.canonical_revision.as_str()), ("cn", "latest"));
    let c = workload(&m, "ns", "c");
    assert_eq!(c.canonical_name, "c", "falls back to the workload name");
}

#[test]
fn workload_name_comes_from_replicaset_owner() {
    let m = build(&yaml(
        "
        apiVersion: v1
        kind: Pod
        metadata:
          name: web-7d9f8b6c5d-x2x4z
          labels: {pod-template-hash: 7d9f8b6c5d}
          ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: web-7d9f8b6c5d, controller: true}]
        status: {podIP: 10.0.0.1}
        ",
    ));
    assert_eq!(workload(&m, "default", "web-7d9f8b6c5d-x2x4z").workload_name, "web");
}

#[test]
fn workload_name_comes_from_matching_deployment() {
    let deployment = yaml(
        "
        apiVersion: apps/v1
        kind: Deployment
        metadata: {name: web, namespace: ns}
        spec:
          selector: {matchLabels: {app: web}}
          template: {metadata: {labels: {app: web}}}
        ",
    );
    let m = build(&format!("{deployment}{}", pod("ns", "web-1", "10.0.0.1", &[("app", "web")])));
    assert_eq!(workload(&m, "ns", "web-1").workload_name, "web");
}

const DEPLOYMENT: &str = r#"
    apiVersion: apps/v1
    kind: Deployment
    metadata:
      name: web
      namespace: ns
      annotations:
        mesh.local/pod-ips: "10.0.0.5, 10.0.0.6"
        mesh.local/nodes: node-a,node-b
    spec:
      replicas: 2
      selector: {matchLabels: {app: web}}
      template:
        metadata: {labels: {app: web, version: v1}}
        spec: {serviceAccountName: web}
"#;

#[test]
fn deployment_expands_into_pods_with_annotated_ips_and_nodes() {
    let m = build(&yaml(DEPLOYMENT));
    let mut ws: Vec<_> = m.workloads.values().collect();
    ws.sort_by_key(|w| w.addresses[0]);
    assert_eq!(ws.len(), 2);
    assert_eq!(ws[0].addresses, vec![ip("10.0.0.5")]);
    assert_eq!(ws[0].node, "node-a");
    assert_eq!(ws[1].node, "node-b");
    for w in &ws {
        assert!(w.name.starts_with("web-"), "{}", w.name);
        assert_eq!(w.workload_name, "web");
        assert_eq!(w.service_account, "web");
        assert_eq!(w.canonical_revision, "v1");
        assert!(w.labels.contains_key("pod-template-hash"));
    }
    assert_ne!(ws[0].name, ws[1].name);
    let again = build(&yaml(DEPLOYMENT));
    assert_eq!(again.workloads.keys().collect::<Vec<_>>(), m.workloads.keys().collect::<Vec<_>>(), "stable names");
}

#[test]
fn deployment_with_wrong_ip_count_is_rejected() {
    let m = build(&yaml(DEPLOYMENT).replace("replicas: 2", "replicas: 3"));
    let Outcome::Error(reason) = outcome(&m, "Deployment", "ns", "web") else { panic!("not rejected") };
    assert!(reason.contains("2 IPs for 3 replicas"), "{reason}");
    assert!(m.workloads.is_empty());
}

#[test]
fn deployment_without_ip_annotation_loads_without_workloads() {
    let m = build(&yaml(
        "
        apiVersion: apps/v1
        kind: Deployment
        metadata: {name: web}
        spec:
          template: {metadata: {labels: {app: web}}}
        ",
    ));
    assert_no_errors(&m);
    assert!(m.workloads.is_empty());
    assert!(matches!(outcome(&m, "Deployment", "default", "web"), Outcome::Warning(_)));
}

const SERVICE: &str = "
    apiVersion: v1
    kind: Service
    metadata: {name: web, namespace: ns}
    spec:
      clusterIP: 10.96.0.1
      selector: {app: web}
      ports:
      - {name: http, port: 80, targetPort: 8080}
      - {name: grpc-api, port: 90, targetPort: http}
      - {name: metrics, port: 91, targetPort: metrics}
      - {port: 92}
";

#[test]
fn service_ports_and_selector_join_workloads() {
    let text = format!(
        "{}{}{}",
        yaml(SERVICE),
        pod("ns", "web-1", "10.0.0.1", &[("app", "web")]),
        pod("ns", "other", "10.0.0.2", &[("app", "other")])
    );
    let m = build(&text);
    let s = &m.services["ns/web.ns.svc.cluster.local"];
    assert_eq!(s.vips, vec![ip("10.96.0.1")]);
    let pm = |service_port, target_port, app_protocol| PortMapping { service_port, target_port, app_protocol };
    assert_eq!(
        s.ports,
        vec![
            pm(80, 8080, AppProtocol::Http11),
            pm(90, 0, AppProtocol::Grpc),
            pm(91, 0, AppProtocol::Unknown),
            pm(92, 92, AppProtocol::Unknown)
        ],
        "named target ports are resolved per workload (0 on the service)"
    );
    let joined = &workload(&m, "ns", "web-1").services["ns/web.ns.svc.cluster.local"];
    assert_eq!(
        joined,
        &vec![pm(80, 8080, AppProtocol::Http11), pm(90, 8080, AppProtocol::Grpc), pm(92, 92, AppProtocol::Unknown)],
        "`http` resolves to the container port; `metrics` is not on the pod and is left out"
    );
    assert!(workload(&m, "ns", "other").services.is_empty());
    assert!(matches!(outcome(&m, "Service", "ns", "web"), Outcome::Warning(w) if w.contains("\"metrics\"")));
}

#[test]
fn services_in_other_namespaces_do_not_select() {
    let m = build(&(yaml(SERVICE) + &pod("elsewhere", "web-1", "10.0.0.1", &[("app", "web")])));
    assert!(workload(&m, "elsewhere", "web-1").services.is_empty());
}

#[test]
fn invalid_cluster_ip_rejects_the_service() {
    let m = build(&yaml(SERVICE).replace("10.96.0.1", "10.96.0.300"));
    assert!(matches!(outcome(&m, "Service", "ns", "web"), Outcome::Error(r) if r.contains("10.96.0.300")));
    assert!(m.services.is_empty());
}

/// A waypoint Gateway taking all traffic, and a second one.
fn waypoints() -> String {
    let gw = |name: &str, for_: &str| {
        yaml(&format!(
            "
            ---
            apiVersion: gateway.networking.k8s.io/v1
            kind: Gateway
            metadata:
              name: {name}
              namespace: ns
              labels: {{istio.io/waypoint-for: {for_}}}
            spec:
              gatewayClassName: istio-waypoint
              listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]
            "
        ))
    };
    gw("wp-ns", "all") + &gw("wp-own", "all") + &gw("wp-svc-only", "service")
}

fn hostname_waypoint(name: &str) -> Option<WaypointAddress> {
    Some(WaypointAddress {
        destination: WaypointDestination::Hostname {
            namespace: "ns".into(),
            hostname: format!("{name}.ns.svc.cluster.local"),
        },
        hbone_mtls_port: 15008,
    })
}

#[test]
fn use_waypoint_pod_label_beats_namespace_label() {
    let text = waypoints()
        + &namespace("ns", &[("istio.io/use-waypoint", "wp-ns")])
        + &pod("ns", "own", "10.0.0.1", &[("istio.io/use-waypoint", "wp-own")])
        + &pod("ns", "inherits", "10.0.0.2", &[])
        + &pod("ns", "optout", "10.0.0.3", &[("istio.io/use-waypoint", "none")]);
    let m = build(&text);
    assert_no_errors(&m);
    assert_eq!(workload(&m, "ns", "own").waypoint, hostname_waypoint("wp-own"));
    assert_eq!(workload(&m, "ns", "inherits").waypoint, hostname_waypoint("wp-ns"));
    assert_eq!(workload(&m, "ns", "optout").waypoint, None);
}

#[test]
fn use_waypoint_service_label_beats_namespace_label() {
    let svc = |name: &str, label: &str| {
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: ns\n  labels: {{{label}}}\n\
             spec: {{clusterIP: 10.96.0.{}, ports: [{{port: 80}}]}}\n",
            name.len()
        )
    };
    let text = waypoints()
        + &namespace("ns", &[("istio.io/use-waypoint", "wp-ns")])
        + &svc("own", "istio.io/use-waypoint: wp-own")
        + &svc("inherits", "")
        + &svc("optout", "istio.io/use-waypoint: none");
    let m = build(&text);
    assert_no_errors(&m);
    let waypoint = |n: &str| m.services[&format!("ns/{n}.ns.svc.cluster.local")].waypoint.clone();
    assert_eq!(waypoint("own"), hostname_waypoint("wp-own"));
    assert_eq!(waypoint("inherits"), hostname_waypoint("wp-ns"));
    assert_eq!(waypoint("optout"), None);
}

#[test]
fn service_label_does_not_set_the_waypoint_of_its_pods() {
    // Istio: a service's waypoint is for traffic to the service; the pods keep their own (here none).
    let text = waypoints()
        + &yaml(
            "
            ---
            apiVersion: v1
            kind: Service
            metadata: {name: web, namespace: ns, labels: {istio.io/use-waypoint: wp-own}}
            spec: {clusterIP: 10.96.0.1, selector: {app: web}, ports: [{port: 80}]}
            ",
        )
        + &pod("ns", "web-1", "10.0.0.1", &[("app", "web")]);
    let m = build(&text);
    assert_eq!(m.services["ns/web.ns.svc.cluster.local"].waypoint, hostname_waypoint("wp-own"));
    assert_eq!(workload(&m, "ns", "web-1").waypoint, None);
}

#[test]
fn service_only_waypoint_binds_services_not_workloads() {
    let text = waypoints()
        + &namespace("ns", &[("istio.io/use-waypoint", "wp-svc-only")])
        + &pod("ns", "inherits", "10.0.0.1", &[])
        + &pod("ns", "asks", "10.0.0.2", &[("istio.io/use-waypoint", "wp-svc-only")]);
    let m = build(&text);
    assert_eq!(workload(&m, "ns", "inherits").waypoint, None, "namespace-wide: silently not for workloads");
    assert_eq!(workload(&m, "ns", "asks").waypoint, None);
    assert!(matches!(outcome(&m, "Pod", "ns", "asks"), Outcome::Warning(w) if w.contains("workload traffic")));
}

#[test]
fn missing_waypoint_is_reported_on_the_object() {
    let m = build(&pod("ns", "a", "10.0.0.1", &[("istio.io/use-waypoint", "nope")]));
    assert_eq!(workload(&m, "ns", "a").waypoint, None);
    assert!(matches!(outcome(&m, "Pod", "ns", "a"), Outcome::Warning(w) if w.contains("ns/nope not found")));
}

#[test]
fn service_named_by_use_waypoint_stands_in_for_a_gateway() {
    let waypoint = yaml(
        "
        apiVersion: v1
        kind: Service
        metadata: {name: waypoint, namespace: ns, labels: {istio.io/waypoint-for: all}}
        spec: {clusterIP: 10.96.0.9, selector: {app: waypoint}, ports: [{port: 15008}]}
        ",
    );
    let text = waypoint
        + &namespace("ns", &[("istio.io/use-waypoint", "waypoint")])
        + &pod("ns", "app", "10.0.0.1", &[])
        + &pod("ns", "waypoint-pod", "10.0.0.9", &[("app", "waypoint")]);
    let m = build(&text);
    assert_no_errors(&m);
    assert_eq!(workload(&m, "ns", "app").waypoint, hostname_waypoint("waypoint"));
    assert_eq!(workload(&m, "ns", "waypoint-pod").waypoint, None, "a waypoint's own pods have none");
    assert_eq!(m.services["ns/waypoint.ns.svc.cluster.local"].waypoint, None, "nor does its service");
}

#[test]
fn malformed_documents_and_objects_are_reported_while_the_rest_applies() {
    let text = format!(
        "{}---\nkind: Pod\napiVersion: v1\nmetadata: {{name: broken}}\nspec: [not, a, mapping]\n\
         ---\nkey: [unclosed\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: cm}}\n{}",
        pod("ns", "good", "10.0.0.1", &[]),
        pod("ns", "also-good", "10.0.0.2", &[])
    );
    let m = build(&text);
    assert_eq!(m.workloads.len(), 2, "the good pods still apply");
    let errors: Vec<_> = m.errors().collect();
    assert_eq!(errors.len(), 2, "{errors:?}");
    let broken = errors[0];
    assert_eq!(broken.origin.file, Path::new("test.yaml"));
    assert_eq!(broken.object.as_ref().map(|o| o.to_string()).as_deref(), Some("Pod default/broken"));
    assert!(matches!(&broken.outcome, Outcome::Error(r) if r.contains("PodSpec")), "{broken}");
    let not_yaml = errors[1];
    assert_eq!(not_yaml.object, None);
    assert_eq!((not_yaml.origin.document, not_yaml.origin.line), (2, 23), "third document, starting at its `---`");
    assert!(matches!(&not_yaml.outcome, Outcome::Error(r) if r.contains("not valid YAML")), "{not_yaml}");
    assert!(matches!(outcome(&m, "ConfigMap", "default", "cm"), Outcome::Ignored(_)));
}

#[test]
fn duplicate_object_is_rejected_naming_the_first() {
    let m = build_files(&[("a.yaml", &pod("ns", "p", "10.0.0.1", &[])), ("b.yaml", &pod("ns", "p", "10.0.0.2", &[]))]);
    assert_eq!(workload(&m, "ns", "p").addresses, vec![ip("10.0.0.1")]);
    let e: Vec<_> = m.errors().collect();
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].origin.file, Path::new("b.yaml"));
    assert!(e[0].to_string().contains("already defined at a.yaml"), "{}", e[0]);
}

#[test]
fn pod_reusing_an_address_is_rejected() {
    let m = build(&(pod("ns", "a", "10.0.0.1", &[]) + &pod("ns", "b", "10.0.0.1", &[])));
    assert_eq!(m.workloads.len(), 1);
    assert!(
        matches!(outcome(&m, "Pod", "ns", "b"), Outcome::Error(r) if r.contains("already used by Kubernetes//Pod/ns/a"))
    );
}

#[test]
fn demo_configuration_loads_with_expected_counts() {
    let m = crate::controller::load(&demo_dir(), Options::default()).expect("deploy/demo is readable");
    assert_no_errors(&m);
    assert!(m.status().iter().all(|s| s.outcome == Outcome::Ok), "{:#?}", m.status());
    assert_eq!(m.workloads.len(), 6);
    assert_eq!(m.services.len(), 4);
    assert_eq!(m.service_accounts.len(), 4);
    assert_eq!(m.authorizations.len(), 1);
    assert!(m.workloads.values().all(|w| w.tunnel_protocol == TunnelProtocol::Hbone));
    let reviews =
        m.workloads.values().filter(|w| w.services.contains_key("bookinfo/reviews.bookinfo.svc.cluster.local"));
    assert_eq!(reviews.clone().count(), 3);
    assert!(reviews.clone().all(|w| w.authorization_policies == ["bookinfo/reviews-from-productpage"]));
    let productpage = m.workloads.values().find(|w| w.workload_name == "productpage-v1").expect("productpage");
    assert_eq!((productpage.addresses[0], productpage.node.as_str()), (ip("10.244.0.10"), "node-a"));
    assert_eq!(productpage.service_account, "bookinfo-productpage");
}

#[test]
fn istio_bookinfo_sample_loads_unchanged() {
    let Some(samples) = istio_samples() else {
        println!("istio_bookinfo_sample_loads_unchanged: ../shared/fixtures/istio-samples absent, not run");
        return;
    };
    let m = crate::controller::load(&samples.join("bookinfo/platform/bookinfo.yaml"), Options::default()).unwrap();
    assert_no_errors(&m);
    assert!(m.workloads.is_empty(), "its Deployments give no pod IPs");
    let services: Vec<_> = m.services.keys().map(String::as_str).collect();
    assert_eq!(
        services,
        [
            "default/details.default.svc.cluster.local",
            "default/productpage.default.svc.cluster.local",
            "default/ratings.default.svc.cluster.local",
            "default/reviews.default.svc.cluster.local"
        ]
    );
    assert_eq!(m.service_accounts.len(), 4);
}
