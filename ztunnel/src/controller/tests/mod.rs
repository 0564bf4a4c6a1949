//! Tests of the translation core on YAML fixtures: one behaviour per test. Helpers here build a model from inline
//! YAML and ask the data plane's own policy engine what a translated policy decides.
mod authz;
mod dir_watch;
mod kube;
mod model;
mod reuse;
mod routes;
mod source;
mod translate;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use super::model::{Model, Options, Workload};
use super::source::{parse_text, Snapshot};
use super::status::Outcome;
use crate::identity::Identity;
use crate::policy::{evaluate, ConnectionFacts, Decision, PolicyTarget};

/// Builds a model from one inline file.
fn build(yaml: &str) -> Model {
    build_files(&[("test.yaml", yaml)])
}

/// Builds a model from several inline files.
fn build_files(files: &[(&str, &str)]) -> Model {
    let mut snapshot = Snapshot::default();
    for (name, text) in files {
        let s = parse_text(Path::new(name), text);
        snapshot.objects.extend(s.objects);
        snapshot.skipped.extend(s.skipped);
    }
    Model::build(snapshot, Options::default())
}

/// Fails with the whole status when anything was rejected.
fn assert_no_errors(m: &Model) {
    let errors: Vec<String> = m.errors().map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "unexpected errors:\n{}", errors.join("\n"));
}

/// The outcome recorded for `kind namespace/name`.
fn outcome(m: &Model, kind: &str, namespace: &str, name: &str) -> Outcome {
    m.status()
        .iter()
        .find(|s| s.object.as_ref().is_some_and(|o| o.kind == kind && o.namespace == namespace && o.name == name))
        .unwrap_or_else(|| panic!("no status for {kind} {namespace}/{name}"))
        .outcome
        .clone()
}

/// The workload of pod `namespace/name`.
fn workload<'m>(m: &'m Model, namespace: &str, name: &str) -> &'m Workload {
    m.workloads
        .get(&format!("Kubernetes//Pod/{namespace}/{name}"))
        .unwrap_or_else(|| panic!("no workload {namespace}/{name}; have {:?}", m.workloads.keys().collect::<Vec<_>>()))
}

/// A pod with an IP and labels (YAML text).
fn pod(namespace: &str, name: &str, ip: &str, labels: &[(&str, &str)]) -> String {
    let labels: String = labels.iter().map(|(k, v)| format!("\n    {k}: \"{v}\"")).collect();
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  labels:{}{labels}\n\
         spec:\n  serviceAccountName: sa-{name}\n  nodeName: node-a\n  containers:\n  - name: app\n    ports:\n    \
         - name: http\n      containerPort: 8080\nstatus:\n  podIP: {ip}\n",
        if labels.is_empty() { " {}" } else { "" }
    )
}

/// A namespace with labels (YAML text).
fn namespace(name: &str, labels: &[(&str, &str)]) -> String {
    let labels: String = labels.iter().map(|(k, v)| format!("\n    {k}: \"{v}\"")).collect();
    format!(
        "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n  labels:{}{labels}\n",
        if labels.is_empty() { " {}" } else { "" }
    )
}

/// What the policies of `m` decide for a connection to workload `w` on `port`, from `source_ip` with identity
/// `source` (`None`: plaintext).
fn decide(m: &Model, w: &Workload, source: Option<&str>, source_ip: &str, port: u16) -> Decision {
    let policies: Vec<_> = m.authorizations.values().cloned().collect();
    let target = PolicyTarget { uid: &w.uid, namespace: &w.namespace, selected_by: &w.authorization_policies };
    let facts = ConnectionFacts {
        source_identity: source.map(|s| s.parse::<Identity>().expect("identity")),
        source_ip: source_ip.parse::<IpAddr>().expect("ip"),
        destination: SocketAddr::new(w.addresses[0], port),
    };
    evaluate(&policies, &target, &facts)
}

/// `deploy/demo` of this repository.
fn demo_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/demo")
}

/// The shared Istio sample fixtures, when this checkout has them beside it.
fn istio_samples() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/istio-samples");
    dir.is_dir().then_some(dir)
}

/// An indented YAML literal as YAML: drops the first line break and the indentation common to all lines, so
/// fixtures can be written as YAML inside the test.
fn yaml(text: &str) -> String {
    let text = text.strip_prefix('\n').unwrap_or(text);
    let indent = text.lines().filter(|l| !l.trim().is_empty()).map(|l| l.len() - l.trim_start().len()).min();
    let indent = indent.unwrap_or(0);
    text.lines().map(|l| format!("{}\n", l.get(indent..).unwrap_or("").trim_end())).collect()
}
