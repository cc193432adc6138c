// The chat page: sign-in, the conversation list, the transcript, writing with a streamed reply,
// search, rename, delete, export, keyboard shortcuts and the narrow layout. Plain ES modules, no
// build step: every file under /assets/ is what the browser runs.
import { Api, ApiError, describe, newKey } from "./api.js";
import { renderSnippet } from "./markdown.js";
import { Transcript } from "./transcript.js";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "chatlog.token";
const NARROW = window.matchMedia("(max-width: 760px)");

const state = {
  conversations: new Map(), // id -> conversation, as last seen
  listCursor: null,
  current: null, // the open conversation's id (null: a new chat)
  streaming: null, // the AbortController of the reply being streamed
  editing: null, // the message being edited: Send follows its parent instead of the active leaf
  searchCursor: null,
  searchQuery: "",
};

const api = new Api(() => sessionStorage.getItem(TOKEN_KEY), () => signOut("Your sign-in is not valid any more. Sign in again."));
const transcript = new Transcript({
  api,
  scroller: $("messages"),
  list: $("message-list"),
  older: $("older"),
  empty: $("empty"),
  onError: showError,
  onEdit: startEdit,
  onRegenerate: regenerate,
  onSwitch: switchBranch,
});

// ---- messages to the person ------------------------------------------------------------------

function showError(err) {
  if (err?.name === "AbortError") return;
  if (err instanceof ApiError && err.status === 401) return; // sign-in is shown instead
  if (!(err instanceof ApiError)) console.warn(err); // a defect of the page: keep it visible to developers
  $("alert-text").textContent = describe(err);
  $("alert").hidden = false;
}

function clearError() {
  $("alert").hidden = true;
}

function announce(text) {
  const status = $("status");
  status.textContent = "";
  setTimeout(() => (status.textContent = text), 50); // a change the screen reader hears
}

// ---- sign-in ---------------------------------------------------------------------------------

function takeTokenFromAddress() {
  const params = new URLSearchParams(location.hash.slice(1));
  const token = params.get("token");
  if (!token) return;
  sessionStorage.setItem(TOKEN_KEY, token);
  params.delete("token");
  const rest = params.toString();
  history.replaceState(null, "", location.pathname + location.search + (rest ? `#${rest}` : ""));
}

function subjectOf(token) {
  try {
    const payload = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(new TextDecoder().decode(Uint8Array.from(atob(payload), (c) => c.charCodeAt(0)))).sub;
  } catch {
    return "";
  }
}

function askForToken(message) {
  const dialog = $("sign-in-dialog");
  $("sign-in-error").textContent = message || "";
  $("sign-in-error").hidden = !message;
  if (!dialog.open) dialog.showModal();
  $("token").focus();
}

function signOut(message) {
  stopReply();
  sessionStorage.removeItem(TOKEN_KEY);
  state.conversations.clear();
  state.current = null;
  $("conversations").replaceChildren();
  transcript.reset(null);
  $("who").textContent = "";
  history.replaceState(null, "", location.pathname);
  askForToken(message);
}

$("sign-in-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const token = $("token").value.trim();
  if (!token) return askForToken("Paste a token first.");
  sessionStorage.setItem(TOKEN_KEY, token);
  try {
    await start();
    $("token").value = "";
    $("sign-in-dialog").close();
  } catch (err) {
    sessionStorage.removeItem(TOKEN_KEY);
    askForToken(err instanceof ApiError && err.status === 401 ? "That token was not accepted." : describe(err));
  }
});
$("sign-in-dialog").addEventListener("cancel", (event) => {
  if (!sessionStorage.getItem(TOKEN_KEY)) event.preventDefault(); // nothing to show without one
});
$("sign-out").addEventListener("click", () => signOut());

// ---- the conversation list -------------------------------------------------------------------

function titleOf(conversation) {
  return conversation.title || "Untitled";
}

function listItem(conversation) {
  const li = document.createElement("li");
  li.dataset.id = conversation.id;
  const a = document.createElement("a");
  a.href = `#c=${conversation.id}`;
  a.textContent = titleOf(conversation);
  if (conversation.id === state.current) a.setAttribute("aria-current", "page");
  const preview = document.createElement("span");
  preview.className = "preview";
  preview.textContent = conversation.last_message_preview || "";
  preview.setAttribute("aria-hidden", "true");
  a.append(preview);
  li.append(a);
  return li;
}

