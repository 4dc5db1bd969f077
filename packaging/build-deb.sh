#!/usr/bin/env bash
# Build dist/azaion-loader_<version>_<arch>.deb (what `make deb` runs).
#
#   bash packaging/build-deb.sh [--out DIR]
#
# The package carries a self-contained virtual environment under /opt/azaion-loader with the
# agent and its dependencies, built here on the TARGET's interpreter: /usr/bin/python3, Debian's
# own (3.11 on bookworm), never the first python3 on PATH. Installing it downloads nothing.
#
# Build machine: Debian of the target's release and architecture, with
#   apt-get install python3-venv dpkg-dev binutils
# and access to PyPI (the agent's dependencies are installed from wheels at build time).
# Environment: DEB_PYTHON (default /usr/bin/python3), DEB_MAINTAINER, SOURCE_DATE_EPOCH
# (default: the date of packaging/changelog), PIP_CONSTRAINT (pin the bundled versions).
set -euo pipefail
umask 022

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PKG=$REPO/packaging
NAME=azaion-loader
PREFIX=/opt/$NAME
PYTHON=${DEB_PYTHON:-/usr/bin/python3}
MAINTAINER=${DEB_MAINTAINER:-Azaion Loader Maintainers <loader@azaion.com>}
OUT=$REPO/dist

die() { echo "build-deb: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
	case $1 in
		--out) OUT=$(realpath -m "$2"); shift 2 ;;
		-h|--help) sed -n '2,15p' "$0"; exit 0 ;;
		*) die "unknown argument: $1 (usage: build-deb.sh [--out DIR])" ;;
	esac
done

check_tools() {
	[ -x "$PYTHON" ] || die "$PYTHON not found: the package is built on the target's Debian python3"
	"$PYTHON" -c 'import ensurepip, venv' 2>/dev/null ||
		die "$PYTHON cannot create a virtual environment: apt-get install python3-venv"
	local tool
	for tool in dpkg-deb dpkg-shlibdeps strip gzip; do
		command -v "$tool" >/dev/null || die "$tool not found: apt-get install dpkg-dev binutils"
	done
}

project_version() {
	"$PYTHON" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' \
		"$REPO/pyproject.toml"
}

# A clean copy of the sources: the wheel build must not write build/ or *.egg-info into the
# checkout, nor pick up .venv or caches. The device's code only: the development tools
# (azaion_loader_dev: dev-api, the test harness) are not copied, nor is their command declared.
copy_sources() {
	local src=$1
	mkdir -p "$src"
	grep -v '^azaion-loader-dev = ' "$REPO/pyproject.toml" >"$src/pyproject.toml"
	if [ -f "$REPO/README.md" ]; then
		cp "$REPO/README.md" "$src/"
	else
		echo "$NAME" >"$src/README.md" # pyproject's readme= must exist to build
	fi
	tar -C "$REPO" --exclude=__pycache__ --exclude='*.pyc' -cf - agent | tar -C "$src" -xf -
}

build_venv() {
	local src=$1 venv=$2
	"$PYTHON" -m venv "$venv"
	"$venv/bin/python" -I -m pip install --quiet --disable-pip-version-check \
		--no-warn-script-location "$src"
	# pip and setuptools are build tools: the device never installs anything into this venv.
	"$venv/bin/python" -I -m pip uninstall --quiet --yes pip setuptools
	# Only the agent's entry point and the interpreter links: no activate scripts, no dependency
	# tools (dotenv, normalizer, ...) nobody on the device runs.
	find "$venv/bin" -mindepth 1 ! -name "$NAME" ! -name 'python*' -delete
	rmdir "$venv/include/python"* "$venv/include" 2>/dev/null || true
	# Optional metadata that would only record this machine's temporary build path.
	find "$venv" -name direct_url.json -path '*.dist-info/*' -delete
}

