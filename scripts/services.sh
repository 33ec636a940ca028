#!/usr/bin/env bash
# Make sure the database servers the storage tests use are up, and that each has an
# `ombot_test` database. Idempotent; safe to run on a machine where they already run.
set -uo pipefail

log() { echo "services: $*" >&2; }

pg_up() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }
my_up() { mysqladmin -uroot -h 127.0.0.1 -P 3306 --connect-timeout=2 ping >/dev/null 2>&1; }

wait_for() {  # wait_for NAME CHECK
    for _ in $(seq 1 60); do "$2" && return 0; sleep 0.5; done
    log "$1 did not come up"; return 1
}

need_apt() {
    [ "$(id -u)" = 0 ] || { log "not root: cannot install $*"; return 1; }
    [ -n "${apt_updated:-}" ] || { apt-get update -qq; apt_updated=1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

if ! pg_up; then
    command -v pg_ctlcluster >/dev/null || need_apt postgresql
    if [ -z "$(ls /etc/postgresql 2>/dev/null)" ]; then pg_createcluster 15 main >/dev/null; fi
    log "starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
    wait_for PostgreSQL pg_up
fi
if ! my_up; then
    command -v mariadbd >/dev/null || [ -x /usr/sbin/mariadbd ] || need_apt mariadb-server
    log "starting MariaDB"
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld 2>/dev/null || true
    start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd -- --user=mysql
    wait_for MariaDB my_up
fi

if pg_up; then
    psql -h 127.0.0.1 -U postgres -tAc "select 1 from pg_database where datname='ombot_test'" | grep -q 1 \
        || psql -h 127.0.0.1 -U postgres -qc "create database ombot_test" \
        || log "could not create the PostgreSQL test database"
fi
if my_up; then
    mysql -uroot -h 127.0.0.1 -P 3306 -e "create database if not exists ombot_test" \
        || log "could not create the MariaDB test database"
fi
exit 0
