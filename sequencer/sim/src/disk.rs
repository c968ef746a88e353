//! A simulated disk with an append-only write-ahead log. Writes are volatile until `sync`; a
//! crash keeps what was synced plus a random prefix of what was not, and the last record kept
//! may be torn (recovery's checksum then drops its tail). Snapshots are written atomically.

use tob_raft::{Entry, HardState, Ready, Recovered, Snapshot, SplitMix64};

#[derive(Debug, Clone)]
enum Record {
    /// A snapshot from the leader: replaces the whole log.
    Snapshot(Snapshot),
    /// Delete entries from the first one's index on, then append.
    Entries(Vec<Entry>),
    HardState(HardState),
    /// The rejoin after a lost disk is over: delete the marker.
    Rejoined,
}

#[derive(Debug, Clone, Default)]
pub struct Disk {
    hard_state: HardState,
    snapshot: Option<Snapshot>,
    entries: Vec<Entry>,
    pending: Vec<Record>,
    /// The marker the server writes on an empty data directory, durably, before anything else
    /// (see `tob_raft::Recovered::rejoining`).
    rejoining: bool,
}

impl Disk {
    /// A blank disk, as on a node's first start or after its disk was lost.
    pub fn empty() -> Disk {
        Disk { rejoining: true, ..Disk::default() }
    }

    /// Writes a Ready's durable parts, in the order of the persistence contract.
    pub fn write(&mut self, ready: &Ready) {
        if let Some(snapshot) = &ready.snapshot {
            self.pending.push(Record::Snapshot(snapshot.clone()));
        }
        if !ready.entries.is_empty() {
            self.pending.push(Record::Entries(ready.entries.clone()));
        }
        if let Some(hard_state) = ready.hard_state {
            self.pending.push(Record::HardState(hard_state));
        }
        if ready.rejoined {
            self.pending.push(Record::Rejoined);
        }
    }

    /// fsync: everything written so far becomes durable.
    pub fn sync(&mut self) {
        for record in std::mem::take(&mut self.pending) {
            self.apply(record);
        }
    }

    /// A snapshot of the local state machine, written to its own file and renamed into place.
    pub fn install_local_snapshot(&mut self, snapshot: Snapshot) {
        assert!(self.pending.is_empty(), "snapshots are taken between group commits");
        self.entries.retain(|e| e.index > snapshot.index);
        self.snapshot = Some(snapshot);
    }

    /// Power loss: unsynced records survive only as a prefix, the last one possibly torn.
    pub fn crash(&mut self, rng: &mut SplitMix64) {
        let pending = std::mem::take(&mut self.pending);
        let kept = rng.range(0, pending.len() as u64 + 1) as usize;
        let mut records = pending.into_iter();
        for record in records.by_ref().take(kept) {
            self.apply(record);
        }
        if let Some(Record::Entries(entries)) = records.next() {
            // Torn: only whole entries before the tear pass the checksum.
            let survive = rng.range(0, entries.len() as u64 + 1) as usize;
            if survive > 0 {
                self.apply(Record::Entries(entries[..survive].to_vec()));
            }
        }
    }

    pub fn recover(&self) -> Recovered {
        assert!(self.pending.is_empty());
        Recovered {
            hard_state: self.hard_state,
            snapshot: self.snapshot.clone(),
            entries: self.entries.clone(),
            rejoining: self.rejoining,
        }
    }

    fn apply(&mut self, record: Record) {
        match record {
            Record::Snapshot(snapshot) => {
                self.entries.clear();
                self.snapshot = Some(snapshot);
            }
            Record::HardState(hard_state) => self.hard_state = hard_state,
            Record::Rejoined => self.rejoining = false,
            Record::Entries(entries) => {
                let base = self.snapshot.as_ref().map(|s| s.index.0).unwrap_or(0);
                let first = entries[0].index.0;
                self.entries.retain(|e| e.index.0 < first);
                for entry in entries.into_iter().filter(|e| e.index.0 > base) {
                    assert_eq!(entry.index.0, base + 1 + self.entries.len() as u64, "WAL gap");
                    self.entries.push(entry);
                }
            }
        }
    }
}
