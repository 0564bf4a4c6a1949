//! Installing and switching the sockmap shortcut (`shortcut_pair` + `shortcut_redirect`,
//! see the kernel programs): opt-in, with a kill switch in a map that takes effect on the
//! next send of every connection, and counters for each reason a socket stays on the
//! normal path.
use std::os::fd::AsFd;
use std::path::Path;

use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use aya::Ebpf;
use ztunnel_common::{ShortcutEvent, ShortcutKey};

use super::worker::Worker;
use super::{attach_cgroup, map_err, prog_err, replace_pinned_with, sys, CaptureError, APPENDED, ATTACH_SOCK_OPS};

/// Pin of the sock_ops link that pairs sockets (under `links/`).
pub(super) const PAIR_LINK: &str = "shortcut";
/// Pin of the sk_msg link on the `SHORTCUT` map (under `links/`).
pub(super) const MSG_LINK: &str = "shortcut_msg";
/// `BPF_SK_MSG_VERDICT` in `enum bpf_attach_type`.
const ATTACH_SK_MSG_VERDICT: u32 = 7;

/// Attaches both programs (replacing pinned links of an earlier agent) and turns the
/// switch on.
pub(super) fn install(ebpf: &mut Ebpf, cgroup: std::os::fd::BorrowedFd<'_>, links: &Path) -> Result<(), CaptureError> {
    attach_cgroup(ebpf, "shortcut_pair", ATTACH_SOCK_OPS, cgroup, &links.join(PAIR_LINK), &APPENDED)?;
    let name = "shortcut_redirect";
    let prog: &mut aya::programs::SkMsg = super::program(ebpf, name)?;
    prog.load().map_err(prog_err(name))?;
    let prog_fd = program_fd(ebpf, name)?;
    let pin = links.join(MSG_LINK);
    let io = |what: &'static str| {
        let path = pin.clone();
        move |source| CaptureError::Io { what, path, source }
    };
    if pin.exists() {
        // An earlier agent's link: the map allows one sk_msg program, so swap ours in.
        sys::link_update_pinned(&pin, prog_fd.as_fd()).map_err(io("updating the sk_msg link"))?;
    } else {
        // No program was attached, so sockets still tracked may have sent through TCP
        // unmarked; forget them all (they stay on the normal path) before attaching.
        clear_state(ebpf)?;
        let prog_fd = program_fd(ebpf, name)?;
        let map_fd = shortcut_map_fd(ebpf)?;
        let link = sys::link_create(prog_fd.as_fd(), map_fd.as_fd(), ATTACH_SK_MSG_VERDICT, 0)
            .map_err(io("attaching sk_msg to"))?;
        replace_pinned_with(&pin, |fresh| sys::obj_pin(&link, fresh))?;
    }
    set_switch(ebpf, true)
}

/// A duplicate of the loaded sk_msg program's fd.
fn program_fd(ebpf: &Ebpf, name: &'static str) -> Result<std::os::fd::OwnedFd, CaptureError> {
    let Some(aya::programs::Program::SkMsg(p)) = ebpf.program(name) else {
        return Err(prog_err(name)(aya::programs::ProgramError::UnexpectedProgramType));
    };
    let fd = p.fd().map_err(prog_err(name))?;
    fd.as_fd().try_clone_to_owned().map_err(|e| {
        prog_err(name)(aya::programs::ProgramError::SyscallError(aya::sys::SyscallError { call: "dup", io_error: e }))
    })
}

/// A duplicate of the `SHORTCUT` map's fd.
fn shortcut_map_fd(ebpf: &Ebpf) -> Result<std::os::fd::OwnedFd, CaptureError> {
    let Some(aya::maps::Map::SockHash(m)) = ebpf.map("SHORTCUT") else {
        return Err(map_err("SHORTCUT")(aya::maps::MapError::InvalidName { name: "SHORTCUT".into() }));
    };
    m.fd().as_fd().try_clone_to_owned().map_err(|e| {
        map_err("SHORTCUT")(aya::maps::MapError::SyscallError(aya::sys::SyscallError { call: "dup", io_error: e }))
    })
}

/// Forgets every tracked socket: each then stays on the normal path until it closes.
fn clear_state(ebpf: &mut Ebpf) -> Result<(), CaptureError> {
    // Queue entries first: one is only ever there while its socket's state is.
    clear::<ShortcutKey, u64>(ebpf, "SHORTCUT_QUEUE")?;
    clear::<ShortcutKey, u32>(ebpf, "SHORTCUT_STATE")
}

