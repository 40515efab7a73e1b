-- AutoServe Health: ClickHouse users and roles for a ClickHouse server (not chDB, the
-- embedded engine, which has no users). Run once as an administrator:
--   clickhouse-client --multiquery --param_reporter_password="$(cat secrets/clickhouse-reporter.password)" \
--                     --param_reader_password="$(cat secrets/clickhouse-reader.password)" < deploy/clickhouse-users.sql
-- Passwords arrive as query parameters, never in this file (ClickHouse stores only a hash).
--
-- Least privilege, per database `autoserve`:
--   autoserve_writer   INSERT on autoserve.* only                (the reporter's batches)
--   autoserve_reader   SELECT on autoserve.* only                (reports, dashboards, people)
--   autoserve_schema   CREATE TABLE and ALTER TTL on autoserve.*  (the reporter's start-up
--                      migrations and retention; no DROP, no TRUNCATE, no ALTER DELETE/UPDATE)
-- The reporter gets writer + reader (its report API reads) + schema; a person or a
-- dashboard gets reader only, with readonly = 1 so no setting can widen it.

CREATE DATABASE IF NOT EXISTS autoserve;

CREATE ROLE IF NOT EXISTS autoserve_writer;
GRANT INSERT ON autoserve.* TO autoserve_writer;

CREATE ROLE IF NOT EXISTS autoserve_reader;
GRANT SELECT ON autoserve.* TO autoserve_reader;

CREATE ROLE IF NOT EXISTS autoserve_schema;
GRANT CREATE TABLE, ALTER TTL ON autoserve.* TO autoserve_schema;

CREATE SETTINGS PROFILE IF NOT EXISTS autoserve_readonly SETTINGS readonly = 1;

CREATE USER IF NOT EXISTS reporter
    IDENTIFIED WITH sha256_password BY {reporter_password:String}
    DEFAULT DATABASE autoserve;
GRANT autoserve_writer, autoserve_reader, autoserve_schema TO reporter;
SET DEFAULT ROLE autoserve_writer, autoserve_reader, autoserve_schema TO reporter;

CREATE USER IF NOT EXISTS reader
    IDENTIFIED WITH sha256_password BY {reader_password:String}
    DEFAULT DATABASE autoserve
    SETTINGS PROFILE autoserve_readonly;
GRANT autoserve_reader TO reader;
SET DEFAULT ROLE autoserve_reader TO reader;
