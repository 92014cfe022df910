"""PostgreSQL: connection pool, migrations, feature lookup, prediction log, background jobs."""
