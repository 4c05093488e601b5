// A small Markdown renderer for model answers, safe by construction: the text is HTML-escaped FIRST, then a few
// patterns of the escaped text become a fixed set of tags (p, br, h1-h6, ul/ol/li, blockquote, pre/code, strong, em,
// code, a). No tag or attribute of the model's text survives; links must be http(s) URLs, whose characters were
// already escaped, so they can't leave the href attribute.
"use strict";

function escapeHtml(text) {
  return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
    .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
}

// Inline markup on escaped text: `code` spans are left alone, the rest gets links, bold and italics.
function renderInline(escaped) {
  return escaped.split(/(`[^`\n]+`)/).map((piece, i) => {
    if (i % 2) return "<code>" + piece.slice(1, -1) + "</code>";
    return piece
      .replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s()]+)\)/g,
               '<a href="$2" target="_blank" rel="noopener noreferrer nofollow">$1</a>')
      .replace(/\*\*(?=\S)([^*\n]*\S)\*\*/g, "<strong>$1</strong>")
      .replace(/__(?=\S)([^_\n]*\S)__/g, "<strong>$1</strong>")
      .replace(/(^|[^*\w])\*(?=\S)([^*\n]*?\S)\*(?![*\w])/g, "$1<em>$2</em>")
      .replace(/(^|[^_\w])_(?=\S)([^_\n]*?\S)_(?![_\w])/g, "$1<em>$2</em>");
  }).join("");
}

function renderMarkdown(text) {
  const lines = escapeHtml(text).split("\n");
  const out = [];
  let paragraph = [], list = null;  // list: {tag, items}
  const flushParagraph = () => {
    if (paragraph.length) out.push("<p>" + paragraph.map(renderInline).join("<br>") + "</p>");
    paragraph = [];
  };
  const flushList = () => {
    if (list) out.push(`<${list.tag}>` + list.items.map((item) => `<li>${renderInline(item)}</li>`).join("") +
                       `</${list.tag}>`);
    list = null;
  };
  const flush = () => { flushParagraph(); flushList(); };
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    let m;
    if ((m = line.match(/^\s*```\s*([\w+-]*)/))) {  // a fence; an unclosed one (still streaming) runs to the end
      flush();
      const code = [];
      for (i++; i < lines.length && !/^\s*```/.test(lines[i]); i++) code.push(lines[i]);
      const lang = m[1] ? ` data-lang="${m[1]}"` : "";
      out.push(`<pre${lang}><code>${code.join("\n")}</code></pre>`);
    } else if ((m = line.match(/^(#{1,6})\s+(.*)$/))) {
      flush();
      out.push(`<h${m[1].length}>${renderInline(m[2])}</h${m[1].length}>`);
    } else if ((m = line.match(/^\s*([-*+]|\d+[.)])\s+(.*)$/))) {
      flushParagraph();
      const tag = /\d/.test(m[1]) ? "ol" : "ul";
      if (list && list.tag !== tag) flushList();
      if (!list) list = {tag, items: []};
      list.items.push(m[2]);
    } else if ((m = line.match(/^&gt;\s?(.*)$/))) {
      flush();
      out.push(`<blockquote>${renderInline(m[1])}</blockquote>`);
    } else if (!line.trim()) {
      flush();
    } else if (list && /^\s+\S/.test(line)) {  // an indented continuation of the last item
      list.items[list.items.length - 1] += " " + line.trim();
    } else {
      flushList();
      paragraph.push(line);
    }
  }
  flush();
  return out.join("");
}
