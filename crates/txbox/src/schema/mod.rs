//! Where txbox keeps its tables, and how their SQL names are written.
//!
//! Every txbox table lives in one PostgreSQL schema (default `txbox`). The
//! name is configurable and always quoted as an identifier, so a hostile or
//! unusual name cannot change the meaning of a statement.

mod migrations;
mod migrator;

pub use migrations::{Migration, MIGRATIONS};
pub use migrator::{MigrationState, MigrationStatus, Migrator};

use sea_query::{Alias, Iden, PostgresQueryBuilder, QuotedBuilder};

use crate::error::{Error, Result};

/// The schema holding txbox's tables.
///
/// # Examples
///
/// ```
/// use txbox::Schema;
///
/// let schema = Schema::new("billing_txbox")?;
/// assert_eq!(schema.table("outbox"), r#""billing_txbox"."outbox""#);
///
/// // Quotes are escaped, so the name stays one identifier.
/// let odd = Schema::new(r#"x"; drop table users; --"#)?;
/// assert_eq!(odd.quoted(), r#""x""; drop table users; --""#);
/// # Ok::<(), txbox::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schema {
    name: String,
    quoted: String,
}

impl Schema {
    /// The schema used when none is configured.
    pub const DEFAULT: &'static str = "txbox";

    /// A schema by name. Fails if the name is empty, longer than
    /// PostgreSQL's 63-byte identifier limit, or contains a NUL byte.
    pub fn new(name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        if name.is_empty() || name.len() > 63 || name.contains('\0') {
            return Err(Error::config(format!(
                "schema name {name:?} must be 1 to 63 bytes with no NUL"
            )));
        }
        let quoted = quote_ident(&name);
        Ok(Schema { name, quoted })
    }

    /// The name as given.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The name quoted as a SQL identifier.
    pub fn quoted(&self) -> &str {
        &self.quoted
    }

    /// A table of this schema, schema-qualified and quoted.
    pub fn table(&self, table: &str) -> String {
        format!("{}.{}", self.quoted, quote_ident(table))
    }
}

impl Default for Schema {
    fn default() -> Self {
        Schema {
            name: Self::DEFAULT.to_owned(),
            quoted: quote_ident(Self::DEFAULT),
        }
    }
}

impl std::fmt::Display for Schema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

/// Quotes `ident` as a PostgreSQL identifier (doubling embedded quotes).
fn quote_ident(ident: &str) -> String {
    let mut out = String::with_capacity(ident.len() + 2);
    Alias::new(ident).prepare(&mut out, PostgresQueryBuilder.quote());
    out
}