# The device package holds the device's code only (tests/system checks the .deb's file list too).
check_no_development_tools() {
	local venv=$1 found
	found=$(find "$venv" \( -name 'azaion_loader_dev*' -o -name 'azaion-loader-dev' \) -print -quit)
	[ -z "$found" ] || die "a development tool got into the package: $found"
	! grep -qs azaion_loader_dev "$venv"/lib/python*/site-packages/*.dist-info/entry_points.txt ||
		die "the package declares a development command"
}

# Point everything that names the staging path at the installed one.
relocate_venv() {
	local stage=$1 venv=$1$PREFIX file
	for file in "$venv"/bin/*; do
		[ -f "$file" ] && [ ! -L "$file" ] && sed -i "1s|^#!$venv/|#!$PREFIX/|" "$file"
	done
	sed -i "s|$venv|$PREFIX|g" "$venv/pyvenv.cfg"
	# Bytecode embeds source paths; postinst compiles it on the device instead.
	find "$venv" -depth -name __pycache__ -type d -exec rm -rf {} +
	find "$venv" -name '*.pyc' -delete
	if grep -rlI --fixed-strings "$stage" "$venv"; then
		die "files above still name the staging directory $stage"
	fi
}

strip_libraries() {
	find "$1" -type f -name '*.so*' -exec strip --strip-unneeded --remove-section=.comment \
		--remove-section=.note {} +
}

# Debian dependencies: the interpreter the venv was built on (its minor version exactly) and
# the system libraries the bundled extension modules link to.
debian_depends() {
	local stage=$1 work=$2 pyminor next shlibs
	pyminor=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
	next=$("$PYTHON" -c 'import sys; print("%d.%d" % (sys.version_info[0], sys.version_info[1] + 1))')
	mkdir -p "$work/shlibs/debian"
	printf 'Source: %s\n\nPackage: %s\nArchitecture: any\n' "$NAME" "$NAME" \
		>"$work/shlibs/debian/control"
	mapfile -t objects < <(find "$stage" -type f -name '*.so*')
	shlibs=$(cd "$work/shlibs" && dpkg-shlibdeps -O --ignore-missing-info \
		-l"$stage$PREFIX/lib" "${objects[@]}" 2>"$work/shlibdeps.log" |
		sed -n 's/^shlibs:Depends=//p') || {
		cat "$work/shlibdeps.log" >&2
		die "dpkg-shlibdeps failed"
	}
	echo "python$pyminor, python3 (>= $pyminor~), python3 (<< $next~), ${shlibs:+$shlibs, }systemd, init-system-helpers (>= 1.54~)"
}

# The bundled distributions and their licenses, from their metadata.
bundled_licenses() {
	"$1$PREFIX/bin/python" -I - <<'EOF'
from importlib.metadata import distributions

rows = []
for dist in distributions():
    meta = dist.metadata
    license = meta.get("License-Expression") or ""
    if not license:
        classifiers = [c.split(" :: ")[-1] for c in meta.get_all("Classifier") or []
                       if c.startswith("License ::")]
        license = " / ".join(classifiers) or (meta.get("License") or "see dist-info").split("\n")[0]
    rows.append(f" {meta['Name']} {dist.version}: {license.strip()[:70]}")
print("Files: opt/azaion-loader/lib/*")
print("Copyright: the authors of each bundled distribution, see its *.dist-info directory")
print("License: bundled")
print(" The virtual environment bundles these distributions, each under its own license:")
print(" .")
print("\n".join(sorted(rows, key=str.lower)))
EOF
}

install_files() {
	local stage=$1 version=$2 doc=$1/usr/share/doc/$NAME
	install -D -m 0644 "$REPO/systemd/$NAME.service" "$stage/lib/systemd/system/$NAME.service"
	install -D -m 0644 "$REPO/systemd/$NAME.socket" "$stage/lib/systemd/system/$NAME.socket"
	install -D -m 0644 "$PKG/sysusers.conf" "$stage/usr/lib/sysusers.d/$NAME.conf"
	install -D -m 0644 "$PKG/tmpfiles.conf" "$stage/usr/lib/tmpfiles.d/$NAME.conf"
	install -D -m 0644 "$PKG/loader.env" "$stage/etc/$NAME/loader.env"
	install -d "$stage/usr/bin"
	ln -s "$PREFIX/bin/$NAME" "$stage/usr/bin/$NAME"
	install -d "$doc/examples" "$stage/usr/share/man/man1" "$stage/usr/share/lintian/overrides"
	install -m 0644 "$REPO/docs/operations.md" "$doc/operations.md"
	install -m 0644 "$REPO"/systemd/examples/*.service "$doc/examples/"
	gzip -9n <"$PKG/changelog" >"$doc/changelog.gz"
	{ cat "$PKG/copyright.in"; bundled_licenses "$stage"; } >"$doc/copyright"
	sed "s/@VERSION@/$version/" "$PKG/$NAME.1" | gzip -9n >"$stage/usr/share/man/man1/$NAME.1.gz"
	install -m 0644 "$PKG/lintian-overrides" "$stage/usr/share/lintian/overrides/$NAME"
	shell_completions "$stage"
}

# bash and zsh completion, generated from the command line's own parser by the environment just
# built: -I only its own modules, -B no bytecode in the staging tree, env -i no setting of this
# machine (LOADER_SOCKET_PATH would change the default the scripts show).
shell_completions() {
	local stage=$1 bash_dir=$1/usr/share/bash-completion/completions
	local zsh_dir=$1/usr/share/zsh/vendor-completions
	install -d "$bash_dir" "$zsh_dir"
	env -i "$stage$PREFIX/bin/python" -I -B -m agent completion bash >"$bash_dir/$NAME"
	env -i "$stage$PREFIX/bin/python" -I -B -m agent completion zsh >"$zsh_dir/_$NAME"
}

write_control() {
	local stage=$1 version=$2 arch=$3 depends=$4 size
	install -d "$stage/DEBIAN"
	install -m 0755 "$PKG"/debian/postinst "$PKG"/debian/prerm "$PKG"/debian/postrm "$stage/DEBIAN/"
	echo "/etc/$NAME/loader.env" >"$stage/DEBIAN/conffiles"
	size=$(du -sk --apparent-size --exclude=DEBIAN "$stage" | cut -f1)
	sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@MAINTAINER@/$MAINTAINER/" \
		-e "s/@INSTALLED_SIZE@/$size/" -e "s/@DEPENDS@/$depends/" \
		"$PKG/debian/control.in" >"$stage/DEBIAN/control"
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
	# Nothing in the libraries is run as a program (extension modules are only mapped).
	find "$stage$PREFIX/lib" -type f -exec chmod 0644 {} +
	find "$stage" -exec touch --no-dereference --date="@$epoch" {} +
}

changelog_epoch() {
	local date
	date=$(sed -n 's/^ -- .*>  //p' "$PKG/changelog" | head -n 1)
	date --date="$date" +%s
}

main() {
	check_tools
	local version arch stage depends deb epoch
	version=$(project_version)
	arch=$(dpkg --print-architecture)
	epoch=${SOURCE_DATE_EPOCH:-$(changelog_epoch)}
	export SOURCE_DATE_EPOCH=$epoch
	WORK=$(mktemp -d "${TMPDIR:-/tmp}/$NAME-deb.XXXXXX")
	trap 'rm -rf "$WORK"' EXIT
	local work=$WORK
	stage=$work/root
	deb=$OUT/${NAME}_${version}_${arch}.deb
	echo "build-deb: $NAME $version for $arch on $("$PYTHON" -V) ($PYTHON)"
	copy_sources "$work/src"
	build_venv "$work/src" "$stage$PREFIX"
	check_no_development_tools "$stage$PREFIX"
	relocate_venv "$stage"
	strip_libraries "$stage$PREFIX"
	install_files "$stage" "$version"
	depends=$(debian_depends "$stage" "$work")
	write_control "$stage" "$version" "$arch" "$depends"
	normalize_tree "$stage" "$epoch"
	mkdir -p "$OUT"
	dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb" >/dev/null
	echo "build-deb: $deb ($(du -h "$deb" | cut -f1))"
}

main
