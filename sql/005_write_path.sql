-- flux-agent schema, version 5: one statement per flush.
--
-- A flush used to be a transaction of six or more round trips (BEGIN, a temporary staging
-- table declared and truncated at every commit, COPY, set_config, INSERT, COMMIT). Summed
-- over thousands of sidecars, each posting a trickle, that cost the shared database more than
-- the rows did. Now a lane's whole window is one call: the events, checkpoints and audit
-- entries arrive as composite arrays in one statement, which is its own transaction. No
-- temporary table (no catalog writes), one round trip with a prepared statement. It answers
-- with what it inserted and which server committed it.
--
-- The function runs with the caller's rights (SECURITY INVOKER): the agent's role, its
-- privileges and row-level security apply inside, agency by agency, as before.
--
-- The types and the function carry a version: a rolling upgrade keeps older agents working
-- while newer ones call a newer function.

CREATE TYPE flux.event_v1 AS (
    agency_id text, event_id uuid, run_id text, kind text, step text,
    occurred_at timestamptz, received_at timestamptz, provider text, model text,
    payload jsonb, payload_sha256 text, correlation_id text, agent_id text,
    trace_id text, span_id text, expires_at timestamptz
);

CREATE TYPE flux.checkpoint_v1 AS (
    agency_id text, run_id text, version integer, step text, state json,
    checkpoint_hash text, provider text, model text, status text,
    saved_at timestamptz, expires_at timestamptz, event_id uuid, correlation_id text
);

CREATE TYPE flux.audit_v1 AS (
    agency_id text, at timestamptz, actor text, action text, target text, success boolean,
    before_state jsonb, after_state jsonb, correlation_id text, source text, detail jsonb,
    entry_id uuid
);

CREATE FUNCTION flux.write_v1(
    p_events flux.event_v1[],
    p_checkpoints flux.checkpoint_v1[],
    p_audits flux.audit_v1[],
    p_returning boolean
) RETURNS TABLE (inserted bigint, new_ids uuid[], system_identifier text, timeline text)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_agency text;
    v_count bigint;
    v_total bigint := 0;
    v_ids uuid[] := '{}';
    v_got uuid[];
    v_cp flux.checkpoint_v1;
    v_stored text;
