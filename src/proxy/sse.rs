//! Event alignment of a forwarded SSE stream: bytes go to the client as soon as they complete an event
//! (an event ends at an empty line), and only the unfinished tail of an event is held back — which a
//! client's parser could not use before its end anyway. Upstream chunks that end on an event boundary
//! (DeepSeek's do) pass through whole, without a copy. So when the upstream breaks mid-event, the client
//! has only whole events, and sluice's error event starts cleanly instead of turning a partial
//! `data:` line into a malformed event; and `data: [DONE]` is recognised even when it arrived in pieces.

use bytes::{Bytes, BytesMut};

/// An event larger than this is forwarded unfinished rather than held (it is not an LLM chunk).
const MAX_HELD: usize = 1024 * 1024;

#[derive(Debug, Default)]
pub struct Aligner {
    /// The unfinished event held back.
    held: BytesMut,
    /// Bytes of the current line seen so far (0: at the start of a line).
    line: usize,
    /// The last byte seen was a CR (a following LF belongs to the same line end).
    after_cr: bool,
    /// An event boundary ends in a CR at the very end of what was seen: wait for a possible LF.
    boundary_pending_lf: bool,
    /// `data: [DONE]` went out.
    done: bool,
    /// Part of an event went out unfinished (it was larger than `MAX_HELD`).
    mid_event: bool,
}

impl Aligner {
    /// Takes a chunk from the upstream; returns what may go to the client now.
    pub fn push(&mut self, chunk: Bytes) -> Option<Bytes> {
        let start = self.held.len();
        let boundary = self.scan(&chunk);
        let out = match boundary {
            // Nothing held and the chunk ends on a boundary: forward it as it is.
            Some(end) if start == 0 && end == chunk.len() => Some(chunk),
            Some(end) if start == 0 => {
                self.held.extend_from_slice(&chunk[end..]);
                Some(chunk.slice(..end))
            }
            Some(end) => {
                self.held.extend_from_slice(&chunk[..end]);
                let out = self.held.split().freeze();
                self.held.extend_from_slice(&chunk[end..]);
                Some(out)
            }
            None => {
                self.held.extend_from_slice(&chunk);
                None
            }
        };
        let out = match out {
            None if self.held.len() > MAX_HELD => {
                self.mid_event = true;
                Some(self.held.split().freeze())
            }
            Some(bytes) => {
                // What goes out ends on an event boundary (an oversized event's rest was held anew).
                self.mid_event = false;
                Some(bytes)
            }
            None => None,
        };
        if let Some(bytes) = &out {
            if !self.done {
                self.done = contains_done(bytes);
            }
        }
        out
    }

    /// The upstream ended cleanly: whatever is held (a last event without its empty line) goes out.
    pub fn finish(&mut self) -> Option<Bytes> {
        (!self.held.is_empty()).then(|| {
            let out = self.held.split().freeze();
            self.done |= contains_done(&out);
            out
        })
    }

    /// The upstream broke: the unfinished event is dropped. Returns what must precede a new event so that
    /// it starts on a fresh line (empty unless an oversized event went out unfinished).
    pub fn abandon(&mut self) -> &'static [u8] {
        self.held.clear();
        if self.mid_event || self.boundary_pending_lf {
            b"\n\n"
        } else {
            b""
        }
    }

    /// Whether the stream's `data: [DONE]` went to the client.
    pub fn done(&self) -> bool {
        self.done
    }

    /// Scans `chunk` (which follows what is held) for the end of the last complete event in it; returns
    /// the offset in `chunk` just past it.
    fn scan(&mut self, chunk: &[u8]) -> Option<usize> {
        let mut boundary = None;
        for (i, &byte) in chunk.iter().enumerate() {
            if self.boundary_pending_lf {
                self.boundary_pending_lf = false;
                if byte == b'\n' && self.after_cr {
                    self.after_cr = false;
                    boundary = Some(i + 1);
                    continue;
                }
                boundary = Some(i);
            }
            match byte {
                b'\n' if self.after_cr => self.after_cr = false, // the LF of a CRLF
                b'\n' | b'\r' => {
                    self.after_cr = byte == b'\r';
                    if self.line == 0 {
                        if byte == b'\r' {
                            self.boundary_pending_lf = true;
                        } else {
                            boundary = Some(i + 1);
                        }
                    }
                    self.line = 0;
                }
                _ => {
                    self.after_cr = false;
                    self.line += 1;
                }
            }
        }
        boundary
    }
}

