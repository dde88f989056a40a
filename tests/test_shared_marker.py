"""The `shared` marker: its tests skip, saying how to provide the data, without ../shared, and
DIFFPRESS_REQUIRE_SHARED=1 (CI) turns those skips, and only those, into failures."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree

import pytest

from model.paths import REPO

INNER_CONFTEST = "from tests.conftest import *  # noqa: F401,F403 - the project's hooks and fixtures\n"
INNER_TESTS = '''
import pytest

def test_uses_the_authors_weights(uqdm_tiny):  # not marked by hand: the fixture marks it
    pass

def test_uses_the_dev_photos(dev_photo_paths):
    pass

@pytest.mark.shared
def test_marked_and_skipped():
    pytest.skip("the team's photos are not here")

def test_skipped_for_another_reason():
    pytest.skip("nothing to do with ../shared")

def test_passes():
    pass
'''


#: junit's names: a failure in a fixture (a skip turned into a failure there) is an "error"
KINDS = {"failure": "failed", "error": "failed", "skipped": "skipped"}


def run_inner(tmp_path, require: bool) -> tuple[dict[str, tuple[str, str]], str]:
    """Run the inner tests with no ../shared and an empty home; test name -> (outcome, message)."""
    (tmp_path / "conftest.py").write_text(INNER_CONFTEST)
    (tmp_path / "test_inner.py").write_text(INNER_TESTS)
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "DIFFPRESS_SHARED": str(tmp_path / "no-shared"), "HOME": str(home)}
    env.pop("DIFFPRESS_WEIGHTS", None)
    env.pop("DIFFPRESS_REQUIRE_SHARED", None)
    if require:
        env["DIFFPRESS_REQUIRE_SHARED"] = "1"
    report = tmp_path / f"report-{require}.xml"
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--rootdir", str(tmp_path),
                             f"--junitxml={report}", "test_inner.py"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    outcomes = {}
    for case in ElementTree.parse(report).getroot().iter("testcase"):
        found = [(KINDS[child.tag], child.get("message", "")) for child in case if child.tag in KINDS]
        outcomes[case.get("name")] = found[0] if found else ("passed", "")
    return outcomes, result.stdout


@pytest.fixture(scope="module")
def inner_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("inner")


def test_without_shared_data_the_shared_tests_skip_saying_how_to_provide_it(inner_dir):
    outcomes, output = run_inner(inner_dir, require=False)
    assert {name: outcome for name, (outcome, _) in outcomes.items()} == {
        "test_uses_the_authors_weights": "skipped", "test_uses_the_dev_photos": "skipped",
        "test_marked_and_skipped": "skipped", "test_skipped_for_another_reason": "skipped",
        "test_passes": "passed"}, output
    weights_reason = outcomes["test_uses_the_authors_weights"][1]
    assert "DIFFPRESS_SHARED" in weights_reason and "python -m jobs.import_uqdm" in weights_reason
    assert "github.com/mandt-lab/uqdm" in weights_reason
    assert "DIFFPRESS_SHARED" in outcomes["test_uses_the_dev_photos"][1]


def test_on_ci_a_skipped_shared_test_fails_and_says_why(inner_dir):
    outcomes, output = run_inner(inner_dir, require=True)
    assert {name: outcome for name, (outcome, _) in outcomes.items()} == {
        "test_uses_the_authors_weights": "failed", "test_uses_the_dev_photos": "failed",
        "test_marked_and_skipped": "failed", "test_skipped_for_another_reason": "skipped",
        "test_passes": "passed"}, output
    assert "DIFFPRESS_REQUIRE_SHARED=1" in output and "the team's photos are not here" in output
    assert "python -m jobs.import_uqdm" in output
