"""The composition root: builds the pipeline in dependency order and runs its lifecycle
(:mod:`.core`); binds and serves the listeners (:mod:`.listeners`); the database it uses
(:mod:`.database`); its probes (:mod:`.probes`); its snapshots (:mod:`.snapshots`); key
reloads (:mod:`.reload`); and what it prepares before it runs (:mod:`.setup`)."""

from .core import Agent as Agent
from .listeners import Endpoints as Endpoints
from .setup import SUPERUSER_NOTE as SUPERUSER_NOTE
from .setup import bounded as bounded
from .setup import embedded_connect as embedded_connect
from .setup import preflight as preflight
