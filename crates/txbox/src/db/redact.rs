//! Database URLs in messages and logs, without their passwords.

/// What replaces a password.
const MASK: &str = "***";

/// `url` with any password replaced by `***`: the one in the user info
/// (`user:password@`) and the value of every `password=` parameter (the
/// query form `?password=...`, also `sslpassword=`), in any case, also when
/// the text is not a URL at all.
///
/// # Examples
///
/// ```
/// use txbox::db::redact_url;
///
/// assert_eq!(redact_url("postgres://app:s3cret@db:5432/x"), "postgres://app:***@db:5432/x");
/// assert_eq!(redact_url("postgres://db/x?user=app&password=s3cret&sslmode=disable"),
///            "postgres://db/x?user=app&password=***&sslmode=disable");
/// assert_eq!(redact_url("host=db PASSWORD=s3cret"), "host=db PASSWORD=***");
/// assert_eq!(redact_url("postgres://app@db/x"), "postgres://app@db/x");
/// assert_eq!(redact_url("not a url"), "not a url");
/// ```
pub fn redact_url(url: &str) -> String {
    redact_parameters(&redact_userinfo(url))
}

/// The password of `scheme://user:password@...`, masked. The user info
/// ends at the last `@` before the query (`?`) or fragment (`#`), so an
/// `@` in a parameter is not taken for it.
fn redact_userinfo(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let before_query = rest.find(['?', '#']).map_or(rest, |q| &rest[..q]);
    let Some(at) = before_query.rfind('@') else {
        return url.to_owned();
    };
    match rest[..at].find(':') {
        Some(colon) => format!(
            "{}{}:{MASK}{}",
            &url[..scheme_end + 3],
            &rest[..colon],
            &rest[at..]
        ),
        None => url.to_owned(),
    }
}

/// The value of every `...password = value`, masked: `=` may have white
/// space around it (libpq's key/value form); a value in single quotes
/// runs to the closing quote (`\'` escapes one), any other up to `&`, `#`
/// or white space in a URL, up to white space in libpq's key/value form.
fn redact_parameters(text: &str) -> String {
    let url = text.contains("://");
    const KEY: &str = "password";
    let lower = text.to_ascii_lowercase();
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut from = 0;
    while let Some(found) = lower[from..].find(KEY) {
        let after_key = from + found + KEY.len();
        let eq = after_key + (text[after_key..].len() - text[after_key..].trim_start().len());
        if !text[eq..].starts_with('=') {
            from = after_key;
            continue;
        }
        let value = eq + 1 + (text[eq + 1..].len() - text[eq + 1..].trim_start().len());
        let end = value_end(text, value, url);
        out.push_str(&text[copied..value]);
        if end > value {
            out.push_str(MASK);
        }
        copied = end;
        from = end.max(value);
    }
    out.push_str(&text[copied..]);
    out
}

/// Where the parameter value starting at `start` ends.
fn value_end(text: &str, start: usize, url: bool) -> usize {
    let value = &text[start..];
    if let Some(quoted) = value.strip_prefix('\'') {
        let mut escaped = false;
        for (i, c) in quoted.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '\'' => return start + 1 + i + 1,
                _ => {}
            }
        }
        return text.len();
    }
    value
        .find(|c: char| c.is_whitespace() || (url && (c == '&' || c == '#')))
        .map_or(text.len(), |n| start + n)
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn no_form_of_a_password_survives() {
        let secret = "pw-7f3a";
        for url in [
            "postgres://u:pw-7f3a@h/db",
            "postgres://u:pw-7f3a@h/db?password=pw-7f3a",
            "postgres://h/db?password=pw-7f3a",
            "postgres://h/db?user=u&Password=pw-7f3a#frag",
            "postgres://h/db?sslpassword=pw-7f3a&password=pw-7f3a",
            "postgres://u:a:pw-7f3a@h/db",
            "postgres://u:pw-7f3a@h/db?options=a@b",
            "host=h password=pw-7f3a dbname=db",
            "garbage password=pw-7f3a",
            "host=h password = pw-7f3a dbname=db",
            "host=h password='pw-7f3a and more' dbname=db",
            "host=h password='it\\'s pw-7f3a' dbname=db",
        ] {
            let shown = redact_url(url);
            assert!(!shown.contains(secret), "{url} shown as {shown}");
        }
        assert_eq!(
            redact_url("postgres://h/db?password="),
            "postgres://h/db?password="
        );
        assert_eq!(redact_url("postgres://h/db?x=1"), "postgres://h/db?x=1");
        // An `@` in a parameter is no user info: nothing hidden, nothing lost.
        assert_eq!(
            redact_url("postgres://h:5432/db?application_name=a@b"),
            "postgres://h:5432/db?application_name=a@b"
        );
        assert_eq!(
            redact_url("host=h password = 'a b' dbname=db"),
            "host=h password = *** dbname=db"
        );
        assert_eq!(redact_url("passwords are secret"), "passwords are secret");
        // In libpq's key/value form only white space ends a bare value.
        assert_eq!(
            redact_url("host=h password=ab#cd&ef dbname=db"),
            "host=h password=*** dbname=db"
        );
    }
}
