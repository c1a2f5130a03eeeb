// @ts-check
/**
 * Rusty Socks client for protocol v1 (channels, presence, history, recovery).
 *
 * Dependency-free ES module; runs in browsers and in Node (pass a WebSocket implementation such
 * as the `ws` package as `options.WebSocket` where there is no global one).
 *
 * The wire protocol is described in the server's `docs/protocol.md`.
 *
 * @module rusty-socks-client
 */

/** The subprotocol the client offers (the server selects it). */
export const PROTOCOL = "rusty-socks.v1";

/** Prefix of the subprotocol that carries the token: `token.<jwt>`. */
export const TOKEN_PROTOCOL_PREFIX = "token.";

/** The legacy channel every `/ws` connection starts on; the client leaves it. */
const LEGACY_CHANNEL = "default";

/**
 * @typedef {"connecting" | "connected" | "disconnected"} ConnectionState
 */

/**
 * @typedef {object} StreamPosition
 * @property {number} offset Offset of the last publication processed.
 * @property {string} epoch Epoch of the channel's stream.
 */

/**
 * @typedef {object} Publication
 * @property {string} channel
 * @property {number} offset Position in the channel's stream (1, 2, 3, ...).
 * @property {string} epoch The stream the offset belongs to. Offsets start again at 1 under a
 *   new epoch (a server restart, or the channel's history lost), so a publication is identified
 *   by its epoch and offset together, never by the offset alone.
 * @property {any} data The published JSON value.
 * @property {string} [clientId] The publishing connection, when a client published it.
 */

/**
 * @typedef {object} ClientInfo
 * @property {string} clientId The connection's id.
 * @property {string | null} user The token's `sub`, `null` for anonymous connections.
 * @property {any} [info] The token's `info` claim, when it has one.
 */

/**
 * @typedef {object} HistoryResult
 * @property {string} channel
 * @property {number} offset The channel's current offset.
 * @property {string} epoch The channel's current epoch.
 * @property {Publication[]} publications Oldest first.
 * @property {boolean} [complete] With `since`: whether they start right after `since`.
 */

/**
 * @typedef {object} RecoveryInfo
 * @property {number} missed Publications delivered by the recovery: the missed ones, or, when
 *   the epoch changed, those of the new epoch (fetched from history).
 * @property {number | null} lost Publications missed and not delivered: 0 when `recovered` is
 *   true; the exact number when the epoch is the same (history no longer held them, or the
 *   namespace denies `read_history`); `null` when it cannot be known (the epoch changed).
 * @property {boolean} epochChanged The channel's stream restarted since the position resumed
 *   from (a server restart, or its history was lost): publications that followed that
 *   position in the old epoch, if there were any, are gone. Publications of the new epoch are
 *   all newer than the ones already delivered, and are delivered (from history, all or nothing).
 * @property {number} offset The channel's offset after the recovery.
 * @property {string} epoch The channel's epoch after the recovery.
 */

/**
 * @typedef {object} GapInfo
 * @property {number} offset The last offset received before the gap.
 * @property {boolean} recovered Whether every missing publication was fetched and delivered.
 * @property {number} missed Publications fetched from history and delivered.
 * @property {boolean} epochChanged The stream restarted under a new epoch meanwhile (see
 *   {@link RecoveryInfo}); `recovered` is then false, and `missed` counts the new epoch's
 *   publications delivered from history.
 */

/**
 * @typedef {object} SubscribeOptions
 * @property {(publication: Publication) => void} [onPublication] Each publication, once, in
 *   offset order (live, recovered or fetched after a gap).
 * @property {(client: ClientInfo) => void} [onJoin] Another connection subscribed (namespaces
 *   with `join_leave`).
 * @property {(client: ClientInfo) => void} [onLeave] A connection left (namespaces with
 *   `join_leave`).
 * @property {(info: GapInfo) => void} [onGap] After the client caught up with a gap the server
 *   reported (or an offset jump it saw): `recovered` tells whether every missing publication was
 *   delivered.
 * @property {(recovered: boolean, info: RecoveryInfo) => void} [onRecovered] After a resubscribe
 *   with `since` (reconnect, or a `since` passed here): `true` when every missed publication was
 *   delivered (before this call; also when none was missed), `false` when the server could not
 *   cover them (none of them delivered: `info.lost` says how many, if known) or the epoch
 *   changed (`info.epochChanged`; then it is called once the new epoch's publications were
 *   fetched and delivered).
 * @property {(info: {offset: number, epoch: string, recovered: boolean, resubscribe: boolean}) => void} [onSubscribed]
 *   Each time the server confirms the subscription (first time and after every reconnect).
 * @property {(error: RustySocksError) => void} [onError] The server refused the subscription
 *   (it is then removed). Without this handler the client's `error` event gets it.
 * @property {StreamPosition} [since] Resume from a saved position on the first subscribe.
 */

