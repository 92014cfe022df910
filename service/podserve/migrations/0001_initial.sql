-- podserve schema v1: features, prediction log, background jobs.

-- Feature vectors, one row per (feature set, entity); real[] keeps them compact (4 B/value).
CREATE TABLE podserve_feature_sets (
    name        text PRIMARY KEY,
    columns     text[] NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE podserve_features (
    feature_set text NOT NULL,
    entity_id   text NOT NULL,
    "values"    real[] NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (feature_set, entity_id)
);

-- One row per answered prediction; request_id is unique, so re-sent batches are no-ops.
CREATE TABLE podserve_prediction_log (
    request_id        uuid PRIMARY KEY,
    client_request_id text,
    model             text NOT NULL,
    model_version     text NOT NULL,
    inputs            jsonb,
    inputs_digest     text,
    outputs           jsonb NOT NULL,
    timings_ms        jsonb NOT NULL,
    trace_id          text,
    logged_at         timestamptz NOT NULL
);
CREATE INDEX podserve_prediction_log_model_time ON podserve_prediction_log (model, logged_at);

-- Durable background inference: claimed with FOR UPDATE SKIP LOCKED, leased while running.
CREATE TABLE podserve_jobs (
    id               uuid PRIMARY KEY,
    model            text NOT NULL,
    model_version    text,
    body             bytea NOT NULL,
    json_length      integer,
    status           text NOT NULL DEFAULT 'queued'
                     CHECK (status IN ('queued', 'running', 'succeeded', 'failed')),
    attempts         integer NOT NULL DEFAULT 0,
    run_after        timestamptz NOT NULL DEFAULT now(),
    lease_owner      text,
    lease_expires_at timestamptz,
    result           bytea,
    error            text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    expires_at       timestamptz
);
CREATE INDEX podserve_jobs_queued ON podserve_jobs (run_after) WHERE status = 'queued';
CREATE INDEX podserve_jobs_leases ON podserve_jobs (lease_expires_at) WHERE status = 'running';
CREATE INDEX podserve_jobs_expiry ON podserve_jobs (expires_at) WHERE expires_at IS NOT NULL;
