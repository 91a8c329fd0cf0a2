-- flux-agent schema, version 6: the time partition key of flux.events, alone.
--
-- flux.events is partitioned (007) by flux.event_id_time(event_id): the 48-bit Unix
-- millisecond timestamp inside a UUIDv7 (RFC 9562: version 7, variant 10), and -infinity for
-- every other id (other UUID versions, a v7 with the wrong variant bits). The key is a
-- function of the event id alone: a replay of an event, by the spool after a crash, by a
-- failover, or by a client re-posting hours later, computes the same key, is routed to the
-- same partition and meets the stored row there. Uniqueness of (agency_id, event_id) inside
-- each partition is therefore uniqueness in the whole table, with no window.
--
-- This file holds the function alone so that an operator with a huge flux.events can apply
-- it ahead of the upgrade (it is idempotent: CREATE OR REPLACE of the same definition) and
-- validate, online, the constraint that lets 007 skip its scans; README, "Retention and
-- partitioning", gives the procedure.
--
-- NEVER change this function's definition: it decides where rows live. Its SQL-standard body
-- is parsed (names resolved) when it is created, and the planner inlines it, so routing a
-- row costs a fraction of a microsecond.

CREATE OR REPLACE FUNCTION flux.event_id_time(event_id uuid) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE
    WHEN (get_byte(uuid_send(event_id), 6) >> 4) = 7
     AND (get_byte(uuid_send(event_id), 8) >> 6) = 2
    THEN to_timestamp((('x' || encode(substring(uuid_send(event_id) FROM 1 FOR 6), 'hex'))
                       ::bit(48)::bigint)::double precision / 1000)
    ELSE '-infinity'::timestamptz
END;

COMMENT ON FUNCTION flux.event_id_time(uuid) IS
    'The partition key of flux.events: the time inside a UUIDv7, -infinity for other ids. '
    'Never change it.';
