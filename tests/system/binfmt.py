"""Run another architecture's programs on this host: qemu-user-static through binfmt_misc.

``ensure(arch)`` makes the kernel hand ``arch``'s ELF files to qemu, the way ``systemd-binfmt``
does at boot on a host whose PID 1 is systemd. On a host whose init is something else (a CI VM)
nothing has done it: ``binfmt_misc`` is not even mounted, and the ``qemu-user-static`` package's
postinst registers nothing. So, as root:

1. ``mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc`` unless it is mounted;
2. write the entry of ``/usr/lib/binfmt.d/qemu-<cpu>.conf`` (qemu-user-static's) into
   ``/proc/sys/fs/binfmt_misc/register`` unless ``qemu-<cpu>`` is registered already.

Debian's entry has the ``F`` (fix binary) flag: the kernel opens the interpreter at registration,
so chroots and containers of that architecture need no qemu binary inside. The registration is
left in place (it is host-wide, like the one systemd-binfmt makes; undo with
``echo -1 > /proc/sys/fs/binfmt_misc/qemu-<cpu>``).
"""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
CONF_DIR = Path("/usr/lib/binfmt.d")
# Debian architecture -> qemu's CPU name (and the kernel's machine name).
CPUS = {"arm64": "aarch64", "amd64": "x86_64"}


def native(arch: str) -> bool:
    """Whether this host runs ``arch``'s programs without an emulator."""
    return CPUS.get(arch) == platform.machine()


def entry_path(arch: str) -> Path:
    return BINFMT_DIR / f"qemu-{CPUS[arch]}"


def problems(arch: str) -> list[str]:
    """What keeps ``ensure(arch)`` from working here (empty: nothing)."""
    if arch not in CPUS:
        return [f"no emulator known for {arch}"]
    if native(arch):
        return []
    found: list[str] = []
    if not (CONF_DIR / f"qemu-{CPUS[arch]}.conf").is_file():
        found.append(f"qemu-user-static is missing (no {CONF_DIR}/qemu-{CPUS[arch]}.conf)")
    if not BINFMT_DIR.is_dir():
        found.append(f"this kernel has no {BINFMT_DIR} (binfmt_misc)")
    return found


def ensure(arch: str) -> None:
    """Register qemu for ``arch`` with the kernel unless it is registered (needs root)."""
    if native(arch):
        return
    entry = entry_path(arch)
    if not entry.exists():
        if not (BINFMT_DIR / "register").exists():
            _mount_binfmt_misc()
        if not entry.exists():
            (BINFMT_DIR / "register").write_text(_entry_line(arch))
    _check(arch)


def _mount_binfmt_misc() -> None:
    result = subprocess.run(
        ["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT_DIR)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if result.returncode != 0:
        raise RuntimeError(f"cannot mount binfmt_misc: {result.stderr.strip()}")


def _entry_line(arch: str) -> str:
    """The registration string from qemu-user-static's binfmt.d file (comments dropped)."""
    conf = CONF_DIR / f"qemu-{CPUS[arch]}.conf"
    lines = [
        line
        for line in conf.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith(("#", ";"))
    ]
    if len(lines) != 1:
        raise RuntimeError(f"{conf}: expected one registration line, found {len(lines)}")
    return lines[0]


def _check(arch: str) -> None:
    """The entry must be enabled, with a present interpreter, opened at registration (F)."""
    text = entry_path(arch).read_text()
    lines = text.splitlines()
    fields = {key.rstrip(":"): value for key, _, value in (line.partition(" ") for line in lines)}
    if not lines or lines[0].strip() != "enabled":
        raise RuntimeError(f"{entry_path(arch)} is not enabled:\n{text}")
    interpreter = Path(fields.get("interpreter", ""))
    if not fields.get("interpreter") or not interpreter.exists():
        raise RuntimeError(f"{entry_path(arch)} names a missing interpreter {interpreter}")
    if "F" not in fields.get("flags", ""):
        # Without F the interpreter is looked up inside each chroot, where there is none.
        raise RuntimeError(f"{entry_path(arch)} lacks the F flag:\n{text}")
