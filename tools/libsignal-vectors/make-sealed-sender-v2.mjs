// Sealed Sender v2 (multi-recipient) test vectors made by real libsignal.
//
// Usage (from this directory): npm ci && node make-sealed-sender-v2.mjs [OUT]
// OUT defaults to ../../tests/data/sealed-sender-v2.json (relative to this script).
//
// Everything is built with libsignal's own API and in-memory stores: identity keys,
// prekey bundles -> sessions (processPreKeyBundle), a sender certificate under a
// throw-away trust root, sealedSenderMultiRecipientEncrypt for the body, libsignal's
// server-side parser (SealedSenderMultiRecipientMessage) for each recipient's
// ReceivedMessage, and each recipient device decrypting its ReceivedMessage.
// Keys are random, so every run writes different bytes; the structure is fixed.

import { writeFileSync, readFileSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import * as SC from '@signalapp/libsignal-client';
import SealedSenderMultiRecipientMessage from '@signalapp/libsignal-client/dist/SealedSenderMultiRecipientMessage.js';
import { Sessions, Identities, PreKeys, SignedPreKeys, KyberPreKeys, SenderKeys } from './stores.mjs';

const here = dirname(fileURLToPath(import.meta.url));
const out = resolve(process.argv[2] ?? resolve(here, '../../tests/data/sealed-sender-v2.json'));
const libsignalVersion = JSON.parse(
  readFileSync(resolve(here, 'node_modules/@signalapp/libsignal-client/package.json'), 'utf8')
).version;

const b64 = (u8) => Buffer.from(u8).toString('base64');
const u8 = (buf) => new Uint8Array(buf);
const eq = (a, b) => Buffer.compare(Buffer.from(a), Buffer.from(b)) === 0;
function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
}

// ---------------------------------------------------------------- parties
const trustRoot = SC.PrivateKey.generate();
const serverKey = SC.PrivateKey.generate();
const serverCert = SC.ServerCertificate.new(1, serverKey.getPublicKey(), trustRoot);
const TIMESTAMP = 1_700_000_000_000;
const EXPIRES = 4_102_444_800_000; // 2100-01-01, milliseconds

const sender = {
  uuid: '0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d',
  deviceId: 1,
  identity: SC.PrivateKey.generate(),
  registrationId: 77,
};
sender.address = SC.ProtocolAddress.new(sender.uuid, sender.deviceId);
sender.identities = new Identities(sender.identity, sender.registrationId);
sender.sessions = new Sessions();
sender.cert = SC.SenderCertificate.new(
  sender.uuid, null, sender.deviceId, sender.identity.getPublicKey(), EXPIRES, serverCert, serverKey
);

// Recipient accounts: one identity key per account, one registration id per device.
// 16383 = 0x3FFF is the largest registration id the format can carry.
const accounts = {
  A: { uuid: '11111111-2222-4333-8444-555555555555', devices: { 1: 4242, 2: 16383 } },
  B: { uuid: '66666666-7777-4888-9999-aaaaaaaaaaaa', devices: { 1: 1 } },
};
// Accounts named only as excluded recipients (no devices in the body).
const EXCLUDED_ACI = 'cccccccc-dddd-4eee-8fff-000000000000';
const EXCLUDED_PNI = 'PNI:dddddddd-eeee-4fff-8000-111111111111';

