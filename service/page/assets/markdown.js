// Message text as sanitised Markdown. marked turns it into HTML, DOMPurify keeps only harmless
// markup, and then nothing in it may fetch from anywhere: images become links (the reader
// chooses to follow one), and a link opens in a new tab without a referrer. Code blocks are
// highlighted and get a copy button.
import { marked } from "./vendor/marked.esm.js";
import DOMPurify from "./vendor/purify.es.mjs";
import hljs from "./vendor/highlight.min.js";

marked.use({ gfm: true, breaks: true });

const PURIFY = {
  FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select", "option", "iframe", "video", "audio",
    "source", "picture", "svg", "math", "link", "meta", "base"],
  FORBID_ATTR: ["style", "srcset", "background", "poster", "id", "name", "class"],
  ALLOW_DATA_ATTR: false,
  RETURN_DOM_FRAGMENT: true,
};
const SAFE_LINK = /^(https?:|mailto:)/i;

function plain(text) {
  return document.createTextNode(text);
}

/** `text` as a fragment of sanitised, highlighted Markdown. */
export function renderMarkdown(text) {
  const fragment = DOMPurify.sanitize(marked.parse(text, { async: false }), PURIFY);
  for (const img of fragment.querySelectorAll("img")) {
    const src = img.getAttribute("src") || "";
    const label = `🖼 ${img.getAttribute("alt") || "image"}`;
    const replacement = SAFE_LINK.test(src) ? link(src, label) : plain(label);
    img.replaceWith(replacement);
  }
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

function link(href, label) {
  const a = document.createElement("a");
  a.href = href;
  a.textContent = label;
  a.target = "_blank";
  a.rel = "noopener noreferrer nofollow";
  return a;
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
  copy.addEventListener("click", () => copyText(pre.textContent, copy));
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
