//! Parts of records written once and copied after.
//! - An owner's JSON fields: a record's owner is most often one of the few
//!   that owned the records before it, and its name, command line and
//!   cgroup do not change while it stays the same process image (an
//!   `exec()` gives it new ones) and that image was read (one still on its
//!   way when the fragment was written arrives later).
//! - A connection's endpoints: each socket's transitions (five or so from
//!   its opening to its close) show the same ones.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use rustc_hash::FxHasher;

use super::bytes;
use crate::model::{Owner, Tuple};

/// Owners remembered: a server's worker and a client, a pre-fork pool's few.
const REMEMBERED: usize = 8;

/// An owner's fragment, with the owner it is of and whether its image was
/// read when it was written.
#[derive(Debug)]
struct Entry {
    owner: Owner,
    image_read: bool,
    fragment: Vec<u8>,
}

impl Entry {
    /// Whether this is the fragment of `owner` as it is now: the same
    /// process with the same name and image (the same shared strings,
    /// which the entry keeps alive, so that their addresses cannot be
    /// taken by others meanwhile), read then as now.
    fn is_of(&self, owner: &Owner) -> bool {
        let same_image = match (&self.owner.image, &owner.image) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        self.owner.pid == owner.pid
            && Arc::ptr_eq(&self.owner.program, &owner.program)
            && same_image
            && self.image_read == owner.image().is_some()
    }
}

/// The fragments of the owners seen last.
#[derive(Debug, Default)]
pub struct OwnerFragments {
    entries: Vec<Entry>,
    /// The entry the next new owner takes once all are in use.
    next: usize,
}

impl OwnerFragments {
    /// Appends `owner`'s fragment to `out`: the remembered one, or what
    /// `write` writes (remembered then, in place of the oldest).
    pub fn write(
        &mut self,
        out: &mut Vec<u8>,
        owner: &Owner,
        write: impl Fn(&mut Vec<u8>, &Owner),
    ) {
        if let Some(entry) = self.entries.iter().find(|entry| entry.is_of(owner)) {
            out.extend_from_slice(&entry.fragment);
            return;
        }
        let index = if self.entries.len() < REMEMBERED {
            self.entries.push(Entry {
                owner: owner.clone(),
                image_read: false,
                fragment: Vec::new(),
            });
            self.entries.len() - 1
        } else {
            let oldest = self.next;
            self.next = (self.next + 1) % REMEMBERED;
            self.entries[oldest].owner = owner.clone();
            oldest
        };
        let entry = &mut self.entries[index];
        entry.image_read = owner.image().is_some();
        entry.fragment.clear();
        write(&mut entry.fragment, owner);
        out.extend_from_slice(&entry.fragment);
    }
}

/// Tuples remembered: more than the connections a host opens and closes
/// at once, in a table of 512 x 272 bytes, allocated at the first use.
const TUPLE_SLOTS: usize = 512;
/// A fragment's room: the longest endpoints take 165 bytes in JSON (two
/// IPv6 addresses of 39 characters), 96 in text.
const TUPLE_FRAGMENT_BYTES: usize = 192;

/// A tuple's fragment, in the slot its hash picks.
#[derive(Clone, Copy, Debug)]
struct TupleSlot {
    tuple: Option<Tuple>,
    len: u8,
    bytes: [u8; TUPLE_FRAGMENT_BYTES],
}

/// The fragments of the tuples seen last, one per slot: a tuple takes the
/// slot of the one before it with the same hash.
#[derive(Debug, Default)]
pub struct TupleFragments {
    slots: Vec<TupleSlot>,
}

