// Sealed-sender interoperability check: an unmodified libsignal client against a live courier.
//
// Usage (from this directory): npm ci && npm run interop -- http://127.0.0.1:PORT
//   or: COURIER_URL=http://127.0.0.1:PORT node interop.mjs
//
// Only courier's public HTTP/WebSocket API (docs/protocol.md) and libsignal's own API are used:
// accounts and a linked device are registered, every device uploads keys libsignal made, the
// sender certificate courier issues is validated by libsignal against courier's trust root, and
// sealed-sender messages (single-recipient over HTTP and over an unidentified WebSocket, and
// Sealed Sender v2 multi-recipient) are sent without naming the sender and decrypted by every
// recipient device. Each check prints one line; the last line counts them, and the exit status
// is non-zero when any failed. The server must allow the requests this makes (COURIER_RATE_LIMITS=off
// is simplest) and should be a fresh one: the script registers its own accounts.

import { spawnSync } from 'node:child_process';
import { randomBytes, randomInt } from 'node:crypto';
import { isDeepStrictEqual } from 'node:util';
import * as SC from '@signalapp/libsignal-client';
import { Sessions, Identities, PreKeys, SignedPreKeys, KyberPreKeys, SenderKeys } from './stores.mjs';

// Node 20 has its WebSocket client (undici's, which can send an Authorization header) behind a
// flag; Node 22 and later have it on by default.
if (typeof WebSocket === 'undefined') {
  const r = spawnSync(
    process.execPath,
    ['--experimental-websocket', '--disable-warning=ExperimentalWarning', ...process.argv.slice(1)],
    { stdio: 'inherit' }
  );
  process.exit(r.status ?? 1);
}

const base = (process.argv[2] ?? process.env.COURIER_URL ?? '').replace(/\/+$/, '');
if (!/^https?:\/\/[^/]+$/.test(base)) {
  console.error('usage: node interop.mjs http://HOST:PORT   (or COURIER_URL=http://HOST:PORT)');
  process.exit(2);
}
const wsBase = base.replace(/^http/, 'ws');

const u8 = (buf) => new Uint8Array(buf);
const b64 = (bytes) => Buffer.from(bytes).toString('base64');
const unb64 = (s) => u8(Buffer.from(s, 'base64'));
const text = (s) => u8(Buffer.from(s, 'utf8'));
const eq = (a, b) => Buffer.compare(Buffer.from(a), Buffer.from(b)) === 0;
const show = (v) => JSON.stringify(v);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// ---------------------------------------------------------------- checks and report
let passed = 0;
let failed = 0;
class CheckFailed extends Error {}
function ok(name, detail = '') {
  passed++;
  console.log(`ok    ${name}${detail ? ` (${detail})` : ''}`);
}
function check(cond, name, detail = '') {
  if (cond) return ok(name, detail);
  failed++;
  console.log(`FAIL  ${name}${detail ? `: ${detail}` : ''}`);
  throw new CheckFailed(name);
}
function expectStatus(res, status, name) {
  const good = res.status === status;
  check(good, name, `${res.method} ${res.path} -> ${res.status}${good ? '' : ` ${res.text.slice(0, 500)} (expected ${status})`}`);
}
// A step stops at its first failed check (or exception); the next independent step still runs.
// A fatal step (the setup the others need) ends the run.
async function step(title, fn, { fatal = false } = {}) {
  console.log(`== ${title}`);
  try {
    await fn();
  } catch (e) {
    if (!(e instanceof CheckFailed)) {
      failed++;
      console.log(`FAIL  ${title}: ${e?.stack ?? e}${e?.cause ? `\n      cause: ${e.cause.message ?? e.cause}` : ''}`);
    }
    if (fatal) finish();
  }
}
function finish() {
  for (const s of sockets) s.close();
  console.log(`interop: ${passed} passed, ${failed} failed`);
  if (failed > 0) console.error(`error: ${failed} interop check(s) failed against ${base}`);
  process.exit(failed > 0 ? 1 : 0);
}

// ---------------------------------------------------------------- HTTP and WebSocket
const basic = (dev) =>
  'Basic ' + Buffer.from(`${dev.account.uuid}.${dev.deviceId}:${dev.password}`).toString('base64');

