//! The local write-ahead spool for usage events.
//!
//! Events are appended to numbered segment files, each record framed as
//! `[length u32 LE][CRC-32C u32 LE][JSON payload]`. A dedicated thread does
//! all file I/O and commits in groups: it takes every append waiting, writes
//! them in one call, `fsync`s once, then acknowledges each; an append returns
//! only when its event is on disk. The segment being written is never read:
//! the writer asks for a seal, which starts a new segment and leaves the old
//! one for shipping. A segment is deleted only after the database commit that
//! holds all its events. At start a fresh segment is opened and all existing
//! ones are shipped first (replay); a torn record at a segment's tail (a
//! crash mid-write) fails its CRC or length check, is reported, and the
//! segment is truncated to its last whole record.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use crc::{CRC_32_ISCSI, Crc};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::{MeteringError, UsageEvent};

const CASTAGNOLI: Crc<u32> = Crc::<u32>::new(&CRC_32_ISCSI);
const HEADER: usize = 8;
/// Larger records are corrupt by definition: an event is a few hundred bytes.
const MAX_RECORD: u32 = 1 << 20;
const EXTENSION: &str = "spool";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpoolSettings {
    /// A segment is sealed once it reaches this size.
    pub segment_bytes: u64,
    /// `fsync` each group commit. Off only for benchmarks of the rest.
    pub fsync: bool,
}

impl Default for SpoolSettings {
    fn default() -> Self {
        SpoolSettings {
            segment_bytes: 8 * 1024 * 1024,
            fsync: true,
        }
    }
}

/// Gauges of the spool, for metrics and back-pressure.
#[derive(Debug, Default)]
pub struct SpoolStats {
    /// Bytes in all segments on disk.
    bytes: AtomicU64,
    /// Events appended and not yet committed to the database.
    pending_events: AtomicU64,
    /// `finished_at_us` of the oldest pending event; 0 when none.
    oldest_pending_us: AtomicI64,
    write_errors: AtomicU64,
    /// Events of archived months set aside under `refused/`.
    refused_events: AtomicU64,
}

impl SpoolStats {
    /// Bytes in all segments on disk.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Events appended and not yet committed to the database.
    pub fn pending_events(&self) -> u64 {
        self.pending_events.load(Ordering::Relaxed)
    }

    /// `finished_at_us` of the oldest pending event; 0 when none.
    pub fn oldest_pending_us(&self) -> i64 {
        self.oldest_pending_us.load(Ordering::Relaxed)
    }

    /// Events of archived months set aside under `refused/`.
    pub fn refused_events(&self) -> u64 {
        self.refused_events.load(Ordering::Relaxed)
    }

    /// Failed attempts to write or ship usage.
    pub fn write_errors(&self) -> u64 {
        self.write_errors.load(Ordering::Relaxed)
    }

    /// `events` reached the database: no longer pending (and no oldest
    /// pending event once none is).
    pub fn shipped(&self, events: u64) {
        let _ = self
            .pending_events
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(events))
            });
        if self.pending_events() == 0 {
            self.oldest_pending_us.store(0, Ordering::Relaxed);
        }
    }

    /// A write or a shipment failed.
    pub fn count_write_error(&self) {
        self.write_errors.fetch_add(1, Ordering::Relaxed);
    }
}

/// Whether an append (or a seal) is durable; one commit's failure is shared
/// by every append it carried.
pub type Durability = Result<(), Arc<MeteringError>>;

/// Called on the spool's own thread once an append is durable (or has
/// failed). It must not block: the next commit waits for it.
pub type WhenDurable = Box<dyn FnOnce(Durability) + Send>;

/// Who hears that an append is durable.
enum Ack {
    /// An async caller awaiting the answer.
    Waiter(oneshot::Sender<Durability>),
    /// A thread that moved on; the spool runs the rest of its work.
    Then(WhenDurable),
}

