use std::sync::atomic::{AtomicU64, Ordering};

use tob_raft::{EntryKind, NodeId};

use super::*;

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!("tob-wal-test-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn entry(index: u64, term: u64) -> Entry {
    Entry {
        index: LogIndex(index),
        term: Term(term),
        kind: EntryKind::Command(vec![index as u8; 10]),
    }
}

fn hs(term: u64, commit: u64) -> HardState {
    HardState { term: Term(term), voted_for: Some(NodeId(1)), commit: LogIndex(commit) }
}

fn open(dir: &TempDir) -> (Wal, Recovered) {
    Wal::open(&dir.0, WalConfig::default()).expect("opens")
}

#[test]
fn recovers_what_was_synced_with_conflicting_suffixes_replaced() {
    let dir = TempDir::new();
    let (mut wal, recovered) = open(&dir);
    assert!(recovered.entries.is_empty() && recovered.snapshot.is_none());
    wal.append(None, &[entry(1, 1), entry(2, 1), entry(3, 1)], Some(hs(1, 0))).unwrap();
    wal.append(None, &[entry(3, 2), entry(4, 2)], Some(hs(2, 2))).unwrap();
    wal.sync().unwrap();
    drop(wal);
    let (_, recovered) = open(&dir);
    assert_eq!(recovered.entries, vec![entry(1, 1), entry(2, 1), entry(3, 2), entry(4, 2)]);
    assert_eq!(recovered.hard_state, hs(2, 2));
}

#[test]
fn a_torn_final_write_is_truncated() {
    let dir = TempDir::new();
    let (mut wal, _) = open(&dir);
    wal.append(None, &[entry(1, 1)], Some(hs(1, 0))).unwrap();
    wal.sync().unwrap();
    drop(wal);
    let path = segment_path(&dir.0, 1);
    let good_len = fs::metadata(&path).unwrap().len();
    // Half of a second frame reached the disk before the power went.
    let (mut wal, _) = open(&dir);
    wal.append(None, &[entry(2, 1), entry(3, 1)], None).unwrap();
    wal.sync().unwrap();
    drop(wal);
    let full_len = fs::metadata(&path).unwrap().len();
    OpenOptions::new().write(true).open(&path).unwrap().set_len((good_len + full_len) / 2).unwrap();
    let (_, recovered) = open(&dir);
    assert_eq!(recovered.entries, vec![entry(1, 1)]);
    assert_eq!(fs::metadata(&path).unwrap().len(), good_len, "torn tail truncated");
}

#[test]
fn corruption_before_the_tail_refuses_to_start_naming_file_and_offset() {
    let dir = TempDir::new();
    let (mut wal, _) = open(&dir);
    wal.append(None, &[entry(1, 1)], Some(hs(1, 0))).unwrap();
    wal.append(None, &[entry(2, 1)], None).unwrap();
    wal.sync().unwrap();
    drop(wal);
    let path = segment_path(&dir.0, 1);
    let mut bytes = fs::read(&path).unwrap();
    bytes[FRAME_HEADER_BYTES + 3] ^= 0xff; // inside the first frame's payload
    fs::write(&path, &bytes).unwrap();
    match Wal::open(&dir.0, WalConfig::default()) {
        Err(WalError::Corrupt { path: p, offset, reason }) => {
            assert_eq!(p, path);
            assert_eq!(offset, 0);
            assert!(reason.contains("checksum"), "{reason}");
        }
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("opened a corrupt log"),
    }
    // Nothing was truncated: the evidence is kept.
    assert_eq!(fs::read(&path).unwrap(), bytes);
}

#[test]
fn segments_rotate_and_compaction_keeps_what_the_snapshot_does_not_cover() {
    let dir = TempDir::new();
    let config = WalConfig { segment_bytes_max: 200, ..WalConfig::default() };
    let (mut wal, _) = Wal::open(&dir.0, config.clone()).unwrap();
    for i in 1..=40 {
        wal.append(None, &[entry(i, 1)], Some(hs(1, i.saturating_sub(1)))).unwrap();
        wal.sync().unwrap();
    }
    let before = wal.segment_count();
    assert!(before > 5, "segments rotate ({before})");
    let snapshot = Snapshot {
        index: LogIndex(30),
        term: Term(1),
        voters: vec![NodeId(1)],
        data: b"state".to_vec(),
    };
    wal.compact(&snapshot).unwrap();
    assert!(wal.segment_count() < before, "covered segments deleted");
    drop(wal);
    let (_, recovered) = Wal::open(&dir.0, config).unwrap();
    assert_eq!(recovered.snapshot, Some(snapshot));
    assert_eq!(recovered.entries.first().map(|e| e.index.0), Some(31));
    assert_eq!(recovered.entries.last().map(|e| e.index.0), Some(40));
    assert_eq!(recovered.hard_state, hs(1, 39));
}