/**
 * @typedef {object} RustySocksOptions
 * @property {string | (() => string | Promise<string>)} [token] A JWT, or a function returning
 *   one, called before every connection attempt and when the server asks for a refresh.
 * @property {any} [WebSocket] WebSocket constructor (default `globalThis.WebSocket`).
 * @property {number} [minDelay=250] Base reconnect delay in ms.
 * @property {number} [maxDelay=10000] Largest reconnect delay in ms.
 * @property {number} [timeout=10000] Ms to wait for a reply, or for a connection to open.
 * @property {() => number} [random=Math.random] Random source for the backoff jitter.
 */

/**
 * Reconnect delay with exponential backoff and full jitter:
 * a random value in [0, min(maxDelay, minDelay * 2^attempt)).
 *
 * @param {number} attempt 0 for the first retry after a disconnect, then 1, 2, ...
 * @param {number} [minDelay=250]
 * @param {number} [maxDelay=10000]
 * @param {() => number} [random=Math.random] Returns a number in [0, 1).
 * @returns {number} Milliseconds.
 */
export function backoffDelay(attempt, minDelay = 250, maxDelay = 10000, random = Math.random) {
  const exponent = Math.min(Math.max(0, Math.floor(attempt)), 52);
  const cap = Math.min(maxDelay, minDelay * 2 ** exponent);
  return Math.floor(random() * cap);
}

/** An error answered by the server (`code` is its error code) or raised by the client. */
export class RustySocksError extends Error {
  /**
   * @param {string} code Server codes (`unknown_namespace`, `permission_denied`, ...) or the
   *   client's own: `timeout`, `disconnected` (the connection dropped before the reply),
   *   `closed` (the client is closed), `unsubscribed`, `token_failed`, `server_error`.
   * @param {string} message
   * @param {{channel?: string, closeCode?: number, cause?: unknown}} [details]
   */
  constructor(code, message, details = {}) {
    super(message);
    this.name = "RustySocksError";
    /** @type {string} */
    this.code = code;
    /** @type {string | undefined} */
    this.channel = details.channel;
    /** @type {number | undefined} */
    this.closeCode = details.closeCode;
    if (details.cause !== undefined) this.cause = details.cause;
  }
}

const noop = () => {};

/**
 * @param {any} client
 * @returns {ClientInfo}
 */
function toClientInfo(client) {
  /** @type {ClientInfo} */
  const out = { clientId: client?.client_id, user: client?.user ?? null };
  if (client && client.info !== undefined) out.info = client.info;
  return out;
}

/**
 * @param {string} channel
 * @param {string} epoch
 * @param {any} p
 * @returns {Publication}
 */
function toPublication(channel, epoch, p) {
  /** @type {Publication} */
  const out = { channel, offset: p.offset, epoch, data: p.data };
  if (p.client_id != null) out.clientId = p.client_id;
  return out;
}

/**
 * A promise whose rejection is not reported as unhandled when nobody awaits it.
 * @template T
 * @param {(resolve: (value: T) => void, reject: (reason: any) => void) => void} executor
 * @returns {Promise<T>}
 */
function quietPromise(executor) {
  const p = new Promise(executor);
  p.catch(noop);
  return p;
}

/** A subscription to one channel; created by {@link RustySocks#subscribe}. */
export class Subscription {
  /**
   * @param {RustySocks} client
   * @param {string} channel
   * @param {SubscribeOptions} options
   */
  constructor(client, channel, options) {
    /** @type {string} */
    this.channel = channel;
    /** @type {"subscribing" | "subscribed" | "unsubscribed"} */
    this.state = "subscribing";
    /** Offset of the last publication delivered (or the channel's offset when subscribed).
     * @type {number | null} */
    this.offset = options.since ? options.since.offset : null;
    /** @type {string | null} */
    this.epoch = options.since ? options.since.epoch : null;
    /** @internal */
    this._client = client;
    /** @internal */
    this._handlers = options;
    /** @internal @type {null | {buffer: any[], regap: boolean, gapOffset: number}} */
    this._catchUp = null;
    /** @internal */
    this._confirmed = false;
    /** @internal Whether the epoch changed and `onRecovered` has not said so yet. */
    this._restarted = false;
    /** @internal @type {(v: any) => void} */
    this._resolveReady = noop;
    /** @internal @type {(e: any) => void} */
    this._rejectReady = noop;
    /**
     * Settles on the first `subscribed` reply (with `{offset, epoch, recovered}`), or rejects
     * with the server's error (e.g. `unknown_namespace`) or `unsubscribed`.
     * @type {Promise<{offset: number, epoch: string, recovered: boolean}>}
     */
    this.ready = quietPromise((resolve, reject) => {
      this._resolveReady = resolve;
      this._rejectReady = reject;
    });
  }

  /** The position to resume from, to save and pass later as `since`.
   * @returns {StreamPosition | null} */
  get position() {
    return this.offset != null && this.epoch != null
      ? { offset: this.offset, epoch: this.epoch }
      : null;
  }

