"""PostgreSQL: the pool (deadlines, health, identity), typed errors, the idempotent sink,
the read store, migrations, retention, and the embedded default database. The only
package that imports asyncpg."""
