-- flux-agent schema, version 1: events, dead letters, the agent's role, row-level security.
-- Applied by `flux-agent migrate` (and at agent start) inside one transaction, under an
-- advisory lock, by a role that may create schemas and roles.

CREATE SCHEMA IF NOT EXISTS flux;

-- The privileges a sidecar needs, granted to the login role it uses:
--   GRANT flux_agent TO my_sidecar_login;
-- Roles are cluster-wide: another database of the same cluster may have created it already.
DO $$
BEGIN
    CREATE ROLE flux_agent NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;
END
$$;

CREATE TABLE flux.events (
    agency_id       text        NOT NULL,
    -- The idempotency key, unique within an agency: one agency can never make another
    -- agency's event disappear as a "duplicate".
    event_id        uuid        NOT NULL,
    run_id          text        NOT NULL,
    kind            text        NOT NULL,
    step            text,
    occurred_at     timestamptz NOT NULL,
    received_at     timestamptz NOT NULL,
    provider        text,
    model           text,
    payload         jsonb       NOT NULL,
    payload_sha256  text        NOT NULL CHECK (char_length(payload_sha256) = 64),
    correlation_id  text,
    agent_id        text,
    trace_id        text        CHECK (trace_id IS NULL OR char_length(trace_id) = 32),
    span_id         text        CHECK (span_id IS NULL OR char_length(span_id) = 16),
    expires_at      timestamptz NOT NULL,
    PRIMARY KEY (agency_id, event_id)
);

-- Per-run queries and keyset pagination: (agency, run) then (occurred_at, event_id).
CREATE INDEX events_run_idx ON flux.events (agency_id, run_id, occurred_at, event_id);
-- Retention: expires_at grows with insertion order, so a BRIN index finds expired ranges at
-- almost no cost to ingestion.
CREATE INDEX events_expires_brin ON flux.events USING brin (expires_at);

CREATE TABLE flux.dead_letters (
    id              bigserial   PRIMARY KEY,
    agency_id       text        NOT NULL,
    event_id        uuid,
    run_id          text,
    kind            text,
    reason          text        NOT NULL,
    sqlstate        text,
    -- The sealed event as canonical JSON bytes: bytea so that whatever PostgreSQL refused in
    -- the event cannot also refuse the dead letter.
    event           bytea       NOT NULL,
    received_at     timestamptz,
    dead_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX dead_letters_agency_idx ON flux.dead_letters (agency_id, dead_at);

-- Row-level security: a transaction sees and writes only the agency it declared with
--   SELECT set_config('flux.current_agency_id', 'nasa', true);
-- With no setting, current_setting(..., true) is NULL and no row matches.
ALTER TABLE flux.events ENABLE ROW LEVEL SECURITY;
ALTER TABLE flux.events FORCE ROW LEVEL SECURITY;
CREATE POLICY events_by_agency ON flux.events
    USING (agency_id = current_setting('flux.current_agency_id', true))
    WITH CHECK (agency_id = current_setting('flux.current_agency_id', true));

ALTER TABLE flux.dead_letters ENABLE ROW LEVEL SECURITY;
ALTER TABLE flux.dead_letters FORCE ROW LEVEL SECURITY;
CREATE POLICY dead_letters_by_agency ON flux.dead_letters
    USING (agency_id = current_setting('flux.current_agency_id', true))
    WITH CHECK (agency_id = current_setting('flux.current_agency_id', true));

GRANT USAGE ON SCHEMA flux TO flux_agent;
GRANT SELECT, INSERT ON flux.events TO flux_agent;
GRANT SELECT, INSERT ON flux.dead_letters TO flux_agent;
GRANT USAGE ON SEQUENCE flux.dead_letters_id_seq TO flux_agent;
GRANT SELECT ON flux.schema_migrations TO flux_agent;
DO $$
BEGIN
    -- Batches are staged in a temporary table before the idempotent insert.
    EXECUTE format('GRANT TEMPORARY ON DATABASE %I TO flux_agent', current_database());
END
$$;
