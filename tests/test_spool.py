"""The spool on its own: durability, group commit, cursor, and recovery from real damage
(torn tails and flipped bits written into real files)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flux_agent import spool as spool_mod
from flux_agent.spool import HEADER, Spool, SpoolFull, list_segments

from .support.profiles import examples


def payload(i: int) -> bytes:
    return f"record-{i:05d}-".encode() + bytes([i % 251]) * (i % 97)


async def open_spool(directory: Path, **kw) -> tuple[Spool, dict[int, bytes]]:
    recovered: dict[int, bytes] = {}
    s = Spool(directory, max_bytes=kw.pop("max_bytes", 64 * 1024 * 1024),
              segment_bytes=kw.pop("segment_bytes", 4096), **kw)
    await s.open(on_record=lambda seq, data: recovered.__setitem__(seq, data))
    return s, recovered


async def write_records(directory: Path, count: int, **kw) -> dict[int, bytes]:
    s, _ = await open_spool(directory, **kw)
    written: dict[int, bytes] = {}
    for start in range(0, count, 5):  # groups of five: several commit groups per segment
        futures = []
        for i in range(start, min(count, start + 5)):
            data = payload(i)
            seq, fut = s.append(data)
            written[seq] = data
            futures.append(fut)
        await asyncio.gather(*futures)
    await s.close()
    return written


async def test_records_survive_reopen_in_order(tmp_path: Path):
    written = await write_records(tmp_path, 300)
    s, recovered = await open_spool(tmp_path)
    assert recovered == written
    assert s.next_seq == 301
    assert len(list_segments(tmp_path)) > 2  # rotation happened (4 KiB segments)
    records = await s.read(1, 10**9)
    assert [seq for seq, _ in records] == sorted(written)
    assert dict(records) == written
    await s.close()


async def test_group_commit_shares_fdatasync(tmp_path: Path):
    s, _ = await open_spool(tmp_path, segment_bytes=64 * 1024 * 1024)
    futures = [s.append(payload(i))[1] for i in range(500)]
    await asyncio.gather(*futures)
    assert s.durable_seq == 500
    assert 1 <= s.syncs < 50, s.syncs
    await s.close()


async def test_cursor_deletes_spent_segments_and_skips_committed(tmp_path: Path):
    written = await write_records(tmp_path, 200)
    s, _ = await open_spool(tmp_path)
    before = len(list_segments(tmp_path))
    await s.commit(150)
    after = len(list_segments(tmp_path))
    assert after < before
    await s.close()
    s, recovered = await open_spool(tmp_path)
    assert sorted(recovered) == [seq for seq in sorted(written) if seq > 150]
    assert s.next_seq == 201  # sequence numbers never go back
    await s.close()


async def test_full_spool_refuses_and_nothing_is_dropped(tmp_path: Path):
    s, _ = await open_spool(tmp_path, max_bytes=8192, segment_bytes=4096)
    accepted = 0
    refusal: SpoolFull | None = None
    for _ in range(1000):
        try:
            s.check_room(200)
        except SpoolFull as exc:
            refusal = exc
            break
        await s.append(b"x" * 200)[1]
        accepted += 1
    assert refusal is not None
    assert 30 <= accepted < 45
    assert refusal.status == 503
    assert refusal.headers["Retry-After"]
    assert refusal.code == "SPOOL_FULL"
    await s.close()
    s, recovered = await open_spool(tmp_path, max_bytes=8192, segment_bytes=4096)
    assert len(recovered) == accepted
    await s.close()


async def test_two_agents_cannot_share_a_spool(tmp_path: Path):
    s, _ = await open_spool(tmp_path)
    with pytest.raises(RuntimeError, match="another agent"):
        await open_spool(tmp_path)
    await s.close()


def _damaged_copy(src: Path) -> Path:
    dst = Path(tempfile.mkdtemp(prefix="fa-spool-"))
    for p in src.iterdir():
        if p.is_file():
            shutil.copy(p, dst / p.name)
    return dst


@pytest.fixture(scope="module")
def pristine() -> tuple[Path, dict[int, bytes]]:
    directory = Path(tempfile.mkdtemp(prefix="fa-pristine-"))
    written = asyncio.run(write_records(directory, 120, segment_bytes=2048))
    return directory, written


def _segment_bounds(directory: Path) -> list[tuple[Path, int, int]]:
    """(segment, first seq, last seq) for the pristine copy."""
    out = []
    for path in list_segments(directory):
        scan, _ = spool_mod.scan_file(path)
        out.append((path, scan.first_seq, scan.last_seq))
    return out


@settings(max_examples=examples(60),
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_torn_tail_keeps_every_record_before_the_cut(pristine, data):
    src, written = pristine
    directory = _damaged_copy(src)
    try:
        last = list_segments(directory)[-1]
        size = last.stat().st_size
        cut = data.draw(st.integers(min_value=0, max_value=size - 1), label="cut")
        with last.open("r+b") as fh:
            fh.truncate(cut)
        recovered = asyncio.run(_recover(directory))
        scan_before, _ = spool_mod.scan_file(src / last.name)
        intact = {seq for seq, off, length in scan_before.records
                  if off + spool_mod.FRAME.size + length <= cut}
        in_last = {seq for seq, _, _ in scan_before.records}
        expected = {seq for seq in written if seq not in in_last} | intact
        assert set(recovered) == expected
        assert all(recovered[seq] == written[seq] for seq in recovered)  # never garbage
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@settings(max_examples=examples(80),
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_flipped_bits_lose_only_the_damaged_record(pristine, data):
    src, written = pristine
    directory = _damaged_copy(src)
    try:
        segments = list_segments(directory)
        target = data.draw(st.sampled_from(segments), label="segment")
        size = target.stat().st_size
        flips = data.draw(st.lists(st.tuples(st.integers(0, size - 1), st.integers(0, 7)),
                                   min_size=1, max_size=3, unique_by=lambda f: f[0]),
                      label="flips")
        raw = bytearray(target.read_bytes())
        for offset, bit in flips:
            raw[offset] ^= 1 << bit
        target.write_bytes(bytes(raw))
        recovered = asyncio.run(_recover(directory))
        # Never garbage: every recovered record is byte-identical to what was written.
        assert all(recovered[seq] == written[seq] for seq in recovered)
        # Every record whose frame was not touched survives, in this segment and all others.
        scan, _ = spool_mod.scan_file(src / target.name)
        touched = set()
        for seq, off, length in scan.records:
            end = off + spool_mod.FRAME.size + length
            if any(off <= o < end for o, _ in flips):
                touched.add(seq)
        header_hit = any(o < HEADER.size for o, _ in flips)
        expected = set(written) - touched
        missing = expected - set(recovered)
        assert not missing, (missing, flips, header_hit)
        if not header_hit and not touched:
            assert set(recovered) == set(written)
        quarantined = list((directory / "quarantine").iterdir())
        if touched and target != segments[-1]:
            assert quarantined, "a damaged segment is moved aside"
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def _recover(directory: Path) -> dict[int, bytes]:
    s, recovered = await open_spool(directory, segment_bytes=2048)
    await s.close()
    # A second start finds a clean spool: recovery is idempotent and never loops.
    s2, again = await open_spool(directory, segment_bytes=2048)
    await s2.close()
    assert again == recovered
    assert spool_mod.verify(directory) == []
    return recovered


def test_spool_verify_and_inspect_report_damage(pristine):
    src, written = pristine
    directory = _damaged_copy(src)
    try:
        assert spool_mod.verify(directory) == []
        info = spool_mod.inspect(directory)
        assert info["records"] == len(written)
        assert info["pending_records"] == len(written)
        middle = list_segments(directory)[1]
        raw = bytearray(middle.read_bytes())
        raw[HEADER.size + 20] ^= 0xFF
        middle.write_bytes(bytes(raw))
        problems = spool_mod.verify(directory)
        assert problems
        assert str(middle) in problems[0]
    finally:
        shutil.rmtree(directory, ignore_errors=True)


DISK_FULL = r"""
import asyncio, errno, os, resource, signal, sys
from pathlib import Path
from flux_agent.spool import Spool, SpoolUnavailable, scan_file, list_segments

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
directory = Path(sys.argv[1])