/// Whether complete events include the stream's end marker.
fn contains_done(events: &[u8]) -> bool {
    events.windows(12).any(|w| w == b"data: [DONE]") || events.windows(11).any(|w| w == b"data:[DONE]")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `stream` cut into pieces at `cuts`; returns what went out, in order.
    fn feed(stream: &[u8], cuts: &[usize]) -> (Vec<u8>, Aligner) {
        let mut aligner = Aligner::default();
        let mut out = Vec::new();
        let mut from = 0;
        for &cut in cuts.iter().chain(std::iter::once(&stream.len())) {
            if let Some(bytes) = aligner.push(Bytes::copy_from_slice(&stream[from..cut])) {
                out.extend_from_slice(&bytes);
            }
            from = cut;
        }
        (out, aligner)
    }

    const STREAM: &[u8] = b": keep-alive\n\ndata: {\"a\":\"\xc3\xa9t\xc3\xa9\"}\n\ndata: {\"b\":2}\n\ndata: [DONE]\n\n";

    #[test]
    fn whole_events_pass_through_and_partial_ones_wait() {
        for cut in 0..STREAM.len() {
            let (out, aligner) = feed(STREAM, &[cut]);
            assert_eq!(out, STREAM, "cut at {cut}");
            assert!(aligner.done());
        }
        // Cut mid-event and stopped there: only whole events went out.
        for cut in 1..STREAM.len() {
            let (out, _) = feed(&STREAM[..cut], &[]);
            let text = String::from_utf8_lossy(&out);
            assert!(out.is_empty() || out.ends_with(b"\n\n"), "cut at {cut}: {text:?}");
        }
    }

    #[test]
    fn an_aligned_chunk_is_not_copied() {
        let mut aligner = Aligner::default();
        let chunk = Bytes::from_static(b"data: {}\n\n");
        let out = aligner.push(chunk.clone()).unwrap();
        assert_eq!(out.as_ptr(), chunk.as_ptr());
    }

    #[test]
    fn crlf_and_cr_line_ends() {
        let stream = b"data: 1\r\n\r\ndata: 2\r\rdata: [DONE]\r\n\r\n";
        for cut in 0..stream.len() {
            let (out, aligner) = feed(stream, &[cut]);
            assert_eq!(out, stream, "cut at {cut}");
            assert!(aligner.done());
        }
        let (out, _) = feed(b"data: 1\r\n\r\ndata: 2", &[]);
        assert_eq!(out, b"data: 1\r\n\r\n");
    }

    #[test]
    fn done_split_across_chunks_is_seen() {
        let (_, aligner) = feed(b"data: {}\n\ndata: [DO", &[]);
        assert!(!aligner.done());
        let (_, aligner) = feed(b"data: {}\n\ndata: [DONE]\n\n", &[14, 17]);
        assert!(aligner.done());
    }

    #[test]
    fn abandoning_drops_the_partial_event() {
        let (out, mut aligner) = feed(b"data: {\"a\":1}\n\ndata: {\"b\":", &[]);
        assert_eq!(out, b"data: {\"a\":1}\n\n");
        assert_eq!(aligner.abandon(), b"");
        assert_eq!(aligner.finish(), None);
    }

    #[test]
    fn an_oversized_event_is_not_held_forever() {
        let mut aligner = Aligner::default();
        let big = Bytes::from(vec![b'x'; MAX_HELD + 1]);
        assert!(aligner.push(big).is_some());
        assert_eq!(aligner.abandon(), b"\n\n", "the error event must start on a fresh line");
    }
}
