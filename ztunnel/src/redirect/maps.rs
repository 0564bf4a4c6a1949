//! Typed access to the capture maps: exclusions, pod entries, counters and the
//! original-destination table the outbound proxy reads.
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{HashMap, MapData, PerCpuArray, SockHash};
use aya::Ebpf;
use ztunnel_common::{counter_index, IpKey, OrigDst, Outcome, PortKey, Program, TupleKey};

use super::{ip_key, map_err, CaptureError};

/// Traffic that capture leaves alone.
#[derive(Debug, Clone, Default)]
pub struct Exclusions {
    /// Outbound destination ports never captured.
    pub outbound_ports: Vec<u16>,
    /// Inbound pod ports never captured.
    pub inbound_ports: Vec<u16>,
    /// Outbound destination CIDRs never captured.
    pub cidrs: Vec<(IpAddr, u8)>,
    /// Sources of node health probes: reach the app directly.
    pub probe_sources: Vec<IpAddr>,
}

fn hash<'a, K: aya::Pod, V: aya::Pod>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<HashMap<&'a mut MapData, K, V>, CaptureError> {
    HashMap::try_from(ebpf.map_mut(name).expect("map declared in object")).map_err(map_err(name))
}

/// Replaces the contents of the exclusion maps (they are shared with earlier instances).
pub(super) fn write_exclusions(ebpf: &mut Ebpf, ex: &Exclusions) -> Result<(), CaptureError> {
    for (name, ports) in [("EXCL_OUT_PORTS", &ex.outbound_ports), ("EXCL_IN_PORTS", &ex.inbound_ports)] {
        let mut m: HashMap<_, PortKey, u8> = hash(ebpf, name)?;
        let old: Vec<PortKey> = m.keys().flatten().collect();
        for k in old {
            let _ = m.remove(&k);
        }
        for p in ports {
            m.insert(PortKey { port: *p as u32 }, 1, 0).map_err(map_err(name))?;
        }
    }
    {
        let mut m: HashMap<_, IpKey, u8> = hash(ebpf, "PROBE_SOURCES")?;
        let old: Vec<IpKey> = m.keys().flatten().collect();
        for k in old {
            let _ = m.remove(&k);
        }
        for ip in &ex.probe_sources {
            m.insert(ip_key(*ip), 1, 0).map_err(map_err("PROBE_SOURCES"))?;
        }
    }
    let mut trie: LpmTrie<&mut MapData, [u8; 16], u8> =
        LpmTrie::try_from(ebpf.map_mut("EXCL_CIDRS").expect("map")).map_err(map_err("EXCL_CIDRS"))?;
    let old: Vec<Key<[u8; 16]>> = trie.keys().flatten().collect();
    for k in old {
        let _ = trie.remove(&k);
    }
    for (ip, len) in &ex.cidrs {
        let len = match ip {
            IpAddr::V4(_) => 96 + (*len as u32).min(32),
            IpAddr::V6(_) => (*len as u32).min(128),
        };
        trie.insert(&Key::new(len, ip_key(*ip).addr), 1, 0).map_err(map_err("EXCL_CIDRS"))?;
    }
    Ok(())
}

/// Lets sockets of processes in cgroup `id` (this agent's) bypass capture with the proxy mark.
pub(super) fn register_proxy_cgroup(ebpf: &mut Ebpf, id: u64) -> Result<(), CaptureError> {
    let mut m: HashMap<_, u64, u8> = hash(ebpf, "PROXY_CGROUPS")?;
    m.insert(id, 1, 0).map_err(map_err("PROXY_CGROUPS"))
}

/// Removes a pod's enrollment and its inbound listener, both keyed by its netns cookie.
pub(super) fn remove_pod_entries(ebpf: &mut Ebpf, cookie: u64) -> Result<(), CaptureError> {
    let mut enrolled: HashMap<_, u64, ztunnel_common::PodEntry> = hash(ebpf, "ENROLLED")?;
    let _ = enrolled.remove(&cookie);
    let mut socks: SockHash<&mut MapData, u64> =
        SockHash::try_from(ebpf.map_mut("INBOUND_LISTENERS").expect("map")).map_err(map_err("INBOUND_LISTENERS"))?;
    let _ = socks.remove(&cookie);
    Ok(())
}

/// Counter values per program, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CounterSnapshot {
    pub connect4: OutcomeCounts,
    pub connect6: OutcomeCounts,
    pub sock_ops: OutcomeCounts,
    pub sk_lookup: OutcomeCounts,
    /// `SO_ORIGINAL_DST` answers given to a proxy that is not ours.
    pub getsockopt: OutcomeCounts,
    /// 15006 listeners of a proxy put into the inbound map on `listen()`.
    pub listen: OutcomeCounts,
}

