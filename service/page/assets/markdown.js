// Message text as sanitised Markdown. marked turns it into HTML, with two rules of ours: HTML
// written in a message is shown as the text it is (as chat products do), and an image becomes a
// link (nothing loads from another host unless the reader follows it). DOMPurify then keeps only
// harmless markup, links open in a new tab without a referrer, and code blocks are highlighted
// and get a copy button. The page's CSP ('self' only, no inline script) stands behind all this.
import { marked } from "./vendor/marked.esm.js";
import DOMPurify from "./vendor/purify.es.mjs";
import hljs from "./vendor/highlight.min.js";

const SAFE_LINK = /^(https?:|mailto:)/i;

function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

marked.use({
  gfm: true,
  breaks: true,
  renderer: {
    html: ({ text }) => escapeHtml(text),
    image: ({ href, text }) => {
      const label = `Image: ${escapeHtml(text || "untitled")}`;
      return SAFE_LINK.test(href || "") ? `<a href="${escapeHtml(href)}">${label}</a>` : label;
    },
  },
});

const PURIFY = {
  FORBID_TAGS: ["img", "style", "form", "input", "button", "textarea", "select", "option", "iframe", "video", "audio",
    "source", "picture", "svg", "math", "link", "meta", "base"],
  FORBID_ATTR: ["style", "srcset", "background", "poster", "id", "name"],
  ALLOW_DATA_ATTR: false,
  RETURN_DOM_FRAGMENT: true,
};

/** `text` as a fragment of sanitised, highlighted Markdown. */
export function renderMarkdown(text) {
  const fragment = DOMPurify.sanitize(marked.parse(text, { async: false }), PURIFY);
  for (const a of fragment.querySelectorAll("a")) {
    const href = a.getAttribute("href") || "";
    if (!SAFE_LINK.test(href)) {
      a.replaceWith(...a.childNodes);
      continue;
    }
    a.setAttribute("target", "_blank");
    a.setAttribute("rel", "noopener noreferrer nofollow");
  }
  for (const code of fragment.querySelectorAll("pre > code")) {
    highlight(code);
    wrapCodeBlock(code.parentElement);
  }
  return fragment;
}

function highlight(code) {
  const lang = [...code.classList].find((c) => c.startsWith("language-"))?.slice(9);
  const source = code.textContent;
  const result = lang && hljs.getLanguage(lang)
    ? hljs.highlight(source, { language: lang, ignoreIllegals: true })
    : hljs.highlightAuto(source);
  // hljs escapes the code it is given: its output holds only its own <span class> markup.
  code.innerHTML = DOMPurify.sanitize(result.value, { ALLOWED_TAGS: ["span"], ALLOWED_ATTR: ["class"] });
  code.classList.add("hljs");
}

/** Put a <pre> in a box with its own copy button. */
function wrapCodeBlock(pre) {
  const box = document.createElement("div");
  box.className = "code-block";
  pre.replaceWith(box);
  const copy = document.createElement("button");
  copy.type = "button";
  copy.className = "copy-code";
  copy.textContent = "Copy code";
  copy.addEventListener("click", () => copyText(pre.textContent.replace(/\n$/, ""), copy));
  box.append(copy, pre);
}

/** Copy `text` to the clipboard; the button says whether it worked. */
export async function copyText(text, button) {
  const label = button.textContent;
  try {
    await navigator.clipboard.writeText(text);
    button.textContent = "Copied";
  } catch {
    button.textContent = "Copy failed";
  }
  setTimeout(() => (button.textContent = label), 1500);
}

/** A search snippet: HTML-escaped text with <mark> hits; only <mark> survives. */
export function renderSnippet(html) {
  return DOMPurify.sanitize(html, { ALLOWED_TAGS: ["mark"], ALLOWED_ATTR: [], RETURN_DOM_FRAGMENT: true });
}
