//! What the agent must remember about a pod across its own restarts to be able to remove
//! the pod's kernel state later (netns cookie, IPs): one small JSON file per pod.
use std::net::IpAddr;
use std::path::Path;

/// Persisted per-pod facts.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PodState {
    pub uid: String,
    pub netns_cookie: u64,
    pub ips: Vec<IpAddr>,
}

pub use crate::redirect::valid_pod_uid as valid_uid;

/// Writes (replaces) a pod's state file.
pub fn save(dir: &Path, st: &PodState) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{}.tmp", st.uid));
    std::fs::write(&tmp, serde_json::to_vec(st)?)?;
    std::fs::rename(tmp, dir.join(format!("{}.json", st.uid)))
}

/// Reads one pod's state, if present and readable.
pub fn load(dir: &Path, uid: &str) -> Option<PodState> {
    if !valid_uid(uid) {
        return None;
    }
    let bytes = std::fs::read(dir.join(format!("{uid}.json"))).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Every pod state in the directory (unreadable files are skipped).
pub fn load_all(dir: &Path) -> Vec<PodState> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let uid = name.strip_suffix(".json")?;
            load(dir, uid)
        })
        .collect()
}

/// Forgets a pod.
pub fn remove(dir: &Path, uid: &str) {
    if !valid_uid(uid) {
        return;
    }
    let _ = std::fs::remove_file(dir.join(format!("{uid}.json")));
}
