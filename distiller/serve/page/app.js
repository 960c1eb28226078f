// The side-by-side page: one column per served model, every answer streamed at once.
"use strict";

const answers = document.getElementById("answers");
const form = document.getElementById("ask");
const send = document.getElementById("send");
let apiKey = "";

function headers() {
  const h = { "Content-Type": "application/json" };
  if (apiKey) h["Authorization"] = "Bearer " + apiKey;
  return h;
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function column(model) {
  const box = el("section", "answer");
  box.dataset.model = model;
  box.dataset.state = "idle";
  const title = el("h2");
  title.append(el("span", "name", model), el("span", "verdict none", "–"));
  box.append(title, el("pre", "text"), el("div", "stats"), el("ul", "reasons"));
  answers.append(box);
}

async function loadModels() {
  const r = await fetch("/v1/models", { headers: headers() });
  if (r.status === 401) {
    document.getElementById("key-label").hidden = false;
    return;
  }
  const body = await r.json();
  answers.textContent = "";
  body.data.forEach((m) => column(m.id));
}

function showStats(box, extra, started, firstAt) {
  const stats = box.querySelector(".stats");
  stats.textContent = "";
  const latency = extra ? extra.latency_s : (performance.now() - started) / 1000;
  const first = extra && extra.first_token_s != null ? extra.first_token_s : firstAt;
  stats.append(el("span", "latency", "latency " + latency.toFixed(2) + " s"));
  if (first != null) stats.append(el("span", "ttft", "first token " + first.toFixed(2) + " s"));
  if (extra && extra.tokens_per_s != null) stats.append(el("span", "tps", extra.tokens_per_s.toFixed(1) + " tok/s"));
}

function showVerdict(box, verdict) {
  const badge = box.querySelector(".verdict");
  const reasons = box.querySelector(".reasons");
  reasons.textContent = "";
  if (!verdict) {
    badge.className = "verdict none";
    badge.textContent = "no validators";
    return;
  }
  badge.className = "verdict " + (verdict.passed ? "pass" : "fail");
  badge.textContent = verdict.passed ? "valid" : "invalid";
  verdict.reasons.slice(0, 4).forEach((r) => reasons.append(el("li", "", r)));
}

async function ask(box, prompt, maxTokens, temperature) {
  const model = box.dataset.model;
  const text = box.querySelector(".text");
  text.textContent = "";
  box.querySelector(".stats").textContent = "";
  box.querySelector(".reasons").textContent = "";
  const badge = box.querySelector(".verdict");
  badge.className = "verdict none";
  badge.textContent = "…";
  box.dataset.state = "streaming";
  const started = performance.now();
  let firstAt = null;
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify({
        model, stream: true, max_tokens: maxTokens, temperature,
        messages: [{ role: "user", content: prompt }],
      }),
    });
    if (!r.ok) {
      const body = await r.json().catch(() => ({}));
      throw new Error((body.error && body.error.message) || r.status + " " + r.statusText);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") continue;
        const event = JSON.parse(data);
        if (event.error) throw new Error(event.error.message);
        const choice = event.choices[0];
        if (!choice) continue;
        if (choice.delta && choice.delta.content) {
          if (firstAt === null) firstAt = (performance.now() - started) / 1000;
          text.textContent += choice.delta.content;
        }
        if (event.distiller) {
          showStats(box, event.distiller, started, firstAt);
          showVerdict(box, event.distiller.verdict);
        }
      }
    }
    box.dataset.state = "done";
  } catch (err) {
    badge.className = "verdict error";
    badge.textContent = "error";
    box.querySelector(".reasons").append(el("li", "", String(err.message || err)));
    box.dataset.state = "error";
  }
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  apiKey = document.getElementById("api-key").value;
  if (!answers.children.length) await loadModels();
  const prompt = document.getElementById("prompt").value;
  const maxTokens = parseInt(document.getElementById("max-tokens").value, 10) || 128;
  const temperature = parseFloat(document.getElementById("temperature").value) || 0;
  send.disabled = true;
  await Promise.all([...answers.children].map((box) => ask(box, prompt, maxTokens, temperature)));
  send.disabled = false;
});

loadModels();
