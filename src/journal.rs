//! The update journal: updates are stored durably before the offset that
//! confirms them goes to Telegram, and leave once the application received them.
//!
//! Rules, in order:
//! 1. [`Journal::append`] stores a batch in one transaction (fsync'd unless
//!    `journal.fsync = false`), and only then may the Poller confirm the
//!    batch's offset. The batch is dispatched to the apps while it is being
//!    written: until the offset is confirmed Telegram keeps the updates, so
//!    a crash before the commit loses nothing (they come again), and every
//!    record that names them (rules 3, 5, 6) is written after the append
//!    (the last paragraph). A failed append is retried by the Poller
//!    behind the records queued meanwhile; an update they recorded handled
//!    is not stored by the retry.
//! 2. The journal remembers the highest update_id it ever stored (the
//!    watermark). Telegram resends what was not confirmed, so an id from the
//!    offset the batch was fetched with up to the watermark has been seen:
//!    it is still pending here or was handled, and is not stored or delivered
//!    again. An id below that offset cannot be a resend (Telegram forgot
//!    those); it means Telegram restarted its id sequence (it does after a
//!    week without updates) and is new. [`admit`] is that test; the Poller
//!    applies it too, so it can dispatch before the append returns.
//! 3. [`Journal::record`] deletes updates the app is done with. It need not be
//!    durable at once: a delete lost in a crash means the update is delivered
//!    again, which is allowed, because the journal never said it was handled.
//! 4. On start, [`Journal::pending`] gives back every update not handled, in
//!    id order, to be delivered before anything new.
//!
//! The outbox holds what the apps sent (Bot API calls), so that a reply
//! survives the daemon too:
//!
//! 5. Each call has a key: its *cause* (the update whose handling made it)
//!    and its *ordinal* (the how-manieth call of that handling). A call
//!    with no cause has its row written before it goes (nothing would make
//!    it again). A call with a cause goes to the Sender at once, and its
//!    row is written only when a record needs it: the one that carries its
//!    answer (the row marked sent, rule 6) or the one that records its
//!    cause handled (the row unsent, rule 7), whichever comes first; when
//!    that is the same record, no row at all (rule 6). Until then a crash
//!    leaves its cause not handled, delivered again to make the call
//!    again. The chat's next call waits until the call's answer is written
//!    (the Sender's rule 1). A crash therefore leaves at most one call per
//!    chat that Telegram may have executed without the journal knowing.
//!    [`Journal::record`] stores calls and handled updates in one
//!    transaction, in the order the apps made them, so an update is never
//!    recorded handled while a call its handling made is neither answered
//!    nor stored.
//! 6. A call Telegram answered is marked sent (by [`Journal::record`]) and leaves
//!    the outbox once its cause is handled too: while the cause may still be
//!    delivered again, the sent row is what recognises its repeated call.
//!    A call answered by the record that handles its cause (or with no
//!    cause) is therefore never written: a row written, marked sent and
//!    forgotten in one transaction is no row. The Outbox lets a finished
//!    update's handled mark wait (up to a second) for its calls' answers,
//!    which makes that the common case: one deletion per update.
//! 7. On start ([`Journal::recover`]): unsent calls whose cause is handled
//!    (or that have none) are sent again; unsent calls of an unhandled cause
//!    are dropped, because delivering the cause again makes them again; sent
//!    calls of an unhandled cause are the keys that recognise repeats.
//!
//! Events other programs push into a chat (`POST /v1/chats/{chat_id}/events`,
//! docs/protocol.md) are journaled like updates, with ids of their own:
//!
//! 8. A pushed event's id is negative: -1, -2, ... in the order the events
//!    arrive, never reused in the journal's life (`meta` keeps the lowest id
//!    stored). Telegram's update_ids are positive, so the two never collide;
//!    the watermark (rule 2) is Telegram's alone and pushed events neither
//!    read nor move it. A pushed event lives in the same `updates` table, so
//!    rules 3 to 7 hold for it unchanged: it leaves once handled, and its
//!    calls are keyed by its id as cause. [`Journal::store_pushed`] writes
//!    it durably (fsync'd as appends are) before the pusher is told it is
//!    stored.
//! 9. Its place among the updates: each pushed event is stored with the
//!    highest update_id dispatched before it (`pushed.after`), and
//!    [`Journal::pending`] gives it back right after that update and before
//!    the next one, pushed events with the same place in the order they
//!    came. That is the order its chat had before the restart.
//! 10. It is dispatched before it is stored, as an update is (rule 1); a
//!     record that finds it not yet stored (a store that failed and is
//!     retried) is remembered, so the retried store does not store it again.
//!
//! In webhook mode Telegram delivers updates itself, several connections at once, so
//! ids arrive out of order and rule 2's watermark cannot tell a resend:
//!
//! 11. [`Journal::append_webhook`] stores an update unless its id is in the
//!     `seen` table, which every id a webhook delivered enters in the same
//!     transaction and leaves [`SEEN_FOR`] later (Telegram keeps an update a
//!     day at most). The watermark still rises, so polling after webhook
//!     mode starts past every stored id. The receiver dispatches only what
//!     this append answers as new, after it returned, so no record can come
//!     first.
//! 12. Back to polling while `seen` holds ids ([`Journal::webhook_seen`]),
//!     Telegram may still hold an update below the watermark (one refused
//!     while later ones were taken), so the Poller fetches from what Telegram
//!     holds and appends as rule 11 does, dispatching only what it answers
//!     as new. Ids polling stored before (up to [`Journal::polled`], kept by
//!     every polling append) are resends: they never entered `seen`.
//!
//! Handled updates and outbox rows need not wait for the disk: WAL commits
//! survive the process being killed, and a power loss rolls back whole
//! transactions, which can repeat a reply but never loses an update. The
//! connection stays at `synchronous = NORMAL`, and appends (rules 1, 8, 11)
//! sync the WAL once their commit is written (`Journal::durably`), which is
//! what `FULL` does inside every commit. (Switching the pragma around each
//! append cost more than the append's own statements at one update per
//! commit; a second connection kept at `FULL` for appends cost more still,
//! as each connection's page cache is dropped whenever the other commits.)
//!
//! A journal that SQLite would open damaged, silently without what it held,
//! is refused at start ([`JournalError::Damaged`], checks in `Files`);
//! `--reset-journal` moves it aside ([`reset_if_damaged`]). It holds users'
//! messages: its directory, when asgigramd creates it, is 0700 and its files
//! are 0600.
//!
//! SQLite (bundled) in WAL mode. It is blocking, so the daemon runs it on a
//! `SyncArbiter` thread ([`JournalActor`]), never on the actor thread. One
//! thread for appends and records alike: it takes its messages in the order
//! the actor thread sent them, which is what puts an update's append before
//! every record about it (rule 1). Nothing on an update's way to its reply
//! waits for that thread; only the offset (rule 1) and a chat's next call
//! (rule 5) do. Checkpoints, which copy the WAL into the database and sync
//! both, run on a second connection and thread of their own
//! (`Checkpointer`), so that a commit seldom runs one.

use std::cell::Cell;
use std::fs::{self, DirBuilder};
use std::io::{ErrorKind, Read};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use foldhash::{HashMap, HashSet};
use rusqlite::config::DbConfig;
use rusqlite::{params, Connection, ErrorCode, OpenFlags, OptionalExtension};
use serde_json::Value;

use crate::ops::metrics::metrics;
use crate::telegram::Params;

/// Why the journal failed. Every variant is fatal to the operation; the
/// daemon cannot promise delivery without its journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("cannot create the state directory {path}: {reason}")]
    Dir { path: PathBuf, reason: String },
    #[error("journal {path}: {reason}")]
    Sqlite { path: PathBuf, reason: String },
    #[error("journal file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    /// Opening it would lose what it holds without a word; nothing was
    /// changed. One line: it is what the daemon says when it refuses to start.
    #[error(
        "journal {path} is damaged: {what}. Nothing in it was changed. Keep a copy of {}, \
         then start asgigramd with --reset-journal: it moves the journal's files aside \
         (renamed, not deleted) and starts with an empty journal, without the updates they held",
        list(files)
    )]
    Damaged {
        path: PathBuf,
        what: String,
        /// The files that hold its data (the database and its WAL).
        files: Vec<PathBuf>,
    },
}

fn list(paths: &[PathBuf]) -> String {
    let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    names.join(" and ")
}

/// The schema; `IF NOT EXISTS` so that opening a journal made by an older
/// version completes it.
const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS updates (
                          update_id INTEGER PRIMARY KEY,
                          body TEXT NOT NULL
                      );
                      CREATE TABLE IF NOT EXISTS meta (
                          key TEXT PRIMARY KEY,
                          value INTEGER NOT NULL
                      );
                      CREATE TABLE IF NOT EXISTS outbox (
                          id INTEGER PRIMARY KEY,
                          cause INTEGER,
                          ordinal INTEGER NOT NULL,
                          method TEXT NOT NULL,
                          params TEXT NOT NULL,
                          sent INTEGER NOT NULL DEFAULT 0,
                          outcome TEXT
                      );
                      CREATE INDEX IF NOT EXISTS outbox_cause ON outbox (cause);
                      CREATE TABLE IF NOT EXISTS pushed (
                          id INTEGER PRIMARY KEY,
                          after INTEGER
                      );
                      CREATE TABLE IF NOT EXISTS seen (
                          update_id INTEGER PRIMARY KEY,
                          at INTEGER NOT NULL
                      );
                      CREATE INDEX IF NOT EXISTS seen_at ON seen (at);";

/// How long an update_id a webhook delivered is remembered (rule 11): Telegram keeps an
/// update for 24 hours at most, and an hour more covers clocks and retries.
pub const SEEN_FOR: Duration = Duration::from_secs(25 * 3600);

/// How often old `seen` rows are deleted, at most.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

pub struct Journal {
    /// Checkpoints the WAL off this thread; `None` without WAL, or if its
    /// connection could not open (SQLite's own checkpoints then go on).
    /// First, so that it is dropped, and its connection closed, first.
    checkpointer: Option<Checkpointer>,
    conn: Connection,
    path: PathBuf,
    /// Appends wait for the disk (`journal.fsync`, on by default).
    fsync: bool,
    /// In WAL mode, which `open` asks for; see `durably` for the other.
    wal: bool,
    /// Ids appended new by a commit whose sync failed. Its retry finds them
    /// stored and seen, so without these it would answer that they are not
    /// new, and they would not be delivered until the next start.
    unsynced_fresh: HashSet<i64>,
    /// Updates recorded handled before their append was written: only
    /// after a failed append, whose retry comes behind the records (rule 1).
    /// Their retried append must not store them again.
    handled_early: HashSet<i64>,
    /// When `seen` was last pruned (rule 11), in seconds since the epoch.
    pruned_at: u64,
    /// `meta`'s watermark as the last committed write left it. Only this
    /// connection writes it (the checkpointer copies pages; an operator's
    /// sqlite3 or a backup only holds locks), so reading it back inside
    /// every append, a statement of its own, told nothing new: 4,400
    /// instructions per update when each comes alone.
    watermark: Option<i64>,
    /// Updates that may have rows in `outbox`: causes of rows written since
    /// `open`, and of those it found. A handled update outside it has
    /// none, and `record` skips the `DELETE` that would look for them:
    /// usually its calls were answered in time to need no row at all.
    /// A superset is harmless (the delete finds nothing); an update leaves
    /// it once a committed record deleted its rows.
    with_rows: HashSet<i64>,
}

