// Switchboard chat client: reconnects with jittered exponential backoff and shows, for every
// message, which server process accepted it (sent_by) and which one delivered it (delivered_by).
// After any reconnect it resumes from the last offset it showed (?since=&epoch=), shows no
// message twice (by id) and reloads the recent history when the server says it could not
// recover the gap.
"use strict";
(function () {
  const room = JSON.parse(document.getElementById("room-name").textContent);
  const log = document.getElementById("log");
  const status = document.getElementById("status");
  const form = document.getElementById("composer");
  const input = document.getElementById("message");
  const presenceCount = document.getElementById("presence-count");
  const presenceUsers = document.getElementById("presence-users");
  const scheme = window.location.protocol === "https:" ? "wss://" : "ws://";
  const url = scheme + window.location.host + "/ws/chat/" + encodeURIComponent(room) + "/";
  const HISTORY_ON_LOAD = 50;
  const HISTORY_ON_RELOAD = 100; // the server's CHAT_HISTORY_MAX
  const SHOWN_IDS_KEPT = 2000;
  let epoch = null; // the room's history epoch and the last offset shown in it
  let lastOffset = 0;
  let reload = false; // the next connect asks for the recent history instead of resuming
  const shownIds = new Set();

  // Presence is asked for on connect, whenever someone comes or goes, and every 30 s (a user
  // whose server crashed sends no presence.leave: the server forgets them within PRESENCE_TTL).
  const PRESENCE_REFRESH_MS = 30000;
  const BASE_DELAY_MS = 500;
  const MAX_DELAY_MS = 15000;
  let socket = null;
  let attempt = 0;
  let refCounter = 0;

  function setStatus(state, text) {
    status.dataset.state = state;
    status.textContent = text;
  }

  function append(className, fields) {
    const item = document.createElement("li");
    item.className = className;
    for (const [name, text] of fields) {
      const span = document.createElement("span");
      span.className = name;
      span.textContent = text;
      item.appendChild(span);
    }
    log.appendChild(item);
    item.scrollIntoView({ block: "end" });
    return item;
  }

  function connectUrl() {
    if (epoch && !reload) {
      return url + "?since=" + lastOffset + "&epoch=" + encodeURIComponent(epoch);
    }
    return url + "?history=" + (reload ? HISTORY_ON_RELOAD : HISTORY_ON_LOAD);
  }

  function show(data) {
    if (data.type === "chat.message") {
      if (typeof data.offset === "number") {
        if (epoch === "" && data.epoch) {
          epoch = data.epoch; // the room had no history when we joined: this starts it
        }
        if (data.epoch === epoch) {
          lastOffset = Math.max(lastOffset, data.offset);
        }
      }
      if (shownIds.has(data.id)) {
        return; // a reload's history overlaps what is already on the page
      }
      shownIds.add(data.id);
      if (shownIds.size > SHOWN_IDS_KEPT) {
        shownIds.delete(shownIds.values().next().value);
      }
      const item = append("message", [
        ["user", data.user],
        ["text", data.message],
        ["route", data.sent_by + " → " + data.delivered_by],
      ]);
      item.dataset.id = data.id;
      item.dataset.deliveredBy = data.delivered_by;
      item.dataset.sentBy = data.sent_by;
    } else if (data.type === "recovery") {
      const reloading = reload;
      reload = false;
      if (!data.recovered && !reloading) {
        // The gap could not be replayed (history lost or trimmed): reload what is kept.
        append("notice", [["text", "Some messages could not be recovered; reloading the recent history."]]);
        reload = true;
        socket.close(1000, "reload history");
        return;
      }
      if (epoch !== data.epoch) {
        epoch = data.epoch;
        lastOffset = data.offset;
      } else {
        lastOffset = Math.max(lastOffset, data.offset);
      }
    } else if (data.type === "presence") {
      presenceCount.textContent = String(data.count);
      presenceUsers.textContent = data.users
        .map((u) => (u.connections > 1 ? u.user + " ×" + u.connections : u.user))
        .join(", ");
    } else if (data.type === "presence.join" || data.type === "presence.leave") {
      askPresence();
    } else if (data.type === "error") {
      append("error", [["code", data.code], ["text", data.detail]]);
    }
  }

  function askPresence() {
    if (socket && socket.readyState === WebSocket.OPEN) {
      socket.send(JSON.stringify({ type: "presence" }));
    }
  }

  // Full jitter: a random delay in [0, min(cap, base * 2^attempt)], so that clients of a
  // restarted worker do not all come back in the same instant.
  function nextDelay() {
    const ceiling = Math.min(MAX_DELAY_MS, BASE_DELAY_MS * 2 ** attempt);
    attempt += 1;
    return Math.random() * ceiling;
  }

  function connect() {
    setStatus("connecting", "connecting…");
    socket = new WebSocket(connectUrl());
    socket.addEventListener("open", function () {
      attempt = 0;
      setStatus("open", "connected");
      askPresence();
    });
    socket.addEventListener("message", function (event) {
      try {
        show(JSON.parse(event.data));
      } catch (err) {
        console.error("bad frame", err);
      }
    });
    socket.addEventListener("close", function (event) {
      if (reload) {
        connect(); // our own close, to reload the history: at once
        return;
      }
      if (event.code >= 4000 && event.code < 5000) {
        setStatus("closed", "closed (" + event.code + ")");
        return; // refused by the application: retrying would not help
      }
      const delay = nextDelay();
      setStatus("reconnecting", "reconnecting in " + (delay / 1000).toFixed(1) + " s (code " + event.code + ")");
      window.setTimeout(connect, delay);
    });
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    const text = input.value;
    if (!text.trim() || !socket || socket.readyState !== WebSocket.OPEN) {
      return;
    }
    refCounter += 1;
    socket.send(JSON.stringify({ message: text, ref: "r" + refCounter }));
    input.value = "";
  });

  window.setInterval(askPresence, PRESENCE_REFRESH_MS);
  connect();
})();
