-- One PostgreSQL for the services' metadata (infra/compose.yaml): a database and an
-- owner per service. Passwords are set from the environment by init-users.sh.
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
