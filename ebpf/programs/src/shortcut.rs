//! The sockmap shortcut for the in-pod proxy legs (opt-in). Each captured connection has two
//! loopback legs inside the pod: the app to the proxy's 15001 listener (outbound) and the
//! proxy to the app (inbound, from 127.0.0.6, the pod's own IPv6 address, or a client's
//! address registered in `PROXY_DIALS`). `shortcut_pair` puts both sockets of such a leg into
//! `SHORTCUT` when they are established; `shortcut_redirect` then moves each send straight
//! into the peer socket's receive queue, past the loopback TCP stack.
//!
//! Never a drop: a socket that cannot be tracked stays on the normal path; a send whose
//! peer is missing, refused, or sent while the kill switch is off goes through TCP, and
//! that socket keeps doing so (`SHORTCUT_PLAIN`), so its bytes never take two paths at once
//! and cannot be reordered. A socket whose SYN carried data (TCP Fast Open) is never paired:
//! those bytes went by TCP before it could be tracked. Entries leave `SHORTCUT` when the
//! socket closes (the kernel does
//! that) and `SHORTCUT_STATE` on the socket's move to `TCP_CLOSE` (its state callback).
//!
//! Never an unbounded queue: the kernel charges redirected bytes to no receive buffer and
//! shows a BPF program nothing of what the peer has read, so `SHORTCUT_QUEUE` counts the
//! bytes redirected into each socket, and a send that would take that past
//! `SHORTCUT_QUEUE_LIMIT` goes through TCP from then on, where the windows push back.
use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    bindings::{
        bpf_sock_ops, sk_msg_md, BPF_ANY, BPF_EXIST, BPF_F_INGRESS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_TCP_CLOSE,
    },
    helpers::generated::bpf_get_netns_cookie,
    macros::{map, sk_msg, sock_ops},
    maps::{Array, HashMap, PerCpuArray, SockHash},
    programs::{SkMsgContext, SockOpsContext},
};
use ztunnel_common::{
    v4_mapped, DialKey, ShortcutEvent, ShortcutKey, OUTBOUND_PORT, SHORTCUT_EVENT_SLOTS, SHORTCUT_MSG_COST,
    SHORTCUT_PLAIN, SHORTCUT_QUEUE_LIMIT, SHORTCUT_READY,
};

use crate::programs::{diag, is_loopback, words_to_bytes, AF_INET, AF_INET6, ENROLLED, PROXY_DIALS, SK_PASS};

/// The sockets of the proxy legs, each under its own view of the connection.
#[map(name = "SHORTCUT")]
static SHORTCUT: SockHash<ShortcutKey> = SockHash::with_max_entries(65536, 0);

/// Per tracked socket: `SHORTCUT_READY` or `SHORTCUT_PLAIN`. Not preallocated (flag 1).
#[map(name = "SHORTCUT_STATE")]
static SHORTCUT_STATE: HashMap<ShortcutKey, u32> = HashMap::with_max_entries(65536, 1);

/// Per tracked socket: the bytes its peer has redirected into it. Not preallocated.
#[map(name = "SHORTCUT_QUEUE")]
static SHORTCUT_QUEUE: HashMap<ShortcutKey, u64> = HashMap::with_max_entries(65536, 1);

/// Slot 0: 1 while the shortcut may redirect, 0 = kill switch (flipped at run time).
#[map(name = "SHORTCUT_SWITCH")]
static SHORTCUT_SWITCH: Array<u32> = Array::with_max_entries(1, 0);

/// Per-CPU counters by `ShortcutEvent`.
#[map(name = "SHORTCUT_EVENTS")]
static SHORTCUT_EVENTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(SHORTCUT_EVENT_SLOTS, 0);

/// 127.0.0.6, where the inbound proxy dials apps from when it does not keep the client's address.
const INBOUND_SOURCE: [u8; 16] = v4_mapped([127, 0, 0, 6]);

#[inline(always)]
fn event(e: ShortcutEvent) {
    if let Some(v) = SHORTCUT_EVENTS.get_ptr_mut(e as u32) {
        // Per-CPU slot: no other writer while this program runs on this CPU.
        unsafe { *v += 1 };
    }
}

#[inline(always)]
fn switched_on() -> bool {
    SHORTCUT_SWITCH.get(0).is_some_and(|v| *v == 1)
}

