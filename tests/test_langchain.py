"""LangChain's standard chat-model integration tests (``langchain-tests``) against the HTTP
door on the default model, run not claimed (slow suite: ``make test-slow``).

They are asyncio's and this suite is trio's, so they run in a pytest of their own
(``tests/conformance/``) against a daemon this test starts. The counts are printed (the
README reports them); the test fails if a test outside the known model-bound failures fails,
or if fewer pass than the README says.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_http import http_url

from conftest import start_daemon

pytestmark = pytest.mark.slow
HERE = Path(__file__).parent / "conformance"
MODEL_BOUND = {
    # Gemma's own template refuses two user turns in a row (its raise_exception).
    "test_double_messages_conversation",
    # The 270M base model picks wrong arguments (asked to add 1 and 2, it passes 10**15).
    "test_tool_calling[model0]", "test_tool_calling[model1]", "test_tool_calling_async",
    # Held to JSON, the base model does not close it within max_tokens (the optional-param
    # schema too, with the greedy text of an AMD EPYC: 200 tokens, finish_reason "length").
    "test_json_mode", "test_structured_output_optional_param",
}
"""Standard tests the default model fails by itself: what it generates, not what lorad does
(each checked by hand on the run that set this list)."""
AT_LEAST_PASSED = 30
"""34 passed on the run that set it (Intel Xeon); a margin for another CPU's greedy text."""


def test_langchain_standard_chat_model_tests(tmp_path: Path, gemma: Path) -> None:
    pytest.importorskip("langchain_tests", reason="the conformance extra: "
                        "pip install 'lorad[conformance]'")
    (tmp_path / "lorad.toml").write_text("[http]\nn_ctx = 4096\n")
    d = start_daemon(tmp_path, [gemma.parent], "--config", str(tmp_path / "lorad.toml"),
                     "--model", str(gemma), "--alias", "gemma", "--http", "127.0.0.1:0")
    try:
        env = {**os.environ, "LORAD_HTTP_URL": http_url(d), "LORAD_MODEL": "gemma",
               "LORAD_MAX_TOKENS": "200"}
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-rfs", "--tb=short", "-p", "no:trio",
             "-p", "no:cacheprovider", "-c", str(HERE / "pytest.ini"), "--rootdir", str(HERE),
             str(HERE / "test_langchain_standard.py")],
            env=env, cwd=HERE, capture_output=True, text=True, timeout=1200)
    finally:
        assert d.stop() == 0, d.log()
    summary = run.stdout.strip().splitlines()[-1]
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped)",
                                                      summary)}
    failed = set(re.findall(r"^FAILED \S+::(\S+)", run.stdout, re.M))
    print(run.stdout)  # whole, in the captured output: an assertion message is cut
    print(f"\nlangchain-tests: {summary}")
    assert counts.get("passed", 0) >= AT_LEAST_PASSED, summary
    assert failed <= MODEL_BOUND, sorted(failed - MODEL_BOUND)
