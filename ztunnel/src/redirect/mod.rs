//! Loading, attaching and pinning the capture programs, and enrolling pods into them.
//!
//! Pins live under one directory per agent instance on bpffs:
//! `maps/<NAME>` (reused across restarts, so in-flight state survives), `links/{connect4,
//! connect6,sockops}` (cgroup links) and `pods/<uid>/sk_lookup` (one link per pod netns).
//! A restarted agent loads fresh programs against the pinned maps, attaches them, then
//! detaches the previous links, so the kernel never holds two copies of ours.
mod cgroup;
mod diag;
mod maps;
mod probe;
mod shortcut;
mod sys;
mod worker;

use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use aya::maps::{HashMap, MapData, SockHash};
use aya::programs::links::FdLink;
use aya::programs::SkLookup;
use aya::Ebpf;
use ztunnel_common::{IpKey, PodEntry};

pub use cgroup::{bpffs_mounted, cgroup2_root};
pub use diag::TARGET as KERNEL_LOG_TARGET;
pub use maps::{CounterSnapshot, Exclusions, OrigDstTable, OutcomeCounts, ProxyDials};
pub use probe::{check_kernel, Feature, KernelTooOld, MissingFeature, FEATURES, FOREIGN_PROXY_FEATURES, KERNEL_FLOOR};
pub use shortcut::{ShortcutEvents, ShortcutReport};

/// The compiled kernel programs, embedded at build time by `build.rs`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ztunnel-ebpf"));

const MAP_NAMES: [&str; 19] = [
    "AYA_LOGS",
    "DIAG",
    "SHORTCUT",
    "SHORTCUT_STATE",
    "SHORTCUT_QUEUE",
    "SHORTCUT_SWITCH",
    "SHORTCUT_EVENTS",
    "FAULTS",
    "PROXY_CGROUPS",
    "ENROLLED",
    "ORIG_BY_COOKIE",
    "ORIG_BY_TUPLE",
    "EXCL_OUT_PORTS",
    "EXCL_IN_PORTS",
    "EXCL_CIDRS",
    "PROBE_SOURCES",
    "INBOUND_LISTENERS",
    "COUNTERS",
    "PROXY_DIALS",
];

/// The links at the cgroup (one per program attached there): pin name, the program it
/// runs, and its hook (the last two for `/config_dump`).
const CGROUP_LINKS: [(&str, &str, &str); 6] = [
    ("connect4", "capture_connect4", "cgroup/connect4"),
    ("connect6", "capture_connect6", "cgroup/connect6"),
    ("sockops", "record_origdst", "sock_ops"),
    ("getsockopt", "answer_original_dst", "cgroup/getsockopt"),
    ("adopt", "adopt_inbound_listener", "sock_ops"),
    (shortcut::PAIR_LINK, "shortcut_pair", "sock_ops"),
];
/// The sk_msg link of the sockmap shortcut, attached to its map rather than the cgroup.
const MSG_LINK: (&str, &str, &str) = (shortcut::MSG_LINK, "shortcut_redirect", "sk_msg");
/// The program each pod's `sk_lookup` link runs.
const POD_LINK_PROGRAM: &str = "steer_inbound";

/// The per-pod constant of `steer_inbound` (see the kernel program).
const POD_NETNS_COOKIE: &str = "POD_NETNS_COOKIE";

/// Why capture could not be installed or changed.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program { name: &'static str, source: aya::programs::ProgramError },
    #[error("map {name}: {source}")]
    Map { name: &'static str, source: aya::maps::MapError },
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("invalid pod uid {0:?}: only [A-Za-z0-9_-] allowed (bpffs pin names)")]
    BadUid(String),
    #[error("the sockmap shortcut is not installed (start the agent with --sockmap-shortcut)")]
    ShortcutNotInstalled,
    #[error(
        "map {name} pinned at {path} by an incompatible agent ({found}; this one needs {expected}): \
         uninstall capture first (`ztunnel node --uninstall`), or remove the pin"
    )]
    IncompatiblePin { name: &'static str, path: PathBuf, found: String, expected: String },
}

/// One pinned link of the capture programs, for `/config_dump` (`ztunnel ctl ebpf`): what
/// runs where, and the kernel's ids for it (to match `bpftool link` output).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LinkReport {
    /// The program the link runs (its name in the eBPF object).
    pub program: &'static str,
    /// The hook it runs on (`cgroup/connect4`, `sock_ops`, `sk_lookup`, ...).
    pub hook: &'static str,
    /// Where it is attached: the cgroup directory, or the pod whose netns it serves.
    pub attach_point: String,
    /// The pod (uid) of a per-pod link.
    pub pod: Option<String>,
    /// The pin on bpffs.
    pub pin: PathBuf,
    /// The kernel's link id; `None` when the pin exists but the kernel did not describe it.
    pub link_id: Option<u32>,
    /// The kernel's id of the attached program.
    pub program_id: Option<u32>,
}

