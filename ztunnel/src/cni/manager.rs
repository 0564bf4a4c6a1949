//! The core of `ztunnel cni`: one task that owns what the daemon knows and decides which pods
//! a node agent must serve. A pod is enrolled when the plugin reported it (ADD, or from a
//! record kept across a restart) AND the control plane has it on this node as an HBONE
//! (ambient) workload; it is released when the plugin deletes it or the control plane stops
//! putting it in the mesh (e.g. the namespace label was removed). Every change of either
//! input re-runs the same reconciliation, so a label flip enrolls or releases running pods.
//!
//! Agents: a newly connected agent gets a snapshot (an Add for every pod it must serve, then
//! `SnapshotSent`, after which it drops whatever else it held); later Adds go to the newest
//! agent, Dels to every connected one (as istio-cni does, so an older agent still draining
//! also lets go). A plugin DEL is answered only after those Dels were acked. No snapshot is sent before the control plane's first full state: an empty
//! snapshot would make the agent release every pod.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::api::{PluginRequest, PluginResponse};
use super::records::{self, PodRecord};
use super::CniStatus;
use crate::enrollment::{
    workload_request::Payload, AddWorkload, DelWorkload, SnapshotSent, WorkloadInfo, WorkloadRequest,
};
use crate::redirect::valid_pod_uid;
use crate::state::{PodMatch, Snapshot, StateStore, WorkloadProtocol};

/// How soon a pod whose Add an agent refused is offered again.
const RETRY: Duration = Duration::from_secs(2);

/// What reaches the manager.
pub(super) enum Event {
    Plugin(PluginRequest, oneshot::Sender<PluginResponse>),
    AgentConnected(AgentLink),
    AgentClosed(u64),
}

/// The outcome of one request to an agent: `Err` = the connection is gone, `Ok(Err)` = an
/// Ack carrying an error.
pub(super) type Exchange = Result<Result<(), String>, String>;

/// One request for an agent connection's task.
pub(super) struct AgentRequest {
    pub bytes: Vec<u8>,
    pub netns: Option<File>,
    pub reply: oneshot::Sender<Exchange>,
}

/// A connected agent, as the manager sees it: how to reach it and which pods it holds
/// because we added them on this connection.
pub(super) struct AgentLink {
    id: u64,
    tx: mpsc::Sender<AgentRequest>,
    enrolled: BTreeSet<String>,
}

impl AgentLink {
    pub(super) fn new(id: u64, tx: mpsc::Sender<AgentRequest>) -> Self {
        Self { id, tx, enrolled: BTreeSet::new() }
    }

