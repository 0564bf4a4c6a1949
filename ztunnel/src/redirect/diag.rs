//! Kernel-side diagnostics: the capture programs log their decisions (captured connects,
//! steered and dropped inbound connections, shortcut fallbacks) through aya-log's ring
//! buffer while the `DIAG` switch is on. Off by default; `/logging` with
//! `ztunnel::ebpf=debug` turns it on at run time, so a capture problem in the field can be
//! seen without rebuilding. A thread of its own drains the ring buffer into `tracing`
//! (target `ztunnel::ebpf`), off the data path's runtime.
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;

use aya::maps::{Array, MapData};
use aya::Ebpf;

use super::worker::Worker;
use super::{map_err, CaptureError};

/// The `tracing` target kernel records are logged under.
pub const TARGET: &str = "ztunnel::ebpf";

/// Turns the programs' logging on or off (the `DIAG` slot they read).
pub(super) fn set(ebpf: &mut Ebpf, on: bool) -> Result<(), CaptureError> {
    let mut diag: Array<&mut MapData, u32> =
        Array::try_from(ebpf.map_mut("DIAG").expect("map")).map_err(map_err("DIAG"))?;
    diag.set(0, u32::from(on), 0).map_err(map_err("DIAG"))
}

/// Forwards aya-log records to `tracing`, keeping their level.
struct ToTracing;

impl log::Log for ToTracing {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, r: &log::Record<'_>) {
        let msg = r.args();
        match r.level() {
            log::Level::Error => tracing::error!(target: TARGET, "{msg}"),
            log::Level::Warn => tracing::warn!(target: TARGET, "{msg}"),
            log::Level::Info => tracing::info!(target: TARGET, "{msg}"),
            log::Level::Debug => tracing::debug!(target: TARGET, "{msg}"),
            log::Level::Trace => tracing::trace!(target: TARGET, "{msg}"),
        }
    }

    fn flush(&self) {}
}

/// Takes the `AYA_LOGS` ring buffer out of `ebpf` and drains it on a new thread, which
/// stops when the returned handle is dropped.
pub(super) fn start_reader(ebpf: &mut Ebpf) -> Result<Worker, CaptureError> {
    let mut logger = aya_log::EbpfLogger::init_with_logger(ebpf, ToTracing).map_err(|e| CaptureError::Io {
        what: "reading kernel logs from",
        path: "AYA_LOGS".into(),
        source: std::io::Error::other(e.to_string()),
    })?;
    Worker::spawn("ztunnel-ebpf-log", move |stop| {
        let fd = logger.as_raw_fd();
        while !stop.load(Ordering::Acquire) {
            let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd for an fd `logger` keeps open.
            if unsafe { libc::poll(&mut p, 1, 200) } > 0 {
                logger.flush();
            }
        }
    })
    .map_err(|source| CaptureError::Io {
        what: "starting the kernel log thread",
        path: "AYA_LOGS".into(),
        source,
    })
}