function showConversations(conversations, { append }) {
  const list = $("conversations");
  if (!append) {
    state.conversations.clear();
    list.replaceChildren();
  }
  for (const conversation of conversations) {
    if (state.conversations.has(conversation.id)) continue;
    state.conversations.set(conversation.id, conversation);
    list.append(listItem(conversation));
  }
  $("no-conversations").hidden = state.conversations.size > 0;
  $("more-conversations").hidden = !state.listCursor;
}

async function loadConversations(minPosition) {
  const page = await api.listConversations(null, minPosition);
  state.listCursor = page.has_more ? page.next_cursor : null;
  showConversations(page.data, { append: false });
}

let loadingMore = null;
function loadMoreConversations() {
  if (!state.listCursor || loadingMore) return;
  loadingMore = api.listConversations(state.listCursor)
    .then((page) => {
      state.listCursor = page.has_more ? page.next_cursor : null;
      showConversations(page.data, { append: true });
    })
    .catch(showError)
    .finally(() => (loadingMore = null));
}
$("more-conversations").addEventListener("click", loadMoreConversations);
new IntersectionObserver((entries) => {
  if (entries.some((e) => e.isIntersecting)) loadMoreConversations();
}, { root: $("sidebar") }).observe($("more-conversations"));

function markCurrent() {
  for (const a of $("conversations").querySelectorAll("a")) {
    if (a.parentElement.dataset.id === state.current) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
}

function setTitle(conversation) {
  $("title").textContent = conversation ? titleOf(conversation) : "New chat";
  $("conversation-actions").hidden = !conversation;
  document.title = conversation ? `${titleOf(conversation)} — chatlog` : "chatlog";
}

// ---- opening a conversation (the address says which: #c=ID, optionally &m=MESSAGE) ----------

function addressOf(id, messageId) {
  return id ? `#c=${id}${messageId ? `&m=${messageId}` : ""}` : "#";
}

async function openConversation(id, { messageId, minPosition } = {}) {
  stopReply();
  clearError();
  endEdit();
  state.current = id;
  markCurrent();
  closeDrawer();
  if (!id) {
    transcript.reset(null);
    setTitle(null);
    return;
  }
  const known = state.conversations.get(id);
  setTitle(known || { title: "…" });
  const conversation = known ? Promise.resolve(known) : api.getConversation(id, minPosition);
  try {
    const [found] = await Promise.all([conversation, transcript.open(id, { messageId, minPosition })]);
    if (state.current === id) {
      setTitle(found);
      transcript.loadTree(found.message_count).catch(showError); // for the branch arrows
    }
  } catch (err) {
    if (state.current !== id) return;
    showError(err);
    if (err instanceof ApiError && err.status === 404) {
      history.replaceState(null, "", location.pathname);
      state.current = null;
      setTitle(null);
      transcript.reset(null);
    }
  }
}

function openFromAddress() {
  const params = new URLSearchParams(location.hash.slice(1));
  return openConversation(params.get("c"), { messageId: params.get("m") });
}

window.addEventListener("hashchange", () => {
  takeTokenFromAddress();
  if (sessionStorage.getItem(TOKEN_KEY)) openFromAddress();
});

function newChat() {
  history.pushState(null, "", location.pathname);
  openConversation(null);
  $("message").focus();
}
$("new-chat").addEventListener("click", newChat);

// ---- writing, with the reply streamed --------------------------------------------------------

function setStreaming(controller) {
  state.streaming = controller;
  $("stop").hidden = !controller;
  $("send").hidden = Boolean(controller);
}

function stopReply() {
  state.streaming?.abort();
}
$("stop").addEventListener("click", () => {
  stopReply();
  $("message").focus();
});

async function send() {
  const box = $("message");
  const text = box.value;
  if (!text.trim() || state.streaming) return;
  clearError();
  box.value = "";
  growBox();
  const conversationId = state.current;
  const editing = conversationId ? state.editing : null;
  endEdit();
  const controller = new AbortController();
  const key = newKey(); // one key for the turn: a retry after a network error never doubles it
  const mine = transcript.addPending("user", text);
  const reply = transcript.startReply();
  setStreaming(controller);
  announce("The assistant is replying.");
  try {
    const body = conversationId ? { conversation_id: conversationId, message: text } : { message: text };
    if (editing) body.parent_id = editing.parent_id || null;
    const stored = await api.chat(body, key, { onDelta: reply.append, signal: controller.signal });
    if (editing) {
      mine.remove();
      reply.article.remove();
      announce("The reply is complete.");
      await afterBranchChange(conversationId, stored.position);
      return;
    }
    mine.remove();
    reply.article.remove();
    if (!conversationId && state.current === null) {
      state.current = stored.conversation_id;
      history.replaceState(null, "", location.pathname + addressOf(stored.conversation_id));
      transcript.conversationId = stored.conversation_id;
    }
    announce("The reply is complete.");
    if (state.current === stored.conversation_id) await transcript.refresh(stored.position);
    await loadConversations(stored.position);
    markCurrent();
    const conversation = state.conversations.get(stored.conversation_id);
    if (conversation && state.current === stored.conversation_id) setTitle(conversation);
  } catch (err) {
    reply.article.removeAttribute("aria-busy");
    if (err?.name === "AbortError") {
      reply.article.classList.add("stopped");
      reply.article.querySelector(".body").append(note("Stopped. This reply was not saved."));
      announce("The reply was stopped.");
      if (!conversationId) await adoptNewConversation().catch(showError);
      // An edit's message is stored, and its branch is the active one now: show it.
      if (editing) await afterBranchChange(conversationId).catch(showError);
      return;
    }
    reply.article.remove();
    const stored = err instanceof ApiError && err.code === "assistant_error" && err.problem.position;
    if (stored) {
      mine.remove();
      if (!conversationId) history.replaceState(null, "", location.pathname + addressOf(err.problem.conversation_id));
      await Promise.all([
        openConversation(err.problem.conversation_id, { minPosition: err.problem.position }),
        loadConversations(err.problem.position).then(markCurrent),
      ]).catch(showError);
    } else if (err instanceof ApiError && err.status >= 400 && err.status < 500) {
      mine.remove();
      box.value = text; // not stored: give it back to edit
      growBox();
      if (editing) {
        state.editing = editing; // still an edit, of the text given back
        $("editing").hidden = false;
      }
    }
    announce("The reply failed.");
    showError(err);
  } finally {
    if (state.streaming === controller) setStreaming(null);
  }
}

// ---- branches: edit, regenerate, switch --------------------------------------------------------

function startEdit(message) {
  state.editing = message;
  $("editing").hidden = false;
  const box = $("message");
  box.value = message.content;
  growBox();
  box.focus();
}

function endEdit() {
  state.editing = null;
  $("editing").hidden = true;
}
$("cancel-edit").addEventListener("click", () => {
  endEdit();
  $("message").value = "";
  growBox();
  $("message").focus();
});

/** The open conversation again, on its (new) active branch, and the list. */
async function afterBranchChange(id, position) {
  await loadConversations(position);
  markCurrent();
  if (state.current !== id) return;
  const conversation = state.conversations.get(id);
  if (conversation) setTitle(conversation);
  await transcript.open(id, { minPosition: position });
  if (state.current === id && conversation) await transcript.loadTree(conversation.message_count);
}

/** Ask again for an assistant reply: the new one is its sibling, and the active branch. */
async function regenerate(message) {
  const conversationId = state.current;
  if (!conversationId || state.streaming) return;
  clearError();
  const controller = new AbortController();
  const reply = transcript.startReply();
  setStreaming(controller);
  announce("The assistant is replying.");
  try {
    const body = { conversation_id: conversationId, regenerate_id: message.id };
    const stored = await api.chat(body, newKey(), { onDelta: reply.append, signal: controller.signal });
    reply.article.remove();
    announce("The reply is complete.");
    await afterBranchChange(conversationId, stored.position);
  } catch (err) {
    reply.article.remove();
    if (err?.name === "AbortError") announce("The reply was stopped.");
    else showError(err);
  } finally {
    if (state.streaming === controller) setStreaming(null);
  }
}

async function switchBranch(leafId) {
  const id = state.current;
  if (!id || state.streaming) return;
  clearError();
  try {
    const changed = await api.selectBranch(id, leafId);
    await afterBranchChange(id, changed.position);
  } catch (err) {
    showError(err);
  }
}

/** A new chat stopped before its reply: the stream never said the new conversation's id, but
 * the question is stored, so the list (which reads the user's own writes) now holds it. */
async function adoptNewConversation() {
  const known = new Set(state.conversations.keys());
  await loadConversations();
  const fresh = [...state.conversations.keys()].find((id) => !known.has(id));
  if (!fresh || state.current !== null) return;
  state.current = transcript.conversationId = fresh;
  history.replaceState(null, "", location.pathname + addressOf(fresh));
  markCurrent();
  setTitle(state.conversations.get(fresh));
}

function note(text) {
  const p = document.createElement("p");
  p.className = "note";
  p.textContent = text;
  return p;
}

function growBox() {
  const box = $("message");
  box.style.height = "auto";
  box.style.height = `${Math.min(box.scrollHeight, 240)}px`;
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  send();
});
$("message").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send();
  }
});
$("message").addEventListener("input", growBox);

