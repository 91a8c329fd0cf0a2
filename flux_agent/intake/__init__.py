"""Intake: where an event enters, from the socket to the spool.

The HTTP edge (aiohttp, public API only): ``server`` (listeners, a guard per connection),
``framing`` (request lines and chunk sizes, seen before the parser), ``middleware`` (request
ids, trace context, every error as problem+json), ``responses``; who is calling: ``auth``,
``tokens``; what it may send and be sent within the agent's memory: ``memory`` (one
budget for everything requests hold), ``body`` (bodies within their deadline and memory),
``answers`` (read answers, streamed, cut when a client does not take them),
``validate`` (schemas, the sealed rows), ``openlineage`` (RunEvents as events), ``seen``
(recently accepted ids); the route families in ``routes/``, put together by ``app``; the
audit trail (``audit``); the admin listener (``admin``).
"""
