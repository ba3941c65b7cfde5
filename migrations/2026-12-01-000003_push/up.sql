-- Web Push (SPEC "Push").

-- The server's VAPID key pair: one row, created by the first node to start
-- (INSERT ... ON CONFLICT DO NOTHING, then read back), so every node of a
-- cluster signs with the same key and clients subscribe once for all.
CREATE TABLE vapid_key (
    id INTEGER PRIMARY KEY NOT NULL,
    -- The P-256 secret scalar, 32 bytes big-endian.
    private_key BYTEA NOT NULL,
    created_at BIGINT NOT NULL
);

-- A device's push subscription (a browser's PushSubscription): one per device.
CREATE TABLE push_subscriptions (
    account TEXT NOT NULL,
    device_id BIGINT NOT NULL,
    endpoint TEXT NOT NULL,
    -- The subscription's P-256 public key (65 bytes, uncompressed) and its
    -- 16-byte auth secret (RFC 8291).
    p256dh BYTEA NOT NULL,
    auth BYTEA NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (account, device_id),
    FOREIGN KEY (account, device_id) REFERENCES devices (account, device_id) ON DELETE CASCADE
);
