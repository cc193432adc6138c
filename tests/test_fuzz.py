"""A schema-driven fuzz run (schemathesis, from /schema/openapi.json) with zero server errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.support import Api, token


def test_schemathesis_finds_no_server_error(api: Api) -> None:
    env = os.environ | {"SCHEMATHESIS_HOOKS": "tests.fuzz_checks", "PYTHONPATH": os.getcwd()}
    result = subprocess.run(
        [
            sys.executable, "-m", "schemathesis.cli", "run", f"{api.base_url}/schema/openapi.json",
            "--checks", "no_server_error",
            "--max-examples", os.environ.get("CHATLOG_FUZZ_EXAMPLES", "15"),
            "--generation-deterministic",
            "--header", f"Authorization: Bearer {token('fuzzer')}",
            "--no-color",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )  # fmt: skip
    summary = result.stdout[-3000:]
    assert result.returncode == 0, summary
    tested = re.search(r"Tested: (\d+)", summary)
    assert tested is not None and int(tested.group(1)) >= 11, summary  # every operation, /v1 and operations
