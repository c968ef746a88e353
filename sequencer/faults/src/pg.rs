//! Throwaway PostgreSQL 15 servers (Debian's binaries) with `tob` preloaded and pointed at a
//! cluster: created with `initdb` as the `postgres` user (PostgreSQL refuses root), on an
//! OS-chosen port with a Unix socket only, stopped and removed on drop — also when a test
//! fails. Needs the extension installed (`scripts/install-extension.sh`).

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
const TOB_CONTROL: &str = "/usr/share/postgresql/15/extension/tob.control";

/// The application database of the tests: a `users` table whose `name` is kept unique across
/// every database on the cluster by the `tob_unique` trigger (and by nothing else: no local
/// unique index).
pub const APP_SCHEMA: &str = "CREATE EXTENSION tob;
     CREATE TABLE users (id bigserial PRIMARY KEY, name text NOT NULL);
     CREATE TRIGGER users_name_unique AFTER INSERT OR UPDATE OR DELETE ON users
         FOR EACH ROW EXECUTE FUNCTION tob_unique('usernames', 'name');";

/// Whether `CREATE EXTENSION tob` can work in Debian's PostgreSQL 15.
pub fn extension_installed() -> bool {
    Path::new(TOB_CONTROL).exists() && Path::new(PG_BIN).join("initdb").exists()
}

fn as_postgres(program: &str) -> Command {
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", "postgres", "--", &format!("{PG_BIN}/{program}")]);
    cmd.env_remove("RUST_BACKTRACE");
    cmd
}

fn run(mut cmd: Command, what: &str) -> io::Result<()> {
    let out = cmd.output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{what}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}

/// One PostgreSQL server in its own directory (data, socket and log).
pub struct Server {
    dir: PathBuf,
    pub port: u16,
    /// Its `cluster_name`, which with the database name makes the owner of its claims; empty
    /// for none (the owner then starts with the system identifier).
    pub name: String,
}

impl Server {
    /// An empty `dir` owned by the `postgres` user and a free port, for a server not yet made.
    fn prepare(dir: &Path, name: &str) -> io::Result<Server> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        let mut chown = Command::new("chown");
        chown.arg("postgres:postgres").arg(dir);
        run(chown, "chown")?;
        let port = crate::ports::bind_fresh()?.local_addr()?.port();
        Ok(Server { dir: dir.to_path_buf(), port, name: name.to_owned() })
    }

    /// Creates and starts a server in `dir` (which it owns and removes) named `name` (may be
    /// empty) with `extra` lines appended to postgresql.conf.
    pub fn start(dir: &Path, name: &str, cluster: &str, extra: &[&str]) -> io::Result<Server> {
        let server = Server::prepare(dir, name)?;
        let port = server.port;
        let data = server.data();
        let mut initdb = as_postgres("initdb");
        initdb.arg("-D").arg(&data).args(["-A", "trust", "-U", "postgres", "--no-sync"]);
        run(initdb, "initdb")?;
        let mut conf = format!(
            "port = {port}\nlisten_addresses = ''\nunix_socket_directories = '{}'\n\
             shared_preload_libraries = 'tob'\ntob.cluster = '{cluster}'\n\
             tob.session_ttl = '3s'\nmax_prepared_transactions = 10\n",
            dir.display()
        );
        if !name.is_empty() {
            conf.push_str(&format!("cluster_name = '{name}'\n"));
        }
        for line in extra {
            conf.push_str(line);
            conf.push('\n');
        }
        let conf_path = data.join("postgresql.conf");
        let mut existing = std::fs::read_to_string(&conf_path)?;
        existing.push_str(&conf);
        std::fs::write(&conf_path, existing)?;
        server.pg_ctl_start()?;
        Ok(server)
    }

    /// Creates and starts a streaming standby of `primary` in `dir` (which it owns and
    /// removes): a base backup with `-R`, its own port and socket directory; the rest of the
    /// configuration (tob's settings, `cluster_name`) is the primary's, copied with the data.
    pub fn start_standby(dir: &Path, primary: &Server) -> io::Result<Server> {
        let server = Server::prepare(dir, &primary.name)?;
        let port = server.port;
        let mut backup = as_postgres("pg_basebackup");
        // A fast checkpoint: the default spreads it over minutes.
        let options = ["-R", "-X", "stream", "-c", "fast", "-U", "postgres"];
        backup.arg("-D").arg(server.data()).args(options);
        backup.arg("-h").arg(&primary.dir).arg("-p").arg(primary.port.to_string());
        run(backup, "pg_basebackup")?;
        let conf_path = server.data().join("postgresql.conf");
        let mut conf = std::fs::read_to_string(&conf_path)?;
        // Later lines win over the primary's.
        conf.push_str(&format!("port = {port}\nunix_socket_directories = '{}'\n", dir.display()));
        std::fs::write(&conf_path, conf)?;
        server.pg_ctl_start()?;
        Ok(server)
    }

    /// `pg_ctl promote`: a standby becomes a primary (waits until it accepts writes).
    pub fn promote(&self) -> io::Result<()> {
        let mut promote = as_postgres("pg_ctl");
        promote.arg("-D").arg(self.data()).args(["-w", "promote"]);
        run(promote, "pg_ctl promote")
    }

    /// The data directory.
    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn pg_ctl_start(&self) -> io::Result<()> {
        let mut start = as_postgres("pg_ctl");
        start.arg("-D").arg(self.data()).arg("-l").arg(self.dir.join("log")).args(["-w", "start"]);
        run(start, "pg_ctl start").map_err(|e| io::Error::other(format!("{e}\n{}", self.log())))
    }

    /// `pg_ctl stop -m immediate`: no shutdown checkpoint, like a crash.
    pub fn stop_immediate(&self) -> io::Result<()> {
        let mut stop = as_postgres("pg_ctl");
        stop.arg("-D").arg(self.data()).args(["-m", "immediate", "-w", "stop"]);
        run(stop, "pg_ctl stop")
    }

    /// Starts the server again after [`Server::stop_immediate`]; it runs crash recovery.
    pub fn restart_after_crash(&self) -> io::Result<()> {
        self.pg_ctl_start()
    }

    /// The server log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }

    /// The owner `tob` gives this server's claims made in `database`.
    pub fn owner(&self, database: &str) -> String {
        format!("{}/{database}", self.name)
    }

    /// A connection configuration for `database` as the superuser.
    pub fn config(&self, database: &str) -> postgres::Config {
        let mut config = postgres::Config::new();
        config.host_path(&self.dir).port(self.port).user("postgres").dbname(database);
        config.connect_timeout(Duration::from_secs(2));
        config
    }

    pub fn connect(&self, database: &str) -> Result<postgres::Client, postgres::Error> {
        self.config(database).connect(postgres::NoTls)
    }

    /// Creates `database` with [`APP_SCHEMA`], then waits until the cluster answers and
    /// declares the trigger's namespace (idempotent: every database does it).
    pub fn create_app_database(&self, database: &str) -> io::Result<postgres::Client> {
        let sql = |e: postgres::Error| io::Error::other(format!("{}: {e}", self.name));
        self.connect("postgres")
            .and_then(|mut admin| admin.batch_execute(&format!("CREATE DATABASE {database}")))
            .map_err(sql)?;
        let mut db = self.connect(database).map_err(sql)?;
        db.batch_execute(APP_SCHEMA).map_err(sql)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while db.query_one("SELECT tob_sync(), tob_create_namespace('usernames')", &[]).is_err() {
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "{}: cluster not reachable in 30 s",
                    self.name
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(db)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = as_postgres("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
