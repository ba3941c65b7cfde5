#!/usr/bin/env python3
"""Seed inputs for the fuzz targets.

    python3 fuzz/make_seeds.py            # vector-derived seeds -> fuzz/corpus/<target>/ (gitignored)
    python3 fuzz/make_seeds.py --checked-in   # regenerate fuzz/seeds/<target>/ (committed)

The checked-in seeds (fuzz/seeds) hold no libsignal material: their keys are random bytes with the
right type byte and length, so they decode but never verify. Seeds with real, verifying XEdDSA
signatures come from the repository's test data, tests/data/libsignal-keys.json, and Sealed Sender v2
bodies written by libsignal from tests/data/sealed-sender-v2.json; this script writes them into the
gitignored fuzz/corpus/ rather than committing a second copy.
"""
import base64
import json
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
VECTORS = os.path.join(HERE, "..", "tests", "data", "libsignal-keys.json")
SSV2_VECTORS = os.path.join(HERE, "..", "tests", "data", "sealed-sender-v2.json")
UUID = "6f1c3d2e-8b4a-4c1e-9f00-0123456789ab"


def b64(b):
    return base64.b64encode(b).decode()


def write(root, target, name, data):
    d = os.path.join(HERE, root, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    elif not isinstance(data, bytes):
        data = json.dumps(data, separators=(",", ":")).encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def checked_in():
    rng = random.Random(20240601)
    rnd = lambda n: bytes(rng.getrandbits(8) for _ in range(n))
    ec = lambda: b64(b"\x05" + rnd(32))
    kyber = lambda: b64(b"\x08" + rnd(1568))
    sig = lambda: b64(rnd(64))
    copy = lambda d, reg, content: {
        "destinationDeviceId": d,
        "destinationRegistrationId": reg,
        "type": 1,
        "content": b64(content),
    }
    one = {"timestamp": 1700000000000, "messages": [copy(1, 42, b"hello")]}
    two = {"timestamp": 1700000000000, "online": False,
           "messages": [copy(1, 42, b"hello"), copy(2, 16380, rnd(48))]}
    ephemeral = {"timestamp": 1, "online": True, "messages": [copy(3, 1, b"\x00")]}
    for name, body in [("one", one), ("two", two), ("ephemeral", ephemeral),
                       ("empty", {"timestamp": 0, "messages": []})]:
        write("seeds", "send_body", name, body)
        write("seeds", "ws_frame", "send-" + name,
              {"op": "send", "id": 7, "destination": UUID, **body})
    write("seeds", "ws_frame", "send-big-id",
          '{"op":"send","id":18446744073709551615,"destination":"%s","timestamp":5,"messages":[]}' % UUID)
    write("seeds", "ws_frame", "send-invalid", {"op": "send", "id": -3, "destination": UUID})
    write("seeds", "ws_frame", "ack", {"op": "ack", "guid": "01a20be5-4993-7263-9937-da3d464f9b8c"})
    write("seeds", "ws_frame", "unknown-op", {"op": "dance", "id": 1})

    write("seeds", "key_upload", "identity-only", {"identityKey": ec()})
    write("seeds", "key_upload", "full", {
        "identityKey": ec(),
        "signedPreKey": {"keyId": 1, "publicKey": ec(), "signature": sig()},
        "preKeys": [{"keyId": i, "publicKey": ec()} for i in range(3)],
        "pqLastResortPreKey": {"keyId": 2, "publicKey": kyber(), "signature": sig()},
        "pqPreKeys": [{"keyId": 9, "publicKey": kyber(), "signature": sig()}],
    })
    write("seeds", "key_upload", "one-time", {
        "identityKey": ec(), "preKeys": [{"keyId": 4294967295, "publicKey": ec()}]})

    write("seeds", "account_bodies", "register",
          {"password": "0123456789abcdef0123", "registrationId": 42})
    write("seeds", "account_bodies", "register-token",
          {"password": "0123456789abcdef0123", "registrationId": 16380, "registrationToken": "t"})
    write("seeds", "account_bodies", "link",
          {"code": "q1w2e3r4t5y6u7i8o9p0aa", "password": "0123456789abcdef0123", "registrationId": 1})
    for name, text in [("address", UUID + ".7"), ("address-primary", UUID), ("device", "42"),
                       ("rate-h", "20/h"), ("rate-30s", "5/30s"), ("rate-min", "6000/min"),
                       ("rate-d", "1/d"),
                       # Found by this target: `n * unit` overflowed in `Rate::from_str`.
                       ("rate-overflow", "2/8888488888888881h")]:
        write("seeds", "account_bodies", name, text)

    write("seeds", "key_decoders", "raw", b"\x00" + b"\x05" + rnd(32) + rnd(64) + b"\x05" + rnd(32))
    write("seeds", "key_decoders", "ec", "\x01" + "\n".join([ec(), ec(), sig()]))
    write("seeds", "key_decoders", "kyber", "\x01" + "\n".join([ec(), kyber(), sig()]))

    # Sealed Sender v2 SentMessages in libsignal's layout, random key material and ciphertext
    # (see src/domain/sealed_v2.rs). Entries: (kind, uuid bytes, [(device, registration id)]);
    # no devices = an excluded recipient.
    def ssv2(version, entries, ciphertext_len):
        out = bytearray([version, len(entries)])
        for kind, uid, devices in entries:
            if version == 0x23:
                out.append(kind)
            out += uid
            if not devices:
                out.append(0)
                continue
            for i, (d, reg) in enumerate(devices):
                more = 0x8000 if i + 1 < len(devices) else 0
                out.append(d)
                out += (reg | more).to_bytes(2, "big")
            out += rnd(48)
        return bytes(out) + rnd(32) + rnd(ciphertext_len)
    a, b, c = rnd(16), rnd(16), rnd(16)
    two = [(0, a, [(1, 4242), (2, 16383)]), (0, b, [(1, 1)])]
    write("seeds", "sealed_v2_parse", "two-recipients", ssv2(0x23, two, 64))
    write("seeds", "sealed_v2_parse", "two-recipients-v22", ssv2(0x22, two, 64))
    write("seeds", "sealed_v2_parse", "excluded", ssv2(0x23, two + [(0, c, [])], 17))
    write("seeds", "sealed_v2_parse", "pni", ssv2(0x23, [(1, c, [(3, 9)])], 20))
    write("seeds", "sealed_v2_parse", "repeated", ssv2(0x23, [(0, a, [(1, 1)]), (0, a, [(2, 2)])], 20))


TARGETS = ["ws_frame", "send_body", "key_upload", "account_bodies", "key_decoders",
           "sealed_v2_parse"]


def from_vectors():
    # libFuzzer wants the output corpus directory to exist, vector seeds or not.
    for target in TARGETS:
        os.makedirs(os.path.join(HERE, "corpus", target), exist_ok=True)
    with open(VECTORS) as f:
        vectors = json.load(f)
    for i, v in enumerate(vectors["valid"]):
        pq = v["pqLastResortPreKey"]
        write("corpus", "key_upload", "vector-%d" % i, v)
        # The last-resort Kyber key, signed by the same identity, reused as one-time PQ keys.
        with_pq = dict(v, pqPreKeys=[dict(pq, keyId=300 + j) for j in range(2)])
        write("corpus", "key_upload", "vector-%d-pq" % i, with_pq)
        spk = v["signedPreKey"]
        write("corpus", "key_decoders", "vector-%d-ec" % i,
              "\x01" + "\n".join([v["identityKey"], spk["publicKey"], spk["signature"]]))
        write("corpus", "key_decoders", "vector-%d-kyber" % i,
              "\x01" + "\n".join([v["identityKey"], pq["publicKey"], pq["signature"]]))
        raw = lambda s: base64.b64decode(s)
        write("corpus", "key_decoders", "vector-%d-raw" % i,
              b"\x00" + raw(v["identityKey"]) + raw(spk["signature"]) + raw(spk["publicKey"]))
    for i, v in enumerate(vectors["invalid"]):
        spk = v["signedPreKey"]
        write("corpus", "key_decoders", "invalid-%d" % i,
              "\x01" + "\n".join([v["identityKey"], spk["publicKey"], spk["signature"]]))
        write("corpus", "key_upload", "invalid-%d" % i, v)
    # Sealed Sender v2 bodies written by libsignal's sealedSenderMultiRecipientEncrypt.
    with open(SSV2_VECTORS) as f:
        for v in json.load(f)["vectors"]:
            write("corpus", "sealed_v2_parse", v["name"], base64.b64decode(v["body"]))


if __name__ == "__main__":
    if "--checked-in" in sys.argv[1:]:
        checked_in()
    else:
        from_vectors()
