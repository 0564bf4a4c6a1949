//! A TCP port forward from inside a pod (or node) network namespace to an address of the
//! test host, such as a control plane listening on the host's loopback: what a Service in
//! front of istiod gives a real pod. Each connection is accepted in the namespace and
//! dialled from the host; bytes are copied both ways until either side closes.
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::InNetns;

/// A running forward; stops accepting when dropped (open connections run to their end).
pub struct PortForward {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PortForward {
    /// Listens on `listen` inside `ns` and forwards each connection to `target` (dialled
    /// from the caller's namespace).
    pub fn start(ns: &impl InNetns, listen: SocketAddr, target: SocketAddr) -> Result<Self> {
        let listener = ns
            .run(move || -> std::io::Result<TcpListener> {
                let l = TcpListener::bind(listen)?;
                l.set_nonblocking(true)?;
                Ok(l)
            })
            .with_context(|| format!("binding {listen} for the forward to {target}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((inside, _)) => {
                        std::thread::spawn(move || {
                            if let Ok(outside) = TcpStream::connect_timeout(&target, Duration::from_secs(5)) {
                                splice(inside, outside);
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Ok(PortForward { stop, thread: Some(thread) })
    }
}

impl PortForward {
    /// The other way: listens on `listen` in the caller's namespace and forwards each
    /// connection to `target` dialled inside `ns` (e.g. a pod's Prometheus to the host).
    pub fn out_of<N: InNetns + Clone + Send + 'static>(ns: &N, listen: SocketAddr, target: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let ns = ns.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((outside, _)) => {
                        let ns = ns.clone();
                        std::thread::spawn(move || {
                            let inside = ns.run(move || TcpStream::connect_timeout(&target, Duration::from_secs(5)));
                            if let Ok(inside) = inside {
                                splice(outside, inside);
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Ok(PortForward { stop, thread: Some(thread) })
    }
}

/// Copies both ways on two threads until both directions end.
fn splice(a: TcpStream, b: TcpStream) {
    let _ = a.set_nonblocking(false);
    let (Ok(mut a2), Ok(mut b2)) = (a.try_clone(), b.try_clone()) else { return };
    let up = std::thread::spawn(move || {
        let mut a = a;
        let mut b = b;
        let _ = std::io::copy(&mut a, &mut b);
        let _ = b.shutdown(std::net::Shutdown::Write);
    });
    let _ = std::io::copy(&mut b2, &mut a2);
    let _ = a2.shutdown(std::net::Shutdown::Write);
    let _ = up.join();
}

impl Drop for PortForward {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