async def main():
    s = Spool(directory, max_bytes=10**9, segment_bytes=10**8)
    await s.open()
    # The kernel now refuses any write past 64 KiB in a file: a real EFBIG, like ENOSPC.
    resource.setrlimit(resource.RLIMIT_FSIZE, (65536, resource.RLIM_INFINITY))
    acked, failed = [], 0
    for i in range(200):
        seq, fut = s.append(b"y" * 1000)
        try:
            await fut
            acked.append(seq)
        except SpoolUnavailable as exc:
            assert exc.code == "SPOOL_UNAVAILABLE" and exc.status == 503
            failed += 1
    assert failed > 0 and acked, (failed, len(acked))
    await s.close()
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    s = Spool(directory, max_bytes=10**9, segment_bytes=10**8)
    found = []
    await s.open(on_record=lambda seq, data: found.append(seq))
    await s.close()
    # Everything acknowledged is there; nothing that failed was left half-written.
    assert set(acked) <= set(found), (len(acked), len(found))
    assert set(found) <= set(acked), sorted(set(found) - set(acked))[:5]
    print("ok", len(acked), failed)

asyncio.run(main())
"""


def test_disk_refusing_writes_answers_503_and_leaves_no_half_record(tmp_path: Path):
    result = subprocess.run([sys.executable, "-c", DISK_FULL, str(tmp_path)],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("ok")


def test_the_checksum_is_crc32c_so_spools_of_earlier_versions_stay_readable():
    # The CRC-32C check value (RFC 3720 B.4, the iSCSI polynomial): a spool written by an
    # agent that used another CRC-32C library is read with the same sums.
    assert spool_mod.crc32c(b"123456789") == 0xE3069283
    assert spool_mod.crc32c(b"") == 0
    assert spool_mod._crc(5, b"payload") == spool_mod._crc(5, memoryview(b"payload"))
