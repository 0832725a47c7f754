//! The type rules the hub checks changes against, so that it stores nothing
//! the devices would store differently or refuse:
//!
//! * **Keys, in every table.** The hub tells rows apart by their encoded
//!   key values, a device by what its SQLite stores and compares. A key
//!   value that the key column's type affinity converts (the text `'42'` in
//!   an INTEGER column becomes the integer 42), or that SQLite compares
//!   equal to another value (the real 42.0 and the integer 42), would be
//!   two rows on the hub and one row on every device. Each affinity takes
//!   only values SQLite stores unchanged and equal to no other value; see
//!   [`key_refusal`].
//! * **Values, in STRICT tables.** SQLite refuses a value of another type
//!   than the declared one; the hub refuses it first, so it never reaches
//!   a device; see [`strict_refusal`].

use crate::proto::Value;

/// A column's type affinity, from its declared type (SQLite's rules).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Affinity {
    Integer,
    Text,
    Blob,
    Real,
    Numeric,
}

impl Affinity {
    /// The affinity SQLite gives a declared type, by the first of its rules
    /// that matches: `INT` anywhere is INTEGER; then `CHAR`, `CLOB` or
    /// `TEXT` is TEXT; then `BLOB` or no type at all is BLOB; then `REAL`,
    /// `FLOA` or `DOUB` is REAL; anything else is NUMERIC.
    pub fn of(declared: &str) -> Affinity {
        let t = declared.to_ascii_uppercase();
        let has = |s: &str| t.contains(s);
        if has("INT") {
            Affinity::Integer
        } else if has("CHAR") || has("CLOB") || has("TEXT") {
            Affinity::Text
        } else if has("BLOB") || t.trim().is_empty() {
            Affinity::Blob
        } else if has("REAL") || has("FLOA") || has("DOUB") {
            Affinity::Real
        } else {
            Affinity::Numeric
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Affinity::Integer => "INTEGER",
            Affinity::Text => "TEXT",
            Affinity::Blob => "BLOB",
            Affinity::Real => "REAL",
            Affinity::Numeric => "NUMERIC",
        }
    }

    /// The key values this affinity takes, and why, for refusal messages.
    fn takes(self) -> &'static str {
        match self {
            Affinity::Integer => {
                "such a key takes integers only (SQLite turns the text '42' into the integer 42, and a rowid key refuses anything but an integer)"
            }
            Affinity::Text => {
                "such a key takes text and blobs only (SQLite turns the number 42 into the text '42')"
            }
            Affinity::Blob => {
                "such a key takes integers, text, blobs and reals that equal no integer (SQLite finds the real 42.0 equal to the integer 42, and stores NaN as NULL)"
            }
            Affinity::Real => {
                "such a key takes reals only, neither NaN nor -0.0 (SQLite turns the integer 42 into the real 42.0, stores NaN as NULL and finds -0.0 equal to 0.0)"
            }
            Affinity::Numeric => {
                "such a key takes integers, blobs and reals that equal no integer (SQLite turns the text '42' and the real 42.0 into the integer 42, and stores NaN as NULL)"
            }
        }
    }
}

/// A value's type with its article, for messages: "an integer value".
pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "a NULL value",
        Value::Integer(_) => "an integer value",
        Value::Real(f) if f.is_nan() => "a real value NaN",
        Value::Real(f) if *f == 0.0 && f.is_sign_negative() => "a real value -0.0",
        Value::Real(_) => "a real value",
        Value::Text(_) => "a text value",
        Value::Blob(_) => "a blob value",
    }
}

/// A real that SQLite keeps as a real equal to no integer: not NaN (stored
/// as NULL), and not a whole number within the 64-bit range (NUMERIC
/// affinity turns it into that integer, and anywhere it compares equal to
/// it; -0.0 is one of them, equal to 0).
fn real_equals_no_integer(f: f64) -> bool {
    const TWO_63: f64 = 9_223_372_036_854_775_808.0;
    let whole_in_range = f.fract() == 0.0 && (-TWO_63..TWO_63).contains(&f);
    !(f.is_nan() || whole_in_range)
}

