//! An agent reuses the maps an earlier agent pinned only where their layout is its own (aya
//! takes a pin as it finds it): a counter map that grew a slot is made anew, and any other
//! map of another layout refuses the start, naming the map, instead of letting new programs
//! misread live state after an upgrade.
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use mesh_tests::mesh::sweep_pins;
use ztunnel::redirect::{Capture, CaptureConfig, Exclusions};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
const BPF_MAP_TYPE_LRU_HASH: u32 = 9;

/// A pin directory named so `sweep_pins` removes it if this process dies first; removed
/// (links detached, pins gone) when dropped, even when the test fails.
struct Pins(PathBuf);

impl Pins {
    fn new(tag: &str) -> Self {
        sweep_pins();
        let dir = PathBuf::from("/sys/fs/bpf").join(format!("zt{}x{tag}-pins", std::process::id()));
        let _ = ztunnel::redirect::remove_pinned(&dir);
        std::fs::create_dir_all(dir.join("maps")).expect("pin dir (needs root and bpffs)");
        Pins(dir)
    }

    fn config(&self, shortcut: bool) -> CaptureConfig {
        CaptureConfig {
            pin_dir: self.0.clone(),
            cgroup: mesh_tests::cgroup2_root().expect("cgroup v2").to_path_buf(),
            exclusions: Exclusions::default(),
            max_pods: 16,
            for_foreign_proxy: false,
            sockmap_shortcut: shortcut,
            shortcut_max_sockets: 64,
        }
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = ztunnel::redirect::remove_pinned(&self.0);
    }
}

/// Creates a map with raw `bpf(2)` calls, as an older agent would have, and pins it at `path`.
fn pin_map(path: &Path, map_type: u32, key: u32, value: u32, entries: u32) {
    // union bpf_attr, BPF_MAP_CREATE: map_type, key_size, value_size, max_entries, map_flags.
    let mut attr = [0u8; 128];
    for (i, v) in [map_type, key, value, entries, 0].into_iter().enumerate() {
        attr[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
    }
    // SAFETY: bpf(2) with a zeroed attr of sufficient size.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_CREATE, attr.as_ptr(), attr.len() as u32) };
    assert!(fd >= 0, "BPF_MAP_CREATE: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh fd the kernel just returned to us.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // BPF_OBJ_PIN: pathname (u64 pointer), bpf_fd (u32).
    let name = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let mut attr = [0u8; 128];
    attr[..8].copy_from_slice(&(name.as_ptr() as u64).to_ne_bytes());
    attr[8..12].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
    // SAFETY: as above; `name` outlives the call.
    let r = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_PIN, attr.as_ptr(), attr.len() as u32) };
    assert_eq!(r, 0, "BPF_OBJ_PIN {}: {}", path.display(), std::io::Error::last_os_error());
}

#[test]
fn a_pinned_state_map_of_another_layout_refuses_the_start_naming_it() {
    let pins = Pins::new("layout");
    // ENROLLED as some other agent might have made it: a 1-byte value.
    pin_map(&pins.0.join("maps/ENROLLED"), BPF_MAP_TYPE_HASH, 8, 1, 16);
    let err = match Capture::install(pins.config(false)) {
        Ok(_) => panic!("capture started on a pinned map of another layout"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("map ENROLLED") && err.contains("incompatible"), "{err}");
    // Nothing was attached.
    assert!(!pins.0.join("links/connect4").exists(), "a link was pinned before the refusal");
}

/// Same sizes, another kind of map (an LRU hash where a hash is expected): still refused.
#[test]
fn a_pinned_map_of_another_type_with_the_same_sizes_refuses_the_start() {
    let pins = Pins::new("kind");
    // ENROLLED's own sizes, as an LRU hash.
    let probe = Pins::new("kindprobe");
    let capture = Capture::install(probe.config(false)).expect("a fresh install");
    let info = aya::maps::MapInfo::from_pin(probe.0.join("maps/ENROLLED")).unwrap();
    let (key, value) = (info.key_size(), info.value_size());
    drop(capture);
    drop(probe);
    pin_map(&pins.0.join("maps/ENROLLED"), BPF_MAP_TYPE_LRU_HASH, key, value, 16);
    let err = match Capture::install(pins.config(false)) {
        Ok(_) => panic!("capture started on a pinned map of another type"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("map ENROLLED") && err.contains("LruHash"), "{err}");
}

#[test]
fn a_pinned_counter_map_that_grew_a_slot_is_made_anew() {
    let pins = Pins::new("grown");
    // The shortcut's counters as the previous release pinned them: one slot fewer.
    let path = pins.0.join("maps/SHORTCUT_EVENTS");
    pin_map(&path, BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, 8);
    let capture = Capture::install(pins.config(true)).expect("capture with a grown counter map");
    let info = aya::maps::MapInfo::from_pin(&path).expect("counter map pinned again");
    assert_eq!(info.max_entries(), ztunnel_common::SHORTCUT_EVENT_SLOTS, "the old, smaller map was kept");
    let events = capture.shortcut_events().expect("counters readable").expect("shortcut installed");
    assert_eq!(events.queue_limit, 0, "{events:?}");
    drop(capture);
}
