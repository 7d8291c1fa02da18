//! The sample history in SQLite: the schema and its migrations, the one
//! writer thread, and the pool of read connections the queries use.
//!
//! One writer commits batches in transactions (WAL, so readers never block
//! it); readers use their own connections from a small pool. Rows are kept
//! in arrival order by id, with no per-row index: the chunk index
//! (`chunks`) serves time ranges and filters.

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc::{Receiver, RecvTimeoutError},
        Arc, Mutex,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use lightshark_common::Sample;
use rusqlite::{params, Connection, OpenFlags, Statement, ToSql};

use crate::{
    chunks::{self, OpenChunk},
    clock::WallClock,
    ledger::Tally,
    pcap,
    samples::{segments_of, Batch, ReaderStats},
    wire,
};

/// Schema version written to `PRAGMA user_version`. Version 1 had no
/// captured headers and a time index instead of the chunk index; it is
/// migrated in place at start.
const SCHEMA_VERSION: i64 = 2;
/// Rows per transaction at most: about 10 ms of the writer's CPU. A stop
/// waits for the transaction in progress, which on a saturated node, at
/// idle priority, takes seconds per 10,000 rows.
const MAX_ROWS_PER_COMMIT: usize = 8_192;
/// Shortest time between two commits: samples arriving within it go into
/// one transaction. Each commit rewrites the last pages it touched and the
/// open chunk's index row, so a commit per 1 ms drain cost the writer about
/// 10% more CPU at 200k packets/s; 50 ms keeps history visible at once for
/// a person and bounds what SIGKILL can take.
const COMMIT_INTERVAL: Duration = Duration::from_millis(50);
/// Readers wait this long for the writer's lock before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// What the writer has done, for the loss ledger in `/api/stats`.
#[derive(Default)]
pub struct WriterStats {
    /// Committed rows.
    pub stored: Tally,
    /// Rows lost to a storage error (disk full, I/O error).
    pub storage_dropped: Tally,
    /// Taken from the queue and not yet committed or dropped.
    pub in_flight: Tally,
    /// Stored rows deleted later, by `--data-retention` and by `--max-db-size`.
    pub deleted_by_retention: AtomicU64,
    pub deleted_by_size_cap: AtomicU64,
}

/// The database file: opened once at start, then shared by the writer thread
/// and the API's readers.
pub struct SampleStore {
    path: PathBuf,
    readers: Mutex<Vec<Connection>>,
    /// Held open for the agent's life: its flock keeps a second agent from
    /// writing the same file.
    _lock: std::fs::File,
}

/// Takes an exclusive flock on the database file (independent of SQLite's
/// own fcntl locks), so that two agents never interleave their histories.
fn lock_exclusively(path: &Path) -> anyhow::Result<std::fs::File> {
    use std::os::fd::AsRawFd as _;
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot open the database {}", path.display()))?;
    // SAFETY: flock on a file descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!(
            "another lightshark-mini is using the database {}; give this one its own --db-path",
            path.display()
        );
    }
    Ok(file)
}

impl SampleStore {
    /// Opens or creates the database and brings its schema up to date.
    /// Fails with the path in the message when it cannot be written.
    pub fn open(path: &Path) -> anyhow::Result<(SampleStore, Connection)> {
        let conn = Connection::open(path)
            .with_context(|| format!("cannot open the database {}", path.display()))?;
        let lock = lock_exclusively(path)?;
        init_schema(&conn)
            .with_context(|| format!("cannot use the database {}", path.display()))?;
        let store = SampleStore {
            path: path.to_owned(),
            readers: Mutex::new(Vec::new()),
            _lock: lock,
        };
        Ok((store, conn))
    }

    /// Runs `query` on a pooled read connection.
    pub fn read<T>(
        &self,
        query: impl FnOnce(&Connection) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let conn = self.reader()?;
        let result = query(&conn);
        self.readers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(conn);
        result
    }

    /// Bytes the history occupies on disk: the database file and its `-wal`
    /// (a file that is not there counts 0).
    pub fn disk_bytes(&self) -> u64 {
        let mut wal = self.path.clone().into_os_string();
        wal.push("-wal");
        [self.path.as_os_str(), wal.as_os_str()]
            .into_iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum()
    }

