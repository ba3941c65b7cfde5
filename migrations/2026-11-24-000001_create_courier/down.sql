DROP TABLE mailbox;
DROP TABLE provisioning_codes;
DROP TABLE pq_one_time_pre_keys;
DROP TABLE one_time_pre_keys;
DROP TABLE pq_last_resort_keys;
DROP TABLE signed_pre_keys;
DROP TABLE devices;
DROP TABLE accounts;