async function http(method, path, { auth, json, body, headers = {} } = {}) {
  const h = { ...headers };
  if (auth) h.authorization = basic(auth);
  let payload = body;
  if (json !== undefined) {
    h['content-type'] = 'application/json';
    payload = JSON.stringify(json);
  }
  const r = await fetch(base + path, { method, headers: h, body: payload });
  const t = await r.text();
  let parsed;
  try { parsed = t ? JSON.parse(t) : undefined; } catch { parsed = undefined; }
  return { method, path, status: r.status, text: t, json: parsed };
}

const sockets = [];
class Socket {
  constructor(label, headers) {
    this.label = label;
    this.frames = [];
    this.wake = () => {};
    this.closed = null;
    this.ws = new WebSocket(`${wsBase}/v1/websocket`, headers ? { headers } : undefined);
    this.opened = new Promise((resolve, reject) => {
      this.ws.onopen = resolve;
      this.ws.onerror = () => reject(new Error(`${label}: WebSocket upgrade failed`));
    });
    this.ws.onmessage = (ev) => {
      this.frames.push(JSON.parse(ev.data));
      this.wake();
    };
    this.ws.onclose = (ev) => {
      this.closed = `${ev.code} ${ev.reason}`;
      this.wake();
    };
    sockets.push(this);
  }
  send(frame) { this.ws.send(JSON.stringify(frame)); }
  close() { try { this.ws.close(1000); } catch {} }
  // The first frame (in arrival order) that `pred` accepts; other frames stay queued.
  async next(pred, what, ms = 15000) {
    const deadline = Date.now() + ms;
    for (;;) {
      const i = this.frames.findIndex(pred);
      if (i >= 0) return this.frames.splice(i, 1)[0];
      if (this.closed) throw new Error(`${this.label}: connection closed (${this.closed}) while waiting for ${what}`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`${this.label}: no ${what} within ${ms} ms (frames queued: ${show(this.frames)})`);
      await new Promise((r) => { this.wake = r; setTimeout(r, left); });
    }
  }
}

// ---------------------------------------------------------------- accounts, devices, keys
function newDevice(account, deviceId) {
  const registrationId = randomInt(1, 16381);
  return {
    account,
    deviceId,
    registrationId,
    password: randomBytes(16).toString('hex'), // 32 printable characters
    address: null,
    identities: new Identities(account.identity, registrationId),
    sessions: new Sessions(),
    preKeys: new PreKeys(),
    signedPreKeys: new SignedPreKeys(),
    kyberPreKeys: new KyberPreKeys(),
    senderKeys: new SenderKeys(),
    label: null,
  };
}

async function register(name) {
  const account = { name, identity: SC.PrivateKey.generate(), accessKey: u8(randomBytes(16)), devices: {} };
  const d = newDevice(account, 1);
  const r = await http('POST', '/v1/accounts', { json: { password: d.password, registrationId: d.registrationId } });
  expectStatus(r, 201, `register ${name}`);
  account.uuid = r.json.uuid;
  check(r.json.deviceId === 1 && /^[0-9a-f-]{36}$/.test(account.uuid), `${name} is ${account.uuid}.1`);
  attach(account, d);
  return account;
}

async function link(account) {
  const code = await http('POST', '/v1/devices/provisioning', { auth: account.devices[1] });
  expectStatus(code, 201, `${account.name}: linking code`);
  const d = newDevice(account, null);
  const r = await http('POST', '/v1/devices', {
    json: { code: code.json.code, password: d.password, registrationId: d.registrationId },
  });
  expectStatus(r, 201, `${account.name}: link a device`);
  check(r.json.uuid === account.uuid && r.json.deviceId === 2, `${account.name}: linked device is ${account.uuid}.2`);
  d.deviceId = r.json.deviceId;
  attach(account, d);
  return d;
}

function attach(account, d) {
  d.address = SC.ProtocolAddress.new(account.uuid, d.deviceId);
  d.label = `${account.name}.${d.deviceId}`;
  account.devices[d.deviceId] = d;
}