impl Journal {
    /// Opens (creating if needed) `<dir>/<name>.sqlite3`, after checking
    /// that it is whole ([`JournalError::Damaged`] if not; see `Files`).
    pub fn open(dir: &Path, name: &str) -> Result<Journal, JournalError> {
        prepare_dir(dir)?;
        let files = Files::new(dir, name);
        files.check()?;
        if !files.db.exists() {
            files.create()?;
        }
        let path = files.db.clone();
        let conn = Connection::open(&path).map_err(|e| sqlite_err(&path, e))?;
        files.verify(&conn)?;
        // After the check, which leaves a damaged journal untouched; and
        // after opening, which may have created a -wal and -shm.
        files.make_private();
        // SQLite answers with the mode it is in: a filesystem without the
        // shared memory WAL needs keeps the rollback journal.
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(|e| sqlite_err(&path, e))?;
        conn.execute_batch(&format!(
            "PRAGMA synchronous = NORMAL;
             PRAGMA busy_timeout = 10000;
             {SCHEMA}"
        ))
        .map_err(|e| sqlite_err(&path, e))?;
        // The first journal opened is the daemon's; tests may open more.
        let _ = metrics().journal_path.set(path.clone());
        let wal = mode.eq_ignore_ascii_case("wal");
        let watermark = meta(&conn, "watermark").map_err(|e| sqlite_err(&path, e))?;
        let with_rows = causes_with_rows(&conn).map_err(|e| sqlite_err(&path, e))?;
        Ok(Journal {
            checkpointer: wal.then(|| Checkpointer::start(&path)).flatten(),
            conn,
            path,
            fsync: true,
            wal,
            unsynced_fresh: HashSet::default(),
            handled_early: HashSet::default(),
            pruned_at: 0,
            watermark,
            with_rows,
        })
    }

    fn err(&self, e: rusqlite::Error) -> JournalError {
        sqlite_err(&self.path, e)
    }

    /// `journal.fsync = false`: appends stop waiting for the disk. A commit
    /// then survives the daemon being killed but not the machine losing
    /// power, and an update Telegram was told arrived could be lost with it.
    pub fn set_fsync(&mut self, on: bool) -> Result<(), JournalError> {
        self.fsync = on;
        Ok(())
    }

    /// Runs `f` in one transaction whose commit waits for the disk unless
    /// `journal.fsync = false`. The connection stays at `synchronous =
    /// NORMAL`, what records need (see the module doc), and an append's
    /// commit is made durable by syncing the WAL after it, as `FULL` would
    /// have done inside the commit: switching the pragma around every append
    /// cost two statements SQLite prepares anew each time (it applies a
    /// pragma while preparing it), 11,600 instructions, a twentieth of all
    /// the daemon does for an update that comes alone.
    fn durably<T>(&self, f: impl FnOnce(&Tx<'_>) -> rusqlite::Result<T>) -> Result<T, NotDurable> {
        let rolled_back = |e| NotDurable::RolledBack(self.err(e));
        if self.fsync && !self.wal {
            // The rollback journal's commit syncs what `FULL` asks it to.
            let sync = |pragma: &str| self.conn.execute_batch(pragma).map_err(rolled_back);
            sync("PRAGMA synchronous = FULL")?;
            let result = self.write(f).map_err(rolled_back);
            // Even after a failed write: records must not wait for the disk.
            sync("PRAGMA synchronous = NORMAL")?;
            return result;
        }
        let result = self.write(f).map_err(rolled_back)?;
        if self.fsync {
            // A failed sync fails the append, which is retried whole: its
            // own sync covers this commit too, and `settle` gives back what
            // this one stored new.
            self.sync_wal().map_err(NotDurable::Unsynced)?;
        }
        Ok(result)
    }

    /// After an append of `batch` that stored `fresh` as new: the ids of an
    /// earlier append of them whose commit held but whose sync failed are
    /// new too, now that this one synced; this one's are kept if its sync
    /// failed.
    fn settle(
        &mut self,
        written: Result<(), NotDurable>,
        batch: &[(i64, String)],
        fresh: &mut Vec<i64>,
    ) -> Result<(), JournalError> {
        match written {
            Err(NotDurable::RolledBack(e)) => return Err(e),
            Err(NotDurable::Unsynced(e)) => {
                self.unsynced_fresh.extend(fresh.iter().copied());
                return Err(e);
            }
            Ok(()) => {}
        }
        if !self.unsynced_fresh.is_empty() {
            for (id, _) in batch {
                if self.unsynced_fresh.remove(id) {
                    fresh.push(*id);
                }
            }
        }
        Ok(())
    }

    /// Syncs the WAL file through SQLite's own handle on it (the VFS's
    /// `xSync`, which `FULL` calls at each commit), so that every commit
    /// so far survives a power loss.
    fn sync_wal(&self) -> Result<(), JournalError> {
        let failed = |reason: String| JournalError::File {
            path: self.path.clone(),
            reason,
        };
        let file = wal_file(&self.conn);
        // SAFETY: `wal_file` gives a live, open `sqlite3_file`, whose method
        // table outlives it.
        let Some((file, sync)) =
            file.and_then(|f| unsafe { (*(*f).pMethods).xSync }.map(|s| (f, s)))
        else {
            return Err(failed("no WAL file to sync".to_string()));
        };
        // SAFETY: `file` is open (above), and SQLite calls `xSync` on it the
        // same way, from the connection's thread.
        let rc = unsafe { sync(file, rusqlite::ffi::SQLITE_SYNC_NORMAL) };
        if rc != rusqlite::ffi::SQLITE_OK {
            return Err(failed(format!(
                "syncing the WAL to disk failed: {}",
                rusqlite::ffi::code_to_str(rc)
            )));
        }
        Ok(())
    }

    /// A value `meta` keeps, if set.
    fn meta(&self, key: &str) -> Result<Option<i64>, JournalError> {
        meta(&self.conn, key).map_err(|e| self.err(e))
    }

    /// The highest update_id ever stored, if any.
    pub fn watermark(&self) -> Option<i64> {
        self.watermark
    }

    /// Keeps `watermark` as a write that may have moved it to `to` left
    /// it: moved if it committed, synced or not.
    fn moved_watermark(&mut self, written: &Result<(), NotDurable>, to: Option<i64>) {
        if !matches!(written, Err(NotDurable::RolledBack(_))) {
            self.watermark = to;
        }
    }

    /// Stores the updates not seen before, durably, and returns their ids;
    /// `fetched_with` is the offset the batch was fetched with (rule 2).
    pub fn append(
        &mut self,
        batch: &[(i64, String)],
        fetched_with: Option<i64>,
    ) -> Result<Vec<i64>, JournalError> {
        let handled_early = &self.handled_early;
        let mut fresh = Vec::with_capacity(batch.len());
        // Rule 12 counts every id polling admitted, one already handled
        // (and so not stored) included: Telegram may hold it still.
        let mut polled = None;
        let mut early = Vec::new();
        let mut watermark = self.watermark;
        let written = self.durably(|tx| {
            let mut insert = tx.prepare_cached(
                "INSERT OR IGNORE INTO updates (update_id, body) VALUES (?1, ?2)",
            )?;
            for (id, body) in batch {
                if !admit(&mut watermark, *id, fetched_with) {
                    continue;
                }
                polled = polled.max(Some(*id));
                if handled_early.contains(id) {
                    early.push(*id);
                    continue;
                }
                insert.execute(params![id, body])?;
                fresh.push(*id);
            }
            if let Some(w) = watermark {
                set_meta(tx, "watermark", w)?;
            }
            if let Some(highest) = polled {
                // Rule 12: how far polling stored, apart from the webhook.
                tx.prepare_cached(
                    "INSERT INTO meta (key, value) VALUES ('polled', ?1)
                     ON CONFLICT(key) DO UPDATE SET value = MAX(value, excluded.value)",
                )?
                .execute(params![highest])?;
            }
            Ok(())
        });
        self.moved_watermark(&written, watermark);
        self.settle(written, batch, &mut fresh)?;
        // Only once committed: a failed append is retried whole, and must
        // still skip them.
        for id in early {
            self.handled_early.remove(&id);
        }
        metrics().journal_entries.add(fresh.len() as i64);
        Ok(fresh)
    }

    /// The lowest pushed event id ever stored (rule 8), if any.
    pub fn pushed_through(&self) -> Result<Option<i64>, JournalError> {
        self.meta("pushed")
    }

    /// The id the next pushed event gets: below every id given before.
    pub fn next_pushed_id(&self) -> Result<i64, JournalError> {
        Ok(self
            .pushed_through()?
            .map_or(-1, |lowest| lowest.min(0) - 1))
    }

    /// Stores pushed events durably, in one transaction (rules 8 to 10);
    /// one recorded handled before this store is not stored.
    pub fn store_pushed(&mut self, events: &[NewPushed]) -> Result<(), JournalError> {
        let handled_early = &self.handled_early;
        let mut stored = 0;
        let mut early = Vec::new();
        self.durably(|tx| {
            let mut lowest = meta(tx, "pushed")?;
            let mut insert = tx.prepare_cached(
                "INSERT OR IGNORE INTO updates (update_id, body) VALUES (?1, ?2)",
            )?;
            let mut place =
                tx.prepare_cached("INSERT OR REPLACE INTO pushed (id, after) VALUES (?1, ?2)")?;
            for event in events {
                debug_assert!(event.id < 0, "pushed ids are negative (rule 8)");
                lowest = Some(lowest.map_or(event.id, |l| l.min(event.id)));
                if handled_early.contains(&event.id) {
                    early.push(event.id);
                    continue;
                }
                stored += insert.execute(params![event.id, event.body])?;
                place.execute(params![event.id, event.after])?;
            }
            if let Some(lowest) = lowest {
                set_meta(tx, "pushed", lowest)?;
            }
            Ok(())
        })?;
        for id in early {
            self.handled_early.remove(&id);
        }
        metrics().journal_entries.add(stored as i64);
        Ok(())
    }

    /// The highest update_id a polling append stored (rule 12).
    pub fn polled(&self) -> Result<Option<i64>, JournalError> {
        self.meta("polled")
    }

    /// Whether a webhook delivered updates within [`SEEN_FOR`] (rule 11):
    /// Telegram may then still hold one whose id is below the watermark, so
    /// polling tells new from seen by the `seen` table until it is past them.
    pub fn webhook_seen(&self) -> Result<bool, JournalError> {
        self.conn
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM seen)")
            .and_then(|mut any| any.query_row([], |r| r.get(0)))
            .map_err(|e| self.err(e))
    }

