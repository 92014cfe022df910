-- Claiming a job (db/jobs.py, _CLAIM) walks this index in claim order and stops at the first
-- free row(s). Before, the claim combined the queued and the lease indexes (a BitmapOr) and
-- sorted every candidate: 58 ms per claim, per worker and poll, with 200k jobs queued. Only
-- queued and running jobs are in it, so finished jobs kept for their TTL cost nothing.
CREATE INDEX podserve_jobs_claimable ON podserve_jobs (run_after, created_at)
    WHERE status IN ('queued', 'running');
