//! Where the project's `helm` comes from, in one place: `cargo xtask setup` installs it here
//! when none is on PATH, and the chart tests (`tests/tests/deploy.rs` includes this file by
//! path) run whichever one this finds, so both always agree. std only, for that reason.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Where `cargo xtask setup` puts helm, relative to the workspace root.
pub const INSTALLED_HELM: &str = "target/tools/helm";

/// The helm to run: `$HELM` if set, else `helm` on PATH, else the one setup installed in
/// `<workspace>/target/tools/helm`. Each candidate must answer `helm version`. The error says
/// what was tried and how to get one.
pub fn find_helm(workspace: &Path) -> Result<(PathBuf, String), String> {
    let mut tried = Vec::new();
    let mut candidates = Vec::new();
    if let Some(h) = std::env::var_os("HELM").filter(|h| !h.is_empty()) {
        candidates.push(PathBuf::from(h));
    }
    candidates.push(PathBuf::from("helm"));
    candidates.push(workspace.join(INSTALLED_HELM));
    for helm in candidates {
        match helm_version(&helm) {
            Ok(version) => return Ok((helm, version)),
            Err(e) => tried.push(format!("{}: {e}", helm.display())),
        }
    }
    Err(format!(
        "no working helm (tried {}); run `cargo xtask setup`, which installs one at {}",
        tried.join("; "),
        workspace.join(INSTALLED_HELM).display()
    ))
}

/// `helm version --short`, e.g. `v4.1.4+g05fa379`.
fn helm_version(helm: &Path) -> Result<String, String> {
    let out =
        Command::new(helm).args(["version", "--short"]).stdin(Stdio::null()).output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("`helm version` failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}
