#!/usr/bin/env bash
# Build dist/azaion-loader_<version>_<arch>.deb (what `make deb [ARCH=amd64|arm64]` runs).
#
#   bash packaging/build-deb.sh [--out DIR] [--arch amd64|arm64] [--version X.Y.Z]
#
#   --out DIR        where the .deb goes (default: dist/ of the checkout)
#   --arch ARCH      the devices' architecture, amd64 or arm64 (default: this machine's); nothing of
#                    the package runs here, so an arm64 package builds on amd64 as well
#   --version X.Y.Z  the package's and the agent's version instead of pyproject.toml's
#
# The package carries a wheelhouse, not an environment: the wheels of the agent and of each of its
# dependencies for ARCH and for every supported Python (Debian 12's 3.11, Debian 13's 3.13), and
# pip's. The device builds the environment from them, offline, on its own /usr/bin/python3
# (/usr/lib/azaion-loader/ensure-env, run by postinst). Nothing is downloaded at install time.
#
# Build machine: Debian 12, any architecture, with
#   apt-get install python3-venv dpkg-dev binutils
# and access to PyPI (the wheels are downloaded at build time, the versions pinned by
# packaging/constraints.txt). Environment: DEB_PIP_OPTS (more pip options, e.g. "--index-url URL"
# of a mirror: the build's pip ignores pip's configuration and PIP_* variables), DEB_PYTHON (the
# build's own interpreter, default /usr/bin/python3), DEB_MAINTAINER, DEB_CONSTRAINTS,
# SOURCE_DATE_EPOCH (default: the date of packaging/changelog).
set -euo pipefail
umask 022

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PKG=$REPO/packaging
NAME=azaion-loader
LIBDIR=/usr/lib/$NAME
WHEELDIR=$LIBDIR/wheels
# Where ensure-env builds the environment on the device (not files of the package).
ENVDIR=/opt/$NAME
PYTHON=${DEB_PYTHON:-/usr/bin/python3}
MAINTAINER=${DEB_MAINTAINER:-Azaion Loader Maintainers <loader@azaion.com>}
CONSTRAINTS=${DEB_CONSTRAINTS:-$PKG/constraints.txt}
# The devices' Pythons: Debian release and its python3. Each needs the wheels of its CPython.
SUPPORTED=("3.11:Debian 12" "3.13:Debian 13")
# The newest glibc the wheels may need: the oldest supported release's (bookworm: 2.36).
GLIBC_MAX=36
OUT=$REPO/dist
ARCH=
VERSION=

die() {
	echo "build-deb: $*" >&2
	exit 1
}

usage() { sed -n '2,23s/^# \{0,1\}//p' "$0"; }

while [ $# -gt 0 ]; do
	case $1 in
		--out) OUT=$(realpath -m "${2:?--out DIR}"); shift 2 ;;
		--arch) ARCH=${2:?--arch amd64|arm64}; shift 2 ;;
		--version) VERSION=${2:?--version X.Y.Z}; shift 2 ;;
		-h | --help) usage; exit 0 ;;
		*) die "unknown argument: $1 (usage: build-deb.sh [--out DIR] [--arch amd64|arm64] [--version X.Y.Z])" ;;
	esac
done

check_tools() {
	[ -x "$PYTHON" ] || die "$PYTHON not found: apt-get install python3"
	"$PYTHON" -c 'import sys, venv, tomllib; sys.exit(sys.version_info < (3, 11))' 2>/dev/null ||
		die "$PYTHON is not Python >= 3.11 with venv"
	BOOT_PIP=$(find /usr/share/python-wheels -maxdepth 1 -name 'pip-*.whl' -print -quit 2>/dev/null)
	[ -n "$BOOT_PIP" ] || die "no /usr/share/python-wheels/pip-*.whl: apt-get install python3-venv"
	local tool
	for tool in dpkg-deb readelf gzip md5sum; do
		command -v "$tool" >/dev/null || die "$tool not found: apt-get install dpkg-dev binutils"
	done
	[ -r "$CONSTRAINTS" ] || die "no constraints file $CONSTRAINTS"
}

project_version() {
	"$PYTHON" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' \
		"$REPO/pyproject.toml"
}