/// The key of a socket from its context's fields (`remote_port` as the kernel gives it to
/// sock_ops and sk_msg: network order in the upper 16 bits; `local_port` in host order).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn key_of(
    netns: u64,
    family: u32,
    l4: u32,
    l6: [u32; 4],
    r4: u32,
    r6: [u32; 4],
    lport: u32,
    rport: u32,
) -> Option<ShortcutKey> {
    let (local, remote) = if family == AF_INET {
        (v4_mapped(l4.to_ne_bytes()), v4_mapped(r4.to_ne_bytes()))
    } else if family == AF_INET6 {
        (words_to_bytes(l6), words_to_bytes(r6))
    } else {
        return None;
    };
    Some(ShortcutKey {
        netns_cookie: netns,
        local,
        remote,
        local_port: lport as u16,
        remote_port: u16::from_be((rport >> 16) as u16),
        _pad: [0; 4],
    })
}

/// Whether the socket `k` (the active end when `active`) is one end of a proxy leg.
#[inline(always)]
fn proxy_leg(k: &ShortcutKey, active: bool) -> bool {
    let (near, far) = if active { (&k.local, &k.remote) } else { (&k.remote, &k.local) };
    let (near_port, far_port) = if active { (k.local_port, k.remote_port) } else { (k.remote_port, k.local_port) };
    // Outbound: the app's connect, rewritten to loopback:15001.
    if far_port == OUTBOUND_PORT && is_loopback(far) && is_loopback(near) {
        return true;
    }
    // Inbound: the proxy dials the app from 127.0.0.6, or (IPv6) from the pod's own address.
    // Never loopback to itself: that is the app's own local traffic (a sidecar process, a
    // local cache), which is not the mesh's and must not fill the socket map.
    if *near == INBOUND_SOURCE || (near == far && !is_loopback(near)) {
        return true;
    }
    // Inbound keeping the client's address: registered by the proxy around its connect.
    let dial = DialKey { netns_cookie: k.netns_cookie, addr: *near, port: near_port, app_port: far_port, _pad: [0; 4] };
    unsafe { PROXY_DIALS.get(&dial) }.is_some()
}

#[sock_ops]
pub fn shortcut_pair(ctx: SockOpsContext) -> u32 {
    let ops: *mut bpf_sock_ops = ctx.ops;
    let (op, family, l4, l6a, l6b, l6c, l6d, r4, r6a, r6b, r6c, r6d, lport, rport, arg1, flags) = unsafe {
        (
            read_volatile(&(*ops).op),
            read_volatile(&(*ops).family),
            read_volatile(&(*ops).local_ip4),
            read_volatile(&(*ops).local_ip6[0]),
            read_volatile(&(*ops).local_ip6[1]),
            read_volatile(&(*ops).local_ip6[2]),
            read_volatile(&(*ops).local_ip6[3]),
            read_volatile(&(*ops).remote_ip4),
            read_volatile(&(*ops).remote_ip6[0]),
            read_volatile(&(*ops).remote_ip6[1]),
            read_volatile(&(*ops).remote_ip6[2]),
            read_volatile(&(*ops).remote_ip6[3]),
            read_volatile(&(*ops).local_port),
            read_volatile(&(*ops).remote_port),
            read_volatile(&(*ops).__bindgen_anon_1.args[1]),
            read_volatile(&(*ops).bpf_sock_ops_cb_flags),
        )
    };
    let active = op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB;
    if !active && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_STATE_CB {
        return 1;
    }
    let netns = unsafe { bpf_get_netns_cookie(ops.cast()) };
    let Some(mut key) = key_of(netns, family, l4, [l6a, l6b, l6c, l6d], r4, [r6a, r6b, r6c, r6d], lport, rport) else {
        return 1;
    };
    if op == BPF_SOCK_OPS_STATE_CB {
        // Only tracked sockets asked for this callback; the kernel drops them from SHORTCUT.
        if arg1 == BPF_TCP_CLOSE {
            let _ = SHORTCUT_QUEUE.remove(&key);
            if SHORTCUT_STATE.remove(&key).is_ok() {
                event(ShortcutEvent::Closed);
            }
        }
        return 1;
    }
    if unsafe { ENROLLED.get(&netns) }.is_none() || !switched_on() || !proxy_leg(&key, active) {
        return 1;
    }
    // Data in the SYN (TCP Fast Open), acknowledged or waiting to be sent again, went or goes
    // by TCP before this socket could be tracked: later sends must not overtake it.
    if active {
        let (acked, in_flight) = unsafe { (read_volatile(&(*ops).bytes_acked), read_volatile(&(*ops).packets_out)) };
        if acked > 1 || in_flight > 0 {
            event(ShortcutEvent::TcpData);
            return 1;
        }
    }
    // The close callback first: a socket tracked without it would leave its state behind.
    if ctx.set_cb_flags((flags | BPF_SOCK_OPS_STATE_CB_FLAG) as i32).is_err() {
        event(ShortcutEvent::MapFull);
        return 1;
    }
    // State, then queue accounting, then the map, so `shortcut_redirect` never runs for a
    // socket without them, and a queue entry is only there while its state is (it is
    // inserted after it and removed before it): a sender finds its peer by the queue entry.
    if SHORTCUT_STATE.insert(&key, &SHORTCUT_READY, BPF_ANY as u64).is_err() {
        event(ShortcutEvent::MapFull);
        return 1;
    }
    if SHORTCUT_QUEUE.insert(&key, &0, BPF_ANY as u64).is_err() {
        let _ = SHORTCUT_STATE.remove(&key);
        event(ShortcutEvent::MapFull);
        return 1;
    }
    if SHORTCUT.update(&mut key, unsafe { &mut *ops }, BPF_ANY as u64).is_err() {
        let _ = SHORTCUT_QUEUE.remove(&key);
        let _ = SHORTCUT_STATE.remove(&key);
        event(ShortcutEvent::MapFull);
        return 1;
    }
    event(ShortcutEvent::Paired);
    1
}

