//! Runtime log-level control behind the admin `/logging` endpoint.

use std::sync::Mutex;

use tracing_subscriber::reload;
use tracing_subscriber::EnvFilter;

const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// Why a requested log level was refused; the admin endpoint answers 400 with its text.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LogLevelError {
    /// The request had no `level` parameter.
    #[error("missing level: use ?level=<off|error|warn|info|debug|trace> or target=level,...")]
    Missing,
    /// Some part of the directive list is not `level` or `target=level`.
    #[error("invalid level directive {0:?}: expected off|error|warn|info|debug|trace or target=level")]
    Invalid(String),
    /// The directive was valid but the installed subscriber refused it.
    #[error("applying log level failed: {0}")]
    Apply(String),
}

type ApplyFn = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;
type WatchFn = Box<dyn Fn(&str) + Send + Sync>;

/// Holds the current log directive and, optionally, a hook that applies a new one to the live
/// tracing subscriber; shared by the admin thread so operators can raise verbosity without a
/// restart.
pub struct LogControl {
    current: Mutex<String>,
    apply: Option<ApplyFn>,
    /// Told every directive that was applied (e.g. to switch the kernel programs' logging).
    watchers: Mutex<Vec<WatchFn>>,
}

impl std::fmt::Debug for LogControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogControl").field("current", &self.current()).field("live", &self.apply.is_some()).finish()
    }
}

impl LogControl {
    /// A control that only records the requested level (nothing is reloaded); used when the
    /// process installed no reloadable filter, so `/logging` still answers consistently.
    pub fn record_only(initial: impl Into<String>) -> Self {
        LogControl { current: Mutex::new(initial.into()), apply: None, watchers: Mutex::default() }
    }

    /// A control that calls `apply` with each validated, normalised directive string
    /// (e.g. `"info,ztunnel::proxy=debug"`), for subscribers other than an `EnvFilter`.
    pub fn new(initial: impl Into<String>, apply: impl Fn(&str) -> Result<(), String> + Send + Sync + 'static) -> Self {
        LogControl { current: Mutex::new(initial.into()), apply: Some(Box::new(apply)), watchers: Mutex::default() }
    }

    /// A control that swaps the `EnvFilter` behind a `tracing_subscriber::reload` layer, the
    /// usual way `main` makes its log level changeable at run time.
    pub fn from_reload_handle<S: 'static>(handle: reload::Handle<EnvFilter, S>, initial: impl Into<String>) -> Self {
        Self::new(initial, move |spec| {
            let filter = EnvFilter::try_new(spec).map_err(|e| e.to_string())?;
            handle.reload(filter).map_err(|e| e.to_string())
        })
    }

    /// Whether changes reach the live subscriber (false for [`LogControl::record_only`]).
    pub fn is_live(&self) -> bool {
        self.apply.is_some()
    }

    /// The directive currently in force (or last recorded).
    pub fn current(&self) -> String {
        self.current.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Validates `spec`, applies it if live, records it and returns the normalised directive.
    /// Accepts a comma-separated list of `level`, `target=level` or Istio-style `target:level`.
    pub fn set(&self, spec: &str) -> Result<String, LogLevelError> {
        let normalized = normalize(spec)?;
        if let Some(apply) = &self.apply {
            apply(&normalized).map_err(LogLevelError::Apply)?;
        }
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = normalized.clone();
        for w in self.watchers.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            w(&normalized);
        }
        Ok(normalized)
    }

    /// Calls `watch` with the directive now in force and with each one applied later.
    pub fn on_change(&self, watch: impl Fn(&str) + Send + Sync + 'static) {
        watch(&self.current());
        self.watchers.lock().unwrap_or_else(|e| e.into_inner()).push(Box::new(watch));
    }
}

/// Whether the directive list `spec` (as [`LogControl::current`] gives it) lets events of
/// `target` at `level` through: the directive with the longest target that is `target` or
/// a `::` parent of it decides, else the bare level, else `info` (EnvFilter's rules, for
/// the plain directives `/logging` accepts).
pub fn directive_enables(spec: &str, target: &str, level: &str) -> bool {
    let rank = |l: &str| LEVELS.iter().position(|x| x.eq_ignore_ascii_case(l));
    let mut best: Option<(usize, &str)> = None;
    for d in spec.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let (t, l) = match d.split_once('=') {
            Some((t, l)) => (t, l),
            None if rank(d).is_some() => ("", d),
            None => continue,
        };
        let covers = t.is_empty() || target == t || target.strip_prefix(t).is_some_and(|rest| rest.starts_with("::"));
        if covers && best.is_none_or(|(len, _)| t.len() >= len) {
            best = Some((t.len(), l));
        }
    }
    let allowed = best.map(|(_, l)| l).unwrap_or("info");
    match (rank(allowed), rank(level)) {
        (Some(a), Some(l)) => l <= a && l > 0,
        _ => false,
    }
}

