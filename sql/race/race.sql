-- pgbench: insert a name from a small shared pool (most attempts collide, across shards and
-- within one), or delete one so that it can be taken again, anywhere.
\set n random(1, :pool)
\set op random(1, 4)
\if :op = 1
DELETE FROM users WHERE name = 'user' || :n;
\else
SELECT race_insert('user' || :n);
\endif
