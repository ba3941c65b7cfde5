// In-memory libsignal stores (sessions, identities, one-time/signed/Kyber prekeys, sender keys),
// shared by make-sealed-sender-v2.mjs and interop.mjs. Records are kept serialized, as a real
// client's database would keep them, and deserialized on every read.

import * as SC from '@signalapp/libsignal-client';

export class Sessions extends SC.SessionStore {
  m = new Map();
  key(a) { return `${a.name()}.${a.deviceId()}`; }
  async saveSession(a, r) { this.m.set(this.key(a), r.serialize()); }
  async getSession(a) {
    const s = this.m.get(this.key(a));
    return s ? SC.SessionRecord.deserialize(s) : null;
  }
  async getExistingSessions(as) {
    return as.map((a) => {
      const s = this.m.get(this.key(a));
      if (!s) throw new Error(`no session for ${this.key(a)}`);
      return SC.SessionRecord.deserialize(s);
    });
  }
}
export class Identities extends SC.IdentityKeyStore {
  m = new Map();
  constructor(priv, regId) { super(); this.priv = priv; this.regId = regId; }
  async getIdentityKey() { return this.priv; }
  async getLocalRegistrationId() { return this.regId; }
  async saveIdentity(a, k) {
    const old = this.m.get(a.name());
    this.m.set(a.name(), k);
    return old && !old.equals(k) ? SC.IdentityChange.ReplacedExisting : SC.IdentityChange.NewOrUnchanged;
  }
  async isTrustedIdentity(a, k) {
    const old = this.m.get(a.name());
    return !old || old.equals(k);
  }
  async getIdentity(a) { return this.m.get(a.name()) ?? null; }
}
export class PreKeys extends SC.PreKeyStore {
  m = new Map();
  async savePreKey(id, r) { this.m.set(id, r.serialize()); }
  async getPreKey(id) { return SC.PreKeyRecord.deserialize(this.m.get(id)); }
  async removePreKey(id) { this.m.delete(id); }
}
export class SignedPreKeys extends SC.SignedPreKeyStore {
  m = new Map();
  async saveSignedPreKey(id, r) { this.m.set(id, r.serialize()); }
  async getSignedPreKey(id) { return SC.SignedPreKeyRecord.deserialize(this.m.get(id)); }
}
export class KyberPreKeys extends SC.KyberPreKeyStore {
  m = new Map();
  async saveKyberPreKey(id, r) { this.m.set(id, r.serialize()); }
  async getKyberPreKey(id) { return SC.KyberPreKeyRecord.deserialize(this.m.get(id)); }
  async markKyberPreKeyUsed() {}
}
export class SenderKeys extends SC.SenderKeyStore {
  m = new Map();
  key(a, d) { return `${a.name()}.${a.deviceId()}/${d}`; }
  async saveSenderKey(a, d, r) { this.m.set(this.key(a, d), r.serialize()); }
  async getSenderKey(a, d) {
    const s = this.m.get(this.key(a, d));
    return s ? SC.SenderKeyRecord.deserialize(s) : null;
  }
}