    /// Rule 11: stores the updates a webhook delivered whose ids were not seen before,
    /// durably, and returns their ids.
    pub fn append_webhook(&mut self, batch: &[(i64, String)]) -> Result<Vec<i64>, JournalError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.append_webhook_at(batch, now)
    }

    fn append_webhook_at(
        &mut self,
        batch: &[(i64, String)],
        now: u64,
    ) -> Result<Vec<i64>, JournalError> {
        let prune = now.saturating_sub(self.pruned_at) >= PRUNE_EVERY.as_secs();
        let mut fresh = Vec::with_capacity(batch.len());
        let mut watermark = self.watermark;
        let written = self.durably(|tx| {
            if prune {
                tx.prepare_cached("DELETE FROM seen WHERE at < ?1")?
                    .execute(params![now.saturating_sub(SEEN_FOR.as_secs())])?;
            }
            let mut see =
                tx.prepare_cached("INSERT OR IGNORE INTO seen (update_id, at) VALUES (?1, ?2)")?;
            let mut insert = tx.prepare_cached(
                "INSERT OR IGNORE INTO updates (update_id, body) VALUES (?1, ?2)",
            )?;
            for (id, body) in batch {
                if see.execute(params![id, now])? == 0 {
                    continue;
                }
                insert.execute(params![id, body])?;
                fresh.push(*id);
            }
            let highest = fresh.iter().copied().max();
            if let Some(w) = highest.filter(|h| watermark.is_none_or(|w| *h > w)) {
                set_meta(tx, "watermark", w)?;
                watermark = Some(w);
            }
            Ok(())
        });
        self.moved_watermark(&written, watermark);
        self.settle(written, batch, &mut fresh)?;
        if prune {
            self.pruned_at = now;
        }
        metrics().journal_entries.add(fresh.len() as i64);
        Ok(fresh)
    }

    /// Runs `f` in one transaction that does not wait for the disk (see
    /// the module doc); appends do (`Journal::durably`).
    fn unsynced<T>(
        &mut self,
        f: impl FnOnce(&Tx<'_>) -> rusqlite::Result<T>,
    ) -> Result<T, JournalError> {
        self.write(f).map_err(|e| self.err(e))
    }

    /// Every write transaction of the journal: runs `f` in one, and counts
    /// it, committed or not, for the checkpointer.
    fn write<T>(&self, f: impl FnOnce(&Tx<'_>) -> rusqlite::Result<T>) -> rusqlite::Result<T> {
        let result = Tx::run(&self.conn, f);
        if let Some(c) = &self.checkpointer {
            c.wrote();
        }
        result
    }

    /// Stores `calls` in the outbox, marks `sent` calls (rule 6) and forgets
    /// `handled` updates, in one transaction and in that order (rule 5): a
    /// call may be answered before its row was ever written, and then both
    /// come in the same batch. Such a call is written as sent at once, and
    /// not at all when its cause is in `handled` too (or it has none): a row
    /// written, marked and forgotten in one transaction is no row.
    pub fn record(
        &mut self,
        calls: &[NewCall],
        handled: &[i64],
        sent: &[SentCall],
    ) -> Result<(), JournalError> {
        // Which of `sent` answer a call of this batch, and whether its cause
        // is handled by it; built only when both can meet.
        let (answers, done): (HashMap<i64, &SentCall>, HashSet<i64>) =
            if calls.is_empty() || sent.is_empty() {
                Default::default()
            } else {
                (
                    sent.iter().map(|s| (s.id, s)).collect(),
                    handled.iter().copied().collect(),
                )
            };
        // Taken out for the transaction; causes whose rows it deletes leave
        // it only once it committed.
        let mut with_rows = std::mem::take(&mut self.with_rows);
        let mut cleared = Vec::new();
        let written = self.unsynced(|tx| {
            // The answers written with their calls' rows (or as their absence).
            let mut paired = HashSet::default();
            {
                let mut insert = tx.prepare_cached(
                    "INSERT INTO outbox (id, cause, ordinal, method, params) VALUES (?1, ?2, ?3, ?4, ?5)",
                )?;
                for call in calls {
                    let Some(answer) = answers.get(&call.id) else {
                        with_rows.extend(call.cause);
                        insert.execute(params![
                            call.id,
                            call.cause,
                            call.ordinal,
                            call.method,
                            call.params
                        ])?;
                        continue;
                    };
                    paired.insert(call.id);
                    if call.cause.is_none_or(|c| done.contains(&c)) {
                        continue;
                    }
                    // Rule 6 as `mark_sent` applies it: kept only while its
                    // cause may be delivered again.
                    with_rows.extend(call.cause);
                    tx.prepare_cached(
                        "INSERT INTO outbox (id, cause, ordinal, method, params, sent, outcome)
                         SELECT ?1, ?2, ?3, ?4, ?5, 1, ?6
                         WHERE EXISTS (SELECT 1 FROM updates WHERE update_id = ?2)",
                    )?
                    .execute(params![
                        call.id,
                        call.cause,
                        call.ordinal,
                        call.method,
                        call.params,
                        answer.outcome.as_ref().map(Value::to_string)
                    ])?;
                }
            }
            if paired.len() < sent.len() {
                mark_sent(tx, sent.iter().filter(|s| !paired.contains(&s.id)))?;
            }
            let (mut deleted, mut missing) = (0, Vec::new());
            {
                let mut forget = tx.prepare_cached("DELETE FROM updates WHERE update_id = ?1")?;
                let mut answered =
                    tx.prepare_cached("DELETE FROM outbox WHERE cause = ?1 AND sent = 1")?;
                let mut unplace = tx.prepare_cached("DELETE FROM pushed WHERE id = ?1")?;
                for id in handled {
                    match forget.execute(params![id])? {
                        0 => missing.push(*id),
                        n => deleted += n,
                    }
                    if with_rows.contains(id) {
                        answered.execute(params![id])?;
                        cleared.push(*id);
                    }
                    if *id < 0 {
                        unplace.execute(params![id])?;
                    }
                }
            }
            Ok((deleted, missing))
        });
        if written.is_ok() {
            for id in &cleared {
                with_rows.remove(id);
            }
        }
        self.with_rows = with_rows;
        let (deleted, missing) = written?;
        metrics().journal_entries.add(-(deleted as i64));
        if !missing.is_empty() {
            // Above the watermark (below the lowest pushed id, rule 10): its
            // store has not been written yet.
            let watermark = self.watermark;
            let pushed = self.pushed_through()?;
            self.handled_early.extend(missing.into_iter().filter(|id| {
                if *id < 0 {
                    pushed.is_none_or(|p| *id < p)
                } else {
                    watermark.is_none_or(|w| *id > w)
                }
            }));
        }
        Ok(())
    }

    /// What the outbox holds after a restart (rule 7).
    pub fn recover(&mut self) -> Result<Recovered, JournalError> {
        self.unsynced(|tx| {
            tx.execute_batch(
                "DELETE FROM outbox WHERE sent = 0
                     AND cause IN (SELECT update_id FROM updates);
                 DELETE FROM outbox WHERE sent = 1
                     AND (cause IS NULL OR cause NOT IN (SELECT update_id FROM updates));",
            )?;
            let mut resend = Vec::new();
            {
                let mut stmt = tx.prepare(
                    "SELECT id, cause, ordinal, method, params FROM outbox
                     WHERE sent = 0 ORDER BY id",
                )?;
                let mut rows = stmt.query([])?;
                while let Some(row) = rows.next()? {
                    let id: i64 = row.get(0)?;
                    let params: String = row.get(4)?;
                    let Ok(params) = Params::from_json(&params) else {
                        log::error!("journal: outbox call {id} cannot be read back; skipped");
                        continue;
                    };
                    resend.push(StoredCall {
                        id,
                        cause: row.get(1)?,
                        ordinal: row.get(2)?,
                        method: row.get(3)?,
                        params,
                    });
                }
            }
            let mut answered = Vec::new();
            {
                let mut stmt =
                    tx.prepare("SELECT cause, ordinal, outcome FROM outbox WHERE sent = 1")?;
                let mut rows = stmt.query([])?;
                while let Some(row) = rows.next()? {
                    let outcome: Option<String> = row.get(2)?;
                    answered.push(Answered {
                        cause: row.get(0)?,
                        ordinal: row.get(1)?,
                        outcome: outcome.and_then(|o| serde_json::from_str(&o).ok()),
                    });
                }
            }
            let next_id = tx.query_row("SELECT COALESCE(MAX(id), 0) + 1 FROM outbox", [], |r| {
                r.get(0)
            })?;
            Ok(Recovered {
                resend,
                answered,
                next_id,
            })
        })
    }

    /// Every update not yet handled, oldest first (rule 4), each pushed
    /// event in its place (rule 9).
    pub fn pending(&self) -> Result<Vec<(i64, String)>, JournalError> {
        // A pushed event sorts by the update it came after (none: first),
        // behind that update, and after the pushed events before it (whose
        // ids are higher).
        let mut stmt = self
            .conn
            .prepare(
                "SELECT u.update_id, u.body FROM updates u
                 LEFT JOIN pushed p ON p.id = u.update_id
                 ORDER BY CASE WHEN u.update_id < 0 THEN p.after ELSE u.update_id END,
                          u.update_id < 0, -u.update_id",
            )
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

/// A call to store in the outbox.
pub struct NewCall {
    /// Its row id, given by the Outbox (from [`Recovered::next_id`] on), so
    /// that the call can go before its row is written.
    pub id: i64,
    /// The update whose handling made it; `None` when the app had none in
    /// hand (lifespan, a background task).
    pub cause: Option<i64>,
    pub ordinal: u32,
    pub method: String,
    /// The parameters, encoded as JSON.
    pub params: String,
}

/// A pushed event to store (rules 8 and 9).
#[derive(Clone, Debug)]
pub struct NewPushed {
    /// Negative.
    pub id: i64,
    /// The highest update_id dispatched before it; `None`: none yet.
    pub after: Option<i64>,
    /// What [`Journal::pending`] gives back for it.
    pub body: String,
}

/// A stored call Telegram answered, with the outcome when the app asked for
/// it (a repeat of the call gets the same answer).
pub struct SentCall {
    pub id: i64,
    pub outcome: Option<Value>,
}

/// A stored call not yet answered, to be sent again after a restart.
#[derive(Debug, PartialEq)]
pub struct StoredCall {
    pub id: i64,
    pub cause: Option<i64>,
    pub ordinal: u32,
    pub method: String,
    pub params: Params,
}

/// A call of a not yet handled update that Telegram answered: delivering
/// that update again must not make it twice.
#[derive(Debug, PartialEq)]
pub struct Answered {
    pub cause: i64,
    pub ordinal: u32,
    pub outcome: Option<Value>,
}

/// The outbox after a restart (rule 7).
#[derive(Debug, Default)]
pub struct Recovered {
    pub resend: Vec<StoredCall>,
    pub answered: Vec<Answered>,
    /// The first row id no stored call has.
    pub next_id: i64,
}

/// Rule 2: whether update `id`, fetched with offset `fetched_with`, is new;
/// if so the watermark moves to it.
pub fn admit(watermark: &mut Option<i64>, id: i64, fetched_with: Option<i64>) -> bool {
    let seen = watermark.is_some_and(|w| id <= w) && fetched_with.is_none_or(|o| id >= o);
    if seen {
        return false;
    }
    // After a sequence restart the new, lower ids set the mark.
    *watermark = Some(match *watermark {
        Some(w) if fetched_with.is_none_or(|o| w >= o) => w.max(id),
        _ => id,
    });
    true
}

/// A value `meta` keeps, if set. Cached, and read inside the transaction
/// that goes on to write: at one update per commit, preparing it was a
/// tenth of an append, and a read transaction of its own half as much again.
fn meta(conn: &Connection, key: &str) -> rusqlite::Result<Option<i64>> {
    conn.prepare_cached("SELECT value FROM meta WHERE key = ?1")?
        .query_row(params![key], |r| r.get(0))
        .optional()
}

/// The updates that have rows in `outbox` (`Journal::with_rows`).
fn causes_with_rows(conn: &Connection) -> rusqlite::Result<HashSet<i64>> {
    let mut stmt = conn.prepare("SELECT DISTINCT cause FROM outbox WHERE cause IS NOT NULL")?;
    let causes = stmt.query_map([], |r| r.get(0))?;
    causes.collect()
}

fn set_meta(conn: &Connection, key: &str, value: i64) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO meta (key, value) VALUES (?1, ?2)
         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
    )?
    .execute(params![key, value])
    .map(drop)
}

/// Write transactions between two of the checkpointer's checkpoints: about
/// 96 WAL frames, at the 1.5 per transaction the journal writes when each
/// update comes alone. A frame added to the WAL walks past the earlier
/// frames of its page in the WAL index (`walIndexAppend`), and the journal
/// writes its few pages again and again, so a WAL that starts over sooner
/// is cheaper to append to; each checkpoint costs two syncs, on the
/// checkpointer's thread.
const CHECKPOINT_EVERY: u32 = 64;

/// A second connection, on a thread of its own, that runs passive
/// checkpoints, so that the journal's thread, which the next poll waits for
/// (rule 1), seldom copies the WAL into the database and syncs both, as
/// SQLite's automatic checkpoint does inside the commit that takes the WAL
/// past 1,000 frames. That one stays on: a passive checkpoint never waits
/// for the writer, and while appends come back to back (a burst) the WAL
/// cannot start over behind them, so SQLite's own is what bounds it then.
struct Checkpointer {
    /// Dropped to end the thread.
    wake: Option<mpsc::SyncSender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    writes: Cell<u32>,
}

impl Checkpointer {
    /// `None`, with one log line, if its connection or thread cannot start.
    fn start(path: &Path) -> Option<Checkpointer> {
        let started = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .and_then(|conn| {
            conn.execute_batch("PRAGMA synchronous = NORMAL")?;
            Ok(conn)
        })
        .map_err(|e| sqlite_err(path, e).to_string())
        .and_then(|conn| {
            let (wake, woken) = mpsc::sync_channel(1);
            std::thread::Builder::new()
                .name("journal-checkpoints".into())
                .spawn(move || checkpoint_when_woken(&conn, &woken))
                .map(|thread| (wake, thread))
                .map_err(|e| format!("starting its thread: {e}"))
        });
        match started {
            Ok((wake, thread)) => Some(Checkpointer {
                wake: Some(wake),
                thread: Some(thread),
                writes: Cell::new(0),
            }),
            Err(e) => {
                log::warn!(
                    "journal: no checkpoint thread ({e}); SQLite checkpoints inside commits instead"
                );
                None
            }
        }
    }

    fn wrote(&self) {
        let writes = self.writes.get().wrapping_add(1);
        self.writes.set(writes);
        if writes % CHECKPOINT_EVERY == 0 {
            if let Some(wake) = &self.wake {
                // Full: a wake-up is pending already, which covers this one.
                let _ = wake.try_send(());
            }
        }
    }
}

impl Drop for Checkpointer {
    /// Waits for the thread, so that its connection is closed before the
    /// journal's: the last connection to close checkpoints the whole WAL
    /// and removes it, which must be done by the time `Journal::open` may
    /// look at the files again.
    fn drop(&mut self) {
        drop(self.wake.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn checkpoint_when_woken(conn: &Connection, woken: &mpsc::Receiver<()>) {
    let mut failing = false;
    while woken.recv().is_ok() {
        match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(0)) {
            Ok(_) if failing => {
                failing = false;
                log::info!("journal: checkpoints on their own thread work again");
            }
            Ok(_) => {}
            // Once until one works: it may fail at every wake-up.
            Err(e) if !failing => {
                failing = true;
                log::warn!(
                    "journal: a checkpoint on its own thread failed ({e}); SQLite's own, inside commits, go on"
                );
            }
            Err(_) => {}
        }
    }
}

/// The `sqlite3_file` SQLite has open for `conn`'s WAL (its documented
/// `SQLITE_FCNTL_JOURNAL_POINTER`), if open: none outside WAL mode.
fn wal_file(conn: &Connection) -> Option<*mut rusqlite::ffi::sqlite3_file> {
    let mut file: *mut rusqlite::ffi::sqlite3_file = std::ptr::null_mut();
    // SAFETY: the handle is this connection's, used by the thread that has
    // the connection (a `Connection` is not `Sync`); JOURNAL_POINTER writes
    // one pointer, to a file the connection keeps while it is open.
    let rc = unsafe {
        rusqlite::ffi::sqlite3_file_control(
            conn.handle(),
            c"main".as_ptr(),
            rusqlite::ffi::SQLITE_FCNTL_JOURNAL_POINTER,
            (&raw mut file).cast(),
        )
    };
    // SAFETY: a non-null pointer from SQLite is a live `sqlite3_file`, whose
    // `pMethods` is null only while it is not open.
    (rc == rusqlite::ffi::SQLITE_OK && !file.is_null() && unsafe { !(*file).pMethods.is_null() })
        .then_some(file)
}

/// How an append's transaction failed to be durable.
enum NotDurable {
    /// Rolled back: nothing of it was written.
    RolledBack(JournalError),
    /// Committed, but the WAL's sync after it failed: written, not known to
    /// be on disk.
    Unsynced(JournalError),
}

impl From<NotDurable> for JournalError {
    fn from(e: NotDurable) -> JournalError {
        match e {
            NotDurable::RolledBack(e) | NotDurable::Unsynced(e) => e,
        }
    }
}

/// A write transaction begun and committed by cached statements. rusqlite's
/// own `Transaction` prepares "BEGIN" and "COMMIT" anew each time, about 2,000
/// instructions apiece: at one update per commit, a tenth of what the
/// journal spends on it.
struct Tx<'c> {
    conn: &'c Connection,
    committed: bool,
}

impl Tx<'_> {
    /// `f` within one transaction on `conn`, committed if it succeeds and
    /// rolled back if it fails or panics.
    fn run<T>(
        conn: &Connection,
        f: impl FnOnce(&Tx<'_>) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        // IMMEDIATE: the write lock is taken here, where SQLite waits for
        // another writer (busy_timeout). A deferred transaction that reads
        // first and writes after gets SQLITE_BUSY at once
        // when another connection holds the lock: SQLite never waits to
        // turn a read into a write.
        conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
        let mut tx = Tx {
            conn,
            committed: false,
        };
        let value = f(&tx)?;
        conn.prepare_cached("COMMIT")?.execute([])?;
        tx.committed = true;
        Ok(value)
    }
}

impl std::ops::Deref for Tx<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        self.conn
    }
}

