"""The backend registry: a backend defined outside kv_transfer/ (tests/kv_transfer/
slow_backend.py), registered only by PDSERVE_KV_BACKENDS, shows up in every CLI's choices
and passes the generic connector suite, with no edit anywhere else."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from engine.errors import InvalidRequestError
from kv_transfer import backend_names
from kv_transfer.registry import PLUGINS_ENV, get_backend

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def plugin_env(modules: str = "slow_backend") -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH", "")]))
    return {**os.environ, PLUGINS_ENV: modules, "PYTHONPATH": path}


def test_a_plugin_backend_is_registered_by_the_environment_alone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert "slowtcp" not in backend_names()
    monkeypatch.setenv(PLUGINS_ENV, "slow_backend")
    monkeypatch.syspath_prepend(str(HERE))
    names = backend_names()
    assert {"tcp", "slowtcp"} <= set(names) and names.index("tcp") < names.index("slowtcp")
    assert get_backend("slowtcp").summary.startswith("tcp with a receiver that delays")


@pytest.mark.parametrize("modules,why", [
    ("no_such_backend_module", "cannot be imported"),
    ("kvt_helpers", "defines no BACKEND"),
    ("slow_backend,slow_backend", "two KV backends are named 'slowtcp'"),
])
def test_a_bad_plugin_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, modules: str,
                                       why: str) -> None:
    monkeypatch.setenv(PLUGINS_ENV, modules)
    monkeypatch.syspath_prepend(str(HERE))
    with pytest.raises(InvalidRequestError, match=why):
        backend_names()


@pytest.mark.parametrize("command", ["decode", "prefill", "up"])
def test_the_plugin_is_among_the_cli_choices(command: str) -> None:
    out = subprocess.run([sys.executable, "-m", "pdserve.cli", command, "--help"],
                         capture_output=True, text=True, env=plugin_env(), cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    flag = "--kv-connector" if command != "up" else "--connector"
    choices = re.search(re.escape(flag) + r" \{([^}]*)\}", out.stdout)
    assert choices is not None, out.stdout
    assert "slowtcp" in choices.group(1).split(",") and "tcp" in choices.group(1).split(",")


@pytest.mark.timeout(300)
def test_the_plugin_passes_the_generic_connector_suite() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         str(HERE / "test_kv_connectors.py"), "-k", "slowtcp"],
        capture_output=True, text=True, env=plugin_env(), cwd=REPO, timeout=280)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    passed = re.search(r"(\d+) passed", out.stdout)
    assert passed is not None and int(passed.group(1)) >= 15, out.stdout[-2000:]