impl LinkReport {
    /// The link pinned at `pin`, or `None` when there is no such pin.
    fn read(
        pin: &Path,
        program: &'static str,
        hook: &'static str,
        attach_point: String,
        pod: Option<String>,
    ) -> Option<Self> {
        if !pin.exists() {
            return None;
        }
        let info = aya::programs::links::PinnedLink::from_pin(pin).ok().and_then(|l| FdLink::from(l).info().ok());
        Some(LinkReport {
            program,
            hook,
            attach_point,
            pod,
            pin: pin.to_path_buf(),
            link_id: info.as_ref().map(|i| i.id()),
            program_id: info.as_ref().map(|i| i.program_id()),
        })
    }
}

/// Where and how to install capture.
#[derive(Debug, Clone)]
pub struct CaptureConfig {
    /// Per-instance pin directory on bpffs, e.g. `/sys/fs/bpf/ztunnel`.
    pub pin_dir: PathBuf,
    /// cgroup v2 directory above every pod (and the proxy), where connect4/6 and sock_ops attach.
    pub cgroup: PathBuf,
    /// What is never captured.
    pub exclusions: Exclusions,
    /// Pods one agent can enroll (size of the per-pod maps, fixed when they are first
    /// created). At the limit an Add is refused with the reason; nothing is left unproxied.
    pub max_pods: u32,
    /// Also serve a proxy that is not ours (Istio's ztunnel): answer its
    /// `getsockopt(SO_ORIGINAL_DST)` and adopt its in-pod 15006 listeners. Off for our own
    /// agent, which needs neither (and a getsockopt program costs every getsockopt call).
    pub for_foreign_proxy: bool,
    /// Attach the sockmap shortcut for the in-pod loopback legs (see `shortcut`); off, any
    /// shortcut links an earlier agent left are detached.
    pub sockmap_shortcut: bool,
    /// Sockets the shortcut can track at once (both ends of each leg count), fixed when its
    /// maps are first created. Beyond it a socket stays on the normal path, counted.
    pub shortcut_max_sockets: u32,
}

/// Default for [`CaptureConfig::shortcut_max_sockets`].
pub const DEFAULT_SHORTCUT_MAX_SOCKETS: u32 = 65536;

/// Default for [`CaptureConfig::max_pods`].
pub const DEFAULT_MAX_PODS: u32 = 4096;

/// Installed capture: programs attached, maps pinned. Dropping it leaves capture in place
/// (pins keep it); [`Capture::uninstall`] removes everything.
pub struct Capture {
    cfg: CaptureConfig,
    ebpf: Mutex<Ebpf>,
    orig: OrigDstTable,
    dials: ProxyDials,
    /// Drains the programs' log records into `tracing` (see `diag`).
    _kernel_log: worker::Worker,
    /// Removes shortcut state left by sockets that are gone (only with the shortcut on).
    _sweeper: Option<worker::Worker>,
}

/// Where capture's connect programs run among other programs on the connect hooks, e.g. a
/// CNI's socket load balancer that rewrites service VIPs to backends (Cilium, Calico eBPF).
/// Capture must see the address the app dialled, so it asks to run before all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum ConnectOrder {
    /// Appended after programs already attached to the same cgroup (kernels without
    /// ordering flags); programs in cgroups below still run first.
    Appended,
    /// Before every non-preorder program of this cgroup and the cgroups below it.
    Preorder,
    /// As `Preorder`, and first among preorder programs of this cgroup.
    First,
}

impl std::fmt::Debug for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capture").field("cfg", &self.cfg).finish()
    }
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> CaptureError + 'a {
    move |source| CaptureError::Io { what, path: path.to_path_buf(), source }
}

fn prog_err(name: &'static str) -> impl FnOnce(aya::programs::ProgramError) -> CaptureError {
    move |source| CaptureError::Program { name, source }
}

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> CaptureError {
    move |source| CaptureError::Map { name, source }
}