  /** Leaves the channel (resolves when the server confirms, or at once when offline). */
  unsubscribe() {
    return this._client._unsubscribe(this);
  }

  /** @param {any} data */
  publish(data) {
    return this._client.publish(this.channel, data);
  }

  presence() {
    return this._client.presence(this.channel);
  }

  /** @param {{limit?: number, since?: StreamPosition}} [options] */
  history(options) {
    return this._client.history(this.channel, options);
  }
}

/**
 * The client: one WebSocket connection to `/ws`, reconnected automatically.
 *
 * Events (`on(name, listener)`): `state` (ConnectionState), `connected` ({clientId}),
 * `disconnected` ({code, reason, reconnect}), `reconnecting` ({attempt, delay}), `refreshed`
 * ({expiresAt}), `error` (Error), `message` (every parsed frame, for debugging).
 */
export class RustySocks {
  /**
   * @param {string} url `ws://host:port/ws` or `wss://...`.
   * @param {RustySocksOptions} [options]
   */
  constructor(url, options = {}) {
    /** @type {string} */
    this.url = url;
    /** @private */
    this._token = options.token;
    /** @private */
    this._WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (typeof this._WebSocket !== "function") {
      throw new TypeError("no WebSocket implementation: pass options.WebSocket");
    }
    /** @type {number} */
    this.minDelay = options.minDelay ?? 250;
    /** @type {number} */
    this.maxDelay = options.maxDelay ?? 10000;
    /** @type {number} */
    this.timeout = options.timeout ?? 10000;
    /** @private */
    this._random = options.random ?? Math.random;
    /** The server's id for the current connection (from its `welcome`).
     * @type {string | null} */
    this.clientId = null;
    /** @private @type {ConnectionState} */
    this._state = "disconnected";
    /** @private @type {any} */
    this._ws = null;
    /** @private Whether `_ws` is open. */
    this._open = false;
    /** @private Whether the application wants to be connected. */
    this._wanted = false;
    /** @private */
    this._generation = 0;
    /** @private */
    this._attempt = 0;
    /** @private @type {any} */
    this._reconnectTimer = null;
    /** @private @type {any} */
    this._connectTimer = null;
    /** @private */
    this._nextId = 1;
    /** @private @type {Map<number, any>} commands sent, awaiting their reply */
    this._pending = new Map();
    /** @private @type {any[]} commands waiting for the connection */
    this._queue = [];
    /** @private @type {Map<string, Subscription>} */
    this._subs = new Map();
    /** @private @type {Map<string, Set<Function>>} */
    this._listeners = new Map();
    /** @private @type {{resolve: () => void, reject: (e: any) => void}[]} */
    this._connectWaiters = [];
  }

  /** @returns {ConnectionState} */
  get state() {
    return this._state;
  }

  /** The current subscriptions, by channel. @returns {Map<string, Subscription>} */
  get subscriptions() {
    return new Map(this._subs);
  }

  /** @param {string} channel @returns {Subscription | undefined} */
  getSubscription(channel) {
    return this._subs.get(channel);
  }

  /**
   * Adds a listener; returns a function that removes it.
   * @param {"state" | "connected" | "disconnected" | "reconnecting" | "refreshed" | "error" | "message"} event
   * @param {(arg: any) => void} listener
   * @returns {() => void}
   */
  on(event, listener) {
    let set = this._listeners.get(event);
    if (!set) this._listeners.set(event, (set = new Set()));
    set.add(listener);
    return () => this.off(event, listener);
  }

  /** @param {string} event @param {(arg: any) => void} listener */
  off(event, listener) {
    this._listeners.get(event)?.delete(listener);
  }

  /**
   * Starts connecting (and reconnecting after drops). Resolves once connected; rejects if the
   * client is closed (by `close()` or a 4500-4999 close from the server) before that.
   * @returns {Promise<void>}
   */
  connect() {
    if (!this._wanted) {
      this._wanted = true;
      this._attempt = 0;
      this._openSocket();
    }
    if (this._state === "connected") return Promise.resolve();
    return quietPromise((resolve, reject) => this._connectWaiters.push({ resolve, reject }));
  }

  /**
   * Closes the connection with 1000 and stops reconnecting. Subscriptions are kept: a later
   * `connect()` resubscribes them and recovers what was missed meanwhile.
   */
  close() {
    const wasWanted = this._wanted;
    this._wanted = false;
    this._generation++;
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = null;
    const ws = this._ws;
    if (ws) {
      this._detach(ws);
      try {
        ws.close(1000, "client closed");
      } catch {
        // already closing
      }
      this._lostConnection("closed");
    }
    this._failQueued(new RustySocksError("closed", "the client was closed"));
    if (wasWanted || ws) {
      this._setState("disconnected");
      if (ws) this._emit("disconnected", { code: 1000, reason: "client closed", reconnect: false });
    }
  }