/// Removes every entry of the hash map `name`.
fn clear<K: aya::Pod, V: aya::Pod>(ebpf: &mut Ebpf, name: &'static str) -> Result<(), CaptureError> {
    let mut map: HashMap<&mut MapData, K, V> =
        HashMap::try_from(ebpf.map_mut(name).expect("map")).map_err(map_err(name))?;
    let keys: Vec<K> = map.keys().flatten().collect();
    for k in keys {
        let _ = map.remove(&k);
    }
    Ok(())
}

/// Detaches the shortcut's links if an earlier agent left them (the shortcut is off for
/// this one) and turns the switch off, so sockets still in the map send through TCP.
pub(super) fn remove(ebpf: &mut Ebpf, links: &Path) -> Result<(), CaptureError> {
    set_switch(ebpf, false)?;
    for pin in [PAIR_LINK, MSG_LINK] {
        let p = links.join(pin);
        sys::detach_pinned(&p).map_err(|source| CaptureError::Io { what: "detaching", path: p.clone(), source })?;
    }
    clear_state(ebpf)
}

/// The kill switch: `false` sends every following send of every connection through TCP
/// (each socket then stays there) and pairs no new sockets; `true` pairs new ones again.
pub(super) fn set_switch(ebpf: &mut Ebpf, on: bool) -> Result<(), CaptureError> {
    let mut switch: Array<&mut MapData, u32> =
        Array::try_from(ebpf.map_mut("SHORTCUT_SWITCH").expect("map")).map_err(map_err("SHORTCUT_SWITCH"))?;
    switch.set(0, u32::from(on), 0).map_err(map_err("SHORTCUT_SWITCH"))
}

/// What the shortcut did, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ShortcutEvents {
    pub paired: u64,
    pub redirected: u64,
    /// Sockets or sends left on the normal path, by reason.
    pub map_full: u64,
    pub peer_not_ready: u64,
    pub switched_off: u64,
    pub redirect_failed: u64,
    /// Sends on sockets whose state was forgotten (normal path).
    pub untracked: u64,
    /// Tracked sockets that closed and left the maps.
    pub closed: u64,
    /// Sends that would have taken the bytes redirected into the peer past the limit
    /// (normal path from then on).
    pub queue_limit: u64,
    /// Sockets not paired because their SYN carried data (TCP Fast Open).
    pub tcp_data: u64,
}

impl ShortcutEvents {
    /// Each counter with the `event` label the metrics give it.
    pub fn labelled(&self) -> [(&'static str, u64); 10] {
        [
            ("paired", self.paired),
            ("redirected", self.redirected),
            ("map_full", self.map_full),
            ("peer_not_ready", self.peer_not_ready),
            ("switched_off", self.switched_off),
            ("redirect_failed", self.redirect_failed),
            ("untracked", self.untracked),
            ("closed", self.closed),
            ("queue_limit", self.queue_limit),
            ("tcp_data", self.tcp_data),
        ]
    }
}

/// The shortcut's switch, counters and how many sockets it tracks now (`/shortcut`,
/// `/config_dump`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ShortcutReport {
    /// Whether the shortcut's programs are attached.
    pub installed: bool,
    /// The kill switch (true: redirecting).
    pub enabled: bool,
    /// Sockets in the map now (both ends of each leg).
    pub tracked_sockets: u64,
    #[serde(flatten)]
    pub events: ShortcutEvents,
}

/// Reads the per-CPU counters (cheap: one lookup per event, for scrape-time metrics).
pub(super) fn events(ebpf: &Ebpf) -> Result<ShortcutEvents, CaptureError> {
    let events: PerCpuArray<&MapData, u64> =
        PerCpuArray::try_from(ebpf.map("SHORTCUT_EVENTS").expect("map")).map_err(map_err("SHORTCUT_EVENTS"))?;
    let get = |e: ShortcutEvent| -> Result<u64, CaptureError> {
        Ok(events.get(&(e as u32), 0).map_err(map_err("SHORTCUT_EVENTS"))?.iter().sum())
    };
    Ok(ShortcutEvents {
        paired: get(ShortcutEvent::Paired)?,
        redirected: get(ShortcutEvent::Redirected)?,
        map_full: get(ShortcutEvent::MapFull)?,
        peer_not_ready: get(ShortcutEvent::PeerNotReady)?,
        switched_off: get(ShortcutEvent::SwitchedOff)?,
        redirect_failed: get(ShortcutEvent::RedirectFailed)?,
        untracked: get(ShortcutEvent::Untracked)?,
        closed: get(ShortcutEvent::Closed)?,
        queue_limit: get(ShortcutEvent::QueueLimit)?,
        tcp_data: get(ShortcutEvent::TcpData)?,
    })
}

