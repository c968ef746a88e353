//! The claims, ordered by a fixed 64-bit hash of their key rather than by the key itself.
//!
//! A `BTreeMap<ClaimKey, _>` compares two strings at every step of a search, and each
//! comparison follows two heap pointers: with a few hundred thousand claims that is a cache
//! miss per step, and profiling a 64-client `tob_unique` run showed `memcmp` as the largest
//! single cost on the nodes. Ordered by hash, a search compares integers held in the tree's
//! nodes and looks at a key only once, to confirm the match.
//!
//! Still a B-tree, not a hash map: iteration order (and so the snapshot's bytes) is the same on
//! every replica and in every build, and nothing ever re-sorts the whole table. The hash is
//! FNV-1a, fixed here rather than taken from the standard library, whose algorithm may change
//! between Rust releases. It is not collision-resistant: keys that collide share a bucket and
//! are told apart by comparing them, so a collision costs time, never correctness.

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tob_proto::ClaimKey;

/// Claims by key. Serialised as a map from key to value (in hash order), which is the same
/// encoding a `BTreeMap<ClaimKey, V>` had, so snapshots written before still load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ClaimTable<V> {
    buckets: BTreeMap<u64, Bucket<V>>,
    /// Applied to every hash: all ones, except in tests, which narrow it to make collisions.
    mask: u64,
}

/// The claims whose keys share a hash: almost always exactly one.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Bucket<V> {
    One(ClaimKey, V),
    Many(Vec<(ClaimKey, V)>),
}

impl<V> Default for ClaimTable<V> {
    fn default() -> Self {
        ClaimTable { buckets: BTreeMap::new(), mask: u64::MAX }
    }
}

impl<V> ClaimTable<V> {
    fn hash(&self, key: &ClaimKey) -> u64 {
        hash_of(key) & self.mask
    }

    pub fn get(&self, key: &ClaimKey) -> Option<&V> {
        match self.buckets.get(&self.hash(key))? {
            Bucket::One(k, v) => (k == key).then_some(v),
            Bucket::Many(entries) => entries.iter().find(|(k, _)| k == key).map(|(_, v)| v),
        }
    }

    pub fn get_mut(&mut self, key: &ClaimKey) -> Option<&mut V> {
        match self.buckets.get_mut(&self.hash(key))? {
            Bucket::One(k, v) => (k == key).then_some(v),
            Bucket::Many(entries) => entries.iter_mut().find(|(k, _)| k == key).map(|(_, v)| v),
        }
    }

    /// Inserts or replaces; returns the value replaced.
    pub fn insert(&mut self, key: ClaimKey, value: V) -> Option<V> {
        use std::collections::btree_map::Entry;
        let bucket = match self.buckets.entry(self.hash(&key)) {
            Entry::Vacant(slot) => {
                slot.insert(Bucket::One(key, value));
                return None;
            }
            Entry::Occupied(slot) => slot.into_mut(),
        };
        if let Some(old) = bucket.find_mut(&key) {
            return Some(std::mem::replace(old, value));
        }
        let taken = std::mem::replace(bucket, Bucket::Many(Vec::with_capacity(2)));
        let Bucket::Many(entries) = bucket else { unreachable!("just set") };
        match taken {
            Bucket::One(k, v) => entries.push((k, v)),
            Bucket::Many(others) => entries.extend(others),
        }
        entries.push((key, value));
        None
    }