#[test]
fn a_snapshot_written_elsewhere_reads_back_and_unfinished_ones_are_cleared_by_compaction() {
    let dir = TempDir::new();
    let (mut wal, _) = open(&dir);
    let snapshot =
        Snapshot { index: LogIndex(7), term: Term(2), voters: vec![NodeId(1)], data: vec![9; 50] };
    write_snapshot(&dir.0, &snapshot).unwrap();
    assert_eq!(read_snapshot(&dir.0, 7).unwrap(), snapshot);
    assert!(read_snapshot(&dir.0, 8).is_err(), "no file at 8");
    // Left by writers killed midway: one older than the snapshot, one newer (maybe underway).
    let stale = dir.0.join(format!("snapshot-{:020}.tmp", 3));
    let underway = dir.0.join(format!("snapshot-{:020}.tmp", 9));
    fs::write(&stale, b"half").unwrap();
    fs::write(&underway, b"half").unwrap();
    wal.forget_covered(7).unwrap();
    assert!(!stale.exists(), "an unfinished older snapshot is removed");
    assert!(underway.exists(), "a newer one may still be being written");
    assert_eq!(read_snapshot(&dir.0, 7).unwrap(), snapshot);
}

#[test]
fn an_installed_snapshot_replaces_the_log() {
    let dir = TempDir::new();
    let (mut wal, _) = open(&dir);
    wal.append(None, &[entry(1, 1), entry(2, 1)], Some(hs(1, 1))).unwrap();
    let snapshot =
        Snapshot { index: LogIndex(10), term: Term(3), voters: vec![NodeId(1)], data: vec![7] };
    wal.append(Some(&snapshot), &[], Some(hs(3, 10))).unwrap();
    wal.append(None, &[entry(11, 3)], None).unwrap();
    wal.sync().unwrap();
    drop(wal);
    let (_, recovered) = open(&dir);
    assert_eq!(recovered.snapshot.map(|s| s.index), Some(LogIndex(10)));
    assert_eq!(recovered.entries, vec![entry(11, 3)]);
}

#[test]
fn a_corrupt_snapshot_refuses_to_start() {
    let dir = TempDir::new();
    let (mut wal, _) = open(&dir);
    let snapshot =
        Snapshot { index: LogIndex(5), term: Term(1), voters: vec![NodeId(1)], data: vec![1; 100] };
    wal.compact(&snapshot).unwrap();
    drop(wal);
    let path = snapshot_path(&dir.0, 5);
    let mut bytes = fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(&path, bytes).unwrap();
    assert!(matches!(Wal::open(&dir.0, WalConfig::default()), Err(WalError::Corrupt { .. })));
}

#[test]
fn a_damaged_frame_header_in_the_middle_is_corruption_not_a_tail() {
    let dir = TempDir::new();
    let (mut wal, _) = open(&dir);
    wal.append(None, &[entry(1, 1)], Some(hs(1, 0))).unwrap();
    wal.sync().unwrap();
    let path = segment_path(&dir.0, 1);
    wal.append(None, &[entry(2, 1)], None).unwrap();
    wal.append(None, &[entry(3, 1)], None).unwrap();
    wal.sync().unwrap();
    drop(wal);
    let mut bytes = fs::read(&path).unwrap();
    let second_frame_at = frame_starts(&bytes)[1];
    bytes[second_frame_at] ^= 0xff; // its magic
    fs::write(&path, &bytes).unwrap();
    match Wal::open(&dir.0, WalConfig::default()) {
        Err(WalError::Corrupt { offset, .. }) => assert_eq!(offset, second_frame_at as u64),
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("opened a corrupt log"),
    }
    // Zeros after the last frame (space extended, never written) are a tail.
    let (mut wal, _) = {
        bytes[second_frame_at] ^= 0xff;
        bytes.extend_from_slice(&[0; 100]);
        fs::write(&path, &bytes).unwrap();
        open(&dir)
    };
    wal.sync().unwrap();
    drop(wal);
    let (_, recovered) = open(&dir);
    assert_eq!(recovered.entries.len(), 3);
}

fn open_reserving(dir: &TempDir, bytes: u64) -> (Wal, Recovered) {
    let config = WalConfig { segment_bytes_max: bytes, ..WalConfig::default() };
    Wal::open(&dir.0, config).expect("opens")
}

/// Where each frame of a segment starts, read from the frame headers.
fn frame_starts(bytes: &[u8]) -> Vec<usize> {
    let mut starts = Vec::new();
    let mut at = 0;
    while bytes.len() >= at + FRAME_HEADER_BYTES && bytes[at..at + 4] == FRAME_MAGIC {
        starts.push(at);
        at += FRAME_HEADER_BYTES
            + u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
    }
    starts.push(at);
    starts
}

