#!/usr/bin/env bash
# Runs once, on an empty data directory (postgres image's /docker-entrypoint-initdb.d).
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres <<SQL
CREATE USER mlflow WITH PASSWORD '${MLFLOW_DB_PASSWORD}';
CREATE USER prefect WITH PASSWORD '${PREFECT_DB_PASSWORD}';
ALTER DATABASE mlflow OWNER TO mlflow;
ALTER DATABASE prefect OWNER TO prefect;
SQL
