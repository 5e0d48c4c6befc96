"""The repository layout keeps the standard library reachable and the packages importable."""

import subprocess
import sys

from support import REPO


def test_platform_folder_does_not_shadow_the_standard_library():
    out = subprocess.run(
        [sys.executable, "-c", "import platform, sys; print(platform.system()); print(platform.__file__)"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.splitlines()
    assert out[0] == "Linux"
    assert not out[1].startswith(str(REPO))
    assert not (REPO / "platform" / "__init__.py").exists()


def test_the_top_level_is_the_design_cards():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.splitlines()
    top = {path.split("/")[0] for path in tracked}
    assert {"platform", "ray_jobs", "serve", "charts", "infra", "tests", "pyproject.toml",
            "README.md", ".ci"} <= top


def test_each_source_folder_holds_its_package():
    import atelier
    import atelier_jobs
    import atelier_serve

    assert atelier.__file__.startswith(str(REPO / "platform" / "atelier"))
    assert atelier_jobs.__file__.startswith(str(REPO / "ray_jobs" / "atelier_jobs"))
    assert atelier_serve.__file__.startswith(str(REPO / "serve" / "atelier_serve"))


def test_cli_help_runs():
    out = subprocess.run(
        [sys.executable, "-m", "atelier.cli.main", "--help"], capture_output=True, text=True,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    for command in ("up", "down", "status", "catalogue", "train", "models", "serve", "generate",
                    "demo", "schema"):
        assert command in out.stdout
