"""Publisher-side subcommands: ``pack-images``, ``publisher-keygen``.

The Docker SDK and the packer are imported when the command runs, not when the parser is built.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from agent.errors import ConfigError, ConflictError

MB = 1000 * 1000


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this family's subcommands to the parser."""
    parser = sub.add_parser(
        "pack-images",
        help="docker save images into an encrypted archive for devices",
        description=(
            "Stream `docker save IMAGE...` from the Docker engine (DOCKER_HOST) through the "
            "encryptor into ARCHIVE; no plaintext tar is written. A new API-side key fragment "
            "goes to --fragment-out (serve it from the Resource API's /binary-split/key-fragment; "
            "dev-api takes it with --key-fragment)."
        ),
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image reference (repo:tag)")
    parser.add_argument("--out", required=True, type=Path, metavar="ARCHIVE")
    parser.add_argument(
        "--fragment-out", required=True, type=Path, metavar="FILE", help="API-side key fragment"
    )
    parser.add_argument(
        "--device-fragment",
        type=Path,
        metavar="FILE",
        help="device-side key fragment (used if FILE exists, else created); the device then "
        "needs it as LOADER_DEVICE_FRAGMENT_PATH",
    )
    parser.add_argument(
        "--no-api-tag",
        dest="api_tag",
        action="store_false",
        help="do not ask devices to tag the images with their API_VERSION",
    )
    parser.add_argument(
        "--force", action="store_true", help="overwrite an existing --fragment-out file"
    )
    parser.add_argument(
        "--sign-key",
        type=Path,
        metavar="KEY",
        help="sign the archive with this publisher key (publisher-keygen); needs --release",
    )
    parser.add_argument(
        "--release",
        type=release_number,
        metavar="N",
        help="the release number the archive carries (devices refuse one lower than theirs)",
    )
    parser.set_defaults(func=run_pack_images)

    keygen = sub.add_parser(
        "publisher-keygen",
        help="make a publisher signing key (Ed25519)",
        description=(
            "Write a new Ed25519 publisher key: the private key to KEY (mode 0600; keep it off "
            "devices) and the public key to KEY.pub (install it on devices in "
            "/etc/azaion-loader/publishers.d/). The public key line is also printed. An "
            "existing KEY or KEY.pub is never overwritten."
        ),
    )
    keygen.add_argument("--out", required=True, type=Path, metavar="KEY")
    keygen.add_argument("--comment", default="", help="a note kept on the public key line")
    keygen.set_defaults(func=run_publisher_keygen)


def run_pack_images(args: argparse.Namespace) -> int:
    from agent import keys
    from agent.images import ImageEngine
    from agent.pack import pack_images

    if args.fragment_out.exists() and not args.force:
        raise ConflictError(
            f"key fragment file {args.fragment_out} already exists (use --force to replace it)"
        )
    sign_key = None
    if args.sign_key is not None:
        from agent import signing

        if args.release is None:
            raise ConfigError("--sign-key needs --release N: a signed archive names its release")
        sign_key = signing.read_private_key(args.sign_key)
    api_fragment = keys.generate_fragment()
    fragments = [api_fragment]
    if args.device_fragment is not None:
        fragments.append(_device_fragment(args.device_fragment))
    with ImageEngine.connect() as engine:
        result = pack_images(
            engine,
            args.images,
            args.out,
            fragments,
            api_tag=args.api_tag,
            sign_key=sign_key,
            release=args.release or 0,
        )
    keys.write_fragment_file(args.fragment_out, api_fragment, force=args.force)
    for image in result.manifest.images:
        print(f"packed {image.ref} ({image.id[:19]})")
    print(
        f"wrote {args.out} ({result.archive_size / MB:.1f} MB, sha256 {result.archive_sha256}); "
        f"API key fragment in {args.fragment_out}"
    )
    if result.signature is not None:
        print(
            f"signed as release {result.manifest.release} with key "
            f"{result.signature.statement.key_id.hex()}"
        )
    return 0


def release_number(text: str) -> int:
    from agent.signing import MAX_RELEASE

    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a release number: {text!r}") from None
    if not 0 <= value <= MAX_RELEASE:
        raise argparse.ArgumentTypeError(f"a release number is 0 to {MAX_RELEASE}")
    return value


def _device_fragment(path: Path) -> bytes:
    from agent import keys

    if path.exists():
        return keys.read_fragment_file(path)
    fragment = keys.generate_fragment()
    keys.write_fragment_file(path, fragment)
    print(f"created device key fragment {path}")
    return fragment


def run_publisher_keygen(args: argparse.Namespace) -> int:
    from agent import signing

    public = signing.write_key_pair(args.out, args.comment)
    print(public.to_line(), end="")
    print(f"key id {public.name}; public key also in {args.out}.pub", flush=True)
    return 0