# pip, the pinned version, run from its wheel on the build's interpreter: --isolated, so that
# this machine's pip configuration and PIP_* variables (find-links, extra indexes) cannot change
# what goes into the package; DEB_PIP_OPTS is the one way in. HTTP(S)_PROXY still apply.
pip_run() {
	local command=$1
	shift
	"$WORK/tools/bin/python" -I "$PIP_WHEEL/pip" "$command" --isolated --disable-pip-version-check \
		--no-input "${PIP_OPTS[@]}" "$@"
}

# A virtual environment for the build's own tools (pip, setuptools; the agent for its completion
# scripts), on this machine's Python: nothing of it goes into the package.
tools_env() {
	PIP_OPTS=()
	[ -z "${PIP_CERT:-}" ] || PIP_OPTS+=(--cert "$PIP_CERT")
	[ -z "${PIP_DEFAULT_TIMEOUT:-}" ] || PIP_OPTS+=(--timeout "$PIP_DEFAULT_TIMEOUT")
	local extra=()
	read -r -a extra <<<"${DEB_PIP_OPTS:-}"
	PIP_OPTS+=("${extra[@]}")
	"$PYTHON" -I -m venv --without-pip "$WORK/tools"
	# Debian's pip (python3-pip-whl) fetches the pinned pip; that one does the rest.
	"$WORK/tools/bin/python" -I "$BOOT_PIP/pip" download --isolated --disable-pip-version-check \
		--quiet "${PIP_OPTS[@]}" --no-deps --only-binary=:all: -c "$CONSTRAINTS" -d "$WORK/pip" pip
	PIP_WHEEL=$(find "$WORK/pip" -name 'pip-*-py3-none-any.whl' -print -quit)
	[ -n "$PIP_WHEEL" ] || die "pip's wheel was not downloaded"
	pip_run install --quiet --only-binary=:all: -c "$CONSTRAINTS" setuptools
}

# A clean copy of the sources: the wheel build must not write build/ or *.egg-info into the
# checkout, nor pick up .venv or caches. The device's code only: the development tools
# (azaion_loader_dev: dev-api, the test harness) are not copied, nor is their command declared.
# The version is the package's in both places that say it.
copy_sources() {
	local src=$1 version=$2
	mkdir -p "$src"
	grep -v '^azaion-loader-dev = ' "$REPO/pyproject.toml" >"$src/pyproject.toml"
	if [ -f "$REPO/README.md" ]; then
		cp "$REPO/README.md" "$src/"
	else
		echo "$NAME" >"$src/README.md" # pyproject's readme= must exist to build
	fi
	tar -C "$REPO" --exclude=__pycache__ --exclude='*.pyc' -cf - agent | tar -C "$src" -xf -
	sed -i "s/^version = \".*\"$/version = \"$version\"/" "$src/pyproject.toml"
	sed -i "s/^__version__ = \".*\"$/__version__ = \"$version\"/" "$src/agent/__init__.py"
	if ! grep -q "^version = \"$version\"$" "$src/pyproject.toml" ||
		! grep -q "^__version__ = \"$version\"$" "$src/agent/__init__.py"; then
		die "could not set the version $version in pyproject.toml and agent/__init__.py"
	fi
}

# Run a command with its output in a log, shown only if it fails (setuptools is talkative).
logged() {
	local log=$WORK/$1.log
	shift
	"$@" >"$log" 2>&1 || {
		cat "$log" >&2
		die "failed: $*"
	}
}

# The wheels made here, pure Python: the agent's own, and sdnotify's (PyPI has only its sdist).
local_wheels() {
	local src=$1 local_dir=$2 version=$3
	logged wheel-agent pip_run wheel --quiet --no-deps --no-build-isolation -w "$local_dir" "$src"
	logged wheel-sdnotify pip_run wheel --quiet --no-deps --no-build-isolation --no-binary=:all: \
		-c "$CONSTRAINTS" -w "$local_dir" sdnotify
	PROJECT_WHEEL=$local_dir/azaion_loader-$version-py3-none-any.whl
	[ -f "$PROJECT_WHEEL" ] || die "the agent's wheel is not $PROJECT_WHEEL"
	[ -n "$(find "$local_dir" -name 'sdnotify-*-py3-none-any.whl')" ] || die "no pure sdnotify wheel"
	check_no_development_tools "$PROJECT_WHEEL"
}

