"""The unlock workflow: the encrypted images archive becomes images in the Docker engine.

    idle -> checking --(this archive already loaded, images present)--> ready   (no network)
               |
               v
         authenticating -> downloading_key -> loading -> verifying -> ready
               any stage --(permanent fault)--> error
               any stage --(transient fault)--> waiting --(backoff)--> the same stage again

``waiting`` is the state while a transient fault (network or Resource API down, 5xx, 429,
Docker engine not up) is being backed off; ``progress.stage`` then still names the stage that
will be retried. At boot the retries go on indefinitely, and they are the only retries: each
attempt shown is one request to the Resource API.

``loading`` is one stream: archive file -> decryptor -> ``docker load`` (chunked HTTP body,
``agent.engine``: the engine's API directly, no Docker SDK), in a worker thread. Only
authenticated plaintext is passed on, the manifest at the head of the payload is read (so a
wrong key fails) before the engine is contacted, and the last ``HOLDBACK`` bytes are released
only once the whole stream has authenticated: Docker cannot see the end of the tar, and so
cannot finish a load, of an archive that later fails. A failed or cancelled load drops the
connection mid-body, and the engine keeps nothing of it.

A successful unlock is recorded (atomically) in ``LOADER_STATE_DIR/unlock.json``: the archive's
digest and the image IDs. At the next boot, the same archive with all those images present
goes straight to ready with no network.

``UnlockManager.stats`` keeps what ``/metrics`` reads beside the state: how long each stage of
the latest unlock took, the plaintext bytes decrypted from the archive, and the retries by cause.

The package, by layer:

    record    what survives a reboot: ``UnlockRecord``, ``ArchiveIdentity``, ``unlock.json``
    pipeline  the blocking work in a worker thread: check, load (the stream above), verify
    threads   the bridge from the event loop to that worker thread, and its stop
    status    what callers see: the ``/unlock/status`` snapshot, the STATUS= line, the stats
    manager   the state machine above, on the event loop: ``UnlockManager``
"""

from agent.schemas import UnlockProgress, UnlockState, UnlockStatus
from agent.unlock.manager import BOOT_RETRY_POLICY, UnlockManager
from agent.unlock.pipeline import HOLDBACK, READ_SIZE, held_back
from agent.unlock.record import RECORD_NAME, ArchiveIdentity, UnlockRecord, read_record
from agent.unlock.status import STAGE_LABELS, UnlockStats

__all__ = [
    "BOOT_RETRY_POLICY",
    "HOLDBACK",
    "READ_SIZE",
    "RECORD_NAME",
    "STAGE_LABELS",
    "ArchiveIdentity",
    "UnlockManager",
    "UnlockProgress",
    "UnlockRecord",
    "UnlockState",
    "UnlockStats",
    "UnlockStatus",
    "held_back",
    "read_record",
]
