//! A small reader for the kernel's BTF (`/sys/kernel/btf/vmlinux`): just enough to find the byte
//! offset of a struct member (following nested and anonymous members) and the value of an enum
//! constant.
//!
//! Why our own: Rust eBPF has no CO-RE relocations yet, so the agent computes offsets at start-up
//! and passes them to the programs. aya-obj's parser keeps struct members private, and the other
//! BTF crates are LGPL; the format itself is small and stable (`Documentation/bpf/btf.rst`).
use std::path::Path;

/// Errors while reading BTF or resolving a name in it.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read BTF from {path}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("malformed BTF: {0}")]
    Malformed(&'static str),
    #[error("BTF has no struct named `{0}`")]
    NoStruct(String),
    #[error("struct `{structure}` has no member `{member}` in BTF")]
    NoMember { structure: String, member: String },
    #[error("member `{0}` is a bitfield that does not start on a byte boundary")]
    Bitfield(String),
    #[error("BTF has no enum constant `{0}`")]
    NoEnumValue(String),
}

const MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, Clone, Copy)]
struct Member {
    name_off: u32,
    type_id: u32,
    bit_offset: u32,
    bitfield_size: u32,
}

#[derive(Debug, Clone)]
enum Type {
    /// Struct or union.
    Composite {
        name_off: u32,
        members: Vec<Member>,
    },
    /// typedef, const, volatile, restrict, type tag: points at another type.
    Alias {
        name_off: u32,
        target: u32,
    },
    Array {
        elem: u32,
    },
    Enum {
        values: Vec<(u32, i64)>,
    },
    Other,
}

/// Parsed BTF: the types (id 0 is `void`) and the string section.
pub struct Btf {
    types: Vec<Type>,
    strings: Vec<u8>,
}