    /// Closes the pooled read connections (queries after this open new ones).
    pub fn close_readers(&self) {
        self.readers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    fn reader(&self) -> anyhow::Result<Connection> {
        if let Some(conn) = self.readers.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return Ok(conn);
        }
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .with_context(|| format!("opening {} for reading", self.path.display()))?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        Ok(conn)
    }
}

/// The columns of version 1, all still there in version 2: a `samples`
/// table without them is not ours.
const V1_COLUMNS: [&str; 11] = [
    "id",
    "ts_ms",
    "src_ip",
    "dst_ip",
    "src_port",
    "dst_port",
    "protocol",
    "length",
    "segments",
    "direction",
    "ifindex",
];

/// The chunk index (see `chunks`), made by a fresh database and by the
/// migration from version 1.
const CHUNKS_TABLE: &str = "CREATE TABLE IF NOT EXISTS chunks (
    chunk  INTEGER PRIMARY KEY,
    min_ts INTEGER NOT NULL,
    max_ts INTEGER NOT NULL,
    bloom  BLOB    NOT NULL
);";

fn init_schema(conn: &Connection) -> anyhow::Result<()> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let mut columns = conn.prepare("SELECT name FROM pragma_table_info('samples')")?;
    let columns: Vec<String> = columns
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    if !columns.is_empty()
        && !V1_COLUMNS
            .iter()
            .all(|c| columns.iter().any(|have| have == c))
    {
        bail!(
            "it has a table named samples that LightShark did not make (columns: {}); \
             use another --db-path",
            columns.join(", ")
        );
    }
    if version > SCHEMA_VERSION {
        bail!(
            "the database has schema version {version}, newer than this agent's \
             {SCHEMA_VERSION}; use a newer lightshark-mini or another --db-path"
        );
    }
    // auto_vacuum only takes effect before the first table exists, so it is
    // set on every open and matters on the first; it lets retention give
    // pages back instead of growing the file.
    conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL;")?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        log::warn!("the database is in {mode} journal mode, not WAL; readers may wait on writes");
    }
    // journal_size_limit truncates the WAL after checkpoints, so a burst
    // does not leave a large -wal file behind.
    conn.execute_batch(
        "PRAGMA synchronous = NORMAL;
         PRAGMA journal_size_limit = 67108864;",
    )?;
    if columns.is_empty() {
        let tx = conn.unchecked_transaction()?;
        tx.execute_batch(
            "CREATE TABLE samples (
                 id        INTEGER PRIMARY KEY,
                 ts_ms     INTEGER NOT NULL,
                 src_ip    BLOB    NOT NULL,
                 dst_ip    BLOB    NOT NULL,
                 src_port  INTEGER NOT NULL,
                 dst_port  INTEGER NOT NULL,
                 protocol  INTEGER NOT NULL,
                 length    INTEGER NOT NULL,
                 segments  INTEGER NOT NULL,
                 direction INTEGER NOT NULL,
                 ifindex   INTEGER NOT NULL,
                 header    BLOB
             );",
        )?;
        tx.execute_batch(CHUNKS_TABLE)?;
        tx.commit()?;
    } else if version < 2 {
        migrate_v1_to_v2(conn).context("migrating the history from schema version 1 to 2")?;
    }
    conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    Ok(())
}

