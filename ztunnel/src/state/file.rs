//! The local-config file (`LOCAL_XDS_PATH`) as a source of state, for every process that
//! reads one (node agent, waypoint): loaded once at start, then followed on change.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::{ConfigError, StateStore};

/// Loads the file once, at start: a file that is missing, unreadable or not YAML at all is
/// `Err(reason)` (serving with no policies would fail open). Bad entries inside a valid
/// document are rejected by name and reported to `on_rejected`, as on every later change.
/// Returns the file's modification time, for [`follow_local_config`].
pub fn load_local_config(
    path: &Path,
    store: &StateStore,
    on_rejected: impl Fn(&ConfigError),
) -> Result<SystemTime, String> {
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).map_err(|e| e.to_string())?;
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let errors = store.apply_yaml(&text);
    errors.iter().for_each(&on_rejected);
    if let Some(doc) = errors.iter().find(|e| e.kind == "document") {
        return Err(doc.reason.clone());
    }
    tracing::info!(path = %path.display(), "local config loaded");
    Ok(modified)
}

/// Applies the file whenever it changes after `loaded` (polled every 250 ms); bad entries
/// are rejected by name (reported to `on_rejected`) and the rest applies; an unreadable
/// file keeps the last state.
pub async fn follow_local_config(
    path: PathBuf,
    store: Arc<StateStore>,
    loaded: SystemTime,
    on_rejected: impl Fn(&ConfigError),
) {
    let mut last = Some(loaded);
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        if modified.is_some() && modified != last {
            last = modified;
            match std::fs::read_to_string(&path) {
                Ok(text) => {
                    store.apply_yaml(&text).iter().for_each(&on_rejected);
                    tracing::info!(path = %path.display(), "local config applied");
                }
                Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot read local config"),
            }
        }
    }
}
