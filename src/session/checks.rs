//! What a daemon refuses to believe from a hub.
//!
//! A hub's frames move the cursor, renumber the local log and consume
//! pending changes. A frame that could not come from a correct hub (a bug, a
//! hub restored wrongly, something impersonating it) must change nothing
//! locally: the session drops the connection, keeps every pending change and
//! tries again after its backoff. The checks are pure functions of what the
//! session knows; [`super::machine`] calls them before acting on a frame.

use crate::proto::{CaughtUp, Change, ChangeResult, Changes, Welcome, MAX_SEQ, MAX_SEQ_JUMP};

/// Why a frame was refused, for the session's error.
pub type Refused = String;

/// `welcome`: the head and this client's mark must be numbers a hub can have
/// reached. `local_seq` is the highest seq this database ever numbered.
pub fn welcome(w: &Welcome, local_seq: u64) -> Result<(), Refused> {
    if w.head > MAX_SEQ {
        return Err(format!(
            "hub announced head {} in welcome, above the largest sequence number {MAX_SEQ}",
            w.head
        ));
    }
    if w.client_seq > MAX_SEQ || w.client_seq > local_seq.saturating_add(MAX_SEQ_JUMP) {
        return Err(format!(
            "hub claims to have processed client seq {} of this database, which has numbered its writes only up to {local_seq}: no file could have sent that many; refused, nothing changed",
            w.client_seq
        ));
    }
    Ok(())
}

/// Where the session stands in the hub's numbering.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Position {
    /// Every change up to here was applied or passed on to be applied.
    pub cursor: u64,
    /// Highest head the hub announced on this connection.
    pub head: u64,
}

impl Position {
    /// The highest number the hub may name next: a jump past what it
    /// announced by more than [`MAX_SEQ_JUMP`] cannot be real.
    fn ceiling(&self) -> u64 {
        self.cursor
            .max(self.head)
            .saturating_add(MAX_SEQ_JUMP)
            .min(MAX_SEQ)
    }

    /// A `changes` frame: changes after the cursor in increasing order, up
    /// to `up_to`, which does not go back and stays below the ceiling.
    /// Moves the position on success.
    pub fn changes(&mut self, c: &Changes) -> Result<(), Refused> {
        let ceiling = self.ceiling();
        if c.up_to < self.cursor {
            return Err(format!(
                "hub sent changes up to {} while this database already holds everything up to {}",
                c.up_to, self.cursor
            ));
        }
        for (what, n) in [("up_to", c.up_to), ("head", c.head)] {
            if n > ceiling {
                return Err(format!(
                    "hub sent changes with {what} {n}, beyond any sequence number it can have reached (last head {}, cursor {})",
                    self.head, self.cursor
                ));
            }
        }
        let mut last = self.cursor;
        for ch in &c.changes {
            if ch.version <= last || ch.version > c.up_to {
                return Err(format!(
                    "hub sent a change with version {} out of order (after {last}, up to {})",
                    ch.version, c.up_to
                ));
            }
            last = ch.version;
        }
        self.cursor = c.up_to;
        self.head = self.head.max(c.head);
        Ok(())
    }

    /// `caught_up`: its head is where the cursor moves; it cannot go back.
    pub fn caught_up(&mut self, c: &CaughtUp) -> Result<(), Refused> {
        if c.head < self.cursor || c.head > self.ceiling() {
            return Err(format!(
                "hub said caught up at {} while this database holds everything up to {} (last head {})",
                c.head, self.cursor, self.head
            ));
        }
        self.cursor = c.head;
        self.head = self.head.max(c.head);
        Ok(())
    }

    /// A `head` answer.
    pub fn head(&mut self, head: u64) -> Result<(), Refused> {
        if head > self.ceiling() {
            return Err(format!(
                "hub answered head {head}, beyond any sequence number it can have reached (last head {}, cursor {})",
                self.head, self.cursor
            ));
        }
        self.head = self.head.max(head);
        Ok(())
    }
}