    async fn request(&self, payload: Payload, netns: Option<File>) -> Exchange {
        let bytes = WorkloadRequest { payload: Some(payload) }.encode_to_vec();
        let (reply, answer) = oneshot::channel();
        let gone = || format!("agent {}: connection closed", self.id);
        self.tx.send(AgentRequest { bytes, netns, reply }).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

/// A plugin ADD waiting for its verdict (control-plane state, the agent's Ack).
struct Parked {
    uid: String,
    container_id: String,
    deadline: Instant,
    reply: oneshot::Sender<PluginResponse>,
}

/// Where the control plane puts a pod.
/// Why an ambiguous pod's ADD fails.
const AMBIGUOUS: &str = "the control plane has more than one Pod workload of this name on this node";

enum Membership {
    /// Not (yet) a workload in the control plane's state.
    Unknown,
    /// A workload, but not an HBONE one on this node.
    Outside,
    /// More than one Pod workload of this name on this node: which identity and policies
    /// apply cannot be told, so the pod must not start (neither in nor out of the mesh).
    Ambiguous,
    /// In the mesh: enroll it with this identity.
    Ambient(WorkloadInfo),
}

/// A parked ADD's verdict: final, or what to answer if its deadline passes first.
enum Verdict {
    Decided(Result<(), String>),
    Pending(Result<(), String>),
}

/// Settings the manager needs from the daemon's config.
pub(super) struct ManagerConfig {
    pub state_dir: PathBuf,
    pub zds_socket: PathBuf,
    pub enroll_wait: Duration,
}

pub(super) struct Manager {
    cfg: ManagerConfig,
    store: Arc<StateStore>,
    pods: BTreeMap<String, PodRecord>,
    /// Agents that have had their snapshot, oldest first; Adds go to the last.
    agents: Vec<AgentLink>,
    /// Agents connected before the control plane's first state; their snapshot waits.
    waiting: Vec<AgentLink>,
    parked: Vec<Parked>,
    /// Plugin DELs to answer once this round's reconciliation has released their pods from
    /// every connected agent (each Del acked, or its agent gone): a DEL that returns means
    /// no agent serves the pod any more.
    deleted: Vec<oneshot::Sender<PluginResponse>>,
    /// Pods an agent refused (or whose netns could not be opened), with the reason.
    add_errors: HashMap<String, String>,
    retry_at: Option<Instant>,
    status: watch::Sender<CniStatus>,
    /// eBPF capture this daemon installs for an agent that brings none (`--ebpf-capture`).
    capture: Option<super::capture::PodCapture>,
}

impl Manager {
    /// Starts from the records kept by a previous run; pods whose netns is gone were deleted
    /// while we were down and are forgotten (so the next snapshot releases them).
    pub(super) fn new(
        cfg: ManagerConfig,
        store: Arc<StateStore>,
        status: watch::Sender<CniStatus>,
        capture: Option<super::capture::PodCapture>,
    ) -> Self {
        let mut pods = BTreeMap::new();
        for rec in records::load_all(&cfg.state_dir) {
            if rec.netns.exists() {
                pods.insert(rec.uid.clone(), rec);
            } else {
                info!(uid = %rec.uid, netns = %rec.netns.display(), "pod's netns is gone; forgetting it");
                records::remove(&cfg.state_dir, &rec.uid);
            }
        }
        if !pods.is_empty() {
            info!(pods = pods.len(), "pods known from before the restart");
        }
        Self {
            cfg,
            store,
            pods,
            agents: vec![],
            waiting: vec![],
            parked: vec![],
            deleted: vec![],
            add_errors: HashMap::new(),
            retry_at: None,
            status,
            capture,
        }
    }

    /// Runs until the event channel closes (the daemon stopped).
    pub(super) async fn run(mut self, mut events: mpsc::Receiver<Event>) {
        let mut changes = self.store.subscribe();
        self.publish();
        loop {
            let wake = self.next_wake();
            tokio::select! {
                ev = events.recv() => match ev {
                    Some(ev) => self.on_event(ev),
                    None => return,
                },
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                _ = tokio::time::sleep_until(wake.unwrap_or_else(Instant::now)), if wake.is_some() => {}
            }
            self.reconcile().await;
            if self.settle() {
                self.reconcile().await;
            }
            self.publish();
            for reply in self.deleted.drain(..) {
                let _ = reply.send(PluginResponse::ok());
            }
        }
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Plugin(PluginRequest::Add { pod }, reply) => self.plugin_add(pod, reply),
            Event::Plugin(PluginRequest::Del { container_id, uid }, reply) => {
                self.plugin_del(&container_id, uid.as_deref());
                self.deleted.push(reply);
            }
            Event::Plugin(PluginRequest::Check { container_id, uid }, reply) => {
                let _ = reply.send(self.check(&container_id, uid.as_deref()));
            }
            Event::AgentConnected(link) => self.waiting.push(link),
            Event::AgentClosed(id) => {
                self.agents.retain(|a| a.id != id);
                self.waiting.retain(|a| a.id != id);
            }
        }
    }

    fn plugin_add(&mut self, pod: PodRecord, reply: oneshot::Sender<PluginResponse>) {
        if !valid_pod_uid(&pod.uid) {
            let _ = reply.send(PluginResponse::err(format!("invalid pod uid {:?}: only [A-Za-z0-9_-]", pod.uid)));
            return;
        }
        if pod.name.is_empty() || pod.namespace.is_empty() {
            let _ = reply.send(PluginResponse::err("pod name and namespace are required"));
            return;
        }
        if let Err(e) = records::save(&self.cfg.state_dir, &pod) {
            let _ = reply.send(PluginResponse::err(format!("saving the pod record: {e}")));
            return;
        }
        let uid = pod.uid.clone();
        if self.pods.get(&uid).is_some_and(|old| old.netns != pod.netns) {
            // A new sandbox for the same pod: Add it again with the new netns (the agent replaces it).
            for a in &mut self.agents {
                a.enrolled.remove(&uid);
            }
        }
        self.add_errors.remove(&uid);
        let deadline = Instant::now() + self.cfg.enroll_wait;
        self.parked.push(Parked { uid: uid.clone(), container_id: pod.container_id.clone(), deadline, reply });
        info!(%uid, name = %pod.name, namespace = %pod.namespace, netns = %pod.netns.display(), "pod added");
        self.pods.insert(uid, pod);
    }

    fn matching(&self, container_id: &str, uid: Option<&str>) -> Vec<String> {
        self.pods
            .values()
            .filter(|r| match uid {
                Some(u) => r.uid == u && (r.container_id.is_empty() || r.container_id == container_id),
                None => r.container_id == container_id,
            })
            .map(|r| r.uid.clone())
            .collect()
    }

    fn plugin_del(&mut self, container_id: &str, uid: Option<&str>) {
        for uid in self.matching(container_id, uid) {
            info!(%uid, "pod deleted");
            self.forget(&uid);
        }
    }

    fn forget(&mut self, uid: &str) {
        self.pods.remove(uid);
        self.add_errors.remove(uid);
        records::remove(&self.cfg.state_dir, uid);
    }

    fn check(&self, container_id: &str, uid: Option<&str>) -> PluginResponse {
        let Some(uid) = self.matching(container_id, uid).into_iter().next() else {
            return PluginResponse::err("unknown pod: no ADD recorded for this container");
        };
        if !self.store.is_synced() {
            return PluginResponse::err("no state from the control plane yet");
        }
        match self.membership(&self.store.snapshot(), &self.pods[&uid]) {
            Membership::Ambient(_) if self.agents.last().is_some_and(|a| a.enrolled.contains(&uid)) => {
                PluginResponse::ok()
            }
            Membership::Ambient(_) => PluginResponse::err(match self.add_errors.get(&uid) {
                Some(e) => format!("pod {uid} is in the mesh but not enrolled: {e}"),
                None => format!("pod {uid} is in the mesh but not enrolled"),
            }),
            Membership::Ambiguous => PluginResponse::err(AMBIGUOUS),
            Membership::Outside | Membership::Unknown => PluginResponse::ok(),
        }
    }

    fn membership(&self, snap: &Snapshot, rec: &PodRecord) -> Membership {
        let w = match snap.find_pod(&rec.namespace, &rec.name) {
            PodMatch::Here(w) => w,
            PodMatch::Ambiguous => {
                warn!(uid = %rec.uid, "more than one Pod workload with this name on this node");
                return Membership::Ambiguous;
            }
            PodMatch::Elsewhere => {
                debug!(uid = %rec.uid, "the control plane has this pod on another node");
                return Membership::Outside;
            }
            PodMatch::Unknown => return Membership::Unknown,
        };
        if w.protocol != WorkloadProtocol::Hbone {
            return Membership::Outside;
        }
        Membership::Ambient(WorkloadInfo {
            name: rec.name.clone(),
            namespace: rec.namespace.clone(),
            service_account: w.service_account.clone(),
        })
    }

    fn desired(&self) -> BTreeMap<String, WorkloadInfo> {
        let snap = self.store.snapshot();
        self.pods
            .values()
            .filter_map(|r| match self.membership(&snap, r) {
                Membership::Ambient(info) => Some((r.uid.clone(), info)),
                _ => None,
            })
            .collect()
    }

    /// Brings every agent to the desired set: snapshots for new agents, Adds on the newest,
    /// Dels wherever a pod is no longer wanted. Nothing before the control plane's first state.
    async fn reconcile(&mut self) {
        if !self.store.is_synced() {
            return;
        }
        if self.retry_at.is_some_and(|t| t <= Instant::now()) {
            self.retry_at = None;
        }
        let mut desired = self.desired();
        if let Some(capture) = self.capture.as_mut() {
            // Captured before it is handed to the agent; one that cannot be is not handed over.
            for (uid, why) in capture.sync(desired.keys().filter_map(|u| self.pods.get(u))) {
                desired.remove(&uid);
                self.add_errors.insert(uid, why);
                self.retry_at.get_or_insert_with(|| Instant::now() + RETRY);
            }
        }
        for mut link in std::mem::take(&mut self.waiting) {
            if self.snapshot(&mut link, &desired).await {
                self.agents.push(link);
            }
        }
        if let Some(mut newest) = self.agents.pop() {
            if self.add_missing(&mut newest, &desired).await {
                self.agents.push(newest);
            }
        }
        let desired = self.desired();
        for mut link in std::mem::take(&mut self.agents) {
            if self.release_unwanted(&mut link, &desired).await {
                self.agents.push(link);
            }
        }
    }

    /// A new agent's snapshot; false when its connection is gone.
    async fn snapshot(&mut self, link: &mut AgentLink, desired: &BTreeMap<String, WorkloadInfo>) -> bool {
        info!(agent = link.id, pods = desired.len(), "sending the snapshot to the node agent");
        if !self.add_missing(link, desired).await {
            return false;
        }
        match link.request(Payload::SnapshotSent(SnapshotSent {}), None).await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                warn!(agent = link.id, error = %e, "the node agent refused SnapshotSent");
                true
            }
            Err(e) => {
                warn!(error = %e, "node agent lost during the snapshot");
                false
            }
        }
    }

    /// Adds every desired pod the agent does not hold yet; false when its connection is gone.
    async fn add_missing(&mut self, link: &mut AgentLink, desired: &BTreeMap<String, WorkloadInfo>) -> bool {
        for (uid, info) in desired {
            if link.enrolled.contains(uid) {
                continue;
            }
            let Some(rec) = self.pods.get(uid) else { continue };
            let netns = match File::open(&rec.netns) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    info!(%uid, netns = %rec.netns.display(), "pod's netns is gone; forgetting it");
                    self.forget(uid);
                    continue;
                }
                Err(e) => {
                    let why = format!("opening netns {}: {e}", rec.netns.display());
                    warn!(%uid, error = %why, "cannot enroll pod");
                    self.add_errors.insert(uid.clone(), why);
                    self.retry_at.get_or_insert_with(|| Instant::now() + RETRY);
                    continue;
                }
            };
            let add = AddWorkload { uid: uid.clone(), workload_info: Some(info.clone()) };
            match link.request(Payload::Add(add), Some(netns)).await {
                Ok(Ok(())) => {
                    info!(%uid, agent = link.id, "pod enrolled");
                    link.enrolled.insert(uid.clone());
                    self.add_errors.remove(uid);
                }
                Ok(Err(e)) => {
                    warn!(%uid, agent = link.id, error = %e, "the node agent refused the pod");
                    self.add_errors.insert(uid.clone(), e);
                    self.retry_at.get_or_insert_with(|| Instant::now() + RETRY);
                }
                Err(e) => {
                    warn!(error = %e, "node agent lost");
                    return false;
                }
            }
        }
        true
    }

    /// Dels every pod the agent holds that is no longer wanted; false when its connection is gone.
    async fn release_unwanted(&mut self, link: &mut AgentLink, desired: &BTreeMap<String, WorkloadInfo>) -> bool {
        let unwanted: Vec<String> = link.enrolled.iter().filter(|u| !desired.contains_key(*u)).cloned().collect();
        for uid in unwanted {
            match link.request(Payload::Del(DelWorkload { uid: uid.clone() }), None).await {
                Ok(ack) => {
                    if let Err(e) = ack {
                        debug!(%uid, agent = link.id, error = %e, "Del answered with an error");
                    }
                    info!(%uid, agent = link.id, "pod released");
                    link.enrolled.remove(&uid);
                }
                Err(e) => {
                    warn!(error = %e, "node agent lost");
                    return false;
                }
            }
        }
        true
    }

    /// Answers the parked ADDs that are decided or out of time. A failed ADD forgets the pod
    /// (the runtime will retry it); returns whether any was forgotten.
    fn settle(&mut self) -> bool {
        let now = Instant::now();
        let mut forgot = false;
        for p in std::mem::take(&mut self.parked) {
            let answer = match self.verdict(&p) {
                Verdict::Decided(r) => Some(r),
                Verdict::Pending(r) if now >= p.deadline => Some(r),
                Verdict::Pending(_) => None,
            };
            let Some(answer) = answer else {
                self.parked.push(p);
                continue;
            };
            match &answer {
                Ok(()) => debug!(uid = %p.uid, "ADD answered"),
                Err(e) => {
                    warn!(uid = %p.uid, error = %e, "ADD failed");
                    if self.pods.get(&p.uid).is_some_and(|r| r.container_id == p.container_id) {
                        self.forget(&p.uid);
                        forgot = true;
                    }
                }
            }
            let _ = p.reply.send(PluginResponse { error: answer.err().unwrap_or_default() });
        }
        forgot
    }

    fn verdict(&self, p: &Parked) -> Verdict {
        let Some(rec) = self.pods.get(&p.uid) else {
            return Verdict::Decided(Err("the pod was deleted while its ADD waited".into()));
        };
        if rec.container_id != p.container_id {
            return Verdict::Decided(Err("superseded by an ADD for a newer sandbox".into()));
        }
        if !self.store.is_synced() {
            return Verdict::Pending(Err(
                "no state from the control plane yet: cannot tell whether the pod belongs to the mesh".into(),
            ));
        }
        match self.membership(&self.store.snapshot(), rec) {
            Membership::Outside => Verdict::Decided(Ok(())),
            Membership::Ambiguous => Verdict::Decided(Err(AMBIGUOUS.into())),
            // Not known to the control plane (yet): the pod runs outside the mesh, and is
            // enrolled later if the control plane puts it in.
            Membership::Unknown => Verdict::Pending(Ok(())),
            Membership::Ambient(_) if self.agents.last().is_some_and(|a| a.enrolled.contains(&p.uid)) => {
                Verdict::Decided(Ok(()))
            }
            Membership::Ambient(_) => match self.add_errors.get(&p.uid) {
                Some(e) => Verdict::Decided(Err(format!("the node agent did not enroll the pod: {e}"))),
                None if self.agents.is_empty() => Verdict::Pending(Err(format!(
                    "the pod is in the mesh but no node agent is connected to {}",
                    self.cfg.zds_socket.display()
                ))),
                None => Verdict::Pending(Err("the pod is in the mesh but not enrolled yet".into())),
            },
        }
    }

    fn next_wake(&self) -> Option<Instant> {
        self.parked.iter().map(|p| p.deadline).chain(self.retry_at).min()
    }

    fn publish(&self) {
        let status = CniStatus {
            synced: self.store.is_synced(),
            agents: self.agents.len() + self.waiting.len(),
            known: self.pods.keys().cloned().collect(),
            enrolled: self.agents.last().map(|a| a.enrolled.iter().cloned().collect()).unwrap_or_default(),
        };
        self.status.send_replace(status);
    }
}
