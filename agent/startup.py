"""What ``serve`` puts off until it is serving: garbage collection, and the CA certificates of
the TLS contexts made while its modules are imported.

Measured on the way to READY=1 (``bench/bench_startup.py``, ``python -X importtime``, gc
callbacks), two costs were neither imports nor serving:

- The cyclic garbage collector: importing ~500 modules allocates a great deal and frees
  little, so its passes (one of them a full one, ~23 ms) cost ~40 ms of CPU in all.
  ``cmd_serve`` turns it off before it imports the agent (``hold_collection``); once the
  listeners are open, ``collecting`` moves everything start-up made into the permanent
  generation (``gc.freeze()``: later full passes do not walk those tens of thousands of
  objects again) and turns collection back on. What start-up left unreachable stays for the
  process's life, a fixed amount: ~2,200 objects, ~0.4 MB by ``sys.getsizeof`` (idle RSS
  unchanged within the noise of ``bench/bench_startup.py``).
- aiohttp builds its two default TLS contexts when imported, each loading the system's CA
  bundle (~17 ms each, holding the GIL), one of them for ``ssl=False``, which verifies nothing.
  ``ca_certificates_deferred`` records the contexts made while it is open instead of loading
  their CA certificates, and ``load_deferred_certificates`` loads them (the same
  ``set_default_verify_paths``, on the same objects) right after READY=1, in the same turn of
  the event loop: the unlock starts after it, and a request accepted while the last listener
  was starting needs more turns (read, dispatch, connect, the server's certificate) before a
  TLS handshake could consult the store. A context without its certificates would refuse
  every server (it fails closed). The first request after READY=1 may wait for it (~17 ms).

Neither does anything outside ``serve`` (``agent.cli.local.cmd_serve``): tests and other
commands that import the agent get the libraries' usual behaviour.
"""

from __future__ import annotations

import contextlib
import gc
import ssl
from collections.abc import Iterator

_pending: list[ssl.SSLContext] = []


def hold_collection() -> None:
    """No cyclic garbage collection until ``collecting``."""
    gc.disable()


@contextlib.contextmanager
def ca_certificates_deferred() -> Iterator[None]:
    """While open, a context loading the default CA certificates records itself instead;
    ``load_deferred_certificates`` loads them."""
    name = "set_default_verify_paths"
    own = vars(ssl.SSLContext).get(name)  # None: inherited from _ssl._SSLContext

    def record(context: ssl.SSLContext) -> None:
        _pending.append(context)

    setattr(ssl.SSLContext, name, record)
    try:
        yield
    finally:
        if own is None:
            delattr(ssl.SSLContext, name)
        else:
            setattr(ssl.SSLContext, name, own)


def deferred_contexts() -> int:
    """How many contexts still wait for their CA certificates."""
    return len(_pending)


def load_deferred_certificates() -> None:
    """Load them; a context that verifies nothing (aiohttp's one for ``ssl=False``, which the
    agent never asks for) would never read them and is left without."""
    while _pending:
        context = _pending.pop()
        if context.verify_mode != ssl.CERT_NONE:
            context.set_default_verify_paths()


def collecting() -> None:
    """Start-up's objects to the permanent generation; collection on again."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()
