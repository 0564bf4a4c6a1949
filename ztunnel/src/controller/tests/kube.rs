//! Objects as a Kubernetes API server returns them (JSON with managedFields, resourceVersion, uid, status, list
//! items without apiVersion/kind) go through the live source's pure half and must give exactly the resources the
//! same objects written as YAML give. No API server runs here: these fixtures are what one would send.
use serde_json::{json, Value as Json};

use super::*;
use crate::controller::status::Origin;
use crate::controller::translate::translate;
use crate::controller::watched::{aggregate, Update, WatchedKind, WatchedObjects, WATCHED_KINDS};

/// A `managedFields` entry as the API server writes it (never read, but large).
fn managed(manager: &str) -> Json {
    json!([{
        "apiVersion": "v1",
        "fieldsType": "FieldsV1",
        "fieldsV1": {"f:metadata": {"f:labels": {".": {}, "f:app": {}}}, "f:spec": {}},
        "manager": manager,
        "operation": "Update",
        "time": "2024-05-01T10:00:00Z"
    }])
}

fn namespace_json() -> Json {
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "creationTimestamp": "2024-05-01T10:00:00Z",
            "labels": {"istio.io/dataplane-mode": "ambient", "kubernetes.io/metadata.name": "bookinfo"},
            "managedFields": managed("kubectl-client-side-apply"),
            "name": "bookinfo",
            "resourceVersion": "1201",
            "uid": "5f0c7a8e-8a5e-4d4b-9f1e-0d2b8b6c1a01"
        },
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"}
    })
}

fn service_account_json() -> Json {
    json!({
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {
            "creationTimestamp": "2024-05-01T10:00:01Z",
            "name": "bookinfo-reviews",
            "namespace": "bookinfo",
            "resourceVersion": "1210",
            "uid": "0b1e3c4d-1111-4c4c-8888-2a2b2c2d2e2f"
        }
    })
}

fn service_json() -> Json {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "annotations": {
                "kubectl.kubernetes.io/last-applied-configuration": "{\"apiVersion\":\"v1\",\"kind\":\"Service\"}\n"
            },
            "creationTimestamp": "2024-05-01T10:00:02Z",
            "labels": {"app": "reviews", "service": "reviews"},
            "managedFields": managed("kubectl-client-side-apply"),
            "name": "reviews",
            "namespace": "bookinfo",
            "resourceVersion": "1230",
            "uid": "7d2e9b10-2222-4a4a-9999-3a3b3c3d3e3f"
        },
        "spec": {
            "clusterIP": "10.96.0.12",
            "clusterIPs": ["10.96.0.12"],
            "internalTrafficPolicy": "Cluster",
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "ports": [{"name": "http", "port": 9080, "protocol": "TCP", "targetPort": 9080}],
            "selector": {"app": "reviews"},
            "sessionAffinity": "None",
            "type": "ClusterIP"
        },
        "status": {"loadBalancer": {}}
    })
}

fn deployment_json() -> Json {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "annotations": {"deployment.kubernetes.io/revision": "1"},
            "creationTimestamp": "2024-05-01T10:00:03Z",
            "generation": 1,
            "labels": {"app": "reviews", "version": "v1"},
            "managedFields": managed("kube-controller-manager"),
            "name": "reviews-v1",
            "namespace": "bookinfo",
            "resourceVersion": "48220",
            "uid": "9a8b7c6d-3333-4b4b-aaaa-4a4b4c4d4e4f"
        },
        "spec": {
            "progressDeadlineSeconds": 600,
            "replicas": 1,
            "revisionHistoryLimit": 10,
            "selector": {"matchLabels": {"app": "reviews", "version": "v1"}},
            "strategy": {"rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}, "type": "RollingUpdate"},
            "template": {
                "metadata": {"creationTimestamp": null, "labels": {"app": "reviews", "version": "v1"}},
                "spec": {
                    "containers": [{
                        "image": "docker.io/istio/examples-bookinfo-reviews-v1:1.20.1",
                        "imagePullPolicy": "IfNotPresent",
                        "name": "reviews",
                        "ports": [{"containerPort": 9080, "name": "http", "protocol": "TCP"}],
                        "resources": {},
                        "terminationMessagePath": "/dev/termination-log",
                        "terminationMessagePolicy": "File"
                    }],
                    "dnsPolicy": "ClusterFirst",
                    "restartPolicy": "Always",
                    "schedulerName": "default-scheduler",
                    "securityContext": {},
                    "serviceAccount": "bookinfo-reviews",
                    "serviceAccountName": "bookinfo-reviews",
                    "terminationGracePeriodSeconds": 30
                }
            }
        },
        "status": {
            "availableReplicas": 1,
            "conditions": [{
                "lastTransitionTime": "2024-05-01T10:00:09Z",
                "lastUpdateTime": "2024-05-01T10:00:09Z",
                "message": "Deployment has minimum availability.",
                "reason": "MinimumReplicasAvailable",
                "status": "True",
                "type": "Available"
            }],
            "observedGeneration": 1,
            "readyReplicas": 1,
            "replicas": 1,
            "updatedReplicas": 1
        }
    })
}