impl Capture {
    /// Loads the programs (reusing pinned maps), attaches the cgroup programs and replaces
    /// any links a previous instance left pinned.
    pub fn install(cfg: CaptureConfig) -> Result<Self, CaptureError> {
        for sub in ["maps", "links", "pods"] {
            let p = cfg.pin_dir.join(sub);
            std::fs::create_dir_all(&p).map_err(io_err("creating pin dir", &p))?;
        }
        // Once, before the first load: later loads (one per enrolled pod) reuse the maps this
        // load has checked or made.
        check_pinned_maps(&cfg.pin_dir)?;
        let mut ebpf = load_object(&cfg, 0)?;

        let cgroup = std::fs::File::open(&cfg.cgroup).map_err(io_err("opening cgroup", &cfg.cgroup))?;
        let links = cfg.pin_dir.join("links");
        let connect = |ebpf: &mut Ebpf, name, attach_type, pin: &str| {
            attach_cgroup(ebpf, name, attach_type, cgroup.as_fd(), &links.join(pin), &CONNECT_FIRST)
        };
        let order4 = connect(&mut ebpf, "capture_connect4", ATTACH_CONNECT4, "connect4")?;
        let order6 = connect(&mut ebpf, "capture_connect6", ATTACH_CONNECT6, "connect6")?;
        let connect_order = order4.min(order6);
        tracing::info!(order = ?connect_order, "connect programs attached");
        if connect_order == ConnectOrder::Appended {
            tracing::warn!(
                "this kernel cannot order cgroup programs (link-based BPF_F_PREORDER, 2025 kernels): a socket load balancer \
                 attached to the same cgroup before this agent (e.g. Cilium's) would rewrite service addresses \
                 before capture sees them"
            );
        }
        let plain = |ebpf: &mut Ebpf, name, attach_type, pin: &str| {
            attach_cgroup(ebpf, name, attach_type, cgroup.as_fd(), &links.join(pin), &APPENDED).map(drop)
        };
        plain(&mut ebpf, "record_origdst", ATTACH_SOCK_OPS, "sockops")?;
        if cfg.for_foreign_proxy {
            plain(&mut ebpf, "answer_original_dst", ATTACH_GETSOCKOPT, "getsockopt")?;
            plain(&mut ebpf, "adopt_inbound_listener", ATTACH_SOCK_OPS, "adopt")?;
        }
        if cfg.sockmap_shortcut {
            shortcut::install(&mut ebpf, cgroup.as_fd(), &links)?;
        } else {
            shortcut::remove(&mut ebpf, &links)?;
        }
        maps::write_exclusions(&mut ebpf, &cfg.exclusions)?;
        // This process is the proxy, unless capture serves another one (then it is the CNI,
        // which must not be trusted as a proxy: its cgroup is no proxy's).
        if !cfg.for_foreign_proxy {
            let own = cgroup::own_cgroup_id()
                .map_err(io_err("finding the agent's cgroup", Path::new("/proc/self/cgroup")))?;
            maps::register_proxy_cgroup(&mut ebpf, own)?;
        }
        let orig = OrigDstTable::new(
            aya::maps::MapData::from_pin(cfg.pin_dir.join("maps/ORIG_BY_TUPLE")).map_err(map_err("ORIG_BY_TUPLE"))?,
        )?;
        let dials = ProxyDials::new(
            aya::maps::MapData::from_pin(cfg.pin_dir.join("maps/PROXY_DIALS")).map_err(map_err("PROXY_DIALS"))?,
        )?;
        // Quiet until an operator asks (`/logging` with `ztunnel::ebpf=debug`).
        diag::set(&mut ebpf, false)?;
        let kernel_log = diag::start_reader(&mut ebpf)?;
        let sweeper =
            if cfg.sockmap_shortcut { Some(shortcut::start_sweeper(cfg.pin_dir.join("maps"))?) } else { None };
        Ok(Self { cfg, ebpf: Mutex::new(ebpf), orig, dials, _kernel_log: kernel_log, _sweeper: sweeper })
    }

    /// Where the inbound proxy registers its dials to apps from clients' addresses.
    pub fn proxy_dials(&self) -> ProxyDials {
        self.dials.clone()
    }

    /// Lookup of original destinations for the outbound proxy.
    pub fn orig_dst_table(&self) -> OrigDstTable {
        self.orig.clone()
    }

    /// Starts capturing a pod: its netns cookie becomes enrolled, every inbound TCP
    /// connection in its netns (but 15008 and the exemptions) steers to `inbound_listener`,
    /// through an sk_lookup program loaded for this netns alone.
    pub fn enroll(
        &self,
        uid: &str,
        netns: &crate::netns::InpodNetns,
        inbound_listener: &impl AsRawFd,
    ) -> Result<(), CaptureError> {
        self.enroll_with(uid, netns, Some(inbound_listener.as_raw_fd()))
    }

