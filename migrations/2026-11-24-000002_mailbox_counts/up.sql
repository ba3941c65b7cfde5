-- How many copies wait in each device's mailbox, kept in step with the
-- mailbox by every writer of it (mailbox writer, sweeper, deletions), so the
-- per-device cap is checked by reading one row instead of counting rows.
CREATE TABLE mailbox_counts (
    account TEXT NOT NULL,
    device_id BIGINT NOT NULL,
    messages BIGINT NOT NULL,
    PRIMARY KEY (account, device_id)
);

INSERT INTO mailbox_counts (account, device_id, messages)
    SELECT account, device_id, COUNT(*) FROM mailbox GROUP BY account, device_id;
