//! The README's configuration reference for the inbox and the outbox
//! (`<!-- config:inbox:start -->`, `<!-- config:outbox:start -->`), checked
//! against the builders in both directions.
//!
//! Three ties keep a table true to the code:
//!
//! 1. **Every row is a method.** [`inbox_option`] and [`outbox_option`]
//!    call the method a row names, by name, in a `match`: a row for a
//!    method that does not exist finds no arm and fails, and an arm for a
//!    method that was removed or renamed no longer compiles.
//! 2. **Every public method is a row.** The crate's sources are parsed as
//!    Rust ([`public_methods`], with `syn`), and every `pub fn` of every
//!    inherent `impl InboxBuilder` (`impl Outbox`), in whichever file it
//!    lives, must have a row unless it is listed as no option
//!    ([`INBOX_NOT_OPTIONS`], [`OUTBOX_NOT_OPTIONS`]). Rustdoc's JSON
//!    would say the same, but only on nightly and with a second build.
//! 3. **Every default is the code's.** A default written as a value is
//!    parsed from the table and passed to the method: the inbox it builds
//!    must resolve exactly as one built without the call
//!    ([`Inbox::settings`]: everything `build` resolved, Kafka properties
//!    included). A `required` option is one `build` refuses to do without;
//!    an `off` option is unset in what `build` resolves, and set by the
//!    method.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use sqlx::PgPool;
use txbox_testkit::reference::{
    assert_same_lines, assert_same_set, code, code_spans, public_methods, readme_table, Table,
};

use crate::db::Backoff;
use crate::inbox::{
    BatchError, BatchHandler, Dedupe, EventIdSource, FailureAction, Handler, HandlerError, Inbox,
    InboxBuilder, InboxMessage, RetryPolicy, StartFrom, Tx,
};
use crate::outbox::KeyOrder;
use crate::{Outbox, Schema};

/// Public methods of `InboxBuilder` that configure nothing.
const INBOX_NOT_OPTIONS: &[&str] = &["build"];

/// Public methods of `Outbox` that configure nothing.
const OUTBOX_NOT_OPTIONS: &[&str] = &["stage", "stage_all", "stream_count"];

