// @generated shape of `diesel print-schema` for migrations/ (kept in step by hand:
// the same file serves both backends because the migrations use only common types).

diesel::table! {
    accounts (uuid) {
        uuid -> Text,
        identity_key -> Nullable<Binary>,
        next_device_id -> BigInt,
        created_at -> BigInt,
        unidentified_access_key -> Nullable<Binary>,
        unrestricted_unidentified_access -> Bool,
    }
}

diesel::table! {
    devices (account, device_id) {
        account -> Text,
        device_id -> BigInt,
        registration_id -> Integer,
        secret_salt -> Binary,
        secret_hash -> Binary,
        created_at -> BigInt,
        last_seen_at -> BigInt,
    }
}

diesel::table! {
    signed_pre_keys (account, device_id) {
        account -> Text,
        device_id -> BigInt,
        key_id -> BigInt,
        public_key -> Binary,
        signature -> Binary,
    }
}

diesel::table! {
    pq_last_resort_keys (account, device_id) {
        account -> Text,
        device_id -> BigInt,
        key_id -> BigInt,
        public_key -> Binary,
        signature -> Binary,
    }
}

diesel::table! {
    one_time_pre_keys (account, device_id, key_id) {
        account -> Text,
        device_id -> BigInt,
        key_id -> BigInt,
        public_key -> Binary,
    }
}

diesel::table! {
    pq_one_time_pre_keys (account, device_id, key_id) {
        account -> Text,
        device_id -> BigInt,
        key_id -> BigInt,
        public_key -> Binary,
        signature -> Binary,
    }
}

diesel::table! {
    provisioning_codes (code_hash) {
        code_hash -> Text,
        account -> Text,
        expires_at -> BigInt,
    }
}

diesel::table! {
    mailbox (account, device_id, guid) {
        account -> Text,
        device_id -> BigInt,
        guid -> Text,
        source -> Nullable<Text>,
        source_device -> Nullable<BigInt>,
        msg_type -> Integer,
        timestamp -> BigInt,
        server_timestamp -> BigInt,
        content -> Binary,
        key_id -> Nullable<Integer>,
        shared_id -> Nullable<Text>,
    }
}

diesel::table! {
    mailbox_shared (id) {
        id -> Text,
        key_id -> Nullable<Integer>,
        content -> Binary,
        created_at -> BigInt,
    }
}

diesel::table! {
    mailbox_counts (account, device_id) {
        account -> Text,
        device_id -> BigInt,
        messages -> BigInt,
    }
}

diesel::table! {
    vapid_key (id) {
        id -> Integer,
        private_key -> Binary,
        created_at -> BigInt,
    }
}

diesel::table! {
    push_subscriptions (account, device_id) {
        account -> Text,
        device_id -> BigInt,
        endpoint -> Text,
        p256dh -> Binary,
        auth -> Binary,
        created_at -> BigInt,
    }
}

diesel::joinable!(devices -> accounts (account));
diesel::joinable!(provisioning_codes -> accounts (account));

diesel::allow_tables_to_appear_in_same_query!(
    accounts,
    devices,
    signed_pre_keys,
    pq_last_resort_keys,
    one_time_pre_keys,
    pq_one_time_pre_keys,
    provisioning_codes,
    mailbox,
    mailbox_shared,
    mailbox_counts,
    vapid_key,
    push_subscriptions,
);
