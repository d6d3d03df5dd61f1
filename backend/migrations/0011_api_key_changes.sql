-- 0011: every change to an API key (revoked, deleted, role or carrier changed) is announced on the
-- `molo_keys` channel with the key's id, on COMMIT and by whatever made it (`molo keys revoke`, or
-- plain SQL). Each API process listens (backend/api/stream.py) and drops the key from its cache of
-- key lookups (backend/api/auth.py) and ends the key's live streams if it was revoked, so a
-- revocation takes effect at once in every process. Same on both storage flavours.
CREATE FUNCTION molo_api_key_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('molo_keys', OLD.key_id);
    RETURN NULL;
END
$$;

CREATE TRIGGER api_keys_changed
    AFTER UPDATE OR DELETE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION molo_api_key_changed();
