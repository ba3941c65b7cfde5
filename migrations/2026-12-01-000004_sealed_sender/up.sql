-- Sealed sender (SPEC "Sealed sender") and mailbox encryption at rest.

-- An account's unidentified-access key (16 bytes, or NULL for none) and
-- whether anyone may send to it without one.
ALTER TABLE accounts ADD COLUMN unidentified_access_key BYTEA;
ALTER TABLE accounts ADD COLUMN unrestricted_unidentified_access BOOLEAN NOT NULL DEFAULT FALSE;

-- The mailbox, rebuilt because SQLite cannot drop NOT NULL in place:
-- `source` and `source_device` are NULL for a sealed-sender copy (the server
-- does not know who sent it) and for a row encrypted at rest (they are then
-- inside `content`, under key `key_id`).
CREATE TABLE mailbox_v4 (
    account TEXT NOT NULL,
    device_id BIGINT NOT NULL,
    guid TEXT NOT NULL,
    source TEXT,
    source_device BIGINT,
    msg_type INTEGER NOT NULL,
    timestamp BIGINT NOT NULL,
    server_timestamp BIGINT NOT NULL,
    content BYTEA NOT NULL,
    key_id INTEGER,
    PRIMARY KEY (account, device_id, guid)
);
INSERT INTO mailbox_v4 (account, device_id, guid, source, source_device, msg_type,
                        timestamp, server_timestamp, content)
    SELECT account, device_id, guid, source, source_device, msg_type,
           timestamp, server_timestamp, content
    FROM mailbox;
DROP TABLE mailbox;
ALTER TABLE mailbox_v4 RENAME TO mailbox;
CREATE INDEX mailbox_server_timestamp ON mailbox (server_timestamp);
