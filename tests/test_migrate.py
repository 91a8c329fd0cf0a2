"""Migrations: ordered, recorded, safe twice and from ten processes at once."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from flux_agent.postgres.migrations import MigrationError, migrate, migrations

from .support.postgres import PgServer, create_database, drop_database


async def test_ten_concurrent_migrates_apply_each_file_once(pg_template: PgServer):
    db = await create_database(pg_template, template="template0")
    try:
        dsn = db.admin_dsn

        def run() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "flux_agent", "migrate", "--database-url", dsn],
                capture_output=True, text=True, timeout=120)

        results = await asyncio.gather(*(asyncio.to_thread(run) for _ in range(10)))
        assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
        applied = [v for r in results for v in json.loads(r.stdout)["applied"]]
        expected = [m.version for m in migrations()]
        assert sorted(applied) == sorted(expected)  # each file applied by exactly one process
        rows = await db.fetch("SELECT version FROM flux.schema_migrations ORDER BY version")
        assert [r["version"] for r in rows] == expected
        again = run()
        assert again.returncode == 0
        assert json.loads(again.stdout)["applied"] == []
    finally:
        await drop_database(pg_template, db.name)


async def test_edited_migration_is_refused(pg_template: PgServer, tmp_path: Path):
    db = await create_database(pg_template, template="template0")
    sql_dir = tmp_path / "sql"
    shutil.copytree(Path(__file__).parent.parent / "sql", sql_dir)
    conn = await asyncpg.connect(db.admin_dsn)
    try:
        assert await migrate(conn, sql_dir)
        first = sorted(sql_dir.glob("*.sql"))[0]
        first.write_text(first.read_text() + "\n-- edited after release\n")
        with pytest.raises(MigrationError, match="changed after it was applied"):
            await migrate(conn, sql_dir)
    finally:
        await conn.close()
        await drop_database(pg_template, db.name)


async def test_migrate_without_database_url_exits_78():
    result = subprocess.run([sys.executable, "-m", "flux_agent", "migrate"],
                            capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 78
    assert "FLUX_AGENT_DATABASE_URL" in result.stderr
