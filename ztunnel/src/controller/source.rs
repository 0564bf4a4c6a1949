//! Reads a directory of Kubernetes YAML into objects. This is the controller's only I/O: everything after it is a
//! pure function of what was read. Each file may hold several documents (`---`) and `kind: List`s; a document or
//! object that cannot be read is reported (file, document, object, reason) and skipped, and the rest still applies,
//! so one typo does not take the whole mesh configuration down.
//!
//! Documents are split on `---` lines before parsing, so a syntax error in one document does not lose the
//! documents after it (YAML forbids `---` at the start of a line inside a scalar, so the split is exact).
//!
//! [`parse_json_object`] reads one object as a Kubernetes API server returns it (JSON), through the same parser, so
//! the live source (`kube` feature) and files produce the same [`Object`]s and everything after is shared.
//!
//! [`fingerprint`] is a cheap change detector for polling: it hashes names, sizes, inodes and times of the files,
//! without reading them.
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_yaml_ng::Value;

use super::objects::{api_group, parse_object, Object, ObjectRef, ParseError, DEFAULT_NAMESPACE};
use super::status::{Origin, Outcome, StatusEntry};

/// One object and where it was read from.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    pub origin: Origin,
    pub object: Object,
}

/// Everything read from a directory: the objects in file order, and the documents that were skipped.
/// Objects are shared, so handing a cached file's objects to another model build copies pointers,
/// not 10,000 pods (that copy was 6% of a reload at scale).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub objects: Vec<Arc<Loaded>>,
    /// Unreadable files and documents, malformed objects, kinds the controller does not read.
    pub skipped: Vec<StatusEntry>,
}

impl Snapshot {
    fn extend(&mut self, other: Snapshot) {
        self.objects.extend(other.objects);
        self.skipped.extend(other.skipped);
    }
}

/// Reads every `*.yaml` / `*.yml` file under `dir` (recursively, in path order; names starting with `.` are
/// skipped, which also skips the `..data` copies of a mounted ConfigMap). `dir` may also be a single file.
/// Fails only when `dir` itself cannot be read; a file that cannot be read is one error entry.
pub fn read_dir(dir: &Path) -> io::Result<Snapshot> {
    let mut snapshot = Snapshot::default();
    for file in yaml_files(dir)? {
        match std::fs::read_to_string(&file) {
            Ok(text) => snapshot.extend(parse_text(&file, &text)),
            Err(e) => snapshot.skipped.push(StatusEntry {
                origin: Origin { file, document: 0, line: 1, item: None },
                object: None,
                outcome: Outcome::Error(format!("cannot read file: {e}")),
            }),
        }
    }
    Ok(snapshot)
}

/// Reads a directory again and again, re-parsing only the files that changed since the last
/// read (same path, size, inode and times: the parse is reused). With 10,000 pods in one file
/// and a one-line edit in another, a reload costs the edited file's parse, not all of them.
#[derive(Debug, Default)]
pub struct CachedReader {
    files: std::collections::HashMap<PathBuf, (FileStamp, Snapshot)>,
}

/// What [`CachedReader`] compares to decide a file is unchanged.
type FileStamp = (u64, u64, i64, i64, i64, i64);

fn stamp(m: &std::fs::Metadata) -> FileStamp {
    (m.len(), m.ino(), m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec())
}

impl CachedReader {
    /// Like [`read_dir`], reusing the parse of every file that did not change.
    pub fn read_dir(&mut self, dir: &Path) -> io::Result<Snapshot> {
        let mut snapshot = Snapshot::default();
        let mut seen = std::collections::HashMap::new();
        for file in yaml_files(dir)? {
            let st = std::fs::metadata(&file).map(|m| stamp(&m)).ok();
            let parsed = match (st, self.files.remove(&file)) {
                (Some(st), Some((old, parsed))) if old == st => Some((st, parsed)),
                (Some(st), _) => match std::fs::read_to_string(&file) {
                    Ok(text) => Some((st, parse_text(&file, &text))),
                    Err(e) => {
                        snapshot.skipped.push(unreadable(&file, &e));
                        None
                    }
                },
                (None, _) => None,
            };
            if let Some((st, parsed)) = parsed {
                snapshot.extend(parsed.clone());
                seen.insert(file, (st, parsed));
            }
        }
        self.files = seen;
        Ok(snapshot)
    }
}

fn unreadable(file: &Path, e: &io::Error) -> StatusEntry {
    StatusEntry {
        origin: Origin { file: file.to_path_buf(), document: 0, line: 1, item: None },
        object: None,
        outcome: Outcome::Error(format!("cannot read file: {e}")),
    }
}

