//! Just enough of the BPF Type Format to find where a struct member lives
//! and which type id a kernel function has.
//!
//! Rust eBPF has no CO-RE, so the programs read kernel struct fields at
//! offsets taken from the running kernel's BTF (/sys/kernel/btf/vmlinux)
//! and passed in as globals; an iterator program is loaded against the id
//! of its `bpf_iter_*` function. The kernel's BTF (megabytes) is read once
//! per process, only what netwatch needs is kept, and the blob is dropped.

use std::collections::HashMap;
use std::sync::OnceLock;

use aya_obj::btf::{BtfType, Func, FuncLinkage};
use netwatch_common::{
    FILE_OFFSETS, SOCK_COMMON_HEAD, SOCK_COMMON_HEAD_FIELDS, SOCK_OFFSETS, SYSCALL_OFFSETS,
    TASK_OFFSETS, TCP_OFFSETS,
};

/// Where the kernel exposes its own BTF.
pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

/// The iterator types netwatch loads programs for (`bpf_iter_<type>`).
pub const ITERATOR_TYPES: [&str; 2] = ["tcp", "task_file"];

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_FUNC: u32 = 12;
/// Kinds that only qualify or rename another type.
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;

/// Why a member offset or a function's id could not be found.
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
    #[error("function {0} is not in the kernel's BTF")]
    NoFunction(String),
}

