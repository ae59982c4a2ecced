// A small, safe Markdown renderer for model replies: everything is HTML-escaped first, then only a
// fixed set of constructs becomes markup (fenced code, inline code, headings, lists, bold, italics,
// http(s) links). An unclosed code fence while streaming renders as code up to the end.
const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

export function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ESCAPES[c]);
}

function emphasis(text) {
  return escapeHtml(text)
    .replace(/\*\*(.+?)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^*\w])\*(?=\S)(.+?)\*(?!\w)/g, "$1<em>$2</em>")
    .replace(/\[([^\]]+)\]\((https?:\/\/[^\s)]+)\)/g, '<a href="$2" target="_blank" rel="noopener noreferrer">$1</a>');
}

function inline(text) {
  return text
    .split(/(`[^`]+`)/)
    .map((part, i) => (i % 2 ? `<code>${escapeHtml(part.slice(1, -1))}</code>` : emphasis(part)))
    .join("");
}

export function renderMarkdown(source) {
  const html = [];
  let paragraph = [];
  let list = null;
  const closeParagraph = () => {
    if (paragraph.length) html.push(`<p>${paragraph.join("<br>")}</p>`);
    paragraph = [];
  };
  const closeList = () => {
    if (list) html.push(`<${list.tag}>${list.items.map((item) => `<li>${item}</li>`).join("")}</${list.tag}>`);
    list = null;
  };
  const lines = source.split("\n");
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    const item = line.match(/^\s*(?:([-*+])|\d+[.)])\s+(.*)$/);
    if (line.startsWith("```")) {
      closeParagraph();
      closeList();
      const code = [];
      while (++i < lines.length && !lines[i].startsWith("```")) code.push(lines[i]);
      html.push(`<pre><code>${escapeHtml(code.join("\n"))}</code></pre>`);
    } else if (heading) {
      closeParagraph();
      closeList();
      const level = heading[1].length;
      html.push(`<h${level}>${inline(heading[2])}</h${level}>`);
    } else if (item) {
      closeParagraph();
      const tag = item[1] ? "ul" : "ol";
      if (list?.tag !== tag) closeList();
      list ??= { tag, items: [] };
      list.items.push(inline(item[2]));
    } else if (!line.trim()) {
      closeParagraph();
      closeList();
    } else {
      closeList();
      paragraph.push(inline(line));
    }
  }
  closeParagraph();
  closeList();
  return html.join("");
}
