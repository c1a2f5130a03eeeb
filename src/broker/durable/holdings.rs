//! The memory broker's holdings on disk (`<RUSTY_SOCKS_DATA_DIR>/holdings`), so the channels
//! and members a crashed or killed node held are released after its restart instead of staying
//! ghosts at the webhook receiver.
//!
//! A networked broker learns that a node died from its missing heartbeat, and a survivor
//! reports the dead node's `member_removed` / `channel_vacated`. A single node has no survivor:
//! its next life must do it, so it needs to know what the previous one held. This journal keeps
//! that set ([`Broker::track`](crate::broker::Broker::track)'s holdings):
//!
//! - One file of records, each framed like the durable history's and the webhook queue's:
//!   body length (`u32` LE), CRC-32C of the body (`u32` LE), body. The body is a kind byte
//!   and, except for `LEFT_RELEASED`, the holding in [`Holding::encode`]'s text form.
//!   `HELD` and `RELEASED` follow this life's holdings; `LEFT` names a holding of a
//!   previous life not yet released, and `LEFT_RELEASED` says all of those are.
//! - At startup ([`Journal::open`]) the file is read (a damaged tail, never acknowledged, is
//!   ignored), everything held at its end, this life's or left over, becomes the previous
//!   lives' holdings, and the file is rewritten as one `LEFT` record each (written aside,
//!   synced, renamed). The first [`Journal::release_left`] hands their releases (members
//!   first, so each channel's `member_removed` precede its `channel_vacated`) to the caller
//!   (the first sweep, before any transition of this life); [`Journal::forget_left`] appends
//!   `LEFT_RELEASED` once the caller says they are stored durably. A crash before that
//!   reports them again: duplicates, never loss.
//! - Records are written by one thread: [`Journal::record`] hands it a record (under the
//!   broker's holdings lock, so the file follows the set's order) and waits until it is
//!   written; a holding gained is also synced according to `RUSTY_SOCKS_FSYNC` first, so it
//!   is never reported (`channel_occupied`, `member_added`) before the journal can release
//!   it. A release is recorded only once its event is stored on the webhook queue's disk
//!   (`Broker::release_stored`), so a crash in between releases it again after the restart.
//!   A batch of releases only is not synced: a power loss that takes one costs a
//!   duplicate release after the restart, not a ghost; a process crash loses no written
//!   record. Holdings change once per channel or member, not per message: this is off the
//!   message path, and the tracker's worker, which calls `track` one at a time, is the only
//!   caller (so a graceful shutdown that waited for the tracker finds every record written).
//! - Past [`COMPACT_RECORDS`] records, and more than four times the live ones, the writer
//!   rewrites the file as a snapshot (aside, synced, renamed).

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::Instant;

use tokio::sync::oneshot;

use super::FsyncMode;
use super::record::crc32c;
use crate::broker::transition::{Holding, LocalDecisions, Transition};

/// A holding this life gained.
const HELD: u8 = 1;
/// A holding this life lost.
const RELEASED: u8 = 2;
/// A holding of a previous life, not yet released.
const LEFT: u8 = 3;
/// Every holding of previous lives is released.
const LEFT_RELEASED: u8 = 4;

const HEADER: usize = 8;
/// Longest record body accepted when reading (a channel name and a user id, far below).
const MAX_BODY: usize = 64 << 10;
/// The file is rewritten as a snapshot past this many records (and four times the live ones).
pub const COMPACT_RECORDS: usize = 4096;
/// Most records written with one `write`.
const MAX_BATCH: usize = 1024;
/// The journal's file in the data directory.
pub const FILE: &str = "holdings";

/// What the journal holds: this life's holdings and the previous lives' not yet released.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct State {
    held: HashSet<Holding>,
    left: HashSet<Holding>,
    /// Records in the file.
    records: usize,
}

impl State {
    fn apply(&mut self, kind: u8, holding: Option<Holding>) {
        self.records += 1;
        match (kind, holding) {
            (HELD, Some(h)) => {
                self.held.insert(h);
            }
            (RELEASED, Some(h)) => {
                self.held.remove(&h);
            }
            (LEFT, Some(h)) => {
                self.left.insert(h);
            }
            (LEFT_RELEASED, _) => self.left.clear(),
            _ => {}
        }
    }

