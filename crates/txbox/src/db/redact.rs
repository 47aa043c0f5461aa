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

/// The password of `scheme://user:password@...`, masked.
fn redact_userinfo(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let Some(at) = rest.rfind('@') else {
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

/// The value of every `...password=value` (up to `&`, `#` or white space),
/// masked.
fn redact_parameters(text: &str) -> String {
    const KEY: &str = "password=";
    let lower = text.to_ascii_lowercase();
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut from = 0;
    while let Some(found) = lower[from..].find(KEY) {
        let value = from + found + KEY.len();
        let end = text[value..]
            .find(|c: char| c == '&' || c == '#' || c.is_whitespace())
            .map_or(text.len(), |n| value + n);
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
        ] {
            let shown = redact_url(url);
            assert!(!shown.contains(secret), "{url} shown as {shown}");
        }
        assert_eq!(
            redact_url("postgres://h/db?password="),
            "postgres://h/db?password="
        );
        assert_eq!(redact_url("postgres://h/db?x=1"), "postgres://h/db?x=1");
    }
}