/// Whether a key column of this affinity takes `v` (never NULL: a NULL key
/// is refused before, as `wrong_key`).
pub fn key_fits(v: &Value, affinity: Affinity) -> bool {
    match (affinity, v) {
        (_, Value::Null) => false,
        (Affinity::Integer, Value::Integer(_)) => true,
        (Affinity::Text, Value::Text(_) | Value::Blob(_)) => true,
        (Affinity::Real, Value::Real(f)) => {
            let minus_zero = *f == 0.0 && f.is_sign_negative();
            !(f.is_nan() || minus_zero)
        }
        (Affinity::Numeric, Value::Integer(_) | Value::Blob(_)) => true,
        (Affinity::Numeric | Affinity::Blob, Value::Real(f)) => real_equals_no_integer(*f),
        (Affinity::Blob, Value::Integer(_) | Value::Text(_) | Value::Blob(_)) => true,
        _ => false,
    }
}

/// Why a key column declared `declared` does not take `v`, or None when it
/// does.
pub fn key_refusal(table: &str, column: &str, declared: &str, v: &Value) -> Option<String> {
    let affinity = Affinity::of(declared);
    if key_fits(v, affinity) {
        return None;
    }
    Some(format!(
        "table {table:?}, key column {column:?}: {} cannot be a key of a column declared {} ({} affinity): {}; otherwise the hub and the devices would not agree on which row it is",
        kind(v),
        shown(declared),
        affinity.as_str(),
        affinity.takes()
    ))
}

/// The types a STRICT table may declare.
pub const STRICT_TYPES: [&str; 6] = ["INT", "INTEGER", "REAL", "TEXT", "BLOB", "ANY"];

/// Whether `declared` is a type a STRICT table may declare.
pub fn is_strict_type(declared: &str) -> bool {
    STRICT_TYPES.contains(&declared.trim().to_ascii_uppercase().as_str())
}

/// Whether a column of a STRICT table declared `declared` takes `v`: NULL
/// always (NOT NULL is not known to the hub), otherwise a value of exactly
/// the declared type, or anything for ANY; never a NaN, which SQLite stores
/// as NULL. A type that is not a STRICT type takes anything.
pub fn strict_fits(v: &Value, declared: &str) -> bool {
    let d = declared.trim();
    let is = |t: &str| d.eq_ignore_ascii_case(t);
    let (int, real, text, blob) = (
        is("INT") || is("INTEGER"),
        is("REAL"),
        is("TEXT"),
        is("BLOB"),
    );
    match v {
        Value::Null => true,
        Value::Real(f) if f.is_nan() => false,
        Value::Integer(_) => !(real || text || blob),
        Value::Real(_) => !(int || text || blob),
        Value::Text(_) => !(int || real || blob),
        Value::Blob(_) => !(int || real || text),
    }
}

/// Why a column of a STRICT table does not take `v`, or None when it does.
pub fn strict_refusal(table: &str, column: &str, declared: &str, v: &Value) -> Option<String> {
    if strict_fits(v, declared) {
        return None;
    }
    Some(format!(
        "table {table:?}, column {column:?}: {} cannot be stored in a column declared {} of a STRICT table; the devices' SQLite would refuse it",
        kind(v),
        shown(declared)
    ))
}

