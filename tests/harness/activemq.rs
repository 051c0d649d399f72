//! ActiveMQ Classic (Debian's `activemq` package) as a second STOMP broker:
//! a throw-away instance with its own configuration, data folder and STOMP
//! port on 127.0.0.1 (never RabbitMQ's 61613), dead letters per queue as
//! `DLQ.<queue>`; stopped with SIGTERM and removed on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::broker::stomp::client::{Config, Connection};

const HOME: &str = "/usr/share/activemq";

pub struct ActiveMq {
    pub port: u16,
    dir: PathBuf,
    child: Child,
}

impl ActiveMq {
    pub fn start() -> ActiveMq {
        ActiveMq::start_with("")
    }

    /// Starts one whose STOMP transport takes `options` (URI query
    /// parameters, e.g. `wireFormat.maxFrameSize=20000`).
    pub fn start_with(options: &str) -> ActiveMq {
        ActiveMq::start_configured(options, "")
    }

    /// Starts one where user `guest` may write to every queue but those
    /// named `closed.*`: a SEND there is refused with an ERROR and the
    /// connection stays open.
    pub fn start_with_a_closed_queue() -> ActiveMq {
        ActiveMq::start_configured(
            "",
            r#"<plugins>
      <simpleAuthenticationPlugin anonymousAccessAllowed="false">
        <users><authenticationUser username="guest" password="guest" groups="users"/></users>
      </simpleAuthenticationPlugin>
      <authorizationPlugin><map><authorizationMap><authorizationEntries>
        <authorizationEntry queue="open.>" read="users" write="users" admin="users"/>
        <authorizationEntry queue="DLQ.>" read="users" write="users" admin="users"/>
        <authorizationEntry queue="closed.>" read="users" write="nobody" admin="users"/>
        <authorizationEntry topic="ActiveMQ.Advisory.>" read="users" write="users" admin="users"/>
      </authorizationEntries></authorizationMap></map></authorizationPlugin>
    </plugins>"#,
        )
    }

    /// Starts one with transport `options` and `plugins` (the broker's
    /// `<plugins>` element, or nothing).
    fn start_configured(options: &str, plugins: &str) -> ActiveMq {
        let jar = format!("{HOME}/bin/activemq.jar");
        assert!(
            std::path::Path::new(&jar).exists(),
            "{jar} is missing: scripts/setup.sh installs activemq"
        );
        let dir = std::env::temp_dir().join(crate::unique("outbox_activemq"));
        for sub in ["conf", "data", "tmp"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let d = dir.display();
        let query = if options.is_empty() {
            String::new()
        } else {
            format!("?{}", options.replace('&', "&amp;"))
        };
        std::fs::write(
            dir.join("conf/activemq.xml"),
            format!(
                r#"<beans xmlns="http://www.springframework.org/schema/beans"
  xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
  xsi:schemaLocation="http://www.springframework.org/schema/beans http://www.springframework.org/schema/beans/spring-beans.xsd
    http://activemq.apache.org/schema/core http://activemq.apache.org/schema/core/activemq-core.xsd">
  <broker xmlns="http://activemq.apache.org/schema/core" brokerName="outbox-test" useJmx="false"
          persistent="true" dataDirectory="{d}/data">
    {plugins}
    <destinationPolicy><policyMap><policyEntries>
      <policyEntry queue=">">
        <deadLetterStrategy>
          <individualDeadLetterStrategy queuePrefix="DLQ." useQueueForQueueMessages="true" processNonPersistent="true"/>
        </deadLetterStrategy>
      </policyEntry>
    </policyEntries></policyMap></destinationPolicy>
    <persistenceAdapter><kahaDB directory="{d}/data/kahadb"/></persistenceAdapter>
    <transportConnectors>
      <transportConnector name="stomp" uri="stomp://127.0.0.1:{port}{query}"/>
    </transportConnectors>
  </broker>
</beans>
"#
            ),
        )
        .unwrap();
        let child = spawn(&dir);
        let amq = ActiveMq { port, dir, child };
        amq.wait_until_up();
        amq
    }

    fn wait_until_up(&self) {
        let cfg = self.config();
        crate::wait_for("ActiveMQ's STOMP port", Duration::from_secs(90), || {
            Connection::open(&cfg, &self.host()).ok()
        });
    }

    /// Stops the broker (SIGTERM, a clean shutdown).
    pub fn stop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same port and data (persistent messages stay).
    pub fn start_again(&mut self) {
        self.child = spawn(&self.dir);
        self.wait_until_up();
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn config(&self) -> Config {
        Config {
            hosts: vec![self.host()],
            ..crate::broker::config()
        }
    }
}

impl Drop for ActiveMq {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts ActiveMQ on the configuration in `dir` (java directly: Debian's
/// /usr/bin/activemq overrides the base folder, heap and log).
fn spawn(dir: &std::path::Path) -> Child {
    let jar = format!("{HOME}/bin/activemq.jar");
    let d = dir.display();
    // The benchmarks keep tens of thousands of persistent messages: they
    // ask for a larger heap.
    let heap = std::env::var("OUTBOX_ACTIVEMQ_HEAP").unwrap_or_else(|_| "256m".into());
    Command::new("java")
        .arg(format!("-Xmx{heap}"))
        .arg("-Djava.awt.headless=true")
        .arg(format!("-Dactivemq.home={HOME}"))
        .arg(format!("-Dactivemq.base={d}"))
        .arg(format!("-Dactivemq.conf={d}/conf"))
        .arg(format!("-Dactivemq.data={d}/data"))
        .arg(format!("-Djava.io.tmpdir={d}/tmp"))
        .args(["-jar", &jar, "start"])
        .arg(format!("xbean:file:{d}/conf/activemq.xml"))
        .stdout(Stdio::from(
            std::fs::File::create(dir.join("activemq.log")).unwrap(),
        ))
        .stderr(Stdio::from(
            std::fs::File::create(dir.join("activemq.err")).unwrap(),
        ))
        .spawn()
        .expect("java runs")
}