    /// Starts capturing a pod for a proxy that is not this agent (e.g. Istio's ztunnel
    /// enrolled over ZDS): as [`Capture::enroll`], but the inbound listener is whichever
    /// socket a registered proxy cgroup ([`Capture::add_proxy_cgroup`]) opens on 15006 in the
    /// pod's netns; until then inbound connections are dropped (fail closed). Outbound
    /// connections go to the proxy's 15001, which learns their destination with
    /// `getsockopt(SO_ORIGINAL_DST)`, answered by the kernel programs.
    pub fn enroll_for_proxy(&self, uid: &str, netns: &crate::netns::InpodNetns) -> Result<(), CaptureError> {
        self.enroll_with(uid, netns, None)
    }

    /// Lets the processes of the cgroup at `path` act as a proxy: their marked connects are
    /// not captured, and their 15006 listeners in enrolled pods receive inbound traffic.
    pub fn add_proxy_cgroup(&self, path: &Path) -> Result<(), CaptureError> {
        let id = cgroup::cgroup_id(path).map_err(io_err("reading proxy cgroup", path))?;
        let mut ebpf = self.ebpf.lock().unwrap_or_else(|e| e.into_inner());
        maps::register_proxy_cgroup(&mut ebpf, id)
    }

    fn enroll_with(
        &self,
        uid: &str,
        netns: &crate::netns::InpodNetns,
        inbound_listener: Option<std::os::fd::RawFd>,
    ) -> Result<(), CaptureError> {
        let dir = self.pod_dir(uid)?;
        let result = self.enroll_inner(&dir, netns, inbound_listener);
        if result.is_err() {
            let _ = self.unenroll(uid, netns.cookie());
        }
        result
    }

    fn enroll_inner(
        &self,
        dir: &Path,
        netns: &crate::netns::InpodNetns,
        listener: Option<std::os::fd::RawFd>,
    ) -> Result<(), CaptureError> {
        std::fs::create_dir_all(dir).map_err(io_err("creating pod pin dir", dir))?;
        let cookie = netns.cookie();
        {
            let mut ebpf = self.ebpf.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(listener) = listener {
                let mut socks: SockHash<&mut MapData, u64> =
                    SockHash::try_from(ebpf.map_mut("INBOUND_LISTENERS").expect("map"))
                        .map_err(map_err("INBOUND_LISTENERS"))?;
                socks.insert(cookie, listener, 0).map_err(map_err("INBOUND_LISTENERS"))?;
            }
            let mut enrolled: HashMap<&mut MapData, u64, PodEntry> =
                HashMap::try_from(ebpf.map_mut("ENROLLED").expect("map")).map_err(map_err("ENROLLED"))?;
            enrolled.insert(cookie, PodEntry { flags: 1, _pad: 0 }, 0).map_err(map_err("ENROLLED"))?;
        }
        // A copy of the object whose sk_lookup program knows this netns's cookie; its maps
        // are the pinned ones. Only the pinned link outlives this function.
        let mut pod_ebpf = load_object(&self.cfg, cookie)?;
        let p: &mut SkLookup = program(&mut pod_ebpf, POD_LINK_PROGRAM)?;
        p.load().map_err(prog_err(POD_LINK_PROGRAM))?;
        let id = p.attach(netns.fd()).map_err(prog_err("sk_lookup"))?;
        let link: FdLink = p.take_link(id).map_err(prog_err("sk_lookup"))?.into();
        replace_pinned(link, &dir.join("sk_lookup"))
    }

    /// Stops capturing a pod: detaches its sk_lookup link and removes the entries keyed by
    /// its netns cookie (never by IP, so a late removal cannot touch a pod that reuses an
    /// address).
    pub fn unenroll(&self, uid: &str, netns_cookie: u64) -> Result<(), CaptureError> {
        let dir = self.pod_dir(uid)?;
        // Detach first so no lookup sees a half-removed pod.
        let link = dir.join("sk_lookup");
        sys::detach_pinned(&link).map_err(io_err("detaching", &link))?;
        let _ = std::fs::remove_dir(&dir);
        let mut ebpf = self.ebpf.lock().unwrap_or_else(|e| e.into_inner());
        maps::remove_pod_entries(&mut ebpf, netns_cookie)
    }

