"""PostgreSQL's failures as the stages above see them: one table from asyncpg's exception
classes (one per SQLSTATE, grouped by class) to the domain errors of :mod:`flux_agent.core.errors`.

Nothing above ``postgres/`` sees an asyncpg exception or compares a SQLSTATE: the pool
translates every failure of a unit of work once, where it happens.
"""

from __future__ import annotations

from urllib.parse import parse_qs, unquote, urlsplit

import asyncpg

from ..core.errors import (
    BadParameter,
    PermissionDenied,
    StoreUnavailable,
    UpstreamError,
)


class LockTimeout(StoreUnavailable):
    """A lock was not granted within its timeout (55P03): busy now, try again later."""


# The first matching class wins: specific codes before their class.
_TABLE: tuple[tuple[type[BaseException], type[UpstreamError]], ...] = (
    (asyncpg.LockNotAvailableError, LockTimeout),  # 55P03
    (asyncpg.ObjectInUseError, StoreUnavailable),  # 55006
    (asyncpg.ReadOnlySQLTransactionError, StoreUnavailable),  # 25006: a standby
    (asyncpg.PostgresConnectionError, StoreUnavailable),  # 08
    (asyncpg.InsufficientResourcesError, StoreUnavailable),  # 53: disk full, too many clients
    (asyncpg.OperatorInterventionError, StoreUnavailable),  # 57: shutdown, cancel
    (asyncpg.TransactionRollbackError, StoreUnavailable),  # 40: serialization, deadlock
    (asyncpg.PostgresSystemError, StoreUnavailable),  # 58: I/O error
    (asyncpg.InterfaceError, StoreUnavailable),  # the connection, client side
    (asyncpg.InvalidAuthorizationSpecificationError, PermissionDenied),  # 28: login refused
    (asyncpg.InsufficientPrivilegeError, PermissionDenied),  # 42501
    (asyncpg.DataError, BadParameter),  # 22
    (asyncpg.IntegrityConstraintViolationError, BadParameter),  # 23
    (asyncpg.ProgramLimitExceededError, BadParameter),  # 54
    (OSError, StoreUnavailable),
    (TimeoutError, StoreUnavailable),
)
# SQLSTATEs asyncpg has no class for fall back on their class (the first two characters).
_BY_CLASS: dict[str, type[UpstreamError]] = {
    "08": StoreUnavailable, "53": StoreUnavailable, "57": StoreUnavailable,
    "40": StoreUnavailable, "58": StoreUnavailable, "28": PermissionDenied,
    "22": BadParameter, "23": BadParameter, "54": BadParameter,
}


def sqlstate(exc: BaseException) -> str | None:
    state = getattr(exc, "sqlstate", None)
    return state if isinstance(state, str) else None


def describe(exc: BaseException) -> str:
    """One line, no secrets: asyncpg's messages carry no passwords, DSNs are not echoed."""
    if isinstance(exc, UpstreamError):
        return exc.detail
    state = sqlstate(exc)
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"{state}: {text}" if state else f"{type(exc).__name__}: {text}"


DATABASE_SETTING = "FLUX_AGENT_DATABASE_URL"


def target(dsn: str) -> str:
    """Where a PostgreSQL URL connects, without its credentials: ``host:port`` (each of a
    multi-host URL), or the Unix socket's path."""
    try:
        parts = urlsplit(dsn)
        query = parse_qs(parts.query)
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.netloc.rsplit("@", 1)[-1]
    hosts = (query.get("host") or [unquote(netloc)])[0].split(",")
    port = (query.get("port") or [""])[0]
    out = []
    for entry in hosts:
        host, _, entry_port = entry.rpartition(":") if not entry.startswith("/") \
            and entry.count(":") == 1 else (entry, "", "")
        if entry.startswith("[") and "]:" in entry:
            host, entry_port = entry.rsplit(":", 1)
        chosen = entry_port or port or "5432"
        if host.startswith("/"):
            out.append(f"{host.rstrip('/')}/.s.PGSQL.{chosen}")
        else:
            out.append(f"{host}:{chosen}" if host else f"the default Unix socket, port {chosen}")
    return ", ".join(out)


def unreachable(exc: BaseException, dsn: str, setting: str = DATABASE_SETTING
                ) -> StoreUnavailable:
    """A connection that could not be made, naming where to and the setting that says so
    (``FileNotFoundError: [Errno 2]`` alone names neither)."""
    if isinstance(exc, TimeoutError):
        why = "no answer within the connect timeout"
    else:
        why = (exc.strerror if isinstance(exc, OSError) else None) or str(exc) \
            or type(exc).__name__
    return StoreUnavailable(f"cannot connect to PostgreSQL at {target(dsn)} ({setting}): "
                            f"{why}")


def translate(exc: BaseException) -> BaseException:
    """The domain error for a failure of PostgreSQL or of the path to it; anything else (a
    bug, a cancellation) is returned unchanged."""
    if isinstance(exc, UpstreamError):
        return exc
    kind: type[UpstreamError] | None = None
    for cls, domain in _TABLE:
        if isinstance(exc, cls):
            kind = domain
            break
    if kind is None and isinstance(exc, asyncpg.PostgresError):
        kind = _BY_CLASS.get((sqlstate(exc) or "")[:2], UpstreamError)
    if kind is None:
        return exc
    return kind(describe(exc), code=sqlstate(exc))
