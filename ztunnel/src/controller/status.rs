//! What happened to each object the controller read: applied, applied with a caveat, ignored, or rejected with a
//! reason. Both the source (files that are not YAML, documents that are not objects) and the model (objects that
//! are malformed or unsupported) report here, so an operator sees every problem in one list, each with the file,
//! the document and the object it is about.
use std::fmt;
use std::path::PathBuf;

use super::objects::ObjectRef;

/// Where an object came from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Origin {
    /// The file, or `kube://<Kind>[.<group>]/[<namespace>/]<name>` for an object of a live API server.
    pub file: PathBuf,
    /// 0-based index of the YAML document in the file.
    pub document: usize,
    /// 1-based line the document starts on; 0 for an object that was not read from a file.
    pub line: usize,
    /// 0-based index in a `kind: List`'s `items`.
    pub item: Option<usize>,
}

impl Origin {
    /// An object watched on a Kubernetes API server, named so that status lines and logs say which object to
    /// `kubectl get`: `kube://Pod/default/web-1`, `kube://Deployment.apps/default/web`,
    /// `kube://Gateway.gateway.networking.k8s.io/istio-ingress/gw`, `kube://Namespace/default` (the group keeps
    /// Istio's and the Gateway API's `Gateway` apart).
    pub fn kube(kind: &str, group: &str, namespace: &str, name: &str) -> Origin {
        let kind = if group.is_empty() { kind.to_string() } else { format!("{kind}.{group}") };
        let path = if namespace.is_empty() { format!("{kind}/{name}") } else { format!("{kind}/{namespace}/{name}") };
        Origin { file: PathBuf::from(format!("kube://{path}")), document: 0, line: 0, item: None }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            return write!(f, "{}", self.file.display()); // not from a file: no line or document to point at
        }
        write!(f, "{}:{} (document {}", self.file.display(), self.line, self.document + 1)?;
        if let Some(i) = self.item {
            write!(f, ", item {}", i + 1)?;
        }
        f.write_str(")")
    }
}

/// The verdict on one object or document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Applied as written.
    Ok,
    /// Applied, but not exactly as written (e.g. HTTP rules dropped from a policy no waypoint enforces).
    Warning(String),
    /// Not something the controller reads (another kind); skipped without affecting anything.
    Ignored(String),
    /// Rejected: the object (or document) is left out and the rest still applies.
    Error(String),
}

impl Outcome {
    /// Whether this is a rejection.
    pub fn is_error(&self) -> bool {
        matches!(self, Outcome::Error(_))
    }
}

/// One line of [`super::Model::status`]: the file, the object (when it could be read) and what happened to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusEntry {
    pub origin: Origin,
    /// Kind, namespace and name, as far as they could be read; `None` when the document is not an object.
    pub object: Option<ObjectRef>,
    pub outcome: Outcome,
}

impl fmt::Display for StatusEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.origin)?;
        match &self.object {
            Some(o) => write!(f, "{o}: ")?,
            None => f.write_str("document: ")?,
        }
        match &self.outcome {
            Outcome::Ok => f.write_str("ok"),
            Outcome::Warning(r) => write!(f, "warning: {r}"),
            Outcome::Ignored(r) => write!(f, "ignored: {r}"),
            Outcome::Error(r) => write!(f, "error: {r}"),
        }
    }
}