impl CounterSnapshot {
    /// Each program's counts with the name metrics and reports give it.
    pub fn by_program(&self) -> [(&'static str, OutcomeCounts); 6] {
        [
            ("connect4", self.connect4),
            ("connect6", self.connect6),
            ("sock_ops", self.sock_ops),
            ("sk_lookup", self.sk_lookup),
            ("getsockopt", self.getsockopt),
            ("listen", self.listen),
        ]
    }
}

/// Captured / bypassed / error counts of one program.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct OutcomeCounts {
    pub captured: u64,
    pub bypassed: u64,
    pub errors: u64,
}

pub(super) fn read_counters(ebpf: &Ebpf) -> Result<CounterSnapshot, CaptureError> {
    let arr: PerCpuArray<&MapData, u64> =
        PerCpuArray::try_from(ebpf.map("COUNTERS").expect("map")).map_err(map_err("COUNTERS"))?;
    let get = |p: Program, o: Outcome| -> Result<u64, CaptureError> {
        let v = arr.get(&counter_index(p, o), 0).map_err(map_err("COUNTERS"))?;
        Ok(v.iter().sum())
    };
    let prog = |p: Program| -> Result<OutcomeCounts, CaptureError> {
        Ok(OutcomeCounts {
            captured: get(p, Outcome::Captured)?,
            bypassed: get(p, Outcome::Bypassed)?,
            errors: get(p, Outcome::Error)?,
        })
    };
    Ok(CounterSnapshot {
        connect4: prog(Program::Connect4)?,
        connect6: prog(Program::Connect6)?,
        sock_ops: prog(Program::SockOps)?,
        sk_lookup: prog(Program::SkLookup)?,
        getsockopt: prog(Program::Getsockopt)?,
        listen: prog(Program::Listen)?,
    })
}

/// Recovers the original destination of a captured outbound connection from what
/// `accept()` shows: the pod's netns cookie and the client's address.
#[derive(Clone)]
pub struct OrigDstTable {
    map: Arc<Mutex<HashMap<MapData, TupleKey, OrigDst>>>,
}

impl OrigDstTable {
    pub(super) fn new(data: MapData) -> Result<Self, CaptureError> {
        // ORIG_BY_TUPLE is an LRU hash; aya's HashMap type accepts both kinds.
        let map = HashMap::try_from(aya::maps::Map::LruHashMap(data)).map_err(map_err("ORIG_BY_TUPLE"))?;
        Ok(Self { map: Arc::new(Mutex::new(map)) })
    }

    /// Takes (looks up and removes) the original destination of a connection from `peer`.
    pub fn take(&self, netns_cookie: u64, peer: SocketAddr) -> Option<SocketAddr> {
        let key = TupleKey { netns_cookie, addr: ip_key(peer.ip()).addr, port: peer.port(), _pad: [0; 6] };
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let orig = map.get(&key, 0).ok()?;
        let _ = map.remove(&key);
        let ip = std::net::Ipv6Addr::from(orig.addr);
        let ip = match ip.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(ip),
        };
        Some(SocketAddr::new(ip, orig.port))
    }
}

/// The proxy's dials to apps from clients' addresses (source kept), which the inbound
/// steering program must let through: registered just before the connect, removed after.
#[derive(Clone)]
pub struct ProxyDials {
    map: Arc<Mutex<HashMap<MapData, ztunnel_common::DialKey, u8>>>,
}

impl std::fmt::Debug for ProxyDials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProxyDials")
    }
}

impl ProxyDials {
    pub(super) fn new(data: MapData) -> Result<Self, CaptureError> {
        let map = HashMap::try_from(aya::maps::Map::LruHashMap(data)).map_err(map_err("PROXY_DIALS"))?;
        Ok(Self { map: Arc::new(Mutex::new(map)) })
    }

    fn key(netns_cookie: u64, from: SocketAddr, app_port: u16) -> ztunnel_common::DialKey {
        ztunnel_common::DialKey {
            netns_cookie,
            addr: ip_key(from.ip()).addr,
            port: from.port(),
            app_port,
            _pad: [0; 4],
        }
    }

    /// Registers a dial from `from` (the proxy socket's bound client address) to the app's
    /// `app_port` in the pod of `netns_cookie`.
    pub fn insert(&self, netns_cookie: u64, from: SocketAddr, app_port: u16) -> Result<(), CaptureError> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.insert(Self::key(netns_cookie, from, app_port), 1, 0).map_err(map_err("PROXY_DIALS"))
    }

    /// How many dials are registered now (each lives only for its connect).
    pub fn registered(&self) -> usize {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.keys().filter(|k| k.is_ok()).count()
    }

    /// Removes a dial registered by [`ProxyDials::insert`].
    pub fn remove(&self, netns_cookie: u64, from: SocketAddr, app_port: u16) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let _ = map.remove(&Self::key(netns_cookie, from, app_port));
    }
}
