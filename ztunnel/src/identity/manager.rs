//! Per-identity certificate cache with on-demand fetch and background renewal, so the data
//! path never waits on the CA except for an identity's very first connection.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tracing::{debug, info, info_span, warn, Instrument};

use super::certificate::{ChainCert, WorkloadCertificate};
use super::provider::{CertificateProvider, ProviderError};
use super::spiffe::Identity;

/// Why [`CertManager::fetch`] could not return a certificate.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CertError {
    /// The first fetch for the identity failed (shared by every concurrent waiter).
    #[error("fetching certificate for {identity} failed: {source}")]
    Fetch {
        /// The identity.
        identity: Identity,
        /// The provider's error.
        source: Arc<ProviderError>,
    },
    /// The cached certificate expired and renewal keeps failing.
    #[error("certificate for {identity} expired and renewal is failing: {last_error}")]
    Expired {
        /// The identity.
        identity: Identity,
        /// The latest renewal error.
        last_error: String,
    },
    /// The identity was forgotten or the manager dropped while waiting.
    #[error("certificate for {identity} is no longer managed")]
    Stopped {
        /// The identity.
        identity: Identity,
    },
}

/// Lifecycle of one identity's certificate, as shown in /config_dump.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CertState {
    /// First fetch in flight.
    Initializing,
    /// A valid certificate is cached.
    Available,
    /// Renewal in flight; the old certificate is still served.
    Renewing,
    /// Renewal failed; the old certificate is served while retrying with backoff.
    RenewalFailing,
    /// The first fetch failed; the next request retries.
    Failed,
}

/// One row of [`CertManager::snapshot`], for /config_dump (`ztunnel ctl certificates`).
#[derive(Debug, Clone, Serialize)]
pub struct CertSnapshot {
    /// The identity.
    pub identity: Identity,
    /// Current state.
    pub state: CertState,
    /// Serial of the served certificate.
    pub serial: Option<String>,
    /// Start of the served certificate's validity, seconds since the epoch.
    pub not_before_unix: Option<u64>,
    /// Expiry of the served certificate, seconds since the epoch.
    pub not_after_unix: Option<u64>,
    /// The served certificate's chain up to its root (see
    /// [`WorkloadCertificate::trust_chain`]); empty while there is none.
    pub chain: Vec<ChainCert>,
    /// When the next renewal attempt is due, seconds since the epoch.
    pub next_attempt_unix: Option<u64>,
    /// Consecutive failed attempts.
    pub failures: u32,
    /// The latest error, if the latest attempt failed.
    pub last_error: Option<String>,
}

/// Tuning of [`CertManager`] retries.
#[derive(Debug, Clone)]
pub struct CertManagerConfig {
    /// First retry delay after a failed renewal.
    pub initial_backoff: Duration,
    /// Cap of the exponential retry delay.
    pub max_backoff: Duration,
}

impl Default for CertManagerConfig {
    fn default() -> Self {
        CertManagerConfig { initial_backoff: Duration::from_secs(1), max_backoff: Duration::from_secs(120) }
    }
}

#[derive(Clone)]
struct Slot {
    cert: Option<Arc<WorkloadCertificate>>,
    state: CertState,
    failures: u32,
    last_error: Option<Arc<ProviderError>>,
    next_attempt: Option<SystemTime>,
}

struct Entry {
    generation: u64,
    tx: watch::Sender<Slot>,
    task: AbortHandle,
}

struct Inner {
    provider: Arc<dyn CertificateProvider>,
    cfg: CertManagerConfig,
    entries: Mutex<HashMap<Identity, Entry>>,
    next_generation: std::sync::atomic::AtomicU64,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for entry in self.entries.get_mut().unwrap_or_else(|e| e.into_inner()).values() {
            entry.task.abort();
        }
    }
}

/// Caches one certificate per identity, fetching on first use (concurrent first requests
/// share one fetch) and renewing at half-life in the background.
#[derive(Clone)]
pub struct CertManager {
    inner: Arc<Inner>,
}

impl CertManager {
    /// A manager issuing through `provider`.
    pub fn new(provider: Arc<dyn CertificateProvider>, cfg: CertManagerConfig) -> Self {
        CertManager {
            inner: Arc::new(Inner {
                provider,
                cfg,
                entries: Mutex::new(HashMap::new()),
                next_generation: Default::default(),
            }),
        }
    }

    /// Returns the cached certificate for `id`, fetching it first if needed.
    pub async fn fetch(&self, id: &Identity) -> Result<Arc<WorkloadCertificate>, CertError> {
        let mut rx = self.subscribe(id);
        loop {
            {
                let slot = rx.borrow_and_update();
                match (&slot.cert, slot.state) {
                    (Some(cert), _) if SystemTime::now() < cert.not_after() => return Ok(cert.clone()),
                    (Some(_), CertState::RenewalFailing) => {
                        return Err(CertError::Expired {
                            identity: id.clone(),
                            last_error: slot.last_error.as_ref().map(|e| e.to_string()).unwrap_or_default(),
                        })
                    }
                    (None, CertState::Failed) => {
                        let source = slot.last_error.clone().expect("failed slot carries its error");
                        return Err(CertError::Fetch { identity: id.clone(), source });
                    }
                    _ => {}
                }
            }
            if rx.changed().await.is_err() {
                return Err(CertError::Stopped { identity: id.clone() });
            }
        }
    }

    /// Stops caching and renewing `id` (its workload left the node).
    pub fn forget(&self, id: &Identity) {
        if let Some(entry) = lock(&self.inner.entries).remove(id) {
            entry.task.abort();
            debug!(identity = %id, "certificate forgotten");
        }
    }