/// Why the offsets or attach point a program needs are unknown.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum OffsetsError {
    #[error("cannot read {VMLINUX}: {0}")]
    Unreadable(String),
    #[error(transparent)]
    Btf(#[from] BtfError),
    #[error("no offset is declared for the global {0}")]
    Undeclared(&'static str),
    #[error("sock_common.{0} lies beyond the {SOCK_COMMON_HEAD} bytes the programs read at once")]
    BeyondHead(&'static str),
}

/// What netwatch keeps of the kernel's BTF: every declared member offset,
/// by the global the loader sets, and each iterator function's type id.
struct KernelTypes {
    offsets: HashMap<&'static str, Result<u32, BtfError>>,
    iterators: HashMap<&'static str, Result<u32, BtfError>>,
}

fn kernel_types() -> Result<&'static KernelTypes, OffsetsError> {
    static KNOWN: OnceLock<Result<KernelTypes, OffsetsError>> = OnceLock::new();
    KNOWN
        .get_or_init(read_kernel_types)
        .as_ref()
        .map_err(Clone::clone)
}

fn read_kernel_types() -> Result<KernelTypes, OffsetsError> {
    let declared: Vec<_> = SOCK_OFFSETS
        .iter()
        .chain(&FILE_OFFSETS)
        .chain(&TASK_OFFSETS)
        .chain(&TCP_OFFSETS)
        .chain(&SYSCALL_OFFSETS)
        .collect();
    let structs: Vec<&str> = declared.iter().map(|&&(_, ty, _)| ty).collect();
    let btf =
        Btf::from_kernel(&structs).map_err(|err| OffsetsError::Unreadable(err.to_string()))?;
    Ok(KernelTypes {
        offsets: declared
            .iter()
            .map(|&&(global, ty, member)| (global, btf.member_offset(ty, member)))
            .collect(),
        iterators: ITERATOR_TYPES
            .iter()
            .map(|&iter_type| (iter_type, btf.function_id(&format!("bpf_iter_{iter_type}"))))
            .collect(),
    })
}

/// The offsets of the kernel struct members named in `fields` (global,
/// struct, member), for the loader to set.
pub fn kernel_offsets(
    fields: &[(&'static str, &str, &str)],
) -> Result<Vec<(&'static str, u32)>, OffsetsError> {
    let known = &kernel_types()?.offsets;
    let offsets = fields
        .iter()
        .map(|&(global, _, _)| match known.get(global) {
            Some(offset) => Ok((global, offset.clone()?)),
            None => Err(OffsetsError::Undeclared(global)),
        })
        .collect::<Result<Vec<_>, _>>()?;
    check_head(&offsets)?;
    Ok(offsets)
}

/// Checks that those of `offsets` the programs take from the head of
/// `struct sock_common` (`SOCK_COMMON_HEAD_FIELDS`, read at once) lie
/// within it, as they do in every kernel since 2.6.
fn check_head(offsets: &[(&'static str, u32)]) -> Result<(), OffsetsError> {
    for (global, offset) in offsets {
        let size = SOCK_COMMON_HEAD_FIELDS
            .iter()
            .find(|(field, _)| field == global)
            .map(|&(_, size)| size);
        if size.is_some_and(|size| *offset as usize + size > SOCK_COMMON_HEAD) {
            return Err(OffsetsError::BeyondHead(global));
        }
    }
    Ok(())
}

/// What aya's `Iter::load` needs to attach to the `bpf_iter_<type>`
/// functions of `ITERATOR_TYPES`: a BTF in which each has its kernel id.
/// aya only looks the id up by name, so rather than aya's own parse of the
/// whole kernel BTF (tens of MiB), every other id holds a placeholder.
pub fn iterator_attach_points() -> Result<aya::Btf, OffsetsError> {
    let known = &kernel_types()?.iterators;
    let mut functions = ITERATOR_TYPES
        .iter()
        .map(|iter_type| match known.get(iter_type) {
            Some(id) => Ok((id.clone()?, format!("bpf_iter_{iter_type}"))),
            None => Err(BtfError::NoFunction(format!("bpf_iter_{iter_type}")).into()),
        })
        .collect::<Result<Vec<_>, OffsetsError>>()?;
    functions.sort_unstable();
    let mut btf = aya::Btf::new();
    // Id 0 (void) is there already.
    let mut next_id = 1;
    for (id, name) in functions {
        for _ in next_id..id {
            btf.add_type(BtfType::Unknown);
        }
        let name = btf.add_string(&name);
        next_id = btf.add_type(BtfType::Func(Func::new(name, 0, FuncLinkage::Static))) + 1;
    }
    Ok(btf)
}

/// The common part of one type: where it is, its kind, name and target.
#[derive(Clone, Copy, Debug)]
struct TypeHeader {
    /// Byte offset of the type in the blob.
    at: usize,
    name_off: u32,
    kind: u32,
    vlen: usize,
    kind_flag: bool,
    /// The referenced type, for typedefs, qualifiers and functions.
    target: u32,
}

/// The bytes of a BTF blob: mapped (the kernel's, since Linux 6.16:
/// reading it costs a system call per 4 KiB page) or read.
#[derive(Debug)]
enum Blob {
    Mapped(memmap2::Mmap),
    Read(Vec<u8>),
}

impl std::ops::Deref for Blob {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Blob::Mapped(map) => map,
            Blob::Read(bytes) => bytes,
        }
    }
}

impl Blob {
    /// Maps the kernel's BTF read-only, or reads it where it cannot be mapped.
    fn of_kernel() -> std::io::Result<Blob> {
        let file = std::fs::File::open(VMLINUX)?;
        // SAFETY: the kernel's BTF never changes while it runs; the private,
        // read-only mapping is never written.
        match unsafe { memmap2::MmapOptions::new().map_copy_read_only(&file) } {
            Ok(map) => Ok(Blob::Mapped(map)),
            Err(_) => std::fs::read(VMLINUX).map(Blob::Read),
        }
    }
}

/// One BTF blob, with the offset of each type and the ids of the structs
/// asked for: members are read from the blob when asked for, not kept.
#[derive(Debug)]
pub struct Btf {
    data: Blob,
    /// Byte offset of each type, by id (id 0, void, has none: 0).
    starts: Vec<u32>,
    strings: std::ops::Range<usize>,
    structs: HashMap<String, u32>,
}

fn u16_at(data: &[u8], at: usize) -> Option<u16> {
    data.get(at..at + 2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
}

fn u32_at(data: &[u8], at: usize) -> Option<u32> {
    data.get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

impl Btf {
    /// Reads the running kernel's BTF, to look up members of `structs`.
    pub fn from_kernel(structs: &[&str]) -> std::io::Result<Btf> {
        Btf::index(Blob::of_kernel()?, structs).map_err(std::io::Error::other)
    }

    /// Indexes a little-endian BTF blob, to look up members of `structs`.
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn parse(data: Vec<u8>, structs: &[&str]) -> Result<Btf, BtfError> {
        Btf::index(Blob::Read(data), structs)
    }

    fn index(data: Blob, structs: &[&str]) -> Result<Btf, BtfError> {
        let wanted: std::collections::HashSet<&[u8]> =
            structs.iter().map(|name| name.as_bytes()).collect();
        let header = |at: usize| {
            u32_at(&data, at)
                .map(|v| v as usize)
                .ok_or(BtfError::Malformed("short header"))
        };
        if u16_at(&data, 0) != Some(MAGIC) {
            return Err(BtfError::Malformed("bad magic"));
        }
        let hdr_len = header(4)?;
        let (type_off, type_len) = (hdr_len + header(8)?, header(12)?);
        let (str_off, str_len) = (hdr_len + header(16)?, header(20)?);
        if data.get(str_off..str_off + str_len).is_none() {
            return Err(BtfError::Malformed("string section out of bounds"));
        }
        let end = type_off + type_len;
        if data.get(type_off..end).is_none() {
            return Err(BtfError::Malformed("type section out of bounds"));
        }
        let mut btf = Btf {
            data,
            starts: vec![0],
            strings: str_off..str_off + str_len,
            structs: HashMap::new(),
        };
        let mut at = type_off;
        while at < end {
            let id = btf.starts.len() as u32;
            btf.starts
                .push(u32::try_from(at).map_err(|_| BtfError::Malformed("blob too large"))?);
            let ty = btf
                .header(id)
                .ok_or(BtfError::Malformed("truncated type"))?;
            if ty.kind == KIND_STRUCT && ty.name_off != 0 {
                let name = btf.name_bytes(ty.name_off);
                if wanted.contains(name) {
                    let name = String::from_utf8_lossy(name).into_owned();
                    btf.structs.entry(name).or_insert(id);
                }
            }
            at += 12
                + extra_bytes(ty.kind, ty.vlen).ok_or(BtfError::Malformed("unknown type kind"))?;
        }
        if at != end {
            return Err(BtfError::Malformed("truncated type"));
        }
        Ok(btf)
    }

    fn header(&self, id: u32) -> Option<TypeHeader> {
        let at = *self.starts.get(id as usize)? as usize;
        if id == 0 {
            return None;
        }
        let word = |i: usize| u32_at(&self.data, at + 4 * i);
        let info = word(1)?;
        Some(TypeHeader {
            at,
            name_off: word(0)?,
            kind: (info >> 24) & 0x1f,
            vlen: (info & 0xffff) as usize,
            kind_flag: info >> 31 == 1,
            target: word(2)?,
        })
    }

    /// Member `i` of a struct or union: (name, type, bit offset, bitfield).
    fn member(&self, ty: &TypeHeader, i: usize) -> Option<(u32, u32, u32, bool)> {
        let field = |j: usize| u32_at(&self.data, ty.at + 12 + 12 * i + 4 * j);
        let offset = field(2)?;
        let (bit_offset, bitfield) = if ty.kind_flag {
            (offset & 0xff_ffff, offset >> 24 != 0)
        } else {
            (offset, false)
        };
        Some((field(0)?, field(1)?, bit_offset, bitfield))
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
                .find_member(id, part, 0, 0)
                .ok_or_else(|| BtfError::NoMember(name.to_owned(), member.to_owned()))?;
            if bitfield || bits % 8 != 0 {
                return Err(BtfError::Bitfield(name.to_owned(), member.to_owned()));
            }
            total_bits += bits;
            id = self.resolve(type_id);
        }
        Ok(total_bits / 8)
    }

    /// The type id of function `name`.
    pub fn function_id(&self, name: &str) -> Result<u32, BtfError> {
        (1..self.starts.len() as u32)
            .find(|&id| {
                self.header(id)
                    .is_some_and(|ty| ty.kind == KIND_FUNC && self.name(ty.name_off) == name)
            })
            .ok_or_else(|| BtfError::NoFunction(name.to_owned()))
    }

    /// The bit offset, bitfield flag and type of member `wanted`.
    fn find_member(
        &self,
        id: u32,
        wanted: &str,
        base_bits: u32,
        depth: u32,
    ) -> Option<(u32, bool, u32)> {
        let ty = self.header(id)?;
        if !matches!(ty.kind, KIND_STRUCT | KIND_UNION) || depth > 32 {
            return None;
        }
        for i in 0..ty.vlen {
            let (name_off, type_id, bit_offset, bitfield) = self.member(&ty, i)?;
            let bits = base_bits + bit_offset;
            if name_off != 0 && self.name(name_off) == wanted {
                return Some((bits, bitfield, type_id));
            }
            if name_off == 0 {
                if let Some(found) =
                    self.find_member(self.resolve(type_id), wanted, bits, depth + 1)
                {
                    return Some(found);
                }
            }
        }
        None
    }

    /// Follows typedefs and qualifiers to the underlying type.
    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.header(id) {
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
        std::str::from_utf8(self.name_bytes(offset)).unwrap_or_default()
    }

    fn name_bytes(&self, offset: u32) -> &[u8] {
        let strings = &self.data[self.strings.clone()];
        let tail = strings.get(offset as usize..).unwrap_or_default();
        let len = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        &tail[..len]
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

    #[test]
    fn head_fields_must_lie_within_the_head() {
        let mut offsets: Vec<(&'static str, u32)> = SOCK_COMMON_HEAD_FIELDS
            .iter()
            .map(|&(field, _)| (field, 0))
            .chain([("SK_UID", 600)])
            .collect();
        assert!(check_head(&offsets).is_ok(), "other fields are anywhere");
        offsets[4].1 = SOCK_COMMON_HEAD as u32 - 1;
        assert!(matches!(
            check_head(&offsets),
            Err(OffsetsError::BeyondHead("SKC_FAMILY"))
        ));
        offsets[4].1 = SOCK_COMMON_HEAD as u32 - 2;
        assert!(check_head(&offsets).is_ok(), "its last two bytes");
    }

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
        let btf = Btf::parse(sample(), &["outer", "inner"]).unwrap();
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
        assert!(Btf::parse(Vec::new(), &[]).is_err());
        assert!(Btf::parse(vec![0x9f, 0xeb, 1, 0, 24, 0, 0, 0], &[]).is_err());
        let sample = sample();
        for cut in 0..sample.len() {
            let _ = Btf::parse(sample[..cut].to_vec(), &["outer"]);
        }
    }

    #[test]
    fn the_running_kernel_describes_struct_sock() {
        let btf = Btf::from_kernel(&["sock_common", "sock", "inet_sock", "net", "ns_common"])
            .expect("this kernel has BTF");
        assert_eq!(btf.member_offset("sock_common", "skc_daddr"), Ok(0));
        assert_eq!(btf.member_offset("sock_common", "skc_rcv_saddr"), Ok(4));
        assert_eq!(btf.member_offset("sock_common", "skc_dport"), Ok(12));
        assert!(btf.member_offset("sock", "sk_protocol").is_ok());
        assert!(btf.member_offset("inet_sock", "inet_sport").is_ok());
        let ns = btf.member_offset("net", "ns").unwrap();
        let inum = btf.member_offset("ns_common", "inum").unwrap();
        assert_eq!(btf.member_offset("net", "ns.inum"), Ok(ns + inum));
        assert!(btf.member_offset("net", "ns.nope").is_err());
        assert!(btf.function_id("bpf_iter_tcp").is_ok_and(|id| id > 0));
        assert!(btf.function_id("bpf_iter_nope").is_err());
    }

    #[test]
    fn attach_points_name_the_kernel_functions_at_their_ids() {
        let offsets = kernel_offsets(&TCP_OFFSETS).expect("this kernel has BTF");
        assert_eq!(offsets.len(), TCP_OFFSETS.len());
        kernel_offsets(&FILE_OFFSETS).expect("offsets again");
        let btf = iterator_attach_points().expect("the attach points");
        for iter_type in ITERATOR_TYPES {
            let id = btf
                .id_by_type_name_kind(
                    &format!("bpf_iter_{iter_type}"),
                    aya_obj::btf::BtfKind::Func,
                )
                .expect("the function is named");
            let kernel = Btf::from_kernel(&[]).expect("this kernel has BTF");
            assert_eq!(Ok(id), kernel.function_id(&format!("bpf_iter_{iter_type}")));
        }
    }
}
