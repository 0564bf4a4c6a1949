//! Access-log lines written in batches. Writing each request's line on its own cost a system
//! call and a pass through the tracing formatter per request, about a tenth of the
//! waypoint's CPU at 1000 req/s (docs/decisions.md); lines now gather in a buffer that goes
//! out in one write when it passes [`FLUSH_AT`] bytes, at least every [`FLUSH_EVERY`], and
//! when the writer is dropped. Envoy buffers its access-log files the same way.
//!
//! A line is always written whole: the buffer only ever holds complete lines, so another
//! writer on the same stdout cannot cut into one.
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;

/// Buffered bytes that trigger a write on the spot.
pub const FLUSH_AT: usize = 16 * 1024;
/// The longest a line waits in the buffer.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);

/// Complete lines waiting to be written to `out`.
pub struct LineWriter {
    state: Mutex<Batch>,
    /// Lines lost to failed writes (`ztunnel_waypoint_access_log_dropped_lines_total`).
    dropped: Counter,
}

struct Batch {
    buf: Vec<u8>,
    lines: u64,
    out: Box<dyn Write + Send>,
    /// The last write failed part-way, so the output may end mid-line.
    broken: bool,
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
        let batch = Batch { buf: Vec::with_capacity(FLUSH_AT), lines: 0, out, broken: false };
        LineWriter { state: Mutex::new(batch), dropped: Counter::default() }
    }

    /// Adds `line` (without its newline); writes the batch if it is now large.
    pub fn push(&self, line: &str) {
        let mut b = self.state.lock().unwrap_or_else(|e| e.into_inner());
        b.buf.extend_from_slice(line.as_bytes());
        b.buf.push(b'\n');
        b.lines += 1;
        if b.buf.len() >= FLUSH_AT {
            self.write_out(&mut b);
        }
    }

    /// Writes what is buffered.
    pub fn flush(&self) {
        let mut b = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !b.buf.is_empty() {
            self.write_out(&mut b);
        }
    }

    /// The count of lines lost to failed writes, to register as a metric.
    pub fn dropped(&self) -> Counter {
        self.dropped.clone()
    }

    /// Flushes every [`FLUSH_EVERY`] on a thread of its own (a blocked stdout must not stall
    /// a runtime) until the writer is dropped.
    pub fn flush_periodically(writer: &Arc<Self>) -> std::io::Result<()> {
        let weak = Arc::downgrade(writer);
        std::thread::Builder::new().name("access-log".into()).spawn(move || loop {
            std::thread::sleep(FLUSH_EVERY);
            match weak.upgrade() {
                Some(w) => w.flush(),
                None => return,
            }
        })?;
        Ok(())
    }

    /// A failed write drops the batch, counted (as the tracing writer drops a line): the log
    /// must not stall or grow without bound because stdout is gone. The next batch starts
    /// on a line of its own, so a line cut by the failure cannot run into the next one.
    fn write_out(&self, b: &mut Batch) {
        let Batch { buf, lines, out, broken } = b;
        let fresh: &[u8] = if *broken { b"\n" } else { b"" };
        let result = out.write_all(fresh).and_then(|()| out.write_all(buf)).and_then(|()| out.flush());
        *broken = result.is_err();
        if result.is_err() {
            self.dropped.inc_by(*lines);
        }
        buf.clear();
        *lines = 0;
    }
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

    #[test]
    fn a_line_goes_out_within_the_flush_interval() {
        let cap = Capture::default();
        let w = Arc::new(LineWriter::new(Box::new(cap.clone())));
        LineWriter::flush_periodically(&w).unwrap();
        w.push("soon");
        let deadline = std::time::Instant::now() + FLUSH_EVERY * 5;
        while cap.text().is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(cap.text(), "soon\n");
    }

    /// Accepts `budget` bytes, then fails every write until `heal`ed.
    #[derive(Clone, Default)]
    struct Failing(Arc<StdMutex<(Vec<u8>, usize, bool)>>);

    impl Write for Failing {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let mut g = self.0.lock().unwrap();
            if g.2 {
                g.0.extend_from_slice(b);
                return Ok(b.len());
            }
            let n = b.len().min(g.1);
            if n == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
            }
            g.1 -= n;
            g.0.extend_from_slice(&b[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_write_that_fails_half_way_is_counted_and_the_next_line_starts_fresh() {
        let out = Failing(Arc::new(StdMutex::new((Vec::new(), 5, false))));
        let w = LineWriter::new(Box::new(out.clone()));
        w.push("\"first\" line");
        w.push("second");
        w.flush();
        assert_eq!(w.dropped().get(), 2);
        out.0.lock().unwrap().2 = true;
        w.push("\"third\"");
        w.flush();
        let text = String::from_utf8(out.0.lock().unwrap().0.clone()).unwrap();
        assert_eq!(text, "\"firs\n\"third\"\n");
        assert_eq!(text.lines().last(), Some("\"third\""));
    }
}
