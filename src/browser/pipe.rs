//! Framing of Chromium's `--remote-debugging-pipe` transport.
//!
//! Chromium reads commands on its fd 3 and writes answers and events on its fd 4. Each message
//! is one JSON text followed by a single NUL byte. JSON text never contains a raw NUL (control
//! characters must be escaped inside strings and are not whitespace), so the NUL is an
//! unambiguous delimiter.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest message accepted from the browser. Screenshots and PDFs travel as base64 inside one
/// message, so this is generous; beyond it the connection fails rather than buffering without
/// bound.
pub const MAX_INBOUND_MESSAGE: usize = 256 * 1024 * 1024;

/// How much the reader asks the kernel for at a time.
const READ_CHUNK: usize = 64 * 1024;

/// Why reading from the pipe stopped.
#[derive(Debug, thiserror::Error)]
pub enum PipeError {
    /// A message grew beyond the limit before its terminating NUL arrived.
    #[error(
        "a message from the browser exceeds {limit} bytes without its NUL terminator; the pipe \
         is closed because the stream cannot be resynchronised"
    )]
    TooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The browser closed its end in the middle of a message.
    #[error("the browser closed the pipe in the middle of a {bytes}-byte message")]
    TruncatedAtEof {
        /// Bytes of the incomplete message.
        bytes: usize,
    },
    /// The read itself failed.
    #[error("reading from the browser's pipe (its fd 4) failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Splits the byte stream from the browser into messages.
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
    /// Bytes of `buf` already searched for a NUL, so a large message is scanned once.
    scanned: usize,
    limit: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Wraps `inner`, accepting messages up to `limit` bytes (without the NUL).
    pub fn new(inner: R, limit: usize) -> Self {
        FrameReader {
            inner,
            buf: Vec::new(),
            scanned: 0,
            limit,
        }
    }

    /// The next message without its NUL, or `None` at a clean end of stream.
    pub async fn next_frame(&mut self) -> Result<Option<Vec<u8>>, PipeError> {
        loop {
            if let Some(pos) = self.buf[self.scanned..].iter().position(|&b| b == 0) {
                let end = self.scanned + pos;
                if end > self.limit {
                    return Err(PipeError::TooLarge { limit: self.limit });
                }
                // Keep the message's allocation and copy the (usually short) remainder, so a
                // large message is never copied.
                let rest = self.buf.split_off(end + 1);
                let mut frame = std::mem::replace(&mut self.buf, rest);
                frame.truncate(end);
                self.scanned = 0;
                return Ok(Some(frame));
            }
            self.scanned = self.buf.len();
            if self.buf.len() > self.limit {
                return Err(PipeError::TooLarge { limit: self.limit });
            }
            if self.buf.capacity() - self.buf.len() < READ_CHUNK {
                self.buf.reserve(READ_CHUNK);
            }
            let n = self.inner.read_buf(&mut self.buf).await?;
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(PipeError::TruncatedAtEof {
                        bytes: self.buf.len(),
                    })
                };
            }
        }
    }
}

/// Writes one message. `message` must already end with the NUL terminator: the caller appends it
/// when it serialises, which saves a second write per message.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    writer: &mut W,
    message: &[u8],
) -> std::io::Result<()> {
    debug_assert_eq!(message.last(), Some(&0));
    writer.write_all(message).await?;
    writer.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn splits_messages_across_and_within_reads() {
        let (mut tx, rx) = tokio::io::duplex(8);
        let writer = tokio::spawn(async move {
            tx.write_all(b"{\"a\":1}\0{\"b\":2}\0{\"c\"").await.unwrap();
            tx.write_all(b":3}\0").await.unwrap();
        });
        let mut reader = FrameReader::new(rx, 1024);
        assert_eq!(reader.next_frame().await.unwrap().unwrap(), b"{\"a\":1}");
        assert_eq!(reader.next_frame().await.unwrap().unwrap(), b"{\"b\":2}");
        assert_eq!(reader.next_frame().await.unwrap().unwrap(), b"{\"c\":3}");
        writer.await.unwrap();
        assert!(reader.next_frame().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn oversized_message_fails_the_stream() {
        let (mut tx, rx) = tokio::io::duplex(1024);
        tokio::spawn(async move {
            let _ = tx.write_all(&[b'x'; 100]).await;
            // Keep the stream open: the reader must fail on size, not on EOF.
            std::future::pending::<()>().await;
        });
        let mut reader = FrameReader::new(rx, 64);
        let err = reader.next_frame().await.unwrap_err();
        assert!(matches!(err, PipeError::TooLarge { limit: 64 }), "{err}");
    }

    #[tokio::test]
    async fn message_at_the_limit_is_accepted() {
        let (mut tx, rx) = tokio::io::duplex(1024);
        tokio::spawn(async move {
            tx.write_all(&[b'x'; 64]).await.unwrap();
            tx.write_all(b"\0").await.unwrap();
        });
        let mut reader = FrameReader::new(rx, 64);
        assert_eq!(reader.next_frame().await.unwrap().unwrap().len(), 64);
    }

    #[tokio::test]
    async fn eof_inside_a_message_is_an_error() {
        let (mut tx, rx) = tokio::io::duplex(1024);
        tx.write_all(b"{\"a\":").await.unwrap();
        drop(tx);
        let mut reader = FrameReader::new(rx, 64);
        let err = reader.next_frame().await.unwrap_err();
        assert!(
            matches!(err, PipeError::TruncatedAtEof { bytes: 5 }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn write_frame_writes_the_terminated_message() {
        let (mut tx, rx) = tokio::io::duplex(1024);
        write_frame(&mut tx, b"{}\0").await.unwrap();
        drop(tx);
        let mut reader = FrameReader::new(rx, 64);
        assert_eq!(reader.next_frame().await.unwrap().unwrap(), b"{}");
        assert!(reader.next_frame().await.unwrap().is_none());
    }
}
