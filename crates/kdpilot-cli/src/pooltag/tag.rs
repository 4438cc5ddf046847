//! Pool tags and the `PoolTag` registry value.
//!
//! A pool tag is four bytes, usually ASCII text padded with spaces (`Ddk` is `Ddk `). The
//! `PoolTag` REG_DWORD under `Session Manager\Memory Management` holds those bytes read as a
//! little-endian u32: `Ddk ` is 0x206b6444. Debuggers and GFlags show that number, so the text
//! reads backwards in a dword dump (`" kdD"`). `?` (one character) and `*` (any characters) are
//! wildcards for special pool; they are stored as their ASCII bytes. A value below the page
//! size is not a tag at all: special pool then takes allocations of that many bytes.
//!
//! Argument syntax (see [`parse_arg`]): `0x` + 1..8 hex digits is a value, `0n` + decimal digits
//! is a value (WinDbg's decimal prefix), anything else is tag text. Bare digits are text, because
//! tags are typed as text everywhere in WinDbg (`!poolused 2 Ddk`) and `1234` is a valid tag.

use std::fmt::{self, Write as _};

/// The page size on x86 and x64; a `PoolTag` value below it selects allocations by size.
pub const PAGE_SIZE: u32 = 0x1000;

/// Four pool tag bytes, in memory order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PoolTag([u8; 4]);

impl PoolTag {
    /// Parses tag text: 1 to 4 printable ASCII characters (space to `~`), padded with spaces.
    pub fn from_text(text: &str) -> Result<Self, TagError> {
        if text.is_empty() {
            return Err(TagError::Empty);
        }
        if let Some(ch) = text.chars().find(|c| !c.is_ascii()) {
            return Err(TagError::NotAscii {
                text: text.to_owned(),
                ch,
            });
        }
        if let Some(ch) = text.chars().find(|c| c.is_ascii_control()) {
            return Err(TagError::Control {
                text: text.to_owned(),
                byte: ch as u8,
            });
        }
        if text.len() > 4 {
            return Err(TagError::TooLong {
                text: text.to_owned(),
            });
        }
        let mut bytes = [b' '; 4];
        bytes[..text.len()].copy_from_slice(text.as_bytes());
        Ok(Self(bytes))
    }

    /// The tag whose `PoolTag` registry value is `value`.
    pub const fn from_value(value: u32) -> Self {
        Self(value.to_le_bytes())
    }

    /// The `PoolTag` REG_DWORD: the bytes read as a little-endian u32.
    pub const fn value(self) -> u32 {
        u32::from_le_bytes(self.0)
    }

    /// The four bytes in memory order.
    pub const fn bytes(self) -> [u8; 4] {
        self.0
    }

    /// Whether special pool reads this value as an allocation size rather than a tag.
    pub const fn is_size(self) -> bool {
        self.value() < PAGE_SIZE
    }

    /// Whether every byte is printable ASCII, i.e. the tag can be typed as text.
    pub fn is_text(self) -> bool {
        self.0.iter().all(|b| is_printable(*b))
    }

    /// Whether the tag contains the special pool wildcards `?` or `*`.
    pub fn has_wildcards(self) -> bool {
        self.0.iter().any(|b| matches!(b, b'?' | b'*'))
    }

    /// The tag as it would be typed: the text without its padding spaces, if it is text at all.
    pub fn typed_text(self) -> Option<String> {
        self.is_text().then(|| {
            String::from_utf8_lossy(&self.0)
                .trim_end_matches(' ')
                .to_owned()
        })
    }

    /// The bytes as a double-quoted string, in memory order; bytes that are not printable ASCII,
    /// `"` and `\` are escaped (`\x00`, `\"`, `\\`).
    pub fn quoted(self) -> String {
        quote(self.0)
    }

    /// How the tag reads in a dword dump of the value (highest byte first), quoted like
    /// [`PoolTag::quoted`]: `Ddk ` reads `" kdD"`.
    pub fn dword_view(self) -> String {
        let mut bytes = self.0;
        bytes.reverse();
        quote(bytes)
    }
}

impl fmt::Display for PoolTag {
    /// Same as [`PoolTag::quoted`].
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.quoted())
    }
}

fn is_printable(byte: u8) -> bool {
    (0x20..0x7f).contains(&byte)
}

fn quote(bytes: [u8; 4]) -> String {
    let mut out = String::with_capacity(8);
    out.push('"');
    for b in bytes {
        match b {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            b if is_printable(b) => out.push(char::from(b)),
            b => {
                let _ = write!(out, "\\x{b:02x}");
            }
        }
    }
    out.push('"');
    out
}

/// How a tag argument was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Notation {
    /// Tag text (`Ddk`).
    Text,
    /// A `0x` hexadecimal value.
    Hex,
    /// A `0n` decimal value.
    Decimal,
}

/// A parsed tag argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TagArg {
    /// The argument as given.
    pub input: String,
    /// How it was written.
    pub notation: Notation,
    /// The tag (or size) it denotes.
    pub tag: PoolTag,
}