    /// Makes the connect programs fail to record original destinations (`true`) or work
    /// normally: fault injection, to prove on a live kernel that such a failure refuses the
    /// connect instead of letting it out unproxied.
    pub fn inject_record_failure(&self, on: bool) -> Result<(), CaptureError> {
        let mut ebpf = self.ebpf.lock().unwrap_or_else(|e| e.into_inner());
        let mut faults: aya::maps::Array<&mut MapData, u32> =
            aya::maps::Array::try_from(ebpf.map_mut("FAULTS").expect("map")).map_err(map_err("FAULTS"))?;
        faults.set(0, u32::from(on), 0).map_err(map_err("FAULTS"))
    }

    /// Switches the kernel programs' decision logging (aya-log, `tracing` target
    /// `ztunnel::ebpf`) on or off, for every pod at once.
    pub fn set_kernel_logging(&self, on: bool) -> Result<(), CaptureError> {
        let mut ebpf = self.ebpf.lock().unwrap_or_else(|e| e.into_inner());
        diag::set(&mut ebpf, on)
    }

    /// The sockmap shortcut's kill switch (see [`CaptureConfig::sockmap_shortcut`]): takes
    /// effect on the next send of every connection, without a restart. Refused when the
    /// shortcut is not installed (switching it on would do nothing).
    pub fn set_shortcut(&self, on: bool) -> Result<(), CaptureError> {
        if !self.cfg.sockmap_shortcut {
            return Err(CaptureError::ShortcutNotInstalled);
        }
        let mut ebpf = self.ebpf.lock().unwrap_or_else(|e| e.into_inner());
        shortcut::set_switch(&mut ebpf, on)
    }

    /// The sockmap shortcut's switch, counters and tracked sockets.
    pub fn shortcut(&self) -> Result<ShortcutReport, CaptureError> {
        let ebpf = self.ebpf.lock().unwrap_or_else(|e| e.into_inner());
        shortcut::report(&ebpf, self.cfg.sockmap_shortcut)
    }

    /// Where this instance pins its maps and links (bpffs).
    pub fn pin_dir(&self) -> &Path {
        &self.cfg.pin_dir
    }

    /// Removes the shortcut's state of sockets that are gone now, as the sweeper thread does
    /// every 30 s; returns how many sockets' entries went.
    pub fn sweep_shortcut(&self) -> Result<usize, CaptureError> {
        if !self.cfg.sockmap_shortcut {
            return Err(CaptureError::ShortcutNotInstalled);
        }
        shortcut::sweep(&self.cfg.pin_dir.join("maps"))
    }

    /// The sockmap shortcut's counters alone (cheap, for metrics); `None` when it is not
    /// installed.
    pub fn shortcut_events(&self) -> Result<Option<ShortcutEvents>, CaptureError> {
        if !self.cfg.sockmap_shortcut {
            return Ok(None);
        }
        let ebpf = self.ebpf.lock().unwrap_or_else(|e| e.into_inner());
        shortcut::events(&ebpf).map(Some)
    }

    /// Per-program counters summed over CPUs.
    pub fn counters(&self) -> Result<CounterSnapshot, CaptureError> {
        let ebpf = self.ebpf.lock().unwrap_or_else(|e| e.into_inner());
        maps::read_counters(&ebpf)
    }

    /// Kernel ids of the links this instance has pinned (cgroup links and pod links).
    pub fn link_ids(&self) -> Vec<u32> {
        pinned_link_ids(&self.cfg.pin_dir)
    }

    /// The links this instance has pinned, with what each runs and where: the cgroup links
    /// first, then one `sk_lookup` link per enrolled pod (sorted by pod uid).
    pub fn links(&self) -> Vec<LinkReport> {
        let cgroup = self.cfg.cgroup.display().to_string();
        let mut out: Vec<LinkReport> = CGROUP_LINKS
            .iter()
            .filter_map(|(pin, program, hook)| {
                LinkReport::read(&self.cfg.pin_dir.join("links").join(pin), program, hook, cgroup.clone(), None)
            })
            .collect();
        let (pin, program, hook) = MSG_LINK;
        let on_map = "map SHORTCUT".to_string();
        out.extend(LinkReport::read(&self.cfg.pin_dir.join("links").join(pin), program, hook, on_map, None));
        let mut pods: Vec<(String, PathBuf)> = std::fs::read_dir(self.cfg.pin_dir.join("pods"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path().join("sk_lookup")))
            .collect();
        pods.sort();
        out.extend(pods.into_iter().filter_map(|(uid, pin)| {
            LinkReport::read(&pin, POD_LINK_PROGRAM, "sk_lookup", format!("netns of pod {uid}"), Some(uid))
        }));
        out
    }

