-- One shard of the pgbench race (scripts/pgbench-race.sh): usernames unique across every
-- shard through tob_unique, no local unique index.
CREATE EXTENSION tob;
CREATE TABLE users (id bigserial PRIMARY KEY, name text NOT NULL);
CREATE TRIGGER users_unique AFTER INSERT OR UPDATE OR DELETE ON users
    FOR EACH ROW EXECUTE FUNCTION tob_unique('race_users', 'name');
-- pgbench stops a client at its first error; a name taken elsewhere is an expected outcome
-- of the race, so it is counted instead.
CREATE FUNCTION race_insert(p_name text) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO users (name) VALUES (p_name);
    RETURN true;
EXCEPTION WHEN unique_violation THEN
    RETURN false;
END $$;
