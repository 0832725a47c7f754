//! One SQLite value as it travels on the wire.
//!
//! Every SQLite storage class maps to a native MessagePack type so that values
//! round-trip exactly: INTEGER as a MessagePack integer (always within `i64`),
//! REAL as a float64 (bit-exact, NaN payloads included), TEXT as a str, BLOB as
//! a bin and NULL as nil.

use std::fmt;

use rusqlite::types::{FromSql, FromSqlResult, ToSql, ToSqlOutput, ValueRef};
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A SQLite value. Equality is exact: two `Real`s are equal when their bits are.
#[derive(Clone, Debug)]
pub enum Value {
    Null,
    Integer(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

impl PartialEq for Value {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Value::Null, Value::Null) => true,
            (Value::Integer(a), Value::Integer(b)) => a == b,
            (Value::Real(a), Value::Real(b)) => a.to_bits() == b.to_bits(),
            (Value::Text(a), Value::Text(b)) => a == b,
            (Value::Blob(a), Value::Blob(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for Value {}

impl std::hash::Hash for Value {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        std::mem::discriminant(self).hash(h);
        match self {
            Value::Null => {}
            Value::Integer(i) => i.hash(h),
            Value::Real(f) => f.to_bits().hash(h),
            Value::Text(t) => t.hash(h),
            Value::Blob(b) => b.hash(h),
        }
    }
}

impl Value {
    /// Approximate encoded size, used for batch and page limits and progress.
    pub fn wire_size(&self) -> usize {
        match self {
            Value::Null => 1,
            Value::Integer(_) => 9,
            Value::Real(_) => 9,
            Value::Text(s) => s.len() + 5,
            Value::Blob(b) => b.len() + 5,
        }
    }
}

impl Serialize for Value {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Value::Null => s.serialize_unit(),
            Value::Integer(i) => s.serialize_i64(*i),
            Value::Real(f) => s.serialize_f64(*f),
            Value::Text(t) => s.serialize_str(t),
            Value::Blob(b) => s.serialize_bytes(b),
        }
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a SQLite value (nil, integer, float, str or bin)")
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Integer(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        i64::try_from(v).map(Value::Integer).map_err(|_| {
            E::custom(format!(
                "integer {v} is out of SQLite's 64-bit signed range"
            ))
        })
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Real(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::Text(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::Text(v))
    }
    fn visit_bytes<E>(self, v: &[u8]) -> Result<Value, E> {
        Ok(Value::Blob(v.to_vec()))
    }
    fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Value, E> {
        Ok(Value::Blob(v))
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Value, D::Error> {
        d.deserialize_any(ValueVisitor)
    }
}

impl ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self {
            Value::Null => ValueRef::Null,
            Value::Integer(i) => ValueRef::Integer(*i),
            Value::Real(f) => ValueRef::Real(*f),
            Value::Text(t) => ValueRef::Text(t.as_bytes()),
            Value::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

impl FromSql for Value {
    fn column_result(v: ValueRef<'_>) -> FromSqlResult<Self> {
        Ok(match v {
            ValueRef::Null => Value::Null,
            ValueRef::Integer(i) => Value::Integer(i),
            ValueRef::Real(f) => Value::Real(f),
            // SQLite TEXT is UTF-8 unless an app stored invalid bytes; keep them
            // lossless rather than failing the whole batch.
            ValueRef::Text(t) => match std::str::from_utf8(t) {
                Ok(s) => Value::Text(s.to_owned()),
                Err(_) => Value::Text(String::from_utf8_lossy(t).into_owned()),
            },
            ValueRef::Blob(b) => Value::Blob(b.to_vec()),
        })
    }
}

/// Encodes a primary key as bytes, used by the hub as a row identity.
/// The encoding is MessagePack of the key values, which is canonical for our
/// types: rmp writes the smallest integer form and always float64 for REAL.
pub fn encode_key(pk: &[Value]) -> Vec<u8> {
    rmp_serde::to_vec(pk).expect("BUG: encoding a key cannot fail")
}

/// Inverse of [`encode_key`].
pub fn decode_key(bytes: &[u8]) -> Result<Vec<Value>, rmp_serde::decode::Error> {
    rmp_serde::from_slice(bytes)
}

/// Encodes a row's values (hub storage and the client's deferred rows).
pub fn encode_values(values: &[Value]) -> Vec<u8> {
    rmp_serde::to_vec(values).expect("BUG: encoding values cannot fail")
}

/// Inverse of [`encode_values`].
pub fn decode_values(bytes: &[u8]) -> Result<Vec<Value>, rmp_serde::decode::Error> {
    rmp_serde::from_slice(bytes)
}
