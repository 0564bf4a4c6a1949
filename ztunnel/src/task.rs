//! Spawning per-connection tasks without paying for their futures twice. An `async move`
//! block that awaits a future it captured stores that future twice (once captured, once
//! being awaited), and per-connection tasks live as long as their connections, so that
//! doubles the memory every idle connection holds.
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

pin_project_lite::pin_project! {
    /// A future that keeps `held` alive until `fut` completes, then drops both.
    pub struct Holding<F, T> {
        #[pin]
        fut: F,
        held: T,
    }
}

impl<F: Future, T> Future for Holding<F, T> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.project().fut.poll(cx)
    }
}

/// Spawns `fut`, keeping `held` (a connection slot, a stream counter) until it finishes.
pub fn spawn_holding<F, T>(fut: F, held: T) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
    T: Send + 'static,
{
    tokio::spawn(Holding { fut, held })
}
