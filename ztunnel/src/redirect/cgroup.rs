//! Finding where cgroup v2 is mounted: `/sys/fs/cgroup` on unified hosts,
//! `/sys/fs/cgroup/unified` on hybrid ones, elsewhere in some nodes. Never assume.
use std::path::PathBuf;

/// Mount point of the cgroup2 hierarchy, read from `/proc/self/mounts`.
pub fn cgroup2_root() -> std::io::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_dev, path, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(path))
        })
        .next()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no cgroup2 mount in /proc/self/mounts"))
}

/// The cgroup v2 id (the inode of its directory) of this process, as
/// `bpf_get_current_cgroup_id` reports it in the kernel programs.
pub fn own_cgroup_id() -> std::io::Result<u64> {
    let text = std::fs::read_to_string("/proc/self/cgroup")?;
    let path = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no cgroup v2 entry in /proc/self/cgroup"))?;
    cgroup_id(&cgroup2_root()?.join(path.trim_start_matches('/')))
}

/// The cgroup v2 id of the cgroup directory `dir` (its inode).
pub fn cgroup_id(dir: &std::path::Path) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(dir)?.ino())
}

/// Whether bpffs is mounted at `path` (pins need it).
pub fn bpffs_mounted(path: &std::path::Path) -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .map(|m| {
            m.lines().any(|l| {
            let mut f = l.split_whitespace();
            matches!((f.next(), f.next(), f.next()), (Some(_), Some(p), Some("bpf")) if std::path::Path::new(p) == path)
        })
        })
        .unwrap_or(false)
}
