//! The in-memory replicated log: entries after the latest snapshot, the commit position, and
//! which entries have been handed out for persistence and for application.
//!
//! Invariants: `snapshot.index <= applied <= committed <= last_index()`, and
//! `snapshot.index < unstable_from <= last_index() + 1`.

use crate::types::{Entry, LogIndex, Snapshot, Term};

#[derive(Debug)]
pub(crate) struct RaftLog {
    /// Index and term of the last entry folded into the snapshot.
    pub snapshot_index: LogIndex,
    pub snapshot_term: Term,
    /// The latest snapshot, kept to send to followers that fell behind compaction.
    pub snapshot: Option<Snapshot>,
    /// A snapshot received from the leader that the caller has not persisted yet.
    pub pending_snapshot: Option<Snapshot>,
    /// `entries[i].index == snapshot_index + 1 + i`.
    entries: Vec<Entry>,
    pub committed: LogIndex,
    /// Last index handed to the caller for application.
    pub applied: LogIndex,
    /// First index not yet handed to the caller for persistence.
    pub unstable_from: LogIndex,
    /// Last index the caller confirmed durable (via `advance`).
    pub stable: LogIndex,
}

impl RaftLog {
    pub fn new(snapshot: Option<Snapshot>, entries: Vec<Entry>, committed: LogIndex) -> RaftLog {
        let (snapshot_index, snapshot_term) =
            snapshot.as_ref().map(|s| (s.index, s.term)).unwrap_or_default();
        let entries: Vec<Entry> =
            entries.into_iter().filter(|e| e.index > snapshot_index).collect();
        for (i, entry) in entries.iter().enumerate() {
            assert_eq!(entry.index.0, snapshot_index.0 + 1 + i as u64, "recovered log has a gap");
        }
        let last = LogIndex(snapshot_index.0 + entries.len() as u64);
        RaftLog {
            snapshot_index,
            snapshot_term,
            snapshot,
            pending_snapshot: None,
            entries,
            committed: committed.clamp(snapshot_index, last),
            applied: snapshot_index,
            unstable_from: last.next(),
            stable: last,
        }
    }

    pub fn last_index(&self) -> LogIndex {
        LogIndex(self.snapshot_index.0 + self.entries.len() as u64)
    }

    pub fn last_term(&self) -> Term {
        self.entries.last().map(|e| e.term).unwrap_or(self.snapshot_term)
    }

    /// The term at `index`, if the log still knows it (not compacted away, not beyond the end).
    pub fn term(&self, index: LogIndex) -> Option<Term> {
        if index == self.snapshot_index {
            return Some(self.snapshot_term);
        }
        self.entry(index).map(|e| e.term)
    }

    pub fn entry(&self, index: LogIndex) -> Option<&Entry> {
        if index <= self.snapshot_index {
            return None;
        }
        self.entries.get((index.0 - self.snapshot_index.0 - 1) as usize)
    }

    /// Entries in `from..=to`, at most `max_bytes` (but at least one).
    pub fn slice(&self, from: LogIndex, to: LogIndex, max_bytes: usize) -> Vec<Entry> {
        let mut out = Vec::new();
        let mut bytes = 0;
        let mut index = from;
        while index <= to {
            let Some(entry) = self.entry(index) else {
                break;
            };
            bytes += entry.size_bytes();
            if !out.is_empty() && bytes > max_bytes {
                break;
            }
            out.push(entry.clone());
            index = index.next();
        }
        out
    }

    /// §5.4.1: is a log ending at (`last_index`, `last_term`) at least as up to date as ours?
    pub fn is_up_to_date(&self, last_index: LogIndex, last_term: Term) -> bool {
        last_term > self.last_term()
            || (last_term == self.last_term() && last_index >= self.last_index())
    }

    pub fn append(&mut self, entry: Entry) {
        assert_eq!(entry.index, self.last_index().next());
        self.entries.push(entry);
    }

    /// Appends entries that follow `prev_index` from a leader, truncating a conflicting suffix.
    /// Returns the last index now known to match the leader.
    pub fn append_from_leader(&mut self, prev_index: LogIndex, entries: Vec<Entry>) -> LogIndex {
        let last_new = LogIndex(prev_index.0 + entries.len() as u64);
        for entry in entries {
            if entry.index <= self.snapshot_index {
                continue;
            }
            match self.term(entry.index) {
                Some(term) if term == entry.term => continue,
                Some(_) => {
                    assert!(
                        entry.index > self.committed,
                        "leader tried to overwrite a committed entry"
                    );
                    self.truncate_from(entry.index);
                    self.append(entry);
                }
                None => self.append(entry),
            }
        }
        last_new
    }

    fn truncate_from(&mut self, index: LogIndex) {
        let keep = (index.0 - self.snapshot_index.0 - 1) as usize;
        self.entries.truncate(keep);
        self.unstable_from = self.unstable_from.min(index);
        self.stable = self.stable.min(index.prev());
    }

    /// First index of the term that `index` belongs to (for the rejection hint).
    pub fn first_index_of_term_at(&self, index: LogIndex) -> LogIndex {
        let term = self.term(index);
        let mut first = index;
        while first.prev() > self.snapshot_index && self.term(first.prev()) == term {
            first = first.prev();
        }
        first
    }

    /// Last index whose entry has `term`, if any.
    pub fn last_index_of_term(&self, term: Term) -> Option<LogIndex> {
        self.entries.iter().rev().find(|e| e.term == term).map(|e| e.index)
    }

    pub fn commit_to(&mut self, index: LogIndex) -> bool {
        if index > self.committed {
            assert!(index <= self.last_index(), "commit beyond the log");
            self.committed = index;
            true
        } else {
            false
        }
    }

    /// Replaces the whole log with a snapshot from the leader.
    pub fn restore(&mut self, snapshot: Snapshot) {
        self.entries.clear();
        self.snapshot_index = snapshot.index;
        self.snapshot_term = snapshot.term;
        self.committed = snapshot.index;
        self.applied = snapshot.index;
        self.unstable_from = snapshot.index.next();
        self.stable = snapshot.index;
        self.snapshot = Some(snapshot.clone());
        self.pending_snapshot = Some(snapshot);
    }

    /// Drops entries up to `snapshot.index`, which the application has already applied.
    pub fn compact(&mut self, snapshot: Snapshot) {
        assert!(snapshot.index <= self.applied, "compacting beyond what was applied");
        if snapshot.index <= self.snapshot_index {
            return;
        }
        let drop = (snapshot.index.0 - self.snapshot_index.0) as usize;
        self.entries.drain(..drop);
        self.snapshot_index = snapshot.index;
        self.snapshot_term = snapshot.term;
        self.snapshot = Some(snapshot);
    }

    pub fn take_unstable(&mut self) -> Vec<Entry> {
        let from = self.unstable_from.max(self.snapshot_index.next());
        let out = self.slice(from, self.last_index(), usize::MAX);
        self.unstable_from = self.last_index().next();
        out
    }

    pub fn has_unstable(&self) -> bool {
        self.unstable_from <= self.last_index()
    }

    pub fn take_committed(&mut self) -> Vec<Entry> {
        let out = self.slice(self.applied.next(), self.committed, usize::MAX);
        self.applied = self.committed;
        out
    }

    /// Every entry currently held (after the snapshot), for checkers and tests.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }
}
