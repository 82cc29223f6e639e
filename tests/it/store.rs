//! The storage layer on both backends: the embedded SQLite file and a fresh
//! PostgreSQL database per test. Each case runs the same code on both.

use std::time::Duration;

use ascend_gateway::store::{Backend, Db, meta};

use crate::common::PgTestDb;

async fn sqlite() -> (Db, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("t.db").display());
    let db = Db::connect_url(&url, 4, Duration::from_secs(5))
        .await
        .expect("open sqlite");
    (db, dir)
}

async fn postgres(test_db: &PgTestDb) -> Db {
    Db::connect_url(&test_db.url, 4, Duration::from_secs(5))
        .await
        .expect("open postgres")
}

async fn migrations_apply_once(db: &Db) {
    let first = db.migrate().await.expect("first migration run");
    assert!(first.applied_now >= 1);
    assert_eq!(first.applied_now, first.total);
    let second = db.migrate().await.expect("second migration run");
    assert_eq!(second.applied_now, 0, "nothing left to apply");
    assert_eq!(second.total, first.total);
    db.ping().await.expect("ping");
}

async fn installation_id_is_created_once_even_under_races(db: &Db) {
    db.migrate().await.expect("migrate");
    let racers = (0..8).map(|_| {
        let db = db.clone();
        tokio::spawn(async move { meta::installation_id(&db).await })
    });
    let mut ids = Vec::new();
    for racer in racers {
        ids.push(racer.await.expect("join").expect("installation id"));
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "every caller sees the same id: {ids:?}");
    assert!(uuid::Uuid::parse_str(&ids[0]).is_ok());
    assert_eq!(meta::installation_id(db).await.expect("again"), ids[0]);
}

#[tokio::test]
async fn sqlite_migrations_apply_once() {
    let (db, _dir) = sqlite().await;
    assert_eq!(db.backend(), Backend::Sqlite);
    migrations_apply_once(&db).await;
}

#[tokio::test]
async fn postgres_migrations_apply_once() {
    let test_db = PgTestDb::create().await;
    let db = postgres(&test_db).await;
    assert_eq!(db.backend(), Backend::Postgres);
    migrations_apply_once(&db).await;
    db.close().await;
}

#[tokio::test]
async fn sqlite_installation_id_is_created_once() {
    let (db, _dir) = sqlite().await;
    installation_id_is_created_once_even_under_races(&db).await;
}

#[tokio::test]
async fn postgres_installation_id_is_created_once() {
    let test_db = PgTestDb::create().await;
    let db = postgres(&test_db).await;
    installation_id_is_created_once_even_under_races(&db).await;
    db.close().await;
}

#[tokio::test]
async fn gateway_serves_on_postgres() {
    let test_db = PgTestDb::create().await;
    let data_dir = tempfile::tempdir().expect("temp dir");
    let mut settings = crate::common::test_settings(&data_dir);
    settings.database.url = Some(test_db.secret_url());
    let gateway = crate::common::TestGateway::start_with(settings, data_dir).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(gateway.channel.clone());
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("health on a postgres-backed gateway");
    gateway.stop().await.expect("clean stop");
}

/// The data directory, the embedded database (with its WAL) and the usage
/// spool are readable by the gateway's user only, also when an earlier
/// version left the directory open.
#[cfg(unix)]
#[tokio::test]
async fn the_gateways_files_are_private() {
    use std::os::unix::fs::PermissionsExt;

    let dir = tempfile::tempdir().expect("dir");
    let data_dir = dir.path().join("data");
    std::fs::create_dir(&data_dir).expect("data dir");
    std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(0o755)).expect("open it");
    let holder = tempfile::tempdir().expect("holder");
    let mut settings = crate::common::test_settings(&holder);
    settings.data_dir = data_dir.clone();
    let gateway = crate::common::TestGateway::start_with(settings, holder).await;
    let mode = |path: &std::path::Path| {
        std::fs::metadata(path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(&data_dir), 0o700);
    assert_eq!(mode(&data_dir.join("spool")), 0o700);
    let mut files = 0;
    for entry in std::fs::read_dir(&data_dir)
        .expect("list")
        .chain(std::fs::read_dir(data_dir.join("spool")).expect("list spool"))
    {
        let path = entry.expect("entry").path();
        if path.is_file() {
            assert_eq!(mode(&path), 0o600, "{}", path.display());
            files += 1;
        }
    }
    assert!(files >= 3, "database, its WAL and a spool segment: {files}");
    gateway.stop().await.expect("clean stop");
}
