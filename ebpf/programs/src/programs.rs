use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::{
        bpf_sock, bpf_sock_addr, bpf_sock_ops, bpf_sockopt, BPF_ANY, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_TCP_LISTEN_CB,
    },
    helpers::generated::{bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_getsockopt},
    macros::{cgroup_sock_addr, cgroup_sockopt, map, sk_lookup, sock_ops},
    maps::{lpm_trie::Key, HashMap, LpmTrie, LruHashMap, PerCpuArray, SockHash},
    programs::{SkLookupContext, SockAddrContext, SockOpsContext, SockoptContext},
};
use aya_log_ebpf::{debug, error};
use ztunnel_common::{
    counter_index, v4_mapped, DialKey, IpKey, OrigDst, Outcome, PodEntry, PortKey, Program, TupleKey, COUNTER_SLOTS,
    HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT, PROXY_MARK, PROXY_MARK_MASK,
};

pub(crate) const AF_INET: u32 = 2;
pub(crate) const AF_INET6: u32 = 10;
const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
const SOL_SOCKET: i32 = 1;
const SOL_IP: i32 = 0;
const SOL_IPV6: i32 = 41;
/// `SO_ORIGINAL_DST` (SOL_IP) and `IP6T_SO_ORIGINAL_DST` (SOL_IPV6) share the number.
const SO_ORIGINAL_DST: i32 = 80;
const SO_MARK: i32 = 36;
pub(crate) const SK_PASS: u32 = 1;
const SK_DROP: u32 = 0;
/// cgroup sock_addr verdicts: 1 lets the connect proceed, 0 fails it with EPERM.
const CONNECT_ALLOW: i32 = 1;
const CONNECT_REFUSE: i32 = 0;

/// Netns cookie of the one pod netns this copy of `steer_inbound` is attached to. The loader
/// sets it per pod (`bpf_get_netns_cookie` is not available to sk_lookup programs), so the
/// program needs no address map: every inbound TCP connection in that netns is steered,
/// whatever address it arrives on (link-local, added later, secondary).
#[no_mangle]
static POD_NETNS_COOKIE: u64 = 0;

/// Enrolled pod network namespaces, keyed by netns cookie.
#[map(name = "ENROLLED")]
pub(crate) static ENROLLED: HashMap<u64, PodEntry> = HashMap::with_max_entries(4096, 0);

/// Original destination by socket cookie, written by connect4/6, consumed by sock_ops.
#[map(name = "ORIG_BY_COOKIE")]
static ORIG_BY_COOKIE: LruHashMap<u64, OrigDst> = LruHashMap::with_max_entries(65536, 0);

/// Original destination by (netns cookie, client addr, client port), read by the proxy.
#[map(name = "ORIG_BY_TUPLE")]
static ORIG_BY_TUPLE: LruHashMap<TupleKey, OrigDst> = LruHashMap::with_max_entries(65536, 0);

/// cgroup (v2) ids of the node agent's processes. The proxy mark alone is not proof: an app
/// with CAP_NET_RAW may set `SO_MARK` itself, so a marked connect bypasses capture only when
/// it comes from one of these cgroups. LRU, so ids of agents long gone age out.
#[map(name = "PROXY_CGROUPS")]
static PROXY_CGROUPS: LruHashMap<u64, u8> = LruHashMap::with_max_entries(64, 0);

/// Fault switches; slot 0 makes recording an original destination fail.
#[map(name = "FAULTS")]
static FAULTS: aya_ebpf::maps::Array<u32> = aya_ebpf::maps::Array::with_max_entries(1, 0);

/// Outbound destination ports that are never captured.
#[map(name = "EXCL_OUT_PORTS")]
static EXCL_OUT_PORTS: HashMap<PortKey, u8> = HashMap::with_max_entries(256, 0);

/// Inbound pod ports that are never captured.
#[map(name = "EXCL_IN_PORTS")]
static EXCL_IN_PORTS: HashMap<PortKey, u8> = HashMap::with_max_entries(256, 0);

