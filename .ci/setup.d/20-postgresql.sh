#!/usr/bin/env bash
# PostgreSQL for the registry tests (tests/test_registry.py runs on SQLite and on this server): Debian's
# postgresql, started, with a role and a database for the tests. Safe to re-run. The tests find the server
# through /etc/fedmoe-test-postgres-url (or $FEDMOE_TEST_POSTGRES_URL).
set -euo pipefail
URL_FILE=/etc/fedmoe-test-postgres-url
ROLE=fedmoe_test
DB=fedmoe_test
PASSWORD=fedmoe_test
if ! command -v pg_lsclusters >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
VERSION=$(pg_lsclusters -h | awk 'NR == 1 {print $1}')
if [ -z "$VERSION" ]; then
    VERSION=$(ls /usr/lib/postgresql | sort -n | tail -1)
    pg_createcluster "$VERSION" main
fi
pg_ctlcluster "$VERSION" main start >/dev/null 2>&1 || pg_ctlcluster "$VERSION" main status >/dev/null
PORT=$(pg_lsclusters -h | awk -v v="$VERSION" '$1 == v && $2 == "main" {print $3}')
as_postgres() { (cd / && runuser -u postgres -- "$@"); }
for _ in $(seq 30); do as_postgres pg_isready -q -p "$PORT" && break; sleep 1; done
if [ -z "$(as_postgres psql -p "$PORT" -tAc "SELECT 1 FROM pg_roles WHERE rolname = '$ROLE'")" ]; then
    as_postgres psql -q -p "$PORT" -c "CREATE ROLE $ROLE LOGIN PASSWORD '$PASSWORD' CREATEDB"
fi
if [ -z "$(as_postgres psql -p "$PORT" -tAc "SELECT 1 FROM pg_database WHERE datname = '$DB'")" ]; then
    as_postgres psql -q -p "$PORT" -c "CREATE DATABASE $DB OWNER $ROLE"
fi
echo "postgresql+psycopg://$ROLE:$PASSWORD@127.0.0.1:$PORT/$DB" > "$URL_FILE"
echo "PostgreSQL $VERSION on port $PORT: $(cat "$URL_FILE")"