// Keys made by libsignal: a signed EC prekey, a Kyber last-resort prekey, one-time EC and Kyber
// prekeys, all signed by the account's identity key; the private halves go into the device's
// stores, the public halves to PUT /v1/keys.
async function uploadKeys(d) {
  const idk = d.account.identity;
  const now = Date.now();
  let keyId = 1;
  const spk = SC.PrivateKey.generate();
  const spkId = keyId++;
  const spkSig = idk.sign(spk.getPublicKey().serialize());
  await d.signedPreKeys.saveSignedPreKey(spkId, SC.SignedPreKeyRecord.new(spkId, now, spk.getPublicKey(), spk, spkSig));
  const kemLastResort = SC.KEMKeyPair.generate();
  const lastResortId = keyId++;
  const lastResortSig = idk.sign(kemLastResort.getPublicKey().serialize());
  await d.kyberPreKeys.saveKyberPreKey(lastResortId, SC.KyberPreKeyRecord.new(lastResortId, now, kemLastResort, lastResortSig));
  const preKeys = [];
  for (let i = 0; i < 3; i++) {
    const k = SC.PrivateKey.generate();
    const id = keyId++;
    await d.preKeys.savePreKey(id, SC.PreKeyRecord.new(id, k.getPublicKey(), k));
    preKeys.push({ keyId: id, publicKey: b64(k.getPublicKey().serialize()) });
  }
  const pqPreKeys = [];
  {
    const k = SC.KEMKeyPair.generate();
    const id = keyId++;
    const sig = idk.sign(k.getPublicKey().serialize());
    await d.kyberPreKeys.saveKyberPreKey(id, SC.KyberPreKeyRecord.new(id, now, k, sig));
    pqPreKeys.push({ keyId: id, publicKey: b64(k.getPublicKey().serialize()), signature: b64(sig) });
  }
  const kyberBytes = kemLastResort.getPublicKey().serialize();
  const body = {
    identityKey: b64(idk.getPublicKey().serialize()),
    signedPreKey: { keyId: spkId, publicKey: b64(spk.getPublicKey().serialize()), signature: b64(spkSig) },
    preKeys,
    pqLastResortPreKey: { keyId: lastResortId, publicKey: b64(kyberBytes), signature: b64(lastResortSig) },
    pqPreKeys,
  };
  const r = await http('PUT', '/v1/keys', { auth: d, json: body });
  expectStatus(r, 204, `${d.label}: PUT /v1/keys (EC identity, signed prekey, Kyber last resort ${kyberBytes.length} B, 3 + 1 one-time)`);
  const count = await http('GET', '/v1/keys/count', { auth: d });
  check(count.status === 200 && count.json.count === 3 && count.json.pqCount === 1,
    `${d.label}: GET /v1/keys/count`, count.text);
}

async function setAccessKey(account) {
  const r = await http('PUT', '/v1/accounts/attributes', {
    auth: account.devices[1],
    json: { unidentifiedAccessKey: b64(account.accessKey), unrestrictedUnidentifiedAccess: false },
  });
  expectStatus(r, 204, `${account.name}: PUT /v1/accounts/attributes (16-byte unidentifiedAccessKey)`);
}

// Alice fetches an account's bundles and makes a session with each device, as a client does.
async function startSessions(from, to) {
  const r = await http('GET', `/v1/keys/${to.uuid}/*`, { auth: from });
  expectStatus(r, 200, `${from.label} fetches ${to.name}'s bundles`);
  const idk = SC.PublicKey.deserialize(unb64(r.json.identityKey));
  check(idk.equals(to.identity.getPublicKey()), `${to.name}'s bundle carries ${to.name}'s identity key`);
  const ids = r.json.devices.map((x) => x.deviceId).sort();
  const want = Object.keys(to.devices).map(Number).sort();
  check(show(ids) === show(want), `${to.name}'s bundle lists devices ${show(want)}`, `got ${show(ids)}`);
  for (const x of r.json.devices) {
    const d = to.devices[x.deviceId];
    check(x.registrationId === d.registrationId, `${d.label}: bundle registrationId`, `${x.registrationId}`);
    check(x.preKey && x.pqPreKey, `${d.label}: bundle has a one-time EC prekey and a Kyber prekey`);
    const bundle = SC.PreKeyBundle.new(
      x.registrationId, x.deviceId,
      x.preKey.keyId, SC.PublicKey.deserialize(unb64(x.preKey.publicKey)),
      x.signedPreKey.keyId, SC.PublicKey.deserialize(unb64(x.signedPreKey.publicKey)), unb64(x.signedPreKey.signature),
      idk,
      x.pqPreKey.keyId, SC.KEMPublicKey.deserialize(unb64(x.pqPreKey.publicKey)), unb64(x.pqPreKey.signature)
    );
    await SC.processPreKeyBundle(bundle, d.address, from.address, from.sessions, from.identities);
    ok(`${from.label}: processPreKeyBundle for ${d.label}`);
  }
}

