"""A command-line chat client for Switchboard: a client without a browser.

    python -m switchboard_client chat lobby --url https://localhost:8443 \\
        --api-key-file ~/.switchboard-key --cacert .run/tls/ca.crt

It gets a connection token with an API key (``POST /api/ws-token/``), joins the room over wss
with the token in ``Sec-WebSocket-Protocol`` (never in the URL), prints every message as
``<user>: <text>`` and sends each line typed. It refreshes its token before it expires and
reconnects (with a new token) when the connection drops.
"""
