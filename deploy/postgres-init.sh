#!/bin/sh
# The billing database beside Temporal's own; Alembic creates its schema when a worker starts.
set -e
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" <<SQL
CREATE ROLE billing LOGIN PASSWORD '${BILLING_DB_PASSWORD}';
CREATE DATABASE billing OWNER billing;
SQL