# The device package holds the device's code only (tests/system checks the agent's wheel too).
check_no_development_tools() {
	local found
	found=$("$PYTHON" -I -c '
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
print("\n".join(n for n in names if "azaion_loader_dev" in n or
      (n.endswith("entry_points.txt") and b"azaion_loader_dev" in zipfile.ZipFile(sys.argv[1]).read(n))))
' "$1")
	[ -z "$found" ] || die "a development tool got into the agent's wheel: $found"
}

# Every dependency's wheel for each supported Python on the devices' machine, from PyPI: wheels
# only (no compiler, here or on the device), manylinux up to the oldest release's glibc (the
# first platform given is the one pip prefers).
download_wheels() {
	local machine=$1 wheels=$2 plats=() g entry py name file
	for ((g = GLIBC_MAX; g >= 17; g--)); do plats+=(--platform "manylinux_2_${g}_$machine"); done
	plats+=(--platform "manylinux2014_$machine")
	for entry in "${SUPPORTED[@]}"; do
		py=${entry%%:*}
		pip_run download --quiet --only-binary=:all: "${plats[@]}" --python-version "$py" \
			--implementation cp --abi "cp${py/./}" -c "$CONSTRAINTS" \
			--find-links "$WORK/local" -d "$WORK/download/$py" "$PROJECT_WHEEL"
	done
	install -d "$wheels"
	for file in "$WORK"/download/*/*.whl "$PIP_WHEEL"; do
		name=${file##*/}
		if [ -e "$wheels/$name" ]; then
			cmp -s "$file" "$wheels/$name" || die "two different files named $name"
		else
			cp "$file" "$wheels/$name"
		fi
	done
}

# The wheelhouse holds what it must (the right machine, every Python), and installs offline:
# pip resolves the device's install from it alone, for each Python (a dry run: nothing of the
# target runs here).
check_wheelhouse() {
	local machine=$1 wheels=$2 version=$3 plats=() g entry py pythons=()
	for entry in "${SUPPORTED[@]}"; do pythons+=("${entry%%:*}"); done
	"$PYTHON" -I "$PKG/wheelhouse.py" check "$wheels" --machine "$machine" \
		--pythons "${pythons[@]}" --extract "$WORK/elf"
	for ((g = GLIBC_MAX; g >= 17; g--)); do plats+=(--platform "manylinux_2_${g}_$machine"); done
	for py in "${pythons[@]}"; do
		pip_run install --quiet --dry-run --ignore-installed --target "$WORK/dry-run" \
			--no-index --find-links "$wheels" --only-binary=:all: "${plats[@]}" \
			--python-version "$py" --implementation cp --abi "cp${py/./}" "$NAME==$version" ||
			die "the wheelhouse does not install $NAME==$version offline on Python $py"
	done
}

# Debian dependencies: python3 (the environment is built on whichever supported version it is:
# no upper bound, a release upgrade must not remove the agent), and the system libraries the
# wheels' shared objects link to, read with readelf (any architecture's; dpkg-shlibdeps would
# need the target's libraries installed here). Libraries a wheel bundles do not count.
debian_depends() {
	local elf=$1 minpy=${SUPPORTED[0]%%:*} needed provided glibc so packages=()
	needed=$(find "$elf" -type f -exec readelf -d {} + | sed -n 's/.*(NEEDED).*\[\(.*\)\]$/\1/p' | sort -u)
	provided=$(find "$elf" -type f -printf '%f\n' | sort -u)
	glibc=$(find "$elf" -type f -exec readelf -V {} + | grep -o 'GLIBC_2\.[0-9]*' | sort -t. -k2,2n -u | tail -n 1)
	for so in $needed; do
		grep -qxF "$so" <<<"$provided" && continue
		case $so in
			libc.so.6 | libm.so.6 | libpthread.so.0 | libdl.so.2 | librt.so.1 | libutil.so.1 | \
				libresolv.so.2 | ld-linux-x86-64.so.2 | ld-linux-aarch64.so.1)
				packages+=("libc6${glibc:+ (>= ${glibc#GLIBC_})}") ;;
			libgcc_s.so.1) packages+=("libgcc-s1") ;;
			libstdc++.so.6) packages+=("libstdc++6") ;;
			libz.so.1) packages+=("zlib1g") ;;
			*) die "a wheel needs $so: add its Debian package to debian_depends in build-deb.sh" ;;
		esac
	done
	local shlibs
	shlibs=$(printf '%s\n' "${packages[@]}" | sort -u | paste -sd, | sed 's/,/, /g')
	echo "python3 (>= $minpy~), ${shlibs:+$shlibs, }systemd, init-system-helpers (>= 1.54~)"
}

