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
                tracing::warn!(prompt = %io.text().trim_end(), answer = %config.prompt_answer, "target asked a question (DbgPrompt); answering");
                let reply = io.prompt_reply(config.prompt_answer.as_bytes());
                link.send(packet_type::KD_DEBUG_IO, reply.encode(), None)
                    .await?;
                config.sink.emit(ClientEvent::Prompt {
                    prompt: io.string().to_vec(),
                    answer: config.prompt_answer.clone(),
                });
            } else {
                tracing::info!(target: "kdpilot::dbgprint", "{}", io.text().trim_end());
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
