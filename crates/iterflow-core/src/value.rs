//! Values crossing the wire: [`Param`] adapts to whatever type the server inferred for a
//! placeholder (statements are prepared without explicit types, like psycopg sends them),
//! and [`Val`] reads any column type the queries return. JSON travels as text both ways.

use std::error::Error;

use bytes::{BufMut, BytesMut};
use chrono::{DateTime, Utc};
use tokio_postgres::types::{FromSql, IsNull, Kind, ToSql, Type};
use uuid::Uuid;

use crate::CoreError;

type BoxError = Box<dyn Error + Sync + Send>;

/// A statement parameter; encoded according to the placeholder's server-side type.
#[derive(Debug, Clone, PartialEq)]
pub enum Param {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    /// Text; also accepted for `uuid` placeholders (parsed) and `jsonb` ones (as a JSON string).
    Text(String),
    /// Already-encoded JSON text, for `json`/`jsonb` placeholders.
    Json(String),
    Ts(DateTime<Utc>),
    /// A text array; also accepted for `uuid[]` placeholders.
    TextArray(Vec<String>),
    IntArray(Vec<i64>),
    /// An array of any element type, each element encoded like a parameter of that type
    /// (`Null` elements allowed): the columns of the multi-row statements.
    List(Vec<Param>),
}

impl Param {
    pub fn text(s: impl Into<String>) -> Param {
        Param::Text(s.into())
    }

    pub fn opt_text(s: Option<impl Into<String>>) -> Param {
        s.map_or(Param::Null, |s| Param::Text(s.into()))
    }

    pub fn opt_json(s: Option<impl Into<String>>) -> Param {
        s.map_or(Param::Null, |s| Param::Json(s.into()))
    }

    pub fn opt_int(i: Option<i64>) -> Param {
        i.map_or(Param::Null, Param::Int)
    }

    pub fn opt_ts(t: Option<DateTime<Utc>>) -> Param {
        t.map_or(Param::Null, Param::Ts)
    }

    pub fn texts<S: AsRef<str>>(items: &[S]) -> Param {
        Param::TextArray(items.iter().map(|s| s.as_ref().to_string()).collect())
    }
}

fn write_text(s: &str, out: &mut BytesMut) -> Result<IsNull, BoxError> {
    out.put_slice(s.as_bytes());
    Ok(IsNull::No)
}

fn is_text(ty: &Type) -> bool {
    matches!(
        *ty,
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN
    )
}

fn mismatch(what: &str, ty: &Type) -> BoxError {
    format!("cannot send {what} as a {ty} parameter").into()
}

impl ToSql for Param {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, BoxError> {
        match self {
            Param::Null => Ok(IsNull::Yes),
            Param::Bool(b) => match *ty {
                Type::BOOL => b.to_sql(ty, out),
                _ => Err(mismatch("a bool", ty)),
            },
            Param::Int(i) => match *ty {
                Type::INT2 => i16::try_from(*i)?.to_sql(ty, out),
                Type::INT4 => i32::try_from(*i)?.to_sql(ty, out),
                Type::INT8 => i.to_sql(ty, out),
                Type::FLOAT4 => (*i as f32).to_sql(ty, out),
                Type::FLOAT8 => (*i as f64).to_sql(ty, out),
                Type::OID => u32::try_from(*i)?.to_sql(ty, out),
                Type::JSON | Type::JSONB => Param::Json(i.to_string()).to_sql(ty, out),
                ref t if is_text(t) => write_text(&i.to_string(), out),
                _ => Err(mismatch("an int", ty)),
            },
            Param::Float(f) => match *ty {
                Type::FLOAT4 => (*f as f32).to_sql(ty, out),
                Type::FLOAT8 => f.to_sql(ty, out),
                _ => Err(mismatch("a float", ty)),
            },
            Param::Text(s) => match *ty {
                Type::UUID => Uuid::parse_str(s)
                    .map_err(|_| -> BoxError { format!("{s:?} is not a UUID").into() })?
                    .to_sql(ty, out),
                Type::JSON | Type::JSONB => Param::Json(serde_json::to_string(s)?).to_sql(ty, out),
                ref t if is_text(t) => write_text(s, out),
                _ => Err(mismatch("a string", ty)),
            },
            Param::Json(s) => match *ty {
                Type::JSONB => {
                    out.put_u8(1);
                    write_text(s, out)
                }
                Type::JSON => write_text(s, out),
                ref t if is_text(t) => write_text(s, out),
                _ => Err(mismatch("JSON", ty)),
            },
            Param::Ts(t) => match *ty {
                Type::TIMESTAMPTZ => t.to_sql(ty, out),
                Type::TIMESTAMP => t.naive_utc().to_sql(ty, out),
                _ => Err(mismatch("a datetime", ty)),
            },
            Param::TextArray(items) => match *ty {
                Type::UUID_ARRAY => {
                    let ids = items
                        .iter()
                        .map(|s| Uuid::parse_str(s))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|_| -> BoxError { "not a UUID in a uuid[] parameter".into() })?;
                    ids.to_sql(ty, out)
                }
                Type::TEXT_ARRAY | Type::VARCHAR_ARRAY | Type::NAME_ARRAY => items.to_sql(ty, out),
                _ => Err(mismatch("a list of strings", ty)),
            },
            Param::IntArray(items) => match *ty {
                Type::INT8_ARRAY => items.to_sql(ty, out),
                Type::INT4_ARRAY => items
                    .iter()
                    .map(|&i| i32::try_from(i))
                    .collect::<Result<Vec<_>, _>>()?
                    .to_sql(ty, out),
                _ => Err(mismatch("a list of ints", ty)),
            },
            Param::List(items) => match ty.kind() {
                Kind::Array(_) => items.to_sql(ty, out),
                _ => Err(mismatch("a list", ty)),
            },
        }
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }

    tokio_postgres::types::to_sql_checked!();
}

