//! The update journal: updates are stored durably before the offset that
//! confirms them goes to Telegram, and leave once the application received them.
//!
//! Rules, in order:
//! 1. [`Journal::append`] stores a batch in one transaction (fsync'd), and
//!    only then may the Poller confirm the batch's offset.
//! 2. The journal remembers the highest update_id it ever stored (the
//!    watermark). Telegram resends what was not confirmed, so an id from the
//!    offset the batch was fetched with up to the watermark has been seen:
//!    it is still pending here or was handled, and is not stored or delivered
//!    again. An id below that offset cannot be a resend (Telegram forgot
//!    those); it means Telegram restarted its id sequence (it does after a
//!    week without updates) and is new.
//! 3. [`Journal::handled`] deletes updates the app received. It need not be
//!    durable at once: a delete lost in a crash means the update is delivered
//!    again, which is allowed, because the journal never said it was handled.
//! 4. On start, [`Journal::pending`] gives back every update not handled, in
//!    id order, to be delivered before anything new.
//!
//! SQLite (bundled) in WAL mode. It is blocking, so the daemon runs it on
//! `SyncArbiter` threads ([`JournalActor`]), never on the actor thread: one
//! thread appends, another records handled updates, so that records do not
//! queue behind a burst of appends (their delay decides how much a crash
//! makes the apps receive twice). Both use one connection behind a mutex:
//! two connections would contend for SQLite's write lock, whose busy
//! handler sleeps in steps of milliseconds.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use actix::prelude::*;
use rusqlite::{params, Connection, OptionalExtension};

use crate::metrics::metrics;

/// Why the journal failed. Every variant is fatal to the operation; the
/// daemon cannot promise delivery without its journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("cannot create the state directory {path}: {reason}")]
    Dir { path: PathBuf, reason: String },
    #[error("journal {path}: {reason}")]
    Sqlite { path: PathBuf, reason: String },
}

pub struct Journal {
    conn: Connection,
    path: PathBuf,
}

impl Journal {
    /// Opens (creating if needed) `<dir>/<name>.sqlite3`.
    pub fn open(dir: &Path, name: &str) -> Result<Journal, JournalError> {
        std::fs::create_dir_all(dir).map_err(|e| JournalError::Dir {
            path: dir.to_path_buf(),
            reason: e.to_string(),
        })?;
        let path = dir.join(format!("{name}.sqlite3"));
        let conn = Connection::open(&path).map_err(|e| sqlite_err(&path, e))?;
        // The first journal opened is the daemon's; tests may open more.
        let _ = metrics().journal_path.set(path.clone());
        let journal = Journal { conn, path };
        journal
            .conn
            .execute_batch(
                "PRAGMA journal_mode = WAL;
                 PRAGMA synchronous = FULL;
                 PRAGMA busy_timeout = 10000;
                 CREATE TABLE IF NOT EXISTS updates (
                     update_id INTEGER PRIMARY KEY,
                     body TEXT NOT NULL
                 );
                 CREATE TABLE IF NOT EXISTS meta (
                     key TEXT PRIMARY KEY,
                     value INTEGER NOT NULL
                 );",
            )
            .map_err(|e| journal.err(e))?;
        Ok(journal)
    }

    fn err(&self, e: rusqlite::Error) -> JournalError {
        sqlite_err(&self.path, e)
    }

    /// The highest update_id ever stored, if any.
    pub fn watermark(&self) -> Result<Option<i64>, JournalError> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = 'watermark'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Stores the updates not seen before, durably, and returns their ids;
    /// `fetched_with` is the offset the batch was fetched with (rule 2).
    pub fn append(
        &mut self,
        batch: &[(i64, String)],
        fetched_with: Option<i64>,
    ) -> Result<Vec<i64>, JournalError> {
        let mut watermark = self.watermark()?;
        let seen = |id: i64, watermark: Option<i64>| {
            watermark.is_some_and(|w| id <= w) && fetched_with.is_none_or(|o| id >= o)
        };
        let tx = self
            .conn
            .transaction()
            .map_err(|e| sqlite_err(&self.path, e))?;
        let mut fresh = Vec::with_capacity(batch.len());
        {
            let mut insert = tx
                .prepare_cached("INSERT OR IGNORE INTO updates (update_id, body) VALUES (?1, ?2)")
                .map_err(|e| sqlite_err(&self.path, e))?;
            for (id, body) in batch {
                if seen(*id, watermark) {
                    continue;
                }
                insert
                    .execute(params![id, body])
                    .map_err(|e| sqlite_err(&self.path, e))?;
                // After a sequence restart the new, lower ids set the mark.
                watermark = Some(match watermark {
                    Some(w) if fetched_with.is_none_or(|o| w >= o) => w.max(*id),
                    _ => *id,
                });
                fresh.push(*id);
            }
        }
        if let Some(w) = watermark {
            tx.prepare_cached(
                "INSERT INTO meta (key, value) VALUES ('watermark', ?1)
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            )
            .and_then(|mut upsert| upsert.execute(params![w]))
            .map_err(|e| sqlite_err(&self.path, e))?;
        }
        tx.commit().map_err(|e| sqlite_err(&self.path, e))?;
        metrics().journal_entries.add(fresh.len() as i64);
        Ok(fresh)
    }

