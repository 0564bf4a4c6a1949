//! Wakes the directory source as soon as a file under it is finished, moved, linked or removed
//! (inotify), so an edit is applied within milliseconds rather than on the next poll. The poll stays
//! as the fallback and the judge of what changed: inotify watches are per directory, can fail on a
//! watch limit and can overflow, and a wake-up only says "look now".
//!
//! A plain write (`IN_MODIFY`) does not wake: a file being rewritten is truncated first, and reading
//! it then would withdraw its objects from every node until the next read. Nor does a file being
//! created (`IN_CREATE`): it is still empty, and a reload then would cost a whole model build only
//! to be followed by another when the writer is done (in the scale bench that doubled the time from
//! edit to applied). The writer closing it (`IN_CLOSE_WRITE`), an atomic rename into place
//! (`IN_MOVED_TO`, editors and mounted ConfigMaps), a removal, and a new directory (to watch it) do;
//! a new symlink or hard link is left to the poll.
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::Path;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::unix::AsyncFd;
use tracing::debug;

/// The events that mean "a file's content is complete and may differ".
fn interesting() -> AddWatchFlags {
    AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVE_SELF
}

/// Change notifications for a config directory (and the subdirectories it had when last
/// [`DirEvents::rewatch`]ed).
pub struct DirEvents {
    inotify: AsyncFd<Owned>,
}

/// The inotify instance, owned by the reactor registration so its fd outlives it.
struct Owned(Inotify);

impl AsRawFd for Owned {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

impl DirEvents {
    /// Watches `dir` and every directory under it. Fails when inotify is unavailable or `dir`
    /// cannot be watched; the caller then polls only.
    pub fn new(dir: &Path) -> std::io::Result<Self> {
        let inotify = Owned(Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?);
        // SAFETY: `Owned` holds the fd open, unchanged, for as long as the registration lives.
        let inotify = unsafe { AsyncFd::register(inotify) }.map_err(std::io::Error::from)?;
        let events = DirEvents { inotify };
        events.rewatch(dir)?;
        Ok(events)
    }

    /// Adds watches for directories created since the last call (watching one again is a no-op).
    pub fn rewatch(&self, dir: &Path) -> std::io::Result<()> {
        for path in super::source::watched_paths(dir)? {
            if let Err(e) = self.inotify.get_ref().0.add_watch(&path, interesting()) {
                // A directory that vanished meanwhile, or the per-user watch limit: polling covers it.
                debug!(path = %path.display(), error = %e, "cannot watch; polling covers it");
            }
        }
        Ok(())
    }

    /// Waits for the next event that calls for a look (see [`wakes`]), draining the queue.
    pub async fn changed(&mut self) {
        loop {
            let Ok(mut guard) = self.inotify.readable().await else {
                // The reactor refused the fd: never wake, the poll carries on.
                return std::future::pending().await;
            };
            let mut woke = false;
            loop {
                match self.inotify.get_ref().0.read_events() {
                    Ok(events) => woke |= events.iter().any(|e| wakes(e.mask)),
                    Err(nix::errno::Errno::EAGAIN) => {
                        guard.clear_ready();
                        break;
                    }
                    Err(e) => {
                        // Not transient: stop waking rather than spin on a readable fd.
                        debug!(error = %e, "reading inotify events; polling only from now on");
                        return std::future::pending().await;
                    }
                }
            }
            if woke {
                return;
            }
        }
    }
}

/// Whether an event means a look is due: anything but a file merely created (see the module docs).
/// A queue overflow is always a wake-up: what it lost is unknown.
fn wakes(mask: AddWatchFlags) -> bool {
    let created_file = mask.contains(AddWatchFlags::IN_CREATE) && !mask.contains(AddWatchFlags::IN_ISDIR);
    mask.contains(AddWatchFlags::IN_Q_OVERFLOW) || !created_file
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_being_created_does_not_wake_but_its_writer_closing_it_does() {
        assert!(!wakes(AddWatchFlags::IN_CREATE));
        assert!(wakes(AddWatchFlags::IN_CLOSE_WRITE));
    }

    #[test]
    fn a_new_directory_a_rename_a_removal_and_an_overflow_wake() {
        assert!(wakes(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_ISDIR));
        assert!(wakes(AddWatchFlags::IN_MOVED_TO));
        assert!(wakes(AddWatchFlags::IN_DELETE));
        assert!(wakes(AddWatchFlags::IN_Q_OVERFLOW));
    }
}
