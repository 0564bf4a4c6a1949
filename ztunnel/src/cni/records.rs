//! What `ztunnel cni` remembers about the pods the CNI plugin told it about, one JSON file
//! per pod in its state directory, so that after its own restart it can send a node agent
//! the full snapshot again (every live pod's netns is re-opened from its path).
use std::path::{Path, PathBuf};

use crate::redirect::valid_pod_uid;

/// A pod as the plugin saw it at ADD.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PodRecord {
    /// Kubernetes pod uid (`K8S_POD_UID`), or one derived from the container id.
    pub uid: String,
    pub name: String,
    pub namespace: String,
    /// Path of the pod's network namespace (`CNI_NETNS`), re-opened for every Add.
    pub netns: PathBuf,
    /// The sandbox (`CNI_CONTAINERID`): a DEL for an older sandbox of the same pod must not
    /// forget the current one.
    pub container_id: String,
}

/// Writes (replaces) a pod's record.
pub fn save(dir: &Path, rec: &PodRecord) -> std::io::Result<()> {
    if !valid_pod_uid(&rec.uid) {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("invalid pod uid {:?}", rec.uid)));
    }
    let tmp = dir.join(format!(".{}.tmp", rec.uid));
    std::fs::write(&tmp, serde_json::to_vec(rec)?)?;
    std::fs::rename(tmp, dir.join(format!("{}.json", rec.uid)))
}

/// Forgets a pod.
pub fn remove(dir: &Path, uid: &str) {
    if valid_pod_uid(uid) {
        let _ = std::fs::remove_file(dir.join(format!("{uid}.json")));
    }
}

/// Every readable record in the directory; unreadable files are logged and skipped.
pub fn load_all(dir: &Path) -> Vec<PodRecord> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let Some(uid) = name.to_str().and_then(|n| n.strip_suffix(".json")) else { continue };
        let rec = std::fs::read(entry.path())
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<PodRecord>(&b).map_err(|e| e.to_string()));
        match rec {
            Ok(r) if r.uid == uid => out.push(r),
            Ok(r) => {
                tracing::warn!(file = %entry.path().display(), uid = %r.uid, "pod record under another name; skipped")
            }
            Err(e) => tracing::warn!(file = %entry.path().display(), error = %e, "unreadable pod record; skipped"),
        }
    }
    out.sort_by(|a, b| a.uid.cmp(&b.uid));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ztunnel-cni-records-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn record(uid: &str) -> PodRecord {
        PodRecord {
            uid: uid.into(),
            name: "web".into(),
            namespace: "default".into(),
            netns: "/run/netns/web".into(),
            container_id: "abc".into(),
        }
    }

    #[test]
    fn saved_records_load_back_sorted_by_uid() {
        let d = dir("roundtrip");
        save(&d, &record("b-2")).unwrap();
        save(&d, &record("a-1")).unwrap();
        let uids: Vec<String> = load_all(&d).into_iter().map(|r| r.uid).collect();
        assert_eq!(uids, ["a-1", "b-2"]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_uid_that_could_leave_the_directory_is_not_saved() {
        let d = dir("escape");
        assert!(save(&d, &record("../../etc/x")).is_err());
        assert!(load_all(&d).is_empty());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn unreadable_files_are_skipped() {
        let d = dir("garbage");
        std::fs::write(d.join("x.json"), b"not json").unwrap();
        save(&d, &record("ok")).unwrap();
        assert_eq!(load_all(&d).len(), 1);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
