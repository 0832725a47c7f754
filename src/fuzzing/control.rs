//! The control socket's request lines against arbitrary bytes.

use tokio_util::bytes::BytesMut;
use tokio_util::codec::{AnyDelimiterCodecError, Decoder};

use crate::control::server::codec;
use crate::control::{ErrorCode, Request, Response, MAX_LINE};

/// What the daemon does with one line a client sent.
#[derive(Debug, PartialEq)]
pub enum Answer {
    /// A request, served.
    Request(Request),
    /// A blank line: nothing.
    Blank,
    /// One error line, then the next line is read.
    Error(String),
    /// One error line, then the connection is closed (a line too long).
    ErrorAndClose(String),
}

/// Splits `input` into lines as the daemon's socket does and answers each
/// one; checks that every line gets a request or one error line that is a
/// single JSON line naming the problem. Panics otherwise.
pub fn check(input: &[u8]) -> Vec<Answer> {
    let mut codec = codec();
    let mut buf = BytesMut::from(input);
    let mut answers = Vec::new();
    loop {
        let line = match codec.decode_eof(&mut buf) {
            Ok(Some(line)) => line,
            Ok(None) => break,
            Err(AnyDelimiterCodecError::MaxChunkLengthExceeded) => {
                let msg = format!("request longer than {MAX_LINE} bytes; closing this connection");
                answers.push(Answer::ErrorAndClose(error_line(msg)));
                break;
            }
            Err(e) => panic!("reading lines from memory failed: {e}"),
        };
        assert!(line.len() <= MAX_LINE, "a line past the limit was read");
        answers.push(answer(&line));
    }
    answers
}

/// The answer to one line (without its newline).
pub fn answer(line: &[u8]) -> Answer {
    match Request::parse(line) {
        Ok(Some(req)) => {
            assert!(Request::CMDS.contains(&req.cmd()), "{req:?}");
            // The CLI sends what it parsed: a request survives JSON.
            let text = serde_json::to_string(&req).expect("requests serialize");
            assert_eq!(
                Request::parse(text.as_bytes()),
                Ok(Some(req.clone())),
                "a request survives JSON"
            );
            Answer::Request(req)
        }
        Ok(None) => {
            let blank = std::str::from_utf8(line).is_ok_and(|t| t.trim().is_empty());
            assert!(blank, "only a blank line is ignored: {line:?}");
            Answer::Blank
        }
        Err(msg) => Answer::Error(error_line(msg)),
    }
}

/// The `bad_request` line answering `msg`, checked: one line of JSON that
/// reads back as the same error.
fn error_line(msg: String) -> String {
    assert!(!msg.trim().is_empty(), "an error says what is wrong");
    let r = Response::error(ErrorCode::BadRequest, msg);
    let line = serde_json::to_string(&r).expect("responses serialize");
    assert!(!line.contains('\n'), "an answer is one line: {line:?}");
    let back: Response = serde_json::from_str(&line).expect("an answer reads back");
    let again = serde_json::to_string(&back).expect("responses serialize");
    assert_eq!(again, line, "an answer reads back as sent");
    line
}