fn is_level(s: &str) -> bool {
    LEVELS.contains(&s)
}

fn is_target(s: &str) -> bool {
    !s.is_empty()
        && !s.ends_with(':')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ':' | '.'))
}

/// Turns a user-supplied level list into a canonical `EnvFilter` directive string, refusing
/// anything that is not plainly a level so a typo cannot silently become a target filter.
fn normalize(spec: &str) -> Result<String, LogLevelError> {
    let spec = spec.trim();
    if spec.is_empty() {
        return Err(LogLevelError::Missing);
    }
    let mut out = Vec::new();
    for part in spec.split(',') {
        let part = part.trim();
        let lower = part.to_ascii_lowercase();
        if is_level(&lower) {
            out.push(lower);
            continue;
        }
        let split = part.rsplit_once('=').or_else(|| part.rsplit_once(':'));
        match split {
            Some((target, level)) if is_target(target.trim()) && is_level(&level.trim().to_ascii_lowercase()) => {
                out.push(format!("{}={}", target.trim(), level.trim().to_ascii_lowercase()));
            }
            _ => return Err(LogLevelError::Invalid(part.to_string())),
        }
    }
    Ok(out.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn normalizes_levels_and_targets() {
        assert_eq!(normalize("DEBUG").unwrap(), "debug");
        assert_eq!(normalize("info, ztunnel::proxy=trace").unwrap(), "info,ztunnel::proxy=trace");
        assert_eq!(normalize("access:debug").unwrap(), "access=debug");
        assert_eq!(normalize("ztunnel::proxy:warn").unwrap(), "ztunnel::proxy=warn");
        assert_eq!(normalize("").unwrap_err(), LogLevelError::Missing);
        assert!(matches!(normalize("verbose"), Err(LogLevelError::Invalid(_))));
        assert!(matches!(normalize("info,x=loud"), Err(LogLevelError::Invalid(_))));
        assert!(matches!(normalize("ztunnel::debug"), Err(LogLevelError::Invalid(_))));
        assert!(matches!(normalize("a b=debug"), Err(LogLevelError::Invalid(_))));
    }

    #[test]
    fn enables_picks_the_most_specific_directive() {
        assert!(!directive_enables("info", "ztunnel::ebpf", "debug"));
        assert!(directive_enables("debug", "ztunnel::ebpf", "debug"));
        assert!(directive_enables("info,ztunnel::ebpf=debug", "ztunnel::ebpf", "debug"));
        assert!(directive_enables("warn,ztunnel=trace", "ztunnel::ebpf", "debug"));
        assert!(!directive_enables("debug,ztunnel::ebpf=info", "ztunnel::ebpf", "debug"));
        assert!(!directive_enables("ztunnel::ebpfx=debug", "ztunnel::ebpf", "debug"), "a name prefix is not a parent");
        assert!(!directive_enables("off", "ztunnel::ebpf", "error"));
        assert!(directive_enables("", "ztunnel::ebpf", "info"), "EnvFilter's default");
    }

    #[test]
    fn watchers_see_the_current_and_each_new_directive() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let ctl = LogControl::record_only("info");
        let s = seen.clone();
        ctl.on_change(move |d| s.lock().unwrap().push(d.to_string()));
        ctl.set("info,ztunnel::ebpf=debug").unwrap();
        assert!(ctl.set("loud").is_err());
        assert_eq!(*seen.lock().unwrap(), vec!["info".to_string(), "info,ztunnel::ebpf=debug".to_string()]);
    }

    #[test]
    fn live_control_applies_and_records() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let ctl = LogControl::new("info", move |d| {
            s.lock().unwrap().push(d.to_string());
            Ok(())
        });
        assert_eq!(ctl.current(), "info");
        assert_eq!(ctl.set("Debug").unwrap(), "debug");
        assert_eq!(ctl.current(), "debug");
        assert!(ctl.set("nope").is_err());
        assert_eq!(ctl.current(), "debug");
        assert_eq!(*seen.lock().unwrap(), vec!["debug".to_string()]);
    }

    #[test]
    fn reload_handle_swaps_filter() {
        use tracing_subscriber::prelude::*;
        let (layer, handle) = reload::Layer::new(EnvFilter::new("info"));
        let subscriber = tracing_subscriber::registry().with(layer);
        let ctl = LogControl::from_reload_handle(handle.clone(), "info");
        assert!(ctl.is_live());
        tracing::subscriber::with_default(subscriber, || {
            assert!(!tracing::enabled!(tracing::Level::DEBUG));
            ctl.set("debug").unwrap();
            assert!(tracing::enabled!(tracing::Level::DEBUG));
            assert_eq!(handle.with_current(|f| f.to_string()).unwrap(), "debug");
        });
    }
}
