"""Every file the agent skips, sets aside or removes in its state dir is named in one
WARNING line: nothing in the spool or beside it changes silently."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from flux_agent import Agent
from flux_agent.spool.format import segment_name
from flux_agent.testing import make_events

from .support.agents import agent_config
from .support.http import post
from .support.postgres import Database


def warnings_naming(caplog: pytest.LogCaptureFixture, path: Path) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
            and (getattr(r, "fields", None) or {}).get("path") == str(path)]


async def test_skipped_and_removed_files_each_get_one_warning(
        database: Database, state_dir: Path, caplog: pytest.LogCaptureFixture):
    config = agent_config(database, state_dir, spool_keep_committed=3600.0)
    async with Agent(config) as agent:  # a spool with segments of its own
        assert (await post(agent.endpoints.event_url + "/v1/events", make_events(3)))[0] == 202
    spool = state_dir / "spool"
    newest = max(int(p.name[:-4]) for p in spool.glob("*.seg"))
    empty = spool / segment_name(newest + 1000)  # a zero-length segment past the newest
    empty.touch()
    strays = [spool / "notes.txt", spool / "0042.seg.bak", spool / "junk.seg",
              state_dir / "stray.bin"]
    for stray in strays:
        stray.write_bytes(b"not the agent's")
    (spool / "a-dir").mkdir()
    strays.append(spool / "a-dir")

    caplog.clear()
    caplog.set_level(logging.INFO)
    async with Agent(config):
        pass
    assert not empty.exists()
    removed = warnings_naming(caplog, empty)
    assert len(removed) == 1 and "removed" in removed[0], removed
    for stray in strays:
        assert stray.exists(), f"{stray} is not the agent's to remove"
        said = warnings_naming(caplog, stray)
        assert len(said) == 1 and "ignored" in said[0], (stray, said)
    # The agent's own files are not among them.
    for own in ("agent.lock", "seen.idx", "spool", "cursor", "LOCK", "quarantine"):
        assert not any(own == Path(str((getattr(r, "fields", None) or {}).get("path"))).name
                       for r in caplog.records if r.levelno >= logging.WARNING), own