    /// Removes every link, map entry and pin this instance (or its predecessors) created.
    pub fn uninstall(&self) -> Result<(), CaptureError> {
        remove_pinned(&self.cfg.pin_dir)
    }

    fn pod_dir(&self, uid: &str) -> Result<PathBuf, CaptureError> {
        if !valid_pod_uid(uid) {
            return Err(CaptureError::BadUid(uid.to_string()));
        }
        Ok(self.cfg.pin_dir.join("pods").join(uid))
    }
}

/// Loads the embedded object against the maps pinned under `cfg.pin_dir` (created on first
/// use, sized from `cfg`), with `steer_inbound`'s netns cookie set to `pod_netns_cookie`.
fn load_object(cfg: &CaptureConfig, pod_netns_cookie: u64) -> Result<Ebpf, CaptureError> {
    let (pin_dir, max_pods) = (&cfg.pin_dir, cfg.max_pods);
    let map_paths: Vec<(&str, PathBuf)> = MAP_NAMES.iter().map(|n| (*n, pin_dir.join("maps").join(n))).collect();
    let mut loader = aya::EbpfLoader::new();
    // Drops the kernel BTF that `new` parsed before the object is loaded.
    for (name, path) in &map_paths {
        loader.map_pin_path(name, path.as_path());
    }
    loader.override_global(POD_NETNS_COOKIE, &pod_netns_cookie, true);
    for per_pod in ["ENROLLED", "INBOUND_LISTENERS"] {
        loader.map_max_entries(per_pod, max_pods.max(1));
    }
    for per_socket in ["SHORTCUT", "SHORTCUT_STATE", "SHORTCUT_QUEUE"] {
        loader.map_max_entries(per_socket, cfg.shortcut_max_sockets.max(1));
    }
    // The programs need no CO-RE relocations; without this aya keeps the parsed kernel BTF.
    loader.btf(None);
    let ebpf = loader.load(EBPF_OBJECT);
    drop(loader);
    release_freed_memory();
    Ok(ebpf?)
}

/// Maps that only hold counters: pinned by an earlier agent with another layout, they are
/// made anew (their counts start over) instead of refusing the start.
const RESETTABLE_MAPS: [&str; 2] = ["SHORTCUT_EVENTS", "COUNTERS"];

/// A map's shape as the kernel describes it: type, flags, key and value sizes, entries.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Layout {
    kind: Option<aya::maps::MapType>,
    flags: u32,
    key: u32,
    value: u32,
    entries: u32,
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = self.kind.map_or("unknown type".to_string(), |k| format!("{k:?}"));
        write!(f, "{kind}, flags {:#x}, key {} B, value {} B", self.flags, self.key, self.value)
    }
}

/// Each map's layout as this object defines it.
fn map_layouts() -> &'static std::collections::HashMap<String, Layout> {
    static LAYOUTS: std::sync::OnceLock<std::collections::HashMap<String, Layout>> = std::sync::OnceLock::new();
    LAYOUTS.get_or_init(|| {
        // The object is embedded at build time and loads below; a parse failure here would
        // fail that load too, so an empty table only defers the error to it.
        let kind = |t: u32| {
            aya_obj::generated::bpf_map_type::try_from(t).ok().and_then(|t| aya::maps::MapType::try_from(t).ok())
        };
        aya_obj::Object::parse(EBPF_OBJECT)
            .map(|o| {
                o.maps
                    .iter()
                    .map(|(n, m)| {
                        let layout = Layout {
                            kind: kind(m.map_type()),
                            flags: m.map_flags(),
                            key: m.key_size(),
                            value: m.value_size(),
                            entries: m.max_entries(),
                        };
                        (n.clone(), layout)
                    })
                    .collect()
            })
            .unwrap_or_default()
    })
}

