-- pgbench: a fresh name into a table with a local unique index and a trigger that only waits
-- 1 ms (sql/bench/wait_trigger/): what one extra wait per insert costs, with no cluster.
INSERT INTO users_wait (name) VALUES (gen_random_uuid()::text);