/// Outbound destination CIDRs that are never captured (IPv4 as v4-mapped, prefix + 96).
#[map(name = "EXCL_CIDRS")]
static EXCL_CIDRS: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(256, 1); // BPF_F_NO_PREALLOC

/// Source addresses of node health probes (kubelet); they reach the app directly.
#[map(name = "PROBE_SOURCES")]
static PROBE_SOURCES: HashMap<IpKey, u8> = HashMap::with_max_entries(64, 0);

/// Connections the proxy is opening to an app in its pod from the client's own address
/// (source kept): `steer_inbound` lets them reach the app instead of steering them back to
/// the proxy. Written by the proxy just before its connect, removed right after.
#[map(name = "PROXY_DIALS")]
pub(crate) static PROXY_DIALS: LruHashMap<DialKey, u8> = LruHashMap::with_max_entries(65536, 0);

/// The in-pod 15006 listener of each enrolled pod, keyed by the pod's netns cookie.
#[map(name = "INBOUND_LISTENERS")]
static INBOUND_LISTENERS: SockHash<u64> = SockHash::with_max_entries(8192, 0);

/// Slot 0: 1 while the programs log their decisions through aya-log (`AYA_LOGS`), switched
/// at run time from the admin `/logging` endpoint (`ztunnel::ebpf=debug`); 0 by default, so
/// a quiet kernel pays one array read per decision.
#[map(name = "DIAG")]
static DIAG: aya_ebpf::maps::Array<u32> = aya_ebpf::maps::Array::with_max_entries(1, 0);

/// Whether kernel-side diagnostics are switched on.
#[inline(always)]
pub(crate) fn diag() -> bool {
    DIAG.get(0).is_some_and(|v| *v != 0)
}

/// Per-program outcome counters; see `ztunnel_common::counter_index`.
#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

#[inline(always)]
fn count(p: Program, o: Outcome) {
    if let Some(v) = COUNTERS.get_ptr_mut(counter_index(p, o)) {
        // Per-CPU slot: no other writer while this program runs on this CPU.
        unsafe { *v += 1 };
    }
}

#[inline(always)]
fn port_excluded(map: &HashMap<PortKey, u8>, port: u16) -> bool {
    unsafe { map.get(&PortKey { port: port as u32 }) }.is_some()
}

#[inline(always)]
pub(crate) fn words_to_bytes(w: [u32; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = w[i].to_ne_bytes();
        out[i * 4] = b[0];
        out[i * 4 + 1] = b[1];
        out[i * 4 + 2] = b[2];
        out[i * 4 + 3] = b[3];
        i += 1;
    }
    out
}

/// `::1`, or exactly `::ffff:127.x.y.z` (IPv4 loopback in the mapped form). Anything else,
/// e.g. `2001:db8::ffff:7f00:1`, is not loopback however its low bytes look.
#[inline(always)]
pub(crate) fn is_loopback(addr: &[u8; 16]) -> bool {
    let v6_loop = addr[..15].iter().all(|b| *b == 0) && addr[15] == 1;
    let v4_loop = addr[..10].iter().all(|b| *b == 0) && addr[10] == 0xff && addr[11] == 0xff && addr[12] == 127;
    v6_loop || v4_loop
}

/// Shared decision for connect4/connect6: returns the original destination to record, or
/// `None` when the connect must be left alone.
#[inline(always)]
fn outbound_decision(ctx: &SockAddrContext, p: Program, mark: u32, addr: [u8; 16], port: u16) -> Option<OrigDst> {
    let netns = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
    unsafe { ENROLLED.get(&netns) }?;
    let proxy =
        (mark & PROXY_MARK_MASK) == PROXY_MARK && unsafe { PROXY_CGROUPS.get(&bpf_get_current_cgroup_id()) }.is_some();
    if proxy || is_loopback(&addr) || port_excluded(&EXCL_OUT_PORTS, port) {
        count(p, Outcome::Bypassed);
        return None;
    }
    if EXCL_CIDRS.get(&Key::new(128, addr)).is_some() {
        count(p, Outcome::Bypassed);
        return None;
    }
    Some(OrigDst { addr, port, _pad: [0; 6] })
}

