-- flux-agent schema, version 7: flux.events partitioned by time, retention by dropping
-- partitions, exactly once per (agency_id, event_id) kept.
--
-- Layout (README, "Retention and partitioning", has the why):
--
--   flux.events                  PARTITION BY RANGE (flux.event_id_time(event_id))
--     flux.events_unkeyed        FROM (MINVALUE) TO (<cutoff>): the table as it was before
--                                this migration (attached in place, not copied), and from now
--                                on every id without a time (not UUIDv7). Purged row by row.
--     flux.events_<time>         one time range, PARTITION BY LIST (agency_id)
--       flux.events_<time>_<agency>   one agency's rows of that range: dropped as a whole
--                                     once every row in it has expired
--       flux.events_<time>_default    agencies without a partition of their own
--     flux.events_default        DEFAULT: ids whose time has no range (a clock far ahead,
--                                or behind past the oldest range). Purged row by row; rows
--                                move into a range when one is created for their time.
--
-- No unique index on the parent: PostgreSQL cannot have one on a table partitioned by an
-- expression. Every partition has its own primary key (agency_id, event_id) instead, and
-- since the partition of a row is a function of its event id (and agency), two rows with the
-- same (agency_id, event_id) always meet in the same partition: INSERT ... ON CONFLICT DO
-- NOTHING (flux.write_v1, unchanged) finds the conflict there. The maintenance functions
-- keep that invariant when they move rows: a row always lives in the one partition that its
-- key is routed to at that moment.
--
-- The agent's role has no DDL rights: partitions are created and dropped by the SECURITY
-- DEFINER functions below, owned by the schema owner, called by one agent at a time under
-- the retention lease. Each call does one step in one short transaction with a lock timeout.
-- Row-level security is forced on the parent and on every partition; the schema owner (whose
-- rows these functions move and check) sees rows only through the events_maintenance policy,
-- which applies to it alone and only while flux.maintenance is on inside these functions.

-- ------------------------------------------------------------------ helpers (not granted)

-- Row-level security, policies and grants of a new partition: those of flux.events.
CREATE FUNCTION flux._secure_event_partition(p_rel regclass) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', p_rel);
    EXECUTE format('ALTER TABLE %s FORCE ROW LEVEL SECURITY', p_rel);
    IF NOT EXISTS (SELECT 1 FROM pg_policy WHERE polrelid = p_rel
                    AND polname = 'events_by_agency') THEN
        EXECUTE format('CREATE POLICY events_by_agency ON %s '
                       'USING (agency_id = current_setting(''flux.current_agency_id'', true)) '
                       'WITH CHECK (agency_id = current_setting(''flux.current_agency_id'', '
                       'true))', p_rel);
    END IF;
    EXECUTE format('CREATE POLICY events_maintenance ON %s TO %I '
                   'USING (current_setting(''flux.maintenance'', true) = ''on'') '
                   'WITH CHECK (current_setting(''flux.maintenance'', true) = ''on'')',
                   p_rel, current_user);
    EXECUTE format('GRANT SELECT, INSERT ON %s TO flux_agent', p_rel);
END
$$;

-- Names: events_20261203 for a range starting at midnight (UTC), events_20261201_204917
-- otherwise; a leaf adds the agency (a slug, '-' as '_'), or a hashed form of anything else.
CREATE FUNCTION flux._event_range_name(p_lo timestamptz) RETURNS text
LANGUAGE sql IMMUTABLE
RETURN 'events_' || to_char(p_lo AT TIME ZONE 'UTC', 'YYYYMMDD')
    || CASE WHEN (p_lo AT TIME ZONE 'UTC')::time = '00:00' THEN ''
            ELSE to_char(p_lo AT TIME ZONE 'UTC', '_HH24MISS') END;