impl Btf {
    /// Reads and parses a BTF file such as `/sys/kernel/btf/vmlinux`.
    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let bytes = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&bytes)
    }

    /// Parses raw BTF bytes (native endianness, as the kernel exposes them).
    pub fn parse(bytes: &[u8]) -> Result<Self, BtfError> {
        let u16_at = |o: usize| -> Result<u16, BtfError> {
            bytes
                .get(o..o + 2)
                .map(|b| u16::from_ne_bytes([b[0], b[1]]))
                .ok_or(BtfError::Malformed("truncated header"))
        };
        let u32_at = |o: usize| -> Result<u32, BtfError> {
            bytes
                .get(o..o + 4)
                .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or(BtfError::Malformed("truncated header"))
        };
        if u16_at(0)? != MAGIC {
            return Err(BtfError::Malformed(
                "bad magic (not BTF, or other endianness)",
            ));
        }
        let hdr_len = u32_at(4)? as usize;
        let type_off = u32_at(8)? as usize;
        let type_len = u32_at(12)? as usize;
        let str_off = u32_at(16)? as usize;
        let str_len = u32_at(20)? as usize;
        let section = |off: usize, len: usize| {
            bytes
                .get(hdr_len + off..hdr_len + off + len)
                .ok_or(BtfError::Malformed("section out of bounds"))
        };
        let type_bytes = section(type_off, type_len)?;
        let strings = section(str_off, str_len)?.to_vec();

        let mut types = vec![Type::Other]; // id 0: void
        let mut r = Reader {
            bytes: type_bytes,
            pos: 0,
        };
        while r.pos < type_bytes.len() {
            let name_off = r.u32()?;
            let info = r.u32()?;
            let size_or_type = r.u32()?;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kflag = info >> 31 == 1;
            let ty = match kind {
                KIND_INT => {
                    r.skip(4)?;
                    Type::Other
                }
                KIND_PTR | KIND_FWD | KIND_FUNC | KIND_FLOAT => Type::Other,
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    Type::Alias {
                        name_off,
                        target: size_or_type,
                    }
                }
                KIND_ARRAY => {
                    let elem = r.u32()?;
                    r.skip(8)?; // index type, nelems
                    Type::Array { elem }
                }
                KIND_STRUCT | KIND_UNION => {
                    let mut members = Vec::with_capacity(vlen);
                    for _ in 0..vlen {
                        let name_off = r.u32()?;
                        let type_id = r.u32()?;
                        let offset = r.u32()?;
                        let (bit_offset, bitfield_size) = if kflag {
                            (offset & 0xff_ffff, offset >> 24)
                        } else {
                            (offset, 0)
                        };
                        members.push(Member {
                            name_off,
                            type_id,
                            bit_offset,
                            bitfield_size,
                        });
                    }
                    Type::Composite { name_off, members }
                }
                KIND_ENUM => {
                    let mut values = Vec::with_capacity(vlen);
                    for _ in 0..vlen {
                        let name = r.u32()?;
                        let val = r.u32()? as i32;
                        values.push((name, i64::from(val)));
                    }
                    Type::Enum { values }
                }
                KIND_ENUM64 => {
                    let mut values = Vec::with_capacity(vlen);
                    for _ in 0..vlen {
                        let name = r.u32()?;
                        let lo = u64::from(r.u32()?);
                        let hi = u64::from(r.u32()?);
                        values.push((name, ((hi << 32) | lo) as i64));
                    }
                    Type::Enum { values }
                }
                KIND_FUNC_PROTO => {
                    r.skip(8 * vlen)?;
                    Type::Other
                }
                KIND_VAR | KIND_DECL_TAG => {
                    r.skip(4)?;
                    Type::Other
                }
                KIND_DATASEC => {
                    r.skip(12 * vlen)?;
                    Type::Other
                }
                _ => return Err(BtfError::Malformed("unknown type kind")),
            };
            types.push(ty);
        }
        Ok(Self { types, strings })
    }

    fn name(&self, off: u32) -> &str {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or("")
    }

    /// Follows typedefs, qualifiers and arrays (element 0) down to the underlying type.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..64 {
            match self.types.get(id as usize)? {
                Type::Alias { target: next, .. } | Type::Array { elem: next } => id = *next,
                other => return Some(other),
            }
        }
        None
    }

    fn struct_id(&self, name: &str) -> Option<u32> {
        self.types.iter().position(|t| {
            matches!(t, Type::Composite { name_off, members } if !members.is_empty() && self.name(*name_off) == name)
        }).map(|i| i as u32)
    }

    /// Finds `name` among `members`, descending into anonymous structs and unions; returns the
    /// member and its bit offset from the start of the composite.
    fn find_member(&self, members: &[Member], name: &str) -> Option<(Member, u32)> {
        for m in members {
            if m.name_off != 0 {
                if self.name(m.name_off) == name {
                    return Some((*m, m.bit_offset));
                }
            } else if let Some(Type::Composite { members: inner, .. }) = self.resolve(m.type_id)
                && let Some((found, off)) = self.find_member(inner, name)
            {
                return Some((found, m.bit_offset + off));
            }
        }
        None
    }

    /// Byte offset of `path` (members separated by `.`; an array member means its element 0)
    /// from the start of `struct structure`.
    pub fn member_offset(&self, structure: &str, path: &str) -> Result<u32, BtfError> {
        let (bits, bitfield_size) = self.member_bits(structure, path)?;
        if bitfield_size != 0 || bits % 8 != 0 {
            return Err(BtfError::Bitfield(format!("{structure}.{path}")));
        }
        Ok(bits / 8)
    }

    /// Bit offset of `path` from the start of `struct structure`, and its size in bits if it is
    /// a bitfield (0 otherwise).
    pub fn member_bits(&self, structure: &str, path: &str) -> Result<(u32, u32), BtfError> {
        let mut id = self
            .struct_id(structure)
            .ok_or_else(|| BtfError::NoStruct(structure.to_string()))?;
        let mut bits = 0u32;
        let mut bitfield_size = 0;
        let mut current = structure.to_string();
        for part in path.split('.') {
            let no_member = || BtfError::NoMember {
                structure: current.clone(),
                member: part.to_string(),
            };
            let Some(Type::Composite { members, .. }) = self.resolve(id) else {
                return Err(no_member());
            };
            let (member, offset) = self.find_member(members, part).ok_or_else(no_member)?;
            bits += offset;
            bitfield_size = member.bitfield_size;
            id = member.type_id;
            current = format!("{current}.{part}");
        }
        Ok((bits, bitfield_size))
    }

    /// Whether a typedef named `name` exists (the kernel declares `btf_trace_<tracepoint>` for
    /// every tracepoint, which is how raw tracepoints are found).
    pub fn has_typedef(&self, name: &str) -> bool {
        self.types.iter().any(
            |t| matches!(t, Type::Alias { name_off, .. } if *name_off != 0 && self.name(*name_off) == name),
        )
    }

    /// Like [`Btf::member_offset`], trying each path in turn: members move between kernels
    /// (e.g. `sock.sk_flags` became `sock.__sk_common.skc_flags` in 6.x). The error names the
    /// first path.
    pub fn member_offset_any(&self, structure: &str, paths: &[&str]) -> Result<u32, BtfError> {
        let mut first_err = None;
        for path in paths {
            match self.member_offset(structure, path) {
                Ok(offset) => return Ok(offset),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        Err(first_err.unwrap_or_else(|| BtfError::NoStruct(structure.to_string())))
    }

    /// Value of the enum constant `name` (searched in every enum).
    pub fn enum_value(&self, name: &str) -> Result<i64, BtfError> {
        self.types
            .iter()
            .find_map(|t| match t {
                Type::Enum { values } => values
                    .iter()
                    .find(|(n, _)| self.name(*n) == name)
                    .map(|(_, v)| *v),
                _ => None,
            })
            .ok_or_else(|| BtfError::NoEnumValue(name.to_string()))
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn u32(&mut self) -> Result<u32, BtfError> {
        let b = self
            .bytes
            .get(self.pos..self.pos + 4)
            .ok_or(BtfError::Malformed("truncated type section"))?;
        self.pos += 4;
        Ok(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn skip(&mut self, n: usize) -> Result<(), BtfError> {
        if self.pos + n > self.bytes.len() {
            return Err(BtfError::Malformed("truncated type section"));
        }
        self.pos += n;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a BTF blob by hand:
    /// `struct inner { u32 a; u32 b; }`, `struct outer { u64 x; struct inner arr[3]; union { u32 y; }; }`,
    /// `enum flags { F_ZERO = 0, F_TWO = 2 }`.
    fn sample() -> Vec<u8> {
        let strings = b"\0u32\0inner\0a\0b\0outer\0x\0arr\0y\0flags\0F_ZERO\0F_TWO\0u64\0".to_vec();
        let s = |name: &str| -> u32 {
            let needle = format!("\0{name}\0");
            strings
                .windows(needle.len())
                .position(|w| w == needle.as_bytes())
                .unwrap() as u32
                + 1
        };
        let mut t: Vec<u32> = Vec::new();
        // 1: int u32
        t.extend([s("u32"), KIND_INT << 24, 4, 32]);
        // 2: struct inner
        t.extend([s("inner"), KIND_STRUCT << 24 | 2, 8]);
        t.extend([s("a"), 1, 0, s("b"), 1, 32]);
        // 3: array of inner [3]
        t.extend([0, KIND_ARRAY << 24, 0, 2, 1, 3]);
        // 4: anonymous union { u32 y; }
        t.extend([0, KIND_UNION << 24 | 1, 4, s("y"), 1, 0]);
        // 5: int u64
        t.extend([s("u64"), KIND_INT << 24, 8, 64]);
        // 6: struct outer { u64 x; inner arr[3]; union {y}; }
        t.extend([s("outer"), KIND_STRUCT << 24 | 3, 40]);
        t.extend([s("x"), 5, 0, s("arr"), 3, 64, 0, 4, 256]);
        // 7: enum flags
        t.extend([
            s("flags"),
            KIND_ENUM << 24 | 2,
            4,
            s("F_ZERO"),
            0,
            s("F_TWO"),
            2,
        ]);
        let types: Vec<u8> = t.iter().flat_map(|v| v.to_ne_bytes()).collect();
        let mut out = Vec::new();
        out.extend(MAGIC.to_ne_bytes());
        out.extend([1u8, 0]);
        out.extend(24u32.to_ne_bytes());
        out.extend(0u32.to_ne_bytes());
        out.extend((types.len() as u32).to_ne_bytes());
        out.extend((types.len() as u32).to_ne_bytes());
        out.extend((strings.len() as u32).to_ne_bytes());
        out.extend(types);
        out.extend(strings);
        out
    }

    #[test]
    fn resolves_nested_array_and_anonymous_members() {
        let btf = Btf::parse(&sample()).unwrap();
        assert_eq!(btf.member_offset("outer", "x").unwrap(), 0);
        assert_eq!(btf.member_offset("outer", "arr").unwrap(), 8);
        assert_eq!(btf.member_offset("outer", "arr.b").unwrap(), 12);
        assert_eq!(btf.member_offset("outer", "y").unwrap(), 32);
        assert_eq!(btf.member_offset("inner", "b").unwrap(), 4);
        assert_eq!(btf.enum_value("F_TWO").unwrap(), 2);
        assert_eq!(btf.member_bits("outer", "arr.b").unwrap(), (96, 0));
        assert!(!btf.has_typedef("btf_trace_inet_sock_set_state"));
    }

    #[test]
    fn names_what_is_missing() {
        let btf = Btf::parse(&sample()).unwrap();
        let err = btf.member_offset("outer", "arr.zz").unwrap_err();
        assert_eq!(
            err.to_string(),
            "struct `outer.arr` has no member `zz` in BTF"
        );
        assert!(matches!(
            btf.member_offset("nope", "x"),
            Err(BtfError::NoStruct(_))
        ));
        assert!(matches!(
            btf.enum_value("F_NONE"),
            Err(BtfError::NoEnumValue(_))
        ));
        assert!(matches!(
            Btf::parse(&[0u8; 24]),
            Err(BtfError::Malformed(_))
        ));
    }

    #[test]
    fn reads_the_running_kernel() {
        let path = Path::new("/sys/kernel/btf/vmlinux");
        if !path.exists() {
            return; // the layout tests report a kernel without BTF; nothing to read here
        }
        let btf = Btf::from_file(path).unwrap();
        // struct sock begins struct tcp_sock (inet_connection_sock → inet_sock → sock).
        let flags = ["sk_flags", "__sk_common.skc_flags"];
        let in_sock = btf.member_offset_any("sock", &flags).unwrap();
        let sk = btf
            .member_offset("tcp_sock", "inet_conn.icsk_inet.sk")
            .unwrap();
        assert_eq!(sk, 0, "struct tcp_sock starts with struct sock");
        let via_tcp: Vec<String> = flags
            .iter()
            .map(|f| format!("inet_conn.icsk_inet.sk.{f}"))
            .collect();
        let via_tcp: Vec<&str> = via_tcp.iter().map(String::as_str).collect();
        assert_eq!(
            btf.member_offset_any("tcp_sock", &via_tcp).unwrap(),
            in_sock
        );
        assert_eq!(btf.enum_value("SOCK_DONE").unwrap(), 1);
        assert!(btf.has_typedef("btf_trace_inet_sock_set_state"));
        assert!(!btf.has_typedef("btf_trace_no_such_tracepoint"));
        let min_rtt = btf.member_offset("tcp_sock", "rtt_min.s.v").unwrap();
        assert_eq!(
            min_rtt,
            btf.member_offset("tcp_sock", "rtt_min").unwrap() + 4
        );
    }
}
