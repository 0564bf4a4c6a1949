//! Synchronous entry points: each builds a current-thread runtime on the calling thread,
//! so every socket is created in the caller's network namespace.

use super::*;

fn runtime() -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()
}

/// Serves `listener` on the calling thread forever (see [`super::echo_server`]); use
/// [`EchoServer::spawn`] for a background server that stops on drop.
pub fn echo_server(listener: std::net::TcpListener) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    runtime()?.block_on(async { super::echo_server(tokio::net::TcpListener::from_std(listener)?).await })
}

/// Declares, for each async generator in [`super`], a function of the same name and
/// arguments that runs it to completion on a new current-thread runtime.
macro_rules! on_this_thread {
    ($($name:ident($($arg:ident: $ty:ty),* $(,)?) -> $out:ty;)*) => {$(
        #[doc = concat!("See [`super::", stringify!($name), "`].")]
        pub fn $name($($arg: $ty),*) -> io::Result<$out> {
            runtime()?.block_on(super::$name($($arg),*))
        }
    )*};
}

on_this_thread! {
    throughput(addr: SocketAddr, duration: Duration) -> f64;
    latency(addr: SocketAddr, connections: usize, qps: f64, duration: Duration, payload: usize)
        -> FortioResult;
    max_rate(addr: SocketAddr, connections: usize, duration: Duration) -> FortioResult;
    connection_rate(addr: SocketAddr, duration: Duration, concurrency: usize) -> f64;
    connection_rate_with(
        addr: SocketAddr,
        duration: Duration,
        concurrency: usize,
        protocol: Protocol,
    ) -> f64;
}

/// See [`super::run_load`]; with `spec.threads > 1`, connections and rate are split
/// over that many threads (spawned from this one, so in the same netns) so the
/// generator is not limited to one core.
pub fn run_load(spec: &LoadSpec) -> io::Result<FortioResult> {
    let threads = spec.threads.clamp(1, spec.connections.max(1));
    let wall = SystemTime::now();
    let raws = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                // Thread t gets connections t, t+threads, …; qps in proportion.
                let conns = (spec.connections.max(1) + threads - 1 - t) / threads;
                let qps = spec.qps.map(|q| q * conns as f64 / spec.connections.max(1) as f64);
                s.spawn(move || runtime()?.block_on(drive(spec, conns, qps)))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| io::Error::other("load thread panicked"))?)
            .collect::<io::Result<Vec<_>>>()
    })?;
    Ok(finish(spec, wall, raws))
}
