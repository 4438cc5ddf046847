//! DBGKD_DEBUG_IO (kd-protocol.md 2.5): DbgPrint output (PrintString, 0x3230) and DbgPrompt
//! (GetString, 0x3231), which the host must answer with the string it read.
//!
//! Strings are bytes the target chose: [`DebugIo`] keeps them raw and every length is bounded
//! by what the packet carries; [`DebugIo::text`] gives a lossy `String` for display.

use std::borrow::Cow;

use crate::wire::bytes::{Fields, FieldsMut};
use crate::PayloadError;

/// Size of the DBGKD_DEBUG_IO header.
pub const DEBUG_IO_HEADER_SIZE: usize = 16;

/// DEBUG_IO ApiNumber values.
pub mod api_number {
    /// DbgKdPrintStringApi: DbgPrint output.
    pub const PRINT_STRING: u32 = 0x3230;
    /// DbgKdGetStringApi: DbgPrompt (and the host's answer).
    pub const GET_STRING: u32 = 0x3231;
}

/// A KD_DEBUG_IO payload, generic form: every byte kept.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DebugIo {
    /// ApiNumber @0.
    pub api: u32,
    /// ProcessorLevel @4.
    pub processor_level: u16,
    /// Processor @6.
    pub processor: u16,
    /// @8: PrintString.LengthOfString / GetString.LengthOfPromptString.
    pub length: u32,
    /// @12: GetString.LengthOfStringRead (the answer buffer size in a prompt, the answer
    /// length in the host's reply); not used by PrintString (real kernels leave junk: T1
    /// frame 4 has 0x7ff).
    pub length_of_string_read: u32,
    /// The bytes after the header.
    pub data: Vec<u8>,
}

/// A DbgPrint string.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrintString {
    /// ProcessorLevel.
    pub processor_level: u16,
    /// CPU that printed.
    pub processor: u16,
    /// The bytes printed.
    pub string: Vec<u8>,
}

/// A DbgPrompt: the target waits for the host's answer ([`DebugIo::prompt_reply`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GetString {
    /// ProcessorLevel.
    pub processor_level: u16,
    /// CPU that prompts.
    pub processor: u16,
    /// The prompt text.
    pub prompt: Vec<u8>,
    /// Size of the target's answer buffer (LengthOfStringRead in the prompt).
    pub max_response: u32,
}

/// The host's answer to a prompt, as the target receives it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PromptReply {
    /// The answer bytes (LengthOfStringRead of them, bounded by the packet).
    pub answer: Vec<u8>,
}

/// What a target sends on KD_DEBUG_IO, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DebugIoMessage {
    /// DbgPrint.
    Print(PrintString),
    /// DbgPrompt.
    GetString(GetString),
}

impl DebugIo {
    /// Parses a KD_DEBUG_IO payload (at least the 16-byte header).
    pub fn parse(payload: &[u8]) -> Result<Self, PayloadError> {
        let f = Fields::new(payload, "DBGKD_DEBUG_IO");
        f.slice(0, DEBUG_IO_HEADER_SIZE)?;
        Ok(Self {
            api: f.u32(0)?,
            processor_level: f.u16(4)?,
            processor: f.u16(6)?,
            length: f.u32(8)?,
            length_of_string_read: f.u32(12)?,
            data: f.rest(DEBUG_IO_HEADER_SIZE).to_vec(),
        })
    }

