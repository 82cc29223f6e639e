//! A scratch PostgreSQL database for one benchmark run, on the server at
//! TEST_DATABASE_URL (default postgres://postgres@127.0.0.1:5432/postgres):
//! created empty, migrated by the gateway, dropped at the end.

use std::time::Duration;

use ascend_gateway::store::Db;
use sqlx::{AnyConnection, Connection, Executor};

pub struct ScratchDb {
    admin: AnyConnection,
    name: String,
    pub url: String,
}

impl ScratchDb {
    pub async fn create() -> ScratchDb {
        sqlx::any::install_default_drivers();
        let admin_url = std::env::var("TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
        let name = format!("agw_bench_{}", uuid::Uuid::new_v4().simple());
        let mut admin = AnyConnection::connect(&admin_url)
            .await
            .expect("PostgreSQL");
        admin
            .execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .expect("create");
        let base = admin_url
            .rsplit_once('/')
            .map(|(b, _)| b.to_owned())
            .unwrap();
        ScratchDb {
            admin,
            url: format!("{base}/{name}"),
            name,
        }
    }

    /// A pool on the scratch database, migrated.
    pub async fn connect(&self, connect_timeout: Duration) -> Db {
        let db = Db::connect_url(&self.url, 4, connect_timeout)
            .await
            .expect("db");
        db.migrate().await.expect("migrate");
        db
    }

    pub async fn drop_database(mut self) {
        self.admin
            .execute(format!("DROP DATABASE {} WITH (FORCE)", self.name).as_str())
            .await
            .expect("drop");
    }
}
