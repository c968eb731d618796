#!/usr/bin/env bash
# Start the local services the tests use, if they are not already up. Idempotent.
set -u
pg_up() { pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; }
if command -v pg_ctlcluster >/dev/null 2>&1 && ! pg_up; then
  echo "services: starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  for _ in $(seq 1 30); do pg_up && break; sleep 1; done
fi
pg_up && echo "services: PostgreSQL up" || echo "services: PostgreSQL unavailable (its tests will skip)"
if command -v redis-cli >/dev/null 2>&1 && ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  echo "services: starting Redis"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null || true
  for _ in $(seq 1 20); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 0.5; done
fi
redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && echo "services: Redis up" || echo "services: Redis unavailable (its tests will skip)"
# Prometheus (Debian package) for the real-Prometheus metrics tests. Installed only when
# missing and we are root; the package's own service is not started (tests run their own).
if ! command -v prometheus >/dev/null 2>&1 && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "services: installing prometheus (apt)"
  bash "$(dirname "$0")/heartbeat.sh" "services: installing prometheus" bash -c "(apt-get update -qq && \
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus) >/dev/null 2>&1" || true
fi
command -v prometheus >/dev/null 2>&1 && echo "services: prometheus $(prometheus --version 2>&1 | head -n1 | awk '{print $3}')" \
  || echo "services: prometheus unavailable (its tests will skip)"
exit 0
