//! Capture's own background threads (the kernel-log reader, the shortcut sweeper), kept off
//! the data path's runtimes. Each runs until its handle is dropped, which asks it to stop and
//! waits for it, so nothing outlives the capture that started it.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// A running background thread; dropping it stops and joins the thread.
pub(super) struct Worker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts `body` on a thread named `name`; `body` returns soon after the flag it is given
    /// turns true (it checks at least every few hundred milliseconds).
    pub(super) fn spawn(name: &str, body: impl FnOnce(&AtomicBool) + Send + 'static) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new().name(name.into()).spawn(move || body(&stopping))?;
        Ok(Worker { stop, thread: Some(thread) })
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = self.thread.as_ref().and_then(|t| t.thread().name().map(str::to_string));
        f.debug_struct("Worker").field("thread", &name).finish_non_exhaustive()
    }
}
