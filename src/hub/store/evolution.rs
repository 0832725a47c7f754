//! How a synced table's schema may change while devices keep syncing.
//!
//! SQLite appends a column added with `ALTER TABLE ... ADD COLUMN` after the
//! others, so an app that adds columns keeps every column where it was, and
//! a change's `values` (in column order) means the same thing to a device
//! that has the new columns and to one that does not: the latter simply
//! carries fewer values. That is the whole rule:
//!
//! * **Same**: the columns, their declared types and the key are the ones
//!   the hub knows.
//! * **Extends** (additive): the hub's columns, unchanged and in order,
//!   followed by new ones. A read_write client records a new schema
//!   version; devices that have not upgraded keep syncing.
//! * **Older**: the first columns of the hub's schema (an app that has not
//!   upgraded yet, or one that dropped its last columns, which looks the
//!   same). It syncs the columns it has; the hub keeps the values of the
//!   others (see `SqliteStore::apply_batch`).
//! * **Breaking**: anything else (a column dropped before the last ones,
//!   renamed, moved, its type changed, the key changed). Refused with what
//!   changed, until the operator accepts it (`tether hub schema`).
//!
//! Pure functions, no I/O, so the rules are table-tested.

use serde::{Deserialize, Serialize};

use crate::proto::TableSchema;

/// How a client's table relates to a schema the hub knows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Relation {
    Same,
    /// The known columns followed by these new ones.
    Extends {
        added: Vec<String>,
    },
    /// The first columns of the known schema; these ones are missing.
    Older {
        missing: Vec<String>,
    },
    Breaking(Vec<Difference>),
}

/// One breaking difference, named for the operator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Difference {
    /// A known column is gone while columns after it remain.
    Dropped { column: String },
    /// The column at this place has another name (and the old name is gone).
    Renamed { from: String, to: String },
    /// Same name, another declared type.
    TypeChanged {
        column: String,
        from: String,
        to: String,
    },
    /// A new column that is not after every known one (SQLite appends
    /// added columns; this one was placed by rebuilding the table).
    Inserted { column: String },
    /// A known column moved to another place.
    Moved { column: String },
    /// The primary key's columns differ.
    KeyChanged { from: Vec<String>, to: Vec<String> },
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |t: &str| {
            if t.trim().is_empty() {
                "no type".to_owned()
            } else {
                t.to_owned()
            }
        };
        match self {
            Difference::Dropped { column } => write!(f, "column {column:?} was dropped"),
            Difference::Renamed { from, to } => {
                write!(f, "column {from:?} was renamed to {to:?} (or dropped and another added in its place)")
            }
            Difference::TypeChanged { column, from, to } => write!(
                f,
                "column {column:?} changed its declared type from {} to {}",
                show(from),
                show(to)
            ),
            Difference::Inserted { column } => write!(
                f,
                "column {column:?} was added before existing columns (only columns added at the end, as ALTER TABLE ADD COLUMN does, are additive)"
            ),
            Difference::Moved { column } => write!(f, "column {column:?} moved to another place"),
            Difference::KeyChanged { from, to } => write!(
                f,
                "the primary key changed from ({}) to ({})",
                from.join(", "),
                to.join(", ")
            ),
        }
    }
}

