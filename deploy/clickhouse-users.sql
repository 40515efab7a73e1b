-- AutoServe Health: ClickHouse users and roles for a ClickHouse server (not chDB, the
-- embedded engine, which has no users). Run once as an administrator:
--   clickhouse-client --multiquery --param_reporter_password="$(cat secrets/clickhouse-reporter.password)" \
--                     --param_reader_password="$(cat secrets/clickhouse-reader.password)" \
--                     --param_migrator_password="$(cat secrets/clickhouse-migrator.password)" < deploy/clickhouse-users.sql
-- Passwords arrive as query parameters, never in this file (ClickHouse stores only a hash).
--
-- Least privilege, per database `autoserve`; each user has one role:
--   reporter  autoserve_writer  INSERT on autoserve.* only: the reporter's batches
--             (AUTOSERVE_CLICKHOUSE_URL, with AUTOSERVE_REPORTER_MIGRATE=false)
--   reader    autoserve_reader  SELECT on autoserve.* only, readonly = 1 so no setting can
--             widen it: the reporter's report API (AUTOSERVE_CLICKHOUSE_READ_URL),
--             dashboards and people
--   migrator  autoserve_schema  CREATE TABLE and ALTER TTL on autoserve.*, and its own
--             migrations log: `autoserve migrate` before the reporter starts (no DROP, no
--             TRUNCATE, no ALTER DELETE/UPDATE)
-- tests/integration/test_reporter_privileges.py runs these grants on the real engine.

CREATE DATABASE IF NOT EXISTS autoserve;

CREATE ROLE IF NOT EXISTS autoserve_writer;
GRANT INSERT ON autoserve.* TO autoserve_writer;

CREATE ROLE IF NOT EXISTS autoserve_reader;
GRANT SELECT ON autoserve.* TO autoserve_reader;

CREATE ROLE IF NOT EXISTS autoserve_schema;
GRANT CREATE TABLE, ALTER TTL ON autoserve.* TO autoserve_schema;
GRANT SELECT, INSERT ON autoserve.autoserve_schema_migrations TO autoserve_schema;

CREATE SETTINGS PROFILE IF NOT EXISTS autoserve_readonly SETTINGS readonly = 1;

CREATE USER IF NOT EXISTS reporter
    IDENTIFIED WITH sha256_password BY {reporter_password:String}
    DEFAULT DATABASE autoserve;
GRANT autoserve_writer TO reporter;
SET DEFAULT ROLE autoserve_writer TO reporter;

CREATE USER IF NOT EXISTS reader
    IDENTIFIED WITH sha256_password BY {reader_password:String}
    DEFAULT DATABASE autoserve
    SETTINGS PROFILE autoserve_readonly;
GRANT autoserve_reader TO reader;
SET DEFAULT ROLE autoserve_reader TO reader;

CREATE USER IF NOT EXISTS migrator
    IDENTIFIED WITH sha256_password BY {migrator_password:String}
    DEFAULT DATABASE autoserve;
GRANT autoserve_schema TO migrator;
SET DEFAULT ROLE autoserve_schema TO migrator;
