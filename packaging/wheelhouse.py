"""The package's wheelhouse, looked at from the build machine (build-deb.sh runs this).

    python3 wheelhouse.py check DIR --machine aarch64 --pythons 3.11 3.13 --extract OUT
    python3 wheelhouse.py licenses DIR

``check``: every wheel is pure (``py3-none-any``) or a manylinux wheel for ``--machine``; every
compiled distribution has a wheel for every Python in ``--pythons`` (its own ``cpXY`` one, or an
``abi3`` one for an older or equal CPython); each shared object inside is an ELF file for that
machine (read from its header: nothing of another architecture is run here). The shared objects
are extracted to ``OUT/<wheel>/<path>`` for ``readelf`` (the library dependencies).

``licenses``: the copyright file's stanza listing each bundled distribution and its license,
from the wheels' metadata.

Runs on the build machine's Python (any architecture), standard library only.
"""

from __future__ import annotations

import argparse
import email.parser
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

# ELF e_machine values (elf.h) of the machines packages are built for.
ELF_MACHINES = {"x86_64": 62, "aarch64": 183}
WHEEL_NAME = re.compile(
    r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-(?P<python>[^-]+)-(?P<abi>[^-]+)-(?P<platform>[^-]+)\.whl$"
)


class WheelhouseError(Exception):
    pass


@dataclass(frozen=True)
class Wheel:
    path: Path
    name: str
    version: str
    pythons: tuple[str, ...]
    abis: tuple[str, ...]
    platforms: tuple[str, ...]

    @classmethod
    def of(cls, path: Path) -> Wheel:
        found = WHEEL_NAME.match(path.name)
        if not found:
            raise WheelhouseError(f"{path.name}: not a wheel's file name")
        return cls(
            path=path,
            name=found["name"].lower().replace("_", "-"),
            version=found["version"],
            pythons=tuple(found["python"].split(".")),
            abis=tuple(found["abi"].split(".")),
            platforms=tuple(found["platform"].split(".")),
        )

    @property
    def pure(self) -> bool:
        return self.platforms == ("any",)

    def serves(self, python: str) -> bool:
        """Whether CPython ``python`` (``"3.11"``) can install this wheel (platform aside)."""
        nodot = python.replace(".", "")
        if self.pure:
            return "none" in self.abis and any(tag in ("py3", f"py{nodot}") for tag in self.pythons)
        if f"cp{nodot}" in self.abis:
            return f"cp{nodot}" in self.pythons
        if "abi3" in self.abis:
            return any(
                tag.startswith("cp3") and int(tag[3:]) <= int(nodot[1:]) for tag in self.pythons
            )
        return False


def check(directory: Path, machine: str, pythons: list[str], extract: Path) -> None:
    wheels = [Wheel.of(path) for path in sorted(directory.glob("*.whl"))]
    if not wheels:
        raise WheelhouseError(f"no wheels in {directory}")
    problems: list[str] = []
    compiled: dict[str, list[Wheel]] = {}
    for wheel in wheels:
        if wheel.pure:
            if not any(wheel.serves(python) for python in pythons):
                problems.append(f"{wheel.path.name}: a pure wheel for no supported Python")
            continue
        foreign = [p for p in wheel.platforms if not re.fullmatch(rf"manylinux\w*_{machine}", p)]
        if foreign:
            problems.append(f"{wheel.path.name}: not a manylinux wheel for {machine}")
        compiled.setdefault(wheel.name, []).append(wheel)
    for name, candidates in sorted(compiled.items()):
        for python in pythons:
            if not any(wheel.serves(python) for wheel in candidates):
                problems.append(f"{name}: no wheel for Python {python}")
    objects = 0
    for wheel in wheels:
        objects += _extract_elf(wheel, machine, extract, problems)
    if problems:
        raise WheelhouseError("\n".join(problems))
    print(
        f"{len(wheels)} wheels ({len(compiled)} compiled distributions, {objects} shared objects),"
        f" all for {machine}; Python {', '.join(pythons)}"
    )


def _extract_elf(wheel: Wheel, machine: str, extract: Path, problems: list[str]) -> int:
    found = 0
    with zipfile.ZipFile(wheel.path) as archive:
        for member in archive.infolist():
            if member.is_dir():
                continue
            with archive.open(member) as stream:
                header = stream.read(20)
            if header[:4] != b"\x7fELF":
                continue
            found += 1
            if wheel.pure:
                problems.append(
                    f"{wheel.path.name}: a pure wheel with an ELF file {member.filename}"
                )
            # e_machine: 2 bytes at offset 18, in the file's byte order (EI_DATA: 1 = little).
            little = header[5] == 1
            e_machine = int.from_bytes(header[18:20], "little" if little else "big")
            if e_machine != ELF_MACHINES[machine]:
                problems.append(
                    f"{wheel.path.name}: {member.filename} is not an {machine} ELF file"
                )
            relative = PurePosixPath(member.filename)
            if relative.is_absolute() or ".." in relative.parts:
                problems.append(f"{wheel.path.name}: unsafe member name {member.filename}")
                continue
            target = extract / wheel.path.name / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.read(member))
    return found


def licenses(directory: Path) -> None:
    rows = []
    for path in sorted(directory.glob("*.whl")):
        with zipfile.ZipFile(path) as archive:
            [metadata_name] = [
                name
                for name in archive.namelist()
                if name.count("/") == 1 and name.endswith(".dist-info/METADATA")
            ]
            meta = email.parser.BytesParser().parsebytes(archive.read(metadata_name))
        license_text = meta.get("License-Expression") or ""
        if not license_text:
            classifiers = [
                c.split(" :: ")[-1]
                for c in meta.get_all("Classifier") or []
                if c.startswith("License ::")
            ]
            license_text = " / ".join(classifiers) or (meta.get("License") or "see its METADATA")
        row = f" {meta['Name']} {meta['Version']}: {license_text.strip().splitlines()[0][:70]}"
        if row not in rows:
            rows.append(row)
    print("Files: usr/lib/azaion-loader/wheels/*")
    print("Copyright: the authors of each bundled distribution, see the METADATA and license files")
    print(" in its wheel")
    print("License: bundled")
    print(" The wheelhouse bundles these distributions, each under its own license:")
    print(" .")
    print("\n".join(sorted(rows, key=str.lower)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    checking = commands.add_parser("check")
    checking.add_argument("directory", type=Path)
    checking.add_argument("--machine", choices=sorted(ELF_MACHINES), required=True)
    checking.add_argument("--pythons", nargs="+", required=True)
    checking.add_argument("--extract", type=Path, required=True)
    listing = commands.add_parser("licenses")
    listing.add_argument("directory", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            check(args.directory, args.machine, args.pythons, args.extract)
        else:
            licenses(args.directory)
    except WheelhouseError as exc:
        print(f"wheelhouse: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
