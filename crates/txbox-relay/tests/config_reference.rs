//! The README's relay table (`<!-- config:relay:start -->`) checked against
//! the command line and the configuration file, in both directions.
//!
//! - Flags and environment variables come from clap's own model of the
//!   command line (`Cli::command().get_arguments()`): every argument has a
//!   row giving its variable, and every row is an argument.
//! - File keys come from serde's model of `RelayConfig`: the field names
//!   its derived `Deserialize` asks for ([`file_keys`]), so every key the
//!   file accepts has a row, and every key in the table is accepted.
//! - Defaults: a default written as a value (`` `1000` ``) is given as the
//!   flag and must resolve to the same configuration as no flag at all; it
//!   must also be clap's default value and the `[default: ...]` of the
//!   flag's help, where they exist. `required` is what the relay refuses
//!   to start without; the few defaults described in words (no endpoint,
//!   a name unique per start) are checked one by one.
//!
//! Environment variables are ignored while parsing here, so the shell's
//! `TXBOX_*` cannot change what a default resolves to.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use clap::{Arg, ArgAction, CommandFactory, FromArgMatches};
use serde::de::{self, Deserialize, Deserializer, Visitor};
use txbox_relay::cli::Cli;
use txbox_relay::RelayConfig;
use txbox_testkit::reference::{assert_same_lines, assert_same_set, code, readme_table};

/// The file keys `RelayConfig` accepts: the field list serde's derive
/// hands to `deserialize_struct`, recorded by a deserializer that then
/// gives up.
fn file_keys() -> BTreeSet<&'static str> {
    #[derive(Debug)]
    struct Recorded;
    impl fmt::Display for Recorded {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("fields recorded")
        }
    }
    impl std::error::Error for Recorded {}
    impl de::Error for Recorded {
        fn custom<T: fmt::Display>(_: T) -> Self {
            Recorded
        }
    }
    struct Recorder<'a>(&'a mut Vec<&'static str>);
    impl<'de> Deserializer<'de> for Recorder<'_> {
        type Error = Recorded;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Recorded> {
            Err(Recorded)
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Recorded> {
            self.0.extend(fields);
            Err(Recorded)
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
            bytes byte_buf option unit unit_struct newtype_struct seq tuple
            tuple_struct map enum identifier ignored_any
        }
    }
    let mut fields = Vec::new();
    assert!(RelayConfig::deserialize(Recorder(&mut fields)).is_err());
    assert!(!fields.is_empty(), "RelayConfig is read as a struct");
    fields.into_iter().collect()
}

/// The command line's options (help and version aside), by long name.
fn arguments() -> BTreeMap<String, Arg> {
    Cli::command()
        .get_arguments()
        .filter(|a| {
            !matches!(
                a.get_action(),
                ArgAction::Help | ArgAction::HelpShort | ArgAction::HelpLong | ArgAction::Version
            )
        })
        .map(|a| {
            let long = a
                .get_long()
                .unwrap_or_else(|| panic!("argument {} has no long flag", a.get_id()));
            (format!("--{long}"), a.clone())
        })
        .collect()
}

/// Parses `args` as the relay would, with no environment variables.
fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
    let command = Cli::command().mut_args(|a| a.env(None::<&'static str>));
    let matches =
        command.try_get_matches_from(std::iter::once("txbox-relay").chain(args.iter().copied()))?;
    Cli::from_arg_matches(&matches)
}

/// The `[default: ...]` a flag's help states, if any.
fn help_default(arg: &Arg) -> Option<String> {
    let help = [arg.get_help(), arg.get_long_help()]
        .into_iter()
        .flatten()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" ");
    let from = help.find("[default: ")? + "[default: ".len();
    let to = from + help[from..].find(']')?;
    Some(help[from..to].to_owned())
}

/// One row of the table.
#[derive(Debug)]
struct Row<'a> {
    flag: &'a str,
    env: Option<&'a str>,
    key: Option<&'a str>,
    default: &'a str,
}

/// A cell holding one code span, or `—` for none.
fn optional<'a>(flag: &str, cell: &'a str) -> Option<&'a str> {
    (cell != "—").then(|| {
        code(cell).unwrap_or_else(|| panic!("{flag}: {cell:?} is neither a code span nor —"))
    })
}

