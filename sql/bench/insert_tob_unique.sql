-- pgbench: a fresh name into a table whose names tob_unique claims across every database.
INSERT INTO users_tob (name) VALUES (gen_random_uuid()::text);