impl Ack {
    fn answer(self, result: Durability) {
        match self {
            Ack::Waiter(sender) => {
                let _ = sender.send(result);
            }
            Ack::Then(then) => {
                // A completion that panics must not take the commit thread,
                // and with it all later metering, down.
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| then(result))).is_err()
                {
                    tracing::error!("usage spool: a completion panicked");
                }
            }
        }
    }
}

enum Command {
    Append(Vec<u8>, i64, Ack),
    Seal(oneshot::Sender<Durability>),
}

pub struct Spool {
    dir: PathBuf,
    commands: Mutex<Option<mpsc::Sender<Command>>>,
    current: Arc<AtomicU64>,
    stats: Arc<SpoolStats>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// A sealed segment's events, and what was cut from its tail.
#[derive(Debug)]
pub struct SegmentRead {
    pub events: Vec<UsageEvent>,
    /// Byte offset where a torn or corrupt record began, if any.
    pub truncated_at: Option<u64>,
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> MeteringError + '_ {
    move |source| MeteringError::Io {
        path: path.to_owned(),
        source,
    }
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}.{EXTENSION}"))
}

/// Segment files in `dir`, oldest first.
fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, MeteringError> {
    let mut segments = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_error(dir))? {
        let path = entry.map_err(io_error(dir))?.path();
        if path.extension().and_then(|e| e.to_str()) != Some(EXTENSION) {
            continue;
        }
        if let Some(seq) = path
            .file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| s.parse::<u64>().ok())
        {
            segments.push((seq, path));
        }
    }
    segments.sort();
    Ok(segments)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Spool {
    /// Opens the spool in `dir`, starting a new segment after any existing
    /// ones (which stay for replay).
    pub fn open(dir: &Path, settings: SpoolSettings) -> Result<Arc<Spool>, MeteringError> {
        crate::private_fs::private_dir(dir).map_err(io_error(dir))?;
        let existing = list_segments(dir)?;
        let stats = Arc::new(SpoolStats::default());
        let mut bytes = 0;
        for (_, path) in &existing {
            bytes += std::fs::metadata(path).map_err(io_error(path))?.len();
        }
        stats.bytes.store(bytes, Ordering::Relaxed);
        let seq = existing.last().map_or(1, |(seq, _)| seq + 1);
        let path = segment_path(dir, seq);
        let file = crate::private_fs::private_file()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(io_error(&path))?;
        sync_dir(dir).map_err(io_error(dir))?;
        let current = Arc::new(AtomicU64::new(seq));
        let (sender, receiver) = mpsc::channel();
        let mut committer = Committer {
            dir: dir.to_owned(),
            file,
            seq,
            size: 0,
            settings,
            current: current.clone(),
            stats: stats.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("usage-spool".to_owned())
            .spawn(move || committer.run(receiver))
            .map_err(io_error(dir))?;
        Ok(Arc::new(Spool {
            dir: dir.to_owned(),
            commands: Mutex::new(Some(sender)),
            current,
            stats,
            thread: Mutex::new(Some(thread)),
        }))
    }

    pub fn stats(&self) -> &SpoolStats {
        &self.stats
    }

    fn send(&self, command: Command) -> Result<(), MeteringError> {
        self.send_or_return(command)
            .map_err(|_| MeteringError::Stopped)
    }

    /// Queues `command` for the commit thread, or gives it back when the
    /// spool is closed.
    fn send_or_return(&self, command: Command) -> Result<(), Command> {
        let commands = self.commands.lock().unwrap_or_else(|e| e.into_inner());
        match commands.as_ref() {
            Some(sender) => sender.send(command).map_err(|refused| refused.0),
            None => Err(command),
        }
    }

    fn failed(&self, error: Arc<MeteringError>) -> MeteringError {
        self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
        Arc::try_unwrap(error).unwrap_or_else(MeteringError::Shared)
    }

    /// Appends `event` and returns once it is durable on disk.
    pub async fn append(&self, event: &UsageEvent) -> Result<(), MeteringError> {
        let payload = serde_json::to_vec(event)?;
        let (ack, done) = oneshot::channel();
        self.send(Command::Append(
            payload,
            event.finished_at_us,
            Ack::Waiter(ack),
        ))?;
        done.await
            .map_err(|_| MeteringError::Stopped)?
            .map_err(|e| self.failed(e))
    }

    /// As [`Spool::append`] without waiting: `then` runs on the spool's
    /// thread once the event is durable, or at once if it cannot be
    /// queued. For the serving workers, which must not block on an fsync
    /// and gain nothing from a trip through the async runtime.
    pub fn append_then(&self, event: &UsageEvent, then: WhenDurable) {
        let payload = match serde_json::to_vec(event) {
            Ok(payload) => payload,
            Err(e) => return then(Err(Arc::new(MeteringError::Encode(e)))),
        };
        let command = Command::Append(payload, event.finished_at_us, Ack::Then(then));
        if let Err(Command::Append(_, _, ack)) = self.send_or_return(command) {
            ack.answer(Err(Arc::new(MeteringError::Stopped)));
        }
    }

    /// Closes the segment being written (if it holds anything) so that it
    /// can be shipped.
    pub async fn seal(&self) -> Result<(), MeteringError> {
        let (ack, done) = oneshot::channel();
        self.send(Command::Seal(ack))?;
        done.await
            .map_err(|_| MeteringError::Stopped)?
            .map_err(|e| self.failed(e))
    }

    /// Sealed segments, oldest first.
    pub fn sealed_segments(&self) -> Result<Vec<PathBuf>, MeteringError> {
        let current = self.current.load(Ordering::Acquire);
        Ok(list_segments(&self.dir)?
            .into_iter()
            .filter(|(seq, _)| *seq < current)
            .map(|(_, path)| path)
            .collect())
    }

    /// Deletes a shipped segment.
    pub fn remove(&self, path: &Path) -> Result<(), MeteringError> {
        let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        std::fs::remove_file(path).map_err(io_error(path))?;
        self.stats.bytes.fetch_sub(
            len.min(self.stats.bytes.load(Ordering::Relaxed)),
            Ordering::Relaxed,
        );
        Ok(())
    }

    /// Keeps `events` the database refused (of archived months) in a file of
    /// their own under `refused/` beside the segments, synced before it
    /// returns, so the segment they came in can go; returns the file.
    pub fn set_aside(&self, events: &[UsageEvent]) -> Result<PathBuf, MeteringError> {
        let dir = self.dir.join("refused");
        crate::private_fs::private_dir(&dir).map_err(io_error(&dir))?;
        let path = dir.join(format!(
            "refused-{}-{}.jsonl",
            crate::store::now_us(),
            uuid::Uuid::new_v4().simple()
        ));
        let mut text = Vec::new();
        for event in events {
            serde_json::to_writer(&mut text, event)?;
            text.push(b'\n');
        }
        let write = || -> std::io::Result<()> {
            let mut file = crate::private_fs::private_file()
                .write(true)
                .create_new(true)
                .open(&path)?;
            std::io::Write::write_all(&mut file, &text)?;
            file.sync_all()?;
            // The name too, before the segment these came in is deleted.
            std::fs::File::open(&dir)?.sync_all()
        };
        write().map_err(io_error(&path))?;
        self.stats
            .refused_events
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        Ok(path)
    }

    /// Stops the commit thread after it has written what it was given.
    pub fn close(&self) {
        self.commands
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(thread) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = thread.join();
        }
    }
}

