//! The JSON fields of an owner, written once and copied after: a record's
//! owner is most often one of the few that owned the records before it,
//! and its name, command line and cgroup do not change while it stays the
//! same process image (an `exec()` gives it new ones).

use std::sync::Arc;

use crate::model::Owner;

/// Owners remembered: a server's worker and a client, a pre-fork pool's few.
const REMEMBERED: usize = 8;

/// The fragments of the owners seen last, each with the owner it is of.
#[derive(Debug, Default)]
pub struct OwnerFragments {
    entries: Vec<(Owner, Vec<u8>)>,
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
        if let Some((_, fragment)) = self.entries.iter().find(|(seen, _)| same(seen, owner)) {
            out.extend_from_slice(fragment);
            return;
        }
        if self.entries.len() < REMEMBERED {
            let mut fragment = Vec::new();
            write(&mut fragment, owner);
            out.extend_from_slice(&fragment);
            self.entries.push((owner.clone(), fragment));
            return;
        }
        let (seen, fragment) = &mut self.entries[self.next];
        self.next = (self.next + 1) % REMEMBERED;
        fragment.clear();
        write(fragment, owner);
        out.extend_from_slice(fragment);
        *seen = owner.clone();
    }
}

/// Whether two owners are the same process with the same name and image:
/// the same shared strings, which an entry keeps alive, so that their
/// addresses cannot be taken by others meanwhile.
fn same(a: &Owner, b: &Owner) -> bool {
    let same_image = match (&a.image, &b.image) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    };
    a.pid == b.pid && Arc::ptr_eq(&a.program, &b.program) && same_image
}

#[cfg(test)]
mod tests {
    use super::*;
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
            image: Some(Arc::new(image(None, None))),
            ..nginx.clone()
        };
        fragments.write(&mut out, &exec, fields);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "[10 nginx][10 nginx][10 nginx: worker][10 nginx]"
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
}
