// Model output as safe HTML: Markdown (marked, raw HTML escaped), then DOMPurify, then code
// highlighting. Nothing the model writes can run script, load remote images or restyle the
// page.

import { Marked } from "./vendor/marked.esm.js";
import DOMPurify from "./vendor/purify.es.js";
import hljs from "./vendor/highlight.min.js";

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (char) => ESCAPES[char]);
}

// Raw HTML in an answer is shown as text, never parsed: models write HTML when they explain
// it, and hostile markup never reaches a parser (DOMPurify stays the second line of defence).
const marked = new Marked({
  gfm: true,
  breaks: false,
  renderer: {
    html: (token) => escapeHtml(token.text),
    // Images become links: an image URL in an answer could carry the chat to a stranger.
    image: (token) =>
      `<a href="${escapeHtml(token.href)}">${escapeHtml(token.text || token.href)}</a>`,
  },
});

const PURIFY = {
  FORBID_TAGS: ["style", "img", "form", "iframe", "object", "embed", "svg", "math"],
  FORBID_ATTR: ["style", "srcset"],
};

// Links open outside the chat and tell the target nothing about it.
DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A" && node.hasAttribute("href")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer nofollow");
  }
});

export function renderMarkdown(element, text) {
  const html = marked.parse(text, { async: false });
  element.innerHTML = DOMPurify.sanitize(html, PURIFY);
  for (const block of element.querySelectorAll("pre code")) {
    highlight(block);
  }
}

function highlight(block) {
  const language = [...block.classList]
    .find((name) => name.startsWith("language-"))
    ?.slice("language-".length);
  if (language && !hljs.getLanguage(language)) return; // unknown: plain text
  hljs.highlightElement(block);
}

export function renderPlain(element, text) {
  element.textContent = text;
}