#[inline(always)]
fn remember(ctx: &SockAddrContext, p: Program, orig: &OrigDst) -> bool {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    // Fault injection (slot 0 set by the operator or a test): behave as if the map refused
    // the entry, so the fail-closed path can be exercised on a real kernel.
    let injected = FAULTS.get(0).is_some_and(|v| *v != 0);
    if injected || ORIG_BY_COOKIE.insert(&cookie, orig, 0).is_err() {
        count(p, Outcome::Error);
        return false;
    }
    count(p, Outcome::Captured);
    true
}

#[cgroup_sock_addr(connect4)]
pub fn capture_connect4(ctx: SockAddrContext) -> i32 {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // Load every ctx field first, then branch (keeps the verifier's ctx-access rules happy).
    let (ty, proto, ip, port_raw, sk) = unsafe {
        (
            read_volatile(&(*sa).type_),
            read_volatile(&(*sa).protocol),
            read_volatile(&(*sa).user_ip4),
            read_volatile(&(*sa).user_port),
            read_volatile(&(*sa).__bindgen_anon_1.sk),
        )
    };
    if ty != SOCK_STREAM || (proto != IPPROTO_TCP && proto != 0) || sk.is_null() {
        return 1;
    }
    let mark = unsafe { read_volatile(&(*sk).mark) };
    let port = u16::from_be(port_raw as u16);
    let addr = v4_mapped(ip.to_ne_bytes());
    if let Some(orig) = outbound_decision(&ctx, Program::Connect4, mark, addr, port) {
        // Fail closed: a capture we cannot record must not go out unproxied.
        if !remember(&ctx, Program::Connect4, &orig) {
            if diag() {
                error!(&ctx, "connect4 to {:i}:{} refused: original destination not recorded", u32::from_be(ip), port);
            }
            return CONNECT_REFUSE;
        }
        if diag() {
            debug!(&ctx, "connect4 to {:i}:{} captured to 127.0.0.1:15001", u32::from_be(ip), port);
        }
        unsafe {
            (*sa).user_ip4 = u32::from_ne_bytes([127, 0, 0, 1]);
            (*sa).user_port = OUTBOUND_PORT.to_be() as u32;
        }
    }
    CONNECT_ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn capture_connect6(ctx: SockAddrContext) -> i32 {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    let (ty, proto, w0, w1, w2, w3, port_raw) = unsafe {
        (
            read_volatile(&(*sa).type_),
            read_volatile(&(*sa).protocol),
            read_volatile(&(*sa).user_ip6[0]),
            read_volatile(&(*sa).user_ip6[1]),
            read_volatile(&(*sa).user_ip6[2]),
            read_volatile(&(*sa).user_ip6[3]),
            read_volatile(&(*sa).user_port),
        )
    };
    if ty != SOCK_STREAM || (proto != IPPROTO_TCP && proto != 0) {
        return 1;
    }
    let mut mark: u32 = 0;
    unsafe { bpf_getsockopt(sa.cast(), SOL_SOCKET, SO_MARK, (&mut mark as *mut u32).cast(), 4) };
    let port = u16::from_be(port_raw as u16);
    let addr = words_to_bytes([w0, w1, w2, w3]);
    let mapped = addr[..10].iter().all(|b| *b == 0) && addr[10] == 0xff && addr[11] == 0xff;
    if let Some(orig) = outbound_decision(&ctx, Program::Connect6, mark, addr, port) {
        if !remember(&ctx, Program::Connect6, &orig) {
            if diag() {
                error!(&ctx, "connect6 to [{:i}]:{} refused: original destination not recorded", addr, port);
            }
            return CONNECT_REFUSE;
        }
        if diag() {
            debug!(&ctx, "connect6 to [{:i}]:{} captured to 15001", addr, port);
        }
        let lo: [u8; 16] =
            if mapped { v4_mapped([127, 0, 0, 1]) } else { [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1] };
        unsafe {
            (*sa).user_ip6[0] = u32::from_ne_bytes([lo[0], lo[1], lo[2], lo[3]]);
            (*sa).user_ip6[1] = u32::from_ne_bytes([lo[4], lo[5], lo[6], lo[7]]);
            (*sa).user_ip6[2] = u32::from_ne_bytes([lo[8], lo[9], lo[10], lo[11]]);
            (*sa).user_ip6[3] = u32::from_ne_bytes([lo[12], lo[13], lo[14], lo[15]]);
            (*sa).user_port = OUTBOUND_PORT.to_be() as u32;
        }
    }
    CONNECT_ALLOW
}

#[sock_ops]
pub fn record_origdst(ctx: SockOpsContext) -> u32 {
    let ops: *mut bpf_sock_ops = ctx.ops;
    let (op, family, l4, l6a, l6b, l6c, l6d, lport) = unsafe {
        (
            read_volatile(&(*ops).op),
            read_volatile(&(*ops).family),
            read_volatile(&(*ops).local_ip4),
            read_volatile(&(*ops).local_ip6[0]),
            read_volatile(&(*ops).local_ip6[1]),
            read_volatile(&(*ops).local_ip6[2]),
            read_volatile(&(*ops).local_ip6[3]),
            read_volatile(&(*ops).local_port),
        )
    };
    if op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        return 1;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ops.cast()) };
    let Some(orig) = (unsafe { ORIG_BY_COOKIE.get(&cookie) }) else {
        return 1;
    };
    let orig = *orig;
    let addr = if family == AF_INET {
        v4_mapped(l4.to_ne_bytes())
    } else if family == AF_INET6 {
        words_to_bytes([l6a, l6b, l6c, l6d])
    } else {
        return 1;
    };
    let key =
        TupleKey { netns_cookie: unsafe { bpf_get_netns_cookie(ops.cast()) }, addr, port: lport as u16, _pad: [0; 6] };
    if ORIG_BY_TUPLE.insert(&key, &orig, 0).is_err() {
        count(Program::SockOps, Outcome::Error);
    } else {
        count(Program::SockOps, Outcome::Captured);
    }
    let _ = ORIG_BY_COOKIE.remove(&cookie);
    1
}