  /**
   * Subscribes to a channel; the returned subscription is resubscribed (with recovery) after
   * every reconnect. May be called before `connect()`.
   * @param {string} channel
   * @param {SubscribeOptions} [options]
   * @returns {Subscription}
   */
  subscribe(channel, options = {}) {
    if (typeof channel !== "string" || channel === "") {
      throw new TypeError("channel must be a non-empty string");
    }
    if (this._subs.has(channel)) throw new Error(`already subscribed to ${channel}`);
    const sub = new Subscription(this, channel, options);
    this._subs.set(channel, sub);
    if (this._open) this._sendSubscribe(sub);
    return sub;
  }

  /**
   * Leaves a channel. Resolves when the server confirms (or at once when offline).
   * @param {string} channel
   * @returns {Promise<void>}
   */
  unsubscribe(channel) {
    const sub = this._subs.get(channel);
    return sub ? this._unsubscribe(sub) : Promise.resolve();
  }

  /**
   * Publishes `data` (any JSON value but `null`) on a channel.
   * @param {string} channel
   * @param {any} data
   * @returns {Promise<{offset: number}>}
   */
  publish(channel, data) {
    return this._request({ type: "publish", channel, data }).then((r) => ({ offset: r.offset }));
  }

  /**
   * Who is subscribed to a channel.
   * @param {string} channel
   * @returns {Promise<ClientInfo[]>}
   */
  presence(channel) {
    return this._request({ type: "presence", channel }).then((r) =>
      (r.clients ?? []).map(toClientInfo),
    );
  }

  /**
   * A channel's history: the newest `limit` publications, or those after `since`.
   * @param {string} channel
   * @param {{limit?: number, since?: StreamPosition}} [options]
   * @returns {Promise<HistoryResult>}
   */
  history(channel, options = {}) {
    /** @type {any} */
    const frame = { type: "history", channel };
    if (options.limit != null) frame.limit = options.limit;
    if (options.since) frame.since = { offset: options.since.offset, epoch: options.since.epoch };
    return this._request(frame).then((r) => {
      /** @type {HistoryResult} */
      const out = {
        channel,
        offset: r.offset,
        epoch: r.epoch,
        publications: (r.publications ?? []).map((/** @type {any} */ p) => toPublication(channel, r.epoch, p)),
      };
      if (r.complete !== undefined) out.complete = r.complete;
      return out;
    });
  }

  // ---- internals -------------------------------------------------------------------------

  /** @private @param {ConnectionState} state */
  _setState(state) {
    if (this._state === state) return;
    this._state = state;
    this._emit("state", state);
  }

  /** @private @param {string} event @param {any} [arg] */
  _emit(event, arg) {
    const set = this._listeners.get(event);
    if (!set || set.size === 0) return;
    for (const listener of [...set]) {
      try {
        listener(arg);
      } catch (err) {
        this._reportListenerError(event, err);
      }
    }
  }

  /** @private */
  _reportListenerError(/** @type {string} */ where, /** @type {unknown} */ err) {
    if (where === "error") {
      // Do not loop: surface it outside the client's own call stack.
      setTimeout(() => {
        throw err;
      });
    } else {
      this._emit("error", err);
    }
  }

  /** Calls a subscription handler, keeping the client's state safe from its exceptions.
   * @private @param {Subscription} sub @param {string} name @param {...any} args */
  _call(sub, name, ...args) {
    // @ts-ignore: handlers are looked up by name
    const fn = sub._handlers[name];
    if (typeof fn !== "function") return;
    try {
      fn(...args);
    } catch (err) {
      this._reportListenerError(name, err);
    }
  }

  /** @private */
  async _openSocket() {
    const generation = ++this._generation;
    this._setState("connecting");
    /** @type {string | undefined} */
    let token;
    try {
      token = typeof this._token === "function" ? await this._token() : this._token;
    } catch (err) {
      if (generation !== this._generation || !this._wanted) return;
      this._emit("error", new RustySocksError("token_failed", "the token function failed", { cause: err }));
      this._scheduleReconnect();
      return;
    }
    if (generation !== this._generation || !this._wanted) return;
    const protocols = [PROTOCOL];
    if (token) protocols.push(TOKEN_PROTOCOL_PREFIX + token);
    let ws;
    try {
      ws = new this._WebSocket(this.url, protocols);
    } catch (err) {
      // A malformed URL or subprotocol: retrying will not help.
      this._emit("error", err);
      this._giveUp(new RustySocksError("closed", "cannot open the WebSocket", { cause: err }));
      return;
    }
    this._ws = ws;
    this._open = false;
    ws.onopen = () => this._onOpen(ws);
    ws.onmessage = (/** @type {any} */ ev) => this._onMessage(ws, ev.data);
    ws.onclose = (/** @type {any} */ ev) => this._onClose(ws, ev.code, ev.reason);
    ws.onerror = noop; // a close event follows
    this._connectTimer = setTimeout(() => {
      if (this._ws === ws && !this._open) this._dropSocket("connect timeout");
    }, this.timeout);
  }