let keyId = 100;
for (const acct of Object.values(accounts)) {
  acct.identity = SC.PrivateKey.generate();
  acct.device = {};
  for (const [idStr, regId] of Object.entries(acct.devices)) {
    const deviceId = Number(idStr);
    const d = {
      deviceId,
      registrationId: regId,
      address: SC.ProtocolAddress.new(acct.uuid, deviceId),
      identities: new Identities(acct.identity, regId),
      sessions: new Sessions(),
      preKeys: new PreKeys(),
      signedPreKeys: new SignedPreKeys(),
      kyberPreKeys: new KyberPreKeys(),
    };
    const pre = SC.PrivateKey.generate();
    const spk = SC.PrivateKey.generate();
    const kyber = SC.KEMKeyPair.generate();
    const [preId, spkId, kyberId] = [keyId++, keyId++, keyId++];
    const spkSig = acct.identity.sign(spk.getPublicKey().serialize());
    const kyberSig = acct.identity.sign(kyber.getPublicKey().serialize());
    await d.preKeys.savePreKey(preId, SC.PreKeyRecord.new(preId, pre.getPublicKey(), pre));
    await d.signedPreKeys.saveSignedPreKey(
      spkId, SC.SignedPreKeyRecord.new(spkId, 42, spk.getPublicKey(), spk, spkSig)
    );
    await d.kyberPreKeys.saveKyberPreKey(kyberId, SC.KyberPreKeyRecord.new(kyberId, 42, kyber, kyberSig));
    const bundle = SC.PreKeyBundle.new(
      regId, deviceId, preId, pre.getPublicKey(), spkId, spk.getPublicKey(), spkSig,
      acct.identity.getPublicKey(), kyberId, kyber.getPublicKey(), kyberSig
    );
    // The sender's session with this device, as a client makes it from a fetched bundle.
    await SC.processPreKeyBundle(bundle, d.address, sender.address, sender.sessions, sender.identities);
    acct.device[deviceId] = d;
  }
}
const A1 = accounts.A.device[1];
const A2 = accounts.A.device[2];
const B1 = accounts.B.device[1];
const accountOf = (d) => Object.values(accounts).find((a) => Object.values(a.device).includes(d));

// ---------------------------------------------------------------- helpers
// libsignal's server-side view of a body: recipients, excluded recipients, ReceivedMessages.
function serverView(body) {
  const parsed = new SealedSenderMultiRecipientMessage(u8(body));
  const byId = parsed.recipientsByServiceIdString();
  const recipients = Object.entries(byId).map(([serviceId, r]) => ({
    serviceId,
    devices: r.deviceIds.map((deviceId, i) => ({ deviceId, registrationId: r.registrationIds[i] })),
    receivedMessage: parsed.messageForRecipient(r),
  }));
  return { recipients, excluded: [...parsed.excludedRecipientServiceIdStrings()] };
}

// A group (sender key) message: the content real clients send through SSv2.
async function groupBody(label, destinations, excluded, plaintext) {
  const distributionId = crypto.randomUUID();
  const senderKeys = new SenderKeys();
  const skdm = await SC.SenderKeyDistributionMessage.create(sender.address, distributionId, senderKeys);
  const ctext = await SC.groupEncrypt(sender.address, distributionId, senderKeys, plaintext);
  const usmc = SC.UnidentifiedSenderMessageContent.new(
    ctext, sender.cert, SC.ContentHint.Implicit, u8(Buffer.from('courier-test-group'))
  );
  const body = await SC.sealedSenderMultiRecipientEncrypt({
    content: usmc,
    recipients: destinations.map((d) => d.address),
    excludedRecipients: excluded.map((s) => SC.ServiceId.parseFromServiceIdString(s)),
    identityStore: sender.identities,
    sessionStore: sender.sessions,
  });
  return { label, body, skdm };
}

// Each destination device opens its account's ReceivedMessage: the sealed-sender layer with
// sealedSenderDecryptToUsmc (the account's identity key), the certificate against the trust
// root, then the group layer with groupDecrypt after processing the sender key distribution.
async function decryptGroup(view, skdm, devices) {
  const results = [];
  for (const d of devices) {
    const acct = accountOf(d);
    const r = view.recipients.find((x) => x.serviceId === acct.uuid);
    const usmc = await SC.sealedSenderDecryptToUsmc(r.receivedMessage, d.identities);
    check(usmc.senderCertificate().validate(trustRoot.getPublicKey(), TIMESTAMP), 'sender certificate');
    check(usmc.senderCertificate().senderUuid() === sender.uuid, 'sender uuid');
    const store = new SenderKeys();
    await SC.processSenderKeyDistributionMessage(
      sender.address, SC.SenderKeyDistributionMessage.deserialize(skdm.serialize()), store
    );
    const pt = await SC.groupDecrypt(sender.address, store, usmc.contents());
    results.push({ account: acct.uuid, deviceId: d.deviceId, plaintext: pt });
  }
  return results;
}