/// Parses the text of one file (`file` is only used to say where objects came from).
pub fn parse_text(file: &Path, text: &str) -> Snapshot {
    let mut snapshot = Snapshot::default();
    for (document, (line, chunk)) in split_documents(text).into_iter().enumerate() {
        let origin = Origin { file: file.to_path_buf(), document, line, item: None };
        let value: Value = match serde_yaml_ng::from_str(chunk) {
            Ok(v) => v,
            Err(e) => {
                let reason = format!("not valid YAML: {e}");
                snapshot.skipped.push(StatusEntry { origin, object: None, outcome: Outcome::Error(reason) });
                continue;
            }
        };
        match value {
            Value::Null => {} // empty document, e.g. after a trailing `---`
            Value::Mapping(_) if value.get("kind").and_then(Value::as_str) == Some("List") => {
                match value.get("items") {
                    Some(Value::Sequence(items)) => {
                        for (i, item) in items.iter().enumerate() {
                            let origin = Origin { item: Some(i), ..origin.clone() };
                            add_object(&mut snapshot, origin, item.clone());
                        }
                    }
                    None | Some(Value::Null) => {}
                    Some(_) => snapshot.skipped.push(StatusEntry {
                        origin,
                        object: None,
                        outcome: Outcome::Error("`items` of a List must be a list".into()),
                    }),
                }
            }
            Value::Mapping(_) => add_object(&mut snapshot, origin, value),
            _ => snapshot.skipped.push(StatusEntry {
                origin,
                object: None,
                outcome: Outcome::Error("expected a Kubernetes object (a mapping with apiVersion and kind)".into()),
            }),
        }
    }
    snapshot
}

/// Reads one object as the Kubernetes API serves it (JSON, with `managedFields`, `resourceVersion`, `status` and
/// the rest), through the same parser as a YAML document, so an object watched on an API server and the same object
/// in a file become the same [`Object`]. `origin` names it (see [`Origin::kube`]). The result holds the object, or
/// one status entry saying why it was skipped; it never fails.
pub fn parse_json_object(origin: Origin, value: serde_json::Value) -> Snapshot {
    let mut snapshot = Snapshot::default();
    match serde_yaml_ng::to_value(value) {
        Ok(value @ Value::Mapping(_)) => add_object(&mut snapshot, origin, value),
        Ok(_) => snapshot.skipped.push(StatusEntry {
            origin,
            object: None,
            outcome: Outcome::Error("expected a Kubernetes object (a mapping with apiVersion and kind)".into()),
        }),
        Err(e) => snapshot.skipped.push(StatusEntry {
            origin,
            object: None,
            outcome: Outcome::Error(format!("cannot read the object: {e}")),
        }),
    }
    snapshot
}

fn add_object(snapshot: &mut Snapshot, origin: Origin, value: Value) {
    let object = reference(&value);
    match parse_object(value) {
        Ok(object) => snapshot.objects.push(Arc::new(Loaded { origin, object })),
        Err(ParseError::Unsupported { kind, api_version }) => {
            let reason = if api_group(&api_version).is_empty() || !is_known_kind(&kind) {
                format!("kind {kind} ({api_version}) is not read by the controller")
            } else {
                format!("{kind} of API {api_version} is not read by the controller")
            };
            snapshot.skipped.push(StatusEntry { origin, object, outcome: Outcome::Ignored(reason) });
        }
        Err(ParseError::Invalid(reason)) => {
            snapshot.skipped.push(StatusEntry { origin, object, outcome: Outcome::Error(reason) })
        }
    }
}

fn is_known_kind(kind: &str) -> bool {
    matches!(
        kind,
        "Namespace"
            | "Pod"
            | "Service"
            | "ServiceAccount"
            | "Deployment"
            | "AuthorizationPolicy"
            | "PeerAuthentication"
            | "ServiceEntry"
            | "VirtualService"
            | "DestinationRule"
            | "Gateway"
            | "HTTPRoute"
            | "GRPCRoute"
            | "TCPRoute"
            | "ReferenceGrant"
    )
}

/// Kind, namespace and name of a document, as far as they can be read, for error reports.
fn reference(v: &Value) -> Option<ObjectRef> {
    let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_string);
    let kind = text(v.get("kind"))?;
    let meta = v.get("metadata");
    let name = text(meta.and_then(|m| m.get("name"))).unwrap_or_default();
    let namespace = if kind == "Namespace" {
        String::new()
    } else {
        text(meta.and_then(|m| m.get("namespace"))).unwrap_or_else(|| DEFAULT_NAMESPACE.into())
    };
    Some(ObjectRef { kind, namespace, name })
}

