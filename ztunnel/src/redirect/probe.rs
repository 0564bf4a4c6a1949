//! The kernel floor. Every program type, map type, helper and bpf(2) command capture uses is
//! probed when the agent starts, so an old or stripped-down kernel is refused with the
//! missing feature named, instead of failing at the first enrollment (or, worse, running
//! with part of capture missing). The list is the README's "Kernel floor" table; keep the
//! two in step.
use aya::maps::MapType;
use aya::programs::ProgramType;
use aya::sys::{is_helper_supported, is_map_supported, is_program_supported, BpfHelper};

/// How a feature is probed.
#[derive(Debug, Clone, Copy)]
enum Check {
    Program(ProgramType),
    Map(MapType),
    Helper(ProgramType, BpfHelper),
    /// A bpf(2) command by number, and how many leading u32 fields of its attr are fds:
    /// known commands answer a bad fd with EBADF, unknown ones with EINVAL.
    Command(libc::c_long, usize),
}

/// One kernel feature capture needs.
#[derive(Debug, Clone, Copy)]
pub struct Feature {
    /// Short name, used in messages and by `--simulate-missing-kernel-feature`.
    pub name: &'static str,
    /// What needs it.
    pub used_for: &'static str,
    /// First Linux release that has it.
    pub since: &'static str,
    check: Check,
}

type H = BpfHelper;
use ProgramType as P;

/// Everything capture needs, oldest requirement first within each kind.
pub const FEATURES: &[Feature] = &[
    Feature { name: "prog:sock_ops", used_for: "record_origdst", since: "4.13", check: Check::Program(P::SockOps) },
    Feature {
        name: "prog:cgroup_sock_addr",
        used_for: "capture_connect4/6",
        since: "4.17",
        check: Check::Program(P::CgroupSockAddr),
    },
    Feature { name: "prog:sk_lookup", used_for: "steer_inbound", since: "5.9", check: Check::Program(P::SkLookup) },
    Feature { name: "map:hash", used_for: "ENROLLED, exclusions", since: "3.19", check: Check::Map(MapType::Hash) },
    Feature { name: "map:array", used_for: "FAULTS", since: "3.19", check: Check::Map(MapType::Array) },
    Feature { name: "map:percpu_array", used_for: "COUNTERS", since: "4.6", check: Check::Map(MapType::PerCpuArray) },
    Feature {
        name: "map:lru_hash",
        used_for: "ORIG_BY_COOKIE, ORIG_BY_TUPLE, PROXY_CGROUPS",
        since: "4.10",
        check: Check::Map(MapType::LruHash),
    },
    Feature { name: "map:lpm_trie", used_for: "EXCL_CIDRS", since: "4.11", check: Check::Map(MapType::LpmTrie) },
    Feature {
        name: "map:sockhash",
        used_for: "INBOUND_LISTENERS",
        since: "4.18",
        check: Check::Map(MapType::SockHash),
    },
    Feature {
        name: "helper:get_socket_cookie@cgroup_sock_addr",
        used_for: "capture_connect4/6",
        since: "4.20",
        check: Check::Helper(P::CgroupSockAddr, H::BPF_FUNC_get_socket_cookie),
    },
    Feature {
        name: "helper:get_socket_cookie@sock_ops",
        used_for: "record_origdst",
        since: "4.20",
        check: Check::Helper(P::SockOps, H::BPF_FUNC_get_socket_cookie),
    },
    Feature {
        name: "helper:get_netns_cookie@cgroup_sock_addr",
        used_for: "capture_connect4/6",
        since: "5.7",
        check: Check::Helper(P::CgroupSockAddr, H::BPF_FUNC_get_netns_cookie),
    },
    Feature {
        name: "helper:get_current_cgroup_id@cgroup_sock_addr",
        used_for: "capture_connect4/6 (proxy bypass)",
        since: "5.7",
        check: Check::Helper(P::CgroupSockAddr, H::BPF_FUNC_get_current_cgroup_id),
    },
    Feature {
        name: "helper:getsockopt@cgroup_sock_addr",
        used_for: "capture_connect6 (proxy mark)",
        since: "5.8",
        check: Check::Helper(P::CgroupSockAddr, H::BPF_FUNC_getsockopt),
    },
    Feature {
        name: "helper:sk_assign@sk_lookup",
        used_for: "steer_inbound",
        since: "5.9",
        check: Check::Helper(P::SkLookup, H::BPF_FUNC_sk_assign),
    },
    Feature {
        name: "helper:get_netns_cookie@sock_ops",
        used_for: "record_origdst",
        since: "5.15",
        check: Check::Helper(P::SockOps, H::BPF_FUNC_get_netns_cookie),
    },
    Feature {
        name: "cmd:link_create",
        used_for: "every attach (pinned links)",
        since: "5.7",
        check: Check::Command(28, 2),
    },
    Feature { name: "cmd:link_detach", used_for: "uninstall, pod removal", since: "5.9", check: Check::Command(34, 1) },
];