# "3.11 3.13" and "Debian 12 (Python 3.11) and Debian 13 (Python 3.13)" for the scripts.
supported_pythons() {
	local entry out=()
	for entry in "${SUPPORTED[@]}"; do out+=("${entry%%:*}"); done
	echo "${out[*]}"
}

supported_releases() {
	local entry text=""
	for entry in "${SUPPORTED[@]}"; do
		[ -z "$text" ] || text+=" and "
		text+="${entry#*:} (Python ${entry%%:*})"
	done
	echo "$text"
}

# A packaging/ template with the package's version and supported Pythons filled in.
template() {
	sed -e "s/@VERSION@/$2/g" -e "s/@PYTHONS@/$(supported_pythons)/g" \
		-e "s/@RELEASES@/$(supported_releases)/g" "$1"
}

install_files() {
	local stage=$1 version=$2 doc=$1/usr/share/doc/$NAME
	install -D -m 0644 "$REPO/systemd/$NAME.service" "$stage/lib/systemd/system/$NAME.service"
	install -D -m 0644 "$REPO/systemd/$NAME.socket" "$stage/lib/systemd/system/$NAME.socket"
	install -D -m 0644 "$PKG/sysusers.conf" "$stage/usr/lib/sysusers.d/$NAME.conf"
	install -D -m 0644 "$PKG/tmpfiles.conf" "$stage/usr/lib/tmpfiles.d/$NAME.conf"
	install -D -m 0644 "$PKG/loader.env" "$stage/etc/$NAME/loader.env"
	install -d -m 0755 "$stage/etc/$NAME/publishers.d"
	template "$PKG/ensure-env" "$version" >"$stage$LIBDIR/ensure-env"
	chmod 0755 "$stage$LIBDIR/ensure-env"
	install -d "$stage/usr/bin"
	ln -s "$ENVDIR/current/bin/$NAME" "$stage/usr/bin/$NAME"
	install -d "$doc/examples" "$stage/usr/share/man/man1"
	install -m 0644 "$REPO/docs/operations.md" "$doc/operations.md"
	install -m 0644 "$REPO"/systemd/examples/*.service "$doc/examples/"
	gzip -9n <"$PKG/changelog" >"$doc/changelog.gz"
	{ cat "$PKG/copyright.in"; "$PYTHON" -I "$PKG/wheelhouse.py" licenses "$stage$WHEELDIR"; } \
		>"$doc/copyright"
	sed "s/@VERSION@/$version/" "$PKG/$NAME.1" | gzip -9n >"$stage/usr/share/man/man1/$NAME.1.gz"
	shell_completions "$stage" "$version"
}

# bash and zsh completion, generated from the command line's own parser: the agent installed
# into the tools environment, on THIS machine's Python (its own architecture's wheels: from the
# wheelhouse when they fit, else from PyPI), -B no bytecode, env -i no setting of this machine
# (LOADER_SOCKET_PATH would change the default the scripts show).
shell_completions() {
	local stage=$1 version=$2 bash_dir=$1/usr/share/bash-completion/completions
	local zsh_dir=$1/usr/share/zsh/vendor-completions
	if ! pip_run install --quiet --only-binary=:all: --no-index --find-links "$stage$WHEELDIR" \
		"$NAME==$version" >"$WORK/tools-offline.log" 2>&1; then
		pip_run install --quiet --only-binary=:all: -c "$CONSTRAINTS" --find-links "$WORK/local" \
			"$NAME==$version"
	fi
	install -d "$bash_dir" "$zsh_dir"
	env -i "$WORK/tools/bin/python" -I -B -m agent completion bash >"$bash_dir/$NAME"
	env -i "$WORK/tools/bin/python" -I -B -m agent completion zsh >"$zsh_dir/_$NAME"
}

write_control() {
	local stage=$1 version=$2 arch=$3 depends=$4 size script
	install -d "$stage/DEBIAN"
	for script in preinst postinst prerm postrm; do
		template "$PKG/debian/$script" "$version" >"$stage/DEBIAN/$script"
		chmod 0755 "$stage/DEBIAN/$script"
	done
	install -m 0644 "$PKG/debian/triggers" "$stage/DEBIAN/triggers"
	echo "/etc/$NAME/loader.env" >"$stage/DEBIAN/conffiles"
	size=$(du -sk --apparent-size --exclude=DEBIAN "$stage" | cut -f1)
	sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@MAINTAINER@/$MAINTAINER/" \
		-e "s/@INSTALLED_SIZE@/$size/" -e "s/@DEPENDS@/$depends/" \
		-e "s/@RELEASES@/$(supported_releases)/" "$PKG/debian/control.in" >"$stage/DEBIAN/control"
	(cd "$stage" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' |
		LC_ALL=C sort -z | xargs -0 md5sum) >"$stage/DEBIAN/md5sums"
	chmod 0644 "$stage/DEBIAN/md5sums" "$stage/DEBIAN/conffiles" "$stage/DEBIAN/control"
}

# Same inputs, same bytes: fixed permissions and timestamps (reproducible builds).
normalize_tree() {
	local stage=$1 epoch=$2
	find "$stage" -type d -exec chmod 0755 {} +
	find "$stage" -type f -perm /111 -exec chmod 0755 {} +
	find "$stage" -type f ! -perm /111 -exec chmod 0644 {} +
	find "$stage" -exec touch --no-dereference --date="@$epoch" {} +
}

changelog_epoch() {
	local date
	date=$(sed -n 's/^ -- .*>  //p' "$PKG/changelog" | head -n 1)
	date --date="$date" +%s
}

main() {
	check_tools
	local version arch machine stage depends deb epoch started=$SECONDS
	version=${VERSION:-$(project_version)}
	[[ $version =~ ^[0-9]+(\.[0-9]+)*$ ]] ||
		die "version $version: digits and dots only (the same string for Debian and for Python)"
	arch=${ARCH:-$(dpkg --print-architecture)}
	case $arch in
		amd64 | x86_64) arch=amd64 machine=x86_64 ;;
		arm64 | aarch64) arch=arm64 machine=aarch64 ;;
		*) die "architecture $arch: amd64 or arm64" ;;
	esac
	epoch=${SOURCE_DATE_EPOCH:-$(changelog_epoch)}
	export SOURCE_DATE_EPOCH=$epoch
	WORK=$(mktemp -d "${TMPDIR:-/tmp}/$NAME-deb.XXXXXX")
	trap 'rm -rf "$WORK"' EXIT
	stage=$WORK/root
	deb=$OUT/${NAME}_${version}_${arch}.deb
	echo "build-deb: $NAME $version for $arch ($machine; $(supported_releases))"
	tools_env
	copy_sources "$WORK/src" "$version"
	local_wheels "$WORK/src" "$WORK/local" "$version"
	download_wheels "$machine" "$stage$WHEELDIR"
	check_wheelhouse "$machine" "$stage$WHEELDIR" "$version"
	install_files "$stage" "$version"
	depends=$(debian_depends "$WORK/elf")
	write_control "$stage" "$version" "$arch" "$depends"
	normalize_tree "$stage" "$epoch"
	mkdir -p "$OUT"
	# gzip, not xz: nearly all of it is wheels, zip files already (xz: 4 % smaller, 10-25 s more).
	dpkg-deb --root-owner-group -Zgzip --build "$stage" "$deb" >/dev/null
	echo "build-deb: $deb ($(du -h "$deb" | cut -f1), $((SECONDS - started)) s)"
}

main