function vector(label, body, view, extra) {
  return {
    name: label,
    body: b64(body),
    version: body[0],
    recipients: view.recipients.map((r) => ({
      serviceId: r.serviceId,
      devices: r.devices,
      receivedMessage: b64(r.receivedMessage),
    })),
    excluded: view.excluded,
    ...extra,
  };
}

const vectors = [];

// 1. The main vector: A (devices 1, 2) and B (device 1), each account's devices contiguous.
{
  const plaintext = u8(Buffer.from('hello from libsignal sealed sender v2'));
  const { body, skdm } = await groupBody('group-a2-b1', [A1, A2, B1], [], plaintext);
  const view = serverView(body);
  const dec = await decryptGroup(view, skdm, [A1, A2, B1]);
  for (const x of dec) check(eq(x.plaintext, plaintext), `plaintext for ${x.account}.${x.deviceId}`);
  vectors.push(vector('group-a2-b1', body, view, {
    courier: 'accept',
    plaintext: b64(plaintext),
    decrypted: dec.map((x) => ({ account: x.account, deviceId: x.deviceId, via: 'sealedSenderDecryptToUsmc+groupDecrypt' })),
  }));

  // 1b. The same body rewritten to the 0x22 layout (16-byte UUIDs instead of 17-byte
  // ServiceId binary): libsignal 0.103 only writes 0x23, but its parser still reads 0x22.
  // Made by hand from (1), then checked with libsignal's own parser: its ReceivedMessages
  // must equal those of (1) byte for byte, and decrypt.
  const v22 = rewriteTo22(body);
  const view22 = serverView(v22);
  check(view22.recipients.length === view.recipients.length, '0x22 recipients');
  view22.recipients.forEach((r, i) => {
    check(r.serviceId === view.recipients[i].serviceId, '0x22 service id');
    check(eq(r.receivedMessage, view.recipients[i].receivedMessage), '0x22 received message');
  });
  const dec22 = await decryptGroup(view22, skdm, [A1, A2, B1]);
  for (const x of dec22) check(eq(x.plaintext, plaintext), '0x22 plaintext');
  vectors.push(vector('group-a2-b1-v22', v22, view22, {
    courier: 'accept',
    plaintext: b64(plaintext),
    derivedFrom: 'group-a2-b1',
    decrypted: dec22.map((x) => ({ account: x.account, deviceId: x.deviceId, via: 'sealedSenderDecryptToUsmc+groupDecrypt' })),
  }));
}

// 2. With an excluded recipient (an ACI written with device id 0 and no key material).
{
  const plaintext = u8(Buffer.from('excluded recipients are listed, not delivered'));
  const { body, skdm } = await groupBody('group-excluded-aci', [A1, A2, B1], [EXCLUDED_ACI], plaintext);
  const view = serverView(body);
  const dec = await decryptGroup(view, skdm, [A1, A2, B1]);
  for (const x of dec) check(eq(x.plaintext, plaintext), 'plaintext (excluded)');
  vectors.push(vector('group-excluded-aci', body, view, {
    courier: 'accept',
    plaintext: b64(plaintext),
    decrypted: dec.map((x) => ({ account: x.account, deviceId: x.deviceId, via: 'sealedSenderDecryptToUsmc+groupDecrypt' })),
  }));
}

// 3. An excluded PNI: libsignal accepts it; courier has no PNIs and refuses the body.
{
  const plaintext = u8(Buffer.from('pni'));
  const { body } = await groupBody('group-excluded-pni', [B1], [EXCLUDED_PNI], plaintext);
  vectors.push(vector('group-excluded-pni', body, serverView(body), { courier: 'reject:pni' }));
}

// 4. A's devices not contiguous in the destination list: libsignal writes A twice (with the
// same key material) and its parser merges the two; so does courier.
{
  const plaintext = u8(Buffer.from('interleaved'));
  const { body } = await groupBody('group-interleaved', [A1, B1, A2], [], plaintext);
  vectors.push(vector('group-interleaved', body, serverView(body), { courier: 'accept' }));
}