impl TupleFragments {
    /// Appends `tuple`'s fragment to `out`: the remembered one, or what
    /// `write` writes (remembered then, if it fits its room).
    pub fn write(
        &mut self,
        out: &mut Vec<u8>,
        tuple: &Tuple,
        write: impl Fn(&mut Vec<u8>, &Tuple),
    ) {
        if self.slots.is_empty() {
            let empty = TupleSlot {
                tuple: None,
                len: 0,
                bytes: [0; TUPLE_FRAGMENT_BYTES],
            };
            self.slots = vec![empty; TUPLE_SLOTS];
        }
        let mut hasher = FxHasher::default();
        tuple.hash(&mut hasher);
        let slot = &mut self.slots[hasher.finish() as usize % TUPLE_SLOTS];
        if slot.tuple.as_ref() == Some(tuple) {
            bytes::append_prefix(out, &slot.bytes, usize::from(slot.len));
            return;
        }
        let start = out.len();
        write(out, tuple);
        let fragment = &out[start..];
        slot.tuple = None;
        if let Some(room) = slot.bytes.get_mut(..fragment.len()) {
            room.copy_from_slice(fragment);
            slot.len = fragment.len() as u8;
            slot.tuple = Some(*tuple);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ImageSlot;
    use crate::output::fixtures::{image, owner};

    fn fields(out: &mut Vec<u8>, owner: &Owner) {
        out.extend_from_slice(format!("[{} {}]", owner.pid, owner.program).as_bytes());
    }

    #[test]
    fn an_owner_renamed_or_with_a_new_image_gets_a_new_fragment() {
        let mut fragments = OwnerFragments::default();
        let nginx = owner(10, "nginx", Some(image(None, None)));
        let mut out = Vec::new();
        fragments.write(&mut out, &nginx, fields);
        fragments.write(&mut out, &nginx.clone(), |_, _| panic!("remembered"));
        let renamed = Owner {
            program: "nginx: worker".into(),
            ..nginx.clone()
        };
        fragments.write(&mut out, &renamed, fields);
        let exec = Owner {
            image: Some(ImageSlot::filled(image(None, None))),
            ..nginx.clone()
        };
        fragments.write(&mut out, &exec, fields);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "[10 nginx][10 nginx][10 nginx: worker][10 nginx]"
        );
    }

    #[test]
    fn an_image_that_arrives_after_a_fragment_was_written_gets_a_new_one() {
        let mut fragments = OwnerFragments::default();
        let slot = Arc::new(ImageSlot::default());
        let nginx = Owner {
            image: Some(slot.clone()),
            ..owner(10, "nginx", None)
        };
        let fields = |out: &mut Vec<u8>, owner: &Owner| {
            let read = owner.image().is_some();
            out.extend_from_slice(format!("[{} read {read}]", owner.pid).as_bytes());
        };
        let mut out = Vec::new();
        fragments.write(&mut out, &nginx, fields);
        fragments.write(&mut out, &nginx, |_, _| panic!("remembered"));
        slot.fill(image(None, None));
        fragments.write(&mut out, &nginx, fields);
        fragments.write(&mut out, &nginx, |_, _| panic!("remembered"));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "[10 read false][10 read false][10 read true][10 read true]"
        );
    }

    #[test]
    fn past_the_remembered_owners_the_oldest_is_written_again() {
        let mut fragments = OwnerFragments::default();
        let owners: Vec<Owner> = (0..=REMEMBERED as u32)
            .map(|pid| owner(pid, "p", None))
            .collect();
        let mut out = Vec::new();
        for owner in &owners {
            fragments.write(&mut out, owner, fields);
        }
        let mut again = Vec::new();
        fragments.write(&mut again, &owners[0], fields);
        fragments.write(&mut again, &owners[REMEMBERED], |_, _| panic!("remembered"));
        assert_eq!(String::from_utf8(again).unwrap(), "[0 p][8 p]");
    }

    #[test]
    fn a_tuple_is_written_once_until_another_takes_its_slot() {
        use crate::output::fixtures::tuples;
        let endpoints = |out: &mut Vec<u8>, tuple: &Tuple| {
            out.extend_from_slice(format!("[{} {}]", tuple.local, tuple.remote).as_bytes());
        };
        let mut fragments = TupleFragments::default();
        let all = tuples();
        let mut out = Vec::new();
        for tuple in &all {
            fragments.write(&mut out, tuple, endpoints);
        }
        let mut again = Vec::new();
        for tuple in &all {
            fragments.write(&mut again, tuple, |_, _| panic!("remembered"));
        }
        assert_eq!(again, out);
        // Every slot taken by other tuples: each is written again.
        let others = (0..u16::MAX).map(|port| Tuple {
            local: std::net::SocketAddr::from(([10, 0, 0, 1], port)),
            ..all[0]
        });
        for tuple in others {
            fragments.write(&mut Vec::new(), &tuple, endpoints);
        }
        let written_again = std::cell::Cell::new(false);
        let mut written = Vec::new();
        fragments.write(&mut written, &all[0], |out, tuple| {
            written_again.set(true);
            endpoints(out, tuple);
        });
        assert!(written_again.get());
        assert_eq!(written, out[..written.len()]);
    }

    #[test]
    fn a_fragment_longer_than_its_room_is_written_each_time() {
        use crate::output::fixtures::tuples;
        let long =
            |out: &mut Vec<u8>, _: &Tuple| out.resize(out.len() + TUPLE_FRAGMENT_BYTES + 1, b'x');
        let mut fragments = TupleFragments::default();
        let tuple = tuples()[0];
        let mut out = Vec::new();
        fragments.write(&mut out, &tuple, long);
        fragments.write(&mut out, &tuple, long);
        assert_eq!(out, vec![b'x'; 2 * (TUPLE_FRAGMENT_BYTES + 1)]);
    }
}