fn shown(declared: &str) -> String {
    if declared.trim().is_empty() {
        "without a type".to_owned()
    } else {
        declared.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::Connection;

    #[test]
    fn affinity_follows_sqlites_rules_in_order() {
        for (t, a) in [
            ("INTEGER", Affinity::Integer),
            ("int", Affinity::Integer),
            ("BIGINT", Affinity::Integer),
            // INT wins over CHAR: "POINT" holds INT.
            ("CHARINT", Affinity::Integer),
            ("FLOATING POINT", Affinity::Integer),
            ("VARCHAR(10)", Affinity::Text),
            ("TEXT", Affinity::Text),
            ("CLOB", Affinity::Text),
            ("BLOB", Affinity::Blob),
            ("", Affinity::Blob),
            ("REAL", Affinity::Real),
            ("DOUBLE PRECISION", Affinity::Real),
            ("FLOAT", Affinity::Real),
            ("NUMERIC", Affinity::Numeric),
            ("DECIMAL(10,5)", Affinity::Numeric),
            ("BOOLEAN", Affinity::Numeric),
            ("DATE", Affinity::Numeric),
            // In a table that is not STRICT, ANY is NUMERIC too.
            ("ANY", Affinity::Numeric),
        ] {
            assert_eq!(Affinity::of(t), a, "{t}");
        }
    }

    /// Candidate key values, some of which alias each other in SQLite.
    fn samples() -> Vec<Value> {
        let mut v = vec![
            Value::Integer(0),
            Value::Integer(42),
            Value::Integer(-7),
            Value::Integer(i64::MAX),
            Value::Integer(i64::MIN),
            Value::Real(0.0),
            Value::Real(-0.0),
            Value::Real(42.0),
            Value::Real(42.5),
            Value::Real(-9_223_372_036_854_775_808.0),
            Value::Real(9_223_372_036_854_775_808.0),
            Value::Real(1e300),
            Value::Real(f64::INFINITY),
            Value::Real(f64::NAN),
            Value::Text("42".into()),
            Value::Text(" 42 ".into()),
            Value::Text("42.0".into()),
            Value::Text("4.25e1".into()),
            Value::Text("abc".into()),
            Value::Text("".into()),
            Value::Blob(b"42".to_vec()),
            Value::Blob(vec![]),
        ];
        v.dedup();
        v
    }

    /// Every key value a rule takes is stored by SQLite exactly as sent and
    /// equal to no other value it takes: on every device, one hub key is one
    /// row, and two hub keys are two rows. Checked against SQLite itself,
    /// for each affinity, as a rowid key and as a key of a WITHOUT ROWID
    /// table.
    #[test]
    fn every_key_value_taken_is_stored_unchanged_and_equal_to_no_other() {
        let c = Connection::open_in_memory().unwrap();
        for declared in ["INTEGER", "TEXT", "BLOB", "", "REAL", "NUMERIC", "ANY"] {
            for without_rowid in [false, true] {
                c.execute_batch(&format!(
                    "DROP TABLE IF EXISTS t; CREATE TABLE t (k {declared} PRIMARY KEY, i INTEGER){}",
                    if without_rowid { " WITHOUT ROWID" } else { "" }
                ))
                .unwrap();
                let taken: Vec<Value> = samples()
                    .into_iter()
                    .filter(|v| key_fits(v, Affinity::of(declared)))
                    .collect();
                assert!(!taken.is_empty(), "{declared}");
                for (i, v) in taken.iter().enumerate() {
                    c.execute("INSERT INTO t (k, i) VALUES (?1, ?2)", rusqlite::params![v, i as i64])
                        .unwrap_or_else(|e| {
                            panic!("{declared} (without rowid: {without_rowid}): {v:?} taken but refused: {e}")
                        });
                    let back: Value = c
                        .query_row("SELECT k FROM t WHERE i = ?1", [i as i64], |r| r.get(0))
                        .unwrap();
                    assert_eq!(
                        &back, v,
                        "{declared} (without rowid: {without_rowid}): stored otherwise"
                    );
                }
                let rows: i64 = c
                    .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
                    .unwrap();
                assert_eq!(rows as usize, taken.len(), "{declared}");
                // And each one finds its own row only.
                for (i, v) in taken.iter().enumerate() {
                    let found: Vec<i64> = c
                        .prepare("SELECT i FROM t WHERE k = ?1")
                        .unwrap()
                        .query_map([v], |r| r.get(0))
                        .unwrap()
                        .collect::<Result<_, _>>()
                        .unwrap();
                    assert_eq!(found, vec![i as i64], "{declared}: {v:?}");
                }
            }
        }
    }

    #[test]
    fn key_values_that_would_alias_are_refused_with_their_reason() {
        let refused = |declared: &str, v: Value| {
            key_refusal("t", "k", declared, &v).unwrap_or_else(|| panic!("{declared} took {v:?}"))
        };
        let m = refused("INTEGER", Value::Text("42".into()));
        assert!(
            m.contains("table \"t\", key column \"k\": a text value")
                && m.contains("declared INTEGER (INTEGER affinity)")
                && m.contains("integers only"),
            "{m}"
        );
        assert!(refused("INTEGER", Value::Real(42.0)).contains("a real value"));
        assert!(refused("TEXT", Value::Integer(42)).contains("an integer value"));
        assert!(refused("", Value::Real(42.0)).contains("without a type (BLOB affinity)"));
        assert!(refused("", Value::Real(-0.0)).contains("real value -0.0"));
        assert!(refused("REAL", Value::Real(-0.0)).contains("real value -0.0"));
        assert!(refused("REAL", Value::Real(f64::NAN)).contains("real value NaN"));
        assert!(refused("REAL", Value::Integer(1)).contains("REAL affinity"));
        assert!(refused("NUMERIC", Value::Text("42".into())).contains("NUMERIC affinity"));
        assert!(refused("NUMERIC", Value::Real(42.0)).contains("a real value"));
        for (declared, v) in [
            ("INTEGER", Value::Integer(42)),
            ("TEXT", Value::Text("42".into())),
            ("TEXT", Value::Blob(vec![1])),
            ("", Value::Integer(42)),
            ("", Value::Text("42".into())),
            ("", Value::Real(42.5)),
            ("REAL", Value::Real(42.0)),
            ("NUMERIC", Value::Real(42.5)),
            ("NUMERIC", Value::Integer(42)),
        ] {
            assert_eq!(
                key_refusal("t", "k", declared, &v),
                None,
                "{declared} {v:?}"
            );
        }
    }

    /// What the STRICT rule takes, SQLite stores with its type and value
    /// (0.0 for -0.0 in a REAL column); what it refuses, SQLite refuses or
    /// stores as another type (or NULL, for NaN).
    #[test]
    fn strict_columns_take_exactly_what_a_strict_table_stores_as_it_is() {
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch("CREATE TABLE t (i INT, n INTEGER, r REAL, t TEXT, b BLOB, a ANY) STRICT")
            .unwrap();
        let same = |a: &Value, b: &Value| match (a, b) {
            (Value::Real(x), Value::Real(y)) => x == y,
            _ => a == b,
        };
        let cols = [
            ("i", "INT"),
            ("n", "INTEGER"),
            ("r", "REAL"),
            ("t", "TEXT"),
            ("b", "BLOB"),
            ("a", "ANY"),
        ];
        for (col, declared) in cols {
            for v in samples().into_iter().chain([Value::Null]) {
                let stored = c
                    .execute(&format!("INSERT INTO t ({col}) VALUES (?1)"), [&v])
                    .is_ok()
                    && same(
                        &c.query_row(&format!("SELECT {col} FROM t"), [], |r| {
                            r.get::<_, Value>(0)
                        })
                        .unwrap(),
                        &v,
                    );
                assert_eq!(
                    strict_fits(&v, declared),
                    stored,
                    "{declared}: {v:?} (true: taken and stored as it is)"
                );
                c.execute("DELETE FROM t", []).unwrap();
            }
        }
        let m = strict_refusal("people", "n", "INTEGER", &Value::Text("three".into())).unwrap();
        assert_eq!(
            m,
            "table \"people\", column \"n\": a text value cannot be stored in a column declared INTEGER of a STRICT table; the devices' SQLite would refuse it"
        );
        assert!(is_strict_type("int") && is_strict_type("ANY") && !is_strict_type("VARCHAR"));
    }
}