// ---------------------------------------------------------------- receiving
function checkSealedEnvelope(env, d, timestamp, how) {
  check(env.type === 6, `${d.label} (${how}): envelope type 6`, `type ${env.type}`);
  check(!('source' in env) && !('sourceDevice' in env),
    `${d.label} (${how}): envelope names no sender`, Object.keys(env).join(','));
  if (timestamp !== undefined) check(env.timestamp === timestamp, `${d.label} (${how}): envelope timestamp is the sender's`);
}

// A 1:1 sealed message, opened the way a client opens it.
async function openSealed(env, d, trustRoot) {
  return SC.sealedSenderDecryptMessage(
    unb64(env.content), trustRoot, env.serverTimestamp, null, d.account.uuid, d.deviceId,
    d.sessions, d.identities, d.preKeys, d.signedPreKeys, d.kyberPreKeys
  );
}

async function mailbox(d) {
  const r = await http('GET', '/v1/messages', { auth: d });
  expectStatus(r, 200, `${d.label}: GET /v1/messages`);
  return r.json.messages;
}
async function ackHttp(d, guid) {
  const r = await http('DELETE', `/v1/messages/${guid}`, { auth: d });
  check(r.status === 204, `${d.label}: DELETE /v1/messages/{guid}`, `${r.status}`);
}
async function expectEmptyMailbox(d) {
  const m = await mailbox(d);
  check(m.length === 0, `${d.label}: mailbox empty`, m.length ? show(m.map((e) => e.guid)) : '');
}

// ================================================================= the run
const trust = {};
let alice, bob, carol, A1, B1, B2, C1, bobWs;

await step('1. accounts, devices, keys, access keys', async () => {
  alice = await register('alice');
  bob = await register('bob');
  carol = await register('carol');
  [A1, B1, C1] = [alice.devices[1], bob.devices[1], carol.devices[1]];
  B2 = await link(bob);
  for (const d of [A1, B1, B2, C1]) await uploadKeys(d);
  for (const a of [alice, bob, carol]) await setAccessKey(a);
}, { fatal: true });

await step('2. certificates', async () => {
  const root = await http('GET', '/v1/certificate/trust-root');
  expectStatus(root, 200, 'GET /v1/certificate/trust-root (no auth)');
  trust.root = SC.PublicKey.deserialize(unb64(root.json.publicKey));
  ok('trust root is a libsignal PublicKey', `${unb64(root.json.publicKey).length} B`);
  const cert = await http('GET', '/v1/certificate/delivery', { auth: A1 });
  expectStatus(cert, 200, 'alice.1: GET /v1/certificate/delivery');
  const c = SC.SenderCertificate.deserialize(unb64(cert.json.certificate));
  trust.aliceCert = c;
  check(c.validate(trust.root, Date.now()), 'SenderCertificate.validate(trustRoot, now)');
  check(!c.validate(SC.PrivateKey.generate().getPublicKey(), Date.now()), 'the certificate does not validate under another root');
  check(!c.validate(trust.root, c.expiration() + 1), 'the certificate does not validate after its expiration',
    new Date(c.expiration()).toISOString());
  check(c.senderUuid() === alice.uuid, 'certificate senderUuid() is alice', c.senderUuid());
  check(c.senderDeviceId() === 1, 'certificate senderDeviceId() is 1', `${c.senderDeviceId()}`);
  check(c.key().equals(alice.identity.getPublicKey()), "certificate key() is alice's identity key");
  check(c.senderE164() === null, 'certificate carries no phone number');
}, { fatal: true });

