//! The directory source applies an edit when inotify reports it, not on the next poll: each test runs a controller
//! whose poll interval is an hour, so only the inotify wake-up can make the change visible in time.
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::controller::{Controller, ControllerConfig, Options, Source};
use crate::identity::{CaConfig, InProcessCa};

const NAMESPACE: &str = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: default\n";

fn service(name: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  clusterIP: {ip}\n  \
         ports:\n  - port: 80\n"
    )
}

/// A fresh directory holding `config/namespace.yaml`, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let dir = std::env::temp_dir().join(format!("ztunnel-dir-watch-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("config")).unwrap();
        std::fs::write(dir.join("config/namespace.yaml"), NAMESPACE).unwrap();
        Dir(dir)
    }

    fn config(&self) -> PathBuf {
        self.0.join("config")
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn start(dir: &Dir) -> Controller {
    let cfg = ControllerConfig {
        source: Source::Directory(dir.config()),
        listen: "127.0.0.1:0".parse().unwrap(),
        options: Options::default(),
        ca: Arc::new(InProcessCa::new(CaConfig::new("cluster.local")).unwrap()),
        tokens_dir: dir.0.join("tokens"),
        poll_interval: Duration::from_secs(3600),
    };
    Controller::start(cfg).await.expect("controller starts")
}

/// How long until the controller's model has service `default/<name>.default.svc.cluster.local`, if within 2 s.
async fn time_until_served(c: &Controller, name: &str) -> Option<Duration> {
    let key = format!("default/{name}.default.svc.cluster.local");
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(2) {
        if c.model().services.contains_key(&key) {
            return Some(t.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    None
}

#[tokio::test]
async fn a_file_written_into_the_directory_is_applied_without_waiting_for_the_poll() {
    let dir = Dir::new("write");
    let c = start(&dir).await;
    std::fs::write(dir.config().join("svc.yaml"), service("written", "10.96.0.10")).unwrap();
    assert!(time_until_served(&c, "written").await.is_some(), "not applied within 2 s");
}

#[tokio::test]
async fn a_file_renamed_into_place_is_applied_without_waiting_for_the_poll() {
    let dir = Dir::new("rename");
    let c = start(&dir).await;
    let tmp = dir.config().join(".svc.yaml.tmp");
    std::fs::write(&tmp, service("renamed", "10.96.0.11")).unwrap();
    std::fs::rename(&tmp, dir.config().join("svc.yaml")).unwrap();
    assert!(time_until_served(&c, "renamed").await.is_some(), "not applied within 2 s");
}

#[tokio::test]
async fn a_file_in_a_subdirectory_created_after_start_is_applied_without_waiting_for_the_poll() {
    let dir = Dir::new("subdir");
    let c = start(&dir).await;
    let sub = dir.config().join("team-a");
    std::fs::create_dir(&sub).unwrap();
    // Let the directory's own event be handled first, as when a user creates it and then edits.
    tokio::time::sleep(Duration::from_millis(200)).await;
    std::fs::write(sub.join("svc.yaml"), service("nested", "10.96.0.12")).unwrap();
    assert!(time_until_served(&c, "nested").await.is_some(), "not applied within 2 s");
}

#[tokio::test]
async fn a_removed_file_withdraws_its_objects_without_waiting_for_the_poll() {
    let dir = Dir::new("remove");
    std::fs::write(dir.config().join("svc.yaml"), service("removed", "10.96.0.13")).unwrap();
    let c = start(&dir).await;
    assert!(c.model().services.contains_key("default/removed.default.svc.cluster.local"));
    std::fs::remove_file(dir.config().join("svc.yaml")).unwrap();
    let t = Instant::now();
    while c.model().services.contains_key("default/removed.default.svc.cluster.local") {
        assert!(t.elapsed() < Duration::from_secs(2), "still served 2 s after the file was removed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