/// Parses a tag argument: `0x` + 1..8 hex digits or `0n` + decimal digits is a `PoolTag` value,
/// anything else is tag text (see [`PoolTag::from_text`]). With `text_only`, everything is text.
pub fn parse_arg(input: &str, text_only: bool) -> Result<TagArg, TagError> {
    let number = if text_only {
        None
    } else if let Some(digits) = strip_prefix_ci(input, "0x") {
        Some((Notation::Hex, digits, 16))
    } else {
        strip_prefix_ci(input, "0n").map(|digits| (Notation::Decimal, digits, 10))
    };
    let (notation, tag) = match number {
        None => (Notation::Text, PoolTag::from_text(input)?),
        Some((notation, digits, radix)) => (
            notation,
            PoolTag::from_value(parse_value(input, digits, radix)?),
        ),
    };
    Ok(TagArg {
        input: input.to_owned(),
        notation,
        tag,
    })
}

fn strip_prefix_ci<'a>(input: &'a str, prefix: &str) -> Option<&'a str> {
    let head = input.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &input[prefix.len()..])
}

fn parse_value(input: &str, digits: &str, radix: u32) -> Result<u32, TagError> {
    let bad = || TagError::BadNumber {
        text: input.to_owned(),
        radix,
    };
    // from_str_radix alone would accept a sign ("0x+1").
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(bad());
    }
    let significant = digits.trim_start_matches('0');
    // u32::MAX has 8 hex or 10 decimal digits; longer can't fit (and could overflow u64).
    let max_digits = if radix == 16 { 8 } else { 10 };
    let too_large = || TagError::TooLarge {
        text: input.to_owned(),
    };
    if significant.len() > max_digits {
        return Err(too_large());
    }
    let value = match significant {
        "" => 0,
        s => u64::from_str_radix(s, radix).map_err(|_| bad())?,
    };
    u32::try_from(value).map_err(|_| too_large())
}

/// Why a tag argument was rejected. The messages say what is accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TagError {
    /// An empty argument.
    Empty,
    /// More than four characters.
    TooLong {
        /// The argument.
        text: String,
    },
    /// A character outside ASCII.
    NotAscii {
        /// The argument.
        text: String,
        /// The first offending character.
        ch: char,
    },
    /// An ASCII control character (0x00..0x1f, 0x7f).
    Control {
        /// The argument.
        text: String,
        /// The first offending byte.
        byte: u8,
    },
    /// `0x`/`0n` not followed by digits of that radix.
    BadNumber {
        /// The argument.
        text: String,
        /// 16 for `0x`, 10 for `0n`.
        radix: u32,
    },
    /// A value above 0xffffffff.
    TooLarge {
        /// The argument.
        text: String,
    },
}

const ACCEPTED: &str =
    "a tag is 1 to 4 printable ASCII characters such as Ddk, or a value such as 0x206b6444";

impl fmt::Display for TagError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TagError::Empty => write!(f, "empty pool tag: {ACCEPTED}"),
            TagError::TooLong { text } => write!(
                f,
                "pool tag {text:?} is {} characters long: {ACCEPTED} (shorter tags are padded with spaces)",
                text.chars().count()
            ),
            TagError::NotAscii { text, ch } => write!(
                f,
                "pool tag {text:?} contains {ch:?} (U+{:04X}), which is not ASCII: {ACCEPTED}",
                u32::from(*ch)
            ),
            TagError::Control { text, byte } => write!(
                f,
                "pool tag {text:?} contains the control character 0x{byte:02x}: {ACCEPTED} \
                 (give a tag with other bytes as its 0x value)"
            ),
            TagError::BadNumber { text, radix: 16 } => write!(
                f,
                "{text:?} is not a hexadecimal value: write 0x and 1 to 8 hex digits \
                 (pass --text to read it as tag text)"
            ),
            TagError::BadNumber { text, .. } => write!(
                f,
                "{text:?} is not a decimal value: write 0n and decimal digits \
                 (pass --text to read it as tag text)"
            ),
            TagError::TooLarge { text } => write!(
                f,
                "{text} does not fit in the 32-bit PoolTag REG_DWORD (at most 0xffffffff)"
            ),
        }
    }
}

