//! The rules JSON that is stored and replayed must meet besides being valid.
//!
//! A publication's `data` is kept verbatim (a `RawValue`) and sent to every subscriber and
//! every later history reader. `serde_json` checks only its syntax on the way in: without
//! more, one publish of 10,000 nested arrays or of `1e400` is stored and replayed, and from
//! then on nobody can parse the channel's history with `serde_json` (128 levels at most,
//! numbers must be finite) or Python's `json` (its recursion limit). [`check_data`] holds
//! `data` to the rules the frame around it meets when parsed: bounded nesting, numbers that
//! fit a 64-bit float, strings that decode. Every path that publishes uses it: v1
//! `publish`, the server API's `publish` and `broadcast`, and legacy chat messages.

use crate::types::DataError;

/// Deepest nesting of arrays and objects accepted in `data`. Frames add a few levels around
/// it (a `history` reply three), which leaves a wide margin below `serde_json`'s 128.
pub const MAX_DATA_DEPTH: usize = 64;

/// Longest piece of the input quoted back in an error (a number may be 60 KB of digits).
const QUOTE_MAX: usize = 40;

/// Checks JSON text that has already been parsed (its syntax is valid) against the data
/// rules: arrays and objects nest at most [`MAX_DATA_DEPTH`] deep; every number fits a
/// 64-bit float (no overflow to infinity, which `serde_json` refuses to read, and no non-zero
/// number that would read as 0); no string holds a lone UTF-16 surrogate escape
/// (`"\ud800"`), which decodes to no character and which `serde_json` refuses.
///
/// One pass over the bytes with a depth counter: linear in the input, and it never recurses
/// on the client's nesting. On text that is not valid JSON it reports only what it sees.
pub fn check_data(json: &str) -> Result<(), DataError> {
    let bytes = json.as_bytes();
    let mut depth = 0usize;
    let mut i = 0;
    while let Some(&byte) = bytes.get(i) {
        match byte {
            b'"' => i = after_string(json, i + 1)?,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DATA_DEPTH {
                    return Err(DataError::TooDeep(MAX_DATA_DEPTH));
                }
                i += 1;
            }
            b']' | b'}' => {
                depth = depth.saturating_sub(1);
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                let len = bytes[i..]
                    .iter()
                    .position(|&b| !is_number_byte(b))
                    .unwrap_or(bytes.len() - i);
                check_number(&json[i..i + len])?;
                i += len;
            }
            _ => i += 1,
        }
    }
    Ok(())
}

fn is_number_byte(b: u8) -> bool {
    b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E')
}

