//! Files the producer re-reads while it runs: the ingest tokens and the TLS certificate, key
//! and client CAs. Each is loaded once at start-up, where a problem is a start-up error; then
//! its files are checked every second (size, modification time, device and inode, which
//! together catch an in-place write and the kubelet's symlink swap of a Secret volume) and
//! re-read on SIGHUP whatever they look like. A re-read that fails (the file is gone, unreadable
//! or does not parse) keeps the last good value, logs an error and counts
//! `courier_file_reloads_total{result="error"}`: a broken file never replaces a working one.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::{Mutex, RwLock};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::observability::Metrics;

/// How often the files are checked for a change.
pub(crate) const POLL: Duration = Duration::from_secs(1);

/// What identifies a version of a file without reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint {
    len: u64,
    modified: Option<SystemTime>,
    device_inode: (u64, u64),
}

/// The file's fingerprint (`None`: it cannot be looked at, e.g. it is gone). Follows
/// symlinks, so a Secret volume's `..data` swap changes it.
fn fingerprint(path: &Path) -> Option<Fingerprint> {
    let m = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let device_inode = {
        use std::os::unix::fs::MetadataExt;
        (m.dev(), m.ino())
    };
    #[cfg(not(unix))]
    let device_inode = (0, 0);
    Some(Fingerprint {
        len: m.len(),
        modified: m.modified().ok(),
        device_inode,
    })
}

/// A value loaded from files, for the reload log line: what it holds, without secrets.
pub(crate) trait Summary {
    /// E.g. "3 tokens"; never a secret.
    fn summary(&self) -> String;
}

/// A value loaded from `paths` by `load`, replaced when they change and load again.
pub(crate) struct Watched<T> {
    /// The `file` label of `courier_file_reloads_total` and of the log lines.
    name: &'static str,
    paths: Vec<PathBuf>,
    load: Box<dyn Fn() -> Result<T, String> + Send + Sync>,
    current: RwLock<Arc<T>>,
    /// The fingerprints of the last load attempt, good or not: a broken file is reported
    /// once, not every second.
    seen: Mutex<Vec<Option<Fingerprint>>>,
}

/// What one check did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Checked {
    /// The files look as they did; nothing was read.
    Unchanged,
    /// Read again and replaced.
    Reloaded,
    /// Read again and refused (the message says why): the last good value stays.
    Failed(String),
}

impl<T> Watched<T> {
    /// Loads the value once.
    ///
    /// # Errors
    /// What `load` says: at start-up a missing or malformed file is an error.
    pub(crate) fn load(
        name: &'static str,
        paths: Vec<PathBuf>,
        load: impl Fn() -> Result<T, String> + Send + Sync + 'static,
    ) -> Result<Self, String> {
        // Fingerprints first: a change while reading shows at the next check.
        let seen = paths.iter().map(|p| fingerprint(p)).collect();
        let value = load()?;
        Ok(Watched {
            name,
            paths,
            load: Box::new(load),
            current: RwLock::new(Arc::new(value)),
            seen: Mutex::new(seen),
        })
    }

    /// The value in force.
    pub(crate) fn get(&self) -> Arc<T> {
        self.current.read().clone()
    }

    /// Loads again when the files changed since the last attempt, or always when `forced`
    /// (SIGHUP). Blocking file I/O: call it off the async workers.
    pub(crate) fn check(&self, forced: bool) -> Checked {
        let now: Vec<Option<Fingerprint>> = self.paths.iter().map(|p| fingerprint(p)).collect();
        {
            let mut seen = self.seen.lock();
            if !forced && *seen == now {
                return Checked::Unchanged;
            }
            *seen = now;
        }
        match (self.load)() {
            Ok(v) => {
                *self.current.write() = Arc::new(v);
                Checked::Reloaded
            }
            Err(e) => Checked::Failed(e),
        }
    }
}

/// A [`Watched`] value of any type, for the reloader.
pub(crate) trait Reload: Send + Sync {
    /// The `file` label.
    fn name(&self) -> &'static str;
    /// [`Watched::check`].
    fn check(&self, forced: bool) -> Checked;
    /// The value in force, summarized.
    fn summary(&self) -> String;
}

impl<T: Summary + Send + Sync> Reload for Watched<T> {
    fn name(&self) -> &'static str {
        self.name
    }
    fn check(&self, forced: bool) -> Checked {
        Watched::check(self, forced)
    }
    fn summary(&self) -> String {
        self.get().summary()
    }
}