/// Splits a YAML stream into documents with the 1-based line each starts on. A line that is `---` (optionally
/// followed by a space and more) starts a document; `...` ends one. Documents holding only blanks and comments are
/// dropped, so document numbers count real documents.
fn split_documents(text: &str) -> Vec<(usize, &str)> {
    let mut docs = Vec::new();
    let mut start = 0; // byte offset of the current document's text
    let mut start_line = 1;
    let mut offset = 0;
    let mut in_document = true; // text before the first `---` is a document too
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let bare = line.trim_end_matches(['\n', '\r']);
        let is_start = bare == "---" || bare.starts_with("--- ") || bare.starts_with("---\t");
        let is_end = bare == "..." || bare.starts_with("... ");
        if is_start || is_end {
            if in_document {
                docs.push((start_line, &text[start..offset]));
            }
            in_document = is_start;
            // `--- value` puts content on the marker line; keep it (minus the marker) in the new document.
            start = if is_start { offset + 3 } else { offset + line.len() };
            start_line = i + 1;
        }
        offset += line.len();
    }
    if in_document {
        docs.push((start_line, &text[start..]));
    }
    let blank = |d: &str| d.lines().all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'));
    docs.retain(|(_, d)| !blank(d));
    docs
}

/// The YAML files under `dir` (or `dir` itself if it is a file), sorted by path.
fn yaml_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    walk(dir).map(|(_, files)| files)
}

/// The directories [`read_dir`] descends into (`dir` and its subdirectories), or `dir` itself
/// if it is a file: what a change watcher must watch to see every file it reads.
pub fn watched_paths(dir: &Path) -> io::Result<Vec<PathBuf>> {
    walk(dir).map(|(dirs, files)| if dirs.is_empty() { files } else { dirs })
}

/// The directories walked and the YAML files found under `dir`, both sorted by path.
fn walk(dir: &Path) -> io::Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let meta = std::fs::metadata(dir)?;
    if meta.is_file() {
        return Ok((Vec::new(), vec![dir.to_path_buf()]));
    }
    let (mut dirs, mut files) = (Vec::new(), Vec::new());
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        let entries = match std::fs::read_dir(&d) {
            Ok(e) => e,
            Err(e) if d == dir => return Err(e),
            Err(_) => continue, // a subdirectory that vanished or is unreadable: its files are simply absent
        };
        dirs.push(d);
        for entry in entries.flatten() {
            let name = entry.file_name();
            if name.to_string_lossy().starts_with('.') {
                continue;
            }
            let path = entry.path();
            match std::fs::metadata(&path) {
                Ok(m) if m.is_dir() => pending.push(path),
                Ok(m) if m.is_file() && is_yaml(&path) => files.push(path),
                _ => {}
            }
        }
    }
    dirs.sort();
    files.sort();
    Ok((dirs, files))
}

fn is_yaml(p: &Path) -> bool {
    matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
}

/// A hash of the YAML files under `dir`: their paths, sizes, inodes and modification/change times. It changes when
/// a file is added, removed, renamed, rewritten or replaced, so a caller can poll it (every ~200 ms) and re-read
/// only on change. A missing or unreadable directory has its own fingerprint (so recovering from it is a change).
pub fn fingerprint(dir: &Path) -> u64 {
    let mut h = DefaultHasher::new();
    match yaml_files(dir) {
        Ok(files) => {
            for f in files {
                f.hash(&mut h);
                if let Ok(m) = std::fs::metadata(&f) {
                    stamp(&m).hash(&mut h);
                }
            }
        }
        Err(e) => ("unreadable", e.kind().to_string()).hash(&mut h),
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_keeps_line_numbers_and_skips_markers() {
        let text = "a: 1\n---\nb: 2\n--- # c\nc: 3\n...\n";
        let docs = split_documents(text);
        assert_eq!(docs, vec![(1, "a: 1\n"), (2, "\nb: 2\n"), (4, " # c\nc: 3\n")]);
    }

    #[test]
    fn blank_and_comment_only_documents_are_not_counted() {
        let docs = split_documents("# header\n---\nkind: Pod\n---\n# nothing\n---\n");
        assert_eq!(docs, vec![(2, "\nkind: Pod\n")]);
    }
}
