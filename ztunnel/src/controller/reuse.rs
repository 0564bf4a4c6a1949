//! What one model build leaves to the next, so that a small edit at scale does not rebuild every workload: with
//! 10,000 pods a full build took 80–150 ms, most of the time from a file edit to the change at the agent (see
//! docs/decisions.md). A pod's parsed form and its workload are taken over only when every input they were computed
//! from is the very same object as before (`Arc::ptr_eq`: the source caches unchanged objects, files and API
//! objects alike), and the entries hold those objects, so an address can never be taken by a different object
//! while an entry refers to it. What every workload reads besides its own pod (namespaces, nodes, service
//! accounts, deployments, the options, the waypoints) is one context, compared by value: any change there and
//! nothing is reused.
//! A build with reuse must equal a build from scratch; `controller/tests/reuse.rs` checks that edit by edit.
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::model::{Options, Workload};
use super::pods::PodInfo;
use super::source::Loaded;
use super::waypoint::Waypoint;

/// A warning a workload's build records, replayed when the workload is reused.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Warning {
    /// On the pod's own object.
    Pod(String),
    /// On its namespace's object (recorded once per namespace).
    Namespace(String),
}

/// The objects a workload was built from, besides the context.
#[derive(Debug, Clone)]
pub(super) struct Inputs {
    /// The Pod, or the Deployment that stands for it.
    pub source: Arc<Loaded>,
    /// The Service objects selecting it, in order.
    pub services: Vec<Arc<Loaded>>,
}

impl Inputs {
    /// `source` and the services `selecting` it (their objects' indices in `loaded`).
    pub(super) fn new(source: &Arc<Loaded>, selecting: &[usize], loaded: &[Arc<Loaded>]) -> Self {
        Inputs { source: source.clone(), services: selecting.iter().map(|&i| loaded[i].clone()).collect() }
    }

    /// Whether these are `source` and the services `selecting` it (their objects' indices in `loaded`).
    fn are(&self, source: &Arc<Loaded>, selecting: &[usize], loaded: &[Arc<Loaded>]) -> bool {
        Arc::ptr_eq(&self.source, source)
            && self.services.len() == selecting.len()
            && self.services.iter().zip(selecting).all(|(s, &i)| Arc::ptr_eq(s, &loaded[i]))
    }
}

/// A workload as built, with what it was built from and the warnings building it recorded.
#[derive(Debug, Clone)]
pub(super) struct Built {
    pub inputs: Inputs,
    pub workload: Arc<Workload>,
    pub warnings: Vec<Warning>,
}

impl Built {
    /// This workload listing `keys` as its policies (a copy only when they changed).
    pub(super) fn with_policies(self: &Arc<Self>, keys: Vec<String>) -> Arc<Built> {
        if self.workload.authorization_policies == keys {
            return self.clone();
        }
        let workload = Workload { authorization_policies: keys, ..(*self.workload).clone() };
        Arc::new(Built { workload: Arc::new(workload), inputs: self.inputs.clone(), warnings: self.warnings.clone() })
    }
}

/// Where a pod comes from: its object's address, and its place among the pods that object stands for (a
/// Deployment stands for several).
pub(super) type PodKey = (usize, usize);

/// A Pod object read: what the model needs of it, or why it is rejected.
pub(super) type Parsed = Result<Arc<PodInfo>, String>;

/// The inputs every workload shares.
#[derive(Debug, Clone, Default)]
pub(super) struct Context {
    options: Option<Options>,
    /// Namespaces, Nodes, ServiceAccounts and Deployments, in snapshot order.
    objects: Vec<Arc<Loaded>>,
}

/// The kinds whose objects are part of every workload's context.
const CONTEXT_KINDS: [&str; 4] = ["Namespace", "Node", "ServiceAccount", "Deployment"];

impl Context {
    pub(super) fn of(options: &Options, loaded: &[Arc<Loaded>]) -> Self {
        let objects = loaded.iter().filter(|l| CONTEXT_KINDS.contains(&l.object.kind())).cloned().collect();
        Context { options: Some(options.clone()), objects }
    }

    /// Compared by value (the same object first): an API server re-sends a Deployment or Node on every status
    /// update, and none of the fields read here change with status.
    fn same(&self, other: &Context) -> bool {
        self.options.is_some()
            && self.options == other.options
            && self.objects.len() == other.objects.len()
            && self.objects.iter().zip(&other.objects).all(|(a, b)| Arc::ptr_eq(a, b) || a == b)
    }
}

/// Results of one build, for the next.
#[derive(Clone, Default)]
pub(super) struct Reuse {
    context: Context,
    waypoints: BTreeMap<String, Waypoint>,
    /// Parsed pods by their object's address (the entry holds the object).
    pods: HashMap<usize, (Arc<Loaded>, Parsed)>,
    /// Workloads by the pod they were built for.
    workloads: HashMap<PodKey, Arc<Built>>,
}

impl std::fmt::Debug for Reuse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Reuse {{ {} pods, {} workloads }}", self.pods.len(), self.workloads.len())
    }
}

impl Reuse {
    /// An empty record for a build in `context`.
    pub(super) fn new(context: Context, objects: usize) -> Self {
        let (pods, workloads) = (HashMap::with_capacity(objects), HashMap::with_capacity(objects));
        Reuse { context, pods, workloads, ..Reuse::default() }
    }

    /// Whether results recorded under `context` may be used in a build under this one.
    pub(super) fn applies_to(&self, context: &Context) -> bool {
        self.context.same(context)
    }

    /// The parsed form of `pod`, when it was parsed before.
    pub(super) fn pod(&self, pod: &Arc<Loaded>) -> Option<Parsed> {
        let (object, info) = self.pods.get(&address(pod))?;
        Arc::ptr_eq(object, pod).then(|| info.clone())
    }

    pub(super) fn remember_pod(&mut self, pod: &Arc<Loaded>, info: Parsed) {
        self.pods.insert(address(pod), (pod.clone(), info));
    }

    /// Whether workloads recorded here were built with these `waypoints` (they decide each workload's waypoint and
    /// whether it is a waypoint instance).
    pub(super) fn same_waypoints(&self, waypoints: &BTreeMap<String, Waypoint>) -> bool {
        self.waypoints == *waypoints
    }

    /// The workload of pod `key` as built before from the same objects: the pod's `source` and the services
    /// `selecting` it, as indices in `loaded` (under the same context and waypoints).
    pub(super) fn workload(
        &self,
        key: PodKey,
        source: &Arc<Loaded>,
        selecting: &[usize],
        loaded: &[Arc<Loaded>],
    ) -> Option<&Arc<Built>> {
        self.workloads.get(&key).filter(|b| b.inputs.are(source, selecting, loaded))
    }

    pub(super) fn remember_workload(&mut self, key: PodKey, built: Arc<Built>) {
        self.workloads.insert(key, built);
    }

    pub(super) fn set_waypoints(&mut self, waypoints: BTreeMap<String, Waypoint>) {
        self.waypoints = waypoints;
    }
}

/// The address `Arc` gives an object: what entries are keyed by.
pub(super) fn address(l: &Arc<Loaded>) -> usize {
    Arc::as_ptr(l) as usize
}
