-- flux-agent schema, version 4: exactly once for every table the agent writes.
--
-- Audit entries and dead letters travel through the spool like events, and a spool replay
-- (after a SIGKILL, a cut connection after COMMIT, a failover) writes them again. Each now
-- carries an id fixed when it was spooled, unique within its agency, and the agent inserts
-- them with ON CONFLICT DO NOTHING, as it does events.
--
-- Existing rows get ids in place. Row-level security is forced on these tables, so the
-- migration lifts FORCE for its own transaction (the table owner then sees every row) and
-- restores it before committing.

ALTER TABLE flux.audit_log NO FORCE ROW LEVEL SECURITY;
ALTER TABLE flux.audit_log ADD COLUMN entry_id uuid;
UPDATE flux.audit_log SET entry_id = gen_random_uuid() WHERE entry_id IS NULL;
ALTER TABLE flux.audit_log ALTER COLUMN entry_id SET NOT NULL;
ALTER TABLE flux.audit_log ADD CONSTRAINT audit_log_entry_key UNIQUE (agency_id, entry_id);
ALTER TABLE flux.audit_log FORCE ROW LEVEL SECURITY;

-- A dead letter's id is the id of what was refused: the event id for an event, the entry id
-- for an audit entry, and for a checkpoint md5('checkpoint/' || its event id) as a uuid (its
-- checkpoint.saved event may be refused too, and must not collide with it).
ALTER TABLE flux.dead_letters NO FORCE ROW LEVEL SECURITY;
ALTER TABLE flux.dead_letters ADD COLUMN item_id uuid;
-- Replays before this version may have stored the same refused event more than once: keep
-- the first copy of each.
DELETE FROM flux.dead_letters a USING flux.dead_letters b
 WHERE a.event_id IS NOT NULL AND a.agency_id = b.agency_id AND a.event_id = b.event_id
   AND a.kind IS NOT DISTINCT FROM b.kind AND a.id > b.id;
UPDATE flux.dead_letters
   SET item_id = CASE WHEN event_id IS NULL THEN gen_random_uuid()
                      WHEN kind = 'checkpoint' THEN md5('checkpoint/' || event_id::text)::uuid
                      ELSE event_id END
 WHERE item_id IS NULL;
ALTER TABLE flux.dead_letters ALTER COLUMN item_id SET NOT NULL;
ALTER TABLE flux.dead_letters ADD CONSTRAINT dead_letters_item_key UNIQUE (agency_id, item_id);
ALTER TABLE flux.dead_letters FORCE ROW LEVEL SECURITY;
