// The chat page: a conversation streamed from /v1/chat/completions, with the reply's reasoning
// (reasoning_content) shown apart from its answer, rendered as Markdown.
import { api, showError } from "./playground.js";
import { escapeHtml, renderMarkdown } from "./markdown.js";

const field = (id) => document.getElementById(id);

async function* serverSentEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const data = buffer.slice(0, end).split("\n")
        .filter((line) => line.startsWith("data: ")).map((line) => line.slice(6)).join("\n");
      buffer = buffer.slice(end + 2);
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

function settings() {
  const stop = field("stop").value.split("\n").filter((line) => line);
  const seed = field("seed").value;
  return {
    temperature: Number(field("temperature").value),
    max_tokens: Number(field("max-tokens").value),
    ...(stop.length ? { stop } : {}),
    ...(seed ? { seed: Number(seed) } : {}),
  };
}

function addMessage(role) {
  const item = document.createElement("li");
  item.className = `message ${role}`;
  item.innerHTML = `<div class="role">${role}</div><details class="reasoning" hidden open><summary>Reasoning</summary>
    <div class="text"></div></details><div class="content"></div><div class="stats"></div>`;
  field("messages").append(item);
  return item;
}

class Reply {
  constructor(item) {
    this.item = item;
    this.content = "";
    this.reasoning = "";
    this.started = performance.now();
    this.firstToken = null;
  }

  add(delta) {
    if (delta.content || delta.reasoning_content) this.firstToken ??= performance.now();
    this.content += delta.content || "";
    this.reasoning += delta.reasoning_content || "";
    this.item.querySelector(".content").innerHTML = renderMarkdown(this.content);
    const reasoning = this.item.querySelector(".reasoning");
    reasoning.hidden = !this.reasoning;
    reasoning.querySelector(".text").innerHTML = renderMarkdown(this.reasoning);
    this.item.scrollIntoView({ block: "end" });
  }

  finish(reason, usage) {
    this.item.dataset.finishReason = reason;
    if (!usage) return;
    const seconds = (performance.now() - (this.firstToken ?? this.started)) / 1000;
    const firstToken = ((this.firstToken ?? performance.now()) - this.started) / 1000;
    const rate = seconds > 0 ? (usage.completion_tokens / seconds).toFixed(1) : "-";
    this.item.querySelector(".stats").textContent =
      `${usage.completion_tokens} tokens · first after ${firstToken.toFixed(2)} s · ${rate} tokens/s · ${reason}`;
  }
}

export function startChat(model) {
  let history = [];  // a new array for a new chat: a reply still ending belongs to the old one
  let controller = null;
  field("chat").hidden = false;

  async function send(text) {
    showError("");
    const conversation = history;
    conversation.push({ role: "user", content: text });
    addMessage("user").querySelector(".content").innerHTML = `<p>${escapeHtml(text)}</p>`;
    const reply = new Reply(addMessage("assistant"));
    const system = field("system-prompt").value.trim();
    const messages = [...(system ? [{ role: "system", content: system }] : []), ...conversation];
    controller = new AbortController();
    try {
      await stream(reply, messages, controller.signal);
    } finally {
      // a failed or stopped turn leaves no unanswered question behind in the conversation
      if (reply.content) conversation.push({ role: "assistant", content: reply.content });
      else conversation.pop();
    }
  }

  async function stream(reply, messages, signal) {
    const response = await api("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model, messages, stream: true, stream_options: { include_usage: true }, ...settings() }),
      signal,
    });
    let finishReason = null;
    for await (const event of serverSentEvents(response)) {
      if (event.error) throw new Error(event.error.message);
      const choice = event.choices[0];
      if (choice) {
        reply.add(choice.delta);
        finishReason = choice.finish_reason ?? finishReason;
      }
      if (event.usage) reply.finish(finishReason, event.usage);
    }
  }

  function busy(running) {
    field("send").disabled = running;
    field("stop-reply").hidden = !running;
  }

  field("chat-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = field("prompt").value.trim();
    if (!text || controller) return;  // one reply at a time
    field("prompt").value = "";
    busy(true);
    try {
      await send(text);
    } catch (error) {
      if (error.name !== "AbortError") showError(error.message);
    } finally {
      busy(false);
      controller = null;
    }
  });
  field("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      field("chat-form").requestSubmit();
    }
  });
  field("stop-reply").addEventListener("click", () => controller?.abort());
  field("new-chat").addEventListener("click", () => {
    controller?.abort();
    history = [];
    field("messages").replaceChildren();
  });
}