impl Drop for Tx<'_> {
    fn drop(&mut self) {
        // A failed COMMIT (busy, disk full) leaves the transaction open too.
        if !self.committed && !self.conn.is_autocommit() {
            if let Err(e) = self.conn.execute_batch("ROLLBACK") {
                log::error!("journal: rolling back a failed transaction failed: {e}");
            }
        }
    }
}

/// Rule 6: a sent call whose cause is handled (or that has none) is
/// forgotten; otherwise it is kept, marked, to recognise a repeat.
fn mark_sent<'a>(
    tx: &Connection,
    sent: impl Iterator<Item = &'a SentCall>,
) -> rusqlite::Result<()> {
    let mut forget = tx.prepare_cached(
        "DELETE FROM outbox WHERE id = ?1
             AND (cause IS NULL OR cause NOT IN (SELECT update_id FROM updates))",
    )?;
    let mut mark = tx.prepare_cached("UPDATE outbox SET sent = 1, outcome = ?2 WHERE id = ?1")?;
    for call in sent {
        if forget.execute(params![call.id])? == 0 {
            let outcome = call.outcome.as_ref().map(Value::to_string);
            mark.execute(params![call.id, outcome])?;
        }
    }
    Ok(())
}

/// The journal holds users' messages: a directory asgigramd creates is
/// 0700 (parents it creates too). One that exists is the operator's
/// (`journal.dir`, systemd's `$STATE_DIRECTORY`) and stays as it is; if
/// other users may look into it, one line says so.
fn prepare_dir(dir: &Path) -> Result<(), JournalError> {
    let dir_err = |reason: String| JournalError::Dir {
        path: dir.to_path_buf(),
        reason,
    };
    match fs::metadata(dir) {
        Ok(meta) if !meta.is_dir() => Err(dir_err("it exists and is not a directory".into())),
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                log::warn!(
                    "journal: directory {} has mode {mode:04o}: other users can look into it \
                     (the journal's files are 0600); asgigramd leaves a directory it did not \
                     create as it is: chmod 700 it (systemd: StateDirectoryMode=0700)",
                    dir.display()
                );
            }
            Ok(())
        }
        Err(e) if e.kind() == ErrorKind::NotFound => DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| dir_err(e.to_string())),
        Err(e) => Err(dir_err(e.to_string())),
    }
}

/// What `--reset-journal` did with a damaged journal.
#[derive(Debug)]
pub struct Reset {
    /// What was wrong with it.
    pub what: String,
    /// Each file, and the name it has now.
    pub moved: Vec<(PathBuf, PathBuf)>,
}

/// `--reset-journal`: if the journal `<dir>/<name>.sqlite3` is damaged,
/// renames its files `<file>.damaged-<UTC time>` (never deletes them), so
/// that the next [`Journal::open`] starts an empty one. An intact journal,
/// or none, is left alone: `None`.
pub fn reset_if_damaged(dir: &Path, name: &str) -> Result<Option<Reset>, JournalError> {
    let files = Files::new(dir, name);
    let checked = files.check().and_then(|()| {
        if !files.db.exists() {
            return Ok(());
        }
        let conn = Connection::open(&files.db).map_err(|e| sqlite_err(&files.db, e))?;
        files.verify(&conn)
    });
    match checked {
        Ok(()) => Ok(None),
        Err(JournalError::Damaged { what, .. }) => {
            let moved = files.move_aside(&utc_stamp(SystemTime::now()))?;
            Ok(Some(Reset { what, moved }))
        }
        Err(e) => Err(e),
    }
}

/// Bytes in a WAL header (SQLite's wal.c): eight big-endian words: magic,
/// format version, page size, checkpoint sequence, two salts, checksum.
const WAL_HEADER: usize = 32;
const WAL_MAGIC: u32 = 0x377f_0682;
const WAL_VERSION: u32 = 3_007_000;

/// A journal's files. SQLite names the WAL and its index after the
/// database: `<db>-wal`, `<db>-shm`.
///
/// SQLite repairs some damage without a word, losing what the journal held:
/// a WAL whose header it rejects is treated as empty and overwritten by the
/// next write; a WAL next to an empty database file is deleted; an empty
/// database file is a new database. [`Files::check`] looks for those before
/// SQLite opens anything, since opening would already repair them.
/// [`Files::verify`] then lets SQLite check the rest (a truncated or
/// overwritten database file). Damage inside the WAL's frames is not
/// looked for: SQLite ends the WAL at the first frame that does not check
/// out, which is also what a transaction cut short by a crash looks like,
/// and discarding that one is right.
struct Files {
    dir: PathBuf,
    db: PathBuf,
    wal: PathBuf,
    shm: PathBuf,
}

impl Files {
    fn new(dir: &Path, name: &str) -> Files {
        let db = dir.join(format!("{name}.sqlite3"));
        Files {
            dir: dir.to_path_buf(),
            wal: suffixed(&db, "-wal"),
            shm: suffixed(&db, "-shm"),
            db,
        }
    }

    fn damaged(&self, what: String) -> JournalError {
        // The files with something in them: opening the journal to check it
        // may have created an empty WAL.
        let wal = fs::metadata(&self.wal).is_ok_and(|m| m.len() > 0);
        let mut files = Vec::new();
        if self.db.exists() {
            files.push(self.db.clone());
        }
        if wal {
            files.push(self.wal.clone());
        }
        JournalError::Damaged {
            path: self.db.clone(),
            what,
            files,
        }
    }

    /// The damage SQLite would repair silently (see [`Files`]).
    fn check(&self) -> Result<(), JournalError> {
        let db = size(&self.db)?;
        let wal = size(&self.wal)?.unwrap_or(0);
        if wal > 0 {
            match db {
                None => {
                    return Err(self.damaged(format!(
                        "the database file is missing while its WAL holds {wal} bytes"
                    )))
                }
                Some(0) => {
                    return Err(self.damaged(format!(
                        "the database file is empty (0 bytes) while its WAL holds {wal} bytes, \
                         which SQLite would delete"
                    )))
                }
                Some(_) => {}
            }
            let mut header = Vec::with_capacity(WAL_HEADER);
            fs::File::open(&self.wal)
                .and_then(|f| f.take(WAL_HEADER as u64).read_to_end(&mut header))
                .map_err(|e| file_err(&self.wal, e))?;
            if let Some(problem) = wal_header_problem(&header) {
                return Err(self.damaged(format!(
                    "its WAL ({wal} bytes) has a header SQLite rejects ({problem}): SQLite would \
                     discard it without a word, and with it every update written since the \
                     last checkpoint"
                )));
            }
        }
        if db == Some(0) {
            return Err(self.damaged(
                "the database file is empty (0 bytes): it was truncated, since asgigramd \
                 creates a journal whole or not at all"
                    .into(),
            ));
        }
        Ok(())
    }

