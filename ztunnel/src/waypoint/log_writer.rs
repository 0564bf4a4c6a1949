//! Access-log lines written in batches. Writing each request's line on its own cost a system
//! call and a pass through the tracing formatter per request, about a tenth of the
//! waypoint's CPU at 1000 req/s (docs/decisions.md); lines now gather in a buffer that goes
//! out in one write when it passes [`FLUSH_AT`] bytes, at least every [`FLUSH_EVERY`], and
//! when the writer is dropped. Envoy buffers its access-log files the same way.
//!
//! A line is always written whole: the buffer only ever holds complete lines, so another
//! writer on the same stdout cannot cut into one.
use std::io::Write;
use std::sync::Mutex;
use std::time::Duration;

/// Buffered bytes that trigger a write on the spot.
pub const FLUSH_AT: usize = 16 * 1024;
/// The longest a line waits in the buffer.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);

/// Complete lines waiting to be written to `out`.
pub struct LineWriter {
    state: Mutex<(Vec<u8>, Box<dyn Write + Send>)>,
}

impl std::fmt::Debug for LineWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LineWriter").finish_non_exhaustive()
    }
}

impl LineWriter {
    /// Lines for the process's standard output.
    pub fn stdout() -> Self {
        Self::new(Box::new(std::io::stdout()))
    }

    /// Lines for `out`.
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        LineWriter { state: Mutex::new((Vec::with_capacity(FLUSH_AT), out)) }
    }

    /// Adds `line` (without its newline); writes the batch if it is now large.
    pub fn push(&self, line: &str) {
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (buf, out) = &mut *guard;
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        if buf.len() >= FLUSH_AT {
            write_out(buf, out);
        }
    }

    /// Writes what is buffered.
    pub fn flush(&self) {
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (buf, out) = &mut *guard;
        if !buf.is_empty() {
            write_out(buf, out);
        }
    }

    /// Flushes every [`FLUSH_EVERY`] until the task is dropped.
    pub async fn flush_periodically(self: std::sync::Arc<Self>) {
        let mut tick = tokio::time::interval(FLUSH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.flush();
        }
    }
}

/// A failed write drops the batch (as the tracing writer drops a line): the log must not
/// stall or grow without bound because stdout is gone.
fn write_out(buf: &mut Vec<u8>, out: &mut Box<dyn Write + Send>) {
    let _ = out.write_all(buf).and_then(|()| out.flush());
    buf.clear();
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex as StdMutex};

    /// A `Write` whose bytes and write calls the test can read.
    #[derive(Clone, Default)]
    struct Capture(Arc<StdMutex<(Vec<u8>, usize)>>);

    impl Write for Capture {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let mut g = self.0.lock().unwrap();
            g.0.extend_from_slice(b);
            g.1 += 1;
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Capture {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().0.clone()).unwrap()
        }
        fn writes(&self) -> usize {
            self.0.lock().unwrap().1
        }
    }

    #[test]
    fn lines_wait_for_a_flush_and_go_out_in_one_write() {
        let cap = Capture::default();
        let w = LineWriter::new(Box::new(cap.clone()));
        w.push("one");
        w.push("two");
        assert_eq!(cap.text(), "");
        w.flush();
        assert_eq!((cap.text().as_str(), cap.writes()), ("one\ntwo\n", 1));
    }

    #[test]
    fn a_full_buffer_is_written_at_once_with_whole_lines_only() {
        let cap = Capture::default();
        let w = LineWriter::new(Box::new(cap.clone()));
        let line = "x".repeat(1000);
        for _ in 0..(FLUSH_AT / 1001 + 1) {
            w.push(&line);
        }
        let text = cap.text();
        assert!(text.len() >= FLUSH_AT && text.ends_with('\n'), "{}", text.len());
        assert!(text.lines().all(|l| l == line));
    }

    #[test]
    fn dropping_the_writer_writes_what_is_left() {
        let cap = Capture::default();
        LineWriter::new(Box::new(cap.clone())).push("last");
        assert_eq!(cap.text(), "last\n");
    }

    #[tokio::test]
    async fn a_line_goes_out_within_the_flush_interval() {
        let cap = Capture::default();
        let w = Arc::new(LineWriter::new(Box::new(cap.clone())));
        let task = tokio::spawn(w.clone().flush_periodically());
        w.push("soon");
        let deadline = tokio::time::Instant::now() + FLUSH_EVERY * 5;
        while cap.text().is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(cap.text(), "soon\n");
        task.abort();
    }
}
