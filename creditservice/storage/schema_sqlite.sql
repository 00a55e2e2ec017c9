-- creditservice storage schema, SQLite dialect (kept in step with schema_postgres.sql).
CREATE TABLE IF NOT EXISTS meta (
  key   TEXT PRIMARY KEY,
  value TEXT NOT NULL
);
INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', '1');

CREATE TABLE IF NOT EXISTS wallets (
  project_id            TEXT PRIMARY KEY,
  organization_id       TEXT NOT NULL,
  balance               INTEGER NOT NULL,
  reserved              INTEGER NOT NULL,
  state                 INTEGER NOT NULL,
  low_balance_threshold INTEGER NOT NULL,
  grace_period_seconds  INTEGER NOT NULL,
  grace_until_ms        INTEGER NOT NULL,
  overdraft_limit       INTEGER NOT NULL,
  version               INTEGER NOT NULL,
  created_at_ms         INTEGER NOT NULL,
  updated_at_ms         INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS wallets_by_org ON wallets (organization_id, project_id);
CREATE INDEX IF NOT EXISTS wallets_by_grace ON wallets (state, grace_until_ms);

-- Append-only: the triggers below refuse every UPDATE and DELETE.
CREATE TABLE IF NOT EXISTS ledger (
  seq           INTEGER PRIMARY KEY,
  project_id    TEXT NOT NULL,
  kind          INTEGER NOT NULL,
  amount        INTEGER NOT NULL,
  balance_after INTEGER NOT NULL,
  meter         TEXT NOT NULL,
  reference     TEXT NOT NULL,
  request_id    TEXT NOT NULL,
  description   TEXT NOT NULL,
  created_at_ms INTEGER NOT NULL,
  route         TEXT NOT NULL,
  quantity      INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS ledger_by_project ON ledger (project_id, seq);
CREATE TRIGGER IF NOT EXISTS ledger_no_update BEFORE UPDATE ON ledger
BEGIN SELECT RAISE(ABORT, 'ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS ledger_no_delete BEFORE DELETE ON ledger
BEGIN SELECT RAISE(ABORT, 'ledger is append-only'); END;

CREATE TABLE IF NOT EXISTS quotas (
  project_id     TEXT NOT NULL,
  name           TEXT NOT NULL,
  algorithm      INTEGER NOT NULL,
  quota_limit    INTEGER NOT NULL,
  window_seconds INTEGER NOT NULL,
  version        INTEGER NOT NULL,
  updated_at_ms  INTEGER NOT NULL,
  PRIMARY KEY (project_id, name)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS api_keys (
  key_id        TEXT PRIMARY KEY,
  project_id    TEXT NOT NULL,
  name          TEXT NOT NULL,
  prefix        TEXT NOT NULL,
  created_at_ms INTEGER NOT NULL,
  revoked_at_ms INTEGER NOT NULL,
  key_hash      TEXT NOT NULL UNIQUE
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS reservations (
  reservation_id   TEXT PRIMARY KEY,
  project_id       TEXT NOT NULL,
  amount           INTEGER NOT NULL,
  committed_amount INTEGER NOT NULL,
  state            INTEGER NOT NULL,
  meter            TEXT NOT NULL,
  created_at_ms    INTEGER NOT NULL,
  expires_at_ms    INTEGER NOT NULL,
  ended_at_ms      INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS reservations_by_expiry ON reservations (state, expires_at_ms);

CREATE TABLE IF NOT EXISTS applied_events (
  event_id   TEXT PRIMARY KEY,
  status     INTEGER NOT NULL,
  error      TEXT NOT NULL,
  ledger_seq INTEGER NOT NULL,
  project_id TEXT NOT NULL
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS idempotency (
  method        TEXT NOT NULL,
  request_id    TEXT NOT NULL,
  fingerprint   TEXT NOT NULL,
  code          INTEGER NOT NULL,
  message       TEXT NOT NULL,
  response      BLOB NOT NULL,
  created_at_ms INTEGER NOT NULL,
  PRIMARY KEY (method, request_id)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS changes (
  cursor         INTEGER PRIMARY KEY,
  project_id     TEXT NOT NULL,
  occurred_at_ms INTEGER NOT NULL,
  event          BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS changes_by_time ON changes (occurred_at_ms);