/// A proxy process opened its inbound plaintext listener (15006) inside an enrolled pod:
/// make it the pod's inbound target, so any proxy (Istio's ztunnel included) is served by
/// `steer_inbound` without inserting the socket itself. Only a process of a registered proxy
/// cgroup qualifies: an app listening on 15006 in its own pod must not receive the pod's
/// inbound traffic.
///
/// Attached only where capture serves a proxy that is not ours (`ztunnel cni
/// --ebpf-capture`), like `answer_original_dst`: our own agent inserts its listener itself.
#[sock_ops]
pub fn adopt_inbound_listener(ctx: SockOpsContext) -> u32 {
    let ops: *mut bpf_sock_ops = ctx.ops;
    let (op, lport) = unsafe { (read_volatile(&(*ops).op), read_volatile(&(*ops).local_port)) };
    if op != BPF_SOCK_OPS_TCP_LISTEN_CB || lport != INBOUND_PLAINTEXT_PORT as u32 {
        return 1;
    }
    let mut netns = unsafe { bpf_get_netns_cookie(ops.cast()) };
    if unsafe { ENROLLED.get(&netns) }.is_none() {
        return 1;
    }
    if unsafe { PROXY_CGROUPS.get(&bpf_get_current_cgroup_id()) }.is_none() {
        count(Program::Listen, Outcome::Bypassed);
        return 1;
    }
    match INBOUND_LISTENERS.update(&mut netns, unsafe { &mut *ops }, BPF_ANY as u64) {
        Ok(()) => count(Program::Listen, Outcome::Captured),
        Err(_) => count(Program::Listen, Outcome::Error),
    }
    1
}