    /// SQLite's integrity check, on a connection that leaves a damaged
    /// journal as it found it: closing it neither copies the WAL into the
    /// database file nor deletes the WAL.
    fn verify(&self, conn: &Connection) -> Result<(), JournalError> {
        let err = |e| sqlite_err(&self.db, e);
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)
            .map_err(err)?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(err)?;
        let found = conn
            .prepare("PRAGMA integrity_check(3)")
            .and_then(|mut check| {
                check
                    .query_map([], |r| r.get::<_, String>(0))?
                    .collect::<Result<Vec<_>, _>>()
            });
        match found {
            Ok(found) if found == ["ok"] => {}
            Ok(found) => {
                return Err(self.damaged(format!(
                    "SQLite's integrity check found: {}",
                    found.join("; ").replace('\n', " ")
                )))
            }
            Err(e)
                if matches!(
                    e.sqlite_error_code(),
                    Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase)
                ) =>
            {
                return Err(self.damaged(format!("SQLite reports: {e}")))
            }
            Err(e) => return Err(err(e)),
        }
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, false)
            .map_err(err)?;
        Ok(())
    }

    /// A new journal is written whole under a temporary name and renamed
    /// into place: a journal file that exists was complete once, so an empty
    /// one was truncated ([`Files::check`]). It is created 0600, and SQLite
    /// gives the -wal and -shm it creates later the database file's mode.
    fn create(&self) -> Result<(), JournalError> {
        let tmp = suffixed(&self.db, ".new");
        // Leftovers of a creation cut short: they never held an update.
        for leftover in [
            tmp.clone(),
            suffixed(&tmp, "-journal"),
            suffixed(&tmp, "-wal"),
            suffixed(&tmp, "-shm"),
        ] {
            match fs::remove_file(&leftover) {
                Err(e) if e.kind() != ErrorKind::NotFound => return Err(file_err(&leftover, e)),
                _ => {}
            }
        }
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| file_err(&tmp, e))?;
        let conn = Connection::open(&tmp).map_err(|e| sqlite_err(&tmp, e))?;
        // The schema goes straight into the file (rollback journal); WAL
        // mode last, which only sets a flag in the file's header.
        conn.execute_batch(&format!(
            "BEGIN; {SCHEMA} COMMIT; PRAGMA journal_mode = WAL;"
        ))
        .map_err(|e| sqlite_err(&tmp, e))?;
        conn.close().map_err(|(_, e)| sqlite_err(&tmp, e))?;
        fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| file_err(&tmp, e))?;
        fs::rename(&tmp, &self.db).map_err(|e| file_err(&self.db, e))?;
        sync_dir(&self.dir)
    }

    /// Files an older version (or a copy) left readable by others are made
    /// 0600, in one line.
    fn make_private(&self) {
        let (mut fixed, mut failed) = (Vec::new(), Vec::new());
        for path in [&self.db, &self.wal, &self.shm] {
            let Ok(meta) = fs::metadata(path) else {
                continue;
            };
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 == 0 {
                continue;
            }
            match fs::set_permissions(path, fs::Permissions::from_mode(0o600)) {
                Ok(()) => fixed.push(format!("{} (was {mode:04o})", path.display())),
                Err(e) => failed.push(format!("{} ({mode:04o}: {e})", path.display())),
            }
        }
        if !fixed.is_empty() {
            log::warn!(
                "journal: other users could read {}; made private (0600)",
                fixed.join(", ")
            );
        }
        if !failed.is_empty() {
            log::warn!(
                "journal: other users can read {}; chmod 600 them",
                failed.join(", ")
            );
        }
    }

    /// Renames every file the journal has `<file>.damaged-<stamp>` (with a
    /// counter if that exists), never over another file.
    fn move_aside(&self, stamp: &str) -> Result<Vec<(PathBuf, PathBuf)>, JournalError> {
        let mut moved = Vec::new();
        for from in [&self.db, &self.wal, &self.shm] {
            if fs::symlink_metadata(from).is_err() {
                continue;
            }
            let base = suffixed(from, &format!(".damaged-{stamp}"));
            let to = (0u32..)
                .map(|n| match n {
                    0 => base.clone(),
                    n => suffixed(&base, &format!(".{n}")),
                })
                .find(|p| fs::symlink_metadata(p).is_err())
                .expect("one of 2^32 names is free");
            fs::rename(from, &to).map_err(|e| file_err(from, e))?;
            moved.push((from.clone(), to));
        }
        sync_dir(&self.dir)?;
        Ok(moved)
    }
}

/// `path` with `suffix` appended to its file name.
fn suffixed(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// The file's length; `None` if there is none.
fn size(path: &Path) -> Result<Option<u64>, JournalError> {
    match fs::metadata(path) {
        Ok(meta) => Ok(Some(meta.len())),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(file_err(path, e)),
    }
}

/// Makes a rename in `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), JournalError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| file_err(dir, e))
}

/// Why SQLite would reject a WAL header (wal.c, `walIndexRecover`), which
/// makes it treat the whole WAL as empty; `None` if it would not.
fn wal_header_problem(header: &[u8]) -> Option<String> {
    if header.len() < WAL_HEADER {
        return Some(format!("{} of its {WAL_HEADER} bytes", header.len()));
    }
    if header.iter().all(|&b| b == 0) {
        return Some("all zeros".into());
    }
    let word = |i: usize| {
        u32::from_be_bytes(
            header[i..i + 4]
                .try_into()
                .expect("4 bytes of the 32 checked above"),
        )
    };
    if word(0) & !1 != WAL_MAGIC {
        return Some("no WAL magic number".into());
    }
    let page_size = word(8);
    if !page_size.is_power_of_two() || !(512..=65536).contains(&page_size) {
        return Some(format!("page size {page_size}"));
    }
    // The magic number's low bit says in which byte order the checksums
    // read the words.
    if wal_checksum(word(0) & 1 == 1, &header[..24]) != (word(24), word(28)) {
        return Some("its checksum does not match".into());
    }
    if word(4) != WAL_VERSION {
        return Some(format!("format version {}", word(4)));
    }
    None
}

/// SQLite's WAL checksum (wal.c, `walChecksumBytes`) over whole 8-byte pairs.
fn wal_checksum(big_endian: bool, data: &[u8]) -> (u32, u32) {
    let word = |b: &[u8]| {
        let b: [u8; 4] = b.try_into().expect("chunks of 4");
        if big_endian {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        }
    };
    let (mut s1, mut s2) = (0u32, 0u32);
    for pair in data.chunks_exact(8) {
        s1 = s1.wrapping_add(word(&pair[..4])).wrapping_add(s2);
        s2 = s2.wrapping_add(word(&pair[4..])).wrapping_add(s1);
    }
    (s1, s2)
}

/// `20240131T235959Z`: a UTC time for a file name, sortable, no colons.
fn utc_stamp(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// The proleptic Gregorian date `z` days after 1970-01-01 (Howard
/// Hinnant's `civil_from_days`); no date crate for one file name.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m as u32, d as u32)
}

