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
//! 5. Each call has a row keyed by its *cause* (the update whose handling
//!    made it) and its *ordinal* (the how-manieth call of that handling).
//!    The call goes to the Sender at once and its row is written with the
//!    next record, never later than the call's answer, and the chat's next
//!    call waits until both are written (the Sender's rule 1). A crash
//!    therefore leaves at most one call per chat that Telegram may have
//!    executed without the journal knowing. [`Journal::record`] stores
//!    calls and handled updates in one transaction, in the order the apps
//!    made them, so an update is never recorded handled without the calls
//!    its handling made.
//! 6. A call Telegram answered is marked sent (by [`Journal::record`]) and leaves
//!    the outbox once its cause is handled too: while the cause may still be
//!    delivered again, the sent row is what recognises its repeated call.
//! 7. On start ([`Journal::recover`]): unsent calls whose cause is handled
//!    (or that have none) are sent again; unsent calls of an unhandled cause
//!    are dropped, because delivering the cause again makes them again; sent
//!    calls of an unhandled cause are the keys that recognise repeats.
//!
//! Handled updates and outbox rows need not wait for the disk: WAL commits
//! survive the process being killed, and a power loss rolls back whole
//! transactions, which can repeat a reply but never loses an update.
//!
//! SQLite (bundled) in WAL mode. It is blocking, so the daemon runs it on a
//! `SyncArbiter` thread ([`JournalActor`]), never on the actor thread. One
//! thread for appends and records alike: it takes its messages in the order
//! the actor thread sent them, which is what puts an update's append before
//! every record about it (rule 1). Nothing on an update's way to its reply
//! waits for that thread; only the offset (rule 1) and a chat's next call
//! (rule 5) do.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use actix::prelude::*;
use rusqlite::{params, Connection, OptionalExtension};
use serde_json::{Map, Value};

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
    /// Appends wait for the disk (`journal.fsync`, on by default).
    fsync: bool,
    /// Updates recorded handled before their append was written: only
    /// after a failed append, whose retry comes behind the records (rule 1).
    /// Their retried append must not store them again.
    handled_early: HashSet<i64>,
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
        let journal = Journal {
            conn,
            path,
            fsync: true,
            handled_early: HashSet::new(),
        };
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
                 CREATE INDEX IF NOT EXISTS outbox_cause ON outbox (cause);",
            )
            .map_err(|e| journal.err(e))?;
        Ok(journal)
    }

    fn err(&self, e: rusqlite::Error) -> JournalError {
        sqlite_err(&self.path, e)
    }

    /// `journal.fsync = false`: appends stop waiting for the disk. A commit
    /// then survives the daemon being killed but not the machine losing
    /// power, and an update Telegram was told arrived could be lost with it.
    pub fn set_fsync(&mut self, on: bool) -> Result<(), JournalError> {
        self.fsync = on;
        let level = if on { "FULL" } else { "NORMAL" };
        self.conn
            .execute_batch(&format!("PRAGMA synchronous = {level}"))
            .map_err(|e| self.err(e))
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
                if !admit(&mut watermark, *id, fetched_with) || self.handled_early.remove(id) {
                    continue;
                }
                insert
                    .execute(params![id, body])
                    .map_err(|e| sqlite_err(&self.path, e))?;
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

    /// Runs `f` in one transaction that does not wait for the disk (see
    /// the module doc); appends do.
    fn unsynced<T>(
        &mut self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<T>,
    ) -> Result<T, JournalError> {
        // Cached: parsing the pragma twice per record was a measurable part
        // of the journal's CPU at low rates.
        let sync = |conn: &Connection, pragma: &str| {
            conn.prepare_cached(pragma)
                .and_then(|mut pragma| pragma.execute([]))
        };
        if self.fsync {
            sync(&self.conn, "PRAGMA synchronous = NORMAL").map_err(|e| self.err(e))?;
        }
        let result = self.conn.transaction().and_then(|tx| {
            let value = f(&tx)?;
            tx.commit().map(|()| value)
        });
        if self.fsync {
            sync(&self.conn, "PRAGMA synchronous = FULL").map_err(|e| self.err(e))?;
        }
        result.map_err(|e| self.err(e))
    }

    /// Stores `calls` in the outbox, marks `sent` calls (rule 6) and forgets
    /// `handled` updates, in one transaction and in that order (rule 5): a
    /// call may be answered before its row was ever written, and then both
    /// come in the same batch.
    pub fn record(
        &mut self,
        calls: &[NewCall],
        handled: &[i64],
        sent: &[SentCall],
    ) -> Result<(), JournalError> {
        let (deleted, missing) = self.unsynced(|tx| {
            {
                let mut insert = tx.prepare_cached(
                    "INSERT INTO outbox (id, cause, ordinal, method, params) VALUES (?1, ?2, ?3, ?4, ?5)",
                )?;
                for call in calls {
                    insert.execute(params![
                        call.id,
                        call.cause,
                        call.ordinal,
                        call.method,
                        call.params
                    ])?;
                }
            }
            mark_sent(tx, sent)?;
            let (mut deleted, mut missing) = (0, Vec::new());
            {
                let mut forget = tx.prepare_cached("DELETE FROM updates WHERE update_id = ?1")?;
                let mut answered =
                    tx.prepare_cached("DELETE FROM outbox WHERE cause = ?1 AND sent = 1")?;
                for id in handled {
                    match forget.execute(params![id])? {
                        0 => missing.push(*id),
                        n => deleted += n,
                    }
                    answered.execute(params![id])?;
                }
            }
            Ok((deleted, missing))
        })?;
        metrics().journal_entries.add(-(deleted as i64));
        if !missing.is_empty() {
            // Above the watermark: its append has not been written yet.
            let watermark = self.watermark()?;
            self.handled_early.extend(
                missing
                    .into_iter()
                    .filter(|id| watermark.is_none_or(|w| *id > w)),
            );
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
                    let Ok(params) = serde_json::from_str(&params) else {
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
    pub params: Map<String, Value>,
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

/// Rule 6: a sent call whose cause is handled (or that has none) is
/// forgotten; otherwise it is kept, marked, to recognise a repeat.
fn mark_sent(tx: &rusqlite::Transaction<'_>, sent: &[SentCall]) -> rusqlite::Result<()> {
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

/// The journal on a thread of its own. The connection is shared with the
/// actor the `SyncArbiter` builds anew if this one panics, so that it keeps
/// the connection and what it remembers (`handled_early`).
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
#[rtype(result = "Result<Vec<i64>, String>")]
pub struct Append {
    pub batch: Arc<[(i64, String)]>,
    pub fetched_with: Option<i64>,
}

impl Handler<Append> for JournalActor {
    type Result = Result<Vec<i64>, String>;
    fn handle(&mut self, msg: Append, _: &mut SyncContext<Self>) -> Self::Result {
        self.journal()
            .append(&msg.batch, msg.fetched_with)
            .map_err(|e| e.to_string())
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
            j.record(&[], &[2], &[]).unwrap();
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
        assert_eq!(r.resend[0].params, *params);
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
        assert_eq!(j.watermark().unwrap(), Some(3));
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
