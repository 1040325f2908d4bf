// A Switchboard chat client outside the browser: Node.js and the `ws` package (npm install ws).
//
//   NODE_EXTRA_CA_CERTS=.run/tls/ca.crt SWITCHBOARD_API_KEY_FILE=~/.switchboard-key \
//       node chat.js lobby "hello from node"
//
// It gets a connection token with the API key, joins the room with the token in the
// Sec-WebSocket-Protocol header (never in the URL), sends the optional greeting, prints every
// message as "<user>: <text>" and refreshes its token when the server says it is expiring.
"use strict";
const fs = require("node:fs");
const WebSocket = require("ws");

const base = process.env.SWITCHBOARD_URL || "https://localhost:8443";
const key = fs.readFileSync(process.env.SWITCHBOARD_API_KEY_FILE, "utf8").trim();
const [room, greeting] = process.argv.slice(2);

async function token() {
  // fetch trusts NODE_EXTRA_CA_CERTS, as does ws below.
  const response = await fetch(`${base}/api/ws-token/`, {
    method: "POST",
    headers: {Authorization: `Bearer ${key}`, "Content-Type": "application/json"},
    body: JSON.stringify({rooms: [room]}),
  });
  const body = await response.json();
  if (!response.ok) throw new Error(`token refused: ${response.status} ${body.detail}`);
  return body.token;
}

async function main() {
  const url = `${base.replace(/^http/, "ws")}/ws/chat/${encodeURIComponent(room)}/`;
  const ws = new WebSocket(url, ["switchboard.v1", `token.${await token()}`]);
  ws.on("open", () => {
    console.error(`* joined ${room}`);
    if (greeting) ws.send(JSON.stringify({message: greeting}));
  });
  ws.on("message", async (data) => {
    const frame = JSON.parse(data);
    if (frame.type === "chat.message") console.log(`${frame.user}: ${frame.message}`);
    else if (frame.type === "token_expiring") {
      ws.send(JSON.stringify({type: "refresh", token: await token()}));
    } else if (frame.type === "error") console.error(`* error ${frame.code}: ${frame.detail}`);
  });
  // 4401: the token or the user's authority ended -- get a new token and reconnect.
  ws.on("close", (code) => {
    console.error(`* closed ${code}`);
    process.exitCode = code === 1000 ? 0 : 1;
  });
}

main().catch((error) => {
  console.error(`* ${error.message}`);
  process.exitCode = 1;
});