CREATE FUNCTION flux._event_leaf_tag(p_agency text) RETURNS text
LANGUAGE sql IMMUTABLE
RETURN CASE
    WHEN p_agency ~ '^[a-z0-9]+(-[a-z0-9]+)*$' AND length(p_agency) <= 32
         AND p_agency <> 'default'
    THEN replace(p_agency, '-', '_')
    ELSE left(regexp_replace(lower(p_agency), '[^a-z0-9]+', '_', 'g'), 20) || '_'
         || left(md5(p_agency), 8)
END;

-- The grid time ranges are cut on: multiples of the interval since the Unix epoch (UTC).
CREATE FUNCTION flux._grid_floor(p_t timestamptz, p_step double precision) RETURNS timestamptz
LANGUAGE sql IMMUTABLE
RETURN to_timestamp(floor(extract(epoch FROM p_t)::double precision / p_step) * p_step);

-- One agency's partition of a range. Built detached, filled with that agency's rows waiting
-- in the range's default partition, then attached: the rows never leave the partition their
-- key routes to (the ATTACH checks the default holds none of them any more).
CREATE FUNCTION flux._create_event_leaf(p_range regclass, p_agency text) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_range text := (SELECT relname FROM pg_class WHERE oid = p_range);
    v_leaf text := v_range || '_' || flux._event_leaf_tag(p_agency);
    v_moved bigint;
BEGIN
    EXECUTE format('CREATE TABLE flux.%I (LIKE flux.events INCLUDING DEFAULTS '
                   'INCLUDING CONSTRAINTS)', v_leaf);
    EXECUTE format('ALTER TABLE flux.%I ADD CONSTRAINT %I PRIMARY KEY (agency_id, event_id)',
                   v_leaf, v_leaf || '_pkey');
    PERFORM flux._secure_event_partition(format('flux.%I', v_leaf)::regclass);
    EXECUTE format('WITH moved AS (DELETE FROM flux.%I WHERE agency_id = $1 RETURNING *) '
                   'INSERT INTO flux.%I SELECT * FROM moved', v_range || '_default', v_leaf)
        USING p_agency;
    GET DIAGNOSTICS v_moved = ROW_COUNT;
    EXECUTE format('ALTER TABLE %s ATTACH PARTITION flux.%I FOR VALUES IN (%L)',
                   p_range, v_leaf, p_agency);
    RETURN v_moved;
END
$$;

-- One time range with its default partition and one partition per agency. Built detached,
-- filled with the rows of its time waiting in flux.events_default, then attached.
CREATE FUNCTION flux._create_event_range(p_lo timestamptz, p_hi timestamptz,
                                         p_agencies text[]) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_name text := flux._event_range_name(p_lo);
    v_range regclass;
    v_agency text;
    v_moved bigint;
BEGIN
    EXECUTE format('CREATE TABLE flux.%I (LIKE flux.events INCLUDING DEFAULTS '
                   'INCLUDING CONSTRAINTS) PARTITION BY LIST (agency_id)', v_name);
    v_range := format('flux.%I', v_name)::regclass;
    PERFORM flux._secure_event_partition(v_range);
    EXECUTE format('CREATE TABLE flux.%I PARTITION OF %s DEFAULT', v_name || '_default',
                   v_range);
    EXECUTE format('ALTER TABLE flux.%I ADD CONSTRAINT %I PRIMARY KEY (agency_id, event_id)',
                   v_name || '_default', v_name || '_default_pkey');
    PERFORM flux._secure_event_partition(format('flux.%I', v_name || '_default')::regclass);
    FOR v_agency IN SELECT DISTINCT a FROM unnest(p_agencies) AS a WHERE a IS NOT NULL
                    ORDER BY a LOOP
        PERFORM flux._create_event_leaf(v_range, v_agency);
    END LOOP;
    EXECUTE format('WITH moved AS (DELETE FROM flux.events_default '
                   'WHERE flux.event_id_time(event_id) >= $1 '
                   'AND flux.event_id_time(event_id) < $2 RETURNING *) '
                   'INSERT INTO %s SELECT * FROM moved', v_range) USING p_lo, p_hi;
    GET DIAGNOSTICS v_moved = ROW_COUNT;
    EXECUTE format('ALTER TABLE flux.events ATTACH PARTITION %s FOR VALUES FROM (%L) TO (%L)',
                   v_range, p_lo, p_hi);
    RETURN v_moved;