/// A column value, whatever its type.
#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
    /// `json`/`jsonb` as its text.
    Json(String),
    Ts(DateTime<Utc>),
    Uuid(Uuid),
    /// An `interval`, in seconds (months count 30 days).
    Interval(f64),
    TextArray(Vec<Option<String>>),
}

impl Val {
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Val::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Val::Int(i) => Some(*i),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Val::Text(s) | Val::Json(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_ts(&self) -> Option<DateTime<Utc>> {
        match self {
            Val::Ts(t) => Some(*t),
            _ => None,
        }
    }

    /// A uuid column as its canonical string (text columns pass through).
    pub fn id_string(&self) -> Option<String> {
        match self {
            Val::Uuid(u) => Some(u.to_string()),
            Val::Text(s) => Some(s.clone()),
            _ => None,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Val::Null)
    }
}

impl<'a> FromSql<'a> for Val {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Self, BoxError> {
        Ok(match *ty {
            Type::BOOL => Val::Bool(bool::from_sql(ty, raw)?),
            Type::INT2 => Val::Int(i16::from_sql(ty, raw)?.into()),
            Type::INT4 => Val::Int(i32::from_sql(ty, raw)?.into()),
            Type::INT8 => Val::Int(i64::from_sql(ty, raw)?),
            Type::OID => Val::Int(u32::from_sql(ty, raw)?.into()),
            Type::FLOAT4 => Val::Float(f32::from_sql(ty, raw)?.into()),
            Type::FLOAT8 => Val::Float(f64::from_sql(ty, raw)?),
            Type::JSON => Val::Json(std::str::from_utf8(raw)?.to_string()),
            Type::JSONB => match raw.split_first() {
                Some((1, rest)) => Val::Json(std::str::from_utf8(rest)?.to_string()),
                _ => return Err("unsupported jsonb version".into()),
            },
            Type::TIMESTAMPTZ => Val::Ts(DateTime::<Utc>::from_sql(ty, raw)?),
            Type::TIMESTAMP => Val::Ts(chrono::NaiveDateTime::from_sql(ty, raw)?.and_utc()),
            Type::UUID => Val::Uuid(Uuid::from_sql(ty, raw)?),
            Type::INTERVAL => {
                if raw.len() != 16 {
                    return Err("malformed interval".into());
                }
                let micros = i64::from_be_bytes(raw[0..8].try_into()?);
                let days = i32::from_be_bytes(raw[8..12].try_into()?);
                let months = i32::from_be_bytes(raw[12..16].try_into()?);
                Val::Interval(
                    micros as f64 / 1e6
                        + f64::from(days) * 86_400.0
                        + f64::from(months) * 2_592_000.0,
                )
            }
            Type::TEXT_ARRAY | Type::VARCHAR_ARRAY | Type::NAME_ARRAY => {
                Val::TextArray(Vec::<Option<String>>::from_sql(ty, raw)?)
            }
            Type::VOID => Val::Null,
            ref t if is_text(t) => Val::Text(std::str::from_utf8(raw)?.to_string()),
            _ => return Err(format!("unsupported column type {ty}").into()),
        })
    }

    fn from_sql_null(_ty: &Type) -> Result<Self, BoxError> {
        Ok(Val::Null)
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }
}

/// Rows of one statement, with the column names and the command's affected-row count.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rows {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Val>>,
    pub affected: u64,
}

impl Rows {
    pub fn first(&self) -> Option<&[Val]> {
        self.rows.first().map(Vec::as_slice)
    }

    /// The first column of the first row (e.g. `SELECT fn(...)`), or `Val::Null`.
    pub fn scalar(&self) -> Val {
        self.rows
            .first()
            .and_then(|r| r.first())
            .cloned()
            .unwrap_or(Val::Null)
    }

    /// Where the columns `names` sit in this result of `statement`: looked up once per
    /// result, so rows are then read by plain indexing with no per-row name lookup, and no
    /// reader depends on the column order of queries.sql (docs/architecture.md §5). A column
    /// the result lacks is SCHEMA_MISMATCH naming it and the statement, not a panic.
    pub fn columns_of<const N: usize>(
        &self,
        statement: &str,
        names: [&str; N],
    ) -> Result<[usize; N], CoreError> {
        let mut at = [0; N];
        for (slot, name) in at.iter_mut().zip(names) {
            *slot = self.columns.iter().position(|c| c == name).ok_or_else(|| {
                CoreError::SchemaMismatch(format!(
                    "statement `{statement}` returned no column `{name}` (its columns: {})",
                    self.columns.join(", ")
                ))
            })?;
        }
        Ok(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(columns: &[&str]) -> Rows {
        Rows {
            columns: columns.iter().map(|c| c.to_string()).collect(),
            ..Rows::default()
        }
    }

    #[test]
    fn columns_are_found_by_name_in_the_order_asked() {
        let r = rows(&["ord", "id", "status"]);
        assert_eq!(
            r.columns_of("find_existing_runs", ["status", "ord"])
                .unwrap(),
            [2, 0]
        );
        assert_eq!(r.columns_of("find_existing_runs", []).unwrap(), [0usize; 0]);
    }

    #[test]
    fn a_missing_column_names_itself_and_the_statement() {
        let err = rows(&["ord", "id"])
            .columns_of("insert_runs", ["id", "status"])
            .unwrap_err();
        assert_eq!(err.code(), "SCHEMA_MISMATCH");
        let text = err.to_string();
        assert!(
            text.contains("`insert_runs`") && text.contains("`status`"),
            "{text}"
        );
    }
}
