// The transcript of one conversation: the newest page first, older pages loaded as the reader
// scrolls up (a long conversation is never fetched whole). Each message is an <article> with
// data-message-id and data-role; its actions come from `actionsFor`, one list per message, so
// that more of them (edit, regenerate, branch arrows) slot in beside Copy.
import { copyText, renderMarkdown } from "./markdown.js";

const ROLE_NAMES = { user: "You", assistant: "Assistant", system: "System", tool: "Tool" };
const PAGE = 50;
const PAGE_WHEN_SEEKING = 100;

export class Transcript {
  constructor({ api, scroller, list, older, empty, onError }) {
    Object.assign(this, { api, scroller, list, older, empty, onError });
    this.reset(null);
    older.addEventListener("click", () => this.loadOlder());
    // Scrolling near the top loads the page before: a sentinel, not a scroll handler.
    new IntersectionObserver((entries) => {
      if (entries.some((e) => e.isIntersecting) && this.cursor && !this.loading) this.loadOlder();
    }, { root: scroller, rootMargin: "200px 0px 0px 0px" }).observe(older);
  }

  reset(conversationId) {
    this.conversationId = conversationId;
    this.messages = new Map(); // id -> message, in the order shown (seq)
    this.cursor = null;
    this.loading = null;
    this.list.replaceChildren();
    this.older.hidden = true;
    this.updateEmpty();
  }

  updateEmpty() {
    this.empty.hidden = this.list.childElementCount > 0;
  }

  /** Show a conversation: its newest page (one request), then, if asked, seek one message. */
  async open(conversationId, { minPosition, messageId } = {}) {
    this.reset(conversationId);
    await this.loadPage({ minPosition, limit: messageId ? PAGE_WHEN_SEEKING : PAGE });
    this.scrollToEnd();
    if (messageId) await this.reveal(messageId);
  }

  /** Load the page before the oldest shown, keeping what the reader sees where it is. */
  loadOlder() {
    if (!this.cursor) return Promise.resolve();
    if (!this.loading) {
      const from = this.scroller.scrollHeight - this.scroller.scrollTop;
      this.loading = this.loadPage({ cursor: this.cursor })
        .then(() => (this.scroller.scrollTop = this.scroller.scrollHeight - from))
        .catch((err) => this.onError(err))
        .finally(() => (this.loading = null));
    }
    return this.loading;
  }

  async loadPage({ cursor, minPosition, limit = PAGE }) {
    const id = this.conversationId;
    const page = await this.api.listMessages(id, { cursor, minPosition, limit });
    if (id !== this.conversationId) return; // another conversation was opened meanwhile
    const fresh = page.data.filter((m) => !this.messages.has(m.id)).reverse();
    const anchor = this.list.firstElementChild;
    for (const message of fresh) {
      this.messages.set(message.id, message);
      this.list.insertBefore(this.render(message), anchor);
    }
    this.cursor = page.has_more ? page.next_cursor : null;
    this.older.hidden = !this.cursor;
    this.updateEmpty();
  }

  /** Load older pages until `messageId` is shown, then scroll to it and focus it. */
  async reveal(messageId) {
    while (!this.messages.has(messageId) && this.cursor) {
      await this.loadPage({ cursor: this.cursor, limit: PAGE_WHEN_SEEKING });
    }
    const article = this.articleOf(messageId);
    if (!article) return false;
    article.classList.add("found");
    article.scrollIntoView({ block: "center" });
    article.focus({ preventScroll: true });
    setTimeout(() => article.classList.remove("found"), 4000);
    return true;
  }

  articleOf(messageId) {
    return this.list.querySelector(`article[data-message-id="${CSS.escape(messageId)}"]`);
  }

  /** Newest messages, after a write: add what is not shown yet. */
  async refresh(minPosition) {
    const id = this.conversationId;
    const page = await this.api.listMessages(id, { minPosition, limit: PAGE });
    if (id !== this.conversationId) return;
    for (const message of page.data.slice().reverse()) this.add(message);
  }

  /** Add (or replace) a stored message, in seq order. */
  add(message) {
    const article = this.render(message);
    const old = this.articleOf(message.id);
    this.messages.set(message.id, message);
    if (old) old.replaceWith(article);
    else {
      const after = [...this.list.children].find((a) => Number(a.dataset.seq) > message.seq);
      this.list.insertBefore(article, after || null);
    }
    this.updateEmpty();
    return article;
  }

  /** A message written here but not stored yet (its article is replaced once it is). */
  addPending(role, content) {
    const article = this.render({ id: "", role, content, seq: Infinity });
    article.classList.add("pending");
    this.list.append(article);
    this.updateEmpty();
    this.scrollToEnd();
    return article;
  }

  scrollToEnd() {
    this.scroller.scrollTop = this.scroller.scrollHeight;
  }

  /** The actions a message offers, as (label, handler) pairs. */
  actionsFor(message) {
    return [{ label: "Copy", run: (button) => copyText(message.content, button) }];
  }

  render(message) {
    const article = document.createElement("article");
    article.className = `message role-${message.role}`;
    article.dataset.messageId = message.id;
    article.dataset.role = message.role;
    if (Number.isFinite(message.seq)) article.dataset.seq = String(message.seq);
    article.tabIndex = -1;
    article.setAttribute("aria-label", ROLE_NAMES[message.role] || message.role);

    const header = document.createElement("header");
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = ROLE_NAMES[message.role] || message.role;
    header.append(who);
    if (message.created_at) {
      const time = document.createElement("time");
      time.dateTime = message.created_at;
      time.textContent = new Date(message.created_at).toLocaleString();
      header.append(time);
    }
    const body = document.createElement("div");
    body.className = "body";
    body.append(renderMarkdown(message.content));
    article.append(header, body);
    if (message.id) article.append(this.actionBar(message));
    return article;
  }

  actionBar(message) {
    const bar = document.createElement("div");
    bar.className = "actions";
    for (const action of this.actionsFor(message)) {
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = action.label;
      button.addEventListener("click", () => action.run(button));
      bar.append(button);
    }
    return bar;
  }

  /** A reply being streamed: text shown as it comes, rendered once per frame. */
  startReply() {
    const article = this.addPending("assistant", "");
    article.setAttribute("aria-busy", "true");
    const body = article.querySelector(".body");
    let text = "";
    let queued = false;
    const paint = () => {
      queued = false;
      const nearEnd = this.scroller.scrollHeight - this.scroller.scrollTop - this.scroller.clientHeight < 80;
      body.replaceChildren(renderMarkdown(text));
      if (nearEnd) this.scrollToEnd();
    };
    return {
      article,
      append: (piece) => {
        text += piece;
        if (!queued) {
          queued = true;
          requestAnimationFrame(paint);
        }
      },
      text: () => text,
    };
  }
}