/// Checks each map an earlier agent pinned under `pin_dir` against this object's layout
/// before the load reuses it: aya takes a pin as it finds it, and new programs reading an
/// old layout would misread live state (enrolled pods, original destinations, tracked
/// sockets). A counter map that differs (`RESETTABLE_MAPS`, e.g. one that gained a slot) is
/// unpinned and made anew; any other refuses the start, naming the map, so an incompatible
/// upgrade fails loudly instead of capturing wrongly. A pin that cannot be read refuses too.
fn check_pinned_maps(pin_dir: &Path) -> Result<(), CaptureError> {
    for name in MAP_NAMES {
        let path = pin_dir.join("maps").join(name);
        if !path.exists() {
            continue;
        }
        let Some(&wanted) = map_layouts().get(name) else { continue };
        let info = aya::maps::MapInfo::from_pin(&path).map_err(map_err(name))?;
        let found = Layout {
            kind: info.map_type().ok(),
            flags: info.map_flags(),
            key: info.key_size(),
            value: info.value_size(),
            entries: info.max_entries(),
        };
        let resettable = RESETTABLE_MAPS.contains(&name);
        // Entries are sized from the configuration for most maps, so only a counter map's
        // count is part of its layout.
        let same = Layout { entries: wanted.entries, ..found } == wanted;
        if same && !(resettable && found.entries < wanted.entries) {
            continue;
        }
        if resettable {
            std::fs::remove_file(&path).map_err(io_err("unpinning outgrown", &path))?;
            tracing::info!(map = name, "counter map pinned by an earlier agent has another layout; made anew");
            continue;
        }
        return Err(CaptureError::IncompatiblePin {
            name,
            path,
            found: found.to_string(),
            expected: wanted.to_string(),
        });
    }
    Ok(())
}

/// `EbpfLoader::new` parses the kernel's BTF (tens of MB, freed right after); glibc keeps
/// freed heap in its arenas, so without a trim every enrollment would leave the agent's RSS
/// tens of MB higher for good.
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Whether `uid` can name a pin directory (bpffs refuses `.`) and a state file without
/// leaving its directory: `[A-Za-z0-9_-]`, 1–128 bytes.
pub fn valid_pod_uid(uid: &str) -> bool {
    !uid.is_empty() && uid.len() <= 128 && uid.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-".contains(&b))
}

/// A program of the loaded object, as its concrete type.
fn program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, CaptureError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(CaptureError::Program { name, source: aya::programs::ProgramError::NotLoaded })?
        .try_into()
        .map_err(prog_err(name))
}

/// `enum bpf_attach_type` values of the cgroup hooks capture uses.
const ATTACH_SOCK_OPS: u32 = 3;
const ATTACH_CONNECT4: u32 = 10;
const ATTACH_CONNECT6: u32 = 11;
const ATTACH_GETSOCKOPT: u32 = 21;

/// Ahead of other programs on the hook where the kernel can order them, else appended.
const CONNECT_FIRST: [(u32, ConnectOrder); 3] = [
    (sys::BPF_F_PREORDER | sys::BPF_F_BEFORE, ConnectOrder::First),
    (sys::BPF_F_PREORDER, ConnectOrder::Preorder),
    (0, ConnectOrder::Appended),
];
/// A plain link (order does not matter for the hook).
const APPENDED: [(u32, ConnectOrder); 1] = [(0, ConnectOrder::Appended)];

/// Loads the cgroup program `name`, attaches it to `cgroup` with the first of `tries`' flags
/// the kernel accepts (EINVAL means it does not know them) and pins the link at `pin`
/// (replacing an older pin); returns the order that flag set gives. The link is created
/// here rather than by aya, whose attach takes no ordering flags and cannot pin every kind.
fn attach_cgroup(
    ebpf: &mut Ebpf,
    name: &'static str,
    attach_type: u32,
    cgroup: std::os::fd::BorrowedFd<'_>,
    pin: &Path,
    tries: &[(u32, ConnectOrder)],
) -> Result<ConnectOrder, CaptureError> {
    use aya::programs::Program;
    let p =
        ebpf.program_mut(name).ok_or(CaptureError::Program { name, source: aya::programs::ProgramError::NotLoaded })?;
    match p {
        Program::CgroupSockAddr(p) => p.load(),
        Program::SockOps(p) => p.load(),
        Program::CgroupSockopt(p) => p.load(),
        _ => Err(aya::programs::ProgramError::UnexpectedProgramType),
    }
    .map_err(prog_err(name))?;
    let prog = p.fd().map_err(prog_err(name))?.as_fd();
    let mut last = std::io::Error::from_raw_os_error(libc::EINVAL);
    for &(flags, order) in tries {
        match sys::link_create(prog, cgroup, attach_type, flags) {
            Ok(link) => {
                replace_pinned_with(pin, |fresh| sys::obj_pin(&link, fresh))?;
                return Ok(order);
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && flags != 0 => last = e,
            Err(e) => return Err(CaptureError::Io { what: "attaching", path: pin.to_path_buf(), source: e }),
        }
    }
    Err(CaptureError::Io { what: "attaching", path: pin.to_path_buf(), source: last })
}

/// Pins `link` at `path`, detaching whatever link was pinned there before (restart).
fn replace_pinned(link: FdLink, path: &Path) -> Result<(), CaptureError> {
    replace_pinned_with(path, |fresh| link.pin(fresh).map(drop).map_err(|e| std::io::Error::other(e.to_string())))
}

/// Pins a link at `path` with `pin` (given the temporary name), then detaches whatever link
/// was pinned at `path` before: the new one is attached before the old one goes.
fn replace_pinned_with(path: &Path, pin: impl FnOnce(&Path) -> std::io::Result<()>) -> Result<(), CaptureError> {
    let fresh = pending_path(path);
    let _ = sys::detach_pinned(&fresh);
    pin(&fresh).map_err(io_err("pinning", &fresh))?;
    sys::detach_pinned(path).map_err(io_err("detaching previous", path))?;
    std::fs::rename(&fresh, path).map_err(io_err("renaming pin", path))
}

/// Where a replacement link is pinned before it takes the final name (bpffs forbids dots).
fn pending_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push("_new");
    path.with_file_name(name)
}

