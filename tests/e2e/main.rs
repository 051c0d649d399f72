//! End-to-end tests: a real PostgreSQL (throw-away clusters with outbox_pg
//! preloaded) and, for delivery, the machine's real STOMP broker.

mod activemq;
mod api;
mod capture;
mod databases;
mod delivery;
mod failover;
mod hardening;
mod inbox;
mod operations;
mod regress;
mod tls;
mod upgrade;

use std::sync::OnceLock;

use outbox_pg_e2e::Cluster;

/// One cluster shared by the tests that only need the SQL API. Its
/// publisher has no broker to reach, so rows stay as they were written.
pub fn shared() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    outbox_pg_e2e::shared_cluster(&CLUSTER, || {
        Cluster::start(&["outbox.stomp_hosts = '127.0.0.1:1'"])
    })
}