/// What a row's default says, in the form the test checks.
enum Documented<B> {
    /// The method called with the documented default: must change nothing.
    Value(B),
    /// `build` needs it (alone, or one of a group): the method called with
    /// a valid value.
    Required(B),
    /// A required constructor argument (the compiler enforces it).
    Argument,
    /// Unset unless called: the method called, and the text the unset
    /// setting shows in the resolved settings.
    Off(B, &'static str),
}

/// Calls `option` on `b` as its README row documents it (`default` is the
/// row's default cell).
fn inbox_option(b: InboxBuilder, option: &str, default: &str) -> Documented<InboxBuilder> {
    use Documented::Value;
    match option {
        "brokers" => required(default, b.brokers("127.0.0.1:9092")),
        "kafka_option" => Value(
            code_spans(default)
                .into_iter()
                .filter_map(|s| s.split_once('='))
                .fold(b, |b, (k, v)| b.kafka_option(k, v)),
        ),
        "group_id" => required(default, b.group_id("reference")),
        "schema" => Value(b.schema(Schema::new(only(option, default)).expect("a valid schema"))),
        "handler" => required(default, b.handler("reference.each", Nothing)),
        "batch_handler" => required(default, b.batch_handler("reference.batch", Nothing)),
        "batch_size" => Value(b.batch_size(number(option, default))),
        "linger" => Value(b.linger(duration(only(option, default)))),
        "retry" => {
            let [attempts, initial, max] = code_spans(default)[..] else {
                panic!("retry: the default must give `attempts`, `initial` and `max`: {default:?}")
            };
            Value(
                b.retry(
                    RetryPolicy::attempts(attempts.parse().expect("retry: a number of attempts"))
                        .backoff(Backoff::new(duration(initial), duration(max))),
                ),
            )
        }
        "on_failure" => Value(b.on_failure(match only(option, default) {
            "FailureAction::DeadLetter" => FailureAction::DeadLetter,
            "FailureAction::StopPartition" => FailureAction::StopPartition,
            other => panic!("on_failure: no FailureAction {other:?}"),
        })),
        "start_from" => Value(b.start_from(match only(option, default) {
            "StartFrom::Earliest" => StartFrom::Earliest,
            "StartFrom::Latest" => StartFrom::Latest,
            other => panic!("start_from: no StartFrom {other:?}"),
        })),
        "event_id" => Value(b.event_id(EventIdSource::headers(code_spans(default)))),
        "dedupe" => Value(b.dedupe(match only(option, default) {
            "Dedupe::EventIds" => Dedupe::EventIds,
            "Dedupe::OffsetsOnly" => Dedupe::OffsetsOnly,
            other => panic!("dedupe: no Dedupe {other:?}"),
        })),
        "dedupe_retention" => Value(b.dedupe_retention(duration(only(option, default)))),
        "prune_interval" => Value(b.prune_interval(duration(only(option, default)))),
        "mirror_offsets_to_kafka" => off(
            default,
            b.mirror_offsets_to_kafka(Duration::from_secs(5)),
            "mirror_offsets: None",
        ),
        "max_buffered" => Value(b.max_buffered(number(option, default))),
        "max_buffered_bytes" => Value(b.max_buffered_bytes(bytes(only(option, default)))),
        "lock_timeout" => Value(b.lock_timeout(duration(only(option, default)))),
        // The first value; the rest says when `build` derives a lower one.
        "transaction_idle_timeout" => Value(
            b.transaction_idle_timeout(duration(
                code_spans(default)
                    .first()
                    .expect("transaction_idle_timeout: a default value"),
            )),
        ),
        "instance" => {
            assert!(
                code_spans(default).contains(&"txbox::instance::name"),
                "instance: the default must name `txbox::instance::name`: {default:?}"
            );
            Value(b.instance(crate::instance::name()))
        }
        other => panic!(
            "the README's inbox table has a row `{other}` this test does not know: add an arm \
             that calls InboxBuilder::{other} with the documented default"
        ),
    }
}

/// Calls `option` on `b` as its README row documents it.
fn outbox_option(b: Outbox, option: &str, default: &str) -> Documented<Outbox> {
    use Documented::{Argument, Off, Value};
    match option {
        "new" => {
            assert_eq!(default, "required argument", "new: {default:?}");
            let _ = Outbox::new(Schema::default());
            Argument
        }
        "streams" => Value(b.streams(number(option, default)).expect("valid streams")),
        "notify" => {
            assert_eq!(default, "off", "notify: {default:?}");
            Off(b.notify("reference"), "notify_channel: None")
        }
        "key_order" => Value(b.key_order(match only(option, default) {
            "KeyOrder::FirstWrite" => KeyOrder::FirstWrite,
            "KeyOrder::Commit" => KeyOrder::Commit,
            other => panic!("key_order: no KeyOrder {other:?}"),
        })),
        other => panic!(
            "the README's outbox table has a row `{other}` this test does not know: add an arm \
             that calls Outbox::{other} with the documented default"
        ),
    }
}

fn required<B>(default: &str, b: B) -> Documented<B> {
    assert!(
        default == "required" || default.starts_with("at least one of "),
        "a required option documented with default {default:?}"
    );
    Documented::Required(b)
}

fn off<B>(default: &str, b: B, unset: &'static str) -> Documented<B> {
    assert_eq!(
        default, "off",
        "an option off by default, documented as {default:?}"
    );
    Documented::Off(b, unset)
}

/// The cell's single code span.
fn only<'a>(option: &str, default: &'a str) -> &'a str {
    code(default)
        .unwrap_or_else(|| panic!("{option}: the default must be one code span, not {default:?}"))
}