await step("3. single-recipient sealed send over HTTP (bob.1 over GET /v1/messages, bob.2 over its WebSocket)", async () => {
  await startSessions(A1, bob);
  await startSessions(A1, carol);
  bobWs = new Socket('bob.2 socket', { Authorization: basic(B2) });
  await bobWs.opened;
  await bobWs.next((f) => f.op === 'queue-empty', 'queue-empty');
  ok('bob.2: WebSocket with Basic auth open, queue-empty');

  const plaintext = text(`sealed hello from alice over HTTP ${randomBytes(4).toString('hex')}`);
  const timestamp = Date.now();
  const messages = [];
  for (const d of [B1, B2]) {
    const ctext = await SC.sealedSenderEncryptMessage(plaintext, d.address, trust.aliceCert, A1.sessions, A1.identities);
    messages.push({ destinationDeviceId: d.deviceId, destinationRegistrationId: d.registrationId, type: 6, content: b64(ctext) });
  }
  const sealedPut = (key, msgs = messages) => http('PUT', `/v1/messages/${bob.uuid}`, {
    headers: key ? { 'unidentified-access-key': b64(key) } : {},
    json: { timestamp, online: false, messages: msgs },
  });

  // Refusals first (nothing is delivered by them).
  expectStatus(await sealedPut(null), 401, 'no credentials and no access key -> 401');
  expectStatus(await sealedPut(carol.accessKey), 401, "carol's access key for bob -> 401");
  expectStatus(await sealedPut(bob.accessKey, messages.map((m) => ({ ...m, type: 1 }))), 400, 'type 1 copies on an unidentified send -> 400');

  const sending = sealedPut(bob.accessKey);
  const frame = await bobWs.next((f) => f.op === 'message', 'message frame');
  checkSealedEnvelope(frame.envelope, B2, timestamp, 'WebSocket');
  const r2 = await openSealed(frame.envelope, B2, trust.root);
  check(eq(r2.message(), plaintext), 'bob.2: sealedSenderDecryptMessage plaintext matches');
  check(r2.senderUuid() === alice.uuid && r2.deviceId() === 1, 'bob.2: revealed sender is alice.1', `${r2.senderUuid()}.${r2.deviceId()}`);
  bobWs.send({ op: 'ack', guid: frame.envelope.guid });

  const res = await sending;
  expectStatus(res, 200, `PUT /v1/messages/{bob} with no Authorization, Unidentified-Access-Key, 2 type-6 copies`);
  const status = Object.fromEntries(res.json.results.map((x) => [x.deviceId, x.status]));
  check(status[1] === 'queued' && status[2] === 'delivered', 'results: bob.1 queued, bob.2 delivered', show(res.json.results));
  const guid1 = res.json.results.find((x) => x.deviceId === 1).guid;

  const box = await mailbox(B1);
  const env = box.find((e) => e.guid === guid1);
  check(env, "bob.1: the queued copy is in bob.1's mailbox", `${box.length} envelope(s)`);
  checkSealedEnvelope(env, B1, timestamp, 'HTTP');
  const r1 = await openSealed(env, B1, trust.root);
  check(eq(r1.message(), plaintext), 'bob.1: sealedSenderDecryptMessage plaintext matches');
  check(r1.senderUuid() === alice.uuid && r1.deviceId() === 1, 'bob.1: revealed sender is alice.1', `${r1.senderUuid()}.${r1.deviceId()}`);
  await ackHttp(B1, env.guid);
});

