//! The metrics endpoint's HTTP request parser: pure, over the bytes received so far, so it can
//! be fed a request in any number of pieces and property-tested on arbitrary input.
//!
//! Only the request line matters (`GET /metrics`); headers are skipped up to the blank line that
//! ends the head. A head longer than [`MAX_HEAD`] is refused rather than buffered.

/// The most bytes of request head kept per connection (a scraper sends ~200).
pub const MAX_HEAD: usize = 8192;

/// What the bytes received so far amount to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// No end of head yet, and still under [`MAX_HEAD`]: read more.
    NeedMore,
    /// A complete head, routed.
    Complete(Route),
}

/// The answer a complete (or refused) head gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `GET /metrics` or `GET /` (a query string is ignored).
    Metrics,
    /// `GET` of any other path.
    NotFound,
    /// A well-formed request line with another method.
    MethodNotAllowed,
    /// No request line of the form `METHOD TARGET HTTP/x`, or a head over [`MAX_HEAD`].
    BadRequest,
}

impl Route {
    /// Status line, content type and body (the metrics body is rendered by the caller).
    pub fn status(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Route::Metrics => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", ""),
            Route::NotFound => ("404 Not Found", "text/plain", "try /metrics\n"),
            Route::MethodNotAllowed => ("405 Method Not Allowed", "text/plain", "GET only\n"),
            Route::BadRequest => ("400 Bad Request", "text/plain", "bad request\n"),
        }
    }
}

/// The end of the head: the blank line (`\r\n\r\n`, or a bare `\n\n` from a hand-typed request).
fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n");
    let lf = buf.windows(2).position(|w| w == b"\n\n");
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Parses the head received so far.
pub fn parse(buf: &[u8]) -> Parsed {
    let Some(end) = head_end(buf) else {
        return if buf.len() >= MAX_HEAD { Parsed::Complete(Route::BadRequest) } else { Parsed::NeedMore };
    };
    if end >= MAX_HEAD {
        return Parsed::Complete(Route::BadRequest);
    }
    let line_end = buf[..end].iter().position(|&b| b == b'\n').unwrap_or(end);
    let line = buf[..line_end].strip_suffix(b"\r").unwrap_or(&buf[..line_end]);
    Parsed::Complete(route(line))
}

fn route(request_line: &[u8]) -> Route {
    let Ok(line) = std::str::from_utf8(request_line) else {
        return Route::BadRequest;
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Route::BadRequest;
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) || !version.starts_with("HTTP/") {
        return Route::BadRequest;
    }
    if method != "GET" {
        return Route::MethodNotAllowed;
    }
    match target.split('?').next() {
        Some("/metrics") | Some("/") => Route::Metrics,
        _ => Route::NotFound,
    }
}

/// The whole response for `route`, `body` being the metrics text for [`Route::Metrics`].
pub fn response(route: Route, metrics_body: impl FnOnce() -> String) -> Vec<u8> {
    let (status, ctype, fixed) = route.status();
    let body = if route == Route::Metrics { metrics_body() } else { fixed.to_string() };
    let mut out =
        format!("HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len()).into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn test_parse_routes() {
        assert_eq!(parse(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"), Parsed::Complete(Route::Metrics));
        assert_eq!(parse(b"GET /?a=b HTTP/1.0\r\n\r\n"), Parsed::Complete(Route::Metrics));
        assert_eq!(parse(b"GET /metrics?name[]=x HTTP/1.1\n\n"), Parsed::Complete(Route::Metrics));
        assert_eq!(parse(b"GET /nope HTTP/1.1\r\n\r\n"), Parsed::Complete(Route::NotFound));
        assert_eq!(parse(b"POST /metrics HTTP/1.1\r\n\r\n"), Parsed::Complete(Route::MethodNotAllowed));
        assert_eq!(parse(b"GET /metrics\r\n\r\n"), Parsed::Complete(Route::BadRequest));
        assert_eq!(parse(b"get /metrics HTTP/1.1\r\n\r\n"), Parsed::Complete(Route::BadRequest));
        assert_eq!(parse(b"\r\n\r\n"), Parsed::Complete(Route::BadRequest));
        assert_eq!(parse(b"GET /metrics HTTP/1.1\r\nHost: x\r\n"), Parsed::NeedMore);
        assert_eq!(parse(b""), Parsed::NeedMore);
        assert_eq!(parse(&vec![b'a'; MAX_HEAD]), Parsed::Complete(Route::BadRequest));
        assert_eq!(parse(&vec![b'a'; MAX_HEAD - 1]), Parsed::NeedMore);
    }

    #[test]
    fn test_response_has_exact_length() {
        let r = response(Route::Metrics, || "a 1\n".into());
        let text = String::from_utf8(r).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("Content-Length: 4\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\na 1\n"), "{text}");
        let r = response(Route::NotFound, || unreachable!("only /metrics renders"));
        assert!(String::from_utf8(r).unwrap().ends_with("\r\n\r\ntry /metrics\n"));
    }

    fn header() -> impl Strategy<Value = String> {
        ("[A-Za-z-]{1,20}", "[ -~]{0,40}").prop_map(|(k, v)| format!("{k}: {v}\r\n"))
    }

    proptest! {
        /// Any bytes: no panic, and "need more" only while there is no blank line and room left.
        #[test]
        fn prop_parse_total_on_arbitrary_bytes(buf in proptest::collection::vec(any::<u8>(), 0..10_000)) {
            let got = parse(&buf);
            if got == Parsed::NeedMore {
                prop_assert!(buf.len() < MAX_HEAD);
                prop_assert!(head_end(&buf).is_none());
            }
        }

        /// A well-formed GET routes by its path whatever the headers, and every prefix that
        /// stops before the blank line asks for more: a request split over many reads (or sent a
        /// byte at a time) is parsed exactly as if it came at once.
        #[test]
        fn prop_parse_get_in_pieces(
            path in prop_oneof![Just("/metrics".to_string()), Just("/".to_string()), "/[a-z]{1,12}"],
            query in proptest::option::of("[a-z=&]{0,12}"),
            headers in proptest::collection::vec(header(), 0..8),
        ) {
            let target = match &query { Some(q) => format!("{path}?{q}"), None => path.clone() };
            let head = format!("GET {target} HTTP/1.1\r\n{}\r\n", headers.concat());
            let want = if path == "/metrics" || path == "/" { Route::Metrics } else { Route::NotFound };
            prop_assert_eq!(parse(head.as_bytes()), Parsed::Complete(want));
            for cut in 0..head.len() {
                prop_assert_eq!(parse(&head.as_bytes()[..cut]), Parsed::NeedMore);
            }
            // Bytes after the head (a pipelined request, a body) do not change the route.
            let mut more = head.into_bytes();
            more.extend_from_slice(b"GET /other HTTP/1.1\r\n\r\n");
            prop_assert_eq!(parse(&more), Parsed::Complete(want));
        }
    }
}