// ---- search ----------------------------------------------------------------------------------

let searchTimer = 0;
$("search").addEventListener("input", () => {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(runSearch, 250);
});
$("search").addEventListener("keydown", (event) => {
  if (event.key === "Enter") {
    clearTimeout(searchTimer);
    runSearch();
  }
});

function endSearch() {
  $("search").value = "";
  state.searchQuery = "";
  $("search-results").hidden = true;
  $("conversations-nav").hidden = false;
}

async function runSearch({ more = false } = {}) {
  const q = $("search").value.trim();
  if (!q) return endSearch();
  if (!more) {
    state.searchQuery = q;
    state.searchCursor = null;
  }
  try {
    const page = await api.search(q, more ? state.searchCursor : undefined);
    if (state.searchQuery !== q) return;
    state.searchCursor = page.has_more ? page.next_cursor : null;
    if (!more) $("hits").replaceChildren();
    for (const hit of page.data) $("hits").append(hitItem(hit));
    const count = $("hits").childElementCount;
    $("search-summary").textContent = count ? `${count}${page.has_more ? "+" : ""} found` : "No messages found.";
    $("more-hits").hidden = !state.searchCursor;
    $("search-results").hidden = false;
    $("conversations-nav").hidden = true;
  } catch (err) {
    showError(err);
  }
}
$("more-hits").addEventListener("click", () => runSearch({ more: true }));