  /** @private @param {any} ws */
  _detach(ws) {
    ws.onopen = noop;
    ws.onmessage = noop;
    ws.onclose = noop;
    ws.onerror = noop;
  }

  /** Abandons the current socket as if the network had dropped it (then reconnects).
   * @private @param {string} reason */
  _dropSocket(reason) {
    const ws = this._ws;
    if (!ws) return;
    try {
      ws.close(4000, reason);
    } catch {
      // not open yet, or already closing
    }
    this._onClose(ws, 1006, reason);
  }

  /** @private @param {any} ws */
  _onOpen(ws) {
    if (ws !== this._ws) return;
    clearTimeout(this._connectTimer);
    this._open = true;
    for (const sub of this._subs.values()) this._sendSubscribe(sub);
    const queued = this._queue;
    this._queue = [];
    for (const entry of queued) this._transmit(entry);
  }

  /** @private @param {any} ws @param {any} data */
  _onMessage(ws, data) {
    if (ws !== this._ws) return;
    let msg;
    try {
      msg = JSON.parse(typeof data === "string" ? data : String(data));
    } catch (err) {
      this._emit("error", new RustySocksError("invalid_json", "the server sent a frame that is not JSON", { cause: err }));
      return;
    }
    if (!msg || typeof msg !== "object") return;
    this._emit("message", msg);
    switch (msg.type) {
      case "Connect":
        // A server from before v1 welcomes: it put this connection on the legacy channel
        // (and sends its traffic) even though it offered rusty-socks.v1. Leave it.
        this._send({ type: "unsubscribe", channel: LEGACY_CHANNEL }, noop, noop);
      // falls through
      case "welcome":
        this.clientId = msg.client_id ?? null;
        this._attempt = 0;
        this._setState("connected");
        this._emit("connected", { clientId: this.clientId });
        for (const waiter of this._connectWaiters.splice(0)) waiter.resolve();
        return;
      case "Chat":
      case "Disconnect":
        return; // legacy traffic of the `default` channel (older servers only)
      case "Error":
        this._emit("error", new RustySocksError(msg.code ?? "server_error", msg.message ?? "legacy error"));
        return;
      case "publication": {
        const sub = this._subs.get(msg.channel);
        if (sub) this._onPublication(sub, msg);
        return;
      }
      case "join":
      case "leave": {
        const sub = this._subs.get(msg.channel);
        if (sub && sub.state === "subscribed") {
          this._call(sub, msg.type === "join" ? "onJoin" : "onLeave", toClientInfo(msg.client));
        }
        return;
      }
      case "gap": {
        const sub = this._subs.get(msg.channel);
        if (sub && sub.state === "subscribed") this._onGapPush(sub, msg.offset);
        return;
      }
      case "refresh":
        if (msg.id == null) {
          this._onRefreshPush(ws);
          return;
        }
        break;
      default:
        break;
    }
    if (msg.id != null && this._pending.has(msg.id)) {
      const entry = this._pending.get(msg.id);
      this._pending.delete(msg.id);
      clearTimeout(entry.timer);
      if (msg.type === "error") {
        entry.onError(new RustySocksError(msg.code ?? "server_error", msg.message ?? msg.code, { channel: entry.frame.channel }));
      } else {
        entry.onReply(msg);
      }
    } else if (msg.type === "error") {
      this._emit("error", new RustySocksError(msg.code ?? "server_error", msg.message ?? msg.code));
    }
  }

  /** @private @param {any} ws @param {number} code @param {string} reason */
  _onClose(ws, code, reason) {
    if (ws !== this._ws) return;
    this._detach(ws);
    this._lostConnection();
    const terminal = code >= 4500 && code <= 4999;
    const reconnect = this._wanted && !terminal;
    this._emit("disconnected", { code, reason: reason ?? "", reconnect });
    if (!this._wanted) return;
    if (terminal) {
      this._giveUp(new RustySocksError("closed", `closed by the server (${code}${reason ? ": " + reason : ""})`, { closeCode: code }));
    } else {
      this._scheduleReconnect();
    }
  }

  /** Forgets the socket: fails the commands in flight, marks subscriptions for resubscribe.
   * @private @param {string} [code] */
  _lostConnection(code = "disconnected") {
    clearTimeout(this._connectTimer);
    this._ws = null;
    this._open = false;
    this.clientId = null;
    const inFlight = [...this._pending.values()];
    this._pending.clear();
    for (const sub of this._subs.values()) {
      sub.state = "subscribing";
      sub._catchUp = null;
    }
    for (const entry of inFlight) {
      clearTimeout(entry.timer);
      const message = code === "closed" ? "the client was closed before the reply" : "the connection dropped before the reply";
      entry.onError(new RustySocksError(code, message, { channel: entry.frame.channel }));
    }
  }

