-- creditservice storage schema, PostgreSQL dialect (kept in step with schema_sqlite.sql).
-- Ids collate as "C" so every ordering (pagination, export) matches SQLite's byte order.
CREATE TABLE IF NOT EXISTS meta (
  key   TEXT COLLATE "C" PRIMARY KEY,
  value TEXT NOT NULL
);
INSERT INTO meta (key, value) VALUES ('schema_version', '1') ON CONFLICT (key) DO NOTHING;

CREATE TABLE IF NOT EXISTS wallets (
  project_id            TEXT COLLATE "C" PRIMARY KEY,
  organization_id       TEXT COLLATE "C" NOT NULL,
  balance               BIGINT NOT NULL,
  reserved              BIGINT NOT NULL,
  state                 INTEGER NOT NULL,
  low_balance_threshold BIGINT NOT NULL,
  grace_period_seconds  BIGINT NOT NULL,
  grace_until_ms        BIGINT NOT NULL,
  overdraft_limit       BIGINT NOT NULL,
  version               BIGINT NOT NULL,
  created_at_ms         BIGINT NOT NULL,
  updated_at_ms         BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS wallets_by_org ON wallets (organization_id, project_id);
CREATE INDEX IF NOT EXISTS wallets_by_grace ON wallets (state, grace_until_ms);

-- Append-only: the triggers below refuse every UPDATE, DELETE and TRUNCATE.
CREATE TABLE IF NOT EXISTS ledger (
  seq           BIGINT PRIMARY KEY,
  project_id    TEXT COLLATE "C" NOT NULL,
  kind          INTEGER NOT NULL,
  amount        BIGINT NOT NULL,
  balance_after BIGINT NOT NULL,
  meter         TEXT NOT NULL,
  reference     TEXT NOT NULL,
  request_id    TEXT NOT NULL,
  description   TEXT NOT NULL,
  created_at_ms BIGINT NOT NULL,
  route         TEXT NOT NULL,
  quantity      BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS ledger_by_project ON ledger (project_id, seq);
CREATE OR REPLACE FUNCTION ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION 'ledger is append-only' USING ERRCODE = 'integrity_constraint_violation';
END
$$;
CREATE OR REPLACE TRIGGER ledger_no_change BEFORE UPDATE OR DELETE ON ledger
  FOR EACH ROW EXECUTE FUNCTION ledger_append_only();
CREATE OR REPLACE TRIGGER ledger_no_truncate BEFORE TRUNCATE ON ledger
  FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only();

CREATE TABLE IF NOT EXISTS quotas (
  project_id     TEXT COLLATE "C" NOT NULL,
  name           TEXT COLLATE "C" NOT NULL,
  algorithm      INTEGER NOT NULL,
  quota_limit    BIGINT NOT NULL,
  window_seconds BIGINT NOT NULL,
  version        BIGINT NOT NULL,
  updated_at_ms  BIGINT NOT NULL,
  PRIMARY KEY (project_id, name)
);

CREATE TABLE IF NOT EXISTS api_keys (
  key_id        TEXT COLLATE "C" PRIMARY KEY,
  project_id    TEXT COLLATE "C" NOT NULL,
  name          TEXT NOT NULL,
  prefix        TEXT NOT NULL,
  created_at_ms BIGINT NOT NULL,
  revoked_at_ms BIGINT NOT NULL,
  key_hash      TEXT COLLATE "C" NOT NULL UNIQUE
);

CREATE TABLE IF NOT EXISTS reservations (
  reservation_id   TEXT COLLATE "C" PRIMARY KEY,
  project_id       TEXT COLLATE "C" NOT NULL,
  amount           BIGINT NOT NULL,
  committed_amount BIGINT NOT NULL,
  state            INTEGER NOT NULL,
  meter            TEXT NOT NULL,
  created_at_ms    BIGINT NOT NULL,
  expires_at_ms    BIGINT NOT NULL,
  ended_at_ms      BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS reservations_by_expiry ON reservations (state, expires_at_ms);

CREATE TABLE IF NOT EXISTS applied_events (
  event_id   TEXT COLLATE "C" PRIMARY KEY,
  status     INTEGER NOT NULL,
  error      TEXT NOT NULL,
  ledger_seq BIGINT NOT NULL,
  project_id TEXT COLLATE "C" NOT NULL
);

CREATE TABLE IF NOT EXISTS idempotency (
  method        TEXT COLLATE "C" NOT NULL,
  request_id    TEXT COLLATE "C" NOT NULL,
  fingerprint   TEXT NOT NULL,
  code          INTEGER NOT NULL,
  message       TEXT NOT NULL,
  response      BYTEA NOT NULL,
  created_at_ms BIGINT NOT NULL,
  PRIMARY KEY (method, request_id)
);

CREATE TABLE IF NOT EXISTS changes (
  cursor         BIGINT PRIMARY KEY,
  project_id     TEXT COLLATE "C" NOT NULL,
  occurred_at_ms BIGINT NOT NULL,
  event          BYTEA NOT NULL
);
CREATE INDEX IF NOT EXISTS changes_by_time ON changes (occurred_at_ms);
