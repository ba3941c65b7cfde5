-- Sealed sender (SPEC "Sealed sender") and mailbox encryption at rest.

-- An account's unidentified-access key (16 bytes, or NULL for none) and
-- whether anyone may send to it without one.
ALTER TABLE accounts ADD COLUMN unidentified_access_key BYTEA;
ALTER TABLE accounts ADD COLUMN unrestricted_unidentified_access BOOLEAN NOT NULL DEFAULT FALSE;

-- The part of a multi-recipient (Sealed Sender v2) message that every
-- recipient's copy ends with, stored once however many copies are queued: a
-- mailbox row names it in `shared_id`, and its own `content` is then only its
-- recipient's prefix. The sweeper removes a payload once no row names it
-- (and it has not been written again for an hour).
CREATE TABLE mailbox_shared (
    id TEXT PRIMARY KEY NOT NULL,
    -- NULL: in the clear; else the storage key that sealed `content`.
    key_id INTEGER,
    content BYTEA NOT NULL,
    created_at BIGINT NOT NULL
);

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
    shared_id TEXT,
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
CREATE INDEX mailbox_shared_id ON mailbox (shared_id);
