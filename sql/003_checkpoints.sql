-- flux-agent schema, version 3: run checkpoints (latest and history) and retention.
--
-- The state is stored as `json`, not `jsonb`: json keeps the exact text the agent hashed, so
-- the integrity check on every load compares like with like (jsonb would normalise numbers
-- such as 1e+16 and -0.0 and break the hash for no fault of the data).

CREATE TABLE flux.checkpoint_history (
    agency_id        text        NOT NULL,
    run_id           text        NOT NULL,
    version          integer     NOT NULL CHECK (version > 0),
    step             text        NOT NULL,
    state            json        NOT NULL,
    checkpoint_hash  text        NOT NULL CHECK (char_length(checkpoint_hash) = 64),
    provider         text,
    model            text,
    status           text,
    saved_at         timestamptz NOT NULL,
    expires_at       timestamptz NOT NULL,
    event_id         uuid        NOT NULL,
    correlation_id   text,
    PRIMARY KEY (agency_id, run_id, version)
);
CREATE INDEX checkpoint_history_expires_brin ON flux.checkpoint_history USING brin (expires_at);

-- The latest version per run, kept by the agent alongside the history.
CREATE TABLE flux.checkpoints (
    agency_id        text        NOT NULL,
    run_id           text        NOT NULL,
    version          integer     NOT NULL,
    step             text        NOT NULL,
    state            json        NOT NULL,
    checkpoint_hash  text        NOT NULL,
    provider         text,
    model            text,
    status           text,
    saved_at         timestamptz NOT NULL,
    expires_at       timestamptz NOT NULL,
    event_id         uuid        NOT NULL,
    correlation_id   text,
    PRIMARY KEY (agency_id, run_id)
);
CREATE INDEX checkpoints_expires_idx ON flux.checkpoints (expires_at);

ALTER TABLE flux.checkpoint_history ENABLE ROW LEVEL SECURITY;
ALTER TABLE flux.checkpoint_history FORCE ROW LEVEL SECURITY;
CREATE POLICY checkpoint_history_by_agency ON flux.checkpoint_history
    USING (agency_id = current_setting('flux.current_agency_id', true))
    WITH CHECK (agency_id = current_setting('flux.current_agency_id', true));

ALTER TABLE flux.checkpoints ENABLE ROW LEVEL SECURITY;
ALTER TABLE flux.checkpoints FORCE ROW LEVEL SECURITY;
CREATE POLICY checkpoints_by_agency ON flux.checkpoints
    USING (agency_id = current_setting('flux.current_agency_id', true))
    WITH CHECK (agency_id = current_setting('flux.current_agency_id', true));

GRANT SELECT, INSERT ON flux.checkpoint_history TO flux_agent;
GRANT SELECT, INSERT, UPDATE ON flux.checkpoints TO flux_agent;

-- Retention. The agent may not DELETE; it calls this function, which deletes only expired
-- rows, of one agency (row-level security still applies inside), in one small batch.
CREATE FUNCTION flux.purge_expired(p_agency text, p_batch integer)
RETURNS TABLE (events bigint, checkpoint_history bigint, checkpoints bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n_events bigint;
    n_history bigint;
    n_latest bigint;
BEGIN
    PERFORM set_config('flux.current_agency_id', p_agency, true);
    DELETE FROM flux.events WHERE ctid = ANY (ARRAY(
        SELECT ctid FROM flux.events
        WHERE agency_id = p_agency AND expires_at < now() LIMIT p_batch));
    GET DIAGNOSTICS n_events = ROW_COUNT;
    DELETE FROM flux.checkpoint_history WHERE ctid = ANY (ARRAY(
        SELECT ctid FROM flux.checkpoint_history
        WHERE agency_id = p_agency AND expires_at < now() LIMIT p_batch));
    GET DIAGNOSTICS n_history = ROW_COUNT;
    DELETE FROM flux.checkpoints WHERE ctid = ANY (ARRAY(
        SELECT ctid FROM flux.checkpoints
        WHERE agency_id = p_agency AND expires_at < now() LIMIT p_batch));
    GET DIAGNOSTICS n_latest = ROW_COUNT;
    RETURN QUERY SELECT n_events, n_history, n_latest;
END
$$;
REVOKE ALL ON FUNCTION flux.purge_expired(text, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION flux.purge_expired(text, integer) TO flux_agent;

-- One agent at a time runs retention: a lease, claimed by whoever finds it expired. A table
-- row rather than an advisory lock, because a session lock does not survive PgBouncer's
-- transaction pooling and a transaction lock would not cover a round of small batches.
CREATE TABLE flux.maintenance_leases (
    name        text        PRIMARY KEY,
    holder      text        NOT NULL,
    until       timestamptz NOT NULL
);
INSERT INTO flux.maintenance_leases (name, holder, until) VALUES ('retention', '', '-infinity');

CREATE FUNCTION flux.claim_lease(p_name text, p_holder text, p_seconds double precision)
RETURNS boolean
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    UPDATE flux.maintenance_leases
       SET holder = p_holder, until = now() + make_interval(secs => p_seconds)
     WHERE name = p_name AND (until < now() OR holder = p_holder)
    RETURNING true;
$$;
REVOKE ALL ON FUNCTION flux.claim_lease(text, text, double precision) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION flux.claim_lease(text, text, double precision) TO flux_agent;