/// Reads a sealed segment, truncating a torn or corrupt tail in place.
pub fn read_segment(path: &Path) -> Result<SegmentRead, MeteringError> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(io_error(path))?;
    let mut events = Vec::new();
    let mut offset = 0usize;
    let mut truncated_at = None;
    while offset < bytes.len() {
        let whole = (|| {
            let header = bytes.get(offset..offset + HEADER)?;
            let len = u32::from_le_bytes(header[..4].try_into().ok()?);
            let crc = u32::from_le_bytes(header[4..].try_into().ok()?);
            if len > MAX_RECORD {
                return None;
            }
            let payload = bytes.get(offset + HEADER..offset + HEADER + len as usize)?;
            (CASTAGNOLI.checksum(payload) == crc).then_some(payload)
        })();
        let Some(payload) = whole else {
            truncated_at = Some(offset as u64);
            break;
        };
        match serde_json::from_slice::<UsageEvent>(payload) {
            Ok(event) => events.push(event),
            Err(_) => {
                truncated_at = Some(offset as u64);
                break;
            }
        }
        offset += HEADER + payload.len();
    }
    if let Some(at) = truncated_at {
        tracing::error!(
            segment = %path.display(),
            offset = at,
            lost_bytes = bytes.len() as u64 - at,
            recovered = events.len(),
            "usage spool: torn or corrupt record; truncating the segment there"
        );
        let file = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(io_error(path))?;
        file.set_len(at).map_err(io_error(path))?;
        file.sync_all().map_err(io_error(path))?;
    }
    Ok(SegmentRead {
        events,
        truncated_at,
    })
}