await step('4. single-recipient sealed send over an unidentified WebSocket', async () => {
  const anon = new Socket('unidentified socket', null);
  await anon.opened;
  ok('GET /v1/websocket with no credentials: upgraded');

  const plaintext = text(`sealed hello from alice over an unidentified WebSocket ${randomBytes(4).toString('hex')}`);
  const timestamp = Date.now();
  const messages = [];
  for (const d of [B1, B2]) {
    const ctext = await SC.sealedSenderEncryptMessage(plaintext, d.address, trust.aliceCert, A1.sessions, A1.identities);
    messages.push({ destinationDeviceId: d.deviceId, destinationRegistrationId: d.registrationId, type: 6, content: b64(ctext) });
  }
  anon.send({ op: 'send', id: 7, destination: bob.uuid, timestamp, online: false, messages });
  const refused = await anon.next((f) => f.op === 'response' && f.id === 7, 'response 7');
  check(refused.status === 401, 'send frame without unidentifiedAccessKey -> response 401, connection stays open', show(refused));

  anon.send({ op: 'send', id: 1, destination: bob.uuid, timestamp, online: false, messages, unidentifiedAccessKey: b64(bob.accessKey) });
  const frame = await bobWs.next((f) => f.op === 'message', 'message frame');
  checkSealedEnvelope(frame.envelope, B2, timestamp, 'WebSocket');
  const r2 = await openSealed(frame.envelope, B2, trust.root);
  check(eq(r2.message(), plaintext), 'bob.2: sealedSenderDecryptMessage plaintext matches');
  check(r2.senderUuid() === alice.uuid && r2.deviceId() === 1, 'bob.2: revealed sender is alice.1');
  bobWs.send({ op: 'ack', guid: frame.envelope.guid });

  const resp = await anon.next((f) => f.op === 'response' && f.id === 1, 'response 1');
  check(resp.status === 200, 'unidentified send frame -> response status 200', show(resp));
  const status = Object.fromEntries(resp.body.results.map((x) => [x.deviceId, x.status]));
  check(status[1] === 'queued' && status[2] === 'delivered', 'results: bob.1 queued, bob.2 delivered', show(resp.body.results));
  const guid1 = resp.body.results.find((x) => x.deviceId === 1).guid;

  const box = await mailbox(B1);
  const env = box.find((e) => e.guid === guid1);
  check(env, "bob.1: the queued copy is in bob.1's mailbox");
  checkSealedEnvelope(env, B1, timestamp, 'HTTP');
  const r1 = await openSealed(env, B1, trust.root);
  check(eq(r1.message(), plaintext), 'bob.1: sealedSenderDecryptMessage plaintext matches');
  check(r1.senderUuid() === alice.uuid && r1.deviceId() === 1, 'bob.1: revealed sender is alice.1');
  await ackHttp(B1, env.guid);

  anon.send({ op: 'ack', guid: env.guid });
  const err = await anon.next((f) => f.op === 'error', 'error frame');
  ok('an ack on the unidentified connection -> error frame', err.message);
  check(!anon.frames.some((f) => f.op === 'message' || f.op === 'queue-empty'), 'the unidentified connection got no message or queue-empty');
  anon.close();
});

