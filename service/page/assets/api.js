// The page's only way to the server: the /v1 API of shared/API.md, with the bearer token.
// Every POST carries an Idempotency-Key, and a request that failed on the network is sent again
// with the same key, so a retry never doubles a message.

const RETRIES = 3;

export class ApiError extends Error {
  constructor(status, problem) {
    super(problem?.detail || problem?.title || `HTTP ${status}`);
    this.status = status;
    this.problem = problem || {};
    this.code = this.problem.code || (status === 0 ? "network" : "internal");
  }
}

const WORDS = {
  network: "Cannot reach the chatlog server. Check your connection and try again.",
  unauthorized: "Your sign-in is not valid any more. Sign in again.",
  not_found: "That conversation does not exist any more (it may have been deleted).",
  version_conflict: "The conversation changed at the same time. It has been reloaded: try again.",
  idempotency_mismatch: "This request was already sent with different content.",
  payload_too_large: "That is too large to send.",
  not_ready: "The server is still catching up. Try again in a moment.",
  assistant_error: "The assistant could not answer. Your message is saved: try again.",
  internal: "Something went wrong on the server. Try again.",
};

/** Words a person understands for an error (from the problem document where it has some). */
export function describe(error) {
  if (!(error instanceof ApiError)) return WORDS.internal;
  if (error.code === "validation_error") {
    const first = error.problem.errors?.[0]?.message;
    return `That was not accepted: ${first || error.problem.detail || "invalid input"}.`;
  }
  return WORDS[error.code] || error.problem.detail || WORDS.internal;
}

export function newKey() {
  return crypto.randomUUID();
}

export class Api {
  /** @param {() => string | null} token  @param {() => void} onUnauthorized */
  constructor(token, onUnauthorized) {
    this.token = token;
    this.onUnauthorized = onUnauthorized;
  }

  headers(extra = {}) {
    const h = { Accept: "application/json", ...extra };
    const token = this.token();
    if (token) h.Authorization = `Bearer ${token}`;
    return h;
  }

  /** fetch, sent again on a network failure (same key), refused answers raised as ApiError. */
  async send(method, path, { query, body, key, signal } = {}) {
    const url = query ? `${path}?${new URLSearchParams(clean(query))}` : path;
    const headers = this.headers(body === undefined ? {} : { "Content-Type": "application/json" });
    if (method === "POST") headers["Idempotency-Key"] = key || newKey();
    const init = { method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body) };
    for (let attempt = 0; ; attempt++) {
      let response;
      try {
        response = await fetch(url, init);
      } catch (err) {
        if (signal?.aborted) throw err;
        if (attempt + 1 >= RETRIES) throw new ApiError(0, { detail: String(err) });
        await sleep(300 * 2 ** attempt);
        continue;
      }
      if (response.ok) return response;
      const error = new ApiError(response.status, await problemOf(response));
      if (response.status === 401) this.onUnauthorized();
      throw error;
    }
  }

  async json(method, path, options) {
    const response = await this.send(method, path, options);
    return response.status === 204 ? null : response.json();
  }

  listConversations(cursor, minPosition) {
    return this.json("GET", "/v1/conversations", { query: { limit: 30, cursor, min_position: minPosition } });
  }
  getConversation(id, minPosition) {
    return this.json("GET", `/v1/conversations/${id}`, { query: { min_position: minPosition } });
  }
  /** A page of messages, newest first (the page shows the newest page, then older ones). */
  listMessages(id, { cursor, limit = 50, minPosition, order = "desc", tree } = {}) {
    return this.json("GET", `/v1/conversations/${id}/messages`, {
      query: { order, limit, cursor, min_position: minPosition, tree: tree ? "true" : undefined },
    });
  }
  /** Make the branch that ends at `leafId` the active one. */
  selectBranch(id, leafId) {
    return this.json("PATCH", `/v1/conversations/${id}`, { body: { active_leaf_id: leafId } });
  }
  rename(id, title) {
    return this.json("PATCH", `/v1/conversations/${id}`, { body: { title } });
  }
  async remove(id) {
    const response = await this.send("DELETE", `/v1/conversations/${id}`);
    return Number(response.headers.get("Chatlog-Position")) || undefined;
  }
  search(q, cursor) {
    return this.json("GET", "/v1/search", { query: { q, limit: 20, cursor } });
  }

  /**
   * A streamed chat turn. Calls onDelta(text) per piece; resolves to the stored assistant
   * message. The signal stops it (the user's message stays stored, no reply is).
   */
  async chat(body, key, { onDelta, signal }) {
    const response = await this.send("POST", "/v1/chat", { body: { ...body, stream: true }, key, signal });
    const type = response.headers.get("Content-Type") || "";
    if (!type.startsWith("text/event-stream")) {
      const answer = await response.json(); // an answer given whole
      return answer.messages[answer.messages.length - 1];
    }
    let message = null;
    for await (const [event, data] of serverSentEvents(response.body, signal)) {
      if (event === "delta") onDelta(JSON.parse(data).content);
      else if (event === "message") message = JSON.parse(data);
      else if (event === "error") {
        const problem = JSON.parse(data);
        throw new ApiError(problem.status || 502, problem);
      }
    }
    if (!message) throw new ApiError(502, { code: "assistant_error", detail: "the reply ended early" });
    return message;
  }
}

/** (event, data) pairs of a text/event-stream body. */
async function* serverSentEvents(body, signal) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  const cancel = () => reader.cancel().catch(() => {});
  signal?.addEventListener("abort", cancel, { once: true });
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let event = "message";
        const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith("event:")) event = line.slice(6).trim();
          else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
        }
        if (data.length) yield [event, data.join("\n")];
      }
    }
  } finally {
    signal?.removeEventListener("abort", cancel);
  }
  if (signal?.aborted) throw new DOMException("stopped", "AbortError");
}

async function problemOf(response) {
  try {
    return await response.json();
  } catch {
    return { status: response.status, detail: response.statusText };
  }
}

function clean(query) {
  return Object.fromEntries(Object.entries(query).filter(([, v]) => v !== undefined && v !== null && v !== ""));
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
