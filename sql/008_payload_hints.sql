-- flux-agent schema, version 8: what jsonb respells in a payload, so verification is exact.
--
-- Payloads are hashed as canonical JSON (Python's json.dumps form) and stored as jsonb, which
-- keeps values but not spellings. Re-canonicalising the jsonb text gives the hashed bytes back
-- with two exceptions: a float of 1e16 or more (canonical "2.5e+16") comes back as the
-- integer 25000000000000000, and -0.0 comes back as 0.0. payload_hint names those numbers,
-- as a JSON array of JSON pointers into the payload, so `flux-agent verify` (and the read
-- API) can re-derive the exact bytes; NULL when the payload has none (nearly always: no
-- bytes stored). The agent computes it from the canonical text it hashed.
--
-- Rows stored before this version, and rows written by agents that predate it (through
-- flux.write_v1, which does not name the column), read as the string "unrecorded": the
-- column's default, kept in the catalog (no table rewrite, also for every partition).
ALTER TABLE flux.events ADD COLUMN payload_hint jsonb DEFAULT '"unrecorded"'::jsonb;
COMMENT ON COLUMN flux.events.payload_hint IS
    'JSON pointers of the payload numbers jsonb respells (floats >= 1e16, -0.0); NULL: none; '
    '"unrecorded": written before the agent recorded them (schema version 8)';

-- write_v1 with the hints: p_payload_hints[i] belongs to p_events[i] (NULL as a whole when
-- no event of the call has one). Checkpoints and audit entries are written by write_v1
-- itself, in the same transaction.
CREATE FUNCTION flux.write_v2(
    p_events flux.event_v1[],
    p_payload_hints jsonb[],
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
    v_rest record;
BEGIN
    IF current_setting('synchronous_commit') = 'off' THEN
        PERFORM set_config('synchronous_commit', 'on', true);
    END IF;

    FOR v_agency IN SELECT DISTINCT e.agency_id FROM unnest(p_events) AS e LOOP
        PERFORM set_config('flux.current_agency_id', v_agency, true);
        IF p_returning THEN
            WITH ins AS (
                INSERT INTO flux.events (agency_id, event_id, run_id, kind, step, occurred_at,
                    received_at, provider, model, payload, payload_sha256, correlation_id,
                    agent_id, trace_id, span_id, expires_at, payload_hint)
                SELECT e.agency_id, e.event_id, e.run_id, e.kind, e.step, e.occurred_at,
                    e.received_at, e.provider, e.model, e.payload, e.payload_sha256,
                    e.correlation_id, e.agent_id, e.trace_id, e.span_id, e.expires_at,
                    p_payload_hints[e.ordinality]
                  FROM unnest(p_events) WITH ORDINALITY AS e WHERE e.agency_id = v_agency
                ON CONFLICT DO NOTHING
                RETURNING event_id)
            SELECT array_agg(event_id) INTO v_got FROM ins;
            v_ids := v_ids || coalesce(v_got, '{}');
            v_total := v_total + coalesce(cardinality(v_got), 0);
        ELSE
            INSERT INTO flux.events (agency_id, event_id, run_id, kind, step, occurred_at,
                received_at, provider, model, payload, payload_sha256, correlation_id,
                agent_id, trace_id, span_id, expires_at, payload_hint)
            SELECT e.agency_id, e.event_id, e.run_id, e.kind, e.step, e.occurred_at,
                e.received_at, e.provider, e.model, e.payload, e.payload_sha256,
                e.correlation_id, e.agent_id, e.trace_id, e.span_id, e.expires_at,
                p_payload_hints[e.ordinality]
              FROM unnest(p_events) WITH ORDINALITY AS e WHERE e.agency_id = v_agency
            ON CONFLICT DO NOTHING;
            GET DIAGNOSTICS v_count = ROW_COUNT;
            v_total := v_total + v_count;
        END IF;
    END LOOP;

    SELECT w.system_identifier, w.timeline INTO v_rest
      FROM flux.write_v1('{}', p_checkpoints, p_audits, false) AS w;
    RETURN QUERY SELECT v_total, v_ids, v_rest.system_identifier, v_rest.timeline;
END
$$;
REVOKE ALL ON FUNCTION flux.write_v2(flux.event_v1[], jsonb[], flux.checkpoint_v1[],
    flux.audit_v1[], boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION flux.write_v2(flux.event_v1[], jsonb[], flux.checkpoint_v1[],
    flux.audit_v1[], boolean) TO flux_agent;