  /** Stops for good (until the next `connect()`).
   * @private @param {RustySocksError} error */
  _giveUp(error) {
    this._wanted = false;
    this._failQueued(error);
    this._setState("disconnected");
  }

  /** @private @param {RustySocksError} error */
  _failQueued(error) {
    const queued = this._queue;
    this._queue = [];
    for (const entry of queued) {
      clearTimeout(entry.timer);
      entry.onError(error);
    }
    for (const waiter of this._connectWaiters.splice(0)) waiter.reject(error);
  }

  /** @private */
  _scheduleReconnect() {
    const delay = backoffDelay(this._attempt, this.minDelay, this.maxDelay, this._random);
    this._attempt++;
    this._setState("connecting");
    this._emit("reconnecting", { attempt: this._attempt, delay });
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = setTimeout(() => {
      this._reconnectTimer = null;
      if (this._wanted) this._openSocket();
    }, delay);
  }

  /**
   * Sends a command with a fresh `id` (now, or once connected); exactly one of the callbacks is
   * called, synchronously with the reply's arrival.
   * @private
   * @param {any} frame
   * @param {(reply: any) => void} onReply
   * @param {(error: RustySocksError) => void} onError
   */
  _send(frame, onReply, onError) {
    if (!this._wanted) {
      onError(new RustySocksError("closed", "the client is not connected: call connect()", { channel: frame.channel }));
      return;
    }
    const id = this._nextId++;
    const { type, ...rest } = frame;
    const entry = { id, frame: { type, id, ...rest }, onReply, onError, timer: /** @type {any} */ (null) };
    entry.timer = setTimeout(() => {
      this._pending.delete(id);
      const i = this._queue.indexOf(entry);
      if (i >= 0) this._queue.splice(i, 1);
      onError(new RustySocksError("timeout", `no reply to ${type} within ${this.timeout} ms`, { channel: frame.channel }));
    }, this.timeout);
    if (this._open) this._transmit(entry);
    else this._queue.push(entry);
  }

  /** @private @param {any} entry */
  _transmit(entry) {
    this._pending.set(entry.id, entry);
    try {
      this._ws.send(JSON.stringify(entry.frame));
    } catch (err) {
      this._pending.delete(entry.id);
      clearTimeout(entry.timer);
      entry.onError(new RustySocksError("disconnected", "could not send", { channel: entry.frame.channel, cause: err }));
    }
  }

  /** @private @param {any} frame @returns {Promise<any>} */
  _request(frame) {
    return new Promise((resolve, reject) => this._send(frame, resolve, reject));
  }

  /** @private @param {Subscription} sub */
  _sendSubscribe(sub) {
    /** @type {any} */
    const frame = { type: "subscribe", channel: sub.channel };
    const since = sub.position;
    if (since) frame.since = since;
    sub.state = "subscribing";
    sub._catchUp = null;
    this._send(
      frame,
      (reply) => this._onSubscribed(sub, reply, since),
      (error) => {
        if (this._subs.get(sub.channel) !== sub) return;
        if (error.code === "disconnected" || error.code === "closed") return; // resubscribed later
        if (error.code === "timeout") {
          // No answer on an open connection: treat it as dead and start over.
          this._dropSocket("subscribe timeout");
          return;
        }
        this._subs.delete(sub.channel);
        sub.state = "unsubscribed";
        sub._rejectReady(error);
        if (typeof sub._handlers.onError === "function") this._call(sub, "onError", error);
        else this._emit("error", error);
      },
    );
  }

  /** @private @param {Subscription} sub @param {any} reply @param {StreamPosition | null} since */
  _onSubscribed(sub, reply, since) {
    if (this._subs.get(sub.channel) !== sub) return;
    sub.state = "subscribed";
    const recovered = Boolean(reply.recovered);
    let missed = 0;
    if (since && recovered) {
      for (const p of reply.publications ?? []) {
        if (sub.offset == null || p.offset > sub.offset) {
          this._deliver(sub, p);
          missed++;
        }
      }
    }
    // A new epoch: the stream restarted after `since` (server restart, history lost) and its
    // offsets start again at 1, so `since.offset` means nothing in it. Every publication of the
    // new epoch is newer than the ones delivered: deliver them from its start.
    const restarted = since != null && !recovered && reply.epoch !== since.epoch;
    if (restarted) sub._restarted = true;
    sub.epoch = reply.epoch;
    sub.offset = restarted ? 0 : reply.offset;
    const resubscribe = sub._confirmed;
    sub._confirmed = true;
    const info = { offset: reply.offset, epoch: reply.epoch, recovered };
    if (since && restarted && reply.offset > 0) {
      // Live ones are held back meanwhile; `onRecovered` follows the fetch.
      this._startCatchUp(sub, 0, reply.offset);
    } else if (since) {
      this._reportRecovery(sub, since, reply, missed);
    }
    this._call(sub, "onSubscribed", { ...info, resubscribe });
    sub._resolveReady(info);
  }

