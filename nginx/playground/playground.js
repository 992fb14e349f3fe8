// The playground: one page, same origin as the API, no dependencies, nothing fetched from
// elsewhere. The key lives in sessionStorage (this tab only) and travels only in the
// Authorization header of requests to this server.
"use strict";

const KEY_ITEM = "appliance-playground-key";
const $ = (id) => document.getElementById(id);
const conversation = [];
let running = null; // the AbortController of the generation in progress

function key() {
  return sessionStorage.getItem(KEY_ITEM) || "";
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

// An error answer, in OpenAI's shape when the server gave one, as a line for the user.
async function describeError(response) {
  let message = `HTTP ${response.status}`;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (_) { /* not JSON: the status says enough */ }
  const retry = response.headers.get("Retry-After");
  if (response.status === 401) message += " Check the key.";
  if (response.status === 429 && retry) message += ` Retry in ${retry} s.`;
  if (response.status === 503) message += retry ? ` Retry in ${retry} s.` : " Retry shortly.";
  return `${response.status}: ${message}`;
}

function headers() {
  return { "Authorization": `Bearer ${key()}`, "Content-Type": "application/json" };
}

async function loadModels() {
  const select = $("model");
  select.disabled = true;
  showError("");
  if (!key()) return;
  const response = await fetch("/v1/models", { headers: headers(), cache: "no-store" });
  if (!response.ok) {
    select.replaceChildren(new Option("(no models)", ""));
    showError(await describeError(response));
    return;
  }
  const models = (await response.json()).data || [];
  select.replaceChildren(...models.map((m) => new Option(m.id, m.id)));
  select.disabled = models.length === 0;
}

function addMessage(role, text) {
  const node = document.createElement("div");
  node.className = `message ${role}`;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "Model";
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  node.append(who, body);
  $("chat").append(node);
  $("chat").scrollTop = $("chat").scrollHeight;
  return node;
}

// Server-sent events from a fetch body: yields the data of each event, and its type.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const raw = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let type = "message";
      const data = [];
      for (const line of raw.split("\n")) {
        if (line.startsWith("event:")) type = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) yield { type, data: data.join("\n") };
    }
  }
}

function setRunning(controller) {
  running = controller;
  $("send").disabled = controller !== null;
  $("stop").disabled = controller === null;
}

async function send(text) {
  showError("");
  conversation.push({ role: "user", content: text });
  addMessage("user", text);
  const reply = addMessage("assistant", "");
  const out = reply.querySelector(".text");
  const controller = new AbortController();
  setRunning(controller);
  const started = performance.now();
  let firstToken = null;
  $("ttft").textContent = "…";
  $("tokens").textContent = "…";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      signal: controller.signal,
      body: JSON.stringify({
        model: $("model").value,
        messages: conversation,
        max_tokens: Number($("max-tokens").value) || 256,
        stream: true,
        stream_options: { include_usage: true },
      }),
    });
    if (!response.ok) {
      reply.remove();
      conversation.pop();
      showError(await describeError(response));
      return;
    }
    for await (const event of events(response)) {
      if (event.data === "[DONE]") break;
      const chunk = JSON.parse(event.data);
      if (event.type === "error" || chunk.error) {
        showError(`Stream ended: ${chunk.error ? chunk.error.message : event.data}`);
        continue;
      }
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        if (firstToken === null) {
          firstToken = performance.now() - started;
          $("ttft").textContent = `${Math.round(firstToken)} ms`;
        }
        out.textContent += delta.content;
        $("chat").scrollTop = $("chat").scrollHeight;
      }
      if (chunk.usage) {
        const u = chunk.usage;
        $("tokens").textContent =
          `${u.prompt_tokens} prompt + ${u.completion_tokens} completion = ${u.total_tokens}`;
      }
    }
    conversation.push({ role: "assistant", content: out.textContent });
  } catch (err) {
    if (err.name === "AbortError") {
      reply.classList.add("stopped");
      $("tokens").textContent = "(stopped)";
      conversation.push({ role: "assistant", content: out.textContent });
    } else {
      showError(`Request failed: ${err.message}`);
    }
  } finally {
    if (firstToken === null) $("ttft").textContent = "–";
    setRunning(null);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("api-key").value = key();
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(KEY_ITEM, $("api-key").value.trim());
    loadModels().catch((err) => showError(`Request failed: ${err.message}`));
  });
  $("forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_ITEM);
    $("api-key").value = "";
    $("model").replaceChildren(new Option("(enter a key)", ""));
    $("model").disabled = true;
  });
  $("compose").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || running) return;
    if (!key()) { showError("Enter an API key first."); return; }
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      $("compose").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => { if (running) running.abort(); });
  $("clear").addEventListener("click", () => {
    conversation.length = 0;
    $("chat").replaceChildren();
    showError("");
  });
  if (key()) loadModels().catch((err) => showError(`Request failed: ${err.message}`));
});