/// What capture needs beyond [`FEATURES`] when it serves a proxy that is not ours
/// (`ztunnel cni --ebpf-capture`): the `SO_ORIGINAL_DST` answer and the listen hook.
pub const FOREIGN_PROXY_FEATURES: &[Feature] = &[
    Feature {
        name: "prog:cgroup_sockopt",
        used_for: "answer_original_dst",
        since: "5.3",
        check: Check::Program(P::CgroupSockopt),
    },
    Feature {
        name: "helper:get_netns_cookie@cgroup_sockopt",
        used_for: "answer_original_dst",
        since: "5.7",
        check: Check::Helper(P::CgroupSockopt, H::BPF_FUNC_get_netns_cookie),
    },
    Feature {
        name: "helper:sock_hash_update@sock_ops",
        used_for: "adopt_inbound_listener",
        since: "4.18",
        check: Check::Helper(P::SockOps, H::BPF_FUNC_sock_hash_update),
    },
    Feature {
        name: "helper:get_current_cgroup_id@sock_ops",
        used_for: "adopt_inbound_listener (proxy check)",
        since: "5.7",
        check: Check::Helper(P::SockOps, H::BPF_FUNC_get_current_cgroup_id),
    },
];

/// The oldest kernel with everything in [`FEATURES`].
pub const KERNEL_FLOOR: &str = "5.15";

/// A feature the running kernel lacks.
#[derive(Debug, Clone, thiserror::Error)]
#[error("kernel feature missing: {name} (used by {used_for}; Linux {since} or later, this agent needs {KERNEL_FLOOR}+): {detail}")]
pub struct MissingFeature {
    pub name: &'static str,
    pub used_for: &'static str,
    pub since: &'static str,
    pub detail: String,
}

/// Every feature the running kernel lacks: why capture cannot start.
#[derive(Debug, Clone)]
pub struct KernelTooOld(pub Vec<MissingFeature>);

impl std::fmt::Display for KernelTooOld {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "this kernel cannot run capture:")?;
        self.0.iter().try_for_each(|m| write!(f, "\n{m}"))
    }
}

impl std::error::Error for KernelTooOld {}

/// Probes every feature ([`FOREIGN_PROXY_FEATURES`] too when `foreign_proxy`);
/// `simulate_missing` names one to report as missing (tests, and operators checking how the
/// agent refuses). Returns every missing feature.
pub fn check_kernel(simulate_missing: Option<&str>, foreign_proxy: bool) -> Result<(), KernelTooOld> {
    let extra: &[Feature] = if foreign_proxy { FOREIGN_PROXY_FEATURES } else { &[] };
    let missing: Vec<MissingFeature> = FEATURES
        .iter()
        .chain(extra)
        .filter_map(|f| {
            let result = if simulate_missing == Some(f.name) {
                Err("simulated by --simulate-missing-kernel-feature".into())
            } else {
                probe(f.check)
            };
            result.err().map(|detail| MissingFeature { name: f.name, used_for: f.used_for, since: f.since, detail })
        })
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(KernelTooOld(missing))
    }
}

fn probe(check: Check) -> Result<(), String> {
    let supported = match check {
        Check::Program(p) => is_program_supported(p).map_err(|e| e.to_string())?,
        Check::Map(m) => is_map_supported(m).map_err(|e| e.to_string())?,
        Check::Helper(p, h) => is_helper_supported(p, h).map_err(|e| e.to_string())?,
        Check::Command(cmd, fds) => command_known(cmd, fds),
    };
    if supported {
        Ok(())
    } else {
        Err("not supported by the running kernel".into())
    }
}

/// Whether bpf(2) knows `cmd`: called with its first `fds` fields set to -1 and the rest
/// zero, a known command fails on the fd (EBADF), an unknown one with EINVAL.
fn command_known(cmd: libc::c_long, fds: usize) -> bool {
    let mut attr = [0u32; 4];
    attr.iter_mut().take(fds).for_each(|f| *f = u32::MAX);
    // SAFETY: a 16-byte attr of fds (-1) and zero flags; the kernel only reads it.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr() as *mut libc::c_void, 16usize) };
    rc >= 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_kernel_has_every_feature_capture_needs() {
        if let Err(e) = check_kernel(None, true) {
            panic!("{e}");
        }
    }

    #[test]
    fn a_simulated_missing_feature_is_reported_by_name_with_its_kernel_version() {
        let missing = check_kernel(Some("prog:sk_lookup"), false).unwrap_err().0;
        assert_eq!(missing.len(), 1);
        let msg = missing[0].to_string();
        assert!(msg.contains("prog:sk_lookup") && msg.contains("5.9") && msg.contains("steer_inbound"), "{msg}");
    }

    #[test]
    fn an_unknown_bpf_command_is_seen_as_missing() {
        assert!(!command_known(4096, 1));
        assert!(command_known(28, 2));
    }

    #[test]
    fn feature_names_are_unique() {
        let mut names: Vec<&str> = FEATURES.iter().chain(FOREIGN_PROXY_FEATURES).map(|f| f.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), FEATURES.len() + FOREIGN_PROXY_FEATURES.len());
    }
}
