//! TLS to the broker, for real: a throw-away CA and certificates made by
//! openssl, socat terminating TLS in front of RabbitMQ's STOMP port, and
//! delivery through it; a wrong CA is a clear error in the log.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use outbox_pg_e2e::broker::{self, Subscriber};
use outbox_pg_e2e::{Cluster, unique, wait_for};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA (`<name>.pem`/`.key`) and, signed by it, a server certificate for
/// 127.0.0.1 (`<name>-server.pem`/`.key`).
fn make_ca_and_server(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name} CA"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            &format!("{name}-server.key"),
            "-out",
            &format!("{name}-server.csr"),
        ],
    );
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}-server.csr"),
            "-CA",
            &format!("{name}.pem"),
            "-CAkey",
            &format!("{name}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            &format!("{name}-server.pem"),
        ],
    );
}

struct Socat(Child);

impl Drop for Socat {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn delivery_over_tls_and_a_clear_error_for_a_wrong_ca() {
    let _b = broker::shared_broker();
    let dir = std::env::temp_dir().join(unique("outbox_tls"));
    std::fs::create_dir_all(&dir).unwrap();
    make_ca_and_server(&dir, "good");
    make_ca_and_server(&dir, "other");
    // The server files must be readable by the postgres user.
    let _ = Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(&dir)
        .status();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let socat = Socat(
        Command::new("socat")
            .arg(format!(
                "OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,cert={0}/good-server.pem,key={0}/good-server.key,verify=0",
                dir.display()
            ))
            .arg(format!("TCP:{}", broker::STOMP))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("socat runs"),
    );
    wait_for("socat", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });

    let cl = Cluster::start(&[
        &format!("outbox.stomp_hosts = '127.0.0.1:{port}'"),
        "outbox.stomp_use_ssl = on",
        &format!("outbox.stomp_ca_certs = '{}/good.pem'", dir.display()),
        "outbox.maximum_backoff = '300ms'",
    ]);
    let d = format!("/topic/{}", unique("tls"));
    let mut sub = Subscriber::new(&d);
    let mut c = cl.client();
    c.execute("SELECT outbox.publish($1, '{\"over\": \"tls\"}')", &[&d])
        .unwrap();
    assert_eq!(
        sub.take(1, Duration::from_secs(15))[0].body_text(),
        r#"{"over": "tls"}"#
    );
    let host: String = c
        .query_one(
            "SELECT host FROM outbox.status WHERE worker = 'publisher'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(host, format!("127.0.0.1:{port}"));

    // The wrong CA: nothing is delivered, and the log says why. Published
    // once the publisher has left the connection made with the good one.
    let reconnecting = "broker settings changed, reconnecting";
    let before = cl.log().matches(reconnecting).count();
    cl.set(&[&format!(
        "outbox.stomp_ca_certs = '{}/other.pem'",
        dir.display()
    )]);
    wait_for(
        "the publisher to reconnect",
        Duration::from_secs(15),
        || (cl.log().matches(reconnecting).count() > before).then_some(()),
    );
    c.execute("SELECT outbox.publish($1, '\"not delivered\"')", &[&d])
        .unwrap();
    wait_for(
        "the certificate error in the log",
        Duration::from_secs(15),
        || {
            let log = cl.log();
            (log.contains("tls") && (log.contains("UnknownIssuer") || log.contains("certificate")))
                .then_some(())
        },
    );
    assert!(sub.next(Duration::from_millis(500)).is_none());
    let scheduled: i64 = c
        .query_one(
            "SELECT count(*) FROM outbox.published WHERE status = 'scheduled'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(scheduled, 1);
    drop(socat);
    let _ = std::fs::remove_dir_all(&dir);
}
