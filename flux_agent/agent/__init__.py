"""The composition root: builds the pipeline and runs its lifecycle (:mod:`.core`), its
supervised background loops (:mod:`.background`), its probes (:mod:`.probes`), and what it
prepares before it runs (:mod:`.setup`)."""

from .core import Agent as Agent
from .core import Endpoints as Endpoints
from .setup import SUPERUSER_NOTE as SUPERUSER_NOTE
from .setup import bounded as bounded
from .setup import embedded_connect as embedded_connect
from .setup import preflight as preflight
