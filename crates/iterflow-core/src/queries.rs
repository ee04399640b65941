//! The named statements both cores send, embedded from `python/iterflow/sql/queries.sql`
//! (the one place the SQL lives) and rendered for one schema exactly like
//! `python/iterflow/sql.py` does.

use std::collections::HashMap;

use crate::CoreError;

/// The raw text of `queries.sql`, compiled in.
pub const QUERIES_SQL: &str = include_str!("../../../python/iterflow/sql/queries.sql");

/// Every migration in order, compiled in (tests apply them to scratch schemas).
pub const MIGRATIONS: &[&str] = &[
    include_str!("../../../python/iterflow/migrations/0001_init.sql"),
    include_str!("../../../python/iterflow/migrations/0002_deferred_notify.sql"),
    include_str!("../../../python/iterflow/migrations/0003_hot_run_updates.sql"),
    include_str!("../../../python/iterflow/migrations/0004_signal_delivery.sql"),
    include_str!("../../../python/iterflow/migrations/0005_watches.sql"),
    include_str!("../../../python/iterflow/migrations/0006_transitions_once.sql"),
    include_str!("../../../python/iterflow/migrations/0007_one_run_paths.sql"),
    include_str!("../../../python/iterflow/migrations/0008_flow_control.sql"),
    include_str!("../../../python/iterflow/migrations/0009_workers.sql"),
    include_str!("../../../python/iterflow/migrations/0010_dashboard_indexes.sql"),
    include_str!("../../../python/iterflow/migrations/0011_continue_as_new.sql"),
    include_str!("../../../python/iterflow/migrations/0012_step_limits.sql"),
    include_str!("../../../python/iterflow/migrations/0013_wake_notices.sql"),
    include_str!("../../../python/iterflow/migrations/0014_handoff.sql"),
];

/// Accept only plain lower-case identifiers (`^[a-z_][a-z0-9_]{0,62}$`), like `sql.py`.
pub fn validate_schema_name(schema: &str) -> Result<&str, CoreError> {
    let bytes = schema.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= 63
        && (bytes[0].is_ascii_lowercase() || bytes[0] == b'_')
        && bytes
            .iter()
            .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(schema)
    } else {
        Err(CoreError::InvalidArgument(format!(
            "schema: {schema:?} is not a valid schema name (lower-case letters, digits, _; max 63)"
        )))
    }
}

/// Replace `{schema_raw}` by the bare name and `{schema}` by the quoted name.
pub fn render(text: &str, schema: &str) -> String {
    text.replace("{schema_raw}", schema)
        .replace("{schema}", &format!("\"{schema}\""))
}

/// An entry's text without its leading comment lines: they document the entry for readers of
/// `queries.sql`; the server gets the statement alone (as `sql.py` does).
fn statement(body: &str) -> String {
    let mut rest = body.trim();
    while rest.trim_start_matches([' ', '\t']).starts_with("--") {
        rest = rest.split_once('\n').map_or("", |(_, tail)| tail);
    }
    rest.trim().to_string()
}

/// Split `queries.sql` on its `-- name: x` header lines (a header is a whole line); each
/// entry's text is its statement (see [`statement`]).
pub fn parse(text: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in text.split_inclusive('\n') {
        let bare = line.trim_end_matches(['\n', '\r']);
        let header = bare.strip_prefix("-- name: ").and_then(|rest| {
            let name = rest.trim_end();
            let valid = !name.is_empty() && name.chars().all(|c| c.is_alphanumeric() || c == '_');
            valid.then(|| name.to_string())
        });
        match header {
            Some(name) => {
                if let Some((n, body)) = current.take() {
                    out.push((n, statement(&body)));
                }
                current = Some((name, String::new()));
            }
            None => {
                if let Some((_, body)) = current.as_mut() {
                    body.push_str(line);
                }
            }
        }
    }
    if let Some((n, body)) = current.take() {
        out.push((n, statement(&body)));
    }
    out
}

/// Every named statement, rendered for one schema.
#[derive(Debug, Clone)]
pub struct Queries {
    schema: String,
    by_name: HashMap<String, String>,
}

impl Queries {
    /// Parse the embedded `queries.sql` and render it for `schema` (validated).
    pub fn new(schema: &str) -> Result<Self, CoreError> {
        validate_schema_name(schema)?;
        let by_name = parse(QUERIES_SQL)
            .into_iter()
            .map(|(name, body)| (name, render(&body, schema)))
            .collect();
        Ok(Queries {
            schema: schema.to_string(),
            by_name,
        })
    }

    /// The schema these statements are rendered for.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// The rendered text of statement `name`.
    pub fn get(&self, name: &str) -> Result<&str, CoreError> {
        self.by_name
            .get(name)
            .map(String::as_str)
            .ok_or_else(|| CoreError::InvalidArgument(format!("no statement named {name:?}")))
    }

    /// Whether `queries.sql` has a statement `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_follow_the_python_rule() {
        for ok in ["workflow", "_x", "t_0123abcd", &"a".repeat(63)] {
            assert!(validate_schema_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Work", "1abc", "a-b", "a b", "a\"b", &"a".repeat(64)] {
            assert!(validate_schema_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn parses_every_statement_and_renders_the_schema() {
        let q = Queries::new("wf").unwrap();
        for name in [
            "claim_with_history",
            "record_step",
            "finish_run",
            "relay_notify",
            "listen",
            "read_snapshot",
            "migrate_lock",
        ] {
            assert!(q.contains(name), "{name}");
        }
        assert_eq!(q.get("listen").unwrap(), "LISTEN \"iterflow.wf\"");
        let notify = q.get("relay_notify").unwrap();
        assert!(notify.contains("'iterflow.wf'"), "{notify}");
        assert!(!q.get("claim_with_history").unwrap().contains("{schema}"));
        assert!(q
            .get("claim_with_history")
            .unwrap()
            .contains("\"wf\".queue"));
        assert!(!q.get("claim_with_history").unwrap().contains("-- name:"));
        assert!(q
            .get("claim_with_history")
            .unwrap()
            .starts_with("WITH lim AS MATERIALIZED ("));
        // what the writer sends (joined by "; ") is the statement text alone, as before these
        // were named entries
        for (name, sent) in [
            (
                "batch_begin",
                "BEGIN; SET LOCAL plan_cache_mode = force_generic_plan; SET LOCAL enable_seqscan = off",
            ),
            ("batch_defer_notify", "SET LOCAL iterflow.defer_notify = on"),
            ("batch_skip_flush", "SET LOCAL synchronous_commit = off"),
            (
                "batch_collected",
                "SELECT current_setting('iterflow.notify', true)",
            ),
        ] {
            assert_eq!(q.get(name).unwrap(), sent);
        }
    }

    #[test]
    fn leading_comment_lines_are_not_sent() {
        let parsed = parse(
            "-- name: a\n-- why\n  -- more\nSELECT 1 -- kept\n-- kept too\n\n-- name: b\n-- only\n",
        );
        assert_eq!(
            parsed,
            vec![
                ("a".to_string(), "SELECT 1 -- kept\n-- kept too".to_string()),
                ("b".to_string(), String::new()),
            ]
        );
    }
}