/// The differences as one sentence.
pub fn describe(diffs: &[Difference]) -> String {
    diffs
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

fn key_names(t: &TableSchema) -> Vec<String> {
    t.pk.iter()
        .filter_map(|&i| t.columns.get(i as usize).cloned())
        .collect()
}

/// How `client` relates to `known` (see the module docs).
pub fn compare(known: &TableSchema, client: &TableSchema) -> Relation {
    let common = known.columns.len().min(client.columns.len());
    let prefix_equal = (0..common).all(|i| {
        known.columns[i] == client.columns[i]
            && known.types[i].eq_ignore_ascii_case(&client.types[i])
    });
    let (kk, ck) = (key_names(known), key_names(client));
    if prefix_equal && kk == ck {
        return match client.columns.len().cmp(&known.columns.len()) {
            std::cmp::Ordering::Equal => Relation::Same,
            std::cmp::Ordering::Greater => Relation::Extends {
                added: client.columns[common..].to_vec(),
            },
            std::cmp::Ordering::Less => Relation::Older {
                missing: known.columns[common..].to_vec(),
            },
        };
    }
    Relation::Breaking(differences(known, client, kk, ck))
}

fn differences(
    known: &TableSchema,
    client: &TableSchema,
    kk: Vec<String>,
    ck: Vec<String>,
) -> Vec<Difference> {
    let pos = |t: &TableSchema, name: &str| t.columns.iter().position(|c| c == name);
    let mut out = Vec::new();
    for (i, name) in known.columns.iter().enumerate() {
        match pos(client, name) {
            Some(j) => {
                if !known.types[i].eq_ignore_ascii_case(&client.types[j]) {
                    out.push(Difference::TypeChanged {
                        column: name.clone(),
                        from: known.types[i].clone(),
                        to: client.types[j].clone(),
                    });
                }
            }
            // Past the client's last column: an older app, not a drop.
            None if i >= client.columns.len() => {}
            None => match client.columns.get(i) {
                Some(to) if pos(known, to).is_none() => out.push(Difference::Renamed {
                    from: name.clone(),
                    to: to.clone(),
                }),
                _ => out.push(Difference::Dropped {
                    column: name.clone(),
                }),
            },
        }
    }
    let renamed_to = |c: &str| {
        out.iter()
            .any(|d| matches!(d, Difference::Renamed { to, .. } if to == c))
    };
    let mut more = Vec::new();
    for (j, name) in client.columns.iter().enumerate() {
        match pos(known, name) {
            None if j < known.columns.len() && !renamed_to(name) => {
                more.push(Difference::Inserted {
                    column: name.clone(),
                })
            }
            Some(i) if i != j && !out.is_empty() => {}
            Some(i) if i != j => more.push(Difference::Moved {
                column: name.clone(),
            }),
            _ => {}
        }
    }
    out.extend(more);
    if kk != ck {
        out.push(Difference::KeyChanged { from: kk, to: ck });
    }
    if out.is_empty() {
        // Not reachable with a valid schema; said plainly all the same.
        out.push(Difference::Moved {
            column: client.columns.first().cloned().unwrap_or_default(),
        });
    }
    out
}

/// Whether a breaking change can be accepted in place: the rows stay the
/// same rows (same key), only their columns change. A new key makes other
/// rows out of the same data; that takes a new table.
pub fn acceptable(diffs: &[Difference]) -> bool {
    !diffs
        .iter()
        .any(|d| matches!(d, Difference::KeyChanged { .. }))
}

/// Where each column of `to` takes its value from in a row of `from`: the
/// column of the same name, else (a renamed column) the column at the
/// same place if its name is gone from `to`; `None` for a new column.
pub fn column_map(from: &TableSchema, to: &TableSchema) -> Vec<Option<usize>> {
    to.columns
        .iter()
        .enumerate()
        .map(|(j, name)| {
            from.columns.iter().position(|c| c == name).or_else(|| {
                from.columns
                    .get(j)
                    .filter(|old| !to.columns.contains(old))
                    .map(|_| j)
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(cols: &[(&str, &str)], pk: &[u32]) -> TableSchema {
        let columns: Vec<String> = cols.iter().map(|c| c.0.to_owned()).collect();
        let types: Vec<String> = cols.iter().map(|c| c.1.to_owned()).collect();
        TableSchema {
            name: "msgs".into(),
            fingerprint: crate::local::schema::fingerprint("msgs", &columns, &types, pk),
            columns,
            types,
            pk: pk.to_vec(),
            strict: false,
        }
    }

    fn base() -> TableSchema {
        t(
            &[("id", "INTEGER"), ("body", "TEXT"), ("n", "INTEGER")],
            &[0],
        )
    }

    #[test]
    fn columns_added_at_the_end_extend_and_an_older_app_is_a_prefix() {
        let newer = t(
            &[
                ("id", "INTEGER"),
                ("body", "TEXT"),
                ("n", "INTEGER"),
                ("extra", "TEXT"),
            ],
            &[0],
        );
        assert_eq!(compare(&base(), &base()), Relation::Same);
        assert_eq!(
            compare(&base(), &newer),
            Relation::Extends {
                added: vec!["extra".into()]
            }
        );
        assert_eq!(
            compare(&newer, &base()),
            Relation::Older {
                missing: vec!["extra".into()]
            }
        );
        // Declared types compare without case (introspection uppercases).
        let lower = t(
            &[("id", "integer"), ("body", "text"), ("n", "INTEGER")],
            &[0],
        );
        assert_eq!(compare(&base(), &lower), Relation::Same);
    }

    #[test]
    fn every_breaking_change_is_named_with_its_column() {
        let cases: Vec<(TableSchema, &str)> = vec![
            (
                t(&[("id", "INTEGER"), ("n", "INTEGER")], &[0]),
                "column \"body\" was dropped",
            ),
            (
                t(
                    &[("id", "INTEGER"), ("text", "TEXT"), ("n", "INTEGER")],
                    &[0],
                ),
                "column \"body\" was renamed to \"text\"",
            ),
            (
                t(&[("id", "INTEGER"), ("body", "TEXT"), ("n", "REAL")], &[0]),
                "column \"n\" changed its declared type from INTEGER to REAL",
            ),
            (
                t(
                    &[
                        ("id", "INTEGER"),
                        ("x", "TEXT"),
                        ("body", "TEXT"),
                        ("n", "INTEGER"),
                    ],
                    &[0],
                ),
                "column \"x\" was added before existing columns",
            ),
            (
                t(
                    &[("id", "INTEGER"), ("n", "INTEGER"), ("body", "TEXT")],
                    &[0],
                ),
                "column \"n\" moved",
            ),
            (
                t(
                    &[("id", "INTEGER"), ("body", "TEXT"), ("n", "INTEGER")],
                    &[0, 1],
                ),
                "the primary key changed from (id) to (id, body)",
            ),
        ];
        for (client, want) in cases {
            let Relation::Breaking(d) = compare(&base(), &client) else {
                panic!("{client:?} taken as additive");
            };
            let text = describe(&d);
            assert!(text.contains(want), "{text} lacks {want}");
        }
    }

    #[test]
    fn a_key_change_cannot_be_accepted_in_place_the_others_can() {
        let key = t(
            &[("id", "INTEGER"), ("body", "TEXT"), ("n", "INTEGER")],
            &[1],
        );
        let Relation::Breaking(d) = compare(&base(), &key) else {
            panic!()
        };
        assert!(!acceptable(&d));
        let ty = t(&[("id", "INTEGER"), ("body", "TEXT"), ("n", "TEXT")], &[0]);
        let Relation::Breaking(d) = compare(&base(), &ty) else {
            panic!()
        };
        assert!(acceptable(&d));
    }

    #[test]
    fn columns_map_by_name_and_a_renamed_one_by_place() {
        let to = t(
            &[
                ("id", "INTEGER"),
                ("text", "TEXT"),
                ("n", "INTEGER"),
                ("extra", "TEXT"),
            ],
            &[0],
        );
        // body renamed to text; extra new.
        assert_eq!(
            column_map(&base(), &to),
            vec![Some(0), Some(1), Some(2), None]
        );
        let dropped = t(&[("id", "INTEGER"), ("n", "INTEGER")], &[0]);
        assert_eq!(column_map(&base(), &dropped), vec![Some(0), Some(2)]);
    }
}