    /// Forgets updates the application received (rule 3).
    pub fn handled(&mut self, ids: &[i64]) -> Result<(), JournalError> {
        // A handled record need not wait for the disk (rule 3); appends do.
        self.conn
            .execute_batch("PRAGMA synchronous = NORMAL")
            .map_err(|e| self.err(e))?;
        let result = (|| {
            let tx = self.conn.transaction()?;
            let mut deleted = 0;
            {
                let mut delete = tx.prepare_cached("DELETE FROM updates WHERE update_id = ?1")?;
                for id in ids {
                    deleted += delete.execute(params![id])?;
                }
            }
            tx.commit().map(|()| deleted)
        })();
        self.conn
            .execute_batch("PRAGMA synchronous = FULL")
            .map_err(|e| self.err(e))?;
        let deleted = result.map_err(|e| self.err(e))?;
        metrics().journal_entries.add(-(deleted as i64));
        Ok(())
    }

    /// Every update not yet handled, oldest first (rule 4).
    pub fn pending(&self) -> Result<Vec<(i64, String)>, JournalError> {
        let mut stmt = self
            .conn
            .prepare("SELECT update_id, body FROM updates ORDER BY update_id")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// Number of updates not yet handled.
    pub fn len(&self) -> Result<u64, JournalError> {
        self.conn
            .query_row("SELECT COUNT(*) FROM updates", [], |r| r.get(0))
            .map_err(|e| self.err(e))
    }

    pub fn is_empty(&self) -> Result<bool, JournalError> {
        Ok(self.len()? == 0)
    }
}

fn sqlite_err(path: &Path, e: rusqlite::Error) -> JournalError {
    JournalError::Sqlite {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// The journal on a thread of its own, sharing the connection.
pub struct JournalActor(pub Arc<Mutex<Journal>>);

impl JournalActor {
    fn journal(&self) -> std::sync::MutexGuard<'_, Journal> {
        // A panic while holding the lock leaves the connection usable:
        // SQLite rolls back an unfinished transaction.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Actor for JournalActor {
    type Context = SyncContext<Self>;
}

/// Store a batch fetched with the given offset; answers with the ids that
/// are new.
#[derive(Message)]
#[rtype(result = "Result<Vec<i64>, String>")]
pub struct Append {
    pub batch: Vec<(i64, String)>,
    pub fetched_with: Option<i64>,
}

/// Forget handled updates.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Handled(pub Vec<i64>);

impl Handler<Append> for JournalActor {
    type Result = Result<Vec<i64>, String>;
    fn handle(&mut self, msg: Append, _: &mut SyncContext<Self>) -> Self::Result {
        self.journal()
            .append(&msg.batch, msg.fetched_with)
            .map_err(|e| e.to_string())
    }
}

impl Handler<Handled> for JournalActor {
    type Result = ();
    fn handle(&mut self, msg: Handled, _: &mut SyncContext<Self>) {
        log::trace!("journal: {} handled update(s) recorded", msg.0.len());
        let result = self.journal().handled(&msg.0);
        if let Err(e) = result {
            // Not fatal: the updates stay journaled and are delivered again
            // after a restart (rule 3).
            log::error!(
                "journal: recording {} handled update(s) failed: {e}",
                msg.0.len()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(ids: &[i64]) -> Vec<(i64, String)> {
        ids.iter()
            .map(|i| (*i, format!("{{\"update_id\":{i}}}")))
            .collect()
    }

    #[test]
    fn appended_updates_survive_reopening_until_handled() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut j = Journal::open(dir.path(), "j").unwrap();
            assert_eq!(j.append(&batch(&[1, 2, 3]), None).unwrap(), vec![1, 2, 3]);
            j.handled(&[2]).unwrap();
        }
        let j = Journal::open(dir.path(), "j").unwrap();
        let pending: Vec<i64> = j.pending().unwrap().into_iter().map(|(i, _)| i).collect();
        assert_eq!(pending, vec![1, 3]);
        assert_eq!(j.watermark().unwrap(), Some(3));
    }

    #[test]
    fn an_id_seen_again_is_never_stored_twice_even_after_it_was_handled() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path(), "j").unwrap();
        j.append(&batch(&[10, 11]), None).unwrap();
        j.handled(&[10, 11]).unwrap();
        // Telegram resends 11 (offset 11 not confirmed) along with a new one.
        assert_eq!(j.append(&batch(&[11, 12]), Some(11)).unwrap(), vec![12]);
        assert_eq!(j.len().unwrap(), 1);
        // A resend of a pending id is not duplicated either.
        assert_eq!(
            j.append(&batch(&[12]), Some(11)).unwrap(),
            Vec::<i64>::new()
        );
        assert_eq!(j.len().unwrap(), 1);
    }

    #[test]
    fn ids_below_the_fetch_offset_are_a_restarted_sequence_and_new() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path(), "j").unwrap();
        j.append(&batch(&[500, 501]), None).unwrap();
        // A week of silence later Telegram picks new, lower ids.
        assert_eq!(j.append(&batch(&[7, 8]), Some(502)).unwrap(), vec![7, 8]);
        assert_eq!(j.watermark().unwrap(), Some(8));
        // And resends of those are recognised again.
        assert_eq!(j.append(&batch(&[8, 9]), Some(8)).unwrap(), vec![9]);
    }

    #[test]
    fn bodies_come_back_as_stored_in_id_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path(), "j").unwrap();
        j.append(&[(5, "five".into()), (7, "seven".into())], None)
            .unwrap();
        assert_eq!(
            j.pending().unwrap(),
            vec![(5, "five".into()), (7, "seven".into())]
        );
    }

    #[test]
    fn an_unwritable_state_dir_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, "x").unwrap();
        let err = Journal::open(&file.join("sub"), "j")
            .err()
            .expect("cannot create a dir under a file");
        assert!(err.to_string().contains("state directory"), "{err}");
    }
}