/// One part of an `upload_result`: its results must answer the batch's
/// changes one by one, in the order they were sent, after the `answered`
/// ones of earlier parts. `last` is true on the final part, which must
/// answer the rest.
pub fn answer_part(
    sent: &[Change],
    answered: usize,
    part: &[ChangeResult],
    last: bool,
) -> Result<(), Refused> {
    let expect = sent.iter().skip(answered);
    if part.len() > sent.len() - answered {
        return Err(format!(
            "hub answered {} changes of a batch of {} ({} answered before)",
            part.len(),
            sent.len(),
            answered
        ));
    }
    for (r, c) in part.iter().zip(expect) {
        if r.seq != c.seq {
            return Err(format!(
                "hub answered seq {} where the batch carried seq {}; nothing of the answer was applied",
                r.seq, c.seq
            ));
        }
    }
    if last && answered + part.len() != sent.len() {
        return Err(format!(
            "hub answered {} of the {} changes of a batch; nothing of the answer was applied",
            answered + part.len(),
            sent.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Access, Op, Outcome, RemoteChange};

    fn welcome_with(head: u64, client_seq: u64) -> Welcome {
        Welcome {
            protocol: 1,
            head,
            access: Access::ReadWrite,
            client_seq,
            features: Vec::new(),
        }
    }

    fn rc(version: u64) -> RemoteChange {
        RemoteChange {
            version,
            table: "t".into(),
            op: Op::Delete,
            pk: Vec::new(),
            values: Vec::new(),
        }
    }

    fn changes(versions: &[u64], up_to: u64, head: u64) -> Changes {
        Changes {
            changes: versions.iter().map(|v| rc(*v)).collect(),
            up_to,
            head,
        }
    }

    fn sent(seqs: &[u64]) -> Vec<Change> {
        seqs.iter()
            .map(|s| Change {
                seq: *s,
                table: "t".into(),
                op: Op::Delete,
                pk: Vec::new(),
                values: Vec::new(),
                base: 0,
                mask: 0,
            })
            .collect()
    }

    fn answers(seqs: &[u64]) -> Vec<ChangeResult> {
        seqs.iter()
            .map(|s| ChangeResult {
                seq: *s,
                outcome: Outcome::Applied { version: *s },
            })
            .collect()
    }

    #[test]
    fn a_welcome_with_an_unreachable_client_seq_or_head_is_refused() {
        assert!(welcome(&welcome_with(10, 0), 5).is_ok());
        // A restored database is behind the hub's mark: legitimate.
        assert!(welcome(&welcome_with(10, 900), 5).is_ok());
        assert!(welcome(&welcome_with(10, 1 << 63), 5).is_err());
        assert!(welcome(&welcome_with(10, 5 + MAX_SEQ_JUMP + 1), 5).is_err());
        assert!(welcome(&welcome_with(MAX_SEQ + 1, 0), 5).is_err());
    }

    #[test]
    fn changes_must_follow_the_cursor_in_order_and_stay_reachable() {
        let mut p = Position {
            cursor: 10,
            head: 20,
        };
        assert!(p.changes(&changes(&[11, 15], 16, 20)).is_ok());
        assert_eq!(p.cursor, 16);
        // Backwards, repeated, beyond up_to.
        assert!(p.clone().changes(&changes(&[], 12, 20)).is_err());
        assert!(p.clone().changes(&changes(&[16], 17, 20)).is_err());
        assert!(p.clone().changes(&changes(&[18, 17], 19, 20)).is_err());
        assert!(p.clone().changes(&changes(&[25], 24, 30)).is_err());
        // Absurd numbers.
        assert!(p.clone().changes(&changes(&[], 1 << 62, 1 << 62)).is_err());
        assert!(p
            .clone()
            .changes(&changes(&[], 20 + MAX_SEQ_JUMP + 1, 20 + MAX_SEQ_JUMP + 1))
            .is_err());
        // A refused frame leaves the position alone.
        assert_eq!(p.cursor, 16);
        // An empty frame moving the cursor is fine.
        assert!(p.changes(&changes(&[], 30, 30)).is_ok());
        assert_eq!((p.cursor, p.head), (30, 30));
    }

    #[test]
    fn caught_up_and_head_answers_cannot_go_back_or_out_of_reach() {
        let mut p = Position {
            cursor: 10,
            head: 10,
        };
        assert!(p.caught_up(&CaughtUp { head: 9 }).is_err());
        assert!(p.caught_up(&CaughtUp { head: 1 << 62 }).is_err());
        assert!(p.caught_up(&CaughtUp { head: 12 }).is_ok());
        assert_eq!(p.cursor, 12);
        assert!(p.head(1 << 62).is_err());
        assert!(p.head(40).is_ok());
        assert_eq!(p.head, 40);
    }

    #[test]
    fn an_answer_must_name_exactly_the_changes_sent_in_order() {
        let s = sent(&[3, 5, 8]);
        assert!(answer_part(&s, 0, &answers(&[3, 5, 8]), true).is_ok());
        assert!(answer_part(&s, 0, &answers(&[3]), false).is_ok());
        assert!(answer_part(&s, 1, &answers(&[5, 8]), true).is_ok());
        // A seq that was never sent.
        assert!(answer_part(&s, 0, &answers(&[3, 5, 9]), true).is_err());
        // Out of order, short, too long.
        assert!(answer_part(&s, 0, &answers(&[5, 3, 8]), true).is_err());
        assert!(answer_part(&s, 0, &answers(&[3, 5]), true).is_err());
        assert!(answer_part(&s, 2, &answers(&[8, 9]), false).is_err());
    }
}