/// Version 1 to 2: adds the captured-header column (empty for old rows),
/// builds the chunk index from the rows already stored, and drops the time
/// index it replaces. One transaction: a kill halfway leaves version 1,
/// migrated again at the next start.
fn migrate_v1_to_v2(conn: &Connection) -> anyhow::Result<()> {
    let started = Instant::now();
    let tx = conn.unchecked_transaction()?;
    tx.execute_batch(
        "ALTER TABLE samples ADD COLUMN header BLOB;
         DROP INDEX IF EXISTS samples_ts;",
    )?;
    tx.execute_batch(CHUNKS_TABLE)?;
    tx.execute_batch("DELETE FROM chunks;")?;
    let mut rows = 0u64;
    {
        let mut stmt = tx.prepare(
            "SELECT id, ts_ms, src_ip, dst_ip, src_port, dst_port, protocol FROM samples ORDER BY id",
        )?;
        let mut cursor = stmt.query([])?;
        let mut open: Option<OpenChunk> = None;
        while let Some(r) = cursor.next()? {
            let id: i64 = r.get(0)?;
            let chunk = open.get_or_insert_with(|| OpenChunk::starting(id));
            let src: Vec<u8> = r.get(2)?;
            let dst: Vec<u8> = r.get(3)?;
            chunk.add(
                &tx,
                id,
                r.get(1)?,
                &src,
                &dst,
                (r.get(4)?, r.get(5)?),
                r.get(6)?,
            )?;
            rows += 1;
        }
        if let Some(chunk) = open {
            chunk.save(&tx)?;
        }
    }
    tx.pragma_update(None, "user_version", 2)?;
    tx.commit()?;
    log::info!(
        "migrated the history ({rows} samples) from schema version 1 to 2 in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The running writer thread.
pub struct Writer {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Rest>,
}

/// The writer's inputs and ledgers.
pub struct WriterSetup {
    pub conn: Connection,
    pub input: Receiver<Batch>,
    pub queue: Arc<ReaderStats>,
    pub stats: Arc<WriterStats>,
    /// Delete rows older than this, if set (`--data-retention`).
    pub retention: Option<Duration>,
    /// Delete the oldest rows while the database holds more than this many
    /// bytes, if set (`--max-db-size`).
    pub max_size: Option<u64>,
}

impl Writer {
    /// Starts writing every batch from the input to the database until the
    /// sending side is closed and the queue is empty.
    pub fn spawn(setup: WriterSetup) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = stop.clone();
        let thread = thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || {
                crate::priority::background();
                write_loop(setup, &stop_flag)
            })
            .expect("spawning the SQLite writer thread");
        Writer { stop, thread }
    }

    /// Waits until every queued sample is committed (or counted as dropped).
    /// The thread stops after the commit it is in; the rest is written on
    /// the calling thread, for the reason `Reader::finish` gives.
    pub fn finish(self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Ok(rest) = self.thread.join() {
            rest.write();
        }
    }
}

/// What the writer thread hands back when stopped: the connection and the
/// queue, for the caller to commit what is left.
struct Rest {
    conn: Connection,
    input: Receiver<Batch>,
    queue: Arc<ReaderStats>,
    stats: Arc<WriterStats>,
    ids: Ids,
    failing: ErrorLog,
    /// A batch taken from the queue just as the stop came.
    first: Option<Batch>,
}

impl Rest {
    /// Commits every queued batch until the sending side is gone, then
    /// folds the WAL into the database file, so that the file alone holds
    /// the whole history once the agent has stopped.
    fn write(mut self) {
        let queued = std::iter::from_fn(|| self.input.recv().ok());
        for batch in self.first.take().into_iter().chain(queued) {
            commit(
                &self.conn,
                &mut self.ids,
                batch,
                &self.input,
                &self.queue,
                &self.stats,
                &mut self.failing,
            );
        }
        if let Err(e) = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        {
            log::warn!("final checkpoint of the database failed: {e}");
        }
    }
}

/// How long the writer waits for samples before looking at retention.
const IDLE_WAKE: Duration = Duration::from_secs(1);
/// Rows deleted per housekeeping step: small enough that a step takes a
/// few milliseconds, so sample writes between steps never wait long.
const DELETE_BATCH: usize = 5_000;

fn write_loop(setup: WriterSetup, stop: &AtomicBool) -> Rest {
    let WriterSetup {
        conn,
        input,
        queue,
        stats,
        retention,
        max_size,
    } = setup;
    let mut failing = ErrorLog::default();
    let mut ids = match Ids::resume(&conn) {
        Ok(ids) => ids,
        Err(e) => {
            // Without the next id nothing can be stored; the agent keeps
            // counting and says why history stays empty.
            log::error!("cannot write to the history: {e:#}");
            Ids::fresh()
        }
    };
    // Housekeeping runs at start (old rows from earlier runs) and then at
    // most once a second, and keeps going step by step, between sample
    // commits, while there is more to delete.
    let mut housekeeping_due = Instant::now();
    let first = loop {
        // With deleting still to do, only look for samples, never wait.
        let wait = housekeeping_due
            .saturating_duration_since(Instant::now())
            .min(IDLE_WAKE);
        match input.recv_timeout(wait) {
            Ok(first) if stop.load(Ordering::SeqCst) => break Some(first),
            Ok(first) => commit(&conn, &mut ids, first, &input, &queue, &stats, &mut failing),
            Err(RecvTimeoutError::Timeout) if stop.load(Ordering::SeqCst) => break None,
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break None,
        }
        if Instant::now() >= housekeeping_due {
            match housekeeping(&conn, retention, max_size, &stats) {
                Ok(true) => {}
                Ok(false) => housekeeping_due = Instant::now() + IDLE_WAKE,
                Err(e) => {
                    failing.report(format_args!("could not delete old history: {e:#}"));
                    housekeeping_due = Instant::now() + IDLE_WAKE;
                }
            }
        }
    };
    Rest {
        conn,
        input,
        queue,
        stats,
        ids,
        failing,
        first,
    }
}