/// Skips a string from `i` (just after its opening quote) and returns the index after its
/// closing quote, checking its `\u` escapes on the way.
fn after_string(json: &str, mut i: usize) -> Result<usize, DataError> {
    let bytes = json.as_bytes();
    while let Some(&byte) = bytes.get(i) {
        match byte {
            b'"' => return Ok(i + 1),
            b'\\' if bytes.get(i + 1) == Some(&b'u') => i = after_unicode_escape(json, i)?,
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
    Ok(i)
}

/// Checks the `\uXXXX` escape whose backslash is at `i`: a high surrogate must be followed by
/// a low one, and a low one must not come alone. Returns the index after the escape (after
/// both halves of a pair).
fn after_unicode_escape(json: &str, i: usize) -> Result<usize, DataError> {
    let unit = |at: usize| {
        json.get(at + 2..at + 6)
            .filter(|hex| hex.bytes().all(|b| b.is_ascii_hexdigit()))
            .and_then(|hex| u16::from_str_radix(hex, 16).ok())
    };
    let lone = || DataError::LoneSurrogate(quote(json.get(i..i + 6).unwrap_or("\\u")));
    match unit(i) {
        Some(0xD800..=0xDBFF) => {
            let low = (json.get(i + 6..i + 8) == Some("\\u"))
                .then(|| unit(i + 6))
                .flatten();
            match low {
                Some(0xDC00..=0xDFFF) => Ok(i + 12),
                _ => Err(lone()),
            }
        }
        Some(0xDC00..=0xDFFF) => Err(lone()),
        Some(_) => Ok(i + 6),
        // Not a valid escape: not JSON, which the parser before this refuses.
        None => Ok(i + 2),
    }
}

/// Checks one number token.
fn check_number(token: &str) -> Result<(), DataError> {
    // The usual case, and exact in every parser with 64-bit integers.
    if token.parse::<i64>().is_ok() || token.parse::<u64>().is_ok() {
        return Ok(());
    }
    // Anything else is read as a 64-bit float, by `serde_json` too for integers past 64 bits:
    // approximately, as JavaScript reads every integer past 2^53, which is why those are kept
    // (readers get a number close to it; send it as a string to keep every digit). Parsed as
    // `serde_json` parses it, so "accepted" means "serde_json reads it": it refuses a few
    // values just past f64::MAX that correctly rounded parsing brings down to it.
    let written_as_zero = !token
        .bytes()
        .take_while(|b| !matches!(b, b'e' | b'E'))
        .any(|b| matches!(b, b'1'..=b'9'));
    match token.parse::<serde_json::Number>() {
        Ok(n) if n.as_f64().is_some_and(|f| f != 0.0 || written_as_zero) => Ok(()),
        _ => Err(DataError::NumberOutOfRange(quote(token))),
    }
}

/// `text`, cut to [`QUOTE_MAX`] bytes (it is ASCII: a number or an escape).
fn quote(text: &str) -> String {
    match text.get(..QUOTE_MAX) {
        Some(head) if text.len() > QUOTE_MAX => format!("{head}..."),
        _ => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(depth: usize) -> String {
        // Arrays and objects alike count.
        let mut text = String::new();
        for level in 0..depth {
            text.push_str(if level % 2 == 0 { "[" } else { "{\"k\":" });
        }
        text.push('1');
        for level in (0..depth).rev() {
            text.push(if level % 2 == 0 { ']' } else { '}' });
        }
        text
    }

    #[test]
    fn nesting_is_bounded_at_64_levels() {
        assert_eq!(check_data(&nested(64)), Ok(()));
        assert_eq!(check_data(&nested(65)), Err(DataError::TooDeep(64)));
        assert_eq!(check_data(&nested(10_000)), Err(DataError::TooDeep(64)));
        // A megabyte of brackets: refused without recursion, so without a stack overflow.
        let deep = "[".repeat(1 << 20) + &"]".repeat(1 << 20);
        assert_eq!(check_data(&deep), Err(DataError::TooDeep(64)));
        // Siblings do not add up: depth is nesting, not count.
        let wide = format!("[{}]", vec![nested(63); 1000].join(","));
        assert_eq!(check_data(&wide), Ok(()));
    }

    #[test]
    fn brackets_and_digits_inside_strings_are_text() {
        let inside = format!(r#"{{"a":"{}","b":"1e400 \ud83d\ude00"}}"#, "[".repeat(100));
        assert_eq!(check_data(&inside), Ok(()));
        // Escaped quotes and backslashes do not end the string early.
        let tricky = format!(r#"["\"{}\\", "\\\"{}"]"#, "[".repeat(70), "{".repeat(70));
        assert_eq!(check_data(&tricky), Ok(()));
        // After an escaped backslash, `u` is text, not an escape.
        assert_eq!(check_data(r#""\\ud800""#), Ok(()));
    }

    #[test]
    fn numbers_must_read_back_as_sent() {
        let accepted = [
            "0",
            "-0",
            "42",
            "-9223372036854775808",
            "18446744073709551615",
            "0.1",
            "-0.0",
            "0e-400",
            "1.5E+3",
            "1e308",
            "-1.7976931348623157e308",
            "5e-324",
            "3.141592653589793238462643383279",
        ];
        for number in accepted {
            assert_eq!(check_data(number), Ok(()), "{number}");
            assert_eq!(check_data(&format!("[{number}]")), Ok(()), "{number}");
        }
        // Integers past 64 bits read as floats (approximately, as in JavaScript): kept.
        for number in [
            "18446744073709551616",
            "-9223372036854775809",
            "123456789012345678901234567890",
        ] {
            assert_eq!(
                check_data(&format!("{{\"n\":{number}}}")),
                Ok(()),
                "{number}"
            );
        }
        let floats = [
            "1e400",
            "-1e400",
            "1.8e308",
            "1.7976931348623159e308",
            "1e-400",
            "-2e-324",
            // An integer too long for any float.
            &"9".repeat(400),
        ];
        for number in floats {
            let refused = check_data(&format!("[1,{number}]"));
            assert!(
                matches!(refused, Err(DataError::NumberOutOfRange(_))),
                "{number}: {refused:?}"
            );
        }
        // A number of 10,000 digits is refused, and quoted back short.
        let long = "9".repeat(10_000);
        let Err(DataError::NumberOutOfRange(quoted)) = check_data(&long) else {
            panic!("accepted a 10,000-digit integer");
        };
        assert!(quoted.len() < 50, "{quoted}");
        assert!(matches!(
            check_data(&format!("{long}.5")),
            Err(DataError::NumberOutOfRange(_))
        ));
    }

    #[test]
    fn strings_must_decode() {
        for ok in [
            r#""\ud83d\ude00""#,
            r#""\uDBFF\uDFFF""#,
            r#""\u00e9\n\t\"""#,
            r#""\uffff""#,
        ] {
            assert_eq!(check_data(ok), Ok(()), "{ok}");
        }
        for bad in [
            r#""\ud800""#,
            r#""\ud800x""#,
            r#""\ud800\u0041""#,
            r#""\udc00""#,
            r#"{"k":"a\uDE00b"}"#,
            r#"{"\ud83d":1}"#,
        ] {
            assert!(
                matches!(check_data(bad), Err(DataError::LoneSurrogate(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn what_it_accepts_serde_json_reads_back_inside_any_frame() {
        let samples = [
            nested(64),
            r#"{"a":[1,-0,0.5,1e308,18446744073709551616,"\ud83d\ude00"],"b":null}"#.to_owned(),
            "5e-324".to_owned(),
        ];
        for data in samples {
            assert_eq!(check_data(&data), Ok(()), "{data}");
            // As a `history` reply carries it, with room to spare.
            let frame = format!(
                r#"{{"type":"history","publications":[{{"offset":1,"data":{data}}}],"x":[[[[{data}]]]]}}"#
            );
            let parsed: Result<serde_json::Value, _> = serde_json::from_str(&frame);
            assert!(parsed.is_ok(), "{data}: {parsed:?}");
        }
        // And what it refuses, serde_json cannot read, or reads as another value.
        for data in [
            nested(200),
            "1e400".to_owned(),
            "9".repeat(400),
            r#""\udc00""#.to_owned(),
        ] {
            assert!(check_data(&data).is_err());
            assert!(
                serde_json::from_str::<serde_json::Value>(&data).is_err(),
                "{data}"
            );
        }
    }
}