function hitItem(hit) {
  const li = document.createElement("li");
  const button = document.createElement("button");
  button.type = "button";
  button.className = "hit";
  const title = document.createElement("strong");
  title.textContent = hit.conversation_title || "Untitled";
  const snippet = document.createElement("span");
  snippet.className = "snippet";
  snippet.append(renderSnippet(hit.snippet));
  button.append(title, snippet);
  button.addEventListener("click", () => {
    const { conversation_id: id, id: messageId } = hit.message;
    endSearch();
    history.pushState(null, "", location.pathname + addressOf(id, messageId));
    openConversation(id, { messageId });
  });
  li.append(button);
  return li;
}

// ---- rename, delete, export ------------------------------------------------------------------

for (const cancel of document.querySelectorAll("dialog .cancel")) {
  cancel.addEventListener("click", () => cancel.closest("dialog").close());
}

$("rename").addEventListener("click", () => {
  const conversation = state.conversations.get(state.current);
  $("new-title").value = conversation?.title || "";
  $("rename-dialog").showModal();
  $("new-title").select();
});
$("rename-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const id = state.current;
  try {
    const renamed = await api.rename(id, $("new-title").value.trim());
    $("rename-dialog").close();
    state.conversations.set(id, renamed);
    $("conversations").querySelector(`li[data-id="${id}"]`)?.replaceWith(listItem(renamed));
    setTitle(renamed);
    announce("Renamed.");
  } catch (err) {
    $("rename-dialog").close();
    showError(err);
  }
});

$("delete").addEventListener("click", () => {
  $("delete-name").textContent = titleOf(state.conversations.get(state.current) || {});
  $("delete-dialog").showModal();
  $("delete-dialog").querySelector(".cancel").focus();
});
$("delete-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const id = state.current;
  $("delete-dialog").close();
  try {
    await api.remove(id);
    state.conversations.delete(id);
    $("conversations").querySelector(`li[data-id="${id}"]`)?.remove();
    $("no-conversations").hidden = state.conversations.size > 0;
    newChat();
    announce("Conversation deleted.");
  } catch (err) {
    showError(err);
  }
});