END
$$;

-- Whether every row of a leaf partition has expired, from its BRIN summary of expires_at:
-- summarised first (so the check never reads the heap of an expired partition), then asked.
CREATE FUNCTION flux._event_partition_expired(p_leaf regclass) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_index regclass;
    v_live boolean;
BEGIN
    FOR v_index IN SELECT i.indexrelid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                     JOIN pg_am am ON am.oid = c.relam
                    WHERE i.indrelid = p_leaf AND am.amname = 'brin' LOOP
        PERFORM brin_summarize_new_values(v_index);
    END LOOP;
    EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s WHERE expires_at >= now())', p_leaf)
        INTO v_live;
    RETURN NOT v_live;
END
$$;

REVOKE ALL ON FUNCTION flux._secure_event_partition(regclass),
    flux._create_event_leaf(regclass, text),
    flux._create_event_range(timestamptz, timestamptz, text[]),
    flux._event_partition_expired(regclass) FROM PUBLIC;

-- ------------------------------------------------------------------ the partitioned table

-- The old table becomes the first partition, in place: renamed, never copied. The owner must
-- see all of its rows to move the few that belong elsewhere, so FORCE is lifted for this
-- transaction (as in 004) and restored below.
ALTER TABLE flux.events NO FORCE ROW LEVEL SECURITY;
ALTER TABLE flux.events RENAME TO events_unkeyed;
ALTER INDEX flux.events_pkey RENAME TO events_unkeyed_pkey;
ALTER INDEX flux.events_run_idx RENAME TO events_unkeyed_run_idx;
ALTER INDEX flux.events_expires_brin RENAME TO events_unkeyed_expires_brin;

-- The same columns, and the same constraint names (ATTACH matches constraints by name).
CREATE TABLE flux.events (LIKE flux.events_unkeyed INCLUDING DEFAULTS INCLUDING CONSTRAINTS)
    PARTITION BY RANGE (flux.event_id_time(event_id));
-- The huge-table procedure's constraint (below) belongs to the old table alone.
ALTER TABLE flux.events DROP CONSTRAINT IF EXISTS events_partition_cutoff;

-- Partitioned indexes: ATTACH adopts the old table's equal indexes instead of building them.
CREATE INDEX events_run_idx ON flux.events (agency_id, run_id, occurred_at, event_id);
CREATE INDEX events_expires_brin ON flux.events USING brin (expires_at);

ALTER TABLE flux.events ENABLE ROW LEVEL SECURITY;
ALTER TABLE flux.events FORCE ROW LEVEL SECURITY;
CREATE POLICY events_by_agency ON flux.events
    USING (agency_id = current_setting('flux.current_agency_id', true))
    WITH CHECK (agency_id = current_setting('flux.current_agency_id', true));
DO $$
BEGIN
    EXECUTE format('CREATE POLICY events_maintenance ON flux.events TO %I '
                   'USING (current_setting(''flux.maintenance'', true) = ''on'') '
                   'WITH CHECK (current_setting(''flux.maintenance'', true) = ''on'')',
                   current_user);
END
$$;
GRANT SELECT, INSERT ON flux.events TO flux_agent;

CREATE TABLE flux.events_default PARTITION OF flux.events DEFAULT;
ALTER TABLE flux.events_default ADD CONSTRAINT events_default_pkey
    PRIMARY KEY (agency_id, event_id);
SELECT flux._secure_event_partition('flux.events_default');