#[test]
fn space_is_reserved_written_in_place_and_given_back_on_close() {
    let dir = TempDir::new();
    let path = segment_path(&dir.0, 1);
    let (mut wal, _) = open_reserving(&dir, 1 << 20);
    assert_eq!(fs::metadata(&path).unwrap().len(), 1 << 20, "reserved when opened");
    wal.append(None, &[entry(1, 1)], Some(hs(1, 0))).unwrap();
    wal.append(None, &[entry(2, 1)], None).unwrap();
    wal.sync().unwrap();
    assert_eq!(fs::metadata(&path).unwrap().len(), 1 << 20, "frames written inside it");
    drop(wal);
    let written = fs::read(&path).unwrap();
    assert_eq!(frame_starts(&written).len(), 3, "two frames and nothing after them");
    assert_eq!(*frame_starts(&written).last().unwrap(), written.len());
    let (_, recovered) = open_reserving(&dir, 1 << 20);
    assert_eq!(recovered.entries, vec![entry(1, 1), entry(2, 1)]);
}

#[test]
fn a_crash_leaves_reserved_zeros_that_replay_reads_as_the_end() {
    let dir = TempDir::new();
    let path = segment_path(&dir.0, 1);
    let (mut wal, _) = open_reserving(&dir, 1 << 20);
    wal.append(None, &[entry(1, 1)], Some(hs(1, 0))).unwrap();
    wal.sync().unwrap();
    wal.append(None, &[entry(2, 1), entry(3, 1)], None).unwrap();
    wal.sync().unwrap();
    std::mem::forget(wal); // killed: nothing trimmed
    let bytes = fs::read(&path).unwrap();
    assert_eq!(bytes.len(), 1 << 20);
    let starts = frame_starts(&bytes);

    // Intact frames followed by zeros: everything comes back.
    let (wal, recovered) = open_reserving(&dir, 1 << 20);
    assert_eq!(recovered.entries, vec![entry(1, 1), entry(2, 1), entry(3, 1)]);
    std::mem::forget(wal);

    // The second frame torn inside the reserved space: its last bytes never reached the disk
    // and read as zeros. Dropped, and the file cut where it began.
    let mut torn = bytes.clone();
    torn[starts[2] - 4..starts[2]].fill(0);
    fs::write(&path, &torn).unwrap();
    let (wal, recovered) = open_reserving(&dir, 1 << 20);
    assert_eq!(recovered.entries, vec![entry(1, 1)]);
    drop(wal);
    assert_eq!(fs::metadata(&path).unwrap().len(), starts[1] as u64);

    // A torn header (only part of the magic written) at the end of reserved space: the end.
    let mut torn_header = bytes[..starts[1]].to_vec();
    torn_header.extend_from_slice(&FRAME_MAGIC[..2]);
    torn_header.resize(1 << 20, 0);
    fs::write(&path, &torn_header).unwrap();
    let (_, recovered) = open_reserving(&dir, 1 << 20);
    assert_eq!(recovered.entries, vec![entry(1, 1)]);

    // But a damaged frame with a whole frame after it is corruption, reserved space or not.
    let mut corrupt = bytes.clone();
    corrupt[starts[0] + FRAME_HEADER_BYTES] ^= 0xff;
    fs::write(&path, &corrupt).unwrap();
    match Wal::open(&dir.0, WalConfig { segment_bytes_max: 1 << 20, ..WalConfig::default() }) {
        Err(WalError::Corrupt { offset, .. }) => assert_eq!(offset, 0),
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("opened a corrupt log"),
    }
    assert_eq!(fs::read(&path).unwrap(), corrupt, "the evidence is kept");
}

#[test]
fn a_blank_directory_rejoins_until_the_marker_is_forgotten() {
    let dir = TempDir::new();
    let marker = dir.0.join(REJOIN_MARKER);
    let (mut wal, recovered) = open(&dir);
    assert!(recovered.rejoining, "a blank directory rejoins");
    assert!(marker.exists(), "the marker is written before the node can send anything");
    wal.append(None, &[entry(1, 1)], Some(hs(1, 0))).unwrap();
    wal.sync().unwrap();
    drop(wal);
    // Restarted before the rejoin ended: still rejoining, although it now has a term.
    let (mut wal, recovered) = open(&dir);
    assert!(recovered.rejoining);
    wal.forget_rejoin().unwrap();
    assert!(!marker.exists());
    wal.forget_rejoin().unwrap(); // idempotent
    drop(wal);
    let (_, recovered) = open(&dir);
    assert!(!recovered.rejoining, "rejoined and a term on disk: an ordinary restart");
    assert_eq!(recovered.entries, vec![entry(1, 1)]);
    // The log deleted (a snapshot or nothing left): term 0 again, so it rejoins again.
    for segment in segment_numbers(&dir.0).unwrap() {
        fs::remove_file(segment_path(&dir.0, segment)).unwrap();
    }
    let (_, recovered) = open(&dir);
    assert!(recovered.rejoining);
    assert!(marker.exists());
}