/// 16-byte key for an address (IPv4 as v4-mapped), as the kernel programs use.
pub fn ip_key(ip: IpAddr) -> IpKey {
    IpKey {
        addr: match ip {
            IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
            IpAddr::V6(a) => a.octets(),
        },
    }
}

/// Kernel ids of the links pinned under `pin_dir` (cgroup links and pod links), also
/// readable when no agent runs (e.g. after a crash).
pub fn pinned_link_ids(pin_dir: &Path) -> Vec<u32> {
    let mut paths: Vec<PathBuf> =
        CGROUP_LINKS.iter().chain([&MSG_LINK]).map(|(n, ..)| pin_dir.join("links").join(n)).collect();
    for entry in std::fs::read_dir(pin_dir.join("pods")).into_iter().flatten().flatten() {
        paths.push(entry.path().join("sk_lookup"));
    }
    paths
        .iter()
        .filter_map(|p| aya::programs::links::PinnedLink::from_pin(p).ok())
        .filter_map(|l| FdLink::from(l).info().ok().map(|i| i.id()))
        .collect()
}

/// Detaches every link pinned under `pin_dir` and removes all its pins: uninstall for an
/// agent that is no longer running (or a leftover of a crashed test).
pub fn remove_pinned(pin_dir: &Path) -> Result<(), CaptureError> {
    let pods = pin_dir.join("pods");
    for entry in std::fs::read_dir(&pods).into_iter().flatten().flatten() {
        let link = entry.path().join("sk_lookup");
        sys::detach_pinned(&link).map_err(io_err("detaching", &link))?;
        let _ = sys::detach_pinned(&pending_path(&entry.path().join("sk_lookup")));
        let _ = std::fs::remove_dir(entry.path());
    }
    for (n, ..) in CGROUP_LINKS.iter().chain([&MSG_LINK]) {
        let link = pin_dir.join("links").join(n);
        sys::detach_pinned(&link).map_err(io_err("detaching", &link))?;
        let _ = sys::detach_pinned(&pending_path(&link));
    }
    for n in MAP_NAMES {
        let p = pin_dir.join("maps").join(n);
        if let Err(e) = std::fs::remove_file(&p) {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(io_err("unpinning", &p)(e));
            }
        }
    }
    for sub in ["maps", "links", "pods", ""] {
        let _ = std::fs::remove_dir(pin_dir.join(sub));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::EBPF_OBJECT;

    /// Section names of an ELF64 object.
    fn section_names(elf: &[u8]) -> Vec<String> {
        use object::{Object as _, ObjectSection as _};
        let file = object::read::elf::ElfFile64::<object::Endianness>::parse(elf).expect("a 64-bit ELF object");
        file.sections().map(|s| s.name().expect("a section name").to_string()).collect()
    }

    #[test]
    fn the_embedded_kernel_object_keeps_its_btf_and_carries_no_dwarf() {
        let names = section_names(EBPF_OBJECT);
        assert!(names.iter().any(|n| n == ".BTF") && names.iter().any(|n| n == ".BTF.ext"), "{names:?}");
        assert!(names.iter().any(|n| n == "sockops") && names.iter().any(|n| n == "maps"), "{names:?}");
        let dwarf: Vec<_> = names.iter().filter(|n| n.contains(".debug")).collect();
        assert!(dwarf.is_empty(), "DWARF sections left in the object: {dwarf:?}");
        assert!(EBPF_OBJECT.len() < 400_000, "object is {} bytes", EBPF_OBJECT.len());
        aya_obj::Object::parse(EBPF_OBJECT).expect("aya parses the stripped object");
    }
}