  /**
   * Calls `onRecovered` after a resubscribe with `since`.
   * @private @param {Subscription} sub @param {StreamPosition} since @param {any} reply @param {number} missed
   */
  _reportRecovery(sub, since, reply, missed) {
    const restarted = sub._restarted;
    sub._restarted = false;
    const sameEpoch = reply.epoch === since.epoch;
    // Nothing to recover is a success too (a namespace that denies `read_history` answers
    // `recovered: false` even then).
    const ok = !restarted && (Boolean(reply.recovered) || (sameEpoch && reply.offset === since.offset));
    /** @type {number | null} */
    let lost = null;
    if (ok) lost = 0;
    else if (!restarted && sameEpoch && reply.offset > since.offset) lost = reply.offset - since.offset;
    this._call(sub, "onRecovered", ok, { missed, lost, epochChanged: restarted, offset: /** @type {number} */ (sub.offset), epoch: /** @type {string} */ (sub.epoch) });
  }

  /** @private @param {Subscription} sub @param {any} p */
  _deliver(sub, p) {
    if (typeof p.offset === "number") sub.offset = p.offset;
    this._call(sub, "onPublication", toPublication(sub.channel, /** @type {string} */ (sub.epoch), p));
  }

  /** @private @param {Subscription} sub @param {any} msg */
  _onPublication(sub, msg) {
    // Before the `subscribed` reply: leftovers of an earlier subscription (the reply's offset
    // says where live publications continue).
    if (sub.state !== "subscribed") return;
    if (sub._catchUp) {
      sub._catchUp.buffer.push(msg);
      return;
    }
    // Publications carry the epoch of the stream their offset belongs to (an older server
    // sends none: then it is the one held).
    if (typeof msg.epoch === "string" && msg.epoch !== "" && sub.epoch != null && msg.epoch !== sub.epoch) {
      if (sub.epoch === "" && (sub.offset ?? 0) === 0) {
        // Subscribed before the channel's first publication (`{offset: 0, epoch: ""}`): that
        // position is the start of whatever epoch the first publication began. Take it.
        sub.epoch = msg.epoch;
        sub.offset = 0;
      } else {
        // The stream restarted: offsets held mean nothing in the new epoch. Fetch the new
        // epoch from its start (reported with `onGap`, `epochChanged: true`), then this one.
        this._startCatchUp(sub, /** @type {number} */ (sub.offset));
        const started = /** @type {null | {buffer: any[]}} */ (sub._catchUp);
        if (started) started.buffer.push(msg);
        return;
      }
    }
    if (typeof msg.offset !== "number" || sub.offset == null) {
      this._deliver(sub, msg);
      return;
    }
    if (msg.offset <= sub.offset) return; // already delivered
    if (msg.offset > sub.offset + 1) {
      // Publications are missing: fetch them first, keep this one for after.
      this._startCatchUp(sub, sub.offset);
      const started = /** @type {null | {buffer: any[]}} */ (sub._catchUp);
      if (started) started.buffer.push(msg);
      return;
    }
    this._deliver(sub, msg);
  }

  /** @private @param {Subscription} sub @param {number} offset */
  _onGapPush(sub, offset) {
    if (sub._catchUp) {
      sub._catchUp.regap = true;
      return;
    }
    this._startCatchUp(sub, typeof offset === "number" ? offset : /** @type {number} */ (sub.offset));
  }