/// Checks `items` every [`POLL`] and on SIGHUP (forced) until `shutdown`; logs and counts
/// every re-read. Without items it does nothing, so SIGHUP keeps its default action.
pub(crate) fn spawn_reloader(
    items: Vec<Arc<dyn Reload>>,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> Option<JoinHandle<()>> {
    if items.is_empty() {
        return None;
    }
    let items: Arc<[Arc<dyn Reload>]> = items.into();
    // Installed before returning, so SIGHUP never falls back to its default (terminate)
    // once the producer has started.
    let mut hangup = hangup_signal();
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is immediate; everything was just loaded
        loop {
            let forced = tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => false,
                Some(()) = next_hangup(&mut hangup) => true,
            };
            let pass = items.clone();
            let Ok(results) = tokio::task::spawn_blocking(move || {
                pass.iter()
                    .map(|i| (i.name(), i.check(forced)))
                    .collect::<Vec<_>>()
            })
            .await
            else {
                continue;
            };
            for ((name, checked), item) in results.into_iter().zip(items.iter()) {
                report(&metrics, name, checked, forced, item.as_ref());
            }
        }
    }))
}

fn report(metrics: &Metrics, file: &str, checked: Checked, forced: bool, item: &dyn Reload) {
    let trigger = if forced { "SIGHUP" } else { "a change" };
    match checked {
        Checked::Unchanged => {}
        Checked::Reloaded => {
            metrics.file_reloads.with_label_values(&[file, "ok"]).inc();
            tracing::info!(file, trigger, now = %item.summary(), "Re-read the ingest {file} file(s).");
        }
        Checked::Failed(error) => {
            metrics
                .file_reloads
                .with_label_values(&[file, "error"])
                .inc();
            tracing::error!(file, trigger, error = %error, kept = %item.summary(), "Could not re-read the ingest {file} file(s); the last good set stays in force.");
        }
    }
}

#[cfg(unix)]
type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangup = Option<()>;

/// SIGHUP as a stream, or `None` where it cannot be had (then only polling reloads).
fn hangup_signal() -> Hangup {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "Cannot listen for SIGHUP; the ingest files are still re-read when they change.");
                None
            }
        }
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// The next SIGHUP; pending forever without a signal stream.
async fn next_hangup(h: &mut Hangup) -> Option<()> {
    #[cfg(unix)]
    if let Some(s) = h {
        return s.recv().await;
    }
    let _ = h;
    std::future::pending().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watched(path: &Path) -> Watched<String> {
        let p = path.to_owned();
        Watched::load("test", vec![path.to_owned()], move || {
            let text = std::fs::read_to_string(&p).map_err(|e| e.to_string())?;
            if text.starts_with("bad") {
                return Err("starts with bad".into());
            }
            Ok(text)
        })
        .expect("loads")
    }

    #[test]
    fn a_changed_file_is_reloaded_and_a_broken_one_keeps_the_last_good_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "one").unwrap();
        let w = watched(&path);
        assert_eq!(w.check(false), Checked::Unchanged);
        // Replaced by rename, as the kubelet and most editors do.
        std::fs::write(dir.path().join("tmp"), "two!").unwrap();
        std::fs::rename(dir.path().join("tmp"), &path).unwrap();
        assert_eq!(w.check(false), Checked::Reloaded);
        assert_eq!(*w.get(), "two!");
        std::fs::write(&path, "bad content").unwrap();
        assert_eq!(w.check(false), Checked::Failed("starts with bad".into()));
        assert_eq!(*w.get(), "two!", "a broken file keeps the last good value");
        assert_eq!(w.check(false), Checked::Unchanged, "reported once");
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(w.check(false), Checked::Failed(_)));
        assert_eq!(*w.get(), "two!", "a missing file keeps the last good value");
        std::fs::write(&path, "three").unwrap();
        assert_eq!(w.check(false), Checked::Reloaded);
        assert_eq!(*w.get(), "three");
    }

    #[test]
    fn forced_reads_an_unchanged_looking_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "aaaa").unwrap();
        let w = watched(&path);
        let modified = std::fs::metadata(&path).unwrap().modified().unwrap();
        // Same inode, same length, same modification time: only SIGHUP sees it.
        std::fs::write(&path, "bbbb").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(modified)
            .unwrap();
        assert_eq!(w.check(false), Checked::Unchanged);
        assert_eq!(w.check(true), Checked::Reloaded);
        assert_eq!(*w.get(), "bbbb");
    }

    #[test]
    fn start_up_problems_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("missing");
        let q = p.clone();
        let r = Watched::load("test", vec![p], move || {
            std::fs::read_to_string(&q).map_err(|e| e.to_string())
        });
        assert!(r.is_err());
    }
}
