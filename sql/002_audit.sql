-- flux-agent schema, version 2: the audit trail (FedRAMP AU-2, AU-12).
-- Append-only for the agent: INSERT, no SELECT, UPDATE or DELETE. Auditors read it with a
-- role of their own.

CREATE TABLE flux.audit_log (
    id              bigserial   PRIMARY KEY,
    at              timestamptz NOT NULL,
    agency_id       text        NOT NULL,   -- '-' when the caller could not be identified
    actor           text        NOT NULL,   -- the token's sub; 'local' without auth
    action          text        NOT NULL,   -- e.g. auth.failed, isolation.violation
    target          text,
    success         boolean     NOT NULL,
    before_state    jsonb,
    after_state     jsonb,
    correlation_id  text,
    source          text        NOT NULL,   -- tcp | socket | agent
    detail          jsonb       NOT NULL DEFAULT '{}'::jsonb,
    recorded_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX audit_log_agency_at_idx ON flux.audit_log (agency_id, at);
CREATE INDEX audit_log_action_idx ON flux.audit_log (action, at);

ALTER TABLE flux.audit_log ENABLE ROW LEVEL SECURITY;
ALTER TABLE flux.audit_log FORCE ROW LEVEL SECURITY;
CREATE POLICY audit_log_insert ON flux.audit_log FOR INSERT
    WITH CHECK (agency_id = current_setting('flux.current_agency_id', true));

GRANT INSERT ON flux.audit_log TO flux_agent;
GRANT USAGE ON SEQUENCE flux.audit_log_id_seq TO flux_agent;
