"""The README's "First steps" requests, run as written against a server of the demo models."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import httpx

from server_process import ServerProcess

ROOT = Path(__file__).resolve().parents[1]


def _first_steps_curls() -> list[tuple[list[str], str | None]]:
    """Each curl command of the section's first shell block, and its `# ...: <json>` answer."""
    section = (ROOT / "README.md").read_text().split("### First steps")[1]
    block = section.split("```sh")[1].split("```")[0].replace("\\\n", " ")
    commands = []
    for line in block.strip().splitlines():
        command, _, comment = line.partition("#")
        expected = re.search(r"(\{.*\})\s*$", comment)
        commands.append((shlex.split(command), expected[1] if expected else None))
    return commands


def _send(client: httpx.Client, argv: list[str]) -> httpx.Response:
    assert argv[0] == "curl", argv
    headers, body, url = {}, None, None
    args = iter(argv[1:])
    for arg in args:
        if arg == "-H":
            name, _, value = next(args).partition(":")
            headers[name.strip()] = value.strip()
        elif arg == "-d":
            body = next(args)
        else:
            url = arg
    assert url is not None and url.startswith("localhost:8000/"), argv
    path = url.removeprefix("localhost:8000")
    if body is None:
        return client.get(path, headers=headers)
    return client.post(path, content=body, headers=headers)


def test_first_steps_requests_answer_as_the_readme_says(tmp_path: Path) -> None:
    from podserve.demo_models import build_demo_repository

    build_demo_repository(tmp_path)
    commands = _first_steps_curls()
    assert len(commands) >= 2, commands
    with ServerProcess(tmp_path, workers=1) as server, httpx.Client(base_url=server.url) as client:
        for argv, expected in commands:
            response = _send(client, argv)
            assert response.status_code == 200, (argv, response.text)
            if expected is not None:
                assert response.json() == json.loads(expected), argv
            if any("/infer" in arg for arg in argv):
                assert "infer;dur=" in response.headers["server-timing"]
        # What the section says of a request without the JSON content type.
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        bare = client.post("/v2/models/text/infer", content=b"{}", headers=form)
        assert bare.status_code == 415, bare.text
