-- pgbench: a fresh name into a table with a plain local unique index.
INSERT INTO users_local (name) VALUES (gen_random_uuid()::text);
