//! Just enough of the BPF Type Format to find where a struct member lives.
//!
//! Rust eBPF has no CO-RE, so the programs read kernel struct fields at
//! offsets taken from the running kernel's BTF (/sys/kernel/btf/vmlinux)
//! and passed in as globals.

use std::collections::HashMap;
use std::sync::OnceLock;

use netwatch_common::{FILE_OFFSETS, SOCK_OFFSETS, TASK_OFFSETS};

/// Where the kernel exposes its own BTF.
pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
/// Kinds that only qualify or rename another type.
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;

/// Why a member offset could not be found.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum BtfError {
    #[error("the BTF data is malformed ({0})")]
    Malformed(&'static str),
    #[error("struct {0} is not in the kernel's BTF")]
    NoStruct(String),
    #[error("struct {0} has no member {1}")]
    NoMember(String, String),
    #[error("{0}.{1} is a bitfield")]
    Bitfield(String, String),
}

/// Why the offsets a program needs are unknown.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum OffsetsError {
    #[error("cannot read {VMLINUX}: {0}")]
    Unreadable(String),
    #[error(transparent)]
    Btf(#[from] BtfError),
    #[error("no offset is declared for the global {0}")]
    Undeclared(&'static str),
}

/// Every member offset a program reads, by the global the loader sets.
type MemberOffsets = HashMap<&'static str, Result<u32, BtfError>>;

/// The offsets of the kernel struct members named in `fields` (global,
/// struct, member), for the loader to set. The kernel's BTF (megabytes) is
/// parsed once per process, at the first call, and only the offsets of
/// every field in `netwatch_common` are kept.
pub fn kernel_offsets(
    fields: &[(&'static str, &str, &str)],
) -> Result<Vec<(&'static str, u32)>, OffsetsError> {
    static KNOWN: OnceLock<Result<MemberOffsets, OffsetsError>> = OnceLock::new();
    let known = KNOWN
        .get_or_init(read_member_offsets)
        .as_ref()
        .map_err(Clone::clone)?;
    fields
        .iter()
        .map(|&(global, _, _)| match known.get(global) {
            Some(offset) => Ok((global, offset.clone()?)),
            None => Err(OffsetsError::Undeclared(global)),
        })
        .collect()
}

fn read_member_offsets() -> Result<MemberOffsets, OffsetsError> {
    let btf = Btf::from_kernel().map_err(|err| OffsetsError::Unreadable(err.to_string()))?;
    let declared = SOCK_OFFSETS
        .iter()
        .chain(&FILE_OFFSETS)
        .chain(&TASK_OFFSETS);
    Ok(declared
        .map(|&(global, ty, member)| (global, btf.member_offset(ty, member)))
        .collect())
}

#[derive(Clone, Copy, Debug)]
struct Member {
    name_off: u32,
    type_id: u32,
    bit_offset: u32,
    bitfield: bool,
}

#[derive(Debug)]
struct Type {
    kind: u32,
    name_off: u32,
    /// The referenced type, for typedefs and qualifiers.
    target: u32,
    members: Vec<Member>,
}

/// Parsed types and strings of one BTF blob.
#[derive(Debug)]
pub struct Btf {
    types: Vec<Type>,
    strings: Vec<u8>,
    structs: HashMap<String, u32>,
}

impl Btf {
    /// Reads the running kernel's BTF.
    pub fn from_kernel() -> std::io::Result<Btf> {
        let data = std::fs::read(VMLINUX)?;
        Btf::parse(&data).map_err(std::io::Error::other)
    }

    /// Parses a little-endian BTF blob.
    pub fn parse(data: &[u8]) -> Result<Btf, BtfError> {
        let u16_at = |at: usize| {
            data.get(at..at + 2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
        };
        let u32_at = |at: usize| {
            data.get(at..at + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        let header = |at: usize| {
            u32_at(at)
                .map(|v| v as usize)
                .ok_or(BtfError::Malformed("short header"))
        };
        if u16_at(0) != Some(MAGIC) {
            return Err(BtfError::Malformed("bad magic"));
        }
        let hdr_len = header(4)?;
        let (type_off, type_len) = (hdr_len + header(8)?, header(12)?);
        let (str_off, str_len) = (hdr_len + header(16)?, header(20)?);
        let strings = data
            .get(str_off..str_off + str_len)
            .ok_or(BtfError::Malformed("string section out of bounds"))?
            .to_vec();
        // Type ids start at 1; id 0 is void.
        let mut types = vec![Type {
            kind: 0,
            name_off: 0,
            target: 0,
            members: Vec::new(),
        }];
        let end = type_off + type_len;
        let mut at = type_off;
        while at < end {
            let word = |i: usize| u32_at(at + 4 * i).ok_or(BtfError::Malformed("truncated type"));
            let (name_off, info, target) = (word(0)?, word(1)?, word(2)?);
            let (kind, vlen, kind_flag) = (
                (info >> 24) & 0x1f,
                (info & 0xffff) as usize,
                info >> 31 == 1,
            );
            at += 12;
            let mut members = Vec::new();
            if kind == KIND_STRUCT || kind == KIND_UNION {
                for i in 0..vlen {
                    let field = |j: usize| {
                        u32_at(at + 12 * i + 4 * j).ok_or(BtfError::Malformed("truncated member"))
                    };
                    let offset = field(2)?;
                    members.push(Member {
                        name_off: field(0)?,
                        type_id: field(1)?,
                        bit_offset: if kind_flag {
                            offset & 0xff_ffff
                        } else {
                            offset
                        },
                        bitfield: kind_flag && offset >> 24 != 0,
                    });
                }
            }
            at += extra_bytes(kind, vlen).ok_or(BtfError::Malformed("unknown type kind"))?;
            types.push(Type {
                kind,
                name_off,
                target,
                members,
            });
        }
        let mut btf = Btf {
            types,
            strings,
            structs: HashMap::new(),
        };
        btf.structs = btf
            .types
            .iter()
            .enumerate()
            .filter(|(_, ty)| ty.kind == KIND_STRUCT && ty.name_off != 0)
            .map(|(id, ty)| (btf.name(ty.name_off).to_owned(), id as u32))
            .collect();
        Ok(btf)
    }

    /// Byte offset of `member` in `struct name`, looking inside anonymous
    /// unions and structs as C does. `member` may be a path into embedded
    /// structs, as in C: `ns.inum`.
    pub fn member_offset(&self, name: &str, member: &str) -> Result<u32, BtfError> {
        let mut id = *self
            .structs
            .get(name)
            .ok_or_else(|| BtfError::NoStruct(name.to_owned()))?;
        let mut total_bits = 0;
        for part in member.split('.') {
            let (bits, bitfield, type_id) = self
                .find_member(id, part, 0)
                .ok_or_else(|| BtfError::NoMember(name.to_owned(), member.to_owned()))?;
            if bitfield || bits % 8 != 0 {
                return Err(BtfError::Bitfield(name.to_owned(), member.to_owned()));
            }
            total_bits += bits;
            id = self.resolve(type_id);
        }
        Ok(total_bits / 8)
    }

    /// The bit offset, bitfield flag and type of member `wanted`.
    fn find_member(&self, id: u32, wanted: &str, base_bits: u32) -> Option<(u32, bool, u32)> {
        let ty = self.types.get(id as usize)?;
        for m in &ty.members {
            let bits = base_bits + m.bit_offset;
            if m.name_off != 0 && self.name(m.name_off) == wanted {
                return Some((bits, m.bitfield, m.type_id));
            }
            let inner = self.resolve(m.type_id);
            if m.name_off == 0
                && matches!(
                    self.types.get(inner as usize)?.kind,
                    KIND_STRUCT | KIND_UNION
                )
            {
                if let Some(found) = self.find_member(inner, wanted, bits) {
                    return Some(found);
                }
            }
        }
        None
    }

    /// Follows typedefs and qualifiers to the underlying type.
    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.types.get(id as usize) {
                Some(ty)
                    if matches!(
                        ty.kind,
                        KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG
                    ) =>
                {
                    id = ty.target
                }
                _ => break,
            }
        }
        id
    }

    fn name(&self, offset: u32) -> &str {
        let tail = self.strings.get(offset as usize..).unwrap_or_default();
        let len = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        std::str::from_utf8(&tail[..len]).unwrap_or_default()
    }
}

/// Bytes that follow the 12-byte common header of each kind.
fn extra_bytes(kind: u32, vlen: usize) -> Option<usize> {
    Some(match kind {
        1 | 14 | 17 => 4,             // INT, VAR, DECL_TAG
        2 | 7..=12 | 16 | 18 => 0, // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG
        3 => 12,                   // ARRAY
        4 | 5 | 15 | 19 => 12 * vlen, // STRUCT, UNION, DATASEC, ENUM64
        6 | 13 => 8 * vlen,        // ENUM, FUNC_PROTO
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob: `struct outer { int a; union { int b; struct { int c; int d; }; }; int e:3; }`.
    fn sample() -> Vec<u8> {
        let strings = b"\0outer\0a\0b\0c\0d\0int\0e\0";
        let name = |s: &str| {
            let needle = format!("\0{s}\0");
            strings
                .windows(needle.len())
                .position(|w| w == needle.as_bytes())
                .unwrap() as u32
                + 1
        };
        let mut types = Vec::new();
        let mut push = |words: &[u32]| {
            words
                .iter()
                .for_each(|w| types.extend_from_slice(&w.to_le_bytes()))
        };
        push(&[name("int"), 1 << 24, 4, 32]); // 1: int
        push(&[0, (4 << 24) | 2, 8, name("c"), 1, 0, name("d"), 1, 32]); // 2: anonymous struct
        push(&[0, (5 << 24) | 2, 8, name("b"), 1, 0, 0, 2, 0]); // 3: anonymous union
        push(&[
            name("outer"),
            (1 << 31) | (4 << 24) | 3,
            16,
            name("a"),
            1,
            0,
            0,
            3,
            32,
            name("e"),
            1,
            (3 << 24) | 96,
        ]);
        let mut blob = Vec::new();
        for word in [
            0xeb9f_u16 as u32 | (1 << 16),
            24,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            blob.extend_from_slice(&word.to_le_bytes());
        }
        blob.extend_from_slice(&types);
        blob.extend_from_slice(strings);
        blob
    }

    #[test]
    fn finds_members_inside_anonymous_unions_and_structs() {
        let btf = Btf::parse(&sample()).unwrap();
        assert_eq!(btf.member_offset("outer", "a"), Ok(0));
        assert_eq!(btf.member_offset("outer", "b"), Ok(4));
        assert_eq!(btf.member_offset("outer", "c"), Ok(4));
        assert_eq!(btf.member_offset("outer", "d"), Ok(8));
        assert_eq!(
            btf.member_offset("outer", "e"),
            Err(BtfError::Bitfield("outer".into(), "e".into()))
        );
        assert_eq!(
            btf.member_offset("outer", "z"),
            Err(BtfError::NoMember("outer".into(), "z".into()))
        );
        assert_eq!(
            btf.member_offset("inner", "a"),
            Err(BtfError::NoStruct("inner".into()))
        );
    }

    #[test]
    fn rejects_garbage_and_truncation_without_panicking() {
        assert!(Btf::parse(b"").is_err());
        assert!(Btf::parse(&[0x9f, 0xeb, 1, 0, 24, 0, 0, 0]).is_err());
        let sample = sample();
        for cut in 0..sample.len() {
            let _ = Btf::parse(&sample[..cut]);
        }
    }

    #[test]
    fn the_running_kernel_describes_struct_sock() {
        let btf = Btf::from_kernel().expect("this kernel has BTF");
        assert_eq!(btf.member_offset("sock_common", "skc_daddr"), Ok(0));
        assert_eq!(btf.member_offset("sock_common", "skc_rcv_saddr"), Ok(4));
        assert_eq!(btf.member_offset("sock_common", "skc_dport"), Ok(12));
        assert!(btf.member_offset("sock", "sk_protocol").is_ok());
        assert!(btf.member_offset("inet_sock", "inet_sport").is_ok());
        let ns = btf.member_offset("net", "ns").unwrap();
        let inum = btf.member_offset("ns_common", "inum").unwrap();
        assert_eq!(btf.member_offset("net", "ns.inum"), Ok(ns + inum));
        assert!(btf.member_offset("net", "ns.nope").is_err());
    }
}
