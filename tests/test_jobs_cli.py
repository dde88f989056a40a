"""What the command lines share."""

from __future__ import annotations

from model.paths import REPO


def test_only_the_cli_helper_configures_logging():
    """Every job sets logging up through jobs._cli.setup_logging; the libraries never do."""
    offenders = [str(path.relative_to(REPO)) for folder in ("jobs", "model", "pipeline")
                 for path in (REPO / folder).rglob("*.py")
                 if "basicConfig(" in path.read_text() and path != REPO / "jobs" / "_cli.py"]
    assert offenders == []
    for job in ("compress_bucket", "decode", "evaluate", "import_uqdm", "train"):
        assert "setup_logging()" in (REPO / "jobs" / f"{job}.py").read_text(), job