    /// The file's content that says the same: the left holdings, then the held ones.
    fn snapshot(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for h in &self.left {
            encode(LEFT, Some(h), &mut out);
        }
        for h in &self.held {
            encode(HELD, Some(h), &mut out);
        }
        out
    }

    fn live(&self) -> usize {
        self.held.len() + self.left.len()
    }
}

fn encode(kind: u8, holding: Option<&Holding>, out: &mut Vec<u8>) {
    let text = holding.map(Holding::encode).unwrap_or_default();
    let mut body = Vec::with_capacity(1 + text.len());
    body.push(kind);
    body.extend_from_slice(text.as_bytes());
    // A body is a kind byte and a channel name and user id, far below `u32::MAX`.
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c(&body).to_le_bytes());
    out.extend_from_slice(&body);
}

/// The record at the start of `buf` (kind, holding) and its framed length, or `None` if it
/// cannot be trusted (cut short, checksum mismatch, unknown kind).
fn decode(buf: &[u8]) -> Option<((u8, Option<Holding>), usize)> {
    let len = u32::from_le_bytes(buf.get(0..4)?.try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(buf.get(4..8)?.try_into().ok()?);
    if len == 0 || len > MAX_BODY {
        return None;
    }
    let body = buf.get(HEADER..HEADER + len)?;
    if crc32c(body) != crc {
        return None;
    }
    let kind = body[0];
    let holding = match kind {
        LEFT_RELEASED => None,
        HELD | RELEASED | LEFT => Some(Holding::decode(std::str::from_utf8(&body[1..]).ok()?)?),
        _ => return None,
    };
    Some(((kind, holding), HEADER + len))
}

/// Reads the records of `path` (none if it does not exist) into a state; a damaged tail is
/// ignored (the file is rewritten right after) and its length returned.
fn read(path: &Path) -> std::io::Result<(State, usize)> {
    let mut bytes = Vec::new();
    match File::open(path) {
        Ok(mut file) => {
            file.read_to_end(&mut bytes)?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut state = State::default();
    let mut at = 0;
    while at < bytes.len() {
        let Some(((kind, holding), len)) = decode(&bytes[at..]) else {
            break;
        };
        state.apply(kind, holding);
        at += len;
    }
    Ok((state, bytes.len() - at))
}

/// Replaces `path` with `content` (written aside, synced, renamed, directory synced) and opens
/// it for appending.
fn replace(path: &Path, content: &[u8]) -> std::io::Result<File> {
    let aside = path.with_extension("new");
    let mut file = File::create(&aside)?;
    file.write_all(content)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&aside, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    OpenOptions::new().append(true).open(path)
}

/// What the writer thread is asked to do.
enum Op {
    /// Append a record; `done` (if any) once it is written and synced per the fsync mode.
    Record(u8, Option<Holding>, Option<oneshot::Sender<()>>),
}

/// The open journal. See the module docs.
pub struct Journal {
    writer: Mutex<Sender<Op>>,
    /// The previous lives' holdings, until [`Journal::release_left`] hands them out.
    left: Mutex<Option<Vec<Holding>>>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal").finish_non_exhaustive()
    }
}

impl Journal {
    /// Opens `<dir>/holdings` (blocking: this is startup): what it held becomes the previous
    /// lives' holdings, the file is rewritten to say so, and the writer thread starts. The
    /// directory's lock must be held.
    pub fn open(dir: &Path, fsync: FsyncMode) -> std::io::Result<Self> {
        let path = dir.join(FILE);
        let (state, cut) = read(&path)?;
        if cut > 0 {
            tracing::warn!(
                file = %path.display(),
                cut,
                "holdings journal: ignoring a damaged tail (never acknowledged)"
            );
        }
        let mut left: Vec<Holding> = state.left.union(&state.held).cloned().collect();
        // Members first: a channel's `member_removed` come before its `channel_vacated`.
        left.sort_by(|a, b| (a.user.is_none(), a).cmp(&(b.user.is_none(), b)));
        let state = State {
            left: left.iter().cloned().collect(),
            held: HashSet::new(),
            records: left.len(),
        };
        let file = replace(&path, &state.snapshot())?;
        if !left.is_empty() {
            tracing::info!(
                holdings = left.len(),
                "holdings of the previous run (it ended without releasing them) are released \
                 once transitions are reported"
            );
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let writer = Writer {
            path,
            file,
            state,
            fsync,
            last_sync: Instant::now(),
            unsynced: false,
            broken: false,
        };
        std::thread::Builder::new()
            .name("rusty-socks-holdings".into())
            .spawn(move || writer.run(rx))?;
        Ok(Self {
            writer: Mutex::new(tx),
            left: Mutex::new(Some(left)),
        })
    }

    fn send(&self, op: Op) {
        // The thread only ends when the journal goes; a send error means nothing to write to.
        let _ = self
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .send(op);
    }

    /// Records that this node now holds (`held`) or no longer holds `holding`. Call it in the
    /// order the holdings changed. The future resolves once the record is written (a gained
    /// holding also synced, per the fsync mode).
    pub fn record(
        &self,
        holding: &Holding,
        held: bool,
    ) -> impl Future<Output = ()> + Send + 'static {
        let (done, wait) = oneshot::channel();
        let kind = if held { HELD } else { RELEASED };
        self.send(Op::Record(kind, Some(holding.clone()), Some(done)));
        async move {
            let _ = wait.await;
        }
    }

    /// The releases of the previous lives' holdings (members first), decided now; empty after
    /// the first call. The caller reports them before any transition of this life, then calls
    /// [`Journal::forget_left`].
    pub fn release_left(&self, decisions: &LocalDecisions) -> Vec<Transition> {
        let left = self
            .left
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
            .unwrap_or_default();
        left.iter().map(|h| decisions.decide(h, false)).collect()
    }

    /// The releases [`Journal::release_left`] handed out are stored (`durably`: on disk, so a
    /// crash keeps them): the journal forgets them, and waits until that is written. Not
    /// durably (the sink keeps them in memory only, or dropped some): kept, so the next
    /// restart reports them again.
    pub async fn forget_left(&self, durably: bool) {
        if !durably {
            tracing::warn!(
                "the releases of the previous run's holdings are not stored on disk; they are \
                 reported again after the next restart"
            );
            return;
        }
        let (done, wait) = oneshot::channel();
        self.send(Op::Record(LEFT_RELEASED, None, Some(done)));
        let _ = wait.await;
    }
}

/// The writer thread's side.
struct Writer {
    path: PathBuf,
    file: File,
    state: State,
    fsync: FsyncMode,
    last_sync: Instant,
    /// Written since the last sync (`interval`).
    unsynced: bool,
    /// A write failed: the journal stopped (logged once); records are no longer kept.
    broken: bool,
}

impl Writer {
    fn run(mut self, rx: Receiver<Op>) {
        loop {
            let first = match (self.fsync, self.unsynced) {
                (FsyncMode::Interval(every), true) => {
                    let left = every.saturating_sub(self.last_sync.elapsed());
                    match rx.recv_timeout(left) {
                        Ok(op) => Some(op),
                        Err(RecvTimeoutError::Timeout) => None,
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
                _ => match rx.recv() {
                    Ok(op) => Some(op),
                    Err(_) => break,
                },
            };
            let mut ops: Vec<Op> = first.into_iter().collect();
            while ops.len() < MAX_BATCH
                && let Ok(op) = rx.try_recv()
            {
                ops.push(op);
            }
            self.write(ops);
        }
        if self.unsynced && !self.broken {
            let _ = self.file.sync_data();
        }
    }

    /// Writes a batch with one `write` and syncs per the mode; then acknowledges it.
    fn write(&mut self, ops: Vec<Op>) {
        let mut buf = Vec::new();
        let mut done = Vec::new();
        // Only what could leave a ghost if lost needs its sync: a holding gained, and the
        // release of the previous run's (its events are stored: not reporting them again).
        let mut needs_sync = false;
        for Op::Record(kind, holding, ack) in ops {
            needs_sync |= kind != RELEASED;
            encode(kind, holding.as_ref(), &mut buf);
            self.state.apply(kind, holding);
            done.extend(ack);
        }
        if !self.broken
            && let Err(err) = self.append(&buf, needs_sync)
        {
            self.broken = true;
            tracing::error!(
                %err,
                file = %self.path.display(),
                "holdings journal: cannot write; from now on a crash leaves the channels and \
                 members it held without channel_vacated / member_removed"
            );
        }
        if !self.broken
            && self.state.records > COMPACT_RECORDS
            && self.state.records > 4 * self.state.live()
            && let Err(err) = self.compact()
        {
            tracing::warn!(%err, "holdings journal: cannot rewrite; it keeps growing");
            // Tried again after as many records more, not at every batch.
            self.state.records = self.state.live();
        }
        // After a rewrite: once acknowledged, the file is settled.
        for ack in done {
            let _ = ack.send(());
        }
    }

    /// Writes `buf`; syncs under `always` if `needs_sync`, under `interval` once the interval
    /// has passed since the last sync.
    fn append(&mut self, buf: &[u8], needs_sync: bool) -> std::io::Result<()> {
        if buf.is_empty() && !self.unsynced {
            return Ok(());
        }
        self.file.write_all(buf)?;
        let sync = match self.fsync {
            FsyncMode::Always => needs_sync,
            FsyncMode::Interval(every) => self.last_sync.elapsed() >= every,
            FsyncMode::Never => false,
        };
        if sync {
            self.file.sync_data()?;
            self.last_sync = Instant::now();
            self.unsynced = false;
        } else {
            self.unsynced = matches!(self.fsync, FsyncMode::Interval(_));
        }
        Ok(())
    }

    fn compact(&mut self) -> std::io::Result<()> {
        let snapshot = self.state.snapshot();
        self.file = replace(&self.path, &snapshot)?;
        self.state.records = self.state.live();
        self.unsynced = false;
        self.last_sync = Instant::now();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::broker::TransitionKind;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "rusty-socks-holdings-{name}-{}",
            uuid::Uuid::new_v4()
        ));
        std::fs::create_dir_all(&dir).expect("test setup");
        dir
    }

    fn channel(name: &str) -> Holding {
        Holding {
            channel: Arc::from(name),
            user: None,
        }
    }

    fn member(name: &str, user: &str) -> Holding {
        Holding {
            channel: Arc::from(name),
            user: Some(Arc::from(user)),
        }
    }

    fn kinds(transitions: &[Transition]) -> Vec<(TransitionKind, String, Option<String>)> {
        transitions
            .iter()
            .map(|t| {
                (
                    t.kind,
                    t.channel.to_string(),
                    t.user.as_deref().map(str::to_owned),
                )
            })
            .collect()
    }

    /// Opens, records, and drops the journal (its thread finishes writing what it was given).
    fn life(dir: &Path, steps: &[(&Holding, bool)]) -> Vec<Transition> {
        life_with(dir, steps, FsyncMode::Always)
    }

    fn life_with(dir: &Path, steps: &[(&Holding, bool)], fsync: FsyncMode) -> Vec<Transition> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("test setup");
        let journal = Journal::open(dir, fsync).expect("open");
        let left = journal.release_left(&LocalDecisions::default());
        runtime.block_on(async {
            for (holding, held) in steps {
                journal.record(holding, *held).await;
            }
        });
        drop(journal);
        left
    }

    #[test]
    fn what_a_life_held_at_its_end_is_released_by_the_next_members_first() {
        let dir = temp_dir("reopen");
        let (room, u1, brief) = (channel("room"), member("room", "u1"), channel("brief"));
        let first = life(
            &dir,
            &[(&room, true), (&u1, true), (&brief, true), (&brief, false)],
        );
        assert!(first.is_empty());
        // The next life (its predecessor "crashed": nothing released) gets room and u1, not
        // the channel it had released.
        let journal = Journal::open(&dir, FsyncMode::Always).expect("open");
        let left = journal.release_left(&LocalDecisions::default());
        assert_eq!(
            kinds(&left),
            [
                (
                    TransitionKind::MemberRemoved,
                    "room".into(),
                    Some("u1".into())
                ),
                (TransitionKind::ChannelVacated, "room".into(), None),
            ]
        );
        assert!(
            journal.release_left(&LocalDecisions::default()).is_empty(),
            "handed out once"
        );
        drop(journal);
        // Not confirmed as stored: the life after reports them again, and adds its own.
        let other = channel("other");
        let again = life(&dir, &[(&other, true)]);
        assert_eq!(again.len(), 2);
        let journal = Journal::open(&dir, FsyncMode::Always).expect("open");
        let left = journal.release_left(&LocalDecisions::default());
        assert_eq!(left.len(), 3);
        assert_eq!(left[0].kind, TransitionKind::MemberRemoved);
        // Confirmed: forgotten, so the next life has nothing to release.
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("test setup")
            .block_on(journal.forget_left(true));
        drop(journal);
        let journal = Journal::open(&dir, FsyncMode::Always).expect("open");
        assert!(journal.release_left(&LocalDecisions::default()).is_empty());
        drop(journal);
        std::fs::remove_dir_all(dir).expect("test cleanup");
    }

    #[test]
    fn a_torn_or_corrupt_tail_is_ignored_and_what_came_before_survives() {
        let dir = temp_dir("torn");
        let (a, b, c) = (channel("a"), channel("b"), channel("c"));
        life(&dir, &[(&a, true), (&b, true), (&c, true)]);
        let path = dir.join(FILE);
        // The file holds HELD a, b, c.
        let mut bytes = std::fs::read(&path).expect("test setup");
        let (_, first) = decode(&bytes).expect("first record");
        let (_, second) = decode(&bytes[first..]).expect("second record");
        // The third record cut short, as a crash mid-write leaves it.
        bytes.truncate(first + second + 5);
        std::fs::write(&path, &bytes).expect("test setup");
        let journal = Journal::open(&dir, FsyncMode::Always).expect("open");
        let left: Vec<String> = journal
            .release_left(&LocalDecisions::default())
            .iter()
            .map(|t| t.channel.to_string())
            .collect();
        assert_eq!(left, ["a", "b"]);
        drop(journal);
        // The reopen rewrote the file as LEFT a, LEFT b. A flipped bit in the second record:
        // it (and whatever would follow) is ignored.
        let mut bytes = std::fs::read(&path).expect("test setup");
        let (_, first) = decode(&bytes).expect("first record");
        bytes[first + HEADER + 1] ^= 0x20;
        std::fs::write(&path, &bytes).expect("test setup");
        let journal = Journal::open(&dir, FsyncMode::Always).expect("open");
        assert_eq!(journal.release_left(&LocalDecisions::default()).len(), 1);
        drop(journal);
        std::fs::remove_dir_all(dir).expect("test cleanup");
    }

    #[test]
    fn a_long_life_is_compacted_to_what_it_holds() {
        let dir = temp_dir("compact");
        let keep = channel("keep");
        let churn: Vec<Holding> = (0..3 * COMPACT_RECORDS)
            .map(|n| member("busy", &format!("u{n}")))
            .collect();
        let mut steps = vec![(&keep, true)];
        for holding in &churn {
            steps.push((holding, true));
            steps.push((holding, false));
        }
        life_with(&dir, &steps, FsyncMode::Never);
        // Each record takes at least 19 bytes ("m:2:u0busy" and its frame); what is left after
        // the last rewrite is fewer than COMPACT_RECORDS records.
        let bytes = std::fs::metadata(dir.join(FILE)).expect("file").len();
        let unbounded = steps.len() as u64 * 19;
        assert!(
            bytes < unbounded / 3,
            "{bytes} bytes for {} records",
            steps.len()
        );
        let journal = Journal::open(&dir, FsyncMode::Always).expect("open");
        let left = kinds(&journal.release_left(&LocalDecisions::default()));
        assert_eq!(
            left,
            [(TransitionKind::ChannelVacated, "keep".into(), None)]
        );
        drop(journal);
        std::fs::remove_dir_all(dir).expect("test cleanup");
    }
}
