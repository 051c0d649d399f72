#!/usr/bin/env bash
# Builds the installable packages of outbox_pg (the release build) into
# target/package/, per PostgreSQL major (default: 15 and 18):
#   outbox_pg-<version>-pg<major>-amd64.tar.gz    for any PostgreSQL of that
#       major: its install.sh copies the files where pg_config says
#   postgresql-<major>-outbox-pg_<version>_amd64.deb    where the server is
#       Debian's own (Depends: postgresql-<major>)
# Usage: scripts/package.sh [major ...]
# PG15_CONFIG and PG18_CONFIG name the pg_config of each major.
set -euo pipefail
cd "$(dirname "$0")/.."

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
out=target/package
mkdir -p "$out"

pg_config_of() {
    case $1 in
        15) echo "${PG15_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}" ;;
        18) echo "${PG18_CONFIG:-/opt/outbox_pg/pg18/bin/pg_config}" ;;
        *) echo "package: no pg_config known for PostgreSQL $1" >&2; exit 2 ;;
    esac
}

majors=("$@")
[ ${#majors[@]} -gt 0 ] || majors=(15 18)
for major in "${majors[@]}"; do
    pgc=$(pg_config_of "$major")
    "$pgc" --version | grep -q "^PostgreSQL $major\." \
        || { echo "package: $pgc is not PostgreSQL $major" >&2; exit 1; }
    pkglibdir=$("$pgc" --pkglibdir)
    extdir=$("$pgc" --sharedir)/extension
    stage=$(mktemp -d)
    trap 'rm -rf "$stage"' EXIT
    echo "== package: PostgreSQL $major (release build)"
    # cargo pgrx package lays the files out under their pg_config paths.
    cargo pgrx package --pg-config "$pgc" --out-dir "$stage/root"
    so="$stage/root$pkglibdir/outbox_pg.so"
    strip --strip-unneeded "$so"
    sql=("$stage/root$extdir"/outbox_pg*)

    # The tarball: lib/, extension/ and an installer that asks pg_config.
    name="outbox_pg-$version-pg$major-amd64"
    mkdir -p "$stage/$name/lib" "$stage/$name/extension"
    cp "$so" "$stage/$name/lib/"
    cp "${sql[@]}" "$stage/$name/extension/"
    sed -e "s/@MAJOR@/$major/g" -e "s/@VERSION@/$version/g" > "$stage/$name/install.sh" <<'EOF'
#!/bin/sh
# Installs outbox_pg @VERSION@ into the PostgreSQL @MAJOR@ that pg_config names
# (the first on PATH, or PG_CONFIG=/path/to/pg_config ./install.sh).
set -eu
cd "$(dirname "$0")"
PG_CONFIG=${PG_CONFIG:-pg_config}
major=$("$PG_CONFIG" --version | sed -n 's/^PostgreSQL \([0-9]*\).*/\1/p')
if [ "$major" != @MAJOR@ ]; then
    echo "this package is for PostgreSQL @MAJOR@; $PG_CONFIG is PostgreSQL $major" >&2
    exit 1
fi
lib=$("$PG_CONFIG" --pkglibdir)
ext=$("$PG_CONFIG" --sharedir)/extension
# Copied beside and renamed, so that running servers keep the old file.
cp lib/outbox_pg.so "$lib/.outbox_pg.so.new"
chmod 755 "$lib/.outbox_pg.so.new"
mv -f "$lib/.outbox_pg.so.new" "$lib/outbox_pg.so"
for f in extension/*; do
    cp "$f" "$ext/" && chmod 644 "$ext/$(basename "$f")"
done
echo "outbox_pg @VERSION@ installed into $lib and $ext"
EOF
    chmod 755 "$stage/$name/install.sh"
    tar -C "$stage" --owner=0 --group=0 -czf "$out/$name.tar.gz" "$name"
    echo "package: $out/$name.tar.gz"

    # The Debian package, where the server is Debian's.
    if [ "$pgc" = "/usr/lib/postgresql/$major/bin/pg_config" ] && command -v dpkg-deb >/dev/null; then
        deb="$stage/deb"
        mkdir -p "$deb/DEBIAN" "$deb$pkglibdir" "$deb$extdir" "$deb/usr/share/doc/postgresql-$major-outbox-pg"
        cp "$so" "$deb$pkglibdir/"
        cp "${sql[@]}" "$deb$extdir/"
        cp README.md "$deb/usr/share/doc/postgresql-$major-outbox-pg/"
        chmod -R u=rwX,go=rX "$deb"
        (cd "$deb" && find usr -type f -exec md5sum {} + > DEBIAN/md5sums)
        cat > "$deb/DEBIAN/control" <<EOF
Package: postgresql-$major-outbox-pg
Version: $version
Architecture: amd64
Maintainer: outbox_pg maintainers <maintainers@users.noreply.r-seed-36ebc6b5.example>
Depends: postgresql-$major
Section: database
Priority: optional
Installed-Size: $(du -sk --exclude=DEBIAN "$deb" | cut -f1)
Description: transactional outbox and idempotent inbox over STOMP for PostgreSQL $major
 outbox_pg gives any application the transactional outbox and the idempotent
 inbox over a STOMP broker (RabbitMQ, ActiveMQ), with nothing but SQL.
 Add outbox_pg to shared_preload_libraries, then CREATE EXTENSION outbox_pg.
EOF
        dpkg-deb --root-owner-group --build "$deb" "$out/postgresql-$major-outbox-pg_${version}_amd64.deb" >/dev/null
        echo "package: $out/postgresql-$major-outbox-pg_${version}_amd64.deb"
    fi
    rm -rf "$stage"
    trap - EXIT
done
