//! Map keys, values and constants shared by the kernel programs (`ztunnel-ebpf`) and the
//! userspace loader. Everything here is `#[repr(C)]` with explicit padding so the verifier
//! never sees uninitialised key bytes and both sides agree on the layout.
#![no_std]

/// `SO_MARK` carried by every socket the proxy opens; capture skips marked sockets so the
/// proxy never captures itself (same value as Istio's ztunnel).
pub const PROXY_MARK: u32 = 0x539;
/// In-pod listener that receives captured outbound connections.
pub const OUTBOUND_PORT: u16 = 15001;
/// In-pod listener that receives captured plaintext inbound connections.
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// In-pod HBONE listener; served directly, never redirected.
pub const HBONE_PORT: u16 = 15008;

/// Value stored per enrolled network namespace (keyed by netns cookie).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodEntry {
    /// Reserved bit flags; bit 0 = enrolled.
    pub flags: u32,
    pub _pad: u32,
}

/// An address as 16 bytes: IPv6, or IPv4 mapped into `::ffff:a.b.c.d`, so one key type
/// serves both families.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IpKey {
    pub addr: [u8; 16],
}

/// Original destination of a captured outbound connect, before the rewrite to 15001.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// IPv6 or v4-mapped address.
    pub addr: [u8; 16],
    /// Port in host byte order.
    pub port: u16,
    pub _pad: [u8; 6],
}

/// Looks up an original destination from what the proxy sees on an accepted socket:
/// the pod's netns cookie and the client's address and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TupleKey {
    pub netns_cookie: u64,
    /// Client address, IPv6 or v4-mapped.
    pub addr: [u8; 16],
    /// Client port in host byte order.
    pub port: u16,
    pub _pad: [u8; 6],
}

/// A connection the proxy is opening to an app in its own pod from the client's address
/// (source kept): the netns, that address and port, and the app's port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DialKey {
    pub netns_cookie: u64,
    /// The client's address the proxy dials from, IPv6 or v4-mapped.
    pub addr: [u8; 16],
    /// The proxy socket's port (host byte order).
    pub port: u16,
    /// The app's port (host byte order).
    pub app_port: u16,
    pub _pad: [u8; 4],
}

/// Bits of the socket mark that say "the proxy" (as Istio's in-pod rules mask it).
pub const PROXY_MARK_MASK: u32 = 0xfff;
/// Mark bit on the proxy's sockets that dial an app from the client's address: the app's
/// accepted socket inherits it (`tcp_fwmark_accept`), and a policy rule routes what it
/// sends back to the proxy instead of out of the pod.
pub const KEEP_SOURCE_MARK: u32 = 0x10000;

/// Port key for the exclusion maps (host byte order, widened for alignment).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortKey {
    pub port: u32,
}

/// Which kernel program a counter belongs to.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Program {
    Connect4 = 0,
    Connect6 = 1,
    SockOps = 2,
    SkLookup = 3,
    /// `cgroup/getsockopt`: `SO_ORIGINAL_DST` answered for a proxy that is not ours.
    Getsockopt = 4,
    /// `sock_ops` on listen: a proxy's in-pod 15006 listener put into the inbound map.
    Listen = 5,
}

/// What happened, per program.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The connection was redirected to a proxy listener (or, for sock_ops, its original
    /// destination was recorded).
    Captured = 0,
    /// An enrolled pod's connection deliberately left alone (proxy mark, loopback,
    /// excluded port/CIDR, probe source).
    Bypassed = 1,
    /// Something failed (map full, missing listener: fail-closed drop).
    Error = 2,
}

/// Number of counter slots in the `COUNTERS` per-CPU array.
pub const COUNTER_SLOTS: u32 = 18;

/// Slot of a (program, outcome) counter.
pub const fn counter_index(p: Program, o: Outcome) -> u32 {
    (p as u32) * 3 + (o as u32)
}

