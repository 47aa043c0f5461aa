//! Checks that keep the README's configuration reference true to the code.
//!
//! The README holds each reference table between two marker comments,
//! `<!-- config:NAME:start -->` and `<!-- config:NAME:end -->`;
//! [`readme_table`] reads one. [`public_methods`] lists the public methods of
//! a type as the Rust parser sees the crate's sources (every inherent `impl`
//! block of the type, in any file), so a test can require a row for each.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// One Markdown table: its header cells and its rows, trimmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// The header row's cells.
    pub headers: Vec<String>,
    /// The body rows, each with as many cells as the header.
    pub rows: Vec<Vec<String>>,
}

impl Table {
    /// The cells of the column headed `header`, one per row.
    ///
    /// # Panics
    /// If the table has no such column.
    pub fn column(&self, header: &str) -> Vec<&str> {
        let i = self
            .headers
            .iter()
            .position(|h| h == header)
            .unwrap_or_else(|| panic!("no column {header:?} in {:?}", self.headers));
        self.rows.iter().map(|r| r[i].as_str()).collect()
    }

    /// The rows as (first cell, cell of column `header`) pairs.
    pub fn pairs(&self, header: &str) -> Vec<(&str, &str)> {
        self.rows
            .iter()
            .map(|r| r[0].as_str())
            .zip(self.column(header))
            .collect()
    }
}

/// The workspace's README.md.
pub fn readme_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md")
}

/// The table between `<!-- config:{name}:start -->` and
/// `<!-- config:{name}:end -->` in the workspace's README.
///
/// # Panics
/// If the README cannot be read, a marker is missing or the text between
/// them is not one well-formed table.
pub fn readme_table(name: &str) -> Table {
    let path = readme_path();
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    table_between(&text, name)
}

/// The table between the `name` markers in `text` (see [`readme_table`]).
///
/// # Panics
/// As [`readme_table`].
pub fn table_between(text: &str, name: &str) -> Table {
    let start = format!("<!-- config:{name}:start -->");
    let end = format!("<!-- config:{name}:end -->");
    let from = text
        .find(&start)
        .unwrap_or_else(|| panic!("README has no {start}"))
        + start.len();
    let to = from
        + text[from..]
            .find(&end)
            .unwrap_or_else(|| panic!("README has no {end} after {start}"));
    let mut lines = text[from..to]
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty());
    let headers = cells(lines.next().unwrap_or_else(|| panic!("{start}: no table")));
    let separator = cells(
        lines
            .next()
            .unwrap_or_else(|| panic!("{start}: no header rule")),
    );
    assert!(
        separator.len() == headers.len()
            && separator
                .iter()
                .all(|c| !c.is_empty() && c.chars().all(|ch| ch == '-' || ch == ':')),
        "{start}: the second line must be the header rule, not {separator:?}"
    );
    let rows: Vec<Vec<String>> = lines.map(cells).collect();
    for row in &rows {
        assert_eq!(
            row.len(),
            headers.len(),
            "{start}: row {row:?} has {} cells for {} columns",
            row.len(),
            headers.len()
        );
    }
    Table { headers, rows }
}

/// The cells of one table line (`| a | b |`), trimmed.
fn cells(line: &str) -> Vec<String> {
    assert!(
        line.starts_with('|') && line.ends_with('|') && line.len() > 1,
        "not a table line: {line:?}"
    );
    line[1..line.len() - 1]
        .split('|')
        .map(|c| c.trim().to_owned())
        .collect()
}

/// The code spans of a cell, in order: `` `a` or `b` `` gives `["a", "b"]`.
pub fn code_spans(cell: &str) -> Vec<&str> {
    cell.split('`').skip(1).step_by(2).collect()
}

/// The cell's only code span, the whole cell (`` `--brokers` ``); `None`
/// for anything else (`—`, `required`, text around a span).
pub fn code(cell: &str) -> Option<&str> {
    cell.strip_prefix('`')
        .and_then(|c| c.strip_suffix('`'))
        .filter(|c| !c.contains('`'))
}

/// Asserts that the table's entries and the code's are the same set,
/// naming what each side lacks.
///
/// # Panics
/// If they differ.
pub fn assert_same_set<T: Ord + std::fmt::Debug>(
    table: &BTreeSet<T>,
    code: &BTreeSet<T>,
    what: &str,
) {
    let missing: Vec<&T> = code.difference(table).collect();
    let unknown: Vec<&T> = table.difference(code).collect();
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "README: {what} without a row: {missing:?}; rows for no {what}: {unknown:?}"
    );
}

