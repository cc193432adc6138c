// The transcript of one conversation: its active branch, the newest page first, older pages
// loaded as the reader scrolls up (a long conversation is never fetched whole). Each message is
// an <article> with data-message-id and data-role; its actions come from `actionsFor`: Copy,
// Edit (the person's messages), Regenerate (the assistant's), and, where a message has
// siblings (other branches at that point), Previous branch / Next branch with "k / n".
import { copyText, renderMarkdown } from "./markdown.js";

const ROLE_NAMES = { user: "You", assistant: "Assistant", system: "System", tool: "Tool" };
const PAGE = 50;
const PAGE_WHEN_SEEKING = 100;
const TREE_PAGE = 100;
const TREE_LIMIT = 2000; // the branch arrows of a larger tree are not shown (its pages would be many)

export class Transcript {
  constructor({ api, scroller, list, older, empty, onError, onEdit, onRegenerate, onSwitch }) {
    Object.assign(this, { api, scroller, list, older, empty, onError, onEdit, onRegenerate, onSwitch });
    this.reset(null);
    older.addEventListener("click", () => this.loadOlder());
    // Scrolling near the top loads the page before: a sentinel, not a scroll handler.
    new IntersectionObserver((entries) => {
      if (entries.some((e) => e.isIntersecting) && this.cursor && !this.loading) this.loadOlder();
    }, { root: scroller, rootMargin: "200px 0px 0px 0px" }).observe(older);
  }

  reset(conversationId) {
    this.conversationId = conversationId;
    this.messages = new Map(); // id -> message, in the order shown (path order)
    this.children = null; // parent id ("" for none) -> its children in seq order, once the tree is known
    this.messageCount = undefined; // the conversation's, as the list said when it was opened
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

  /** The tree's shape (who follows whom), for the branch arrows. Not asked for when the branch
   * shown holds every message of the conversation, nor, for a long branch shown in part, when
   * the messages shown are the conversation's newest one after another (seq n-k+1 .. n): any
   * sibling of them would then be among them, the oldest one's excepted, so a linear
   * conversation costs no request. */
  async loadTree(messageCount) {
    this.messageCount = messageCount;
    const id = this.conversationId;
    if (!id || messageCount === 0 || messageCount > TREE_LIMIT) return;
    if (!this.cursor && this.messages.size === messageCount) return;
    const seqs = [...this.messages.values()].map((m) => m.seq).sort((a, b) => a - b);
    const newest = seqs.length > 0 && seqs[seqs.length - 1] === messageCount;
    if (this.cursor && newest && seqs.every((seq, i) => i === 0 || seq === seqs[i - 1] + 1)) return;
    const children = new Map();
    let cursor;
    for (let loaded = 0; loaded < TREE_LIMIT; loaded += TREE_PAGE) {
      const page = await this.api.listMessages(id, { tree: true, order: "asc", limit: TREE_PAGE, cursor });
      if (id !== this.conversationId) return;
      for (const m of page.data) {
        const key = m.parent_id || "";
        if (!children.has(key)) children.set(key, []);
        children.get(key).push(m);
      }
      if (!page.has_more) break;
      cursor = page.next_cursor;
    }
    this.children = children;
    for (const message of this.messages.values()) this.articleOf(message.id)?.querySelector(".actions")?.replaceWith(this.actionBar(message));
  }

  siblingsOf(message) {
    return this.children?.get(message.parent_id || "") || [message];
  }

  /** The branch to show for `message`: the latest continuation below it, down to a leaf. */
  leafUnder(message) {
    let at = message;
    for (let next; (next = this.children?.get(at.id)); ) at = next[next.length - 1];
    return at.id;
  }

  /** Load the page before the oldest shown, keeping what the reader sees where it is. */
  loadOlder() {
    if (!this.cursor) return Promise.resolve();
    if (!this.loading) {
      const from = this.scroller.scrollHeight - this.scroller.scrollTop;
      this.loading = this.loadPage({ cursor: this.cursor })
        .then(() => (this.scroller.scrollTop = this.scroller.scrollHeight - from))
        .then(() => this.children || this.messageCount === undefined || this.loadTree(this.messageCount))
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
    const actions = [{ label: "Copy", run: (button) => copyText(message.content, button) }];
    if (message.role === "user" && this.onEdit) actions.push({ label: "Edit", run: () => this.onEdit(message) });
    if (message.role === "assistant" && this.onRegenerate) {
      actions.push({ label: "Regenerate", run: () => this.onRegenerate(message) });
    }
    return actions;
  }

  /** Previous branch, "k / n", Next branch: where the message has siblings. */
  branchArrows(message) {
    const siblings = this.siblingsOf(message);
    if (siblings.length < 2 || !this.onSwitch) return [];
    const k = siblings.findIndex((m) => m.id === message.id);
    const arrow = (label, text, to) => {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "branch";
      button.textContent = text;
      button.setAttribute("aria-label", label);
      button.disabled = !to;
      if (to) button.addEventListener("click", () => this.onSwitch(this.leafUnder(to)));
      return button;
    };
    const where = document.createElement("span");
    where.className = "branch-count";
    where.textContent = `${k + 1} / ${siblings.length}`;
    return [arrow("Previous branch", "‹", siblings[k - 1]), where, arrow("Next branch", "›", siblings[k + 1])];
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
    bar.append(...this.branchArrows(message));
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