/// One step of deleting what retention and the size cap want gone, oldest
/// first; returns whether more may be left to delete.
fn housekeeping(
    conn: &Connection,
    retention: Option<Duration>,
    max_size: Option<u64>,
    stats: &WriterStats,
) -> rusqlite::Result<bool> {
    if let Some(keep) = retention {
        let n = delete_oldest(conn, WallClock::now_unix_ms() - keep.as_millis() as i64)?;
        stats
            .deleted_by_retention
            .fetch_add(n as u64, Ordering::Relaxed);
        if n == DELETE_BATCH {
            return Ok(true);
        }
    }
    if let Some(cap) = max_size {
        if used_bytes(conn)? > cap {
            let n = delete_oldest(conn, i64::MAX)?;
            stats
                .deleted_by_size_cap
                .fetch_add(n as u64, Ordering::Relaxed);
            return Ok(n > 0);
        }
    }
    // The index rows of chunks whose samples are all gone.
    conn.prepare_cached(
        "DELETE FROM chunks WHERE chunk < coalesce((SELECT min(id) FROM samples) / ?1, 1 << 62)",
    )?
    .execute([chunks::CHUNK_ROWS])?;
    Ok(false)
}

/// Bytes of the database in use: its pages less the free ones, which new
/// rows reuse before the file grows.
fn used_bytes(conn: &Connection) -> rusqlite::Result<u64> {
    let pragma = |name: &str| conn.query_row(&format!("PRAGMA {name}"), [], |r| r.get::<_, i64>(0));
    let pages = pragma("page_count")? - pragma("freelist_count")?;
    Ok((pages.max(0) as u64) * pragma("page_size")? as u64)
}

/// The id the next sample gets and the chunk it falls in. Ids are given by
/// the writer, in arrival order, so that the chunk index can be kept in
/// memory and written once per commit.
struct Ids {
    next: i64,
    chunk: OpenChunk,
    last_commit: Instant,
}

impl Ids {
    fn resume(conn: &Connection) -> rusqlite::Result<Ids> {
        let next: i64 =
            conn.query_row("SELECT coalesce(max(id), 0) + 1 FROM samples", [], |r| {
                r.get(0)
            })?;
        Ok(Ids {
            next,
            chunk: OpenChunk::resume(conn, next)?,
            last_commit: Instant::now(),
        })
    }

    fn fresh() -> Ids {
        Ids {
            next: 1,
            chunk: OpenChunk::starting(1),
            last_commit: Instant::now(),
        }
    }
}

/// Commits `first` and whatever else is queued, up to a transaction's worth.
fn commit(
    conn: &Connection,
    ids: &mut Ids,
    first: Batch,
    input: &Receiver<Batch>,
    queue: &ReaderStats,
    stats: &WriterStats,
    failing: &mut ErrorLog,
) {
    let mut batches = vec![first];
    let mut rows = batches[0].samples.len();
    let deadline = ids.last_commit + COMMIT_INTERVAL;
    while rows < MAX_ROWS_PER_COMMIT {
        match input.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(b) => {
                rows += b.samples.len();
                batches.push(b);
            }
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
        }
    }
    ids.last_commit = Instant::now();
    let segments = segments_of(batches.iter().flat_map(|b| &b.samples));
    let rows = rows as u64;
    queue.queued.sub(rows, segments);
    stats.in_flight.add(rows, segments);
    let next = ids.next;
    let result = insert(conn, ids, &batches);
    if result.is_err() {
        // Rolled back: the ids are free again (the chunk's filter may keep
        // a few extra bits, which only costs a query a look).
        ids.next = next;
    }
    stats.in_flight.sub(rows, segments);
    match result {
        Ok(()) => stats.stored.add(rows, segments),
        Err(e) => {
            stats.storage_dropped.add(rows, segments);
            failing.report(format_args!(
                "could not store {rows} samples (counted as dropped): {e:#}"
            ));
        }
    }
}