/// The cell's single code span as a number (`10,000` allowed).
fn number<T: std::str::FromStr>(option: &str, default: &str) -> T {
    let text = only(option, default).replace(',', "");
    text.parse()
        .unwrap_or_else(|_| panic!("{option}: {text:?} is not a number"))
}

/// `512 KiB`, `16 MiB`, `1 GiB`.
fn bytes(text: &str) -> usize {
    let (n, unit) = text
        .split_once(' ')
        .unwrap_or_else(|| panic!("{text:?} is not `<number> <unit>`"));
    let n: usize = n
        .parse()
        .unwrap_or_else(|_| panic!("{text:?}: {n:?} is not a number"));
    match unit {
        "KiB" => n << 10,
        "MiB" => n << 20,
        "GiB" => n << 30,
        other => panic!("{text:?}: unknown unit {other:?}"),
    }
}

/// `100 ms`, `30 s`, `60 min`, `1 h`, `14 days`.
fn duration(text: &str) -> Duration {
    let (n, unit) = text
        .split_once(' ')
        .unwrap_or_else(|| panic!("{text:?} is not `<number> <unit>`"));
    let n: u64 = n
        .parse()
        .unwrap_or_else(|_| panic!("{text:?}: {n:?} is not a number"));
    match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "min" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        "days" => Duration::from_secs(n * 24 * 3600),
        other => panic!("{text:?}: unknown unit {other:?}"),
    }
}

/// A handler that does nothing, for building.
#[derive(Debug)]
struct Nothing;

#[async_trait::async_trait]
impl Handler for Nothing {
    async fn handle(&self, _: &mut Tx, _: &InboxMessage) -> Result<(), HandlerError> {
        Ok(())
    }
}

#[async_trait::async_trait]
impl BatchHandler for Nothing {
    async fn handle_batch(&self, _: &mut Tx, _: &[InboxMessage]) -> Result<(), BatchError> {
        Ok(())
    }
}

/// The (option, default) rows of a table, the option a method name.
fn rows<'a>(table: &'a Table, name: &str) -> Vec<(&'a str, &'a str)> {
    let rows: Vec<(&str, &str)> = table
        .pairs("default")
        .into_iter()
        .map(|(option, default)| {
            let method = code(option)
                .unwrap_or_else(|| panic!("{name} table: option {option:?} is not one code span"));
            (method, default)
        })
        .collect();
    let mut seen = BTreeSet::new();
    for (option, _) in &rows {
        assert!(
            seen.insert(*option),
            "{name} table: `{option}` has two rows"
        );
    }
    rows
}

/// The README's rows and the type's public methods (less `not_options`)
/// are the same set.
fn assert_rows_are_the_methods(rows: &[(&str, &str)], type_name: &str, not_options: &[&str]) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let methods = public_methods(&src, type_name);
    assert!(
        not_options.iter().all(|m| methods.contains(*m)),
        "{type_name} has none of {not_options:?} any more: {methods:?}"
    );
    let methods: BTreeSet<&str> = methods
        .iter()
        .map(String::as_str)
        .filter(|m| !not_options.contains(m))
        .collect();
    let documented: BTreeSet<&str> = rows.iter().map(|(o, _)| *o).collect();
    assert_same_set(
        &documented,
        &methods,
        &format!("public methods of {type_name}"),
    );
}

/// A pool that never connects: building an inbox does not.
fn pool() -> PgPool {
    PgPool::connect_lazy("postgres://reference@127.0.0.1:1/reference").expect("a lazy pool")
}

/// A builder with the required rows in `rows` applied, except `except`.
fn with_required(rows: &[(&str, &str)], except: &[&str]) -> InboxBuilder {
    rows.iter()
        .filter(|(option, _)| !except.contains(option))
        .fold(
            Inbox::builder(pool()),
            |b, (option, default)| match inbox_option(b, option, default) {
                Documented::Required(b) => b,
                _ => unreachable!("`{option}` is not required"),
            },
        )
}