-- The cutoff between the old table and the time ranges. Normally now: rows of the old table
-- whose id carries a later time (clocks ahead) move to the default partition, from where the
-- first ranges take them (a scan of the old table), and the ATTACH verifies the rest (a
-- second scan). Both are reads, no rewrite; README gives the figures. An operator of a huge
-- table may have validated, online, a constraint
--   events_partition_cutoff CHECK (flux.event_id_time(event_id) IS NOT NULL
--                                  AND flux.event_id_time(event_id) < '<T>')
-- on the old table: then T is the cutoff, nothing can need moving, the ATTACH is proved by
-- the constraint, and neither scan happens.
DO $$
DECLARE
    v_cutoff timestamptz := date_trunc('second', now());  -- never after an id minted since
    v_def text;
    v_validated boolean;
    v_agencies text[];
    v_lo timestamptz;
    v_hi timestamptz;
BEGIN
    PERFORM set_config('flux.maintenance', 'on', true);
    SELECT pg_get_constraintdef(oid), convalidated INTO v_def, v_validated
      FROM pg_constraint
     WHERE conrelid = 'flux.events_unkeyed'::regclass AND conname = 'events_partition_cutoff';
    IF v_def IS NOT NULL AND v_validated THEN
        v_cutoff := (regexp_match(v_def, '< ''([^'']+)''::timestamp with time zone'))[1]
            ::timestamptz;
    ELSE
        WITH moved AS (DELETE FROM flux.events_unkeyed
                        WHERE flux.event_id_time(event_id) >= v_cutoff RETURNING *)
        INSERT INTO flux.events_default SELECT * FROM moved;
    END IF;
    EXECUTE format('ALTER TABLE flux.events ATTACH PARTITION flux.events_unkeyed '
                   'FOR VALUES FROM (MINVALUE) TO (%L)', v_cutoff);
    IF v_def IS NOT NULL THEN
        ALTER TABLE flux.events_unkeyed DROP CONSTRAINT events_partition_cutoff;
    END IF;

    -- The agencies already stored get partitions of their own from the first range on
    -- (a loose scan of the primary key: one probe per agency).
    WITH RECURSIVE a(agency) AS (
        SELECT min(agency_id) FROM flux.events_unkeyed
        UNION ALL
        SELECT (SELECT min(agency_id) FROM flux.events_unkeyed WHERE agency_id > a.agency)
          FROM a WHERE a.agency IS NOT NULL)
    SELECT coalesce(array_agg(agency), '{}') INTO v_agencies FROM a WHERE agency IS NOT NULL;

    -- Ranges of one day (the agent's default FLUX_AGENT_PARTITION_INTERVAL) from the cutoff
    -- to two days ahead; the agent's maintenance continues from there with its own settings.
    v_lo := v_cutoff;
    WHILE v_lo < now() + interval '2 days' LOOP
        v_hi := flux._grid_floor(v_lo, 86400) + interval '1 day';
        PERFORM flux._create_event_range(v_lo, v_hi, v_agencies);
        v_lo := v_hi;
    END LOOP;
END
$$;

ALTER TABLE flux.events_unkeyed FORCE ROW LEVEL SECURITY;
DO $$
BEGIN
    EXECUTE format('CREATE POLICY events_maintenance ON flux.events_unkeyed TO %I '
                   'USING (current_setting(''flux.maintenance'', true) = ''on'') '
                   'WITH CHECK (current_setting(''flux.maintenance'', true) = ''on'')',
                   current_user);
END
$$;

-- ------------------------------------------------------------------ what exists

-- Every partition of flux.events with its kind, agency and time bounds. For operators too:
--   SELECT * FROM flux.event_partitions ORDER BY from_time, kind;
CREATE VIEW flux.event_partitions AS
WITH top AS (
    SELECT c.oid, c.relkind, pg_get_expr(c.relpartbound, c.oid) AS bound
      FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
     WHERE i.inhparent = 'flux.events'::regclass
), bounds AS (
    SELECT t.oid, t.relkind, t.bound,
           regexp_match(t.bound, '^FOR VALUES FROM \((.+?)\) TO \((.+)\)$') AS b
      FROM top t
), ranges AS (
    SELECT oid, relkind, bound,
           CASE WHEN b IS NULL THEN NULL WHEN b[1] = 'MINVALUE' THEN '-infinity'::timestamptz
                ELSE btrim(b[1], '''')::timestamptz END AS lo,
           CASE WHEN b IS NULL THEN NULL WHEN b[2] = 'MAXVALUE' THEN 'infinity'::timestamptz
                ELSE btrim(b[2], '''')::timestamptz END AS hi
      FROM bounds
)
SELECT r.oid::regclass AS partition, 'flux.events'::regclass AS parent,
       CASE WHEN r.bound = 'DEFAULT' THEN 'default'
            WHEN r.relkind = 'p' THEN 'range'
            WHEN r.lo = '-infinity' THEN 'unkeyed'
            ELSE 'other' END AS kind,
       NULL::text AS agency_id, r.lo AS from_time, r.hi AS to_time
  FROM ranges r
UNION ALL
SELECT c.oid::regclass, r.oid::regclass,
       CASE WHEN lb.bound = 'DEFAULT' THEN 'others' ELSE 'agency' END,
       replace((regexp_match(lb.bound, '^FOR VALUES IN \(''(.*)''\)$'))[1], '''''', ''''),
       r.lo, r.hi
  FROM ranges r
  JOIN pg_inherits i ON i.inhparent = r.oid
  JOIN pg_class c ON c.oid = i.inhrelid
  CROSS JOIN LATERAL (SELECT pg_get_expr(c.relpartbound, c.oid) AS bound) AS lb
 WHERE r.relkind = 'p';

GRANT SELECT ON flux.event_partitions TO flux_agent;

-- ------------------------------------------------------------------ maintenance (granted)

-- One step of creating partitions ahead: the next time range up to now + p_premake, or else
-- a missing agency partition in a range that has not started. Returns the partition created
-- and the rows it took over, or no row when there is nothing to do. The agent calls it until
-- it returns nothing. Ranges are cut on a grid of p_interval seconds (whole hours) since the
-- epoch; after a gap (maintenance stopped for longer than the premake) it starts again at the
-- range holding now, and the gap's rows stay in flux.events_default.
CREATE FUNCTION flux.prepare_event_partitions(p_agencies text[], p_interval double precision,
                                              p_premake double precision,
                                              p_lock_timeout double precision)
RETURNS TABLE (created text, moved bigint)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET TimeZone = 'UTC' SET DateStyle = 'ISO, YMD' AS $$
DECLARE
    v_hi timestamptz;
    v_lo timestamptz;
    v_target regclass;
    v_agency text;
    v_moved bigint;
BEGIN
    IF p_interval IS NULL OR p_interval < 3600 OR p_interval > 366 * 86400
       OR p_interval <> round(p_interval / 3600) * 3600 THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('partition interval %s s: whole hours, 1 h to 366 days', p_interval);
    END IF;
    IF p_premake IS NULL OR p_premake < 0 OR p_premake > 366 * 86400 THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('partition premake %s s: 0 to 366 days', p_premake);
    END IF;
    PERFORM set_config('lock_timeout', (greatest(p_lock_timeout, 0.001) * 1000)::bigint || 'ms',
                       true);
    PERFORM set_config('flux.maintenance', 'on', true);
    FOR pass IN 1..2 LOOP
        -- Pass 1 looks without a lock; pass 2 takes the lock that keeps every writer out
        -- while partitions change, and looks again (another maintainer may have been first).
        IF pass = 2 THEN
            LOCK TABLE ONLY flux.events IN SHARE ROW EXCLUSIVE MODE;
        END IF;
        SELECT max(to_time) INTO v_hi FROM flux.event_partitions
         WHERE kind IN ('unkeyed', 'range');
        v_lo := greatest(v_hi, flux._grid_floor(now(), p_interval));
        IF v_lo < now() + make_interval(secs => p_premake) THEN
            IF pass = 2 THEN
                v_moved := flux._create_event_range(
                    v_lo, flux._grid_floor(v_lo, p_interval) + make_interval(secs => p_interval),
                    p_agencies);
                RETURN QUERY SELECT 'flux.' || quote_ident(flux._event_range_name(v_lo)),
                    v_moved;
                RETURN;
            END IF;
            CONTINUE;
        END IF;
        -- Else the first range that has not started and lacks a partition of an agency.
        WITH p AS MATERIALIZED (SELECT * FROM flux.event_partitions)
        SELECT r.partition, a INTO v_target, v_agency
          FROM p AS r CROSS JOIN unnest(p_agencies) AS a
         WHERE r.kind = 'range' AND r.from_time > now() AND a IS NOT NULL
           AND NOT EXISTS (SELECT 1 FROM p AS l WHERE l.parent = r.partition
                                                   AND l.agency_id = a)
         ORDER BY r.from_time, a LIMIT 1;
        IF v_agency IS NOT NULL AND pass = 2 THEN
            v_moved := flux._create_event_leaf(v_target, v_agency);
            RETURN QUERY SELECT v_target::text || '_' || flux._event_leaf_tag(v_agency), v_moved;
            RETURN;
        END IF;
        IF pass = 1 AND v_agency IS NULL THEN
            RETURN;  -- nothing to do: no lock taken
        END IF;
    END LOOP;
END
$$;

-- One step of retention by partition: drops the oldest agency partition (or whole range)
-- whose every row has expired, and returns it, or no row when none can go. Safety does not
-- depend on the arguments: a partition is dropped only when no row in it has
-- expires_at >= now(), checked under a lock that keeps writers out. The arguments (the
-- manifest's agencies and retention days; others get the longest) only say when to look, so
-- that a partition is checked once its rows are due, not at every round.
CREATE FUNCTION flux.drop_expired_event_partition(p_agencies text[], p_retention_days integer[],
                                                  p_lock_timeout double precision)
RETURNS TABLE (dropped text, level text)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET TimeZone = 'UTC' SET DateStyle = 'ISO, YMD' AS $$
DECLARE
    v_longest integer := coalesce((SELECT max(d) FROM unnest(p_retention_days) AS d), 1);
    v_range record;
    v_days integer;
    v_all boolean;
    v_drop regclass;
    v_level text;
BEGIN
    IF cardinality(p_agencies) IS DISTINCT FROM cardinality(p_retention_days) THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = 'one retention (days) per agency';
    END IF;
    PERFORM set_config('lock_timeout', (greatest(p_lock_timeout, 0.001) * 1000)::bigint || 'ms',
                       true);
    PERFORM set_config('flux.maintenance', 'on', true);
    -- The expiry checks read BRIN summaries; never a sequential scan of a partition.
    PERFORM set_config('enable_seqscan', 'off', true);
    -- The past ranges with their partitions, read once (the view reads every bound).
    FOR v_range IN
        WITH p AS MATERIALIZED (SELECT * FROM flux.event_partitions)
        SELECT r.partition, r.to_time,
               array_agg(l.partition ORDER BY l.agency_id) AS leaves,
               array_agg(l.kind ORDER BY l.agency_id) AS kinds,
               array_agg(l.agency_id ORDER BY l.agency_id) AS agencies
          FROM p AS r JOIN p AS l ON l.parent = r.partition
         WHERE r.kind = 'range' AND r.to_time <= now()
         GROUP BY r.partition, r.from_time, r.to_time
         ORDER BY r.from_time
    LOOP
        v_all := true;
        v_drop := NULL;
        FOR i IN 1..cardinality(v_range.leaves) LOOP
            v_days := coalesce(p_retention_days[array_position(p_agencies,
                                                               v_range.agencies[i])],
                               v_longest);
            IF v_range.to_time + make_interval(days => greatest(v_days, 1)) > now() THEN
                v_all := false;  -- not due yet: not even looked at
            ELSIF NOT flux._event_partition_expired(v_range.leaves[i]) THEN
                v_all := false;
            ELSIF v_range.kinds[i] = 'agency' AND v_drop IS NULL THEN
                v_drop := v_range.leaves[i];
            END IF;
            EXIT WHEN v_drop IS NOT NULL AND NOT v_all;  -- decided: this one goes alone
        END LOOP;
        IF v_all THEN
            v_drop := v_range.partition;  -- the whole range, its default partition with it
        END IF;
        CONTINUE WHEN v_drop IS NULL;
        -- Writers out, then look again: a late event may have landed since.
        LOCK TABLE ONLY flux.events IN SHARE ROW EXCLUSIVE MODE;
        EXECUTE format('LOCK TABLE %s IN ACCESS EXCLUSIVE MODE', v_drop);
        IF v_drop = v_range.partition THEN
            v_level := 'range';
            FOR i IN 1..cardinality(v_range.leaves) LOOP
                IF NOT flux._event_partition_expired(v_range.leaves[i]) THEN
                    RETURN;  -- not now; the next round looks again
                END IF;
            END LOOP;
        ELSE
            v_level := 'agency';
            IF NOT flux._event_partition_expired(v_drop) THEN
                RETURN;
            END IF;
        END IF;
        EXECUTE format('DROP TABLE %s', v_drop);
        RETURN QUERY SELECT v_drop::text, v_level;
        RETURN;
    END LOOP;
END
$$;

-- What the agent reports as metrics: time ranges, leaf partitions, how far ahead the newest
-- range reaches, and the rows outside the time ranges (kept, purged row by row): in the
-- default partition (counted, up to a million) and in the unkeyed one (estimated).
CREATE FUNCTION flux.event_partition_stats()
RETURNS TABLE (ranges integer, leaves integer, newest timestamptz, default_rows bigint,
               unkeyed_rows bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM set_config('flux.maintenance', 'on', true);
    RETURN QUERY SELECT
        (SELECT count(*)::integer FROM flux.event_partitions p WHERE p.kind = 'range'),
        (SELECT count(*)::integer FROM flux.event_partitions p
          WHERE p.kind IN ('agency', 'others')),
        (SELECT max(p.to_time) FROM flux.event_partitions p WHERE p.kind = 'range'),
        (SELECT count(*) FROM (SELECT 1 FROM flux.events_default LIMIT 1000000) AS d),
        (SELECT greatest(c.reltuples, 0)::bigint FROM pg_class c
          WHERE c.oid = 'flux.events_unkeyed'::regclass);
END
$$;

REVOKE ALL ON FUNCTION flux.prepare_event_partitions(text[], double precision,
    double precision, double precision), flux.drop_expired_event_partition(text[], integer[],
    double precision), flux.event_partition_stats() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION flux.prepare_event_partitions(text[], double precision,
    double precision, double precision), flux.drop_expired_event_partition(text[], integer[],
    double precision), flux.event_partition_stats() TO flux_agent;

-- ------------------------------------------------------------------ row-by-row retention

-- Same signature as 003 (agents of the previous version call it during a rolling upgrade).
-- Events in time ranges leave with their partition; this deletes only in the two partitions
-- outside them. ctid is per table: each DELETE names its partition (on the parent, one ctid
-- would match a row in every partition).
CREATE OR REPLACE FUNCTION flux.purge_expired(p_agency text, p_batch integer)
RETURNS TABLE (events bigint, checkpoint_history bigint, checkpoints bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n_unkeyed bigint;
    n_default bigint;
    n_history bigint;
    n_latest bigint;
BEGIN
    PERFORM set_config('flux.current_agency_id', p_agency, true);
    DELETE FROM flux.events_unkeyed WHERE ctid = ANY (ARRAY(
        SELECT ctid FROM flux.events_unkeyed
        WHERE agency_id = p_agency AND expires_at < now() LIMIT p_batch));
    GET DIAGNOSTICS n_unkeyed = ROW_COUNT;
    DELETE FROM flux.events_default WHERE ctid = ANY (ARRAY(
        SELECT ctid FROM flux.events_default
        WHERE agency_id = p_agency AND expires_at < now() LIMIT p_batch - n_unkeyed));
    GET DIAGNOSTICS n_default = ROW_COUNT;
    DELETE FROM flux.checkpoint_history WHERE ctid = ANY (ARRAY(
        SELECT ctid FROM flux.checkpoint_history
        WHERE agency_id = p_agency AND expires_at < now() LIMIT p_batch));
    GET DIAGNOSTICS n_history = ROW_COUNT;
    DELETE FROM flux.checkpoints WHERE ctid = ANY (ARRAY(
        SELECT ctid FROM flux.checkpoints
        WHERE agency_id = p_agency AND expires_at < now() LIMIT p_batch));
    GET DIAGNOSTICS n_latest = ROW_COUNT;
    RETURN QUERY SELECT n_unkeyed + n_default, n_history, n_latest;
END
$$;

-- Dead letters: the only copy of what PostgreSQL refused, kept p_keep_seconds after they were
-- stored (the agent passes its setting, by default the agency's event retention; never less
-- than a day), then deleted in small batches like other expired rows.
CREATE FUNCTION flux.purge_dead_letters(p_agency text, p_keep_seconds double precision,
                                        p_batch integer) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n bigint;
BEGIN
    PERFORM set_config('flux.current_agency_id', p_agency, true);
    DELETE FROM flux.dead_letters WHERE ctid = ANY (ARRAY(
        SELECT ctid FROM flux.dead_letters
        WHERE agency_id = p_agency
          AND dead_at < now() - make_interval(secs => greatest(p_keep_seconds, 86400))
        LIMIT p_batch));
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;
REVOKE ALL ON FUNCTION flux.purge_dead_letters(text, double precision, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION flux.purge_dead_letters(text, double precision, integer)
    TO flux_agent;

-- The audit trail's retention is a compliance decision, held in the database where the
-- audited party cannot change it: the agent only triggers the purge, and the keep period is
-- this table's (NULL: kept forever, the default). The schema owner sets it, e.g.
--   UPDATE flux.retention_policies SET keep = interval '3 years' WHERE name = 'audit_log';
-- Entries are aged by recorded_at, the database's own clock, not by the agent's `at`.
CREATE TABLE flux.retention_policies (
    name    text        PRIMARY KEY,
    keep    interval    CHECK (keep IS NULL OR keep >= interval '1 day'),
    note    text        NOT NULL DEFAULT ''
);
INSERT INTO flux.retention_policies (name, keep, note) VALUES
    ('audit_log', NULL, 'flux.audit_log entries older than this (by recorded_at) are deleted; '
     'NULL keeps them forever');
GRANT SELECT ON flux.retention_policies TO flux_agent;

CREATE INDEX audit_log_recorded_brin ON flux.audit_log USING brin (recorded_at);
-- The owner reads and deletes audit entries only inside flux.purge_audit_log (the agent's
-- role still only inserts).
DO $$
BEGIN
    EXECUTE format('CREATE POLICY audit_log_retention_read ON flux.audit_log FOR SELECT TO %I '
                   'USING (current_setting(''flux.maintenance'', true) = ''audit'')',
                   current_user);
    EXECUTE format('CREATE POLICY audit_log_retention_delete ON flux.audit_log FOR DELETE '
                   'TO %I USING (current_setting(''flux.maintenance'', true) = ''audit'')',
                   current_user);
END
$$;

CREATE FUNCTION flux.purge_audit_log(p_batch integer) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_keep interval;
    n bigint;
BEGIN
    SELECT keep INTO v_keep FROM flux.retention_policies WHERE name = 'audit_log';
    IF v_keep IS NULL THEN
        RETURN 0;
    END IF;
    PERFORM set_config('flux.maintenance', 'audit', true);
    DELETE FROM flux.audit_log WHERE ctid = ANY (ARRAY(
        SELECT ctid FROM flux.audit_log WHERE recorded_at < now() - v_keep LIMIT p_batch));
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;
REVOKE ALL ON FUNCTION flux.purge_audit_log(integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION flux.purge_audit_log(integer) TO flux_agent;