/// Frames one record.
pub fn frame(payload: &[u8], out: &mut Vec<u8>) {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&CASTAGNOLI.checksum(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

struct Committer {
    dir: PathBuf,
    file: File,
    seq: u64,
    size: u64,
    settings: SpoolSettings,
    current: Arc<AtomicU64>,
    stats: Arc<SpoolStats>,
}

type Acks = Vec<Ack>;

impl Committer {
    fn run(&mut self, receiver: mpsc::Receiver<Command>) {
        while let Ok(first) = receiver.recv() {
            let mut buffer = Vec::new();
            let mut acks: Acks = Vec::new();
            let mut next = Some(first);
            while let Some(command) = next.take() {
                match command {
                    Command::Append(payload, finished_at_us, ack) => {
                        frame(&payload, &mut buffer);
                        acks.push(ack);
                        let oldest = self.stats.oldest_pending_us.load(Ordering::Relaxed);
                        if oldest == 0 || finished_at_us < oldest {
                            self.stats
                                .oldest_pending_us
                                .store(finished_at_us, Ordering::Relaxed);
                        }
                    }
                    Command::Seal(ack) => {
                        let result = self
                            .commit(&mut buffer, &mut acks)
                            .and_then(|()| if self.size > 0 { self.rotate() } else { Ok(()) });
                        let _ = ack.send(result.map_err(|source| {
                            Arc::new(MeteringError::Io {
                                path: self.dir.clone(),
                                source,
                            })
                        }));
                    }
                }
                if acks.len() < 4096 {
                    next = receiver.try_recv().ok();
                }
            }
            let result = self.commit(&mut buffer, &mut acks);
            if result.is_ok()
                && self.size >= self.settings.segment_bytes
                && let Err(e) = self.rotate()
            {
                tracing::error!(error = %e, "usage spool: cannot start a new segment");
            }
        }
        // The sender is gone: everything sent has been committed above.
        let _ = self.file.sync_all();
    }

    /// Writes the buffer, syncs, and answers every waiting append.
    fn commit(&mut self, buffer: &mut Vec<u8>, acks: &mut Acks) -> std::io::Result<()> {
        if acks.is_empty() {
            return Ok(());
        }
        let result = self.file.write_all(buffer).and_then(|()| {
            if self.settings.fsync {
                self.file.sync_data()
            } else {
                Ok(())
            }
        });
        match &result {
            Ok(()) => {
                self.size += buffer.len() as u64;
                self.stats
                    .bytes
                    .fetch_add(buffer.len() as u64, Ordering::Relaxed);
                self.stats
                    .pending_events
                    .fetch_add(acks.len() as u64, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::error!(error = %e, "usage spool: write failed");
                // Cut what this commit wrote, so no torn record sits before
                // later appends (a reader stops at the first bad record).
                if let Err(e) = self.file.set_len(self.size) {
                    tracing::error!(error = %e, "usage spool: cannot cut a failed write");
                }
            }
        }
        let shared: Durability = match &result {
            Ok(()) => Ok(()),
            Err(e) => Err(Arc::new(MeteringError::Io {
                path: self.dir.clone(),
                source: std::io::Error::new(e.kind(), e.to_string()),
            })),
        };
        for ack in acks.drain(..) {
            if result.is_err() && matches!(ack, Ack::Then(_)) {
                // A waiter counts its own failure in `Spool::failed`.
                self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
            }
            ack.answer(shared.clone());
        }
        buffer.clear();
        result
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.file.sync_all()?;
        let seq = self.seq + 1;
        let path = segment_path(&self.dir, seq);
        self.file = crate::private_fs::private_file()
            .create_new(true)
            .append(true)
            .open(&path)?;
        sync_dir(&self.dir)?;
        self.seq = seq;
        self.size = 0;
        self.current.store(seq, Ordering::Release);
        Ok(())
    }
}

/// How long the writer waits between shipping rounds by default.
pub const DEFAULT_SHIP_INTERVAL: Duration = Duration::from_millis(200);

#[cfg(test)]
mod tests {
    use super::*;

    fn event(i: u32) -> UsageEvent {
        UsageEvent {
            request_id: format!("req-{i}"),
            tenant_id: "t".to_owned(),
            key_id: "k".to_owned(),
            model: "m".to_owned(),
            device_profile: "ascend-910b".to_owned(),
            prompt_tokens: i,
            cached_prompt_tokens: i / 2,
            completion_tokens: 2 * i,
            queue_time_us: 1,
            ttft_us: 2,
            total_time_us: 3,
            device_time_us: 4,
            energy_mj: 5,
            mean_power_mw: 6,
            finish_reason: crate::metering::FinishReason::Eos,
            started_at_us: 10,
            finished_at_us: 20 + i64::from(i),
        }
    }

    #[test]
    fn a_record_written_before_context_caching_reads_as_no_cache_hits() {
        let mut json = serde_json::to_value(event(3)).expect("json");
        json.as_object_mut()
            .expect("object")
            .remove("cached_prompt_tokens");
        let old: UsageEvent = serde_json::from_value(json).expect("old record");
        assert_eq!(old.cached_prompt_tokens, 0);
        assert_eq!(old.prompt_tokens, 3);
    }

    #[test]
    fn append_then_runs_after_the_event_is_durable_and_reports_a_closed_spool() {
        let dir = tempfile::tempdir().expect("dir");
        let spool = Spool::open(dir.path(), SpoolSettings::default()).expect("open");
        let (tx, rx) = std::sync::mpsc::channel();
        for i in 0..50 {
            let tx = tx.clone();
            let spool_bytes = spool.clone();
            spool.append_then(
                &event(i),
                Box::new(move |result| {
                    // Durable means written: the bytes are counted before
                    // any callback of the commit runs.
                    let written = spool_bytes.stats().bytes.load(Ordering::Relaxed);
                    let _ = tx.send((i, result, written));
                }),
            );
        }
        let mut answered: Vec<_> = (0..50).map(|_| rx.recv().expect("answer")).collect();
        answered.sort_by_key(|(i, _, _)| *i);
        for (i, result, written) in &answered {
            assert!(result.is_ok(), "event {i}: {result:?}");
            assert!(
                *written > 0,
                "event {i} answered before its bytes were written"
            );
        }
        spool.close();
        let dropped = tx.clone();
        spool.append_then(
            &event(99),
            Box::new(move |result| {
                let _ = dropped.send((99, result, 0));
            }),
        );
        let (_, result, _) = rx.recv().expect("answer after close");
        assert!(result.is_err(), "a closed spool must say so");

        let reopened = Spool::open(dir.path(), SpoolSettings::default()).expect("reopen");
        let segments = reopened.sealed_segments().expect("list");
        let events: usize = segments
            .iter()
            .map(|s| read_segment(s).expect("read").events.len())
            .sum();
        assert_eq!(events, 50, "every acknowledged event is on disk");
        reopened.close();
    }

    #[tokio::test]
    async fn a_panicking_completion_does_not_stop_metering() {
        let dir = tempfile::tempdir().expect("dir");
        let spool = Spool::open(dir.path(), SpoolSettings::default()).expect("open");
        spool.append_then(&event(1), Box::new(|_| panic!("a completion's bug")));
        spool
            .append(&event(2))
            .await
            .expect("later appends still commit");
        let (tx, rx) = tokio::sync::oneshot::channel();
        spool.append_then(
            &event(3),
            Box::new(move |result| {
                let _ = tx.send(result);
            }),
        );
        assert!(rx.await.expect("answered").is_ok());
        spool.close();
    }

    #[tokio::test]
    async fn appended_events_come_back_after_a_seal() {
        let dir = tempfile::tempdir().expect("dir");
        let spool = Spool::open(dir.path(), SpoolSettings::default()).expect("open");
        for i in 0..100 {
            spool.append(&event(i)).await.expect("append");
        }
        assert!(
            spool.sealed_segments().expect("list").is_empty(),
            "still open"
        );
        spool.seal().await.expect("seal");
        let segments = spool.sealed_segments().expect("list");
        assert_eq!(segments.len(), 1);
        let read = read_segment(&segments[0]).expect("read");
        assert_eq!(read.truncated_at, None);
        assert_eq!(read.events, (0..100).map(event).collect::<Vec<_>>());
        spool.close();
    }

    #[tokio::test]
    async fn a_torn_tail_is_cut_and_the_rest_recovered() {
        let dir = tempfile::tempdir().expect("dir");
        let spool = Spool::open(dir.path(), SpoolSettings::default()).expect("open");
        for i in 0..10 {
            spool.append(&event(i)).await.expect("append");
        }
        spool.close();
        let segment = list_segments(dir.path()).expect("list")[0].1.clone();
        let whole = std::fs::metadata(&segment).expect("meta").len();
        // A crash in the middle of the last record's write.
        let file = OpenOptions::new().write(true).open(&segment).expect("open");
        file.set_len(whole - 7).expect("tear");
        drop(file);

        let reopened = Spool::open(dir.path(), SpoolSettings::default()).expect("reopen");
        let sealed = reopened.sealed_segments().expect("list");
        assert_eq!(
            sealed,
            vec![segment.clone()],
            "the old segment is up for replay"
        );
        let read = read_segment(&segment).expect("read");
        assert_eq!(read.events.len(), 9);
        assert!(read.truncated_at.is_some());
        assert_eq!(
            read_segment(&segment).expect("again").truncated_at,
            None,
            "cut in place"
        );
        reopened.close();
    }

    #[tokio::test]
    async fn a_corrupt_record_is_detected_by_its_crc() {
        let dir = tempfile::tempdir().expect("dir");
        let spool = Spool::open(dir.path(), SpoolSettings::default()).expect("open");
        for i in 0..3 {
            spool.append(&event(i)).await.expect("append");
        }
        spool.close();
        let segment = list_segments(dir.path()).expect("list")[0].1.clone();
        let mut bytes = std::fs::read(&segment).expect("read");
        let last = bytes.len() - 3;
        bytes[last] ^= 0xff;
        std::fs::write(&segment, &bytes).expect("corrupt");
        let read = read_segment(&segment).expect("read");
        assert_eq!(read.events, (0..2).map(event).collect::<Vec<_>>());
        assert!(read.truncated_at.is_some());
    }
}
