//! `stomp_tail DESTINATION [COUNT]`: subscribes to a destination on the
//! local broker (127.0.0.1:61613), prints "subscribed", then prints each
//! message's headers and body until COUNT messages (default 1) arrived or
//! 30 s passed. Used by the demo to show what the outbox delivered.

use std::time::Duration;

use outbox_pg_e2e::broker::Subscriber;

fn main() {
    let mut args = std::env::args().skip(1);
    let destination = args.next().expect("usage: stomp_tail DESTINATION [COUNT]");
    let count: usize = args
        .next()
        .map(|c| c.parse().expect("COUNT is a number"))
        .unwrap_or(1);
    let mut sub = Subscriber::new(&destination);
    println!("subscribed to {destination}");
    for n in 1..=count {
        let Some(m) = sub.next(Duration::from_secs(30)) else {
            eprintln!("stomp_tail: no message within 30 s");
            std::process::exit(1);
        };
        println!("--- message {n} on {}", m.get("destination").unwrap_or("?"));
        for (k, v) in &m.headers {
            if k.starts_with("dop-") || k.starts_with("outbox-") || k == "content-type" {
                println!("  {k}: {v}");
            }
        }
        println!("  body: {}", m.body_text());
    }
}