    /// The payload bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![0u8; DEBUG_IO_HEADER_SIZE];
        let mut w = FieldsMut::new(&mut out);
        w.u32(0, self.api);
        w.u16(4, self.processor_level);
        w.u16(6, self.processor);
        w.u32(8, self.length);
        w.u32(12, self.length_of_string_read);
        out.extend_from_slice(&self.data);
        out
    }

    /// Whether this is DbgPrint output.
    pub fn is_print(&self) -> bool {
        self.api == api_number::PRINT_STRING
    }

    /// Whether this is a DbgPrompt (the host must answer).
    pub fn is_prompt(&self) -> bool {
        self.api == api_number::GET_STRING
    }

    /// The printed string or the prompt: `length` bytes, bounded by the packet.
    pub fn string(&self) -> &[u8] {
        let n = (self.length as usize).min(self.data.len());
        self.data.get(..n).unwrap_or(&[])
    }

    /// [`Self::string`], lossily decoded for display.
    pub fn text(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(self.string())
    }

    /// Decodes a target's message. Fails for an unknown ApiNumber.
    pub fn message(&self) -> Result<DebugIoMessage, PayloadError> {
        match self.api {
            api_number::PRINT_STRING => Ok(DebugIoMessage::Print(PrintString {
                processor_level: self.processor_level,
                processor: self.processor,
                string: self.string().to_vec(),
            })),
            api_number::GET_STRING => Ok(DebugIoMessage::GetString(GetString {
                processor_level: self.processor_level,
                processor: self.processor,
                prompt: self.string().to_vec(),
                max_response: self.length_of_string_read,
            })),
            other => Err(PayloadError::Invalid {
                what: "DBGKD_DEBUG_IO",
                detail: format!("unknown ApiNumber {other:#06x}"),
            }),
        }
    }

    /// The host's answer to this prompt: the header echoed with LengthOfStringRead set to the
    /// answer length, the answer appended. The answer is cut to the target's buffer size
    /// (LengthOfStringRead of the prompt).
    pub fn prompt_reply(&self, answer: &[u8]) -> DebugIo {
        let n = answer.len().min(self.length_of_string_read as usize);
        let answer = answer.get(..n).unwrap_or(&[]);
        DebugIo {
            api: api_number::GET_STRING,
            processor_level: self.processor_level,
            processor: self.processor,
            length: self.length,
            length_of_string_read: n as u32,
            data: answer.to_vec(),
        }
    }

    /// Decodes the host's answer to a prompt (what a target does).
    pub fn reply(&self) -> Result<PromptReply, PayloadError> {
        if self.api != api_number::GET_STRING {
            return Err(PayloadError::WrongApi {
                expected: api_number::GET_STRING,
                got: self.api,
            });
        }
        let n = (self.length_of_string_read as usize).min(self.data.len());
        Ok(PromptReply {
            answer: self.data.get(..n).unwrap_or(&[]).to_vec(),
        })
    }
}

impl PrintString {
    /// A print from CPU 0.
    pub fn new(string: &[u8]) -> Self {
        Self {
            processor_level: 0,
            processor: 0,
            string: string.to_vec(),
        }
    }

    /// The generic form (LengthOfStringRead 0).
    pub fn to_debug_io(&self) -> DebugIo {
        DebugIo {
            api: api_number::PRINT_STRING,
            processor_level: self.processor_level,
            processor: self.processor,
            length: self.string.len() as u32,
            length_of_string_read: 0,
            data: self.string.clone(),
        }
    }
}

impl GetString {
    /// A prompt from CPU 0.
    pub fn new(prompt: &[u8], max_response: u32) -> Self {
        Self {
            processor_level: 0,
            processor: 0,
            prompt: prompt.to_vec(),
            max_response,
        }
    }

    /// The generic form.
    pub fn to_debug_io(&self) -> DebugIo {
        DebugIo {
            api: api_number::GET_STRING,
            processor_level: self.processor_level,
            processor: self.processor,
            length: self.prompt.len() as u32,
            length_of_string_read: self.max_response,
            data: self.prompt.clone(),
        }
    }
}

impl DebugIoMessage {
    /// The generic form.
    pub fn to_debug_io(&self) -> DebugIo {
        match self {
            DebugIoMessage::Print(p) => p.to_debug_io(),
            DebugIoMessage::GetString(g) => g.to_debug_io(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_are_bounded_by_the_packet() {
        let mut raw = vec![
            0x30, 0x32, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0,
        ];
        raw.extend_from_slice(b"hi");
        let d = DebugIo::parse(&raw).unwrap();
        assert_eq!(d.string(), b"hi");
        assert_eq!(d.encode(), raw);
    }

    #[test]
    fn prompt_reply_is_cut_to_the_buffer() {
        let p = GetString::new(b"Break? ", 3).to_debug_io();
        let r = p.prompt_reply(b"ignore");
        assert_eq!(r.length_of_string_read, 3);
        assert_eq!(r.reply().unwrap().answer, b"ign");
    }
}