/// Logs a storage failure at most once a minute: one line is enough to say
/// storage is failing, and the counters say how much.
#[derive(Default)]
struct ErrorLog {
    last: Option<Instant>,
}

impl ErrorLog {
    fn report(&mut self, message: std::fmt::Arguments) {
        if self
            .last
            .is_none_or(|t| t.elapsed() > Duration::from_secs(60))
        {
            log::error!("{message}");
            self.last = Some(Instant::now());
        }
    }
}

/// Deletes up to [`DELETE_BATCH`] of the oldest rows stamped before
/// `before_ms`, looking at the oldest rows by id (arrival order, so by
/// time); returns how many.
fn delete_oldest(conn: &Connection, before_ms: i64) -> rusqlite::Result<usize> {
    conn.prepare_cached(
        "DELETE FROM samples WHERE id IN
             (SELECT id FROM samples ORDER BY id LIMIT ?2) AND ts_ms < ?1",
    )?
    .execute(params![before_ms, DELETE_BATCH as i64])
}

/// Rows bound into one INSERT: a statement per row spent more on running
/// the statement (step, reset, cursors) than on the row itself.
const ROWS_PER_INSERT: usize = 32;
/// Columns of a stored sample, in the order [`bind_row`] binds them.
const SAMPLE_COLUMNS: &str =
    "id, ts_ms, src_ip, dst_ip, src_port, dst_port, protocol, length, segments, direction, ifindex, header";
const PARAMS_PER_ROW: usize = 12;

/// An INSERT of `rows` samples.
fn insert_sql(rows: usize) -> String {
    let row = format!("({})", ["?"; PARAMS_PER_ROW].join(","));
    format!(
        "INSERT INTO samples ({SAMPLE_COLUMNS}) VALUES {}",
        vec![row; rows].join(",")
    )
}

fn insert(conn: &Connection, ids: &mut Ids, batches: &[Batch]) -> anyhow::Result<()> {
    let tx = conn.unchecked_transaction()?;
    {
        let rows: Vec<(i64, &Sample, &[u8])> = batches
            .iter()
            .flat_map(|b| {
                b.iter()
                    .map(|(s, bytes)| (b.clock.unix_ms(s.timestamp_ns), s, bytes))
            })
            .collect();
        let mut groups = rows.chunks_exact(ROWS_PER_INSERT);
        let mut many = tx.prepare_cached(&insert_sql(ROWS_PER_INSERT))?;
        for group in &mut groups {
            for (i, row) in group.iter().enumerate() {
                bind_row(&tx, &mut many, i * PARAMS_PER_ROW, ids, *row)?;
            }
            many.raw_execute()?;
        }
        let mut one = tx.prepare_cached(&insert_sql(1))?;
        for row in groups.remainder() {
            bind_row(&tx, &mut one, 0, ids, *row)?;
            one.raw_execute()?;
        }
    }
    ids.chunk.save(&tx)?;
    tx.commit()?;
    Ok(())
}

/// Binds one sample as the parameters after `at`, gives it the next id and
/// adds it to the open chunk's index.
fn bind_row(
    tx: &Connection,
    stmt: &mut Statement,
    at: usize,
    ids: &mut Ids,
    (ts, s, bytes): (i64, &Sample, &[u8]),
) -> rusqlite::Result<()> {
    let k = &s.key;
    let width = wire::address_width(k.family);
    let (src, dst) = (&k.src_addr[..width], &k.dst_addr[..width]);
    let mut framed = Vec::new();
    let header = pcap::as_ethernet(s, bytes, &mut framed);
    let values: [&dyn ToSql; PARAMS_PER_ROW] = [
        &ids.next,
        &ts,
        &src,
        &dst,
        &k.src_port,
        &k.dst_port,
        &k.protocol,
        &s.wire_len,
        &s.segments,
        &s.direction,
        &k.ifindex,
        &header,
    ];
    for (i, v) in values.into_iter().enumerate() {
        stmt.raw_bind_parameter(at + i + 1, v)?;
    }
    ids.chunk.add(
        tx,
        ids.next,
        ts,
        src,
        dst,
        (k.src_port, k.dst_port),
        k.protocol,
    )?;
    ids.next += 1;
    Ok(())
}