fn file_err(path: &Path, e: std::io::Error) -> JournalError {
    JournalError::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

fn sqlite_err(path: &Path, e: rusqlite::Error) -> JournalError {
    JournalError::Sqlite {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Makes the calling thread (the journal's) `SCHED_BATCH`: it no longer
/// preempts the thread that wakes it.
///
/// The Poller wakes the journal thread with each batch, just before the
/// batch's events go to the workers. Linux tends to run a woken thread on
/// the waker's CPU, at once: the journal's SQLite work then ran first, and
/// the events reached the workers about 100 us later, a fifth of the
/// daemon's whole added latency at 200 updates/s (docs/performance.md).
/// Nothing waits on the journal that cannot wait that long. Failure (a
/// seccomp profile that denies it) only costs that latency.
pub fn yield_to_latency() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param for the duration of the call;
    // pid 0 is the calling thread, and SCHED_BATCH needs no privilege.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
    if rc != 0 {
        log::debug!(
            "journal thread: SCHED_BATCH refused ({}); it keeps the default policy",
            std::io::Error::last_os_error()
        );
    }
}

/// The journal on a thread of its own.
///
/// Owns: the SQLite connection and what it remembers (`handled_early`),
/// shared with the actor the `SyncArbiter` builds anew if this one panics.
/// Takes: [`Append`] from the Poller, `Record` from the Outbox, one at a
/// time in the order they were sent (rule 1 relies on it).
/// Sends: nothing; each answer says whether the write happened, and a failed
/// one is the sender's to retry.
/// Stops: with the System.
pub struct JournalActor(pub Arc<Mutex<Journal>>);

impl JournalActor {
    pub(crate) fn journal(&self) -> std::sync::MutexGuard<'_, Journal> {
        // A panic while holding the lock leaves the connection usable:
        // SQLite rolls back an unfinished transaction.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Actor for JournalActor {
    type Context = SyncContext<Self>;
}

/// Store a batch fetched with the given offset; answers with the ids that
/// are new. Shared, so that a failed store can be sent again as it was.
#[derive(Message, Clone)]
#[rtype(result = "Result<Vec<i64>, JournalError>")]
pub struct Append {
    pub batch: Arc<[(i64, String)]>,
    pub fetched_with: Option<i64>,
    /// Delivered by a webhook rather than fetched: rule 11 tells what is new,
    /// and `fetched_with` is not looked at.
    pub by_webhook: bool,
}

impl Handler<Append> for JournalActor {
    type Result = Result<Vec<i64>, JournalError>;
    fn handle(&mut self, msg: Append, _: &mut SyncContext<Self>) -> Self::Result {
        if msg.by_webhook {
            self.journal().append_webhook(&msg.batch)
        } else {
            self.journal().append(&msg.batch, msg.fetched_with)
        }
    }
}

/// Store pushed events; answers once they are durable. A failed store
/// comes back whole, for the sender to send again.
#[derive(Message)]
#[rtype(result = "Result<(), NotStored>")]
pub struct StorePushed(pub Vec<NewPushed>);

/// Why [`StorePushed`] failed, and what it was to store.
pub struct NotStored {
    pub error: JournalError,
    pub events: Vec<NewPushed>,
}

impl Handler<StorePushed> for JournalActor {
    type Result = Result<(), NotStored>;
    fn handle(&mut self, msg: StorePushed, _: &mut SyncContext<Self>) -> Self::Result {
        self.journal()
            .store_pushed(&msg.0)
            .map_err(|error| NotStored {
                error,
                events: msg.0,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Map;

    fn batch(ids: &[i64]) -> Vec<(i64, String)> {
        ids.iter()
            .map(|i| (*i, format!("{{\"update_id\":{i}}}")))
            .collect()
    }

    #[test]
    fn polling_keeps_how_far_it_stored_and_the_webhook_does_not_move_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path(), "j").unwrap();
        assert_eq!(j.polled().unwrap(), None);
        assert!(!j.webhook_seen().unwrap());
        j.append(&batch(&[5, 6]), None).unwrap();
        assert_eq!(j.polled().unwrap(), Some(6));
        j.append_webhook(&batch(&[9])).unwrap();
        assert_eq!(j.polled().unwrap(), Some(6));
        assert!(j.webhook_seen().unwrap());
        // A resent batch stores nothing and leaves the mark where it was.
        j.append(&batch(&[5, 6]), Some(5)).unwrap();
        assert_eq!(j.polled().unwrap(), Some(6));
        // Handled before its store was written: not stored, but polled.
        j.record(&[], &[10], &[]).unwrap();
        assert_eq!(j.handled_early, HashSet::from_iter([10]));
        assert!(j.append(&batch(&[10]), Some(7)).unwrap().is_empty());
        assert_eq!(j.polled().unwrap(), Some(10));
    }

    #[test]
    fn updates_a_webhook_delivered_are_stored_once_in_any_order_and_remembered_a_day() {
        let dir = tempfile::tempdir().unwrap();
        let day = 1_000_000;
        {
            let mut j = Journal::open(dir.path(), "j").unwrap();
            j.append(&batch(&[5]), None).unwrap();
            // Out of order, below the watermark: new all the same.
            assert_eq!(
                j.append_webhook_at(&batch(&[9, 7]), day).unwrap(),
                vec![9, 7]
            );
            assert_eq!(j.append_webhook_at(&batch(&[8, 7]), day).unwrap(), vec![8]);
            assert_eq!(j.watermark(), Some(9));
            // Handled ones are still recognised when Telegram sends them again.
            j.record(&[], &[7, 8], &[]).unwrap();
            assert_eq!(
                j.append_webhook_at(&batch(&[7, 8, 6]), day).unwrap(),
                vec![6]
            );
            assert_eq!(j.watermark(), Some(9), "a lower id keeps the mark");
        }
        let mut j = Journal::open(dir.path(), "j").unwrap();
        let ids: Vec<i64> = j.pending().unwrap().iter().map(|(id, _)| *id).collect();
        assert_eq!(ids, vec![5, 6, 9]);
        assert!(j
            .append_webhook_at(&batch(&[9]), day + 60)
            .unwrap()
            .is_empty());
        // After SEEN_FOR the ids are forgotten (Telegram has forgotten them).
        let later = day + SEEN_FOR.as_secs() + 120;
        assert_eq!(j.append_webhook_at(&batch(&[10]), later).unwrap(), vec![10]);
        assert_eq!(
            j.append_webhook_at(&batch(&[7]), later + 1).unwrap(),
            vec![7]
        );
    }

    #[test]
    fn appended_updates_survive_reopening_until_handled() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut j = Journal::open(dir.path(), "j").unwrap();
            assert_eq!(j.append(&batch(&[1, 2, 3]), None).unwrap(), vec![1, 2, 3]);
            j.record(&[], &[2], &[]).unwrap();
        }
        let j = Journal::open(dir.path(), "j").unwrap();
        let pending: Vec<i64> = j.pending().unwrap().into_iter().map(|(i, _)| i).collect();
        assert_eq!(pending, vec![1, 3]);
        assert_eq!(j.watermark(), Some(3));
    }

    #[test]
    fn an_id_seen_again_is_never_stored_twice_even_after_it_was_handled() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path(), "j").unwrap();
        j.append(&batch(&[10, 11]), None).unwrap();
        j.record(&[], &[10, 11], &[]).unwrap();
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
        assert_eq!(j.watermark(), Some(8));
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

    fn call(id: i64, cause: Option<i64>, ordinal: u32, params: &Map<String, Value>) -> NewCall {
        NewCall {
            id,
            cause,
            ordinal,
            method: "sendMessage".into(),
            params: Value::Object(params.clone()).to_string(),
        }
    }

    fn hi() -> Map<String, Value> {
        let params = serde_json::json!({"chat_id": 1, "text": "hi"});
        params.as_object().expect("an object literal").clone()
    }

    fn sent(id: i64) -> SentCall {
        SentCall { id, outcome: None }
    }

    #[test]
    fn calls_of_an_unhandled_update_are_made_again_by_its_redelivery_not_resent() {
        let dir = tempfile::tempdir().unwrap();
        let params = &hi();
        {
            let mut j = Journal::open(dir.path(), "j").unwrap();
            j.append(&batch(&[1]), None).unwrap();
            assert_eq!(j.recover().unwrap().next_id, 1, "an empty outbox");
            j.record(
                &[call(1, Some(1), 0, params), call(2, Some(1), 1, params)],
                &[],
                &[],
            )
            .unwrap();
            let answer = SentCall {
                id: 1,
                outcome: Some(serde_json::json!({"ok": true, "result": 7})),
            };
            j.record(&[], &[], &[answer]).unwrap();
            // Killed here: update 1 not handled, its second call unsent.
        }
        let mut j = Journal::open(dir.path(), "j").unwrap();
        let r = j.recover().unwrap();
        assert_eq!(r.resend, vec![], "update 1 is delivered again and makes it");
        assert_eq!(
            r.answered,
            vec![Answered {
                cause: 1,
                ordinal: 0,
                outcome: Some(serde_json::json!({"ok": true, "result": 7})),
            }],
            "the sent one recognises its repeat"
        );
        assert_eq!(r.next_id, 2, "new rows come after the one kept");
    }

    #[test]
    fn unsent_calls_of_a_handled_update_are_resent_and_sent_ones_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let params = &hi();
        let mut j = Journal::open(dir.path(), "j").unwrap();
        j.append(&batch(&[1, 2]), None).unwrap();
        j.record(
            &[call(1, Some(1), 0, params), call(2, Some(1), 1, params)],
            &[],
            &[],
        )
        .unwrap();
        j.record(&[], &[], &[sent(1)]).unwrap();
        // Handled in the same transaction as a call of the next update.
        j.record(&[call(3, None, 0, params)], &[1], &[]).unwrap();
        assert_eq!(j.len().unwrap(), 1, "update 2 is still pending");
        let r = j.recover().unwrap();
        let resend: Vec<_> = r
            .resend
            .iter()
            .map(|c| (c.id, c.cause, c.ordinal))
            .collect();
        assert_eq!(resend, vec![(2, Some(1), 1), (3, None, 0)]);
        assert_eq!(r.resend[0].params, Params::from_map(params));
        assert!(r.answered.is_empty());
        // Once sent, calls with a handled cause (or none) leave at once.
        j.record(&[], &[], &[sent(2), sent(3)]).unwrap();
        let r = j.recover().unwrap();
        assert!(r.resend.is_empty() && r.answered.is_empty(), "{r:?}");
    }

    #[test]
    fn a_call_answered_before_its_row_was_written_is_stored_sent() {
        let dir = tempfile::tempdir().unwrap();
        let params = &hi();
        let mut j = Journal::open(dir.path(), "j").unwrap();
        j.append(&batch(&[1, 2]), None).unwrap();
        let answer = SentCall {
            id: 5,
            outcome: Some(serde_json::json!({"ok": true, "result": 9})),
        };
        // Row, answer and (for update 2) handling, all in one batch.
        j.record(
            &[call(5, Some(1), 0, params), call(6, Some(2), 0, params)],
            &[2],
            &[answer, sent(6)],
        )
        .unwrap();
        let r = j.recover().unwrap();
        assert!(r.resend.is_empty(), "both were answered: {r:?}");
        assert_eq!(
            r.answered,
            vec![Answered {
                cause: 1,
                ordinal: 0,
                outcome: Some(serde_json::json!({"ok": true, "result": 9})),
            }],
            "update 1 may come again and must find its call made; update 2's is gone with it"
        );
    }

    /// Every outbox row the journal writes from now on, by id, in the
    /// connection's temporary schema (the journal's own is untouched).
    fn count_rows(j: &Journal) {
        j.conn
            .execute_batch(
                "CREATE TEMP TABLE written (id INTEGER);
                 CREATE TEMP TRIGGER count_rows AFTER INSERT ON main.outbox
                 BEGIN INSERT INTO written VALUES (new.id); END;",
            )
            .unwrap();
    }

    fn rows_written(j: &Journal) -> Vec<i64> {
        let mut stmt = j
            .conn
            .prepare("SELECT id FROM written ORDER BY id")
            .unwrap();
        let ids = stmt.query_map([], |r| r.get(0)).unwrap();
        ids.collect::<Result<_, _>>().unwrap()
    }

    #[test]
    fn a_call_answered_in_the_batch_that_handles_its_cause_writes_no_row() {
        let dir = tempfile::tempdir().unwrap();
        let params = &hi();
        {
            let mut j = Journal::open(dir.path(), "j").unwrap();
            j.append(&batch(&[1, 2]), None).unwrap();
            count_rows(&j);
            let answer = SentCall {
                id: 6,
                outcome: Some(serde_json::json!({"ok": true, "result": 6})),
            };
            // 5: answered, its cause handled with it. 6: answered, its
            // cause still in hand. 7: answered, no cause. 8: unanswered, its
            // cause handled with it.
            j.record(
                &[
                    call(5, Some(1), 0, params),
                    call(6, Some(2), 0, params),
                    call(7, None, 0, params),
                    call(8, Some(1), 1, params),
                ],
                &[1],
                &[sent(5), answer, sent(7)],
            )
            .unwrap();
            assert_eq!(
                rows_written(&j),
                vec![6, 8],
                "only the row a repeat needs and the one to send again"
            );
            let sent_flags: Vec<(i64, bool)> = j
                .conn
                .prepare("SELECT id, sent FROM outbox ORDER BY id")
                .unwrap()
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            assert_eq!(sent_flags, vec![(6, true), (8, false)]);
        }
        // A restart: update 1 is not delivered again and its answered call
        // is not sent again; update 2 comes again and finds its call made.
        let mut j = Journal::open(dir.path(), "j").unwrap();
        assert_eq!(pending_ids(&j), vec![2]);
        let r = j.recover().unwrap();
        let resent: Vec<i64> = r.resend.iter().map(|c| c.id).collect();
        assert_eq!(resent, vec![8], "only the unanswered call of update 1");
        assert_eq!(
            r.answered,
            vec![Answered {
                cause: 2,
                ordinal: 0,
                outcome: Some(serde_json::json!({"ok": true, "result": 6})),
            }]
        );
        assert_eq!(r.next_id, 9);
    }

    #[test]
    fn an_answer_to_a_row_written_before_is_marked_or_forgotten_as_ever() {
        let dir = tempfile::tempdir().unwrap();
        let params = &hi();
        let mut j = Journal::open(dir.path(), "j").unwrap();
        j.append(&batch(&[1, 2]), None).unwrap();
        // Both updates recorded handled or not with their calls unanswered.
        j.record(
            &[call(1, Some(1), 0, params), call(2, Some(2), 0, params)],
            &[1],
            &[],
        )
        .unwrap();
        count_rows(&j);
        // Their answers, with a new call of update 2 answered at once and
        // update 2 handled in the same batch.
        j.record(
            &[call(3, Some(2), 1, params)],
            &[2],
            &[sent(1), sent(3), sent(2)],
        )
        .unwrap();
        assert!(rows_written(&j).is_empty(), "{:?}", rows_written(&j));
        let left: i64 = j
            .conn
            .query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0))
            .unwrap();
        assert_eq!(left, 0, "all answered and their causes handled");
        let r = j.recover().unwrap();
        assert!(r.resend.is_empty() && r.answered.is_empty(), "{r:?}");
    }

    #[test]
    fn sent_rows_go_with_their_cause_whoever_wrote_them_and_a_rolled_back_delete_is_redone() {
        let dir = tempfile::tempdir().unwrap();
        let params = &hi();
        let outbox = |j: &Journal| -> i64 {
            j.conn
                .query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0))
                .unwrap()
        };
        {
            let mut j = Journal::open(dir.path(), "j").unwrap();
            j.append(&batch(&[1, 2, 3]), None).unwrap();
            // Kept sent while their causes may be delivered again (rule 6).
            j.record(
                &[call(1, Some(1), 0, params), call(2, Some(2), 0, params)],
                &[],
                &[sent(1), sent(2)],
            )
            .unwrap();
            assert_eq!(outbox(&j), 2);
        }
        // An earlier run's rows, known to this one only from the file.
        let mut j = Journal::open(dir.path(), "j").unwrap();
        j.record(&[], &[1, 3], &[]).unwrap();
        assert_eq!(outbox(&j), 1, "update 1's row went with it");
        // A delete that rolled back is done again by the retried record.
        j.conn
            .execute_batch(
                "CREATE TEMP TRIGGER refuse BEFORE DELETE ON main.outbox
                 BEGIN SELECT RAISE(ABORT, 'refused'); END;",
            )
            .unwrap();
        assert!(j.record(&[], &[2], &[]).is_err());
        j.conn.execute_batch("DROP TRIGGER temp.refuse").unwrap();
        j.record(&[], &[2], &[]).unwrap();
        assert_eq!(outbox(&j), 0, "update 2's row went with its retried record");
        assert!(j.is_empty().unwrap());
        // Rows written by this run, of a cause handled in a later batch.
        j.append(&batch(&[4]), None).unwrap();
        j.record(&[call(3, Some(4), 0, params)], &[], &[sent(3)])
            .unwrap();
        assert_eq!(outbox(&j), 1);
        j.record(&[], &[4], &[]).unwrap();
        assert_eq!(outbox(&j), 0);
        assert!(j.with_rows.is_empty(), "{:?}", j.with_rows);
    }

    #[test]
    fn the_watermark_kept_in_memory_is_the_one_on_disk() {
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().unwrap();
        let on_disk = |j: &Journal| meta(&j.conn, "watermark").unwrap();
        {
            let mut j = Journal::open(dir.path(), "j").unwrap();
            assert_eq!(j.watermark(), None);
            j.append(&batch(&[5, 7]), None).unwrap();
            j.append_webhook(&batch(&[9])).unwrap();
            assert_eq!((j.watermark(), on_disk(&j)), (Some(9), Some(9)));
            // Committed, not synced: moved all the same.
            let _turn = sync_counter::TURN.lock().unwrap_or_else(|e| e.into_inner());
            sync_counter::count_wal_syncs(&j.conn);
            sync_counter::FAILING.store(1, Ordering::SeqCst);
            assert!(j.append(&batch(&[11]), None).is_err());
            assert_eq!((j.watermark(), on_disk(&j)), (Some(11), Some(11)));
            // Rolled back: not moved.
            j.conn
                .execute_batch(
                    "CREATE TEMP TRIGGER refuse BEFORE INSERT ON main.updates
                     BEGIN SELECT RAISE(ABORT, 'refused'); END;",
                )
                .unwrap();
            assert!(j.append(&batch(&[12]), None).is_err());
            assert!(j.append_webhook(&batch(&[13])).is_err());
            assert_eq!((j.watermark(), on_disk(&j)), (Some(11), Some(11)));
        }
        let j = Journal::open(dir.path(), "j").unwrap();
        assert_eq!(j.watermark(), Some(11), "read back at open");
    }

    /// Counts the syncs of one SQLite file, by giving it a copy of its method
    /// table whose `xSync` counts before it calls the original.
    mod sync_counter {
        use rusqlite::ffi;
        use std::os::raw::c_int;
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::OnceLock;

        pub static SYNCS: AtomicUsize = AtomicUsize::new(0);
        /// The counts are the whole process's: tests that read them take
        /// turns.
        pub static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
        /// Syncs to fail (as a disk that reports an I/O error), before any
        /// is counted.
        pub static FAILING: AtomicUsize = AtomicUsize::new(0);
        type Sync = unsafe extern "C" fn(*mut ffi::sqlite3_file, c_int) -> c_int;
        static ORIGINAL: OnceLock<Sync> = OnceLock::new();

        unsafe extern "C" fn counted(file: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
            let failing =
                FAILING.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
            if failing.is_ok() {
                return ffi::SQLITE_IOERR_FSYNC;
            }
            SYNCS.fetch_add(1, Ordering::SeqCst);
            let original = ORIGINAL.get().expect("set before the table is swapped");
            // SAFETY: the call SQLite made, passed on unchanged.
            unsafe { original(file, flags) }
        }

        /// The WAL of `conn`'s main database, which must be open.
        pub fn count_wal_syncs(conn: &rusqlite::Connection) {
            let file = super::super::wal_file(conn).expect("the WAL is open");
            // SAFETY: as in `Journal::sync_wal`; the test's one thread uses
            // the connection, and the leaked table outlives the file.
            unsafe {
                let mut table = *(*file).pMethods;
                let _ = ORIGINAL.set(table.xSync.expect("every VFS file syncs"));
                table.xSync = Some(counted);
                (*file).pMethods = Box::leak(Box::new(table));
            }
        }
    }

    #[test]
    fn appends_wait_for_the_disk_and_records_do_not() {
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path(), "j").unwrap();
        assert!(j.wal, "a journal on a local disk is in WAL mode");
        j.append(&batch(&[1]), None).unwrap();
        let _turn = sync_counter::TURN.lock().unwrap_or_else(|e| e.into_inner());
        sync_counter::SYNCS.store(0, Ordering::SeqCst);
        sync_counter::count_wal_syncs(&j.conn);
        let syncs = || sync_counter::SYNCS.load(Ordering::SeqCst);
        j.record(&[], &[1], &[]).unwrap();
        assert_eq!(syncs(), 0, "a record's commit does not wait for the disk");
        j.append(&batch(&[2]), None).unwrap();
        assert_eq!(syncs(), 1, "an append's commit is on disk once it returns");
        j.append_webhook(&batch(&[3])).unwrap();
        assert_eq!(syncs(), 2, "so is a webhook's");
        j.set_fsync(false).unwrap();
        j.append(&batch(&[4]), None).unwrap();
        assert_eq!(syncs(), 2, "journal.fsync = false: it does not wait");
        assert_eq!(j.len().unwrap(), 3);
    }

    /// One update at a time, as a bot that gets one per poll: the WAL starts
    /// over behind the checkpointer's checkpoints, long before the 1,000
    /// frames at which SQLite would checkpoint inside a commit, on the
    /// journal's thread.
    #[test]
    fn the_wal_starts_over_by_checkpoints_off_the_journal_thread() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path(), "j").unwrap();
        j.set_fsync(false).unwrap();
        let wal = dir.path().join("j.sqlite3-wal");
        // Three frames each: past the 1,000 of SQLite's own checkpoint.
        const UPDATES: i64 = 500;
        for id in 1..=UPDATES {
            j.append(&batch(&[id]), None).unwrap();
            j.record(&[], &[id], &[]).unwrap();
            // The pause between two polls, in which a checkpoint, which
            // syncs the database, can end: now and then a long one, for a
            // disk that syncs slowly.
            let pause = if id % 8 == 0 { 25 } else { 1 };
            std::thread::sleep(Duration::from_millis(pause));
        }
        assert_eq!(j.len().unwrap(), 0);
        // Its size is the most frames it ever held: it is written over
        // from the start, not shortened, when it starts over.
        let frames = fs::metadata(&wal).unwrap().len() / (4096 + 24);
        assert!(
            frames < 1_000,
            "{UPDATES} updates left a WAL of {frames} frames: it never started over before SQLite's own checkpoint"
        );
    }

    #[test]
    fn updates_whose_commit_held_but_not_its_sync_are_new_to_the_retry() {
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path(), "j").unwrap();
        j.append(&batch(&[1]), None).unwrap();
        let _turn = sync_counter::TURN.lock().unwrap_or_else(|e| e.into_inner());
        sync_counter::count_wal_syncs(&j.conn);
        sync_counter::FAILING.store(1, Ordering::SeqCst);
        let failed = j.append(&batch(&[2, 3]), None).unwrap_err();
        assert!(failed.to_string().contains("syncing the WAL"), "{failed}");
        // The Poller stores the same batch again before it confirms it; the
        // commit held, so the journal has seen these ids, yet nobody has
        // been given them.
        assert_eq!(j.append(&batch(&[2, 3]), None).unwrap(), vec![2, 3]);
        assert_eq!(j.append(&batch(&[2, 3]), None).unwrap(), Vec::<i64>::new());
        // A webhook's failed request comes again, maybe after another one.
        sync_counter::FAILING.store(1, Ordering::SeqCst);
        assert!(j.append_webhook(&batch(&[10])).is_err());
        assert_eq!(j.append_webhook(&batch(&[11])).unwrap(), vec![11]);
        assert_eq!(j.append_webhook(&batch(&[10])).unwrap(), vec![10]);
        // A write that rolled back is stored by its retry, once.
        j.conn
            .execute_batch(
                "CREATE TEMP TRIGGER refuse BEFORE INSERT ON main.updates
                 WHEN NEW.update_id = 20 BEGIN SELECT RAISE(ABORT, 'refused'); END;",
            )
            .unwrap();
        assert!(j.append(&batch(&[20]), None).is_err());
        j.conn.execute_batch("DROP TRIGGER temp.refuse").unwrap();
        assert_eq!(j.append(&batch(&[20]), None).unwrap(), vec![20]);
        assert_eq!(j.len().unwrap(), 6);
    }

    #[test]
    fn without_wal_appends_commit_at_full_and_records_at_normal() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path(), "j").unwrap();
        // As on a filesystem where SQLite could not start its WAL.
        j.wal = false;
        // The level as each write found it: appends insert into `updates`,
        // records delete from it.
        j.conn
            .execute_batch(
                "CREATE TEMP TABLE levels (level INTEGER);
                 CREATE TEMP TRIGGER appended AFTER INSERT ON main.updates
                 BEGIN INSERT INTO levels SELECT synchronous FROM pragma_synchronous; END;
                 CREATE TEMP TRIGGER recorded AFTER DELETE ON main.updates
                 BEGIN INSERT INTO levels SELECT synchronous FROM pragma_synchronous; END;",
            )
            .unwrap();
        j.append(&batch(&[1]), None).unwrap();
        j.record(&[], &[1], &[]).unwrap();
        j.set_fsync(false).unwrap();
        j.append(&batch(&[2]), None).unwrap();
        let levels: Vec<i64> = j
            .conn
            .prepare("SELECT level FROM levels")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        // SQLite's numbers: 1 NORMAL, 2 FULL.
        assert_eq!(
            levels,
            vec![2, 1, 1],
            "an append FULL, a record NORMAL, an append with fsync off NORMAL"
        );
    }

    #[test]
    fn an_append_waits_for_another_writer_instead_of_failing() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path(), "j").unwrap();
        j.append(&batch(&[1]), None).unwrap();
        // Another connection (an operator's sqlite3, a backup) holds the
        // write lock for a moment; the append must wait for the lock, not
        // fail at once.
        let mut other = Connection::open(&j.path).unwrap();
        let (locked, release) = std::sync::mpsc::channel();
        let holder = std::thread::spawn(move || {
            let tx = other
                .transaction_with_behavior(rusqlite::TransactionBehavior::Exclusive)
                .unwrap();
            locked.send(()).unwrap();
            std::thread::sleep(Duration::from_millis(300));
            tx.commit().unwrap();
        });
        release.recv().unwrap();
        assert_eq!(j.append(&batch(&[2]), None).unwrap(), vec![2]);
        j.record(&[], &[1], &[]).unwrap();
        holder.join().unwrap();
        assert_eq!(j.len().unwrap(), 1);
    }

    #[test]
    fn a_failed_transaction_is_rolled_back_and_the_next_one_commits() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path(), "j").unwrap();
        // The second insert fails (NOT NULL), after the first succeeded.
        let failed = Tx::run(&j.conn, |tx| {
            tx.execute("INSERT INTO updates (update_id, body) VALUES (7, 'x')", [])?;
            tx.execute("INSERT INTO updates (update_id, body) VALUES (8, NULL)", [])
        });
        assert!(failed.is_err());
        assert!(j.conn.is_autocommit(), "no transaction left open");
        assert_eq!(j.len().unwrap(), 0, "the first insert went with the rest");
        // A panic inside rolls back as well (the journal outlives a
        // panicking handler: JournalActor).
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = Tx::run(&j.conn, |tx| {
                tx.execute("INSERT INTO updates (update_id, body) VALUES (9, 'x')", [])?;
                panic!("in the middle of a record");
                #[allow(unreachable_code)]
                Ok(())
            });
        }));
        assert!(panicked.is_err());
        assert!(j.conn.is_autocommit());
        assert_eq!(j.len().unwrap(), 0);
        assert_eq!(j.append(&batch(&[10]), None).unwrap(), vec![10]);
        assert_eq!(j.len().unwrap(), 1);
    }

    #[test]
    fn the_journal_thread_gives_way_to_the_actor_thread() {
        let policy = std::thread::spawn(|| {
            yield_to_latency();
            // SAFETY: no arguments; pid 0 is the calling thread.
            unsafe { libc::sched_getscheduler(0) }
        })
        .join()
        .expect("the thread does not panic");
        assert_eq!(policy, libc::SCHED_BATCH);
        // SAFETY: as above.
        let here = unsafe { libc::sched_getscheduler(0) };
        assert_eq!(here, libc::SCHED_OTHER, "only the calling thread changes");
    }

    #[test]
    fn an_update_handled_before_its_retried_append_is_not_stored_by_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path(), "j").unwrap();
        j.append(&batch(&[1]), None).unwrap();
        // Update 2's append failed; it was handled meanwhile.
        j.record(&[], &[1, 2], &[]).unwrap();
        assert_eq!(j.append(&batch(&[2, 3]), Some(2)).unwrap(), vec![3]);
        assert_eq!(j.watermark(), Some(3));
        let pending: Vec<i64> = j.pending().unwrap().into_iter().map(|(i, _)| i).collect();
        assert_eq!(
            pending,
            vec![3],
            "2 is not left behind to be delivered again"
        );
        // A handled id the journal had stored and forgotten is not remembered.
        j.record(&[], &[1], &[]).unwrap();
        assert!(j.handled_early.is_empty());
    }

    fn pushed(id: i64, after: Option<i64>) -> NewPushed {
        NewPushed {
            id,
            after,
            body: format!("{{\"pushed\":{id}}}"),
        }
    }

    fn pending_ids(j: &Journal) -> Vec<i64> {
        j.pending().unwrap().into_iter().map(|(i, _)| i).collect()
    }

    #[test]
    fn pushed_events_have_ids_of_their_own_and_come_back_in_their_place() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut j = Journal::open(dir.path(), "j").unwrap();
            assert_eq!(j.next_pushed_id().unwrap(), -1);
            j.store_pushed(&[pushed(-1, None)]).unwrap();
            j.append(&batch(&[10, 11]), None).unwrap();
            j.store_pushed(&[pushed(-2, Some(11)), pushed(-3, Some(11))])
                .unwrap();
            j.append(&batch(&[12]), Some(12)).unwrap();
            j.store_pushed(&[pushed(-4, Some(10))]).unwrap();
            assert_eq!(j.watermark(), Some(12), "rule 2 is Telegram's");
            assert_eq!(j.next_pushed_id().unwrap(), -5);
        }
        let mut j = Journal::open(dir.path(), "j").unwrap();
        assert_eq!(pending_ids(&j), vec![-1, 10, -4, 11, -2, -3, 12]);
        let (_, body) = j.pending().unwrap().remove(0);
        assert_eq!(body, "{\"pushed\":-1}");
        // Handled like updates; its calls are keyed by its id.
        j.record(&[call(1, Some(-2), 0, &hi())], &[-1, 10], &[sent(1)])
            .unwrap();
        let r = j.recover().unwrap();
        assert_eq!(r.answered.len(), 1, "-2 is not handled yet: {r:?}");
        assert_eq!(r.answered[0].cause, -2);
        j.record(&[], &[-2], &[]).unwrap();
        assert!(j.recover().unwrap().answered.is_empty());
        assert_eq!(pending_ids(&j), vec![-4, 11, -3, 12]);
        // Once all are handled, ids still go on downwards.
        j.record(&[], &[-3, -4, 11, 12], &[]).unwrap();
        assert!(j.is_empty().unwrap());
        assert_eq!(j.next_pushed_id().unwrap(), -5);
        let places: i64 = j
            .conn
            .query_row("SELECT COUNT(*) FROM pushed", [], |r| r.get(0))
            .unwrap();
        assert_eq!(places, 0, "a handled event's place goes with it");
    }

    #[test]
    fn a_pushed_event_handled_before_its_retried_store_is_not_stored_by_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path(), "j").unwrap();
        j.store_pushed(&[pushed(-1, None)]).unwrap();
        // -2's store failed; it was handled meanwhile, and so was -1 (twice:
        // a redelivery after a worker's death finishes it again).
        j.record(&[], &[-1, -2, -1], &[]).unwrap();
        assert_eq!(j.handled_early, HashSet::from_iter([-2]));
        j.store_pushed(&[pushed(-2, None), pushed(-3, None)])
            .unwrap();
        assert_eq!(pending_ids(&j), vec![-3]);
        assert!(j.handled_early.is_empty());
    }

    #[test]
    fn admit_is_rule_2() {
        let mut w = None;
        assert!(admit(&mut w, 10, None), "nothing seen yet");
        assert!(!admit(&mut w, 10, Some(10)), "a resend");
        assert!(admit(&mut w, 11, Some(10)));
        assert_eq!(w, Some(11));
        assert!(
            admit(&mut w, 3, Some(12)),
            "below the offset: a new sequence"
        );
        assert_eq!(w, Some(3));
        assert!(!admit(&mut w, 3, Some(3)));
    }

    /// A journal as `kill -9` leaves it: the last writes only in the WAL.
    fn killed_with(dir: &Path, ids: &[i64]) -> Files {
        let mut j = Journal::open(dir, "j").unwrap();
        j.append(&batch(ids), None).unwrap();
        // Closing would copy the WAL into the database file; a kill does not.
        j.conn
            .set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)
            .unwrap();
        drop(j);
        let files = Files::new(dir, "j");
        assert!(fs::metadata(&files.wal).unwrap().len() > 0, "in the WAL");
        files
    }

    #[test]
    fn a_journal_killed_with_its_updates_in_the_wal_reopens_with_them() {
        let dir = tempfile::tempdir().unwrap();
        killed_with(dir.path(), &[1, 2, 3]);
        let j = Journal::open(dir.path(), "j").unwrap();
        assert_eq!(j.len().unwrap(), 3);
    }

    #[test]
    fn a_wal_sqlite_would_discard_is_damage_and_is_left_as_it_was() {
        type Damage = fn(&mut Vec<u8>);
        let cases: [(&str, Damage); 4] = [
            ("zeroed", |w| w.fill(0)),
            ("a salt bit flipped", |w| w[16] ^= 1),
            ("cut inside its header", |w| w.truncate(20)),
            ("another magic number", |w| w[3] = 0x84),
        ];
        for (how, damage) in cases {
            let dir = tempfile::tempdir().unwrap();
            let files = killed_with(dir.path(), &[1, 2, 3]);
            let mut wal = fs::read(&files.wal).unwrap();
            damage(&mut wal);
            fs::write(&files.wal, &wal).unwrap();
            let db = fs::read(&files.db).unwrap();

            // What SQLite alone makes of a copy: an empty journal, no error.
            let copy = tempfile::tempdir().unwrap();
            let copied = Files::new(copy.path(), "j");
            fs::write(&copied.db, &db).unwrap();
            fs::write(&copied.wal, &wal).unwrap();
            let raw = Connection::open(&copied.db).unwrap();
            let n: i64 = raw
                .query_row("SELECT COUNT(*) FROM updates", [], |r| r.get(0))
                .unwrap();
            assert_eq!(n, 0, "{how}: SQLite loses them silently");

            let err = Journal::open(dir.path(), "j").err().expect("damaged");
            assert!(
                matches!(&err, JournalError::Damaged { files: f, .. } if f.len() == 2),
                "{how}: {err}"
            );
            assert!(err.to_string().contains("--reset-journal"), "{err}");
            assert_eq!(fs::read(&files.wal).unwrap(), wal, "{how}: WAL changed");
            assert_eq!(fs::read(&files.db).unwrap(), db, "{how}: db changed");
        }
    }

    #[test]
    fn an_empty_or_missing_database_file_is_damage_unless_the_journal_is_new() {
        let dir = tempfile::tempdir().unwrap();
        let files = killed_with(dir.path(), &[1]);
        fs::remove_file(&files.db).unwrap();
        let err = Journal::open(dir.path(), "j").err().expect("WAL alone");
        assert!(err.to_string().contains("missing"), "{err}");
        fs::write(&files.db, b"").unwrap();
        let err = Journal::open(dir.path(), "j").err().expect("WAL, empty db");
        assert!(err.to_string().contains("would delete"), "{err}");
        assert!(fs::metadata(&files.wal).unwrap().len() > 0, "not deleted");
        fs::remove_file(&files.wal).unwrap();
        let err = Journal::open(dir.path(), "j").err().expect("empty db");
        assert!(err.to_string().contains("empty (0 bytes)"), "{err}");

        // A creation cut short leaves only its temporary file behind.
        let fresh = tempfile::tempdir().unwrap();
        let tmp = suffixed(&Files::new(fresh.path(), "j").db, ".new");
        fs::write(&tmp, b"").unwrap();
        let j = Journal::open(fresh.path(), "j").unwrap();
        assert!(j.is_empty().unwrap());
        assert!(!tmp.exists());
    }

    #[test]
    fn a_database_file_overwritten_in_the_middle_is_damage() {
        let dir = tempfile::tempdir().unwrap();
        let files = killed_with(dir.path(), &(1..500).collect::<Vec<_>>());
        drop(Journal::open(dir.path(), "j").unwrap());
        assert!(!files.wal.exists(), "all in the database file now");
        let mut db = fs::read(&files.db).unwrap();
        let page = 4096;
        assert!(db.len() > 4 * page);
        db[2 * page..3 * page].fill(0x5a);
        fs::write(&files.db, &db).unwrap();
        let err = Journal::open(dir.path(), "j").err().expect("damaged");
        assert!(matches!(err, JournalError::Damaged { .. }), "{err}");
        assert!(err.to_string().contains("SQLite"), "{err}");
        assert_eq!(fs::read(&files.db).unwrap(), db);
        assert!(
            fs::metadata(&files.wal).map_or(true, |m| m.len() == 0),
            "nothing was written"
        );
    }

    #[test]
    fn reset_moves_a_damaged_journal_aside_and_the_next_open_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        let files = killed_with(dir.path(), &[1, 2]);
        fs::write(&files.wal, b"garbage").unwrap();
        let before: Vec<_> = [&files.db, &files.wal]
            .into_iter()
            .map(|p| (p.clone(), fs::read(p).unwrap()))
            .collect();
        let reset = reset_if_damaged(dir.path(), "j").unwrap().expect("damaged");
        assert!(reset.what.contains("WAL"), "{}", reset.what);
        for (from, bytes) in before {
            let (_, to) = reset.moved.iter().find(|(f, _)| *f == from).unwrap();
            assert!(!from.exists());
            assert_eq!(fs::read(to).unwrap(), bytes, "{to:?}");
            let name = to.file_name().unwrap().to_str().unwrap();
            assert!(name.contains(".damaged-"), "{name}");
        }
        let j = Journal::open(dir.path(), "j").unwrap();
        assert!(j.is_empty().unwrap());
    }

    #[test]
    fn reset_leaves_an_intact_journal_and_a_missing_one_alone() {
        let dir = tempfile::tempdir().unwrap();
        let none = dir.path().join("none");
        assert!(reset_if_damaged(&none, "j").unwrap().is_none());
        assert!(!none.exists(), "not created");
        killed_with(dir.path(), &[1, 2]);
        assert!(reset_if_damaged(dir.path(), "j").unwrap().is_none());
        assert_eq!(Journal::open(dir.path(), "j").unwrap().len().unwrap(), 2);
    }

    #[test]
    fn moving_aside_never_overwrites_an_earlier_copy() {
        let dir = tempfile::tempdir().unwrap();
        let files = Files::new(dir.path(), "j");
        fs::write(&files.db, "first").unwrap();
        files.move_aside("T").unwrap();
        fs::write(&files.db, "second").unwrap();
        let moved = files.move_aside("T").unwrap();
        assert_eq!(moved.len(), 1, "only the files there are");
        let copy = |suffix: &str| fs::read_to_string(suffixed(&files.db, suffix)).unwrap();
        assert_eq!(copy(".damaged-T"), "first");
        assert_eq!(copy(".damaged-T.1"), "second");
    }

    /// A header SQLite writes, read from a WAL it wrote.
    fn real_wal_header() -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let files = killed_with(dir.path(), &[1]);
        fs::read(&files.wal).unwrap()[..WAL_HEADER].to_vec()
    }

    #[test]
    fn the_wal_header_is_checked_as_sqlite_checks_it() {
        let good = real_wal_header();
        assert_eq!(wal_header_problem(&good), None);
        let bad = |at: usize, value: u32| {
            let mut h = good.clone();
            h[at..at + 4].copy_from_slice(&value.to_be_bytes());
            wal_header_problem(&h)
        };
        assert!(bad(0, 0x1234_5678).is_some(), "magic");
        assert!(bad(4, 3_007_001).is_some(), "version");
        assert!(bad(8, 1000).is_some(), "page size");
        assert!(bad(16, 7).is_some(), "salt, under the checksum");
        assert!(bad(24, 7).is_some(), "checksum");
        assert!(wal_header_problem(&good[..31]).is_some());
        assert!(wal_header_problem(&[0; 32]).is_some());
        // Written on a big-endian machine: magic's low bit set, checksums
        // over big-endian words.
        let mut be = good.clone();
        be[3] |= 1;
        let (s1, s2) = wal_checksum(true, &be[..24]);
        be[24..28].copy_from_slice(&s1.to_be_bytes());
        be[28..32].copy_from_slice(&s2.to_be_bytes());
        assert_eq!(wal_header_problem(&be), None);
    }

    #[test]
    fn damaged_copies_are_stamped_in_utc() {
        let at = |secs| utc_stamp(UNIX_EPOCH + Duration::from_secs(secs));
        assert_eq!(at(0), "19700101T000000Z");
        assert_eq!(at(951_782_400), "20000229T000000Z");
        assert_eq!(at(1_735_689_599), "20241231T235959Z");
        assert_eq!(at(4_102_444_800), "21000101T000000Z");
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