    pub fn remove(&mut self, key: &ClaimKey) -> Option<V> {
        use std::collections::btree_map::Entry;
        let Entry::Occupied(mut slot) = self.buckets.entry(self.hash(key)) else { return None };
        match slot.get_mut() {
            Bucket::One(k, _) if k == key => match slot.remove() {
                Bucket::One(_, v) => Some(v),
                Bucket::Many(_) => unreachable!("matched One"),
            },
            Bucket::One(..) => None,
            Bucket::Many(entries) => {
                let at = entries.iter().position(|(k, _)| k == key)?;
                let (_, value) = entries.remove(at);
                if entries.is_empty() {
                    slot.remove();
                } else if entries.len() == 1 {
                    let (k, v) = entries.pop().expect("one left");
                    *slot.get_mut() = Bucket::One(k, v);
                }
                Some(value)
            }
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&ClaimKey, &V)> {
        self.buckets.values().flat_map(|bucket| {
            let (one, many) = match bucket {
                Bucket::One(k, v) => (Some((k, v)), &[][..]),
                Bucket::Many(entries) => (None, &entries[..]),
            };
            one.into_iter().chain(many.iter().map(|(k, v)| (k, v)))
        })
    }

    pub fn len(&self) -> usize {
        self.buckets
            .values()
            .map(|b| match b {
                Bucket::One(..) => 1,
                Bucket::Many(entries) => entries.len(),
            })
            .sum()
    }
}

impl<V> Bucket<V> {
    fn find_mut(&mut self, key: &ClaimKey) -> Option<&mut V> {
        match self {
            Bucket::One(k, v) => (k == key).then_some(v),
            Bucket::Many(entries) => entries.iter_mut().find(|(k, _)| k == key).map(|(_, v)| v),
        }
    }
}

/// FNV-1a over the namespace, a separator byte that UTF-8 never contains, and the key.
fn hash_of(key: &ClaimKey) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let bytes = key.namespace.as_bytes().iter().chain(&[0xff]).chain(key.key.as_bytes());
    for &byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

impl<V: Serialize> Serialize for ClaimTable<V> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.len()))?;
        for (key, value) in self.iter() {
            map.serialize_entry(key, value)?;
        }
        map.end()
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for ClaimTable<V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TableVisitor<V>(PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for TableVisitor<V> {
            type Value = ClaimTable<V>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map of claims")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
                let mut table = ClaimTable::default();
                while let Some((key, value)) = access.next_entry::<ClaimKey, V>()? {
                    if table.insert(key, value).is_some() {
                        return Err(serde::de::Error::custom("a claim key appears twice"));
                    }
                }
                Ok(table)
            }
        }
        deserializer.deserialize_map(TableVisitor(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(namespace: &str, key: &str) -> ClaimKey {
        ClaimKey { namespace: namespace.into(), key: key.into() }
    }

    /// Random inserts, removals and lookups against a `BTreeMap` model. With `mask` narrowed to
    /// two bits most keys share a bucket, so the collision paths run as often as the others.
    fn check_against_model(mask: u64) {
        let mut table = ClaimTable { mask, ..ClaimTable::default() };
        let mut model = BTreeMap::new();
        let mut many_seen = false;
        for i in 0..3000u32 {
            let k = key(if i % 3 == 0 { "a" } else { "b" }, &format!("{}", i * 7919 % 400));
            match i % 5 {
                0..=2 => assert_eq!(table.insert(k.clone(), i), model.insert(k, i)),
                3 => assert_eq!(table.remove(&k), model.remove(&k)),
                _ => {
                    assert_eq!(table.get(&k), model.get(&k));
                    if let Some(v) = table.get_mut(&k) {
                        *v += 1;
                        *model.get_mut(&k).unwrap() += 1;
                    }
                }
            }
            assert_eq!(table.len(), model.len());
            many_seen |= table.buckets.values().any(|b| matches!(b, Bucket::Many(_)));
            // A bucket never stays empty or holds one entry as a list.
            assert!(table.buckets.values().all(|b| match b {
                Bucket::One(..) => true,
                Bucket::Many(entries) => entries.len() >= 2,
            }));
        }
        assert_eq!(many_seen, mask != u64::MAX, "collisions only where the hash is narrowed");
        let mut listed: Vec<(ClaimKey, u32)> = table.iter().map(|(k, v)| (k.clone(), *v)).collect();
        listed.sort();
        assert_eq!(listed, model.into_iter().collect::<Vec<_>>());
    }

    #[test]
    fn behaves_like_an_ordered_map() {
        check_against_model(u64::MAX);
    }

    #[test]
    fn keys_sharing_a_hash_stay_apart() {
        check_against_model(0b11);
    }

    #[test]
    fn encodes_like_the_map_it_replaced_and_reads_it_back() {
        let mut table = ClaimTable::default();
        let mut map = BTreeMap::new();
        for i in 0..50u32 {
            table.insert(key("n", &format!("k{i}")), i);
            map.insert(key("n", &format!("k{i}")), i);
        }
        let old = postcard::to_allocvec(&map).unwrap();
        let restored: ClaimTable<u32> = postcard::from_bytes(&old).unwrap();
        assert_eq!(restored, table);
        let new = postcard::to_allocvec(&table).unwrap();
        assert_eq!(postcard::from_bytes::<BTreeMap<ClaimKey, u32>>(&new).unwrap(), map);
    }

    #[test]
    fn a_key_listed_twice_is_refused() {
        // postcard encodes a map and a list of pairs alike: length, then the entries.
        let doubled = vec![(key("n", "x"), 1u32), (key("n", "x"), 2u32)];
        let bytes = postcard::to_allocvec(&doubled).unwrap();
        assert!(postcard::from_bytes::<ClaimTable<u32>>(&bytes).is_err());
    }
}
