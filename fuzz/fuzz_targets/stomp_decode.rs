//! Fuzzes the STOMP frame codec: the decoder never panics on any input, fed
//! whole or in pieces; what it decodes encodes again and decodes to the same
//! frame (so escaping holds both ways).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../src/stomp/mod.rs"]
mod stomp;

use stomp::frame::{Decoded, Decoder, encode};

fuzz_target!(|data: &[u8]| {
    let split = data.first().map(|b| *b as usize).unwrap_or(0) % (data.len().max(1));
    let mut whole = Decoder::new(64 * 1024);
    whole.feed(data);
    let mut pieces = Decoder::new(64 * 1024);
    pieces.feed(&data[..split]);
    let mut a = Vec::new();
    while let Ok(Some(d)) = whole.next() {
        a.push(d);
    }
    let mut b = Vec::new();
    loop {
        match pieces.next() {
            Ok(Some(d)) => b.push(d),
            Ok(None) if split < data.len() => {
                // The rest arrives later, once.
                pieces.feed(&data[split..]);
                while let Ok(Some(d)) = pieces.next() {
                    b.push(d);
                }
                break;
            }
            _ => break,
        }
    }
    assert_eq!(a, b, "split input decodes like whole input");
    for d in a {
        if let Decoded::Frame(f) = d {
            let mut out = Vec::new();
            if encode(&f, &mut out).is_ok() {
                let mut again = Decoder::new(usize::MAX / 2);
                again.feed(&out);
                match again.next() {
                    // The encoder always states the body's length.
                    Ok(Some(Decoded::Frame(g))) => assert_eq!(without_length(f), without_length(g), "round trip"),
                    other => panic!("re-decoding an encoded frame gave {other:?}"),
                }
            }
        }
    }
});

fn without_length(mut f: stomp::frame::Frame) -> stomp::frame::Frame {
    f.headers.retain(|(k, _)| k != "content-length");
    f
}