/// One socket of a connection inside a pod's netns, as that socket sees it. The sockmap
/// shortcut pairs a socket with the one whose key is this one reversed (local and remote
/// swapped), so both ends of a loopback leg find each other without a lookup table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ShortcutKey {
    pub netns_cookie: u64,
    /// Local address, IPv6 or v4-mapped.
    pub local: [u8; 16],
    /// Remote address, IPv6 or v4-mapped.
    pub remote: [u8; 16],
    /// Ports in host byte order.
    pub local_port: u16,
    pub remote_port: u16,
    pub _pad: [u8; 4],
}

impl ShortcutKey {
    /// The key the other end of this connection is stored under.
    pub const fn peer(&self) -> ShortcutKey {
        ShortcutKey {
            netns_cookie: self.netns_cookie,
            local: self.remote,
            remote: self.local,
            local_port: self.remote_port,
            remote_port: self.local_port,
            _pad: [0; 4],
        }
    }
}

/// `SHORTCUT_STATE` value: the socket is paired and its sends may be redirected.
pub const SHORTCUT_READY: u32 = 1;
/// `SHORTCUT_STATE` value: the socket has sent through the TCP stack once (peer not ready,
/// switch off, failed redirect); it keeps doing so, so its bytes can never overtake each
/// other on two paths.
pub const SHORTCUT_PLAIN: u32 = 2;

/// The most bytes one tracked socket may redirect into its peer, over the connection's life.
/// The kernel charges redirected bytes to no receive buffer and lets no BPF program see
/// what the peer has read (a read counter needs fexit, which kernels locked down refuse), so
/// a reader that stops (an app that never reads, or the proxy held back by a slow upstream)
/// would otherwise let its peer queue without end. Past this a socket sends through TCP,
/// whose windows push back. 4 MiB: the default `tcp_wmem` maximum, what one stalled TCP
/// sender can hold anyway.
pub const SHORTCUT_QUEUE_LIMIT: u64 = 4 << 20;

/// What each redirected send costs against `SHORTCUT_QUEUE_LIMIT` besides its bytes: the
/// kernel queues every redirected send as its own `struct sk_msg` (about 700 bytes, a 1 KiB
/// slab object) charged nowhere, so 1-byte sends would otherwise queue 4 Mi of them (about
/// 4 GiB) within the limit.
pub const SHORTCUT_MSG_COST: u64 = 1024;

/// What the sockmap shortcut did, counted per CPU in `SHORTCUT_EVENTS`. Every reason to
/// leave a socket on the normal path has its own slot.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShortcutEvent {
    /// A socket of a proxy leg was put into the shortcut map.
    Paired = 0,
    /// A socket could not be tracked (a map was full); it stays on the normal path.
    MapFull = 1,
    /// A send found no paired peer (it was not tracked, or not yet): normal path from then on.
    PeerNotReady = 2,
    /// A send while the kill switch was off: normal path from then on.
    SwitchedOff = 3,
    /// A send moved straight to the peer socket.
    Redirected = 4,
    /// The kernel refused the redirect (peer closing): normal path from then on.
    RedirectFailed = 5,
    /// A send on a socket in the map whose state is gone (forgotten by a restart, or a
    /// socket past its close): normal path.
    Untracked = 6,
    /// A tracked socket reached `TCP_CLOSE` and its state was removed.
    Closed = 7,
    /// A send would have taken the bytes redirected into the peer past
    /// `SHORTCUT_QUEUE_LIMIT`: normal path from then on, where TCP pushes back.
    QueueLimit = 8,
    /// A socket whose SYN carried data (TCP Fast Open) was not paired: those bytes went by
    /// TCP before it could be tracked, and later sends must not overtake them.
    TcpData = 9,
}

/// Number of slots in `SHORTCUT_EVENTS`.
pub const SHORTCUT_EVENT_SLOTS: u32 = 10;

/// Converts an IPv4 address (network order octets) into the mapped 16-byte form.
pub const fn v4_mapped(octets: [u8; 4]) -> [u8; 16] {
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3]]
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all types are repr(C), Copy, and have explicit padding fields.
    unsafe impl aya::Pod for super::PodEntry {}
    unsafe impl aya::Pod for super::IpKey {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::TupleKey {}
    unsafe impl aya::Pod for super::PortKey {}
    unsafe impl aya::Pod for super::DialKey {}
    unsafe impl aya::Pod for super::ShortcutKey {}
}
