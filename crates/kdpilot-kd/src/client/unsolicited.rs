//! Packets a target sends on its own: DbgPrint, DbgPrompt, FILE_IO, trace data.

use tokio::io::{AsyncRead, AsyncWrite};

use super::link::KdLink;
use super::session::ClientConfig;
use super::{ClientEvent, KdError};
use crate::debug_io::DebugIo;
use crate::file_io::FileIo;
use crate::wire::packet_type;

/// Handles one packet that is not a state change or a manipulate reply.
pub(super) async fn handle<S: AsyncRead + AsyncWrite + Unpin>(
    link: &mut KdLink<S>,
    config: &ClientConfig,
    p: crate::wire::Packet,
) -> Result<(), KdError> {
    match p.packet_type {
        packet_type::KD_DEBUG_IO => {
            let io = DebugIo::parse(&p.payload)?;
            if io.is_prompt() {
                tracing::warn!(prompt = %printable(&io.text()), answer = %config.prompt_answer, "target asked a question (DbgPrompt); answering");
                let reply = io.prompt_reply(config.prompt_answer.as_bytes());
                link.send(packet_type::KD_DEBUG_IO, reply.encode(), None)
                    .await?;
                config.sink.emit(ClientEvent::Prompt {
                    prompt: io.string().to_vec(),
                    answer: config.prompt_answer.clone(),
                });
            } else {
                tracing::info!(target: "kdpilot::dbgprint", "{}", printable(&io.text()));
                config
                    .sink
                    .emit(ClientEvent::DebugPrint(io.string().to_vec()));
            }
        }
        packet_type::KD_FILE_IO => {
            let req = FileIo::parse(&p.payload)?;
            let name = req.file_name().unwrap_or_default();
            tracing::debug!(%name, "target asked for a replacement file; answering STATUS_NO_SUCH_FILE");
            link.send(
                packet_type::KD_FILE_IO,
                req.reply_no_such_file().encode(),
                None,
            )
            .await?;
            config.sink.emit(ClientEvent::FileRequest { name });
        }
        other => {
            tracing::debug!(
                kind = packet_type::name(other),
                len = p.payload.len(),
                "ignoring packet"
            );
        }
    }
    Ok(())
}

/// Target text made safe for a terminal: control characters (escape sequences included) are
/// shown as `\x1b`-style escapes, the trailing newline is dropped.
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.trim_end_matches(['\r', '\n']).chars() {
        if c.is_control() && c != '\n' && c != '\t' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn escape_sequences_are_neutralised() {
        assert_eq!(
            printable("\x1b[31mred\x1b[0m\n"),
            "\\u{1b}[31mred\\u{1b}[0m"
        );
        assert_eq!(printable("a\tb\nc\r\n"), "a\tb\nc");
        assert_eq!(printable("bell\x07"), "bell\\u{7}");
    }
}
