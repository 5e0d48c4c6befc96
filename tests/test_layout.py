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


def test_each_source_folder_holds_its_package():
    import atelier
    import atelier_jobs

    assert atelier.__file__.startswith(str(REPO / "platform" / "atelier"))
    assert atelier_jobs.__file__.startswith(str(REPO / "ray_jobs" / "atelier_jobs"))


def test_cli_help_runs():
    out = subprocess.run(
        [sys.executable, "-m", "atelier.cli.main", "--help"], capture_output=True, text=True,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    for command in ("up", "down", "status", "catalogue", "models", "demo"):
        assert command in out.stdout
