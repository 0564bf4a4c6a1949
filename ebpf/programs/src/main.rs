//! In-pod traffic capture without iptables.
//!
//! * `connect4` / `connect6` (cgroup sock_addr): a TCP connect from an enrolled pod netns is
//!   rewritten to the in-pod outbound listener on loopback:15001; the original destination is
//!   kept by socket cookie.
//! * `sockops`: when that connect is established, the original destination is re-keyed by
//!   (netns cookie, client address, client port), which the proxy can compute from `accept()`.
//! * `sklookup` (per pod netns): incoming TCP for the pod's IP lands on the pod's 15006
//!   listener without rewriting addresses.
//! * `shortcut` (opt-in): `sock_ops` pairs the two sockets of each in-pod proxy leg in a
//!   SOCKHASH and `sk_msg` moves each send straight to the peer's receive queue.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod programs;
#[cfg(target_arch = "bpf")]
mod shortcut;

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
