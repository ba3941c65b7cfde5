DROP TABLE mailbox_counts;
