// MaaS Mesh console: progressive enhancement of server-rendered pages (everything works without it).
// - forms with data-enhance="fragment" post in the background; the server's result fragment replaces
//   the element named by data-target (the HTTP status is the service's, the text its message)
// - the chat form streams (server-sent events over fetch) with a Stop button that aborts the request,
//   which cancels the router call on the server
// - the Models page follows the registry's Watch (EventSource), the Charts page refreshes
"use strict";

(() => {
  const FRAGMENT = { "X-Console-Fragment": "1" };

  function announce(text) {
    const region = document.getElementById("announce");
    if (region) {
      region.textContent = "";
      region.textContent = text;
    }
  }

  function fromHTML(html) {
    const template = document.createElement("template");
    template.innerHTML = html.trim();
    return template.content.firstElementChild;
  }

  // Swap in a fragment, keeping the target's id so the next answer finds it again.
  function replace(target, html) {
    const element = fromHTML(html) || document.createElement("div");
    if (!element.id) element.id = target.id;
    target.replaceWith(element);
    const alert = element.querySelector("[role=alert]");
    announce(alert ? alert.textContent.trim() : "Result updated.");
    return element;
  }

  function failure(target, message) {
    const box = document.createElement("div");
    box.className = "result error";
    box.setAttribute("role", "alert");
    box.textContent = message;
    return replace(target, box.outerHTML);
  }

  async function postFragment(form, submitter) {
    const target = document.getElementById(form.dataset.target);
    const action = (submitter && submitter.getAttribute("formaction")) || form.action;
    const file = form.querySelector("input[type=file][data-max-bytes]");
    if (file && file.files.length && file.files[0].size > Number(file.dataset.maxBytes)) {
      failure(target, `413 request too large: the image is ${file.files[0].size} bytes, over the console's limit of ${file.dataset.maxBytes} bytes`);
      return;
    }
    form.setAttribute("aria-busy", "true");
    try {
      const response = await fetch(action, { method: "POST", body: new FormData(form, submitter), headers: FRAGMENT });
      replace(target, await response.text());
    } catch (error) {
      failure(target, `The console did not answer: ${error.message}`);
    } finally {
      form.removeAttribute("aria-busy");
    }
  }

  // -- chat ------------------------------------------------------------------------------------------
  function answeredList(a) {
    const rows = [
      ["Answered by", `${a.model} v${a.version}`, "answered-version"],
      ["Why", a.kind.replace(/_/g, " ") + (a.target ? ` (${a.target})` : "") + (a.shadowed ? ", shadow copy sent" : ""), "answered-reason"],
      ["Latency", `${a.latency_ms} ms to the first message`, "answered-latency"],
      ["Trace", a.trace_id || "tracing off (set OTEL_* to record traces)", "answered-trace"],
    ];
    const list = document.createElement("dl");
    list.className = "answered";
    for (const [term, value, cls] of rows) {
      const row = document.createElement("div");
      const dt = document.createElement("dt");
      const dd = document.createElement("dd");
      dt.textContent = term;
      dd.textContent = value;
      dd.className = cls;
      row.append(dt, dd);
      list.append(row);
    }
    return list;
  }

  // The conversation lives in the page: earlier exchanges in #chat-transcript, and as JSON in the form's
  // hidden "history" field, which every request sends again (the console keeps nothing).
  function turn(role, text) {
    const li = document.createElement("li");
    li.className = `turn ${role}`;
    const who = document.createElement("span");
    who.className = "role";
    who.textContent = role === "user" ? "you" : "model";
    li.append(who, document.createTextNode(" " + text));
    return li;
  }

  function keepExchange(form, question, text) {
    const field = form.querySelector("#chat-history");
    let turns = [];
    try { turns = JSON.parse(field.value || "[]"); } catch { turns = []; }
    turns.push({ role: "user", content: question }, { role: "assistant", content: text });
    field.value = JSON.stringify(turns.slice(-Number(field.dataset.maxTurns || 16)));
  }

  function newConversation(form) {
    form.querySelector("#chat-history").value = "";
    document.getElementById("chat-transcript").replaceChildren();
    replace(document.getElementById(form.dataset.target), '<div class="result" id="chat-result"></div>');
  }

  async function chat(form) {
    const send = document.getElementById("chat-send");
    const stop = document.getElementById("chat-stop");
    let target = document.getElementById(form.dataset.target);
    const previous = target.querySelector("#chat-answer[data-done]");
    const previousQuestion = target.querySelector("#chat-question");
    if (previous && previousQuestion) {  // the last exchange moves up into the transcript
      const transcript = document.getElementById("chat-transcript");
      transcript.append(turn("user", previousQuestion.textContent.replace(/^you /, "")), turn("assistant", previous.textContent));
    }
    const question = form.querySelector("#chat-message").value;
    const controller = new AbortController();
    target = replace(target, '<div class="result" aria-busy="true"><p class="chat-question" id="chat-question"></p>'
      + '<div class="chat-answer" id="chat-answer" data-pieces="0"></div>'
      + '<p class="meta chat-status" id="chat-status" role="status">Waiting for the first token…</p></div>');
    const shown = target.querySelector("#chat-question");
    const who = document.createElement("span");
    who.className = "role";
    who.textContent = "you";
    shown.append(who, document.createTextNode(" " + question));
    const answer = target.querySelector("#chat-answer");
    const status = target.querySelector("#chat-status");
    let pieces = 0;
    let finished = false;
    send.disabled = true;
    stop.disabled = false;
    stop.onclick = () => controller.abort();
    const handle = (event) => {
      if (event.type === "routed") {
        target.append(answeredList(event));
        status.textContent = "Streaming…";
      } else if (event.type === "text") {
        pieces += 1;
        answer.append(document.createTextNode(event.text));
        answer.dataset.pieces = String(pieces);
      } else if (event.type === "done") {
        finished = true;
        status.textContent = `Finished: ${event.finish_reason}, ${event.completion_tokens} tokens in ${pieces} pieces `
          + `(prompt ${event.prompt_tokens} tokens); first text after ${event.first_text_ms} ms, ${event.latency_ms} ms in all.`;
        answer.dataset.done = "1";
        keepExchange(form, question, answer.textContent);
        status.dataset.state = "done";
      } else if (event.type === "error") {
        finished = true;
        status.textContent = `${event.code}: ${event.message}`;
        status.dataset.state = "error";
        status.setAttribute("role", "alert");
      }
    };
    try {
      const response = await fetch(form.action, {
        method: "POST", body: new FormData(form), signal: controller.signal,
        headers: { ...FRAGMENT, Accept: "text/event-stream" },
      });
      if (!(response.headers.get("content-type") || "").startsWith("text/event-stream")) {
        replace(target, await response.text());
        return;
      }
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const data = buffer.slice(0, cut).split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
          buffer = buffer.slice(cut + 2);
          if (data) handle(JSON.parse(data));
        }
      }
      if (!finished) {
        status.textContent = "The stream ended without a finish reason.";
        status.dataset.state = "error";
      }
    } catch (error) {
      if (error.name === "AbortError") {
        status.textContent = `Stopped after ${pieces} pieces: the request was cancelled.`;
        status.dataset.state = "stopped";
      } else {
        status.textContent = `The console did not answer: ${error.message}`;
        status.dataset.state = "error";
      }
    } finally {
      target.removeAttribute("aria-busy");
      send.disabled = false;
      stop.disabled = true;
      announce(status.textContent);
    }
  }

  // -- models: the registry's Watch -------------------------------------------------------------------
  function followModels(live) {
    if (!window.EventSource) return;
    const source = new EventSource(live.dataset.events);
    source.addEventListener("hello", () => {
      live.textContent = "Live: changes made anywhere appear here.";
      live.dataset.state = "live";
    });
    source.addEventListener("model", (message) => {
      const { name, html } = JSON.parse(message.data);
      const card = fromHTML(html);
      const old = document.getElementById(`model-${name}`);
      if (old) {
        const open = old.querySelector("details[open]");
        if (open && card.querySelector("details")) card.querySelector("details").open = true;
        old.replaceWith(card);
      } else {
        document.getElementById("models").append(card);
      }
      announce(`${name} changed.`);
    });
    source.onerror = () => {
      live.textContent = "Reconnecting to the registry's feed…";
      live.dataset.state = "reconnecting";
    };
    window.addEventListener("pagehide", () => source.close());
  }

  // -- charts ----------------------------------------------------------------------------------------
  function refreshCharts(box) {
    setInterval(async () => {
      if (document.hidden) return;
      try {
        const response = await fetch(box.dataset.refresh, { headers: FRAGMENT });
        if (response.ok) document.getElementById("charts-body").replaceWith(fromHTML(await response.text()));
      } catch (error) {
        // the next tick tries again; the page keeps the last charts
      }
    }, 5000);
  }

  // -- wiring ----------------------------------------------------------------------------------------
  document.addEventListener("submit", (event) => {
    const form = event.target;
    const kind = form.dataset.enhance;
    if (!kind) return;
    event.preventDefault();
    if (kind === "chat") chat(form);
    else postFragment(form, event.submitter);
  });

  document.addEventListener("click", (event) => {
    if (event.target.id !== "chat-new") return;
    event.preventDefault();  // without script the link reloads the page: a new conversation too
    newConversation(document.getElementById("chat-form"));
  });

  // An image pasted anywhere on the page goes into the classify form's file input.
  document.addEventListener("paste", (event) => {
    const input = document.getElementById("classify-image");
    const file = event.clipboardData && [...event.clipboardData.files].find((f) => f.type.startsWith("image/"));
    if (!input || !file) return;
    const transfer = new DataTransfer();
    transfer.items.add(file);
    input.files = transfer.files;
    announce(`Pasted ${file.type} image ready to classify.`);
  });

  document.addEventListener("DOMContentLoaded", () => {
    const live = document.getElementById("live-status");
    if (live) followModels(live);
    const charts = document.getElementById("charts");
    if (charts) refreshCharts(charts);
  });
})();
