-- Sealed and encrypted rows cannot go back to a table that requires a
-- sender in the clear: they are dropped.
CREATE TABLE mailbox_v3 (
    account TEXT NOT NULL,
    device_id BIGINT NOT NULL,
    guid TEXT NOT NULL,
    source TEXT NOT NULL,
    source_device BIGINT NOT NULL,
    msg_type INTEGER NOT NULL,
    timestamp BIGINT NOT NULL,
    server_timestamp BIGINT NOT NULL,
    content BYTEA NOT NULL,
    PRIMARY KEY (account, device_id, guid)
);
INSERT INTO mailbox_v3 (account, device_id, guid, source, source_device, msg_type,
                        timestamp, server_timestamp, content)
    SELECT account, device_id, guid, source, source_device, msg_type,
           timestamp, server_timestamp, content
    FROM mailbox
    WHERE source IS NOT NULL AND key_id IS NULL AND shared_id IS NULL;
DROP TABLE mailbox;
ALTER TABLE mailbox_v3 RENAME TO mailbox;
CREATE INDEX mailbox_server_timestamp ON mailbox (server_timestamp);
DROP TABLE mailbox_shared;
ALTER TABLE accounts DROP COLUMN unrestricted_unidentified_access;
ALTER TABLE accounts DROP COLUMN unidentified_access_key;
DELETE FROM mailbox_counts;
INSERT INTO mailbox_counts (account, device_id, messages)
    SELECT account, device_id, COUNT(*) FROM mailbox GROUP BY account, device_id;
