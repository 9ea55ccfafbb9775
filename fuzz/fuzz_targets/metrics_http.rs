//! The metrics endpoint's request parser, fed a request in pieces as a socket delivers it: never
//! panics, never asks for more once the head is complete or over the limit, and any split of the
//! same bytes routes the same way (the endpoint parses whatever has arrived so far).
#![no_main]
use libfuzzer_sys::fuzz_target;
use vutap::operations::metrics_http::{parse, Parsed, MAX_HEAD};

fuzz_target!(|data: &[u8]| {
    let Some((&cut, bytes)) = data.split_first() else { return };
    let whole = parse(bytes);
    if bytes.len() >= MAX_HEAD {
        assert_ne!(whole, Parsed::NeedMore, "a head of {} bytes must be answered", bytes.len());
    }
    // The first `cut` bytes, then everything: once complete, more bytes change nothing.
    let cut = usize::from(cut).min(bytes.len());
    if let Parsed::Complete(route) = parse(&bytes[..cut]) {
        assert_eq!(whole, Parsed::Complete(route), "a complete head routed differently with more bytes behind it");
    }
    let response = match whole {
        Parsed::Complete(route) => vutap::operations::metrics_http::response(route, || "x 1\n".to_string()),
        Parsed::NeedMore => return,
    };
    assert!(response.starts_with(b"HTTP/1.1 "));
});