    /// Exposes `ztunnel_certificate_expiration_timestamp_seconds{identity}` (read at scrape
    /// time), which the chart's alert on certificates about to expire watches.
    pub fn register_expiry_metric(&self, metrics: &crate::metrics::Metrics) {
        let certs = self.clone();
        metrics.add_gauge_collector(
            "ztunnel_certificate_expiration_timestamp_seconds",
            "When the workload certificate of each identity expires, in unix seconds",
            Box::new(move || {
                certs
                    .snapshot()
                    .into_iter()
                    .filter_map(|c| Some((vec![("identity".to_string(), c.identity.to_string())], c.not_after_unix?)))
                    .collect()
            }),
        );
    }

    /// The state of every managed identity, sorted by identity.
    pub fn snapshot(&self) -> Vec<CertSnapshot> {
        let unix = |t: SystemTime| t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).ok();
        // The rows are read under the lock; the chains are parsed after it is released, so
        // a config dump never holds up a connection waiting for its certificate.
        let mut rows: Vec<(CertSnapshot, Option<Arc<WorkloadCertificate>>)> = lock(&self.inner.entries)
            .iter()
            .map(|(id, entry)| {
                let slot = entry.tx.borrow();
                let row = CertSnapshot {
                    identity: id.clone(),
                    state: slot.state,
                    serial: slot.cert.as_ref().map(|c| c.serial().to_string()),
                    not_before_unix: slot.cert.as_ref().and_then(|c| unix(c.not_before())),
                    not_after_unix: slot.cert.as_ref().and_then(|c| unix(c.not_after())),
                    chain: vec![],
                    next_attempt_unix: slot.next_attempt.and_then(unix),
                    failures: slot.failures,
                    last_error: slot.last_error.as_ref().map(|e| e.to_string()),
                };
                (row, slot.cert.clone())
            })
            .collect();
        rows.sort_by(|a, b| a.0.identity.cmp(&b.0.identity));
        rows.into_iter()
            .map(|(mut row, cert)| {
                row.chain = cert.map(|c| c.trust_chain()).unwrap_or_default();
                row
            })
            .collect()
    }

    fn subscribe(&self, id: &Identity) -> watch::Receiver<Slot> {
        let mut entries = lock(&self.inner.entries);
        if let Some(entry) = entries.get(id) {
            return entry.tx.subscribe();
        }
        let generation = self.inner.next_generation.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = watch::channel(Slot {
            cert: None,
            state: CertState::Initializing,
            failures: 0,
            last_error: None,
            next_attempt: None,
        });
        let worker = Worker {
            inner: Arc::downgrade(&self.inner),
            provider: self.inner.provider.clone(),
            cfg: self.inner.cfg.clone(),
            id: id.clone(),
            generation,
            tx: tx.clone(),
        };
        let span = info_span!("cert_worker", identity = %id);
        let task = tokio::spawn(worker.run().instrument(span)).abort_handle();
        entries.insert(id.clone(), Entry { generation, tx, task });
        rx
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The background task owning one identity: first fetch, then renew forever.
struct Worker {
    inner: Weak<Inner>,
    provider: Arc<dyn CertificateProvider>,
    cfg: CertManagerConfig,
    id: Identity,
    generation: u64,
    tx: watch::Sender<Slot>,
}

impl Worker {
    async fn run(self) {
        let mut cert = match self.provider.fetch(&self.id).await {
            Ok(cert) => Arc::new(cert),
            Err(e) => {
                warn!(error = %e, "initial certificate fetch failed");
                self.tx.send_modify(|s| {
                    s.state = CertState::Failed;
                    s.failures = 1;
                    s.last_error = Some(Arc::new(e));
                });
                self.remove_entry();
                return;
            }
        };
        loop {
            info!(serial = cert.serial(), not_after = ?cert.not_after(), "certificate available");
            let refresh_at = cert.refresh_at();
            self.tx.send_modify(|s| {
                s.cert = Some(cert.clone());
                s.state = CertState::Available;
                s.failures = 0;
                s.last_error = None;
                s.next_attempt = Some(refresh_at);
            });
            tokio::time::sleep(until(refresh_at)).await;
            cert = self.renew().await;
        }
    }

    /// Retries with exponential backoff until a new certificate is obtained; the old one stays
    /// served meanwhile.
    async fn renew(&self) -> Arc<WorkloadCertificate> {
        let mut backoff = self.cfg.initial_backoff;
        loop {
            self.tx.send_modify(|s| s.state = CertState::Renewing);
            match self.provider.fetch(&self.id).await {
                Ok(cert) => return Arc::new(cert),
                Err(e) => {
                    let next = SystemTime::now() + backoff;
                    warn!(error = %e, retry_in = ?backoff, "certificate renewal failed; serving the old one");
                    self.tx.send_modify(|s| {
                        s.state = CertState::RenewalFailing;
                        s.failures += 1;
                        s.last_error = Some(Arc::new(e));
                        s.next_attempt = Some(next);
                    });
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.cfg.max_backoff);
                }
            }
        }
    }

    fn remove_entry(&self) {
        let Some(inner) = self.inner.upgrade() else {
            return;
        };
        let mut entries = lock(&inner.entries);
        if entries.get(&self.id).is_some_and(|e| e.generation == self.generation) {
            entries.remove(&self.id);
        }
    }
}

fn until(t: SystemTime) -> Duration {
    t.duration_since(SystemTime::now()).unwrap_or_default()
}