impl std::error::Error for TagError {}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> PoolTag {
        PoolTag::from_text(s).unwrap()
    }

    fn arg(s: &str) -> TagArg {
        parse_arg(s, false).unwrap()
    }

    #[test]
    fn text_to_value_pads_with_spaces() {
        assert_eq!(text("Ddk").value(), 0x206b_6444);
        assert_eq!(text("Ddk").bytes(), *b"Ddk ");
        assert_eq!(text("Fred").value(), 0x6465_7246);
        assert_eq!(text("Tag1").value(), 0x3167_6154);
        assert_eq!(text("a").value(), 0x2020_2061);
    }

    #[test]
    fn value_to_text() {
        assert_eq!(PoolTag::from_value(0x6465_7246).bytes(), *b"Fred");
        assert_eq!(
            PoolTag::from_value(0x206b_6444).typed_text().unwrap(),
            "Ddk"
        );
        assert_eq!(PoolTag::from_value(0x206b_6444).quoted(), "\"Ddk \"");
    }

    #[test]
    fn round_trips() {
        for s in ["Ddk", "Fred", "Fr?d", "Fat*", "a b", "~!@#", "1234"] {
            let tag = text(s);
            assert_eq!(PoolTag::from_value(tag.value()), tag);
            assert_eq!(tag.typed_text().unwrap(), s.trim_end());
        }
        for v in [0u32, 1, 0xfff, 0x1000, 0x206b_6444, 0xffff_ffff] {
            assert_eq!(PoolTag::from_value(v).value(), v);
        }
    }

    #[test]
    fn wildcards_are_plain_bytes() {
        assert_eq!(text("Fr?d").value(), 0x643f_7246);
        assert_eq!(text("Fat*").value(), 0x2a74_6146);
        assert!(text("Av?4").has_wildcards());
        assert!(text("Fat*").has_wildcards());
        assert!(!text("Ddk").has_wildcards());
    }

    #[test]
    fn dword_view_reads_backwards() {
        assert_eq!(text("Ddk").dword_view(), "\" kdD\"");
        assert_eq!(text("Tag1").dword_view(), "\"1gaT\"");
    }

    #[test]
    fn non_printable_bytes_are_escaped() {
        let tag = PoolTag::from_value(0xff00_0041);
        assert!(!tag.is_text());
        assert_eq!(tag.typed_text(), None);
        assert_eq!(tag.quoted(), "\"A\\x00\\x00\\xff\"");
        assert_eq!(text("a\"\\").quoted(), "\"a\\\"\\\\ \"");
        assert_eq!(
            PoolTag::from_value(0x7f).quoted(),
            "\"\\x7f\\x00\\x00\\x00\""
        );
    }

    #[test]
    fn sizes_are_below_the_page_size() {
        assert!(PoolTag::from_value(0).is_size());
        assert!(PoolTag::from_value(0xfff).is_size());
        assert!(!PoolTag::from_value(0x1000).is_size());
        // A text tag can never be a size: its last byte is at least a space.
        assert!(!text("!").is_size());
    }

    #[test]
    fn text_errors() {
        assert_eq!(PoolTag::from_text(""), Err(TagError::Empty));
        assert!(matches!(
            PoolTag::from_text("ABCDE"),
            Err(TagError::TooLong { .. })
        ));
        assert!(matches!(
            PoolTag::from_text("Dдk"),
            Err(TagError::NotAscii { ch: 'д', .. })
        ));
        assert!(matches!(
            PoolTag::from_text("éé"),
            Err(TagError::NotAscii { .. })
        ));
        assert!(matches!(
            PoolTag::from_text("a\tb"),
            Err(TagError::Control { byte: 9, .. })
        ));
        assert!(matches!(
            PoolTag::from_text("a\u{7f}"),
            Err(TagError::Control { byte: 0x7f, .. })
        ));
    }

    #[test]
    fn arguments_with_prefixes_are_values() {
        assert_eq!(arg("0x64657246").tag, text("Fred"));
        assert_eq!(arg("0x64657246").notation, Notation::Hex);
        assert_eq!(arg("0X64657246").tag, text("Fred"));
        assert_eq!(arg("0x100").tag.value(), 0x100);
        assert_eq!(arg("0x00000000ffffffff").tag.value(), 0xffff_ffff);
        assert_eq!(arg("0n256").tag.value(), 256);
        assert_eq!(arg("0n256").notation, Notation::Decimal);
        assert_eq!(arg("0n4294967295").tag.value(), u32::MAX);
        assert_eq!(arg("0x0").tag.value(), 0);
    }

    #[test]
    fn bare_digits_are_text() {
        assert_eq!(arg("1234").notation, Notation::Text);
        assert_eq!(arg("1234").tag.bytes(), *b"1234");
        assert_eq!(arg("6465").notation, Notation::Text);
    }

    #[test]
    fn text_only_reads_prefixes_as_text() {
        let parsed = parse_arg("0x12", true).unwrap();
        assert_eq!(parsed.notation, Notation::Text);
        assert_eq!(parsed.tag.bytes(), *b"0x12");
    }

    #[test]
    fn number_errors() {
        for bad in ["0x", "0xZZ", "0x+1", "0x-1", "0x 1", "0n", "0n12a", "0n+5"] {
            assert!(
                matches!(parse_arg(bad, false), Err(TagError::BadNumber { .. })),
                "{bad}"
            );
        }
        for big in [
            "0x100000000",
            "0x123456789",
            "0n4294967296",
            "0n99999999999999999999999",
        ] {
            assert!(
                matches!(parse_arg(big, false), Err(TagError::TooLarge { .. })),
                "{big}"
            );
        }
    }

    #[test]
    fn error_messages_say_what_is_accepted() {
        let msg = PoolTag::from_text("ABCDE").unwrap_err().to_string();
        assert!(msg.contains("\"ABCDE\" is 5 characters long"), "{msg}");
        assert!(msg.contains("1 to 4 printable ASCII characters"), "{msg}");
        let msg = parse_arg("0xZZ", false).unwrap_err().to_string();
        assert!(msg.contains("--text"), "{msg}");
    }
}
