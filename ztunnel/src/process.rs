//! Process-wide settings a long-lived node agent needs and a library caller would not want
//! by default: returning freed heap to the kernel, and an open-file limit sized for two
//! sockets per proxied connection.

/// glibc keeps freed heap in its arenas, so after a burst of connections the agent's RSS
/// would stay at the peak for good. Every few seconds, hand free pages back to the kernel
/// (measured: jemalloc instead doubled idle RSS; see docs/decisions.md).
pub fn start_heap_trimmer() {
    // A fixed mmap threshold (glibc otherwise raises it after the first big free): large
    // buffers, such as the kernel BTF aya parses at each enrollment, are mapped and
    // returned on free instead of leaving a high-water mark in the heap.
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only tunes the allocator; called before the runtime starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    #[cfg(target_env = "gnu")]
    std::thread::Builder::new()
        .name("heap-trim".into())
        .spawn(|| loop {
            std::thread::sleep(std::time::Duration::from_secs(5));
            // SAFETY: malloc_trim only returns free pages to the kernel.
            unsafe { libc::malloc_trim(0) };
        })
        .map(drop)
        .unwrap_or_else(|e| tracing::warn!(error = %e, "no heap trimmer thread"));
}

/// One agent holds two sockets per proxied connection for every pod on the node: lift the
/// soft open-file limit to the hard one (as Istio's ztunnel does) so the per-pod caps, not
/// the default 1024, decide when connections are refused.
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit on this process with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                tracing::warn!(error = %std::io::Error::last_os_error(), "cannot raise the open-file limit");
            }
        }
    }
}