// 5. One recipient device and a 1:1 (PreKeySignalMessage) content, so the full client call
// sealedSenderDecryptMessage can open what courier would deliver.
{
  const plaintext = u8(Buffer.from('one-to-one content through the multi-recipient endpoint'));
  const ctext = await SC.signalEncrypt(plaintext, B1.address, sender.address, sender.sessions, sender.identities, new Date(TIMESTAMP));
  const usmc = SC.UnidentifiedSenderMessageContent.new(ctext, sender.cert, SC.ContentHint.Default, null);
  const body = await SC.sealedSenderMultiRecipientEncrypt({
    content: usmc, recipients: [B1.address], identityStore: sender.identities, sessionStore: sender.sessions,
  });
  const view = serverView(body);
  const res = await SC.sealedSenderDecryptMessage(
    view.recipients[0].receivedMessage, trustRoot.getPublicKey(), TIMESTAMP, null,
    accounts.B.uuid, 1, B1.sessions, B1.identities, B1.preKeys, B1.signedPreKeys, B1.kyberPreKeys
  );
  check(eq(res.message(), plaintext), 'sealedSenderDecryptMessage plaintext');
  check(res.senderUuid() === sender.uuid && res.deviceId() === sender.deviceId, 'sealedSenderDecryptMessage sender');
  vectors.push(vector('prekey-b1', body, view, {
    courier: 'accept',
    plaintext: b64(plaintext),
    decrypted: [{ account: accounts.B.uuid, deviceId: 1, via: 'sealedSenderDecryptMessage' }],
  }));
}

// 0x23 -> 0x22: drop the ServiceId kind byte (ACIs only) of every recipient entry.
function rewriteTo22(body) {
  const b = Buffer.from(body);
  check(b[0] === 0x23, 'version 0x23');
  const out = [0x22];
  let i = 1;
  let count = 0;
  let shift = 0;
  for (;;) {
    const byte = b[i++];
    out.push(byte);
    count |= (byte & 0x7f) << shift;
    shift += 7;
    if (!(byte & 0x80)) break;
  }
  for (let r = 0; r < count; r++) {
    check(b[i] === 0x00, 'ACI kind byte');
    out.push(...b.subarray(i + 1, i + 17));
    i += 17;
    let more = true;
    let any = false;
    while (more) {
      const dev = b[i++];
      out.push(dev);
      if (dev === 0) { check(!any, 'excluded marker'); break; }
      any = true;
      const reg = b.readUInt16BE(i);
      out.push(b[i], b[i + 1]);
      i += 2;
      more = (reg & 0x8000) !== 0;
    }
    if (any) { out.push(...b.subarray(i, i + 48)); i += 48; }
  }
  out.push(...b.subarray(i));
  return u8(Buffer.from(out));
}

const doc = {
  generator: `@signalapp/libsignal-client ${libsignalVersion} (tools/libsignal-vectors/make-sealed-sender-v2.mjs)`,
  note: 'Sealed Sender v2 SentMessage bodies from sealedSenderMultiRecipientEncrypt and, per recipient, the ReceivedMessage from libsignal\'s server-side SealedSenderMultiRecipientMessage.messageForRecipient. Keys are random per run; see tests/data/README.md.',
  sender: { uuid: sender.uuid, deviceId: sender.deviceId, identityPublic: b64(sender.identity.getPublicKey().serialize()) },
  trustRootPublic: b64(trustRoot.getPublicKey().serialize()),
  timestamp: TIMESTAMP,
  accounts: Object.fromEntries(Object.entries(accounts).map(([k, a]) => [k, {
    uuid: a.uuid,
    devices: Object.entries(a.devices).map(([id, reg]) => ({ deviceId: Number(id), registrationId: reg })),
    identityPublic: b64(a.identity.getPublicKey().serialize()),
    identityPrivate: b64(a.identity.serialize()),
  }])),
  vectors,
};
writeFileSync(out, JSON.stringify(doc, null, 2) + '\n');
console.log(`wrote ${out}: ${vectors.map((v) => `${v.name} (${Buffer.from(v.body, 'base64').length} B, ${v.courier})`).join(', ')}`);