await step('5. multi-recipient (Sealed Sender v2): bob.1, bob.2, carol.1', async () => {
  // Alice hands her sender key to every member, as a client does: a 1:1 sealed message each
  // (sent with the recipient's access key), carrying the SenderKeyDistributionMessage.
  const distributionId = crypto.randomUUID();
  const skdm = await SC.SenderKeyDistributionMessage.create(A1.address, distributionId, A1.senderKeys);
  for (const account of [bob, carol]) {
    const ds = Object.values(account.devices);
    const timestamp = Date.now();
    const messages = [];
    for (const d of ds) {
      const ctext = await SC.sealedSenderEncryptMessage(skdm.serialize(), d.address, trust.aliceCert, A1.sessions, A1.identities);
      messages.push({ destinationDeviceId: d.deviceId, destinationRegistrationId: d.registrationId, type: 6, content: b64(ctext) });
    }
    const sending = http('PUT', `/v1/messages/${account.uuid}`, {
      headers: { 'unidentified-access-key': b64(account.accessKey) },
      json: { timestamp, online: false, messages },
    });
    const received = [];
    if (account === bob) {
      const frame = await bobWs.next((f) => f.op === 'message', 'message frame');
      received.push([B2, frame.envelope]);
      bobWs.send({ op: 'ack', guid: frame.envelope.guid });
    }
    expectStatus(await sending, 200, `sender key distribution to ${account.name} (sealed, ${ds.length} ${ds.length === 1 ? 'copy' : 'copies'})`);
    for (const d of ds.filter((d) => !(account === bob && d === B2))) {
      for (const e of await mailbox(d)) {
        received.push([d, e]);
        await ackHttp(d, e.guid);
      }
    }
    for (const [d, e] of received) {
      const r = await openSealed(e, d, trust.root);
      await SC.processSenderKeyDistributionMessage(A1.address, SC.SenderKeyDistributionMessage.deserialize(r.message()), d.senderKeys);
      ok(`${d.label}: got alice's sender key`);
    }
  }

  const plaintext = text(`group message from alice via multi_recipient ${randomBytes(4).toString('hex')}`);
  const groupId = u8(randomBytes(32));
  const mrm = async (recipients) => {
    const ctext = await SC.groupEncrypt(A1.address, distributionId, A1.senderKeys, plaintext);
    const usmc = SC.UnidentifiedSenderMessageContent.new(ctext, trust.aliceCert, SC.ContentHint.Resendable, groupId);
    return SC.sealedSenderMultiRecipientEncrypt({
      content: usmc, recipients: recipients.map((d) => d.address),
      identityStore: A1.identities, sessionStore: A1.sessions,
    });
  };
  const xor = (...keys) => u8(keys[0].map((_, i) => keys.reduce((x, k) => x ^ k[i], 0)));
  const put = (body, key, ts) => http('PUT', `/v1/messages/multi_recipient?ts=${ts}&online=false`, {
    headers: { 'content-type': 'application/vnd.signal-messenger.mrm', 'unidentified-access-key': b64(key) },
    body,
  });

  const body = await mrm([B1, B2, C1]);
  ok('sealedSenderMultiRecipientEncrypt for bob.1, bob.2, carol.1', `${body.length} B, version 0x${body[0].toString(16)}`);
  const ts = Date.now();
  expectStatus(await put(body, bob.accessKey, ts), 401, "multi_recipient with bob's key alone (not the XOR) -> 401");

  const sending = put(body, xor(bob.accessKey, carol.accessKey), ts);
  // What a group member does with such an envelope: libsignal's sealed-sender layer with the
  // account's identity key, the certificate against the trust root, then the sender-key layer.
  const openGroup = async (env, d, how) => {
    checkSealedEnvelope(env, d, ts, how);
    const usmc = await SC.sealedSenderDecryptToUsmc(unb64(env.content), d.identities);
    const cert = usmc.senderCertificate();
    check(cert.validate(trust.root, env.serverTimestamp), `${d.label} (${how}): sender certificate validates against the trust root`);
    check(cert.senderUuid() === alice.uuid && cert.senderDeviceId() === 1, `${d.label} (${how}): sender is alice.1`);
    check(usmc.msgType() === SC.CiphertextMessageType.SenderKey && eq(usmc.groupId(), groupId),
      `${d.label} (${how}): sender-key content with alice's group id`);
    const pt = await SC.groupDecrypt(A1.address, d.senderKeys, usmc.contents());
    check(eq(pt, plaintext), `${d.label} (${how}): groupDecrypt plaintext matches`);
  };
  const frame = await bobWs.next((f) => f.op === 'message', 'message frame');
  await openGroup(frame.envelope, B2, 'WebSocket');
  bobWs.send({ op: 'ack', guid: frame.envelope.guid });
  const res = await sending;
  expectStatus(res, 200, 'PUT /v1/messages/multi_recipient, Unidentified-Access-Key = bob XOR carol');
  check(isDeepStrictEqual(res.json, { uuids404: [] }), 'answer is {"uuids404":[]}', res.text);
  for (const d of [B1, C1]) {
    const box = await mailbox(d);
    check(box.length === 1, `${d.label}: one envelope in the mailbox`, `${box.length}`);
    await openGroup(box[0], d, 'HTTP');
    await ackHttp(d, box[0].guid);
  }
});

await step('6. multi-recipient with a stale device set: 409, nothing delivered', async () => {
  const plaintext = text('bob.1 only');
  const ctext = await SC.signalEncrypt(plaintext, B1.address, A1.address, A1.sessions, A1.identities);
  const usmc = SC.UnidentifiedSenderMessageContent.new(ctext, trust.aliceCert, SC.ContentHint.Default, null);
  const body = await SC.sealedSenderMultiRecipientEncrypt({
    content: usmc, recipients: [B1.address], identityStore: A1.identities, sessionStore: A1.sessions,
  });
  const r = await http('PUT', `/v1/messages/multi_recipient?ts=${Date.now()}&online=false`, {
    headers: { 'content-type': 'application/vnd.signal-messenger.mrm', 'unidentified-access-key': b64(bob.accessKey) },
    body,
  });
  expectStatus(r, 409, 'multi_recipient for bob.1 only -> 409');
  const want = [{ uuid: bob.uuid, devices: { missingDevices: [2], extraDevices: [] } }];
  check(isDeepStrictEqual(r.json, want), 'body lists bob with missingDevices [2], extraDevices []', r.text);
  await expectEmptyMailbox(B1);
  await sleep(200);
  check(!bobWs.frames.some((f) => f.op === 'message'), 'bob.2: nothing pushed');
});