/// Answers `getsockopt(SO_ORIGINAL_DST)` on a connection a proxy accepted on its in-pod
/// outbound listener (15001): such proxies (Istio's ztunnel) expect iptables' REDIRECT and
/// ask conntrack for the destination the app dialled; here the kernel has no conntrack
/// entry, so the answer comes from the original destination `record_origdst` keyed by the
/// pod's netns and the client's address. Anything else keeps the kernel's own answer.
/// Attached only for a proxy that is not ours (it runs on every getsockopt below its cgroup).
#[cgroup_sockopt(getsockopt)]
pub fn answer_original_dst(ctx: SockoptContext) -> i32 {
    let so: *mut bpf_sockopt = ctx.sockopt;
    let (level, optname, sk) = unsafe {
        (read_volatile(&(*so).level), read_volatile(&(*so).optname), read_volatile(&(*so).__bindgen_anon_1.sk))
    };
    if optname != SO_ORIGINAL_DST || (level != SOL_IP && level != SOL_IPV6) || sk.is_null() {
        return 1;
    }
    let sk: *mut bpf_sock = sk;
    let (family, lport, rport, r4, r6a, r6b, r6c, r6d) = unsafe {
        (
            read_volatile(&(*sk).family),
            read_volatile(&(*sk).src_port),
            read_volatile(&(*sk).dst_port),
            read_volatile(&(*sk).dst_ip4),
            read_volatile(&(*sk).dst_ip6[0]),
            read_volatile(&(*sk).dst_ip6[1]),
            read_volatile(&(*sk).dst_ip6[2]),
            read_volatile(&(*sk).dst_ip6[3]),
        )
    };
    if lport != OUTBOUND_PORT as u32 {
        return 1;
    }
    let remote = if family == AF_INET { v4_mapped(r4.to_ne_bytes()) } else { words_to_bytes([r6a, r6b, r6c, r6d]) };
    let key = TupleKey {
        netns_cookie: unsafe { bpf_get_netns_cookie(so.cast()) },
        addr: remote,
        port: u16::from_be(rport),
        _pad: [0; 6],
    };
    let Some(orig) = (unsafe { ORIG_BY_TUPLE.get(&key) }) else {
        return 1;
    };
    let orig = *orig;
    let mapped = orig.addr[..10].iter().all(|b| *b == 0) && orig.addr[10] == 0xff && orig.addr[11] == 0xff;
    let (optval, end) =
        unsafe { (read_volatile(&(*so).__bindgen_anon_2.optval), read_volatile(&(*so).__bindgen_anon_3.optval_end)) };
    let port = orig.port.to_be_bytes();
    if level == SOL_IP && mapped {
        // struct sockaddr_in
        if (optval as usize) + 16 > end as usize {
            count(Program::Getsockopt, Outcome::Error);
            return 1;
        }
        let out = optval as *mut [u8; 16];
        let a = &orig.addr;
        unsafe {
            *out = [AF_INET as u8, 0, port[0], port[1], a[12], a[13], a[14], a[15], 0, 0, 0, 0, 0, 0, 0, 0];
            (*so).optlen = 16;
            (*so).retval = 0;
        }
    } else if level == SOL_IPV6 && !mapped {
        // struct sockaddr_in6
        if (optval as usize) + 28 > end as usize {
            count(Program::Getsockopt, Outcome::Error);
            return 1;
        }
        let head = optval as *mut [u8; 8];
        let addr = unsafe { (optval as *mut u8).add(8) } as *mut [u8; 16];
        let tail = unsafe { (optval as *mut u8).add(24) } as *mut [u8; 4];
        unsafe {
            *head = [AF_INET6 as u8, 0, port[0], port[1], 0, 0, 0, 0];
            *addr = orig.addr;
            *tail = [0; 4];
            (*so).optlen = 28;
            (*so).retval = 0;
        }
    } else {
        return 1;
    }
    count(Program::Getsockopt, Outcome::Captured);
    1
}

