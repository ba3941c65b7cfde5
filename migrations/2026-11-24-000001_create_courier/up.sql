-- One schema for SQLite and PostgreSQL: only types and clauses both accept.
-- UUIDs are stored as lowercase hyphenated TEXT, times as BIGINT milliseconds
-- since the epoch, binary values as BYTEA (SQLite keeps blobs as they are).

CREATE TABLE accounts (
    uuid TEXT PRIMARY KEY NOT NULL,
    -- 33-byte libsignal identity key; NULL until device 1 uploads its keys.
    identity_key BYTEA,
    -- Device ids are never reused, so an old device's mail can never reach a new one.
    next_device_id BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE devices (
    account TEXT NOT NULL REFERENCES accounts (uuid) ON DELETE CASCADE,
    device_id BIGINT NOT NULL,
    registration_id INTEGER NOT NULL,
    -- The device secret is kept only as SHA-256(salt || secret).
    secret_salt BYTEA NOT NULL,
    secret_hash BYTEA NOT NULL,
    created_at BIGINT NOT NULL,
    last_seen_at BIGINT NOT NULL,
    PRIMARY KEY (account, device_id)
);

CREATE TABLE signed_pre_keys (
    account TEXT NOT NULL,
    device_id BIGINT NOT NULL,
    key_id BIGINT NOT NULL,
    public_key BYTEA NOT NULL,
    signature BYTEA NOT NULL,
    PRIMARY KEY (account, device_id),
    FOREIGN KEY (account, device_id) REFERENCES devices (account, device_id) ON DELETE CASCADE
);

CREATE TABLE pq_last_resort_keys (
    account TEXT NOT NULL,
    device_id BIGINT NOT NULL,
    key_id BIGINT NOT NULL,
    public_key BYTEA NOT NULL,
    signature BYTEA NOT NULL,
    PRIMARY KEY (account, device_id),
    FOREIGN KEY (account, device_id) REFERENCES devices (account, device_id) ON DELETE CASCADE
);

CREATE TABLE one_time_pre_keys (
    account TEXT NOT NULL,
    device_id BIGINT NOT NULL,
    key_id BIGINT NOT NULL,
    public_key BYTEA NOT NULL,
    PRIMARY KEY (account, device_id, key_id),
    FOREIGN KEY (account, device_id) REFERENCES devices (account, device_id) ON DELETE CASCADE
);

CREATE TABLE pq_one_time_pre_keys (
    account TEXT NOT NULL,
    device_id BIGINT NOT NULL,
    key_id BIGINT NOT NULL,
    public_key BYTEA NOT NULL,
    signature BYTEA NOT NULL,
    PRIMARY KEY (account, device_id, key_id),
    FOREIGN KEY (account, device_id) REFERENCES devices (account, device_id) ON DELETE CASCADE
);

CREATE TABLE provisioning_codes (
    -- SHA-256 of the linking code, hex: the code itself is a credential.
    code_hash TEXT PRIMARY KEY NOT NULL,
    account TEXT NOT NULL REFERENCES accounts (uuid) ON DELETE CASCADE,
    expires_at BIGINT NOT NULL
);
CREATE INDEX provisioning_codes_expires_at ON provisioning_codes (expires_at);

-- Store-and-forward mailbox. No foreign key on purpose: the mailbox writer
-- commits spills in batches, and one spill racing a device deletion must not
-- fail the whole batch. Deleting a device or account deletes its mail in the
-- same transaction; ids are never reused, and retention sweeps any straggler.
CREATE TABLE mailbox (
    account TEXT NOT NULL,
    device_id BIGINT NOT NULL,
    -- UUIDv7: ordered by the time the server accepted the send, so the
    -- primary key is also the delivery order.
    guid TEXT NOT NULL,
    source TEXT NOT NULL,
    source_device BIGINT NOT NULL,
    msg_type INTEGER NOT NULL,
    timestamp BIGINT NOT NULL,
    server_timestamp BIGINT NOT NULL,
    content BYTEA NOT NULL,
    PRIMARY KEY (account, device_id, guid)
);
CREATE INDEX mailbox_server_timestamp ON mailbox (server_timestamp);