/// Asserts that what the README's value resolves to and what the code's
/// default resolves to (two multi-line renderings) are equal, showing only
/// the lines that differ.
///
/// # Panics
/// If they differ.
pub fn assert_same_lines(documented: &str, code: &str, context: &str) {
    if documented == code {
        return;
    }
    let documented: Vec<&str> = documented.lines().collect();
    let code: Vec<&str> = code.lines().collect();
    let differing: Vec<String> = (0..documented.len().max(code.len()))
        .filter_map(|i| {
            let (d, c) = (documented.get(i), code.get(i));
            (d != c).then(|| {
                format!(
                    "  README: {}\n  code:   {}",
                    d.unwrap_or(&""),
                    c.unwrap_or(&"")
                )
            })
        })
        .collect();
    panic!("{context}:\n{}", differing.join("\n"));
}

/// The names of the public methods of `type_name` (`pub fn` in its inherent
/// `impl` blocks, in inline modules too) in every `.rs` file under `src`.
///
/// The files are parsed as Rust, so formatting, comments and string
/// contents cannot fool it; trait impls are left out.
///
/// # Panics
/// If a file cannot be read or parsed.
pub fn public_methods(src: &Path, type_name: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for file in rust_files(src) {
        let text = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
        let parsed = syn::parse_file(&text)
            .unwrap_or_else(|e| panic!("cannot parse {}: {e}", file.display()));
        collect_methods(&parsed.items, type_name, &mut found);
    }
    found
}

fn collect_methods(items: &[syn::Item], type_name: &str, found: &mut BTreeSet<String>) {
    for item in items {
        match item {
            syn::Item::Impl(imp) if imp.trait_.is_none() && names(&imp.self_ty, type_name) => {
                for inner in &imp.items {
                    if let syn::ImplItem::Fn(f) = inner {
                        if matches!(f.vis, syn::Visibility::Public(_)) {
                            found.insert(f.sig.ident.to_string());
                        }
                    }
                }
            }
            syn::Item::Mod(m) => {
                if let Some((_, inner)) = &m.content {
                    collect_methods(inner, type_name, found);
                }
            }
            _ => {}
        }
    }
}

/// Whether `ty` is the type `type_name` (any path ending in it).
fn names(ty: &syn::Type, type_name: &str) -> bool {
    match ty {
        syn::Type::Path(p) => p.path.segments.last().is_some_and(|s| s.ident == type_name),
        _ => false,
    }
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        let entries =
            std::fs::read_dir(&d).unwrap_or_else(|e| panic!("cannot list {}: {e}", d.display()));
        for entry in entries {
            let path = entry
                .unwrap_or_else(|e| panic!("cannot list {}: {e}", d.display()))
                .path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|x| x == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_table_between_the_markers() {
        let text = "intro\n<!-- config:x:start -->\n\n| a | b |\n|---|:-:|\n| `1` | two |\n| 3 | `4` or `5` |\n<!-- config:x:end -->\n| not | this |";
        let t = table_between(text, "x");
        assert_eq!(t.headers, ["a", "b"]);
        assert_eq!(t.column("b"), ["two", "`4` or `5`"]);
        assert_eq!(t.pairs("b")[0], ("`1`", "two"));
        assert_eq!(code("`1`"), Some("1"));
        assert_eq!(code("`4` or `5`"), None);
        assert_eq!(code_spans("`4` or `5`"), ["4", "5"]);
    }

    #[test]
    #[should_panic(expected = "cells for 2 columns")]
    fn a_short_row_is_refused() {
        table_between(
            "<!-- config:x:start -->\n| a | b |\n|---|---|\n| 1 |\n<!-- config:x:end -->",
            "x",
        );
    }

    #[test]
    fn finds_public_methods_of_inherent_impls_only() {
        let dir = std::env::temp_dir().join(crate::unique_name("reference"));
        std::fs::create_dir_all(dir.join("sub")).expect("temp dir");
        std::fs::write(
            dir.join("a.rs"),
            "impl Thing { pub fn one(self) -> Self { self } fn private(&self) {} }\n\
             impl Default for Thing { fn default() -> Self { todo!() } }\n\
             // pub fn commented(self) {}\n\
             mod inner { impl super::Thing { pub fn two(&self) -> &str { \"pub fn three\" } } }",
        )
        .expect("write");
        std::fs::write(
            dir.join("sub/b.rs"),
            "impl Other { pub fn nope(&self) {} }\nimpl crate::Thing { pub(crate) fn hidden(&self) {} pub fn four(&self) {} }",
        )
        .expect("write");
        let found = public_methods(&dir, "Thing");
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(
            found.into_iter().collect::<Vec<_>>(),
            ["four", "one", "two"]
        );
    }
}
