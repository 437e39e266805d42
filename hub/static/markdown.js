// Model output as safe HTML: Markdown (marked), then DOMPurify, then code highlighting.
// Nothing the model writes can run script, load remote images or restyle the page.

import { Marked } from "./vendor/marked.esm.js";
import DOMPurify from "./vendor/purify.es.js";
import hljs from "./vendor/highlight.min.js";

const marked = new Marked({ gfm: true, breaks: false });

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
