//! The demo page at `/` and the browser client it loads, embedded in the binary so the server
//! serves them from any working directory. `RUSTY_SOCKS_DEMO=false` turns both off.

use bytes::Bytes;
use http_body_util::Full;
use hyper::Response;
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};

/// `clients/js/demo/index.html`.
const PAGE: &str = include_str!("../../clients/js/demo/index.html");
/// `clients/js/src/rusty-socks.js`, the client library the page imports.
const CLIENT: &str = include_str!("../../clients/js/src/rusty-socks.js");

/// The demo page or the client module, for `path`, if it is one of theirs.
pub fn asset(path: &str) -> Option<Response<Full<Bytes>>> {
    let (body, kind) = match path {
        "/" | "/index.html" => (PAGE, "text/html; charset=utf-8"),
        // A module script is refused by browsers unless served with a JavaScript type.
        "/rusty-socks.js" => (CLIENT, "text/javascript; charset=utf-8"),
        _ => return None,
    };
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(kind));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Some(response)
}