#[sk_lookup]
pub fn steer_inbound(ctx: SkLookupContext) -> u32 {
    let lk = ctx.lookup;
    let (family, proto, rport, r4, r6a, r6b, r6c, r6d, l4, l6a, l6b, l6c, l6d, lport) = unsafe {
        (
            read_volatile(&(*lk).family),
            read_volatile(&(*lk).protocol),
            read_volatile(&(*lk).remote_port),
            read_volatile(&(*lk).remote_ip4),
            read_volatile(&(*lk).remote_ip6[0]),
            read_volatile(&(*lk).remote_ip6[1]),
            read_volatile(&(*lk).remote_ip6[2]),
            read_volatile(&(*lk).remote_ip6[3]),
            read_volatile(&(*lk).local_ip4),
            read_volatile(&(*lk).local_ip6[0]),
            read_volatile(&(*lk).local_ip6[1]),
            read_volatile(&(*lk).local_ip6[2]),
            read_volatile(&(*lk).local_ip6[3]),
            read_volatile(&(*lk).local_port),
        )
    };
    if proto != IPPROTO_TCP || lport == HBONE_PORT as u32 {
        return SK_PASS;
    }
    let (remote, local) = if family == AF_INET {
        (v4_mapped(r4.to_ne_bytes()), v4_mapped(l4.to_ne_bytes()))
    } else {
        (words_to_bytes([r6a, r6b, r6c, r6d]), words_to_bytes([l6a, l6b, l6c, l6d]))
    };
    // Inside the pod: connections to loopback, and the proxy reaching the app from
    // 127.0.0.6 (v4) or the pod's own address (v6). Neither can come from outside the pod:
    // a packet from the wire with a loopback or own source never completes a handshake.
    if is_loopback(&local) || is_loopback(&remote) || remote == local {
        return SK_PASS;
    }
    let cookie = unsafe { read_volatile(&POD_NETNS_COOKIE) };
    // The proxy itself dialling the app from the client's address (source kept), registered
    // for the connect's duration. (sk_lookup cannot tell that SYN from one off the wire:
    // locally routed packets report the device owning the address as ingress, not lo.)
    let dial =
        DialKey { netns_cookie: cookie, addr: remote, port: u16::from_be(rport), app_port: lport as u16, _pad: [0; 4] };
    if unsafe { PROXY_DIALS.get(&dial) }.is_some() {
        return SK_PASS;
    }
    if unsafe { PROBE_SOURCES.get(&IpKey { addr: remote }) }.is_some() || port_excluded(&EXCL_IN_PORTS, lport as u16) {
        count(Program::SkLookup, Outcome::Bypassed);
        return SK_PASS;
    }
    // Everything else, every address and every port but 15008 (as istio-cni's rules),
    // goes to the pod's 15006 listener; the proxy refuses its own ports there.
    match INBOUND_LISTENERS.redirect_sk_lookup(&ctx, cookie, 0) {
        Ok(()) => {
            count(Program::SkLookup, Outcome::Captured);
            if diag() {
                debug!(&ctx, "inbound port {} from [{:i}] steered to the proxy's 15006", lport, remote);
            }
            SK_PASS
        }
        Err(_) => {
            // Enrolled but no listener (proxy down): fail closed, the client gets a reset.
            count(Program::SkLookup, Outcome::Error);
            if diag() {
                error!(&ctx, "inbound port {} from [{:i}] dropped: the pod's proxy listener is gone", lport, remote);
            }
            SK_DROP
        }
    }
}

const _: () = assert!(HBONE_PORT == 15008 && INBOUND_PLAINTEXT_PORT == 15006);