fn pod_json() -> Json {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "creationTimestamp": "2024-05-01T10:00:05Z",
            "generateName": "reviews-v1-5b8b9c6d9f-",
            "labels": {"app": "reviews", "pod-template-hash": "5b8b9c6d9f", "version": "v1"},
            "managedFields": managed("kubelet"),
            "name": "reviews-v1-5b8b9c6d9f-x7k2p",
            "namespace": "bookinfo",
            "ownerReferences": [{
                "apiVersion": "apps/v1",
                "blockOwnerDeletion": true,
                "controller": true,
                "kind": "ReplicaSet",
                "name": "reviews-v1-5b8b9c6d9f",
                "uid": "1c2d3e4f-4444-4c4c-bbbb-5a5b5c5d5e5f"
            }],
            "resourceVersion": "48213",
            "uid": "2d3e4f5a-5555-4d4d-cccc-6a6b6c6d6e6f"
        },
        "spec": {
            "containers": [{
                "image": "docker.io/istio/examples-bookinfo-reviews-v1:1.20.1",
                "imagePullPolicy": "IfNotPresent",
                "name": "reviews",
                "ports": [{"containerPort": 9080, "name": "http", "protocol": "TCP"}],
                "resources": {},
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File",
                "volumeMounts": [{
                    "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
                    "name": "kube-api-access-x2v9q",
                    "readOnly": true
                }]
            }],
            "dnsPolicy": "ClusterFirst",
            "enableServiceLinks": true,
            "nodeName": "node-a",
            "preemptionPolicy": "PreemptLowerPriority",
            "priority": 0,
            "restartPolicy": "Always",
            "schedulerName": "default-scheduler",
            "securityContext": {},
            "serviceAccount": "bookinfo-reviews",
            "serviceAccountName": "bookinfo-reviews",
            "terminationGracePeriodSeconds": 30,
            "tolerations": [{
                "effect": "NoExecute",
                "key": "node.kubernetes.io/not-ready",
                "operator": "Exists",
                "tolerationSeconds": 300
            }],
            "volumes": [{
                "name": "kube-api-access-x2v9q",
                "projected": {"defaultMode": 420, "sources": [{"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}}]}
            }]
        },
        "status": {
            "conditions": [
                {"lastProbeTime": null, "lastTransitionTime": "2024-05-01T10:00:05Z", "status": "True", "type": "PodScheduled"},
                {"lastProbeTime": null, "lastTransitionTime": "2024-05-01T10:00:06Z", "status": "True", "type": "Initialized"},
                {"lastProbeTime": null, "lastTransitionTime": "2024-05-01T10:00:09Z", "status": "True", "type": "ContainersReady"},
                {"lastProbeTime": null, "lastTransitionTime": "2024-05-01T10:00:09Z", "status": "True", "type": "Ready"}
            ],
            "containerStatuses": [{
                "containerID": "containerd://4b1f0c9e8d7a",
                "image": "docker.io/istio/examples-bookinfo-reviews-v1:1.20.1",
                "imageID": "docker.io/istio/examples-bookinfo-reviews-v1@sha256:00aa",
                "lastState": {},
                "name": "reviews",
                "ready": true,
                "restartCount": 0,
                "started": true,
                "state": {"running": {"startedAt": "2024-05-01T10:00:08Z"}}
            }],
            "hostIP": "172.18.0.2",
            "hostIPs": [{"ip": "172.18.0.2"}],
            "phase": "Running",
            "podIP": "10.244.0.11",
            "podIPs": [{"ip": "10.244.0.11"}, {"ip": "fd00:10:244::b"}],
            "qosClass": "BestEffort",
            "startTime": "2024-05-01T10:00:05Z"
        }
    })
}