/// The required rows only (their builders set them).
fn required_rows<'a>(rows: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    rows.iter()
        .copied()
        .filter(|(option, default)| {
            matches!(
                inbox_option(Inbox::builder(pool()), option, default),
                Documented::Required(_)
            )
        })
        .collect()
}

fn settings(b: InboxBuilder) -> String {
    b.build()
        .expect("the documented required options build")
        .settings()
}

#[tokio::test]
async fn the_inbox_table_is_the_builder() {
    let table = readme_table("inbox");
    let rows = rows(&table, "inbox");
    assert_rows_are_the_methods(&rows, "InboxBuilder", INBOX_NOT_OPTIONS);

    // Required: `build` refuses to do without each one (or without all of
    // a group given as "at least one of"), and needs nothing else.
    let required = required_rows(&rows);
    let base = settings(with_required(&required, &[]));
    for (option, default) in &required {
        let group: Vec<&str> = if *default == "required" {
            vec![option]
        } else {
            code_spans(default)
        };
        assert!(group.contains(option), "{option}: {default:?} must name it");
        let refused = with_required(&required, &group)
            .build()
            .map(|_| ())
            .expect_err(&format!(
                "`{option}` is documented as required, but an inbox without {group:?} builds"
            ))
            .to_string();
        assert!(
            group.iter().any(|m| refused.contains(m)),
            "the error names {group:?}: {refused}"
        );
        let others: Vec<&str> = group.iter().copied().filter(|m| m != option).collect();
        assert!(
            with_required(&required, &others).build().is_ok(),
            "{group:?}: `{option}` alone should be enough"
        );
    }

    // Defaults: the documented value changes nothing; an option documented
    // as off is unset in what `build` resolves, and set by the method.
    let mut checked = 0;
    for (option, default) in &rows {
        match inbox_option(with_required(&required, &[]), option, default) {
            Documented::Value(b) => {
                assert_same_lines(
                    &settings(b),
                    &base,
                    &format!("`{option}` with its documented default {default:?} differs from the code's default"),
                );
                checked += 1;
            }
            Documented::Off(b, unset) => {
                assert!(
                    base.contains(unset),
                    "`{option}` is documented as off, but the code's default does not show {unset:?}"
                );
                assert!(!settings(b).contains(unset), "`{option}` sets nothing");
                checked += 1;
            }
            Documented::Required(_) => {}
            Documented::Argument => unreachable!("an inbox option is no argument"),
        }
    }
    assert!(checked + required.len() == rows.len() && checked > 10);
}

#[test]
fn the_outbox_table_is_the_outbox() {
    let table = readme_table("outbox");
    let rows = rows(&table, "outbox");
    assert_rows_are_the_methods(&rows, "Outbox", OUTBOX_NOT_OPTIONS);
    let base = || Outbox::new(Schema::default());
    let resolved = |o: &Outbox| format!("{o:#?}");
    for (option, default) in &rows {
        match outbox_option(base(), option, default) {
            Documented::Value(o) => assert_same_lines(
                &resolved(&o),
                &resolved(&base()),
                &format!("`{option}` with its documented default {default:?} differs from the code's default"),
            ),
            Documented::Off(o, unset) => {
                assert!(
                    resolved(&base()).contains(unset),
                    "`{option}` is documented as off"
                );
                assert!(!resolved(&o).contains(unset), "`{option}` sets nothing");
            }
            Documented::Argument => {}
            Documented::Required(_) => unreachable!("an outbox takes no required option"),
        }
    }
}

#[test]
fn durations_read_as_the_tables_write_them() {
    assert_eq!(duration("100 ms"), Duration::from_millis(100));
    assert_eq!(duration("14 days"), Duration::from_secs(14 * 24 * 3600));
    assert_eq!(number::<usize>("max_buffered", "`10,000`"), 10_000);
    assert_eq!(bytes("16 MiB"), 16 << 20);
}
