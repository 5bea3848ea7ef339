"""`maas demo` end to end in a subprocess: its own mesh, every step, exit 0, nothing left running."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from maas.local.mesh import SOURCE_MODELS

REPO = Path(__file__).resolve().parents[2]
MAAS = [sys.executable, "-c", "import sys; from maas.cli import main; sys.argv[0] = 'maas'; main()"]


def test_maas_demo_runs_every_step_and_exits_zero(tmp_path):
    subprocess.run([sys.executable, str(REPO / "tools" / "build_models.py")], check=True, cwd=REPO)
    result = subprocess.run(
        [*MAAS, "demo", "--json", "--state-dir", str(tmp_path / "state")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    chat = ["Chat", "Ask"] if any(m.name == "smollm2" for m in SOURCE_MODELS) else []
    assert [s["step"].split()[0] for s in summary["steps"]] == [
        "Embed",
        "Classify",
        *chat,
        "Register",
        "Send",
        "Promote",
        "Roll",
    ]
    if chat:
        assert summary["chat"]["text"].strip() and summary["openai"]["same_as_grpc"]
    assert "cat" in summary["classify"]["top1"] and 0.2 < summary["embed"]["cosine"] < 1
    production, candidate = summary["versions"]["production"], summary["versions"]["candidate"]
    assert set(summary["canary"]) == {f"v{production}", f"v{candidate}"}
    assert summary["rollback"] == {"from": candidate, "to": production}


def test_maas_demo_fails_with_a_clear_message(tmp_path):
    result = subprocess.run(
        [*MAAS, "demo", "--model-repository", str(tmp_path / "missing"), "--state-dir", str(tmp_path / "state")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and "model repository" in result.stderr and "not found" in result.stderr