  /**
   * Fetches the publications after `sub.offset` from history (paging on if `limit` cut a
   * reply), delivers them, then the live ones buffered meanwhile. All or nothing, like
   * recovery: if history no longer covers them, none is delivered and `onGap` says so.
   *
   * If the channel's epoch turns out to have changed (its stream restarted, offsets starting
   * again at 1), what followed `sub.offset` in the old epoch is gone, and every publication of
   * the new epoch is newer than those delivered: it fetches the new epoch from its start.
   * With `restartTop` (the offset a resubscribe found in a new epoch), that is what it does from
   * the beginning, and it reports with `onRecovered` instead of `onGap`.
   * @private @param {Subscription} sub @param {number} gapOffset @param {number} [restartTop]
   */
  _startCatchUp(sub, gapOffset, restartTop) {
    if (sub.offset == null || sub.epoch == null) return;
    const catchUp = { buffer: /** @type {any[]} */ ([]), regap: false, gapOffset };
    sub._catchUp = catchUp;
    const since = { offset: sub.offset, epoch: sub.epoch };
    /** @type {any[]} */
    let fetched = [];
    let from = sub.offset;
    let epoch = sub.epoch;
    let epochChanged = restartTop != null;
    /** @type {number | undefined} the stream's offset, as far as known */
    let top = restartTop;
    let restarts = 0;
    const finish = (/** @type {boolean} */ recovered) => {
      sub._catchUp = null;
      if (epoch !== sub.epoch) {
        // Positions of the old epoch mean nothing in the new one.
        sub.epoch = epoch;
        sub.offset = 0;
      }
      let missed = 0;
      if (recovered) {
        for (const p of fetched) {
          if (p.offset > /** @type {number} */ (sub.offset)) {
            this._deliver(sub, p);
            missed++;
          }
        }
      }
      if (restartTop != null) {
        this._reportRecovery(sub, since, { recovered: false, offset: top, epoch }, missed);
      } else {
        this._call(sub, "onGap", { offset: gapOffset, recovered: recovered && !epochChanged, missed, epochChanged });
      }
      // Live ones received meanwhile of an epoch other than the one history just reported
      // belong to a life of the stream that is over (a newer one is announced by a `gap`,
      // which fetches it): dropped, or they would start one catch-up after another.
      const buffered = catchUp.buffer.filter(
        (msg) => typeof msg.epoch !== "string" || msg.epoch === "" || sub.epoch === "" || msg.epoch === sub.epoch,
      );
      if (recovered) {
        for (const msg of buffered) this._onPublication(sub, msg);
      } else {
        // None of the missing ones is delivered; the live ones received meanwhile still are
        // (they follow the gap), then live publications continue after `top`.
        for (const msg of buffered) {
          if (sub._catchUp) {
            // The first publication of a channel that was empty started a catch-up: it
            // takes the rest.
            sub._catchUp.buffer.push(msg);
          } else if (typeof msg.epoch === "string" && msg.epoch !== "" && msg.epoch !== sub.epoch) {
            this._onPublication(sub, msg);
          } else if (typeof msg.offset === "number" && msg.offset > /** @type {number} */ (sub.offset)) {
            this._deliver(sub, msg);
          }
        }
        if (typeof top === "number" && top > /** @type {number} */ (sub.offset)) sub.offset = top;
      }
      if (catchUp.regap && !sub._catchUp && this._subs.get(sub.channel) === sub && sub.state === "subscribed") {
        this._startCatchUp(sub, /** @type {number} */ (sub.offset));
      }
    };
    const step = () => {
      this._send(
        { type: "history", channel: sub.channel, since: { offset: from, epoch } },
        (reply) => {
          if (sub._catchUp !== catchUp) return;
          const pubs = reply.publications ?? [];
          top = reply.offset;
          if (reply.epoch !== epoch) {
            // A new epoch: start again from its beginning (a few times at most).
            epoch = reply.epoch;
            epochChanged = true;
            fetched = [];
            from = 0;
            if (++restarts > 3) finish(false);
            else step();
            return;
          }
          if (reply.complete === false) {
            finish(false);
            return;
          }
          fetched.push(...pubs);
          const last = pubs.length ? pubs[pubs.length - 1].offset : from;
          if (last >= reply.offset) {
            finish(true);
          } else if (pubs.length === 0) {
            finish(false);
          } else {
            from = last; // `limit` cut the reply: page on
            step();
          }
        },
        (error) => {
          if (sub._catchUp !== catchUp) return;
          if (error.code === "disconnected" || error.code === "closed") return; // recovery on resubscribe
          this._emit("error", error);
          if (error.code === "timeout") {
            sub._catchUp = null;
            this._dropSocket("history timeout");
            return;
          }
          // History refused (e.g. permission_denied): the gap is not recovered.
          finish(false);
        },
      );
    };
    step();
  }

  /** @internal @param {Subscription} sub @returns {Promise<void>} */
  _unsubscribe(sub) {
    if (this._subs.get(sub.channel) !== sub) return Promise.resolve();
    this._subs.delete(sub.channel);
    const wasConfirmed = sub._confirmed;
    sub.state = "unsubscribed";
    sub._catchUp = null;
    if (!wasConfirmed) sub._rejectReady(new RustySocksError("unsubscribed", "unsubscribed before the server confirmed", { channel: sub.channel }));
    if (!this._open) return Promise.resolve();
    return new Promise((resolve) => this._send({ type: "unsubscribe", channel: sub.channel }, () => resolve(), () => resolve()));
  }

  /** @private @param {any} ws */
  async _onRefreshPush(ws) {
    if (typeof this._token !== "function") {
      this._emit("error", new RustySocksError("token_failed", "the server asked for a new token, but `token` is not a function"));
      return;
    }
    let token;
    try {
      token = await this._token();
    } catch (err) {
      this._emit("error", new RustySocksError("token_failed", "the token function failed", { cause: err }));
      return;
    }
    if (ws !== this._ws || !this._open) return; // the next connection uses a fresh token anyway
    this._send(
      { type: "refresh", token },
      (reply) => this._emit("refreshed", { expiresAt: reply.expires_at }),
      (error) => {
        if (error.code !== "disconnected" && error.code !== "closed") this._emit("error", error);
      },
    );
  }
}

export default RustySocks;