/// Marks the sending socket `own` as sending through TCP from now on and lets this send go.
#[inline(always)]
fn stay_plain(ctx: &SkMsgContext, own: &ShortcutKey, why: ShortcutEvent) -> u32 {
    let _ = SHORTCUT_STATE.insert(own, &SHORTCUT_PLAIN, BPF_EXIST as u64);
    event(why);
    if diag() {
        aya_log_ebpf::debug!(
            ctx,
            "shortcut: port {} -> {} stays on TCP (reason {})",
            own.local_port,
            own.remote_port,
            why as u32
        );
    }
    SK_PASS
}

#[sk_msg]
pub fn shortcut_redirect(ctx: SkMsgContext) -> u32 {
    let md: *mut sk_msg_md = ctx.msg;
    let (family, l4, l6a, l6b, l6c, l6d, r4, r6a, r6b, r6c, r6d, lport, rport) = unsafe {
        (
            read_volatile(&(*md).family),
            read_volatile(&(*md).local_ip4),
            read_volatile(&(*md).local_ip6[0]),
            read_volatile(&(*md).local_ip6[1]),
            read_volatile(&(*md).local_ip6[2]),
            read_volatile(&(*md).local_ip6[3]),
            read_volatile(&(*md).remote_ip4),
            read_volatile(&(*md).remote_ip6[0]),
            read_volatile(&(*md).remote_ip6[1]),
            read_volatile(&(*md).remote_ip6[2]),
            read_volatile(&(*md).remote_ip6[3]),
            read_volatile(&(*md).local_port),
            read_volatile(&(*md).remote_port),
        )
    };
    let netns = unsafe { bpf_get_netns_cookie(md.cast()) };
    let Some(own) = key_of(netns, family, l4, [l6a, l6b, l6c, l6d], r4, [r6a, r6b, r6c, r6d], lport, rport) else {
        return SK_PASS;
    };
    match unsafe { SHORTCUT_STATE.get(&own) } {
        Some(s) if *s == SHORTCUT_READY => {}
        Some(_) => return SK_PASS,
        None => {
            event(ShortcutEvent::Untracked);
            return SK_PASS;
        }
    }
    if !switched_on() {
        return stay_plain(&ctx, &own, ShortcutEvent::SwitchedOff);
    }
    let mut peer = own.peer();
    // The peer's queue entry stands for its being tracked (see `shortcut_pair`); a peer not
    // (yet) tracked, or paired by an agent without the queue map, has none: TCP.
    let Some(queue) = SHORTCUT_QUEUE.get_ptr_mut(&peer) else {
        return stay_plain(&ctx, &own, ShortcutEvent::PeerNotReady);
    };
    // Bytes plus the kernel's own record of the send (see `SHORTCUT_MSG_COST`).
    let size = unsafe { read_volatile(&(*md).size) } as u64 + SHORTCUT_MSG_COST;
    // Counted before the redirect. No atomic add is needed: only this socket redirects into
    // its peer, and its sends hold its socket lock.
    let redirected = unsafe { read_volatile(queue) };
    if redirected + size > SHORTCUT_QUEUE_LIMIT {
        return stay_plain(&ctx, &own, ShortcutEvent::QueueLimit);
    }
    unsafe { write_volatile(queue, redirected + size) };
    if SHORTCUT.redirect_msg(&ctx, &mut peer, BPF_F_INGRESS as u64) as u32 != SK_PASS {
        // Not redirected (the peer left the map): this send takes TCP instead of being lost.
        return stay_plain(&ctx, &own, ShortcutEvent::RedirectFailed);
    }
    event(ShortcutEvent::Redirected);
    SK_PASS
}
