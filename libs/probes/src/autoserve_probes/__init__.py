"""AutoServe Health probes: one check of one target, as kubelet's ``pkg/probe``.

Pure: ``target``, ``request``, ``outcome``, ``limits``, ``attempt``. I/O: ``http``,
``http11``, ``tcp`` and ``probe`` (the ``Prober`` that runs a check).
"""

from .attempt import Attempt, AttemptFn
from .http import HttpProbe
from .outcome import HEALTHY, Verdict, failure
from .probe import Prober
from .target import Target, TargetKey
from .tcp import tcp_attempt

__all__ = [
    "HEALTHY",
    "Attempt",
    "AttemptFn",
    "HttpProbe",
    "Prober",
    "Target",
    "TargetKey",
    "Verdict",
    "failure",
    "tcp_attempt",
]