/// Reads the switch and the counters, and counts the tracked sockets (a walk over the state
/// map: for the operator's endpoints, not for every scrape).
pub(super) fn report(ebpf: &Ebpf, installed: bool) -> Result<ShortcutReport, CaptureError> {
    let switch: Array<&MapData, u32> =
        Array::try_from(ebpf.map("SHORTCUT_SWITCH").expect("map")).map_err(map_err("SHORTCUT_SWITCH"))?;
    let state: HashMap<&MapData, ShortcutKey, u32> =
        HashMap::try_from(ebpf.map("SHORTCUT_STATE").expect("map")).map_err(map_err("SHORTCUT_STATE"))?;
    Ok(ShortcutReport {
        installed,
        enabled: switch.get(&0, 0).map_err(map_err("SHORTCUT_SWITCH"))? == 1,
        tracked_sockets: state.keys().flatten().count() as u64,
        events: events(ebpf)?,
    })
}

/// How often the sweeper looks for state left behind by sockets that are gone.
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// Removes the `SHORTCUT_STATE` and `SHORTCUT_QUEUE` entries of sockets no longer in
/// `SHORTCUT` (the kernel takes a closed socket out of the sockhash itself); returns how many
/// sockets' entries went. Normally each socket's close callback removes them, but the
/// callback is a per-socket flag any other `sock_ops` program on the cgroup can clear (a
/// CNI's, another agent's), and entries left that way would fill the maps until no new
/// socket could be paired. State keys are read before the live ones, so a socket being
/// paired (state first, then the sockhash) is seen live; if one is missed it loses its
/// state and sends through TCP, never the reverse.
pub(super) fn sweep(maps: &Path) -> Result<usize, CaptureError> {
    let open = |name: &'static str| MapData::from_pin(maps.join(name)).map_err(map_err(name));
    let mut state: HashMap<MapData, ShortcutKey, u32> =
        HashMap::try_from(aya::maps::Map::HashMap(open("SHORTCUT_STATE")?)).map_err(map_err("SHORTCUT_STATE"))?;
    let mut queue: HashMap<MapData, ShortcutKey, u64> =
        HashMap::try_from(aya::maps::Map::HashMap(open("SHORTCUT_QUEUE")?)).map_err(map_err("SHORTCUT_QUEUE"))?;
    let live: aya::maps::SockHash<MapData, ShortcutKey> =
        aya::maps::SockHash::try_from(aya::maps::Map::SockHash(open("SHORTCUT")?)).map_err(map_err("SHORTCUT"))?;
    let tracked: Vec<ShortcutKey> = state.keys().flatten().chain(queue.keys().flatten()).collect();
    let live: std::collections::HashSet<ShortcutKey> = live.keys().flatten().collect();
    let mut gone = std::collections::HashSet::new();
    for key in tracked.into_iter().filter(|k| !live.contains(k)) {
        let _ = queue.remove(&key);
        let _ = state.remove(&key);
        gone.insert(key);
    }
    Ok(gone.len())
}

/// Runs [`sweep`] every [`SWEEP_EVERY`] on a thread of its own, until the handle is dropped.
pub(super) fn start_sweeper(maps: std::path::PathBuf) -> Result<Worker, CaptureError> {
    let path = maps.clone();
    Worker::spawn("ztunnel-shortcut-sweep", move |stop| {
        let tick = std::time::Duration::from_millis(200);
        let mut waited = std::time::Duration::ZERO;
        while !stop.load(std::sync::atomic::Ordering::Acquire) {
            std::thread::sleep(tick);
            waited += tick;
            if waited < SWEEP_EVERY {
                continue;
            }
            waited = std::time::Duration::ZERO;
            match sweep(&maps) {
                Ok(0) => {}
                Ok(n) => tracing::info!(sockets = n, "sockmap shortcut: removed state of sockets that are gone"),
                Err(e) => tracing::warn!(error = %e, "sockmap shortcut: sweeping state failed"),
            }
        }
    })
    .map_err(|source| CaptureError::Io { what: "starting the shortcut sweeper for", path, source })
}