fn authorization_policy_json(name: &str, spec: Json) -> Json {
    json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {
            "annotations": {
                "kubectl.kubernetes.io/last-applied-configuration":
                    "{\"apiVersion\":\"security.istio.io/v1\",\"kind\":\"AuthorizationPolicy\"}\n"
            },
            "creationTimestamp": "2024-05-01T10:01:00Z",
            "generation": 1,
            "managedFields": managed("kubectl-client-side-apply"),
            "name": name,
            "namespace": "bookinfo",
            "resourceVersion": "48500",
            "uid": "3e4f5a6b-6666-4e4e-dddd-7a7b7c7d7e7f"
        },
        "spec": spec,
        "status": {}
    })
}

fn reviews_policy_spec() -> Json {
    json!({
        "action": "ALLOW",
        "rules": [{
            "from": [{"source": {"principals": ["cluster.local/ns/bookinfo/sa/bookinfo-productpage"]}}],
            "to": [{"operation": {"ports": ["9080"]}}]
        }],
        "selector": {"matchLabels": {"app": "reviews"}}
    })
}

/// The same objects as someone would `kubectl apply` them.
const SAME_AS_YAML: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: bookinfo
  labels:
    istio.io/dataplane-mode: ambient
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: bookinfo-reviews
  namespace: bookinfo
---
apiVersion: v1
kind: Service
metadata:
  name: reviews
  namespace: bookinfo
  labels: {app: reviews, service: reviews}
spec:
  clusterIP: 10.96.0.12
  ipFamilies: [IPv4] # defaulted by the API server, and read (IPv4-only service)
  ports:
  - name: http
    port: 9080
    targetPort: 9080
  selector:
    app: reviews
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: reviews-v1
  namespace: bookinfo
  labels: {app: reviews, version: v1}
spec:
  replicas: 1
  selector:
    matchLabels: {app: reviews, version: v1}
  template:
    metadata:
      labels: {app: reviews, version: v1}
    spec:
      serviceAccountName: bookinfo-reviews
      containers:
      - name: reviews
        image: docker.io/istio/examples-bookinfo-reviews-v1:1.20.1
        ports:
        - {name: http, containerPort: 9080}
---
apiVersion: v1
kind: Pod
metadata:
  name: reviews-v1-5b8b9c6d9f-x7k2p
  namespace: bookinfo
  labels: {app: reviews, pod-template-hash: 5b8b9c6d9f, version: v1}
  ownerReferences:
  - {apiVersion: apps/v1, kind: ReplicaSet, name: reviews-v1-5b8b9c6d9f, controller: true}
spec:
  nodeName: node-a
  serviceAccountName: bookinfo-reviews
  containers:
  - name: reviews
    image: docker.io/istio/examples-bookinfo-reviews-v1:1.20.1
    ports:
    - {name: http, containerPort: 9080}
status:
  phase: Running
  podIP: 10.244.0.11
  podIPs:
  - ip: 10.244.0.11
  - ip: fd00:10:244::b
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: reviews-from-productpage
  namespace: bookinfo
spec:
  selector:
    matchLabels: {app: reviews}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: [cluster.local/ns/bookinfo/sa/bookinfo-productpage]
    to:
    - operation:
        ports: ["9080"]
"#;

/// `kind` (first match) in [`WATCHED_KINDS`].
fn watched(kind: &str) -> &'static WatchedKind {
    WATCHED_KINDS.iter().find(|k| k.kind == kind).unwrap()
}

/// Removes `apiVersion` and `kind`, as items of a list response come.
fn as_list_item(mut v: Json) -> Json {
    let map = v.as_object_mut().unwrap();
    map.remove("apiVersion");
    map.remove("kind");
    v
}

/// A watch state in which every kind has been listed: the fixtures, plus `policies`; CRDs other than
/// AuthorizationPolicy are not installed (listed empty).
fn listed(policies: Vec<Json>) -> WatchedObjects {
    let mut w = WatchedObjects::new();
    for kind in WATCHED_KINDS {
        let items = match kind.kind {
            // list items (no apiVersion/kind) and watch events (with them) must read the same
            "Namespace" => vec![as_list_item(namespace_json())],
            "Pod" => vec![pod_json()],
            "Service" => vec![as_list_item(service_json())],
            "ServiceAccount" => vec![service_account_json()],
            "Deployment" => vec![as_list_item(deployment_json())],
            "AuthorizationPolicy" => policies.clone(),
            _ => vec![],
        };
        w.replace(kind, items);
    }
    w
}