BEGIN
    -- The spool forgets what PostgreSQL said it committed, so a commit must survive a crash
    -- of PostgreSQL: a server (or role) running synchronous_commit=off answers COMMIT before
    -- the commit record is on disk. Raise it to `on` for this transaction only; a stricter
    -- setting (remote_write, remote_apply) is kept.
    IF current_setting('synchronous_commit') = 'off' THEN
        PERFORM set_config('synchronous_commit', 'on', true);
    END IF;

    FOR v_agency IN SELECT DISTINCT e.agency_id FROM unnest(p_events) AS e LOOP
        PERFORM set_config('flux.current_agency_id', v_agency, true);
        IF p_returning THEN
            WITH ins AS (
                INSERT INTO flux.events (agency_id, event_id, run_id, kind, step, occurred_at,
                    received_at, provider, model, payload, payload_sha256, correlation_id,
                    agent_id, trace_id, span_id, expires_at)
                SELECT e.agency_id, e.event_id, e.run_id, e.kind, e.step, e.occurred_at,
                    e.received_at, e.provider, e.model, e.payload, e.payload_sha256,
                    e.correlation_id, e.agent_id, e.trace_id, e.span_id, e.expires_at
                  FROM unnest(p_events) AS e WHERE e.agency_id = v_agency
                ON CONFLICT DO NOTHING
                RETURNING event_id)
            SELECT array_agg(event_id) INTO v_got FROM ins;
            v_ids := v_ids || coalesce(v_got, '{}');
            v_total := v_total + coalesce(cardinality(v_got), 0);
        ELSE
            INSERT INTO flux.events (agency_id, event_id, run_id, kind, step, occurred_at,
                received_at, provider, model, payload, payload_sha256, correlation_id,
                agent_id, trace_id, span_id, expires_at)
            SELECT e.agency_id, e.event_id, e.run_id, e.kind, e.step, e.occurred_at,
                e.received_at, e.provider, e.model, e.payload, e.payload_sha256,
                e.correlation_id, e.agent_id, e.trace_id, e.span_id, e.expires_at
              FROM unnest(p_events) AS e WHERE e.agency_id = v_agency
            ON CONFLICT DO NOTHING;
            GET DIAGNOSTICS v_count = ROW_COUNT;
            v_total := v_total + v_count;
        END IF;
    END LOOP;

    -- Checkpoints: history is append-only and idempotent; a version already stored with
    -- other content is a conflict of the data (23505), isolated as a dead letter.
    FOREACH v_cp IN ARRAY coalesce(p_checkpoints, '{}') LOOP
        PERFORM set_config('flux.current_agency_id', v_cp.agency_id, true);
        INSERT INTO flux.checkpoint_history (agency_id, run_id, version, step, state,
            checkpoint_hash, provider, model, status, saved_at, expires_at, event_id,
            correlation_id)
        VALUES (v_cp.agency_id, v_cp.run_id, v_cp.version, v_cp.step, v_cp.state,
            v_cp.checkpoint_hash, v_cp.provider, v_cp.model, v_cp.status, v_cp.saved_at,
            v_cp.expires_at, v_cp.event_id, v_cp.correlation_id)
        ON CONFLICT (agency_id, run_id, version) DO NOTHING;
        SELECT h.checkpoint_hash INTO v_stored FROM flux.checkpoint_history AS h
         WHERE h.agency_id = v_cp.agency_id AND h.run_id = v_cp.run_id
           AND h.version = v_cp.version;
        IF v_stored IS DISTINCT FROM v_cp.checkpoint_hash THEN
            RAISE EXCEPTION USING ERRCODE = 'unique_violation',
                MESSAGE = format('checkpoint version %s of run %s already exists with other '
                                 'content', v_cp.version, v_cp.run_id);
        END IF;
        INSERT INTO flux.checkpoints AS c (agency_id, run_id, version, step, state,
            checkpoint_hash, provider, model, status, saved_at, expires_at, event_id,
            correlation_id)
        VALUES (v_cp.agency_id, v_cp.run_id, v_cp.version, v_cp.step, v_cp.state,
            v_cp.checkpoint_hash, v_cp.provider, v_cp.model, v_cp.status, v_cp.saved_at,
            v_cp.expires_at, v_cp.event_id, v_cp.correlation_id)
        ON CONFLICT (agency_id, run_id) DO UPDATE SET
            version = EXCLUDED.version, step = EXCLUDED.step, state = EXCLUDED.state,
            checkpoint_hash = EXCLUDED.checkpoint_hash, provider = EXCLUDED.provider,
            model = EXCLUDED.model, status = EXCLUDED.status, saved_at = EXCLUDED.saved_at,
            expires_at = EXCLUDED.expires_at, event_id = EXCLUDED.event_id,
            correlation_id = EXCLUDED.correlation_id
        WHERE c.version < EXCLUDED.version;
    END LOOP;

    FOR v_agency IN SELECT DISTINCT a.agency_id FROM unnest(p_audits) AS a LOOP
        PERFORM set_config('flux.current_agency_id', v_agency, true);
        INSERT INTO flux.audit_log (agency_id, at, actor, action, target, success,
            before_state, after_state, correlation_id, source, detail, entry_id)
        SELECT a.agency_id, a.at, a.actor, a.action, a.target, a.success, a.before_state,
            a.after_state, a.correlation_id, a.source, a.detail, a.entry_id
          FROM unnest(p_audits) AS a WHERE a.agency_id = v_agency
        ON CONFLICT DO NOTHING;
    END LOOP;

    -- Which server committed this: its system identifier and timeline. A change tells the
    -- agent it now writes to another primary (a promotion, a restore), which may lack what
    -- the old one committed; it then replays its recent window. Read in the same statement,
    -- so it names the server that ran it, also behind PgBouncer.
    RETURN QUERY SELECT v_total, v_ids, (SELECT c.system_identifier::text
                                          FROM pg_control_system() AS c),
                        substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8);
END
$$;
REVOKE ALL ON FUNCTION flux.write_v1(flux.event_v1[], flux.checkpoint_v1[], flux.audit_v1[],
    boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION flux.write_v1(flux.event_v1[], flux.checkpoint_v1[],
    flux.audit_v1[], boolean) TO flux_agent;
GRANT USAGE ON TYPE flux.event_v1, flux.checkpoint_v1, flux.audit_v1 TO flux_agent;