$("export").addEventListener("click", () => $("export-dialog").showModal());
$("export-markdown").addEventListener("click", () => exportAs("markdown"));
$("export-json").addEventListener("click", () => exportAs("json"));

async function allMessages(id) {
  const messages = [];
  let cursor;
  do {
    const page = await api.listMessages(id, { cursor, limit: 100, order: "asc" });
    messages.push(...page.data);
    cursor = page.has_more ? page.next_cursor : null;
  } while (cursor);
  return messages;
}

async function exportAs(format) {
  const id = state.current;
  $("export-dialog").close();
  try {
    const [conversation, messages] = await Promise.all([api.getConversation(id), allMessages(id)]);
    const name = (conversation.title || "conversation").replace(/[^\p{L}\p{N}]+/gu, "-").replace(/^-|-$/g, "") || "conversation";
    if (format === "json") download(`${name}.json`, "application/json", JSON.stringify({ conversation, messages }, null, 2));
    else download(`${name}.md`, "text/markdown", markdownOf(conversation, messages));
    announce("Exported.");
  } catch (err) {
    showError(err);
  }
}

function markdownOf(conversation, messages) {
  const lines = [`# ${titleOf(conversation)}`, ""];
  for (const m of messages) lines.push(`## ${m.role} · ${m.created_at}`, "", m.content, "");
  return lines.join("\n");
}

function download(filename, type, text) {
  const url = URL.createObjectURL(new Blob([text], { type: `${type};charset=utf-8` }));
  const a = document.createElement("a");
  a.href = url;
  a.download = filename;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

// ---- the narrow layout: the list in a drawer -------------------------------------------------

function setDrawer(open) {
  const narrow = NARROW.matches;
  $("menu").setAttribute("aria-expanded", String(narrow && open));
  $("sidebar").classList.toggle("open", narrow && open);
  $("sidebar").inert = narrow && !open;
  $("scrim").hidden = !(narrow && open);
  if (narrow && open) $("new-chat").focus();
}
function closeDrawer() {
  if ($("sidebar").classList.contains("open")) setDrawer(false);
}
$("menu").addEventListener("click", () => setDrawer(!$("sidebar").classList.contains("open")));
$("scrim").addEventListener("click", () => setDrawer(false));
NARROW.addEventListener("change", () => setDrawer(false));

// ---- keyboard --------------------------------------------------------------------------------

$("help").addEventListener("click", () => $("help-dialog").showModal());
$("alert-dismiss").addEventListener("click", clearError);

function typing(target) {
  return target instanceof HTMLElement && (target.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(target.tagName));
}

function stepConversation(step) {
  const ids = [...$("conversations").children].map((li) => li.dataset.id);
  if (!ids.length) return;
  const at = ids.indexOf(state.current);
  const next = ids[Math.max(0, Math.min(ids.length - 1, at < 0 ? 0 : at + step))];
  if (next !== state.current) location.hash = `c=${next}`;
}

document.addEventListener("keydown", (event) => {
  if (document.querySelector("dialog[open]")) return; // a dialog has the keyboard
  if (event.key === "Escape") {
    if (state.streaming) stopReply();
    else if (state.editing) $("cancel-edit").click();
    else if (!$("search-results").hidden || $("search").value) endSearch();
    else closeDrawer();
    return;
  }
  if (event.altKey && !event.ctrlKey && !event.metaKey) {
    if (event.code === "KeyN") newChat();
    else if (event.key === "ArrowUp") stepConversation(-1);
    else if (event.key === "ArrowDown") stepConversation(1);
    else return;
    event.preventDefault();
    return;
  }
  if (typing(event.target) || event.ctrlKey || event.metaKey) return;
  if (event.key === "?") {
    event.preventDefault();
    $("help-dialog").showModal();
  } else if (event.key === "/") {
    event.preventDefault();
    if (NARROW.matches) setDrawer(true);
    $("search").focus();
  }
});

// ---- start -----------------------------------------------------------------------------------

async function start() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  $("who").textContent = token ? `Signed in as ${subjectOf(token)}` : "";
  await Promise.all([loadConversations(), openFromAddress()]);
}

takeTokenFromAddress();
setDrawer(false);
if (sessionStorage.getItem(TOKEN_KEY)) {
  start().catch((err) => {
    if (err instanceof ApiError && err.status === 401) return;
    showError(err);
  });
} else {
  askForToken();
}