#[test]
fn api_server_json_translates_like_the_same_yaml() {
    let from_api = listed(vec![authorization_policy_json("reviews-from-productpage", reviews_policy_spec())]);
    assert!(from_api.synced());
    let from_api = Model::build(from_api.snapshot(), Options::default());
    let from_yaml = build(SAME_AS_YAML);
    assert_no_errors(&from_api);
    assert_no_errors(&from_yaml);
    let w = workload(&from_api, "bookinfo", "reviews-v1-5b8b9c6d9f-x7k2p");
    assert_eq!(w.addresses.len(), 2, "both status.podIPs");
    assert_eq!(w.workload_name, "reviews-v1");
    assert_eq!(from_api.services.len(), 1);
    assert_eq!(from_api.authorizations.len(), 1);
    assert_eq!(translate(&from_api), translate(&from_yaml));
    assert!(!translate(&from_api).addresses.is_empty());
    // every object is in the status, named by where it was watched
    let origins: Vec<String> = from_api.status().iter().map(|e| e.origin.to_string()).collect();
    assert!(origins.contains(&"kube://Pod/bookinfo/reviews-v1-5b8b9c6d9f-x7k2p".to_string()), "{origins:?}");
    assert!(origins.contains(&"kube://Namespace/bookinfo".to_string()), "{origins:?}");
}

#[test]
fn malformed_api_object_is_skipped_with_its_kube_name() {
    let w = listed(vec![
        authorization_policy_json("reviews-from-productpage", reviews_policy_spec()),
        authorization_policy_json("bad", json!({"action": "DENY", "rules": "everyone"})),
    ]);
    let m = Model::build(w.snapshot(), Options::default());
    let errors: Vec<String> = m.errors().map(|e| e.to_string()).collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(
        errors[0],
        "kube://AuthorizationPolicy.security.istio.io/bookinfo/bad: AuthorizationPolicy bookinfo/bad: error: \
         invalid type: string \"everyone\", expected a sequence"
    );
    assert_eq!(m.authorizations.len(), 1, "the rest applies");
    assert_eq!(m.workloads.len(), 1);
}

#[test]
fn snapshot_waits_for_every_kind_then_follows_watch_events() {
    let mut w = WatchedObjects::new();
    for kind in WATCHED_KINDS.iter().filter(|k| k.kind != "HTTPRoute") {
        w.replace(kind, vec![]);
    }
    w.apply(watched("Pod"), pod_json());
    assert!(!w.synced(), "HTTPRoute not listed yet");
    w.replace(watched("HTTPRoute"), vec![]); // CRD not installed: none of it
    assert!(w.synced());
    assert_eq!(w.snapshot().objects.len(), 1);

    // a watch event changing the pod replaces it
    let mut moved = pod_json();
    moved["status"]["podIPs"] = json!([{"ip": "10.244.0.99"}]);
    moved["metadata"]["resourceVersion"] = json!("48300");
    w.apply(watched("Pod"), moved);
    let m = Model::build(w.snapshot(), Options::default());
    let pod = workload(&m, "bookinfo", "reviews-v1-5b8b9c6d9f-x7k2p");
    assert_eq!(pod.addresses, vec!["10.244.0.99".parse::<std::net::IpAddr>().unwrap()]);

    // deletions read only the metadata
    w.apply(watched("Service"), service_json());
    assert_eq!(w.len(), 2);
    w.delete(watched("Service"), &json!({"metadata": {"name": "reviews", "namespace": "bookinfo"}}));
    assert_eq!(w.len(), 1);

    // a re-list (the watch's resource version expired) drops what it no longer lists
    w.replace(watched("Pod"), vec![]);
    assert!(w.is_empty());
    assert!(w.synced());
}

#[test]
fn managed_fields_and_unknown_fields_do_not_matter() {
    let mut without = pod_json();
    without["metadata"].as_object_mut().unwrap().remove("managedFields");
    without["status"].as_object_mut().unwrap().remove("containerStatuses");
    let (key, a) = crate::controller::watched::convert(watched("Pod"), pod_json());
    let (_, b) = crate::controller::watched::convert(watched("Pod"), without);
    assert_eq!(key, ("bookinfo".to_string(), "reviews-v1-5b8b9c6d9f-x7k2p".to_string()));
    assert_eq!(a.objects.len(), 1);
    assert_eq!(a, b, "fields the controller does not read parse to the same object");
}