#[test]
fn the_relay_table_is_the_command_line_and_the_file() {
    let table = readme_table("relay");
    let rows: Vec<Row<'_>> = table
        .rows
        .iter()
        .map(|r| {
            let cell = |header: &str| {
                let i = table
                    .headers
                    .iter()
                    .position(|h| h == header)
                    .unwrap_or_else(|| panic!("no column {header:?}"));
                r[i].as_str()
            };
            let flag = code(cell("flag")).unwrap_or_else(|| panic!("flag {:?}", cell("flag")));
            Row {
                flag,
                env: optional(flag, cell("environment")),
                key: optional(flag, cell("file key")),
                default: cell("default"),
            }
        })
        .collect();

    // The same options, both ways.
    let args = arguments();
    let flags: BTreeSet<&str> = rows.iter().map(|r| r.flag).collect();
    assert_eq!(flags.len(), rows.len(), "a flag has two rows");
    let known: BTreeSet<&str> = args.keys().map(String::as_str).collect();
    assert_same_set(&flags, &known, "txbox-relay flags");
    let keys: BTreeSet<&str> = rows.iter().filter_map(|r| r.key).collect();
    assert_same_set(&keys, &file_keys(), "RelayConfig file keys");

    // What resolves without any option but the required ones.
    let required: Vec<&str> = rows
        .iter()
        .filter(|r| r.default == "required")
        .map(|r| r.flag)
        .collect();
    let args_without = |except: &str| -> Vec<&str> {
        required
            .iter()
            .filter(|f| **f != except)
            .flat_map(|f| [*f, "reference"])
            .collect()
    };
    let base_args = args_without("");
    let base_cli = parse(&base_args).expect("the required flags parse");
    let base = base_cli.resolve().expect("the required flags are enough");

    for row in &rows {
        let arg = &args[row.flag];
        let flag = row.flag;
        assert_eq!(
            arg.get_env().and_then(|e| e.to_str()),
            row.env,
            "{flag}: environment variable"
        );
        if let Some(key) = row.key {
            // The one key named otherwise: `--kafka-option k=v`, repeated,
            // fills the `[kafka]` table.
            let expected = match flag {
                "--kafka-option" => "kafka".to_owned(),
                _ => flag.trim_start_matches("--").replace('-', "_"),
            };
            assert_eq!(key, expected, "{flag}: file key");
        }
        let clap_default: Vec<_> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        let written = code(row.default).unwrap_or(row.default);
        if let Some(help) = help_default(arg) {
            assert_eq!(written, help, "{flag}: README default against --help");
        }
        if !clap_default.is_empty() {
            assert_eq!(written, clap_default.join(","), "{flag}: clap's default");
        }
        match (code(row.default), row.default) {
            (Some(value), _) => {
                let mut given = base_args.clone();
                given.extend([flag, value]);
                let cli = parse(&given)
                    .unwrap_or_else(|e| panic!("{flag} {value}: the documented default: {e}"));
                let resolved = cli.resolve().expect("the documented default is valid");
                assert_same_lines(
                    &format!("{resolved:#?}"),
                    &format!("{base:#?}"),
                    &format!(
                        "{flag} {value} resolves otherwise than no {flag}: the default differs"
                    ),
                );
                if !clap_default.is_empty() {
                    assert_eq!(format!("{cli:?}"), format!("{base_cli:?}"), "{flag}");
                }
            }
            (None, "required") => {
                let err = parse(&args_without(flag))
                    .expect("parses without it")
                    .resolve()
                    .expect_err("refused without it")
                    .to_string();
                assert!(err.contains(flag), "{flag}: the error names it: {err}");
            }
            (None, described) => {
                assert!(clap_default.is_empty(), "{flag}: clap has a default");
                // Defaults in words, each checked against what resolves.
                match (row.key, described) {
                    (Some("instance"), "host:pid:nonce, unique per start") => {
                        assert_eq!(base.instance, txbox::instance::name(), "{flag}");
                    }
                    (Some("metrics_listen"), "no endpoint") => {
                        assert_eq!(base.metrics_listen, None, "{flag}: the default differs");
                    }
                    (Some("kafka"), "none") => assert!(base.kafka.is_empty(), "{flag}"),
                    (None, "none") => assert!(
                        help_default(arg).is_none(),
                        "{flag}: no file key, no default"
                    ),
                    other => panic!(
                        "{flag}: the default {other:?} is described in words this test does \
                         not check: write it as a value, or add a check here"
                    ),
                }
            }
        }
    }
}
