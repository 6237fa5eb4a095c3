"""`imagerl serve-reward CONFIG [key=value ...]`: serve a recipe's `rewards:` (and an optional chat VLM)
over HTTP with the settings of its `server:` section. See docs/reward_server.md and rewards/server.py.

The server needs no policy: the training-only check that `model.path` is set (or `model.tiny`) is
satisfied with `model.tiny=true` before the user's overrides, so a reward-only YAML is enough.
"""

from __future__ import annotations

import errno
import logging
import socket
import sys

log = logging.getLogger(__name__)


def _bind(host: str, port: int) -> socket.socket:
    """The server's socket, bound now: a port already in use or a host that is not an address of this machine fails
    here, naming the setting, before the rewards load (a VLM judge takes minutes). Handed to uvicorn, so that port 0
    (any free port) is known and printed."""
    from .rewards.server import bind_socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ValueError(f"server.host={host}: not a host name or address here ({e.strerror}); "
                         "use 127.0.0.1 (this machine only) or 0.0.0.0 (all interfaces)") from None
    try:
        return bind_socket(*infos[0][4][:2])  # (the resolved numeric address)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise ValueError(f"server.port={port}: {host}:{port} is already in use (another reward server or "
                             "program); stop it or choose another server.port") from None
        raise ValueError(f"server.host={host} server.port={port}: cannot listen there ({e.strerror or e}); "
                         "use 127.0.0.1 or 0.0.0.0, and a port above 1023 unless running as root") from None


def main(config_path: str, overrides: list[str] | None = None) -> int:
    import uvicorn

    from .config import ConfigError, load_config
    from .rewards.server import build_server

    try:
        cfg = load_config(config_path, ["model.tiny=true", *(overrides or [])])
        sock = _bind(cfg.server.host, cfg.server.port)  # before loading the rewards (a VLM judge takes minutes)
        try:
            server = build_server(cfg)
        except BaseException:
            sock.close()
            raise
    except (ConfigError, ValueError) as e:
        print(f"imagerl serve-reward: {e}", file=sys.stderr)
        return 2
    sc = cfg.server
    if sc.host not in ("127.0.0.1", "localhost", "::1") and server.api_key is None:
        log.warning("serving on %s without an API key: anyone who can reach this address can use it. "
                    "Set server.api_key_env to the name of an env var holding a key.", sc.host)
    chat = f", chat model '{server.chat.served_name}' at /v1/chat/completions" if server.chat else ""
    port = sock.getsockname()[1]  # (server.port=0: the free port it got)
    host = f"[{sc.host}]" if ":" in sc.host else sc.host
    print(f"imagerl reward server: rewards {list(server.rewards)}{chat} on http://{host}:{port} "
          f"(auth {'on' if server.api_key else 'off'}; max_batch {sc.max_batch}, max_wait_ms {sc.max_wait_ms:g})",
          flush=True)
    try:
        uvicorn.Server(uvicorn.Config(server.app, log_level="info", access_log=False, lifespan="off")).run(sockets=[sock])
    finally:
        sock.close()
        server.close()
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print("usage: python -m imagerl.serve CONFIG [key=value ...]", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2:]))