#[test]
fn kube_origins_name_the_object_to_get() {
    assert_eq!(Origin::kube("Namespace", "", "", "bookinfo").to_string(), "kube://Namespace/bookinfo");
    assert_eq!(Origin::kube("Pod", "", "default", "web-1").to_string(), "kube://Pod/default/web-1");
    let istio = Origin::kube("Gateway", "networking.istio.io", "ingress", "gw");
    let gateway_api = Origin::kube("Gateway", "gateway.networking.k8s.io", "ingress", "gw");
    assert_eq!(istio.to_string(), "kube://Gateway.networking.istio.io/ingress/gw");
    assert_ne!(istio, gateway_api);
}

#[test]
fn json_that_is_not_an_object_is_reported() {
    let origin = Origin::kube("Pod", "", "default", "x");
    let s = crate::controller::source::parse_json_object(origin.clone(), json!(["not", "an", "object"]));
    assert!(s.objects.is_empty());
    assert_eq!(s.skipped.len(), 1);
    assert_eq!(s.skipped[0].origin, origin);
    assert!(s.skipped[0].outcome.is_error());
}

/// Sends every kind's first list (the fixtures' pod only), as the watchers would.
fn send_lists(tx: &tokio::sync::mpsc::UnboundedSender<(WatchedKind, Update)>, except: Option<&str>) {
    for kind in WATCHED_KINDS.iter().filter(|k| Some(k.kind) != except) {
        let items = if kind.kind == "Pod" { vec![pod_json()] } else { vec![] };
        tx.send((*kind, Update::Replace(items))).unwrap();
    }
}

/// Whether nothing is published for a while (well over the debounce).
async fn quiet(snaps: &mut tokio::sync::watch::Receiver<Option<std::sync::Arc<Snapshot>>>) -> bool {
    tokio::time::timeout(std::time::Duration::from_millis(150), snaps.changed()).await.is_err()
}

#[tokio::test]
async fn aggregate_publishes_once_listed_and_coalesces_bursts() {
    use std::time::Duration;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (snap_tx, mut snaps) = tokio::sync::watch::channel(None);
    let task = tokio::spawn(aggregate(rx, snap_tx, Duration::from_millis(30)));

    send_lists(&tx, Some("HTTPRoute"));
    assert!(quiet(&mut snaps).await, "nothing before every kind is listed");
    assert!(snaps.borrow().is_none());
    tx.send((*watched("HTTPRoute"), Update::Replace(vec![]))).unwrap();
    tokio::time::timeout(Duration::from_secs(5), snaps.changed()).await.unwrap().unwrap();
    assert_eq!(snaps.borrow_and_update().as_ref().unwrap().objects.len(), 1);

    // a burst (a service, its namespace, an edit of the pod) is one publication with all of it
    tx.send((*watched("Service"), Update::Apply(service_json()))).unwrap();
    tx.send((*watched("Namespace"), Update::Apply(namespace_json()))).unwrap();
    let mut moved = pod_json();
    moved["status"]["podIPs"] = json!([{"ip": "10.244.0.99"}]);
    tx.send((*watched("Pod"), Update::Apply(moved))).unwrap();
    tokio::time::timeout(Duration::from_secs(5), snaps.changed()).await.unwrap().unwrap();
    let published = snaps.borrow_and_update().clone().unwrap();
    assert_eq!(published.objects.len(), 3, "the whole burst in one snapshot");
    assert!(quiet(&mut snaps).await, "and only one");

    // a change to fields the controller does not read is not published
    let mut restarted = pod_json();
    restarted["status"]["podIPs"] = json!([{"ip": "10.244.0.99"}]);
    restarted["status"]["containerStatuses"][0]["restartCount"] = json!(1);
    restarted["metadata"]["resourceVersion"] = json!("49000");
    tx.send((*watched("Pod"), Update::Apply(restarted))).unwrap();
    assert!(quiet(&mut snaps).await, "same objects: nothing to push");

    tx.send((*watched("Service"), Update::Delete(service_json()))).unwrap();
    tokio::time::timeout(Duration::from_secs(5), snaps.changed()).await.unwrap().unwrap();
    assert_eq!(snaps.borrow_and_update().as_ref().unwrap().objects.len(), 2);

    drop(tx);
    tokio::time::timeout(Duration::from_secs(5), task).await.unwrap().unwrap();
}
