//! Reading directories: recursion, file types, hidden entries, change detection.
use std::fs;

use super::*;
use crate::controller::source::{fingerprint, read_dir};

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ztunnel-controller-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn reads_yaml_files_recursively_and_skips_others() {
    let dir = temp_dir("recursive");
    fs::create_dir_all(dir.join("sub/deeper")).unwrap();
    fs::create_dir_all(dir.join("..data")).unwrap();
    fs::write(dir.join("a.yaml"), pod("ns", "a", "10.0.0.1", &[])).unwrap();
    fs::write(dir.join("sub/deeper/b.yml"), pod("ns", "b", "10.0.0.2", &[])).unwrap();
    fs::write(dir.join("sub/notes.txt"), pod("ns", "c", "10.0.0.3", &[])).unwrap();
    fs::write(dir.join("..data/d.yaml"), pod("ns", "d", "10.0.0.4", &[])).unwrap();
    let snapshot = read_dir(&dir).unwrap();
    let names: Vec<_> = snapshot.objects.iter().map(|l| l.object.metadata().name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(snapshot.objects[1].origin.file, dir.join("sub/deeper/b.yml"));
    assert!(read_dir(&dir.join("missing")).is_err());
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn list_items_are_objects_with_their_index() {
    let m = build(&yaml(
        "
        apiVersion: v1
        kind: List
        items:
        - {apiVersion: v1, kind: ServiceAccount, metadata: {name: a}}
        - {apiVersion: v1, kind: ServiceAccount, metadata: {}}
        ",
    ));
    assert!(m.service_accounts.contains("default/a"));
    let e: Vec<_> = m.errors().collect();
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].origin.item, Some(1));
    assert!(e[0].to_string().contains("missing `metadata.name`"), "{}", e[0]);
}

#[test]
fn fingerprint_changes_when_a_file_changes() {
    let dir = temp_dir("fingerprint");
    fs::write(dir.join("a.yaml"), "a: 1\n").unwrap();
    let first = fingerprint(&dir);
    assert_eq!(fingerprint(&dir), first, "stable while nothing changes");
    fs::write(dir.join("a.yaml"), "a: 22\n").unwrap();
    let second = fingerprint(&dir);
    assert_ne!(second, first, "rewritten");
    fs::write(dir.join("b.yml"), "b: 1\n").unwrap();
    let third = fingerprint(&dir);
    assert_ne!(third, second, "added");
    fs::write(dir.join("c.txt"), "ignored").unwrap();
    assert_eq!(fingerprint(&dir), third, "not YAML");
    fs::remove_file(dir.join("b.yml")).unwrap();
    assert_ne!(fingerprint(&dir), third, "removed");
    fs::remove_dir_all(&dir).unwrap();
}