await step('7. a reply from a linked device: bob.2 -> alice sealed, then alice -> bob.2 on the ratchet', async () => {
  const cr = await http('GET', '/v1/certificate/delivery', { auth: B2 });
  expectStatus(cr, 200, 'bob.2: GET /v1/certificate/delivery');
  const cert = SC.SenderCertificate.deserialize(unb64(cr.json.certificate));
  check(cert.validate(trust.root, Date.now()) && cert.senderUuid() === bob.uuid && cert.senderDeviceId() === 2 &&
    cert.key().equals(bob.identity.getPublicKey()), "bob.2's certificate validates and names bob.2 with bob's identity key");

  const reply = text('sealed reply from bob.2');
  let timestamp = Date.now();
  const ctext = await SC.sealedSenderEncryptMessage(reply, A1.address, cert, B2.sessions, B2.identities);
  const r = await http('PUT', `/v1/messages/${alice.uuid}`, {
    headers: { 'unidentified-access-key': b64(alice.accessKey) },
    json: { timestamp, messages: [{ destinationDeviceId: 1, destinationRegistrationId: A1.registrationId, type: 6, content: b64(ctext) }] },
  });
  expectStatus(r, 200, 'bob.2 -> alice: unidentified PUT /v1/messages/{alice}');
  const box = await mailbox(A1);
  check(box.length === 1, 'alice.1: one envelope in the mailbox', `${box.length}`);
  checkSealedEnvelope(box[0], A1, timestamp, 'HTTP');
  const res = await openSealed(box[0], A1, trust.root);
  check(eq(res.message(), reply) && res.senderUuid() === bob.uuid && res.deviceId() === 2,
    'alice.1: sealedSenderDecryptMessage gives the reply from bob.2');
  await ackHttp(A1, box[0].guid);

  // Alice's session with bob.2 is now acknowledged: her next message is a plain SignalMessage.
  const again = text('and back to bob.2 on the ratchet');
  const usmcOut = SC.UnidentifiedSenderMessageContent.new(
    await SC.signalEncrypt(again, B2.address, A1.address, A1.sessions, A1.identities), trust.aliceCert, SC.ContentHint.Default, null);
  check(usmcOut.msgType() === SC.CiphertextMessageType.Whisper, 'alice -> bob.2 is now a SignalMessage (not a PreKey message)');
  timestamp = Date.now();
  const toB1 = await SC.sealedSenderEncryptMessage(again, B1.address, trust.aliceCert, A1.sessions, A1.identities);
  const toB2 = await SC.sealedSenderEncrypt(usmcOut, B2.address, A1.identities);
  const sending = http('PUT', `/v1/messages/${bob.uuid}`, {
    headers: { 'unidentified-access-key': b64(bob.accessKey) },
    json: { timestamp, messages: [
      { destinationDeviceId: 1, destinationRegistrationId: B1.registrationId, type: 6, content: b64(toB1) },
      { destinationDeviceId: 2, destinationRegistrationId: B2.registrationId, type: 6, content: b64(toB2) },
    ] },
  });
  const frame = await bobWs.next((f) => f.op === 'message', 'message frame');
  checkSealedEnvelope(frame.envelope, B2, timestamp, 'WebSocket');
  const r2 = await openSealed(frame.envelope, B2, trust.root);
  check(eq(r2.message(), again) && r2.senderUuid() === alice.uuid, 'bob.2: sealedSenderEncrypt(USMC) opened by sealedSenderDecryptMessage');
  bobWs.send({ op: 'ack', guid: frame.envelope.guid });
  expectStatus(await sending, 200, 'alice -> bob: unidentified PUT /v1/messages/{bob}');
  const b1 = await mailbox(B1);
  check(b1.length === 1, 'bob.1: one envelope in the mailbox', `${b1.length}`);
  const r1 = await openSealed(b1[0], B1, trust.root);
  check(eq(r1.message(), again) && r1.senderUuid() === alice.uuid, 'bob.1: plaintext and sender match');
  await ackHttp(B1, b1[0].guid);
});

finish();
