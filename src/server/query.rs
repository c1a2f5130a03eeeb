//! Query strings: finding a parameter, and strict percent-decoding.

/// The raw value of parameter `name` in a query string (`a=1&token=x`), not yet decoded.
pub fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?.split('&').find_map(|pair| {
        pair.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix('='))
    })
}

/// Decodes `%XX` escapes; `None` for a malformed escape or a result that is not UTF-8.
pub fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let escaped = text.get(i + 1..i + 3)?;
            // Two hex digits exactly: `from_str_radix` alone would also take a sign ("%+5").
            if !escaped.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            out.push(u8::from_str_radix(escaped, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_params_are_found_by_exact_name() {
        let q = Some("limit=5&token=a.b.c&tokenx=1");
        assert_eq!(query_param(q, "token"), Some("a.b.c"));
        assert_eq!(query_param(q, "limit"), Some("5"));
        assert_eq!(query_param(Some("tokenx=1"), "token"), None);
        assert_eq!(query_param(None, "token"), None);
    }

    #[test]
    fn percent_escapes_decode_strictly() {
        assert_eq!(
            percent_decode("chat%3Aroom%2F1").as_deref(),
            Some("chat:room/1")
        );
        assert_eq!(percent_decode("plain").as_deref(), Some("plain"));
        // "%+C" was found by fuzzing (fuzz/regressions/query/): a sign is not a hex digit.
        for bad in ["%", "%4", "%zz", "%ff", "%+C", "%+5", "%-1"] {
            assert_eq!(percent_decode(bad), None, "{bad}");
        }
    }
}
